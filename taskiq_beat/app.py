"""``SchedulerApp``: the facade that wires store, dispatcher and engine, and manages jobs."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime as datetime_type
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from taskiq_beat.builders import (
    ChainJobBuilder,
    JobDefinition,
    JobSpec,
    SingleJobBuilder,
    chain_spec,
    single_spec,
)
from taskiq_beat.chain import ChainHandle, ChainStep, OnFailure, register_chain_orchestrator
from taskiq_beat.chain_runner import ChainRunner
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import DeclarationPlan, Declarations, coerce_trigger, definition_hash
from taskiq_beat.dispatch import Dispatcher, fire_task_id
from taskiq_beat.engine import SchedulerEngine
from taskiq_beat.enums import JobSource, RunStatus
from taskiq_beat.events import EventHooks, EventKind, EventListener
from taskiq_beat.exceptions import InvalidJobError, JobExistsError, JobNotFoundError
from taskiq_beat.health import SchedulerHealthSnapshot, read_health
from taskiq_beat.housekeeping import Housekeeper
from taskiq_beat.models import (
    JOB_ID_MAX_LENGTH,
    NAME_MAX_LENGTH,
    SchedulerJob,
    SchedulerRun,
    encode_json,
)
from taskiq_beat.policy import MAX_BACKFILL, fires_between
from taskiq_beat.store import Fire, SchedulerStore, ScheduleState
from taskiq_beat.store.values import JOB_SORT_COLUMNS, JobSummary, WorkerSummary
from taskiq_beat.triggers import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
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

__all__ = ["SchedulerApp"]

logger = logging.getLogger(__name__)

_Task = TypeVar("_Task")


class SchedulerApp:
    """A database-backed scheduler for one Taskiq broker.

    ``session_factory`` makes the sessions the engine uses; management calls use the session
    you pass them, and commit it. Rows returned stay readable after that commit (attributes
    are not expired, whatever the session's ``expire_on_commit``).
    """

    def __init__(
        self,
        *,
        broker: AsyncBroker,
        session_factory: async_sessionmaker[AsyncSession],
        config: SchedulerConfig | None = None,
        clock: Clock | None = None,
        schedule_version: int = 0,
    ) -> None:
        if (
            isinstance(schedule_version, bool)
            or not isinstance(schedule_version, int)
            or schedule_version < 0
        ):
            raise InvalidJobError("schedule_version", schedule_version, "expected an integer >= 0")
        self.schedule_version = schedule_version
        """The version of the schedules declared in code on this app (see
        :mod:`taskiq_beat.declared`): raise it when they change; an apply never overwrites
        declarations of a higher version."""
        self.declarations = Declarations()
        self.broker = broker
        self.session_factory = session_factory
        self.config = config or SchedulerConfig()
        self._clock: Clock = clock or SystemClock()
        self.events = EventHooks()
        self._store = SchedulerStore(session_factory, timeout=self.config.database_timeout_seconds)
        self._engine = SchedulerEngine(
            store=self._store,
            dispatcher=Dispatcher(
                broker,
                concurrency=self.config.dispatch_concurrency,
                timeout=self.config.dispatch_timeout_seconds,
            ),
            config=self.config,
            clock=self._clock,
            events=self.events,
        )
        self._now_dispatcher = Dispatcher(
            broker, concurrency=1, timeout=self.config.dispatch_timeout_seconds
        )
        register_chain_orchestrator(broker)
        _enforce_sqlite_foreign_keys(session_factory)
        self.lifecycle = self._report_lifecycle(broker)
        self._housekeeper = Housekeeper(
            store=self._store,
            config=self.config,
            clock=self._clock,
            events=self.events,
            chains=ChainRunner(
                store=self._store, broker=broker, clock=self._clock, config=self.config
            ),
        )

    def _report_lifecycle(self, broker: AsyncBroker) -> RunLifecycleMiddleware | None:
        """The broker's lifecycle middleware (see :mod:`taskiq_beat.worker`): added here, so
        that a worker that imports this app reports outcomes; one per broker."""
        for middleware in broker.middlewares:
            if isinstance(middleware, RunLifecycleMiddleware):
                return middleware
        if not (self.config.record_runs and self.config.record_lifecycle):
            return None
        middleware = RunLifecycleMiddleware(
            store=self._store, config=self.config, clock=self._clock, events=self.events
        )
        broker.add_middlewares(middleware)
        return middleware

    def on_event(self, kind: EventKind | str, callback: EventListener) -> None:
        """Call ``callback(event)`` (a function or a coroutine function) on each event of
        ``kind`` (see :mod:`taskiq_beat.events`): fires sent and missed and jobs disabled in
        the scheduler's process, runs succeeded and failed where they ran.

        :raises InvalidJobError: for an unknown kind or a callback that is not callable.
        """
        self.events.register(kind, callback)

    async def get_health_snapshot(
        self, *, max_lag_seconds: float | None = None, window_seconds: float = 3600.0
    ) -> SchedulerHealthSnapshot:
        """This process's scheduler loop and the database's view of the schedule.

        ``max_lag_seconds`` (default: ``misfire_grace_seconds``, at least 5 s) is how late a
        job may be before the schedule counts as behind; ``window_seconds`` is the span of
        recent runs the success rate covers.

        :raises sqlalchemy.exc.SQLAlchemyError: or ``TimeoutError`` when the database does not
            answer (the scheduler is then unhealthy too).
        """
        return await read_health(
            self._engine,
            self._store,
            self.config,
            self._clock.now(),
            max_lag_seconds=max_lag_seconds,
            window_seconds=window_seconds,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def housekeeper(self) -> Housekeeper:
        """The housekeeping beside the loop (for tests and tools: ``watch_chains()``...)."""
        return self._housekeeper

    @property
    def engine(self) -> SchedulerEngine:
        """The scheduling loop (for tests and tools: ``await app.engine.tick()``)."""
        return self._engine

    @property
    def is_running(self) -> bool:
        return self._engine.running

    async def start(self) -> None:
        """Apply the schedules declared in code (if any were), load the due jobs and start
        the scheduling loop in the background."""
        if self.declarations.used:
            await self.apply_declarations()
        await self._engine.start()
        self._housekeeper.start()
        logger.info("scheduler started (instance %s)", self._engine.owner)

    async def stop(self) -> None:
        """Stop the loop; fires claimed but not sent are released for the next scheduler."""
        await self._engine.stop()
        await self._housekeeper.stop()
        logger.info("scheduler stopped (instance %s)", self._engine.owner)

    async def __aenter__(self) -> SchedulerApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

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

    # ------------------------------------------------------------------ declared in code

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
            _keep_schedules(written, current)
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
        _keep_schedules(rows, current)
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

    # ------------------------------------------------------------------ management

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

    # ------------------------------------------------------------------ internals

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

    async def _locked(self, session: AsyncSession, job_id: str) -> SchedulerJob:
        job = await self._store.get_job(session, job_id, for_update=True)
        if job is None:
            await self._store.rollback(session)
            raise JobNotFoundError(job_id)
        return job

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


def _keep_schedules(rows: dict[str, dict[str, Any]], current: dict[str, ScheduleState]) -> None:
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


_FOREIGN_KEYS_ON = "taskiq_beat.sqlite_foreign_keys_on"


def _enforce_sqlite_foreign_keys(session_factory: async_sessionmaker[AsyncSession]) -> None:
    """Turn on SQLite foreign keys on every connection the factory's engine hands out.

    On checkout rather than on connect, so that connections pooled before the app was built
    get it too (SQLite ignores the pragma inside a transaction; none is open at checkout);
    once per connection: each statement is a round trip to aiosqlite's thread.
    """
    bind = session_factory.kw.get("bind")
    sync_engine = getattr(bind, "sync_engine", None)
    if sync_engine is None or sync_engine.dialect.name != "sqlite":
        return
    if not event.contains(sync_engine, "checkout", _sqlite_foreign_keys_on):
        event.listen(sync_engine, "checkout", _sqlite_foreign_keys_on)


def _sqlite_foreign_keys_on(
    dbapi_connection: Any, connection_record: Any, connection_proxy: Any
) -> None:
    # ``info`` lives as long as the DBAPI connection (a reconnect starts it empty).
    if connection_record.info.get(_FOREIGN_KEYS_ON):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    connection_record.info[_FOREIGN_KEYS_ON] = True
