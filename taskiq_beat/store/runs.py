"""Runs in the caller's session: history, one run, the claimed run of an immediate send."""

from __future__ import annotations

from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    cast,
)

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import (
    SchedulerJob,
    SchedulerRun,
    SchedulerWorker,
    is_mysql,
)
from taskiq_beat.store._common import (
    _commit,
    _dialect_name,
    _insert_for,
    _insert_unless_there,
    _job,
    _make_room,
    _run,
)
from taskiq_beat.store.values import WorkerSummary

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["RunOperations"]

_MYSQL_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY
_worker = cast("sa.Table", SchedulerWorker.__table__)


class RunOperations:
    """Management operations on runs; each runs in the caller's session and commits it."""

    @staticmethod
    async def list_runs(
        session: AsyncSession,
        *,
        job_id: str | None = None,
        status: RunStatus | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[SchedulerRun]:
        """Runs, the most recently scheduled first."""
        statement = sa.select(SchedulerRun).order_by(
            SchedulerRun.scheduled_for.desc(), SchedulerRun.id.desc()
        )
        if job_id is not None:
            statement = statement.where(SchedulerRun.job_id == job_id)
        if status is not None:
            statement = statement.where(SchedulerRun.status == status)
        if since is not None:
            statement = statement.where(SchedulerRun.scheduled_for >= since)
        if until is not None:
            statement = statement.where(SchedulerRun.scheduled_for < until)
        if offset:
            statement = statement.offset(offset)
        if limit is not None:
            statement = statement.limit(limit)
        result = await session.execute(statement.execution_options(populate_existing=True))
        runs = list(result.scalars())
        await _commit(session)
        return runs

    @staticmethod
    async def add_backfill_runs(
        session: AsyncSession,
        job_id: str,
        fires: dict[datetime, str],
        *,
        now: datetime,
    ) -> int:
        """Queue the fires ``fires`` (scheduled time -> task id) of ``job_id`` for the retries
        path to send, each once: a fire that has a run already is left alone, except a
        ``missed`` one, which is queued again. Commits; returns how many were queued."""
        if not fires:
            return 0
        times = sorted(fires)
        existing = dict(
            (
                await session.execute(
                    sa.select(_run.c.scheduled_for, _run.c.status).where(
                        _run.c.job_id == job_id,
                        _run.c.scheduled_for >= times[0],
                        _run.c.scheduled_for <= times[-1],
                    )
                )
            ).all()
        )
        new = [when for when in times if when not in existing]
        again = [when for when, status in existing.items() if status == RunStatus.MISSED]
        queued = {
            "status": RunStatus.CLAIMED,
            "attempt": 0,
            "claimed_by": None,
            "next_attempt_at": now,
            "updated_at": now,
        }
        if new:
            insert = _insert_unless_there(
                _dialect_name(session), _run, [_run.c.job_id, _run.c.scheduled_for]
            )
            await session.execute(
                insert,
                [
                    {
                        **queued,
                        "job_id": job_id,
                        "scheduled_for": when,
                        "task_id": fires[when],
                        "created_at": now,
                    }
                    for when in new
                ],
            )
        if again:
            await session.execute(
                sa.update(_run)
                .where(
                    _run.c.job_id == job_id,
                    _run.c.scheduled_for.in_(again),
                    _run.c.status == RunStatus.MISSED,
                )
                .values(**queued, finished_at=None, error=None)
            )
        await _commit(session)
        return len(new) + len(again)

    @staticmethod
    async def get_run(session: AsyncSession, run_id: int) -> SchedulerRun | None:
        """Return the run ``run_id`` or ``None``, ending the read transaction."""
        result = await session.execute(
            sa.select(SchedulerRun)
            .where(SchedulerRun.id == run_id)
            .execution_options(populate_existing=True)
        )
        run = result.scalar_one_or_none()
        await _commit(session)
        return run

    @staticmethod
    async def add_claimed_run(
        session: AsyncSession,
        *,
        job: SchedulerJob | None,
        job_id: str,
        scheduled_for: datetime,
        task_id: str,
        owner: str,
        now: datetime,
        lease_until: datetime,
    ) -> int | None:
        """Insert ``job`` (if given) and a claimed run for an immediate send; commit.

        Returns the run id, or ``None`` when that fire exists already.
        """
        if job is not None:
            _make_room(session, job)
            session.add(job)
            await session.flush()
        dialect_name = _dialect_name(session)
        statement = _insert_for(dialect_name)(_run).values(
            job_id=job_id,
            scheduled_for=scheduled_for,
            status=RunStatus.CLAIMED,
            task_id=task_id,
            attempt=1,
            claimed_by=owner,
            next_attempt_at=lease_until,
            created_at=now,
            updated_at=now,
        )
        run_id: int | None
        if is_mysql(dialect_name):
            # No RETURNING, and ON DUPLICATE KEY cannot tell an insert from a duplicate
            # (found rows count as affected): a savepoint, undone if the fire exists.
            try:
                async with session.begin_nested():
                    inserted = await session.execute(statement)
            except IntegrityError as exc:
                if exc.orig is None or exc.orig.args[:1] != (_MYSQL_DUPLICATE_KEY,):
                    raise
                run_id = None
            else:
                key = cast("sa.CursorResult[Any]", inserted).inserted_primary_key
                run_id = None if key is None else int(key[0])
        else:
            run_id = (
                await session.execute(statement.on_conflict_do_nothing().returning(_run.c.id))
            ).scalar_one_or_none()
        await session.execute(
            sa.update(_job).where(_job.c.id == job_id).values(last_run_at=scheduled_for)
        )
        await _commit(session)
        return run_id

    @staticmethod
    async def list_workers(session: AsyncSession, *, limit: int = 200) -> list[WorkerSummary]:
        """Workers, those not stopped first, the most recently seen first, each with the
        number of its runs ``running`` now (counted through the run table's worker index)."""
        running = (
            sa.select(sa.func.count())
            .where(_run.c.worker_id == _worker.c.id, _run.c.status == RunStatus.RUNNING)
            .scalar_subquery()
        )
        statement = (
            sa.select(
                _worker.c.id,
                _worker.c.hostname,
                _worker.c.pid,
                _worker.c.started_at,
                _worker.c.last_seen_at,
                _worker.c.stopped_at,
                running,
            )
            .order_by(_worker.c.stopped_at.is_not(None), _worker.c.last_seen_at.desc())
            .limit(limit)
        )
        workers = [WorkerSummary(*row) for row in await session.execute(statement)]
        await _commit(session)
        return workers
