"""The worker side: what runs inside ``taskiq worker`` to report each fire's outcome.

:class:`RunLifecycleMiddleware` is a Taskiq middleware. ``SchedulerApp`` adds it to its broker,
so a worker that imports the module building the app has it with no flag or call; a worker
that does not build an app adds it itself::

    broker.add_middlewares(RunLifecycleMiddleware(session_factory))

For every message the scheduler sent (it carries :data:`~taskiq_beat.dispatch.RUN_ID_LABEL`)
it writes the run's lifecycle onto its ``scheduler_run`` row: ``running`` before the task
starts, ``succeeded`` or ``failed`` once it ends. Messages the scheduler did not send are left
alone.

**Executed once.** Before the task runs, the run is moved to ``running`` by compare-and-set
(see :mod:`taskiq_beat.store.lifecycle`). A second delivery of the same fire (a scheduler
killed between its ``kiq`` and its record sends it again; a broker redelivers) loses that
compare-and-set and is not executed: Taskiq's ``pre_execute`` cannot skip a message, so the
middleware wraps each task it sees once (a guard around the function the worker calls), and
the guard ends a skipped delivery with Taskiq's ``NoResultError``: the message is
acknowledged, no result is stored over the first execution's, retry middlewares leave it.

**Batched.** Starts wait for one statement shared by all the executions that start while
the previous one runs; finishes are written every ``lifecycle_flush_seconds`` or every
``lifecycle_batch_size`` runs, with the jobs' counters, in one transaction.

**Chains.** For a chain's fire (the orchestrator task) whose run it started, the middleware
lets the orchestrator record the chain and send its first step instead of running the chain
in this slot (:mod:`taskiq_beat.chain_runner`); the run stays ``running`` until the chain
ends. A step's message (it carries :data:`~taskiq_beat.chain.CHAIN_RUN_ID_LABEL`) is started
by compare-and-set on its step row, executed once, and its outcome advances the chain.

**Faults.** The database unreachable: tasks still run (the executed-once check falls back to
at-least-once for the outage), finishes are kept (at most ``lifecycle_buffer_size``) and
written once it is back; one warning per outage. A run id that matches no row (labels edited
by hand, the job deleted): the task runs; one warning per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import os
import socket
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.exceptions import NoResultError

from taskiq_beat.chain import CHAIN_RUN_ID_LABEL, CHAIN_STARTER, CHAIN_TASK_NAME, ChainSpec
from taskiq_beat.chain_runner import TIMEOUT_LABEL, ChainRunner, result_text
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.dispatch import JOB_ID_LABEL, RUN_ID_LABEL
from taskiq_beat.enums import RunStatus, StepStatus
from taskiq_beat.events import EventHooks, EventKind, SchedulerEvent
from taskiq_beat.models import ERROR_MAX_LENGTH, ERROR_TYPE_MAX_LENGTH, WORKER_ID_MAX_LENGTH
from taskiq_beat.store import Advance, Finish, RunStart, SchedulerStore, StepOutcome

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

__all__ = ["RETRIES_LABEL", "LifecycleStats", "RunLifecycleMiddleware"]

logger = logging.getLogger(__name__)

RETRIES_LABEL = "_retries"
"""The label in which Taskiq's retry middlewares count the retries of a message."""
_GUARDED = "__taskiq_beat_guarded__"


@dataclasses.dataclass
class LifecycleStats:
    """What one worker's middleware did, for tests, health checks and logs."""

    started: int = 0
    """Executions this worker started by compare-and-set."""
    duplicates_skipped: int = 0
    """Deliveries not executed: their run was running or finished already."""
    unchecked: int = 0
    """Executions started without the check (database unreachable, or no such run)."""
    finished_written: int = 0
    finished_dropped: int = 0
    """Outcomes not written: the buffer was full during an outage, or the run moved on."""


@dataclasses.dataclass(slots=True)
class _Execution:
    """One delivery of a fire on this worker, from ``pre_execute`` to ``post_execute``."""

    run_id: int
    job_id: str
    retries: int
    executions: int = 0  # 0: not tracked (started without the check)
    skip: bool = False
    began: float = 0.0
    error: BaseException | None = None
    step_task_id: str | None = None  # a durable chain step's attempt
    unchecked: bool = False  # started without the check (database unreachable)
    chain_started: bool = False  # the orchestrator recorded its chain: the chain ends the run


_EXECUTION: contextvars.ContextVar[_Execution | None] = contextvars.ContextVar(
    "taskiq_beat_execution", default=None
)


def _skipping() -> bool:
    execution = _EXECUTION.get()
    return execution is not None and execution.skip


_UNAVAILABLE = object()  # the start check could not be made


class RunLifecycleMiddleware(TaskiqMiddleware):
    """Writes the lifecycle of the scheduler's fires onto their runs; executes each once.

    ``store`` (a :class:`~taskiq_beat.store.SchedulerStore` on the same database) may be
    given instead of ``session_factory`` to share one, as ``SchedulerApp`` does.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession] | None = None,
        *,
        config: SchedulerConfig | None = None,
        clock: Clock | None = None,
        store: SchedulerStore | None = None,
        worker_id: str | None = None,
        events: EventHooks | None = None,
    ) -> None:
        super().__init__()
        self.events = events or EventHooks()
        """Where ``RUN_SUCCEEDED`` / ``RUN_FAILED`` events go (the app's, when it made this)."""
        self.config = config or SchedulerConfig()
        if store is None:
            if session_factory is None:
                raise TypeError("RunLifecycleMiddleware needs a session_factory or a store")
            store = SchedulerStore(session_factory, timeout=self.config.database_timeout_seconds)
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self.worker_id = worker_id or _new_worker_id()
        self.stats = LifecycleStats()
        self._starts: list[tuple[RunStart, asyncio.Future[Any]]] = []
        self._finishes: deque[Finish] = deque()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._stopping = asyncio.Event()
        self._starting = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._registered = False
        self._outage = False
        self._warned_unknown = False
        self._dropping = False
        self._chains: ChainRunner | None = None
        logging.getLogger("taskiq.receiver.receiver").addFilter(_QUIET_CHAIN_STARTS)
        self._step_outcomes: deque[StepOutcome] = deque()

    @property
    def chains(self) -> ChainRunner:
        """The durable chains' runner of this worker (on the broker this middleware is on)."""
        if self._chains is None:
            self._chains = ChainRunner(
                store=self._store, broker=self.broker, clock=self._clock, config=self.config
            )
        return self._chains

    # ------------------------------------------------------------------ Taskiq hooks

    async def startup(self) -> None:
        """In a worker process: announce the worker and start reporting."""
        if self.broker.is_worker_process:
            self._ensure_running()
            await self._register()

    async def shutdown(self) -> None:
        """Write what is pending; runs still ``running`` here become ``lost``; stop."""
        await self.close()

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        # This delivery's own state, never one inherited: a task started from inside another
        # (a chain's steps, sent from its orchestrator) runs in a copy of its context.
        _EXECUTION.set(None)
        CHAIN_STARTER.set(None)
        labels = message.labels
        job_id = labels.get(JOB_ID_LABEL)
        raw_run_id = labels.get(RUN_ID_LABEL)
        if job_id is None and labels.get(CHAIN_RUN_ID_LABEL) is not None:
            await self._start_step(message)
            return message
        if job_id is None or raw_run_id is None:
            return message  # not a fire of the scheduler's
        try:
            run_id = int(raw_run_id)
            retries = int(labels.get(RETRIES_LABEL) or 0)
        except (TypeError, ValueError):
            self._unknown_run(message, f"malformed labels {RUN_ID_LABEL}={raw_run_id!r}")
            return message
        self._ensure_running()
        self._guard(message.task_name)
        execution = _Execution(run_id=run_id, job_id=str(job_id), retries=retries)
        _EXECUTION.set(execution)
        answer = await self._start(RunStart(run_id, execution.job_id, retries))
        if answer is _UNAVAILABLE:
            self.stats.unchecked += 1
            if message.task_name == CHAIN_TASK_NAME:  # recorded when the database answers
                CHAIN_STARTER.set(functools.partial(self._start_chain, execution))
        elif answer is None:
            self.stats.unchecked += 1
            self._unknown_run(message, f"no run {run_id} of job {job_id!r}")
        elif answer[1] is not None:
            execution.skip = True
            self.stats.duplicates_skipped += 1
            logger.info(
                "task %s (job %s, run %d) delivered again while %s: not executed",
                message.task_id,
                job_id,
                run_id,
                answer[1].value,
            )
        else:
            execution.executions = answer[0]
            self.stats.started += 1
            if message.task_name == CHAIN_TASK_NAME:
                CHAIN_STARTER.set(functools.partial(self._start_chain, execution))
        execution.began = time.perf_counter()
        return message

    async def _start_chain(
        self, execution: _Execution, spec: ChainSpec, message: TaskiqMessage
    ) -> None:
        await self.chains.start(execution.run_id, spec, message)
        # Started now or before (a redelivery of a fire whose chain runs): its end writes the run.
        execution.chain_started = True

    async def _start_step(self, message: TaskiqMessage) -> None:
        """Start a durable chain step's attempt by compare-and-set (see ``start_step``)."""
        self._ensure_running()
        self._guard(message.task_name)
        execution = _Execution(run_id=0, job_id="", retries=0, step_task_id=message.task_id)
        _EXECUTION.set(execution)
        try:
            answer = await self.chains.start_step(message.task_id, worker_id=self.worker_id)
        except Exception as exc:
            self._database_down(exc, "executing chain steps without the executed-once check")
            answer = None
        if answer is None:
            # Executed at least once: its outcome is written onto the attempt if it is
            # still pending or running then.
            execution.unchecked = True
            self.stats.unchecked += 1
        elif answer[1] is not None:
            execution.skip = True
            self.stats.duplicates_skipped += 1
            logger.info(
                "chain step %s (%s) delivered again while %s: not executed",
                message.task_id,
                message.task_name,
                answer[1].value,
            )
        else:
            execution.executions = answer[0]
            self.stats.started += 1
        execution.began = time.perf_counter()

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        execution = _EXECUTION.get()
        if execution is not None and not execution.skip and execution.error is None:
            # The task's own exception: a retry middleware may replace result.error after.
            execution.error = exception

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        execution = _EXECUTION.get()
        if execution is None or execution.skip or not (execution.executions or execution.unchecked):
            return
        duration = time.perf_counter() - execution.began
        error = execution.error
        if error is None and result.is_err:
            error = result.error
        if execution.step_task_id is not None:
            await self._step_finished(message, execution, duration, error, result)
            return
        if execution.chain_started:
            return  # the chain's end writes the run
        self._finished(
            Finish(
                execution.run_id,
                execution.job_id,
                execution.executions,
                execution.retries,
                RunStatus.SUCCEEDED if error is None else RunStatus.FAILED,
                self._clock.now(),
                duration,
                error_type=None if error is None else _error_type(error),
                error=None if error is None else _error_text(error),
            )
        )

    async def _step_finished(
        self,
        message: TaskiqMessage,
        execution: _Execution,
        duration: float,
        error: BaseException | None,
        result: TaskiqResult[Any],
    ) -> None:
        """Write a chain step's outcome and send what follows (kept and retried while the
        database is unreachable)."""
        status = StepStatus.SUCCEEDED if error is None else StepStatus.FAILED
        timeout = message.labels.get(TIMEOUT_LABEL)
        if isinstance(error, TimeoutError) and timeout is not None:
            with contextlib.suppress(TypeError, ValueError):
                if duration >= float(timeout) * 0.99:
                    status = StepStatus.TIMED_OUT
        outcome = StepOutcome(
            message.task_id,
            status,
            self._clock.now(),
            executions=None if execution.unchecked else execution.executions,
            duration_seconds=duration,
            result=result_text(result.return_value) if error is None else None,
            error_type=None if error is None else _error_type(error),
            error=None if error is None else _error_text(error),
        )
        try:
            advance = await self.chains.step_finished(outcome)
        except Exception as exc:
            self._database_down(exc, "keeping chain step outcomes until it is back")
            self._step_outcomes.append(outcome)
            self._wake.set()
        else:
            self.stats.finished_written += 1
            self._chain_ended(advance)

    def _chain_ended(self, advance: Advance | None) -> None:
        """``RUN_SUCCEEDED`` / ``RUN_FAILED`` for a chain run this worker ended."""
        if advance is None or advance.end is None:
            return
        succeeded = advance.end.status is RunStatus.SUCCEEDED
        kind = EventKind.RUN_SUCCEEDED if succeeded else EventKind.RUN_FAILED
        if self.events.wants(kind):
            self.events.emit(
                SchedulerEvent(
                    kind,
                    advance.job_id,
                    task_id=advance.parent_task_id,
                    run_id=advance.run_id,
                    error=advance.end.error,
                    detail=f"chain of {advance.end.steps} steps, run {advance.end.chain_attempts}",
                )
            )

    async def _flush_step_outcomes(self) -> bool:
        while self._step_outcomes:
            try:
                advance = await self.chains.step_finished(self._step_outcomes[0])
            except Exception as exc:
                self._database_down(exc, "keeping chain step outcomes until it is back")
                return False
            self._step_outcomes.popleft()
            self.stats.finished_written += 1
            self._chain_ended(advance)
        return True

    # ------------------------------------------------------------------ guard

    def _guard(self, task_name: str) -> None:
        """Wrap the task's function once, so that a delivery judged a duplicate in
        ``pre_execute`` ends before it runs (the worker calls ``task.original_func``, looked
        up after the middlewares ran)."""
        task = self.broker.find_task(task_name)
        if task is None:
            return
        original = task.original_func
        if getattr(original, _GUARDED, False) or not callable(original):
            return
        guarded: Any
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                if _skipping():
                    raise NoResultError
                return await original(*args, **kwargs)

        else:

            @functools.wraps(original)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                if _skipping():
                    raise NoResultError
                return original(*args, **kwargs)

        setattr(guarded, _GUARDED, True)
        task.original_func = guarded

    # ------------------------------------------------------------------ reporting

    def _ensure_running(self) -> None:
        if self._running:
            return
        self._running = True
        self._stopping.clear()
        self._tasks = [
            asyncio.create_task(self._start_flusher(), name="taskiq-beat-lifecycle-starts"),
            asyncio.create_task(self._flusher(), name="taskiq-beat-lifecycle"),
            asyncio.create_task(self._heartbeat(), name="taskiq-beat-heartbeat"),
        ]

    async def _start(self, start: RunStart) -> Any:
        """The answer of the start check for this delivery (see ``start_runs``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._starts.append((start, future))
        self._starting.set()
        return await future

    def _finished(self, finish: Finish) -> None:
        if len(self._finishes) >= self.config.lifecycle_buffer_size:
            self._finishes.popleft()
            self.stats.finished_dropped += 1
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "run outcomes not written: more than %d wait for the database;"
                    " dropping the oldest",
                    self.config.lifecycle_buffer_size,
                )
        self._finishes.append(finish)
        if len(self._finishes) >= self.config.lifecycle_batch_size:
            self._urgent.set()
        self._wake.set()

    async def _start_flusher(self) -> None:
        """Write the starts waiting, at once: the starts that arrive while one statement
        runs share the next. Apart from the finishes, so that no task waits for its start
        behind a batch of outcomes."""
        while not self._stopping.is_set():
            await self._starting.wait()
            self._starting.clear()
            await self._flush_starts()

    async def _flusher(self) -> None:
        """Write finishes in batches (every ``lifecycle_flush_seconds``, or at once when
        ``lifecycle_batch_size`` wait), until stopped."""
        backoff = 0.0
        while not self._stopping.is_set():
            await self._wake.wait()
            if not self._urgent.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._urgent.wait(), self.config.lifecycle_flush_seconds + backoff
                    )
            self._wake.clear()
            self._urgent.clear()
            written = await self._flush_finishes()
            written = await self._flush_step_outcomes() and written
            backoff = 0.0 if written else min(max(backoff * 2, 0.5), 5.0)
            if self._finishes or self._step_outcomes:
                self._wake.set()

    async def _flush_starts(self) -> None:
        starts, self._starts = self._starts, []
        if not starts:
            return
        try:
            answers: dict[int, Any] = await self._store.start_runs(
                [start for start, _ in starts], worker_id=self.worker_id, now=self._clock.now()
            )
        except Exception as exc:
            self._database_down(exc, "executing tasks without the executed-once check")
            for _, future in starts:
                if not future.done():
                    future.set_result(_UNAVAILABLE)
            return
        self._database_up()
        granted: set[tuple[int, int]] = set()
        for start, future in starts:
            answer = answers.get(start.run_id)
            if answer is not None and answer[1] is None:
                # Two deliveries of one fire in one batch: the run started once.
                if (start.run_id, start.retries) in granted:
                    answer = (0, RunStatus.RUNNING)
                granted.add((start.run_id, start.retries))
            if not future.done():
                future.set_result(answer)

    async def _flush_finishes(self) -> bool:
        """Write the finishes waiting; ``False`` if the database failed (they stay)."""
        if not self._finishes:
            return True
        batch = list(self._finishes)[: self.config.lifecycle_batch_size]
        try:
            written = await self._store.finish_runs(batch)
        except Exception as exc:
            self._database_down(exc, "keeping run outcomes until it is back")
            return False
        self._database_up()
        for _ in batch:
            self._finishes.popleft()
        self._announce(batch, written)
        self.stats.finished_written += len(written)
        self.stats.finished_dropped += len(batch) - len(written)
        self._dropping = False
        return True

    def _announce(self, batch: list[Finish], written: set[int]) -> None:
        """``RUN_SUCCEEDED`` / ``RUN_FAILED`` for the outcomes written (if anyone listens)."""
        wants_ok = self.events.wants(EventKind.RUN_SUCCEEDED)
        wants_failed = self.events.wants(EventKind.RUN_FAILED)
        if not (wants_ok or wants_failed):
            return
        for finish in batch:
            if finish.run_id not in written:
                continue
            succeeded = finish.status is RunStatus.SUCCEEDED
            if (wants_ok and succeeded) or (wants_failed and not succeeded):
                self.events.emit(
                    SchedulerEvent(
                        EventKind.RUN_SUCCEEDED if succeeded else EventKind.RUN_FAILED,
                        finish.job_id,
                        run_id=finish.run_id,
                        error=finish.error,
                        detail=f"took {finish.duration_seconds:.3f} s",
                    )
                )

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._registered:
                    await self._register()
                elif not await self._store.renew_worker(self.worker_id, now=self._clock.now()):
                    self._registered = False
                    await self._register()
            except Exception as exc:
                self._database_down(exc, "heartbeat not renewed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.worker_heartbeat_seconds)

    async def _register(self) -> None:
        try:
            await self._store.register_worker(
                self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                now=self._clock.now(),
            )
        except Exception as exc:
            self._database_down(exc, "worker not registered yet")
            return
        if not self._registered:
            logger.info("worker %s reports run outcomes", self.worker_id)
        self._registered = True

    async def close(self) -> None:
        """Write what is pending (bounded by the database timeout), mark this worker's runs
        still ``running`` as ``lost``, and stop reporting."""
        if not self._running:
            return
        self._running = False
        # Let each task end its operation under way (a cancelled one would leave its
        # connection to unwind after the caller may have disposed of the engine).
        self._stopping.set()
        self._wake.set()
        self._urgent.set()
        self._starting.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._flush_starts()
        with contextlib.suppress(Exception):
            while self._finishes and await self._flush_finishes():
                pass
            await self._flush_step_outcomes()
        if self._chains is not None:
            await self._chains.close()
        if self._registered:
            with contextlib.suppress(Exception):
                lost = await self._store.stop_worker(
                    self.worker_id,
                    now=self._clock.now(),
                    reason=f"worker {self.worker_id} stopped while the task was running",
                )
                if lost:
                    logger.warning("worker stopped with %d runs unfinished: marked lost", lost)
            self._registered = False

    def _database_down(self, exc: BaseException, consequence: str) -> None:
        if not self._outage:
            self._outage = True
            logger.warning(
                "run lifecycle: database unavailable (%s: %s); %s",
                type(exc).__name__,
                exc,
                consequence,
            )
        else:
            logger.debug("run lifecycle: database still unavailable", exc_info=exc)

    def _database_up(self) -> None:
        if self._outage:
            self._outage = False
            logger.info("run lifecycle: database reachable again")

    def _unknown_run(self, message: TaskiqMessage, why: str) -> None:
        if not self._warned_unknown:
            self._warned_unknown = True
            logger.warning(
                "task %s (%s): %s; executed without a lifecycle (further cases at DEBUG)",
                message.task_id,
                message.task_name,
                why,
            )
        else:
            logger.debug("task %s: %s", message.task_id, why)


class _QuietChainStarts(logging.Filter):
    """Drops Taskiq's warning that a task "skipped setting result" for the chain
    orchestrator: a durable chain's fire ends that way by design (its result is stored when
    the chain ends), once per fire."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and args[:1] == (CHAIN_TASK_NAME,)
            and "skipped setting result" in str(record.msg)
        )


_QUIET_CHAIN_STARTS = _QuietChainStarts()


def _new_worker_id() -> str:
    suffix = f"-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return socket.gethostname()[: WORKER_ID_MAX_LENGTH - len(suffix)] + suffix


def _error_type(error: BaseException) -> str:
    kind = type(error)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return name[:ERROR_TYPE_MAX_LENGTH]


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if len(text) > ERROR_MAX_LENGTH:
        text = text[: ERROR_MAX_LENGTH - 15] + " …(truncated)"
    return text
