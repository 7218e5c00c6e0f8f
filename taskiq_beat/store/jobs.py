"""Job management in the caller's session: create, read, list, upsert, delete."""

from __future__ import annotations

from collections.abc import Sequence
from typing import (
    TYPE_CHECKING,
    Any,
)

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from taskiq_beat.models import (
    SchedulerJob,
    SchedulerJobStats,
    SchedulerRun,
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
from taskiq_beat.store.values import ScheduleState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["DECLARATION_COLUMNS", "JobOperations"]

DECLARATION_COLUMNS = ("source", "definition_hash", "schedule_version")
"""The columns that only applying the schedules declared in code writes."""


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
