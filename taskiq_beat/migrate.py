"""Applying taskiq-beat's own Alembic migrations from code or from ``taskiq-beat db upgrade``.

The migrations ship inside the package (``taskiq_beat.migrations``) and keep their history in
the table ``taskiq_beat_alembic_version``, apart from the host application's own Alembic
history.

A database that taskiq-beat 1.4 created (the same table names, its own columns, no version
table: 1.4 shipped no migrations) is converted in place first, in one transaction:

1. its two tables are renamed ``taskiq_beat_v14_job`` and ``taskiq_beat_v14_run`` (kept
   whole, as an archive; their indexes are dropped, their names being ours now);
2. the migrations create the current tables;
3. every job is copied with its id, name, task, trigger, payload, enabled flag, next and
   last run (see :mod:`taskiq_beat.v14` for what is rewritten), and the run history with
   one run per fire.

Stop the 1.4 schedulers first; drop the archive tables once you no longer need them.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Callable
from importlib.resources import files
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from taskiq_beat.models import SchedulerJob, SchedulerRun
from taskiq_beat.v14 import V14_JOB_COLUMNS, convert_job, convert_runs

__all__ = [
    "V14_ARCHIVE_TABLES",
    "VERSION_TABLE",
    "alembic_config",
    "describe_upgrade",
    "is_v14_database",
    "upgrade_database",
]

VERSION_TABLE = "taskiq_beat_alembic_version"
V14_ARCHIVE_TABLES = {
    "scheduler_job": "taskiq_beat_v14_job",
    "scheduler_run": "taskiq_beat_v14_run",
}
"""Where a conversion from taskiq-beat 1.4 keeps the 1.4 tables, by their former names."""

_T = TypeVar("_T")


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the bundled migrations, aimed at ``url``."""
    config = Config(cmd_opts=Namespace(x=[f"url={url}"]))
    config.set_main_option("script_location", str(files("taskiq_beat.migrations")))
    config.attributes["configure_logger"] = False
    return config


def upgrade_database(url: str, revision: str = "head") -> list[str]:
    """Upgrade the scheduler tables at ``url`` (an async SQLAlchemy URL) to ``revision``;
    a taskiq-beat 1.4 database is converted first (to ``head`` only). Returns what the
    conversion did, one line per step (nothing for an ordinary upgrade).

    Runs its own event loop: call it from synchronous code (a deploy step, a CLI).

    :raises ValueError: for a 1.4 database and a ``revision`` other than ``head``, or one
        whose archive tables exist already.
    """
    if _on_connection(url, is_v14_database):
        if revision != "head":
            raise ValueError(
                f"revision={revision!r}: a taskiq-beat 1.4 database is converted to 'head' only"
            )
        return _on_connection(url, lambda connection: _convert_v14(connection, url), write=True)
    command.upgrade(alembic_config(url), revision)
    return []


def describe_upgrade(url: str, revision: str = "head") -> list[str]:
    """What :func:`upgrade_database` would do at ``url``, one line per step (a dry run)."""
    return _on_connection(url, lambda connection: _describe(connection, url, revision))


def is_v14_database(connection: Connection) -> bool:
    """Whether the database holds taskiq-beat 1.4's tables and none of our version table."""
    inspector = sa.inspect(connection)
    tables = set(inspector.get_table_names())
    if VERSION_TABLE in tables or "scheduler_job" not in tables:
        return False
    columns = {column["name"] for column in inspector.get_columns("scheduler_job")}
    return columns >= V14_JOB_COLUMNS


def _on_connection(url: str, work: Callable[[Connection], _T], *, write: bool = False) -> _T:
    async def run() -> _T:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            if write:
                async with engine.begin() as connection:
                    return await connection.run_sync(work)
            async with engine.connect() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _read_v14(connection: Connection) -> tuple[list[Any], list[Any]]:
    metadata = sa.MetaData()
    jobs = sa.Table("scheduler_job", metadata, autoload_with=connection)
    runs = sa.Table("scheduler_run", metadata, autoload_with=connection)
    return (
        list(connection.execute(sa.select(jobs)).mappings()),
        list(connection.execute(sa.select(runs)).mappings()),
    )


def _describe(connection: Connection, url: str, revision: str) -> list[str]:
    if is_v14_database(connection):
        job_rows, run_rows = _read_v14(connection)
        return _v14_plan(job_rows, run_rows)[0]
    script = ScriptDirectory.from_config(alembic_config(url))
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    current = context.get_current_heads()
    target = script.get_revisions(revision)
    pending = (
        [
            step.revision
            for step in reversed(
                list(script.iterate_revisions(target[0].revision, current or None))
            )
            if step.revision not in current
        ]
        if target
        else []
    )
    lines = [f"current revision: {', '.join(current) or 'none (empty database)'}"]
    lines += [f"apply migration {name}" for name in pending] or ["nothing to apply"]
    return lines


def _v14_plan(
    job_rows: list[Any], run_rows: list[Any]
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """What converting these 1.4 rows does (one line per step), the job rows and the runs."""
    converted = [convert_job(row) for row in job_rows]
    jobs = [values for values, _ in converted]
    runs = convert_runs(run_rows, {values["id"] for values in jobs})
    enabled = sum(1 for values in jobs if values["is_enabled"])
    lines = [
        f"taskiq-beat 1.4 database found (scheduler_job has trigger_payload, no {VERSION_TABLE})",
        *(f"rename {old} to {new} (kept as an archive)" for old, new in V14_ARCHIVE_TABLES.items()),
        "create the current tables (migrations up to head)",
        f"copy {len(jobs)} jobs ({enabled} enabled) with their ids, triggers, payloads "
        "and next runs",
        f"copy {len(runs)} runs (one per fire) of {len(run_rows)} run rows",
    ]
    lines += [f"disable job {values['id']}: {problem}" for values, problem in converted if problem]
    return lines, jobs, runs


def _convert_v14(connection: Connection, url: str) -> list[str]:
    """Convert a 1.4 database in the transaction of ``connection`` (see the module docstring);
    return what was done, as :func:`describe_upgrade` words it."""
    inspector = sa.inspect(connection)
    taken = set(V14_ARCHIVE_TABLES.values()) & set(inspector.get_table_names())
    if taken:
        raise ValueError(f"archive tables exist already: {', '.join(sorted(taken))}")
    # A write first: on SQLite it opens the transaction that the DDL below then joins (an
    # error anywhere then leaves the 1.4 database as it was, on SQLite as on PostgreSQL).
    connection.execute(sa.text("UPDATE scheduler_job SET id = id WHERE 1 = 0"))
    done, jobs, runs = _v14_plan(*_read_v14(connection))
    preparer = connection.dialect.identifier_preparer
    for table in V14_ARCHIVE_TABLES:
        for index in inspector.get_indexes(table):
            if index["name"]:
                connection.execute(sa.text(f"DROP INDEX {preparer.quote(index['name'])}"))
    for old, new in V14_ARCHIVE_TABLES.items():
        connection.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    if jobs:
        rows = []
        for values in jobs:
            row = dict(values)
            row["metadata"] = row.pop("job_metadata")
            rows.append(row)
        connection.execute(sa.insert(SchedulerJob), rows)
    if runs:
        connection.execute(sa.insert(SchedulerRun), runs)
    return done
