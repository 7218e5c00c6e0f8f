"""Fixtures: every database test runs on a fresh SQLite file, on a real PostgreSQL and on a
real MariaDB.

PostgreSQL and MariaDB tests use one database per server created for the test session (and
dropped after it), with the tables created anew for each test. Outside CI they are skipped
when no server answers; under CI (``CI=true``) an unreachable server fails the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from taskiq_beat import SchedulerApp, SchedulerBase, SchedulerConfig
from taskiq_beat.worker import RunLifecycleMiddleware
from tests.utils import (
    FakeClock,
    RecordingBroker,
    create_mysql_database,
    create_postgres_database,
    drop_mysql_database,
    drop_postgres_database,
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of its own for this test session."""
    name, url = asyncio.run(create_postgres_database("taskiq_beat_test"))
    try:
        yield url
    finally:
        asyncio.run(drop_postgres_database(name))


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A MariaDB (or MySQL) database of its own for this test session."""
    name, url = asyncio.run(create_mysql_database("taskiq_beat_test"))
    try:
        yield url
    finally:
        asyncio.run(drop_mysql_database(name))


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'beat.sqlite3'}"
    if backend == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(autouse=True)
def lifecycles(monkeypatch: pytest.MonkeyPatch) -> list[RunLifecycleMiddleware]:
    """Every lifecycle middleware a test makes (its apps add one to their broker)."""
    made: list[RunLifecycleMiddleware] = []
    original = RunLifecycleMiddleware.__init__

    def init(self: RunLifecycleMiddleware, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(RunLifecycleMiddleware, "__init__", init)
    return made


@pytest.fixture
async def db_engine(
    database_url: str, lifecycles: list[RunLifecycleMiddleware]
) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.drop_all)
        await connection.run_sync(SchedulerBase.metadata.create_all)
    try:
        yield engine
    finally:
        # Stop the lifecycle reporting of the test's apps (the tasks their in-memory brokers
        # ran started it) while the database is still there to write to.
        for middleware in lifecycles:
            await middleware.close()
        await engine.dispose()


@pytest.fixture
def session_factory(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(db_engine, expire_on_commit=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def broker() -> AsyncIterator[RecordingBroker]:
    broker = RecordingBroker()
    executed: list[tuple[Any, ...]] = []
    broker.state.executed = executed

    @broker.task(task_name="tests.record")
    async def record(*args: Any, **kwargs: Any) -> int:
        executed.append((args, kwargs))
        return len(executed)

    @broker.task(task_name="tests.fail")
    async def fail(*args: Any, **kwargs: Any) -> None:
        executed.append(("fail", args, kwargs))
        raise RuntimeError("step failed (test)")

    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


@pytest.fixture
def config() -> SchedulerConfig:
    # The scheduler side alone: the in-memory broker executes what it is sent, and with the
    # lifecycle on its runs would move on from "dispatched" (tests/test_lifecycle.py has it on).
    return SchedulerConfig(
        sync_interval_seconds=1.0, dispatch_retry_seconds=5, record_lifecycle=False
    )


@pytest.fixture
def app(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    config: SchedulerConfig,
    clock: FakeClock,
) -> SchedulerApp:
    return SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)


@pytest.fixture
async def session(session_factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with session_factory() as session:
        yield session
