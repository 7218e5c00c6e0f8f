"""Job management in the caller's session: create, read, list, upsert, delete."""

from __future__ import annotations

from collections.abc import Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    cast,
)

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from taskiq_beat.models import (
    SchedulerChain,
    SchedulerChainStep,
    SchedulerJob,
    SchedulerJobStats,
    SchedulerRun,
    is_mysql,
)
from taskiq_beat.store._common import (
    _CHUNK,
    _announce_change,
    _column_names,
    _commit,
    _dialect_name,
    _job,
    _make_room,
    _upsert,
)
from taskiq_beat.store.values import JOB_SORT_COLUMNS, JobSummary, ScheduleState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["DECLARATION_COLUMNS", "JobOperations"]

DECLARATION_COLUMNS = ("source", "definition_hash", "schedule_version")
"""The columns that only applying the schedules declared in code writes."""
_stats = cast("sa.Table", SchedulerJobStats.__table__)
_NULLABLE_SORTS = frozenset({"name", "next_run_at", "last_run_at"})


class JobOperations:
    """Management operations on jobs; each runs in the caller's session and commits it."""

    @staticmethod
    async def add_job(session: AsyncSession, job: SchedulerJob) -> SchedulerJob:
        """Insert ``job`` and commit.

        :raises IntegrityError: if a job with the same id exists.
        """
        _make_room(session, job)
        session.add(job)
        try:
            await _announce_change(session)
            await _commit(session)
        except IntegrityError:
            await session.rollback()
            raise
        return job

    @staticmethod
    async def get_job(
        session: AsyncSession, job_id: str, *, for_update: bool = False
    ) -> SchedulerJob | None:
        """Return the job ``job_id`` (fresh from the database) or ``None``."""
        statement = sa.select(SchedulerJob).where(SchedulerJob.id == job_id)
        if for_update:
            statement = statement.with_for_update()
        statement = statement.execution_options(populate_existing=True)
        result = await session.execute(statement)
        return result.scalar_one_or_none()

    @staticmethod
    async def find_job(session: AsyncSession, job_id: str) -> SchedulerJob | None:
        """Return the job ``job_id`` or ``None``, ending the read transaction."""
        job = await JobOperations.get_job(session, job_id)
        await _commit(session)
        return job

    @staticmethod
    async def save(session: AsyncSession, job: SchedulerJob) -> SchedulerJob:
        """Commit the changes made to ``job`` (loaded in ``session``)."""
        await _announce_change(session)
        await _commit(session)
        return job

    @staticmethod
    async def rollback(session: AsyncSession) -> None:
        from taskiq_beat.store.declared import release_declarations

        await release_declarations(session)
        await session.rollback()

    @staticmethod
    async def delete_job(session: AsyncSession, job_id: str) -> bool:
        """Delete the job and its runs; return whether it existed."""
        runs = sa.select(SchedulerRun.id).where(SchedulerRun.job_id == job_id).scalar_subquery()
        await session.execute(
            sa.delete(SchedulerChainStep).where(SchedulerChainStep.run_id.in_(runs))
        )
        await session.execute(sa.delete(SchedulerChain).where(SchedulerChain.run_id.in_(runs)))
        await session.execute(sa.delete(SchedulerRun).where(SchedulerRun.job_id == job_id))
        await session.execute(
            sa.delete(SchedulerJobStats).where(SchedulerJobStats.job_id == job_id)
        )
        result = await session.execute(sa.delete(SchedulerJob).where(SchedulerJob.id == job_id))
        await _announce_change(session)
        await _commit(session)
        return bool(getattr(result, "rowcount", 0))

    @staticmethod
    async def list_jobs(
        session: AsyncSession,
        *,
        is_enabled: bool | None = None,
        task_name: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[SchedulerJob]:
        """Jobs ordered by id, optionally filtered."""
        statement = sa.select(SchedulerJob).order_by(SchedulerJob.id)
        if is_enabled is not None:
            statement = statement.where(SchedulerJob.is_enabled.is_(is_enabled))
        if task_name is not None:
            statement = statement.where(SchedulerJob.task_name == task_name)
        statement = statement.offset(offset)
        if limit is not None:
            statement = statement.limit(limit)
        result = await session.execute(statement.execution_options(populate_existing=True))
        jobs = list(result.scalars())
        await _commit(session)
        return jobs

    @staticmethod
    async def load_schedule_state(
        session: AsyncSession, job_ids: Sequence[str]
    ) -> dict[str, ScheduleState]:
        """The schedule-relevant state of the existing jobs among ``job_ids``."""
        columns = [
            _job.c.trigger,
            _job.c.task_name,
            _job.c.kind,
            _job.c.is_enabled,
            _job.c.next_run_at,
            _job.c.last_run_at,
            _job.c.last_error,
            _job.c.revision,
            _job.c.created_at,
        ]
        found: dict[str, ScheduleState] = {}
        if _dialect_name(session) == "postgresql":
            # A join on an array: primary-key lookups, whatever the planner knows of the table
            # (an IN list of parameters on a freshly filled table gets a sequential scan that
            # compares every row with every parameter).
            ids = sa.func.unnest(sa.bindparam("ids", type_=postgresql.ARRAY(sa.String())))
            wanted = ids.table_valued("id").render_derived(name="wanted")
            statement = sa.select(_job.c.id, *columns).join(wanted, wanted.c.id == _job.c.id)
            chunks = [{"ids": list(job_ids)}]
        else:
            statement = sa.select(_job.c.id, *columns).where(
                _job.c.id.in_(sa.bindparam("ids", expanding=True))
            )
            chunks = [
                {"ids": list(job_ids[start : start + _CHUNK])}
                for start in range(0, len(job_ids), _CHUNK)
            ]
        for params in chunks:
            for job_id, *values in await session.execute(statement, params):
                found[job_id] = ScheduleState(*values)
        return found

    @staticmethod
    async def write_jobs(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or overwrite whole jobs (by id; values by attribute name) and commit."""
        rows = [_column_names(row) for row in rows]
        statement = _upsert(
            _dialect_name(session),
            _job,
            # Who owns a job (declared in code or not) is not changed by an API upsert.
            lambda new: {
                c.name: new[c.name] for c in _job.c if c.name not in ("id", *DECLARATION_COLUMNS)
            },
        )
        for start in range(0, len(rows), _CHUNK):
            await session.execute(statement, list(rows[start : start + _CHUNK]))
        await _announce_change(session)
        await _commit(session)

    @staticmethod
    async def page_jobs(
        session: AsyncSession,
        *,
        search: str | None = None,
        is_enabled: bool | None = None,
        task_name: str | None = None,
        sort: str = "id",
        descending: bool = False,
        after: tuple[Any, str] | None = None,
        before: tuple[Any, str] | None = None,
        limit: int = 50,
    ) -> list[JobSummary]:
        """One page of jobs in one statement, counters joined: no row read twice, none per row.

        Ordered by ``sort`` (one of :data:`JOB_SORT_COLUMNS`; empty values last, in either
        direction), then by id. Paged by key, not by offset: ``after`` is the ``(sort value,
        id)`` of the last row of the page before, ``before`` the first row of the page after
        (the rows are returned in display order either way). ``search`` matches the id or the
        name anywhere, ignoring case; ``task_name`` is exact.

        By id (the default) and by task, the order is read from an index, so a page costs the
        same at any depth of 100k jobs; the other sorts also read the filtered rows once.
        """
        if sort not in JOB_SORT_COLUMNS:
            raise ValueError(f"sort={sort!r}: expected one of {', '.join(JOB_SORT_COLUMNS)}")
        column = _job.c[sort]
        backwards = before is not None
        cursor = before if backwards else after
        statement = sa.select(
            _job.c.id,
            _job.c.name,
            _job.c.task_name,
            _job.c.kind,
            _job.c.strategy,
            _job.c.is_enabled,
            _job.c.next_run_at,
            _job.c.last_run_at,
            _job.c.last_error,
            sa.func.coalesce(_stats.c.run_count, 0),
            sa.func.coalesce(_stats.c.success_count, 0),
            sa.func.coalesce(_stats.c.failure_count, 0),
            _stats.c.last_success_at,
            _stats.c.last_failure_at,
            _stats.c.last_duration_seconds,
        ).select_from(_job.outerjoin(_stats, _stats.c.job_id == _job.c.id))
        if is_enabled is not None:
            statement = statement.where(_job.c.is_enabled.is_(is_enabled))
        if task_name is not None:
            statement = statement.where(_job.c.task_name == task_name)
        if search:
            # A plain substring test: PostgreSQL's ILIKE folds case per character, several
            # times slower on a scan of 100k rows; no pattern characters to escape either.
            find = sa.func.strpos if _dialect_name(session) == "postgresql" else sa.func.instr
            needle = sa.literal(search.lower())
            statement = statement.where(
                sa.or_(
                    find(sa.func.lower(_job.c.id), needle) > 0,
                    find(sa.func.lower(_job.c.name), needle) > 0,
                )
            )
        # Whether the statement reads the sort downwards: a descending page, or the rows
        # before an ascending page's first row (read nearest first, then reversed).
        downwards = descending != backwards
        if cursor is not None:
            statement = statement.where(
                _beyond(column, sort in _NULLABLE_SORTS, cursor, downwards, backwards)
            )
        if sort == "id":
            order = [_job.c.id.desc() if downwards else _job.c.id]
        else:
            direction = column.desc() if downwards else column.asc()
            then = _job.c.id.desc() if downwards else _job.c.id
            if is_mysql(_dialect_name(session)):  # no NULLS FIRST / LAST: sort on IS NULL
                empty = column.is_(None)
                order = [empty.desc() if backwards else empty.asc(), direction, then]
            else:
                nulls = direction.nulls_first() if backwards else direction.nulls_last()
                order = [nulls, then]
        statement = statement.order_by(*order).limit(limit)
        rows = [
            JobSummary(
                row[0],
                row[1],
                row[2],
                str(getattr(row[3], "value", row[3])),
                str(getattr(row[4], "value", row[4])),
                bool(row[5]),
                row[6],
                row[7],
                row[8],
                int(row[9]),
                int(row[10]),
                int(row[11]),
                row[12],
                row[13],
                row[14],
            )
            for row in await session.execute(statement)
        ]
        await _commit(session)
        if backwards:
            rows.reverse()
        return rows

    @staticmethod
    async def task_names(session: AsyncSession, *, limit: int = 500) -> list[str]:
        """The distinct task names of the jobs, sorted (read from the task name's index)."""
        result = await session.execute(
            sa.select(_job.c.task_name).distinct().order_by(_job.c.task_name).limit(limit)
        )
        names = list(result.scalars())
        await _commit(session)
        return names


def _beyond(
    column: sa.Column[Any],
    nullable: bool,
    cursor: tuple[Any, str],
    downwards: bool,
    backwards: bool,
) -> sa.ColumnElement[bool]:
    """The rows past ``cursor`` (a ``(value, id)``) in an order by ``column`` then id, read
    ``downwards`` (``<``) or upwards (``>``), empty values last (first going ``backwards``)."""
    value, job_id = cursor
    if column is _job.c.id:
        return _job.c.id < job_id if downwards else _job.c.id > job_id

    def past(left: Any, right: Any) -> sa.ColumnElement[bool]:
        return cast("sa.ColumnElement[bool]", left < right if downwards else left > right)

    ties = sa.and_(column == value, past(_job.c.id, job_id))
    if not nullable:
        return sa.or_(past(column, value), ties)
    if value is None:
        empty_ties = sa.and_(column.is_(None), past(_job.c.id, job_id))
        # Forwards nothing follows the empty values but more of them; backwards, every
        # valued row comes after them.
        return sa.or_(column.is_not(None), empty_ties) if backwards else empty_ties
    if backwards:
        return sa.or_(past(column, value), ties)
    return sa.or_(past(column, value), ties, column.is_(None))
