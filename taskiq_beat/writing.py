"""Storing jobs: what ``SchedulerApp``'s builders and ``upsert_many()`` write, and the
immediate send of a job without a trigger."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from taskiq_beat.builders import (
    ChainJobBuilder,
    JobDefinition,
    JobSpec,
    SingleJobBuilder,
    chain_spec,
    single_spec,
)
from taskiq_beat.chain import ChainHandle, ChainStep, OnFailure
from taskiq_beat.clock import Clock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import Declarations
from taskiq_beat.dispatch import Dispatcher, fire_task_id
from taskiq_beat.engine import SchedulerEngine
from taskiq_beat.exceptions import InvalidJobError, JobExistsError
from taskiq_beat.models import (
    JOB_ID_MAX_LENGTH,
    NAME_MAX_LENGTH,
    SchedulerJob,
    SchedulerRun,
    encode_json,
)
from taskiq_beat.store import Fire, SchedulerStore, ScheduleState
from taskiq_beat.triggers import (
    ImmediateDispatch,
    PeriodicSchedule,
    Trigger,
    TriggerInput,
    trigger_from_json,
    trigger_to_json,
    validate_trigger,
)
from taskiq_beat.worker import RunLifecycleMiddleware

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from taskiq import AsyncBroker


__all__ = ["JobWriting", "keep_schedules"]

logger = logging.getLogger(__name__)


class JobWriting:
    """The :class:`~taskiq_beat.builders.JobWriter` part of ``SchedulerApp``."""

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

    # ------------------------------------------------------------------ builders

    def single(
        self,
        task: Any,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SingleJobBuilder:
        """A job that sends ``task(*args, **kwargs)``; ``metadata`` goes out as message labels."""
        return SingleJobBuilder(self, single_spec(self.broker, task, args, kwargs, metadata))

    def chain(
        self,
        steps: Sequence[ChainStep],
        on_failure: OnFailure = "stop",
        max_chain_attempts: int = 1,
        default_step_max_attempts: int = 1,
        default_step_retry_delay_seconds: float = 0.0,
        default_step_timeout_seconds: float | None = None,
        wait_poll_interval_seconds: float = 0.5,
        metadata: dict[str, Any] | None = None,
    ) -> ChainJobBuilder:
        """A job that runs ``steps`` in order on a worker (see :mod:`taskiq_beat.chain`)."""
        spec = chain_spec(
            self.broker,
            steps,
            on_failure=on_failure,
            max_chain_attempts=max_chain_attempts,
            default_step_max_attempts=default_step_max_attempts,
            default_step_retry_delay_seconds=default_step_retry_delay_seconds,
            default_step_timeout_seconds=default_step_timeout_seconds,
            wait_poll_interval_seconds=wait_poll_interval_seconds,
            metadata=metadata,
        )
        return ChainJobBuilder(self, spec)

    # ------------------------------------------------------------------ JobWriter

    async def schedule_spec(
        self,
        spec: JobSpec,
        session: AsyncSession,
        trigger: TriggerInput | None,
        *,
        job_id: str | None,
        name: str | None,
        description: str | None,
        is_enabled: bool,
    ) -> SchedulerJob:
        job, _ = await self._schedule(
            spec,
            session,
            trigger,
            job_id=job_id,
            name=name,
            description=description,
            is_enabled=is_enabled,
        )
        return job

    async def start_chain_spec(
        self,
        spec: JobSpec,
        session: AsyncSession | None,
        *,
        job_id: str | None,
        name: str | None,
        description: str | None,
    ) -> ChainHandle:
        if session is None:
            async with self.session_factory() as own:
                return await self.start_chain_spec(
                    spec, own, job_id=job_id, name=name, description=description
                )
        job, sent = await self._schedule(
            spec, session, None, job_id=job_id, name=name, description=description, is_enabled=True
        )
        assert sent is not None
        run_id, task_id = sent
        durable = self.lifecycle is not None
        return ChainHandle(
            job_id=job.id,
            run_id=run_id,
            task_id=task_id,
            poll_seconds=float(spec.kwargs["chain"]["wait_poll_interval_seconds"]),
            read_run=self._read_run,
            result_backend=None if durable else self.broker.result_backend,
        )

    async def _read_run(self, run_id: int) -> SchedulerRun | None:
        async with self.session_factory() as session:
            return await self._store.get_run(session, run_id)

    async def _schedule(
        self,
        spec: JobSpec,
        session: AsyncSession,
        trigger: TriggerInput | None,
        *,
        job_id: str | None,
        name: str | None,
        description: str | None,
        is_enabled: bool,
    ) -> tuple[SchedulerJob, tuple[int, str] | None]:
        """Store a new job; with ``ImmediateDispatch`` send it and return its run and task id."""
        trigger = self._localize(
            validate_trigger(ImmediateDispatch() if trigger is None else trigger)
        )
        self._check_policy(spec)
        job_id = _check_job_id(job_id) if job_id is not None else str(uuid.uuid4())
        now = self._clock.now()
        job = self._new_job(spec, trigger, job_id, name, description, is_enabled, now)
        sent: tuple[int, str] | None = None
        try:
            if isinstance(trigger, ImmediateDispatch):
                sent = await self._send_now(session, job.id, spec, job=job)
            else:
                await self._store.add_job(session, job)
        except IntegrityError:
            await self._store.rollback(session)
            raise JobExistsError(
                "job_id", job_id, "a job with this id exists; use .upsert() to update it"
            ) from None
        if sent is not None:
            logger.info(
                "created job %s (%s) and sent it as task %s", job.id, job.task_name, sent[1]
            )
        else:
            logger.info(
                "created job %s (%s, %s), next run at %s",
                job.id,
                job.task_name,
                job.strategy.value,
                job.next_run_at,
            )
        self._notify(job, trigger)
        return job, sent

    async def upsert_spec(
        self,
        spec: JobSpec,
        session: AsyncSession,
        *,
        trigger: TriggerInput,
        job_id: str,
        name: str | None,
        description: str | None,
        is_enabled: bool,
    ) -> SchedulerJob:
        trigger = self._localize(validate_trigger(trigger))
        if isinstance(trigger, ImmediateDispatch):
            raise InvalidJobError(
                "trigger", trigger, "ImmediateDispatch is only valid with .schedule()"
            )
        job_id = _check_job_id(job_id)
        _check_name(name)
        self._check_policy(spec)
        for attempt in range(2):
            now = self._clock.now()
            job = await self._store.get_job(session, job_id, for_update=True)
            if job is None:
                job = self._new_job(spec, trigger, job_id, name, description, is_enabled, now)
                try:
                    await self._store.add_job(session, job)
                except IntegrityError:
                    if attempt == 0:
                        continue  # created concurrently: update it instead
                    raise
                logger.info("upserted job %s: created, next run at %s", job_id, job.next_run_at)
                break
            stored = trigger_to_json(trigger)
            reschedule = _reschedules(
                (job.trigger, job.task_name, job.kind, job.is_enabled),
                (stored, spec.task_name, spec.kind, is_enabled),
            )
            job.name, job.description = name, description
            job.task_name, job.kind, job.strategy = spec.task_name, spec.kind, trigger.strategy
            job.args, job.kwargs, job.job_metadata = spec.args, spec.kwargs, spec.metadata
            job.policy = None if spec.policy is None else spec.policy.to_json()
            job.trigger, job.is_enabled = stored, is_enabled
            if reschedule:
                job.next_run_at = trigger.first_run_at(now)
                job.last_error = None
            job.revision += 1
            job.updated_at = now
            await self._store.save(session, job)
            logger.info(
                "upserted job %s: updated, next run at %s (%s)",
                job_id,
                job.next_run_at,
                "rescheduled" if reschedule else "schedule kept",
            )
            break
        assert job is not None
        self._notify(job, trigger)
        return job

    async def upsert_many(self, session: AsyncSession, definitions: Iterable[JobDefinition]) -> int:
        """Upsert many jobs in one transaction; each as ``.upsert()`` would. Returns the count.

        Made for start-up registration and imports of thousands of jobs: one read and one
        write per few thousand jobs, no row objects returned.

        :raises InvalidJobError: on bad input (nothing is stored), including an id given twice.
        """
        now = self._clock.now()
        rows, triggers = self._definition_rows(definitions, now)
        if not rows:
            return 0
        current = await self._store.load_schedule_state(session, list(rows))
        keep_schedules(rows, current)
        await self._store.write_jobs(session, list(rows.values()))  # attribute names
        logger.info("upserted %d jobs (%d new)", len(rows), len(rows) - len(current))
        self._notify_rows(rows, triggers)
        return len(rows)

    def _definition_rows(
        self, definitions: Iterable[JobDefinition], now: datetime
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Trigger]]:
        """The new-job values of ``definitions`` by id, and their (localized) triggers.

        :raises InvalidJobError: on bad input, including an id given twice.
        """
        rows: dict[str, dict[str, Any]] = {}
        triggers: dict[str, Trigger] = {}
        stored_forms: dict[TriggerInput, tuple[Trigger, dict[str, Any]]] = {}
        for definition in definitions:
            if not isinstance(definition, JobDefinition):
                raise InvalidJobError("definitions", definition, "expected JobDefinition values")
            job_id = _check_job_id(definition.job_id)
            self._check_policy(definition.spec)
            if job_id in rows:
                raise InvalidJobError("job_id", job_id, "given twice in one upsert_many()")
            if definition.trigger not in stored_forms:
                trigger = self._localize(validate_trigger(definition.trigger))
                if isinstance(trigger, ImmediateDispatch):
                    raise InvalidJobError(
                        "trigger", trigger, "ImmediateDispatch is only valid with .schedule()"
                    )
                stored_forms[definition.trigger] = (trigger, trigger_to_json(trigger))
            trigger, stored = stored_forms[definition.trigger]
            rows[job_id] = _new_job_values(
                definition.spec,
                trigger,
                stored,
                job_id,
                definition.name,
                definition.description,
                definition.is_enabled,
                now,
            )
            triggers[job_id] = trigger
        return rows, triggers

    def _notify_rows(self, rows: dict[str, dict[str, Any]], triggers: dict[str, Trigger]) -> None:
        for job_id, row in rows.items():
            self._engine.job_changed(
                job_id,
                is_enabled=row["is_enabled"],
                next_run_at=row["next_run_at"],
                revision=row["revision"],
                kind=row["kind"],
                trigger=triggers[job_id],
                task_name=row["task_name"],
                args=row["args"],
                kwargs=row["kwargs"],
                metadata=row["job_metadata"],
                policy=row["policy"],
            )

    def _check_policy(self, spec: JobSpec) -> None:
        """An overlap policy decides from the runs' lifecycle, which only workers report."""
        policy = spec.policy
        if policy is None or policy.running_limit is None:
            return
        if not (self.config.record_runs and self.config.record_lifecycle):
            raise InvalidJobError(
                "overlap",
                policy.overlap,
                "needs SchedulerConfig(record_runs=True, record_lifecycle=True): without the"
                " workers reporting when runs end, every run would count as still going",
            )

    def _localize(self, trigger: Trigger) -> Trigger:
        """Give a crontab (or a calendar's rules) without a timezone the configured default."""
        if not isinstance(trigger, PeriodicSchedule):
            return trigger
        crontab, calendar = trigger.crontab, trigger.calendar
        if crontab is not None and crontab.timezone is None:
            crontab = crontab.with_timezone(self.config.default_timezone)
            return trigger.model_copy(update={"crontab": crontab})
        if calendar is not None and any(rule.timezone is None for rule in calendar.rules):
            calendar = calendar.with_timezone(self.config.default_timezone)
            return trigger.model_copy(update={"calendar": calendar})
        return trigger

    def _new_job(
        self,
        spec: JobSpec,
        trigger: Trigger,
        job_id: str,
        name: str | None,
        description: str | None,
        is_enabled: bool,
        now: datetime,
    ) -> SchedulerJob:
        values = _new_job_values(
            spec, trigger, trigger_to_json(trigger), job_id, name, description, is_enabled, now
        )
        # A new job has run nowhere: its counters are known without reading them.
        return SchedulerJob(
            **values,
            run_count=0,
            success_count=0,
            failure_count=0,
            last_success_at=None,
            last_failure_at=None,
            last_duration_seconds=None,
        )

    async def _send_now(
        self,
        session: AsyncSession,
        job_id: str,
        spec: JobSpec,
        *,
        job: SchedulerJob | None = None,
    ) -> tuple[int, str]:
        """Claim, send and record one fire of ``job_id`` scheduled for now.

        Returns the run id and the task id. A failed send is left for the engine to retry.
        """
        now = self._clock.now()
        task_id = fire_task_id(job_id, now)
        run_id = await self._store.add_claimed_run(
            session,
            job=job,
            job_id=job_id,
            scheduled_for=now,
            task_id=task_id,
            owner=self._engine.owner,
            now=now,
            lease_until=now + timedelta(seconds=self.config.claim_lease_seconds),
        )
        if run_id is None:
            raise JobExistsError("job_id", job_id, f"a fire scheduled for {now} exists already")
        fire = Fire(
            run_id,
            job_id,
            now,
            task_id,
            spec.task_name,
            encode_json(spec.args),
            encode_json(spec.kwargs),
            encode_json(spec.metadata),
        )
        [outcome] = await self._now_dispatcher.send([fire])
        sent_at = self._clock.now()
        retry_at = sent_at + timedelta(seconds=self.config.dispatch_retry_seconds)
        await self._store.record(
            [fire], [outcome], now=sent_at, retry_at=retry_at, keep_runs=self.config.record_runs
        )
        if outcome.error is not None:
            logger.warning(
                "immediate dispatch of job %s failed: %s; retrying at %s",
                job_id,
                outcome.error,
                retry_at,
            )
            self._engine.retry_at(retry_at)
        return run_id, task_id

    def _notify(self, job: SchedulerJob, trigger: Trigger | None = None) -> None:
        if trigger is None:
            if not job.is_enabled:
                self._engine.job_deleted(job.id)
                return
            trigger = trigger_from_json(job.trigger, job_id=job.id)
        self._engine.job_changed(
            job.id,
            is_enabled=job.is_enabled,
            next_run_at=job.next_run_at,
            revision=job.revision,
            kind=job.kind,
            trigger=trigger,
            task_name=job.task_name,
            args=job.args,
            kwargs=job.kwargs,
            metadata=job.job_metadata,
            policy=job.policy,
        )


def _new_job_values(
    spec: JobSpec,
    trigger: Trigger,
    stored_trigger: dict[str, Any],
    job_id: str,
    name: str | None,
    description: str | None,
    is_enabled: bool,
    now: datetime,
) -> dict[str, Any]:
    """The attributes of a new ``SchedulerJob`` (checked)."""
    _check_name(name)
    if not isinstance(is_enabled, bool):
        raise InvalidJobError("is_enabled", is_enabled, "expected True or False")
    if description is not None and not isinstance(description, str):
        raise InvalidJobError("description", description, "expected a string")
    return {
        "id": job_id,
        "name": name,
        "description": description,
        "task_name": spec.task_name,
        "kind": spec.kind,
        "strategy": trigger.strategy,
        "trigger": stored_trigger,
        "args": spec.args,
        "kwargs": spec.kwargs,
        "job_metadata": spec.metadata,
        "policy": None if spec.policy is None else spec.policy.to_json(),
        "is_enabled": is_enabled,
        "next_run_at": trigger.first_run_at(now),
        "last_run_at": None,
        "last_error": None,
        "revision": 1,
        "created_at": now,
        "updated_at": now,
    }


def keep_schedules(rows: dict[str, dict[str, Any]], current: dict[str, ScheduleState]) -> None:
    """Turn new-job values into updates of the jobs that exist (``current``): their
    creation time, next revision and last run kept, and their ``next_run_at`` and
    ``last_error`` too unless the trigger, the task (or kind) or the enabled state changed."""
    for job_id, row in rows.items():
        state = current.get(job_id)
        if state is None:
            continue
        row["revision"] = state.revision + 1
        row["created_at"] = state.created_at
        if not _reschedules(
            (state.trigger, state.task_name, state.kind, state.is_enabled),
            (row["trigger"], row["task_name"], row["kind"], row["is_enabled"]),
        ):
            row["next_run_at"] = state.next_run_at
            row["last_error"] = state.last_error
        row["last_run_at"] = state.last_run_at


def _reschedules(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether an upsert moves ``next_run_at``: the trigger, the task (or kind) or the enabled
    state changed. Both are ``(stored trigger, task name, kind, is_enabled)``."""
    return old != new


def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise InvalidJobError("job_id", job_id, "expected a non-empty string")
    if len(job_id) > JOB_ID_MAX_LENGTH:
        raise InvalidJobError(
            "job_id", job_id, f"longer than {JOB_ID_MAX_LENGTH} characters ({len(job_id)})"
        )
    return job_id


def _check_name(name: Any) -> None:
    if name is None:
        return
    if not isinstance(name, str):
        raise InvalidJobError("name", name, "expected a string")
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidJobError("name", name, f"longer than {NAME_MAX_LENGTH} characters")
