"""Managing stored jobs and runs: the calls the CLI, the router and the dashboard make."""

from __future__ import annotations

import logging
from datetime import datetime as datetime_type
from typing import TYPE_CHECKING, Any

from taskiq_beat.builders import (
    JobSpec,
)
from taskiq_beat.clock import Clock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import Declarations
from taskiq_beat.dispatch import Dispatcher, fire_task_id
from taskiq_beat.engine import SchedulerEngine
from taskiq_beat.enums import RunStatus
from taskiq_beat.exceptions import InvalidJobError, JobNotFoundError
from taskiq_beat.models import (
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.policy import MAX_BACKFILL, fires_between
from taskiq_beat.store import SchedulerStore
from taskiq_beat.store.values import JOB_SORT_COLUMNS, JobSummary, WorkerSummary
from taskiq_beat.triggers import (
    trigger_from_json,
)
from taskiq_beat.worker import RunLifecycleMiddleware
from taskiq_beat.writing import JobWriting

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from taskiq import AsyncBroker


__all__ = ["JobManagement"]

logger = logging.getLogger(__name__)


class JobManagement(JobWriting):
    """The management part of ``SchedulerApp``: each call takes an ``AsyncSession`` and
    commits it."""

    broker: AsyncBroker
    config: SchedulerConfig
    session_factory: async_sessionmaker[AsyncSession]
    schedule_version: int
    declarations: Declarations
    lifecycle: RunLifecycleMiddleware | None
    _store: SchedulerStore
    _clock: Clock
    _engine: SchedulerEngine
    _now_dispatcher: Dispatcher

    async def get_job(self, session: AsyncSession, job_id: str) -> SchedulerJob:
        """Return the job ``job_id``.

        :raises JobNotFoundError: if there is none.
        """
        job = await self._store.find_job(session, job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    async def list_jobs(
        self,
        session: AsyncSession,
        *,
        is_enabled: bool | None = None,
        task_name: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[SchedulerJob]:
        """Jobs ordered by id; filter by enabled state and task name, page with limit/offset."""
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise InvalidJobError("limit", limit, "expected a non-negative integer")
        if isinstance(offset, bool) or offset < 0:
            raise InvalidJobError("offset", offset, "expected a non-negative integer")
        return await self._store.list_jobs(
            session, is_enabled=is_enabled, task_name=task_name, limit=limit, offset=offset
        )

    async def page_jobs(
        self,
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
        """One page of a job listing (what the dashboard shows), paged by key: ``after`` /
        ``before`` is the ``(sort value, id)`` of the row the page follows / precedes.

        ``sort`` is one of ``id``, ``name``, ``task_name``, ``next_run_at``, ``last_run_at``
        (empty values last); ``search`` matches id or name anywhere, ignoring case.

        :raises InvalidJobError: for an unknown sort, a limit outside 1-1000, or both cursors.
        """
        if sort not in JOB_SORT_COLUMNS:
            raise InvalidJobError("sort", sort, f"expected one of {', '.join(JOB_SORT_COLUMNS)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidJobError("limit", limit, "expected an integer from 1 to 1000")
        if after is not None and before is not None:
            raise InvalidJobError("before", before, "give after or before, not both")
        return await self._store.page_jobs(
            session,
            search=search,
            is_enabled=is_enabled,
            task_name=task_name,
            sort=sort,
            descending=descending,
            after=after,
            before=before,
            limit=limit,
        )

    async def task_names(self, session: AsyncSession) -> list[str]:
        """The distinct task names of the jobs, sorted (at most 500)."""
        return await self._store.task_names(session)

    async def list_workers(self, session: AsyncSession, *, limit: int = 200) -> list[WorkerSummary]:
        """The workers that reported runs: those not stopped first, each with the number of
        runs it is executing now."""
        return await self._store.list_workers(session, limit=limit)

    async def list_runs(
        self,
        session: AsyncSession,
        job_id: str | None = None,
        *,
        status: RunStatus | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[SchedulerRun]:
        """Run history, the most recently scheduled first; all jobs when ``job_id`` is None.

        ``since`` / ``until`` bound the scheduled time (``since <= scheduled_for < until``);
        ``limit`` and ``offset`` page through the rest.
        """
        if status is not None:
            try:
                status = RunStatus(status)
            except ValueError:
                raise InvalidJobError("status", status, "unknown run status") from None
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise InvalidJobError("limit", limit, "expected a non-negative integer")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidJobError("offset", offset, "expected a non-negative integer")
        for field, value in (("since", since), ("until", until)):
            if value is not None and (
                not isinstance(value, datetime_type) or value.utcoffset() is None
            ):
                raise InvalidJobError(field, value, "expected a timezone-aware datetime")
        return await self._store.list_runs(
            session,
            job_id=job_id,
            status=status,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )

    async def pause(self, session: AsyncSession, job_id: str) -> SchedulerJob:
        """Stop firing the job until :meth:`resume`.

        :raises JobNotFoundError: if there is no such job.
        """
        job = await self._locked(session, job_id)
        if job.is_enabled:
            job.is_enabled = False
            job.revision += 1
            job.updated_at = self._clock.now()
        await self._store.save(session, job)
        logger.info("paused job %s", job_id)
        self._notify(job)
        return job

    async def resume(self, session: AsyncSession, job_id: str) -> SchedulerJob:
        """Fire the job again; its next run is computed from now (a past one-off fires at once).

        :raises JobNotFoundError: if there is no such job.
        """
        job = await self._locked(session, job_id)
        trigger = trigger_from_json(job.trigger, job_id=job.id)
        if not job.is_enabled:
            now = self._clock.now()
            job.is_enabled = True
            job.next_run_at = trigger.first_run_at(now)
            job.last_error = None
            job.revision += 1
            job.updated_at = now
        await self._store.save(session, job)
        logger.info("resumed job %s, next run at %s", job_id, job.next_run_at)
        self._notify(job, trigger)
        return job

    async def run_now(self, session: AsyncSession, job_id: str) -> SchedulerRun:
        """Send the job's task at once, outside its schedule (which stays as it is).

        :raises JobNotFoundError: if there is no such job.
        """
        job = await self._store.find_job(session, job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        spec = JobSpec(job.task_name, job.kind, job.args, job.kwargs, job.job_metadata)
        run_id, task_id = await self._send_now(session, job_id, spec)
        logger.info("ran job %s now as task %s", job_id, task_id)
        run = await self._store.get_run(session, run_id)
        assert run is not None
        return run

    async def backfill(
        self, session: AsyncSession, job_id: str, *, start: datetime, end: datetime
    ) -> int:
        """Send each fire of the job's schedule from ``start`` to ``end`` (a past range, both
        included) once: fires that have a run are left alone (a ``missed`` one is sent
        after all), so calling it twice sends nothing more. The fires keep their identity
        (scheduled time, task id) and go out through the scheduler's retries path, a batch
        per pass beside the fires due on time. Returns how many were queued.

        :raises JobNotFoundError: if there is no such job.
        :raises InvalidJobError: on a bad range (nothing is queued).
        """
        for field, value in (("start", start), ("end", end)):
            if not isinstance(value, datetime_type) or value.utcoffset() is None:
                raise InvalidJobError(field, value, "expected a timezone-aware datetime")
        now = self._clock.now()
        if end < start:
            raise InvalidJobError("end", end, f"is before start={start.isoformat()}")
        if end > now:
            raise InvalidJobError(
                "end", end, "a backfill covers the past: it must not be later than now"
            )
        job = await self._store.find_job(session, job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        trigger = trigger_from_json(job.trigger, job_id=job.id)
        anchor = job.next_run_at or job.last_run_at
        fires = fires_between(trigger, start, end, MAX_BACKFILL, anchor=anchor)
        if fires is None:
            raise InvalidJobError(
                "end", end, f"the range holds more than {MAX_BACKFILL} fires; backfill it in parts"
            )
        queued = await self._store.add_backfill_runs(
            session, job_id, {when: fire_task_id(job_id, when) for when in fires}, now=now
        )
        logger.info(
            "backfill of job %s from %s to %s: %d of its %d fires queued",
            job_id,
            start.isoformat(),
            end.isoformat(),
            queued,
            len(fires),
        )
        if queued:
            self._engine.retry_at(now)
        return queued

    async def delete(self, session: AsyncSession, job_id: str) -> None:
        """Delete the job and its run history.

        :raises JobNotFoundError: if there is no such job.
        """
        if not await self._store.delete_job(session, job_id):
            raise JobNotFoundError(job_id)
        self._engine.job_deleted(job_id)
        logger.info("deleted job %s", job_id)

    async def _locked(self, session: AsyncSession, job_id: str) -> SchedulerJob:
        job = await self._store.get_job(session, job_id, for_update=True)
        if job is None:
            await self._store.rollback(session)
            raise JobNotFoundError(job_id)
        return job
