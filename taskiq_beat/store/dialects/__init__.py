"""The engine's hot statements, one class per SQL dialect. Their text does not depend on
the batch size, so each is compiled (and on PostgreSQL prepared) once: the rows travel as
array parameters (PostgreSQL, ``unnest``) or as one JSON parameter (SQLite, ``json_each``;
MySQL and MariaDB, ``JSON_TABLE``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import UTCDateTime, is_mysql
from taskiq_beat.store._common import _dialect_name, _Executor, _job, _run
from taskiq_beat.store.values import Claims

_JOB, _RUN = _job.name, _run.name
_RUN_INSERT = (
    f"INSERT INTO {_RUN} (job_id, scheduled_for, status, task_id, attempt, claimed_by,"
    " next_attempt_at, created_at, updated_at)"
)
_STATUS, _DISPATCHED = RunStatus.CLAIMED.value, RunStatus.DISPATCHED.value


def _times(*names: str) -> list[sa.BindParameter[Any]]:
    return [sa.bindparam(name, type_=UTCDateTime()) for name in names]


_STATS = "scheduler_job_stats"
STARTABLE = (
    f"(status IN ('{RunStatus.CLAIMED.value}', '{RunStatus.DISPATCHED.value}')"
    f" OR (status = '{RunStatus.FAILED.value}' AND finished_at IS NULL)"
    f" OR (status = '{RunStatus.LOST.value}' AND executions < 2))"
)
"""SQL: a run nobody executes (see store.lifecycle): a first delivery, a send counted failed
whose message got through, or a lost run's one further chance."""
_RUNNING_HERE = (
    f"status = '{RunStatus.RUNNING.value}', started_at = :now, finished_at = NULL,"
    " duration_seconds = NULL, worker_id = :worker, next_attempt_at = NULL,"
    " updated_at = :now, error = NULL, error_type = NULL"
)
STARTED = f"{_RUNNING_HERE}, executions = executions + 1"
"""SQL: the ``SET`` of a first start (a new execution of the fire)."""
RESTARTED = (
    f"{_RUNNING_HERE}, retries = :retries,"
    " executions = CASE WHEN executions < 1 THEN 1 ELSE executions END"
)
"""SQL: the ``SET`` of a start by Taskiq's retry middleware (see ``restart_run``)."""
RESTARTABLE = (
    "id = :id AND job_id = :job_id AND retries < :retries"
    f" AND (status IN ('{RunStatus.RUNNING.value}', '{RunStatus.FAILED.value}') OR {STARTABLE})"
)
"""SQL: the run ``:id`` may be started by a retry with ``:retries``."""
_RESTART = sa.text(
    f"UPDATE {_RUN} SET {RESTARTED} WHERE {RESTARTABLE} RETURNING id, executions"
).bindparams(sa.bindparam("now", type_=UTCDateTime()))


def counted(new: str | Callable[[str], str]) -> str:
    """SQL: the ``SET`` of a counters upsert, ``new`` naming the row that conflicted (or
    giving, for a column, the SQL of its value there: on MySQL the SELECT's column)."""
    stats = _STATS
    value = new if callable(new) else (lambda column: f"{new}.{column}")

    def latest(column: str) -> str:
        return (
            f"{column} = CASE WHEN {stats}.{column} IS NULL OR {stats}.{column} < {value(column)}"
            f" THEN COALESCE({value(column)}, {stats}.{column}) ELSE {stats}.{column} END"
        )

    return (
        f"run_count = {stats}.run_count + {value('run_count')},"
        f" success_count = {stats}.success_count + {value('success_count')},"
        f" failure_count = {stats}.failure_count + {value('failure_count')},"
        f" {latest('last_success_at')}, {latest('last_failure_at')},"
        f" last_duration_seconds = COALESCE({value('last_duration_seconds')},"
        f" {stats}.last_duration_seconds)"
    )


STATS_INSERT = (
    f"INSERT INTO {_STATS} (job_id, run_count, success_count, failure_count,"
    " last_success_at, last_failure_at, last_duration_seconds)"
)

STILL_CLAIMED = f" AND status = '{_STATUS}'"
"""SQL: the run is still the scheduler's. Once a worker started it (``running`` and after),
its status is the worker's: a record that comes later (the worker was faster than the
scheduler's record, or a ``kiq`` timed out after the message got through) leaves it."""


def _run_updates(where_ids: str) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
    """Close, release and delete run rows chosen by ``where_ids`` (the dialect's id list)."""
    close = sa.text(
        f"UPDATE {_RUN} SET status = :status, next_attempt_at = NULL, dispatched_at = :now,"
        f" updated_at = :now, error = NULL{where_ids}{STILL_CLAIMED}"
    ).bindparams(*_times("now"))
    release = sa.text(
        f"UPDATE {_RUN} SET next_attempt_at = :now, claimed_by = NULL, updated_at = :now"
        f"{where_ids}{STILL_CLAIMED}"
    ).bindparams(*_times("now"))
    return close, release, sa.text(f"DELETE FROM {_RUN}{where_ids}")


class _BatchSql:
    """The engine's hot statements for one dialect."""

    close: sa.TextClause
    release: sa.TextClause
    delete: sa.TextClause
    claims_at_once = False
    """Whether :meth:`claim` is one statement (and needs no transaction around it)."""

    async def claim(
        self,
        session: _Executor,
        claims: Claims,
        *,
        owner: str,
        lease_until: datetime,
        now: datetime,
    ) -> tuple[set[str], dict[str, int], set[str]]:
        """Advance the jobs by compare-and-set and insert the runs of those advanced (unless
        they exist). Returns the ids of the jobs advanced, the run id of each inserted run
        by job id, and the ids of the jobs skipped because another transaction held their
        row (PostgreSQL; never waited for), or that no longer exist. Run in one
        transaction."""
        raise NotImplementedError

    def id_params(self, ids: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    def slot_of_job(
        self, job_id: sa.ColumnElement[str], count: int
    ) -> sa.ColumnElement[int] | None:
        """SQL: the slot of a job among ``count`` schedulers, as ``taskiq_beat.sharing.slot_of``
        computes it (the first 28 bits of the MD5 of the id, modulo ``count``), or ``None``
        where the dialect has no MD5 (SQLite: one writer, which loads every due job)."""
        return None

    async def start_runs(
        self,
        session: _Executor,
        starts: Sequence[tuple[int, str]],
        *,
        worker_id: str,
        now: datetime,
    ) -> list[tuple[int, int]]:
        """Move the runs ``(run id, job id)`` that nobody executes to ``running`` (see
        :data:`STARTABLE`); return ``(run id, execution number)`` of each run moved."""
        raise NotImplementedError

    async def restart_run(
        self,
        session: _Executor,
        run_id: int,
        job_id: str,
        *,
        retries: int,
        worker_id: str,
        now: datetime,
    ) -> tuple[int, int] | None:
        """A retry by Taskiq's retry middleware (its ``_retries`` label is ``retries``): move
        the run to ``running`` if its earlier attempt failed (or is still being recorded) or
        nobody executes it; return ``(run id, execution number)``, or ``None``."""
        params = {"id": run_id, "job_id": job_id, "retries": retries}
        result = await session.execute(_RESTART, {**params, "worker": worker_id, "now": now})
        row = result.first()
        return None if row is None else (row[0], row[1])

    async def count_outcomes(self, session: _Executor, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add ``(job id, runs, succeeded, failed, last success at, last failure at, last
        duration)`` to each job's row of ``scheduler_job_stats`` (made if missing; jobs
        deleted meanwhile are left out)."""
        raise NotImplementedError

    async def write_outcomes(
        self, session: _Executor, outcomes: Sequence[tuple[Any, ...]]
    ) -> list[tuple[int, str]]:
        """Write each outcome ``(run id, executions, retries, status, finished_at, duration,
        error_type, error)`` onto its run if the run is still ``running`` with that execution
        number and retry count; return ``(run id, job id)`` of the runs written. One
        statement whose text never changes (the rows travel as one parameter), so it is
        compiled (and on PostgreSQL prepared) once."""
        raise NotImplementedError

    async def execute(
        self, session: _Executor, statement: sa.TextClause, params: dict[str, Any]
    ) -> None:
        """Run one of these statements (no rows) in ``session``'s transaction."""
        await session.execute(statement, params)

    async def close_runs(self, session: _Executor, ids: Sequence[int], *, now: datetime) -> None:
        params = {"now": now, "status": _DISPATCHED, **self.id_params(ids)}
        await self.execute(session, self.close, params)

    async def release_runs(self, session: _Executor, ids: Sequence[int], *, now: datetime) -> None:
        await self.execute(session, self.release, {"now": now, **self.id_params(ids)})

    async def delete_runs(self, session: _Executor, ids: Sequence[int]) -> None:
        await self.execute(session, self.delete, self.id_params(ids))


_T = TypeVar("_T")


class _EachTimeOnce(dict[datetime, _T]):
    """``convert`` of each distinct time once (a batch's fires share a few times):
    ``times[value]``, a plain dictionary lookup once a time is known."""

    def __init__(self, convert: Callable[[datetime], _T]) -> None:
        super().__init__()
        self._convert = convert

    def __missing__(self, value: datetime) -> _T:
        converted = self[value] = self._convert(value)
        return converted


def claims_at_once(dialect_name: str) -> bool:
    """Whether the dialect's claim is one statement (and needs no transaction around it)."""
    return dialect_name == "postgresql"


def batch_sql(session: _Executor) -> _BatchSql:
    """The statements of ``session``'s dialect."""
    return sql_of_dialect(_dialect_name(session))


def sql_of_dialect(name: str) -> _BatchSql:
    """The statements of the dialect called ``name`` (SQLAlchemy's name)."""
    from taskiq_beat.store.dialects.mysql import MYSQL
    from taskiq_beat.store.dialects.postgresql import POSTGRESQL
    from taskiq_beat.store.dialects.sqlite import SQLITE

    if name == "postgresql":
        return POSTGRESQL
    if name == "sqlite":
        return SQLITE
    if is_mysql(name):
        return MYSQL
    raise NotImplementedError(
        f"taskiq-beat supports SQLite, PostgreSQL, MySQL and MariaDB, not {name!r}"
    )
