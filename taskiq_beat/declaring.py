"""Schedules declared in code on ``SchedulerApp``: ``periodic()``, ``define()``, and their apply."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from taskiq_beat.builders import (
    JobDefinition,
)
from taskiq_beat.clock import Clock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import DeclarationPlan, Declarations, coerce_trigger, definition_hash
from taskiq_beat.dispatch import Dispatcher
from taskiq_beat.engine import SchedulerEngine
from taskiq_beat.enums import JobSource
from taskiq_beat.exceptions import InvalidJobError
from taskiq_beat.store import SchedulerStore
from taskiq_beat.triggers import (
    CrontabTrigger,
    IntervalTrigger,
    Trigger,
)
from taskiq_beat.worker import RunLifecycleMiddleware
from taskiq_beat.writing import JobWriting, keep_schedules

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from taskiq import AsyncBroker


__all__ = ["DeclaringJobs"]

logger = logging.getLogger(__name__)

_Task = TypeVar("_Task")


class DeclaringJobs(JobWriting):
    """The declared-in-code part of ``SchedulerApp`` (see :mod:`taskiq_beat.declared`)."""

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

    def periodic(
        self,
        trigger: Trigger | CrontabTrigger | IntervalTrigger | timedelta | str,
        *,
        job_id: str | None = None,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        description: str | None = None,
        is_enabled: bool = True,
    ) -> Callable[[_Task], _Task]:
        """Declare a job that sends the decorated Taskiq task on ``trigger`` (a trigger, a
        ``timedelta`` or a cron string such as ``"*/5 * * * *"``); ``job_id`` defaults to
        the task's name. Applied when the scheduler starts (see :mod:`taskiq_beat.declared`).

        :raises InvalidJobError: at once, for a bad trigger, payload, id or task.
        """
        checked = coerce_trigger(trigger)

        def declare(task: _Task) -> _Task:
            task_name = getattr(task, "task_name", None)
            if not isinstance(task_name, str):
                raise InvalidJobError(
                    "task",
                    task,
                    "expected a Taskiq task: put @scheduler_app.periodic(...) above @broker.task",
                )
            builder = self.single(task, args, kwargs, metadata)
            self.declarations.add(
                [
                    builder.definition(
                        trigger=checked,
                        job_id=task_name if job_id is None else job_id,
                        name=name,
                        description=description,
                        is_enabled=is_enabled,
                    )
                ]
            )
            return task

        return declare

    def define(self, *definitions: JobDefinition) -> None:
        """Declare jobs made with ``builder.definition(...)`` (single jobs and chains alike).

        ``define()`` with no argument declares that this app's schedules live in code even
        if there are none left: the scheduler then disables every job declared earlier.

        :raises InvalidJobError: at once, for a bad definition or an id declared twice.
        """
        self.declarations.add(definitions)

    async def apply_declarations(
        self, session: AsyncSession | None = None, *, dry_run: bool = False
    ) -> DeclarationPlan:
        """Bring the jobs declared in code into the database, in one transaction; with
        ``dry_run`` only say what would change. ``session`` defaults to a new one.

        Jobs made through the API are never touched. Nothing is written when the database
        holds declarations of a higher ``schedule_version`` than this app's.

        :raises InvalidJobError: on a declaration that cannot be stored (nothing is).
        """
        if session is None:
            async with self.session_factory() as own:
                return await self.apply_declarations(own, dry_run=dry_run)
        now = self._clock.now()
        version = self.schedule_version
        rows, triggers = self._definition_rows(self.declarations, now)
        hashes = {job_id: definition_hash(row) for job_id, row in rows.items()}
        try:
            await self._store.lock_declarations(session)
            stored = await self._store.load_declared(session)
            unchanged = {
                job_id
                for job_id, row in stored.items()
                if job_id in hashes and row.definition_hash == hashes[job_id]
            }
            # The rows to write (or refuse): what is not declared as it is stored already.
            current = await self._store.load_schedule_state(
                session, [job_id for job_id in rows if job_id not in unchanged]
            )
            versions = [row.schedule_version for row in stored.values()]
            stored_version = max((v for v in versions if v is not None), default=None)
            plan = DeclarationPlan(
                schedule_version=version,
                stored_version=stored_version,
                added=sorted(
                    job_id for job_id in rows if job_id not in current and job_id not in unchanged
                ),
                changed=sorted(
                    job_id
                    for job_id in rows
                    if job_id in stored and stored[job_id].definition_hash != hashes[job_id]
                ),
                # An app that declared nothing (not even ``define()``) retires nothing: it
                # may be a process that imports the app without the modules declaring jobs.
                removed=sorted(
                    job_id
                    for job_id, row in stored.items()
                    if job_id not in rows
                    and row.definition_hash is not None
                    and self.declarations.used
                ),
                unchanged=sorted(unchanged),
                conflicts=sorted(
                    job_id for job_id in rows if job_id in current and job_id not in stored
                ),
                skipped=stored_version is not None and stored_version > version,
            )
            if dry_run or not plan.has_changes:
                await self._store.rollback(session)
                self._log_plan(plan)
                return plan
            written = {job_id: rows[job_id] for job_id in (*plan.added, *plan.changed)}
            keep_schedules(written, current)
            for job_id, row in written.items():
                row["source"] = JobSource.CODE
                row["definition_hash"] = hashes[job_id]
                row["schedule_version"] = version
            await self._store.write_declared(session, list(written.values()), version)
            await self._store.retire_declared(session, plan.removed, version, now)
            await self._store.commit_declared(session)
        except BaseException:
            await self._store.rollback(session)
            raise
        plan = dataclasses.replace(plan, applied=True)
        self._log_plan(plan)
        self._notify_rows(written, triggers)
        for job_id in plan.removed:
            self._engine.job_deleted(job_id)
        return plan

    def _log_plan(self, plan: DeclarationPlan) -> None:
        if plan.conflicts:
            logger.warning(
                "declared jobs %s belong to jobs made through the API: left as they are",
                ", ".join(plan.conflicts),
            )
        if plan.skipped:
            logger.warning(
                "declared schedules not applied: the database holds schedule_version %s, "
                "newer than this app's %s",
                plan.stored_version,
                plan.schedule_version,
            )
        elif plan.applied:
            logger.info(
                "applied declared schedules (version %s): %d added, %d changed, "
                "%d disabled (no longer declared), %d unchanged",
                plan.schedule_version,
                len(plan.added),
                len(plan.changed),
                len(plan.removed),
                len(plan.unchanged),
            )
        else:
            logger.debug("declared schedules: %s", plan.to_dict())
