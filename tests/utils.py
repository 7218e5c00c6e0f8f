"""Test helpers shared by the suite: a controllable clock, a recording broker, databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import asyncmy
import asyncpg
import pytest
from taskiq import InMemoryBroker
from taskiq.message import BrokerMessage, TaskiqMessage

UTC = timezone.utc


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        self.current += timedelta(seconds=seconds, **delta)
        return self.current

    def set(self, when: datetime) -> None:
        self.current = when


class RecordingBroker(InMemoryBroker):
    """Taskiq's in-memory broker that also keeps every message it was asked to send.

    ``fail_sends`` makes ``kick`` raise, as a broker that is down would.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[TaskiqMessage] = []
        self.fail_sends = False
        self._sent_changed = asyncio.Event()

    async def kick(self, message: BrokerMessage) -> None:
        if self.fail_sends:
            raise ConnectionError("broker unreachable (test)")
        self.sent.append(self.formatter.loads(message.message))
        self._sent_changed.set()
        await super().kick(message)

    async def wait_sent(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` messages were sent (at most ``timeout`` seconds)."""

        async def enough() -> None:
            while len(self.sent) < count:
                self._sent_changed.clear()
                await self._sent_changed.wait()

        await asyncio.wait_for(enough(), timeout)

    def sent_for(self, job_id: str) -> list[TaskiqMessage]:
        return [m for m in self.sent if m.labels.get("taskiq_beat_job_id") == job_id]


PG_HOST = os.environ.get("TASKIQ_BEAT_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TASKIQ_BEAT_PG_PORT", "5432"))
PG_USER = os.environ.get("TASKIQ_BEAT_PG_USER", "postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def postgres_unavailable(exc: BaseException) -> NoReturn:
    """Skip a PostgreSQL test outside CI; fail it under CI, where the server must run."""
    if IN_CI:
        pytest.fail(f"PostgreSQL is required under CI but unreachable: {exc}")
    pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {exc}")


async def _admin(statement: str) -> None:
    dsn = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_postgres_database(prefix: str) -> tuple[str, str]:
    """Create a new, empty database; return its name and SQLAlchemy URL (skips/fails if down)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        await _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        postgres_unavailable(exc)
    return name, f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


async def drop_postgres_database(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def temporary_postgres_database(prefix: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for the duration of the block; yields its URL."""
    name, url = await create_postgres_database(prefix)
    try:
        yield url
    finally:
        await drop_postgres_database(name)


MYSQL_HOST = os.environ.get("TASKIQ_BEAT_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TASKIQ_BEAT_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("TASKIQ_BEAT_MYSQL_USER", "root")


def mysql_unavailable(exc: BaseException) -> NoReturn:
    """Skip a MariaDB/MySQL test outside CI; fail it under CI, where the server must run."""
    if IN_CI:
        pytest.fail(f"MariaDB is required under CI but unreachable: {exc}")
    pytest.skip(f"MariaDB not reachable at {MYSQL_HOST}:{MYSQL_PORT}: {exc}")


async def _mysql_admin(statement: str) -> None:
    connection = await asyncio.wait_for(
        asyncmy.connect(host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, connect_timeout=5), 10
    )
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(statement)
    finally:
        connection.close()


async def create_mysql_database(prefix: str) -> tuple[str, str]:
    """Create a new, empty MariaDB/MySQL database; return its name and SQLAlchemy URL
    (skips/fails if the server is down)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        await _mysql_admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    except (OSError, asyncmy.errors.Error, asyncio.TimeoutError) as exc:
        mysql_unavailable(exc)
    return name, f"mysql+asyncmy://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"


async def drop_mysql_database(name: str) -> None:
    await _mysql_admin(f"DROP DATABASE IF EXISTS `{name}`")


@contextlib.asynccontextmanager
async def temporary_mysql_database(prefix: str) -> AsyncIterator[str]:
    """A new, empty MariaDB/MySQL database for the duration of the block; yields its URL."""
    name, url = await create_mysql_database(prefix)
    try:
        yield url
    finally:
        await drop_mysql_database(name)
