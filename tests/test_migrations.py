"""The repository's Alembic migrations build exactly the schema of ``SchedulerBase.metadata``.

Each online test runs on a fresh SQLite file and on fresh PostgreSQL and MariaDB databases
created (and dropped) here: the session databases of ``postgres_url`` and ``mariadb_url`` are
shared with tests that create and drop the tables themselves, so they are not guaranteed to be
empty.
"""

from __future__ import annotations

import asyncio
import io
from argparse import Namespace
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from taskiq_beat.models import SchedulerBase, UTCDateTime
from tests.utils import temporary_mysql_database, temporary_postgres_database

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"
VERSION_TABLE = "taskiq_beat_alembic_version"
SCHEDULER_TABLES = {
    "scheduler_chain",
    "scheduler_chain_step",
    "scheduler_instance",
    "scheduler_job",
    "scheduler_job_stats",
    "scheduler_run",
    "scheduler_worker",
}
HEAD = "0006_scheduler_instances"


def _config(url: str | None = None, *, output: io.StringIO | None = None) -> Config:
    """An Alembic config on the repository's ``alembic.ini``, as ``alembic [-x url=URL]``."""
    config = Config(
        str(ALEMBIC_INI),
        output_buffer=output,
        stdout=io.StringIO(),
        cmd_opts=Namespace(x=[f"url={url}"] if url is not None else None),
    )
    # Do not let env.py apply the ini's logging sections to the test process's loggers.
    config.attributes["configure_logger"] = False
    return config


@pytest.fixture(autouse=True)
def _no_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKIQ_BEAT_DATABASE_URL", raising=False)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a new, empty database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.sqlite3'}"
        return
    if request.param == "mariadb":
        async with temporary_mysql_database("taskiq_beat_migrations") as url:
            yield url
        return
    async with temporary_postgres_database("taskiq_beat_migrations") as url:
        yield url


@pytest.fixture
async def engine(empty_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(empty_database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _schema_diff(connection: Connection) -> list[Any]:
    """What autogenerate would change to turn the database into ``SchedulerBase.metadata``."""
    context = MigrationContext.configure(
        connection,
        # version_table is not an exclusion: it tells autogenerate the name of the version
        # table our env.py uses (its default is "alembic_version"), exactly as env.py does;
        # otherwise the version table would be reported as a table to drop.
        opts={"compare_type": True, "version_table": VERSION_TABLE},
    )
    return list(compare_metadata(context, SchedulerBase.metadata))


def _table_names(connection: Connection) -> set[str]:
    return set(sa.inspect(connection).get_table_names())


def _versions(connection: Connection) -> list[str]:
    rows = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}"))
    return [str(row[0]) for row in rows]


def _schema_snapshot(connection: Connection) -> dict[str, Any]:
    """Tables, columns, indexes and constraints as reflected (comparable with ``==``)."""
    inspector = sa.inspect(connection)
    snapshot: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        snapshot[table] = {
            "columns": [
                (column["name"], str(column["type"]), column["nullable"])
                for column in inspector.get_columns(table)
            ],
            "pk": inspector.get_pk_constraint(table),
            "fks": inspector.get_foreign_keys(table),
            "unique": sorted(
                inspector.get_unique_constraints(table), key=lambda item: str(item["name"])
            ),
            "indexes": sorted(
                (_comparable_index(index) for index in inspector.get_indexes(table)),
                key=lambda item: str(item["name"]),
            ),
        }
    return snapshot


def _comparable_index(index: Any) -> dict[str, Any]:
    """A reflected index with its dialect options as text (a partial index's condition is
    reflected as a new ``TextClause`` each time, which compares by identity)."""
    options = {key: str(value) for key, value in index.get("dialect_options", {}).items()}
    return {**index, "dialect_options": options}


def _run(connection: Connection, config: Config, action: str, revision: str) -> None:
    """``alembic upgrade|downgrade REVISION`` on an existing connection (env.py's hook)."""
    config.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def test_upgrade_head_matches_models(empty_database_url: str, engine: AsyncEngine) -> None:
    # The full env.py path: URL from "-x url=...", its own async engine and event loop
    # (hence a thread: env.py calls asyncio.run).
    await asyncio.to_thread(command.upgrade, _config(empty_database_url), "head")

    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
        tables = await connection.run_sync(_table_names)
        assert tables == SCHEDULER_TABLES | {VERSION_TABLE}
        assert "alembic_version" not in tables
        assert await connection.run_sync(_versions) == [HEAD]


async def test_upgrade_on_given_connection_twice_is_a_noop(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "head")
    async with engine.connect() as connection:
        first = await connection.run_sync(_schema_snapshot)

    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "head")
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_snapshot) == first
        assert await connection.run_sync(_versions) == [HEAD]
        assert await connection.run_sync(_schema_diff) == []


async def test_downgrade_base_removes_both_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "head")
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "downgrade", "base")

    async with engine.connect() as connection:
        # Alembic keeps its (now empty) version table after "downgrade base".
        assert await connection.run_sync(_table_names) == {VERSION_TABLE}
        assert await connection.run_sync(_versions) == []

    # And the history can be replayed from scratch.
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "head")
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []


def _offline_sql(url: str | None = None) -> str:
    output = io.StringIO()
    command.upgrade(_config(url, output=output), "head", sql=True)
    return output.getvalue()


@pytest.mark.parametrize(
    ("url", "dialect_marker"),
    [
        (None, "next_run_at DATETIME"),  # sqlalchemy.url of alembic.ini: SQLite
        ("postgresql+asyncpg://user@localhost/db", "id BIGSERIAL NOT NULL"),
    ],
)
def test_offline_upgrade_emits_both_tables(url: str | None, dialect_marker: str) -> None:
    sql = _offline_sql(url)

    assert f"CREATE TABLE {VERSION_TABLE}" in sql
    assert "CREATE TABLE scheduler_job" in sql
    assert "CREATE TABLE scheduler_run" in sql
    assert dialect_marker in sql
    assert "ON DELETE CASCADE" in sql
    assert "CONSTRAINT uq_scheduler_run_job_id_scheduled_for UNIQUE (job_id, scheduled_for)" in sql


def test_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-x url=...`` > ``$TASKIQ_BEAT_DATABASE_URL`` > ``sqlalchemy.url`` of alembic.ini."""
    sqlite_marker, postgresql_marker = "next_run_at DATETIME", "id BIGSERIAL NOT NULL"
    assert sqlite_marker in _offline_sql()

    monkeypatch.setenv("TASKIQ_BEAT_DATABASE_URL", "postgresql+asyncpg://user@localhost/db")
    assert postgresql_marker in _offline_sql()
    assert sqlite_marker in _offline_sql("sqlite+aiosqlite:///elsewhere.sqlite3")


def test_single_head() -> None:
    assert ScriptDirectory.from_config(_config()).get_heads() == [HEAD]


async def test_0002_upgrades_a_0001_database_in_place(engine: AsyncEngine) -> None:
    """A database made by ``0001``, with a job and a run in it, upgrades to ``0002`` with both
    rows kept: the run reads as one no worker reported on, the job with no counted run."""
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "0001")
    at = sa.bindparam("at", type_=UTCDateTime())
    created = datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
    trigger = engine.dialect.identifier_preparer.quote("trigger")  # reserved on MySQL
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                f"INSERT INTO scheduler_job (id, name, task_name, kind, strategy, {trigger}, args,"
                " kwargs, metadata, is_enabled, revision, created_at, updated_at)"
                " VALUES ('job-1', 'kept', 't', 'single', 'one_off', '{}', '[]', '{}', '{}',"
                " true, 3, :at, :at)"
            ).bindparams(at),
            {"at": created},
        )
        await connection.execute(
            sa.text(
                "INSERT INTO scheduler_run (job_id, scheduled_for, status, task_id, attempt,"
                " created_at, updated_at) VALUES ('job-1', :at, 'dispatched', 'tid', 1, :at, :at)"
            ).bindparams(at),
            {"at": created},
        )
    async with engine.begin() as connection:
        await connection.run_sync(_run, _config(), "upgrade", "head")

    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
        job = (
            await connection.execute(
                sa.text("SELECT name, revision, source, definition_hash FROM scheduler_job")
            )
        ).one()
        assert tuple(job) == ("kept", 3, "api", None)  # 0004: a job made through the API
        run = (
            await connection.execute(
                sa.text(
                    "SELECT status, task_id, executions, retries, started_at, worker_id"
                    " FROM scheduler_run"
                )
            )
        ).one()
        assert tuple(run) == ("dispatched", "tid", 0, 0, None, None)
        assert await connection.run_sync(_versions) == [HEAD]
