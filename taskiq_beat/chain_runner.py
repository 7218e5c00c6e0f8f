"""Durable chains: steps advance on completion, recorded in the database.

:class:`ChainRunner` is shared by the two sides:

- **the worker** (through :class:`~taskiq_beat.worker.RunLifecycleMiddleware`): the
  orchestrator message records the chain and sends its first step (:meth:`ChainRunner.start`);
  each step's message is started by compare-and-set on its step row, and its outcome, once
  written, decides and records what follows (the next step, a retry, a restart or the end),
  which this worker then sends (:meth:`ChainRunner.step_finished`). Nothing waits in a worker
  slot between steps. A delay (``post_delay_ms``, ``retry_delay_seconds``) is a step row due
  later: the worker arms a timer on its event loop (no slot held) and sends it then.
- **the scheduler** (its housekeeping, :meth:`ChainRunner.watch`): step attempts past their
  ``timeout_seconds`` become ``timed_out`` and what follows is sent; attempts running on a
  worker that died are sent again (same task id); attempts recorded but not sent (their
  sender died, its timer went with it, the broker refused them) are sent once due.

Every send happens after the row it sends is committed, and a sender that may race another
takes a lease on the row first (see :mod:`taskiq_beat.store.chains`): a message may reach
the broker twice, but a step attempt is executed once and advances the chain once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python
from taskiq import TaskiqResult

from taskiq_beat.chain import (
    CHAIN_ATTEMPT_LABEL,
    CHAIN_JOB_ID_LABEL,
    CHAIN_RUN_ID_LABEL,
    CHAIN_SCHEDULED_FOR_LABEL,
    CHAIN_STEP_ATTEMPT_LABEL,
    CHAIN_STEP_LABEL,
    CHAIN_TASK_ID_LABEL,
    ChainSpec,
    plan_after,
    step_task_id,
)
from taskiq_beat.dispatch import describe_error
from taskiq_beat.enums import RunStatus, StepStatus
from taskiq_beat.exceptions import ChainAbortedError
from taskiq_beat.models import RESULT_MAX_LENGTH
from taskiq_beat.store import (
    Advance,
    ChainEnd,
    ChainState,
    StepDraft,
    StepMessage,
    StepOutcome,
)

if TYPE_CHECKING:
    from datetime import datetime

    from taskiq import AsyncBroker, TaskiqMessage

    from taskiq_beat.clock import Clock
    from taskiq_beat.config import SchedulerConfig
    from taskiq_beat.store import SchedulerStore

__all__ = ["TIMEOUT_LABEL", "ChainRunner", "result_text"]

logger = logging.getLogger(__name__)

TIMEOUT_LABEL = "timeout"
"""Taskiq's label bounding one execution (seconds): a step with ``timeout_seconds`` carries
it, so the worker running it cancels it at its deadline."""
_ABORTED_TYPE = f"{ChainAbortedError.__module__}.{ChainAbortedError.__qualname__}"


def result_text(value: Any) -> str | None:
    """``value`` as JSON text, or ``None`` when it is not JSON-ready or too long to keep."""
    try:
        text = json.dumps(to_jsonable_python(value), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= RESULT_MAX_LENGTH else None


class ChainRunner:
    """Starts durable chains, advances them on each step's outcome, and watches them."""

    def __init__(
        self,
        *,
        store: SchedulerStore,
        broker: AsyncBroker,
        clock: Clock,
        config: SchedulerConfig,
    ) -> None:
        self._store = store
        self._broker = broker
        self._clock = clock
        self._config = config
        self._timers: set[asyncio.TimerHandle] = set()
        self._sending: set[asyncio.Task[None]] = set()
        # Starts and "sent" marks wait for one statement shared by all that arrive while
        # the previous one runs (see _flush).
        self._starts: list[tuple[str, str, asyncio.Future[Any]]] = []
        self._sent: list[int] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ worker side

    async def start(self, run_id: int, spec: ChainSpec, message: TaskiqMessage) -> None:
        """Record the chain of run ``run_id`` (whose fire is ``message``) and its first step,
        and send that step. A run whose chain was started already is left as it is.

        :raises ChainAbortedError: when the run has no row (a job deleted meanwhile).
        """
        now = self._clock.now()
        first = self._draft(spec, message.task_id, 1, 0, 1, now, 0.0, spec.steps[0].args)
        sent = await self._store.start_chain(
            run_id, spec=spec.model_dump(mode="json"), first=first, now=now
        )
        if sent is None:
            logger.info("chain run %d: started already (or gone); nothing to do", run_id)
            return
        logger.debug("chain run %d started: %d steps", run_id, len(spec.steps))
        await self.send([sent])

    async def start_step(
        self, task_id: str, *, worker_id: str
    ) -> tuple[int, StepStatus | None] | None:
        """Start a delivered step attempt by compare-and-set (see ``start_steps``): its
        execution number, or ``(0, status)`` for a duplicate, or ``None`` (no such attempt).

        :raises Exception: what the database raised (the caller decides).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._starts.append((task_id, worker_id, future))
        self._kick()
        answer: tuple[int, StepStatus | None] | None = await future
        return answer

    async def step_finished(self, outcome: StepOutcome) -> Advance | None:
        """Write the outcome of a step execution and send what follows (``None``: a late or
        repeated outcome, ignored)."""
        advance = await self._store.finish_step(outcome, decide=self.decide)
        if advance is not None:
            await self.follow(advance)
        return advance

    async def follow(self, advance: Advance) -> None:
        """Send the step attempt an advance recorded, or announce the chain's end."""
        written = advance.outcome
        if written is not None and written.status is not StepStatus.SUCCEEDED:
            logger.warning(
                "chain run %d: step attempt %s %s: %s",
                advance.run_id,
                written.task_id,
                written.status.value,
                written.error,
            )
        if advance.send is not None:
            await self.send([advance.send])
        if advance.end is not None:
            await self._ended(advance)

    def decide(
        self, state: ChainState, outcome: StepOutcome
    ) -> tuple[StepOutcome, StepDraft | ChainEnd]:
        """The chain's policy (:func:`~taskiq_beat.chain.plan_after`) as rows to write."""
        spec = ChainSpec.model_validate(state.spec)
        succeeded = outcome.status is StepStatus.SUCCEEDED
        following = state.step + 1 if state.step + 1 < len(spec.steps) else None
        passes = following is not None and spec.steps[following].pass_result
        if succeeded and passes and outcome.result is None:
            succeeded = False
            outcome = _replace(
                outcome,
                status=StepStatus.FAILED,
                error_type="ValueError",
                error=(
                    "ValueError: the result cannot be passed to the next step: not"
                    f" JSON-serializable, or longer than {RESULT_MAX_LENGTH} characters"
                ),
            )
        plan = plan_after(spec, state.chain_attempt, state.step, state.attempt, succeeded=succeeded)
        if plan.step is not None:
            step = spec.steps[plan.step]
            if plan.step == state.step and plan.chain_attempt == state.chain_attempt:
                args = state.args  # a retry sends what the failed attempt had
            elif step.pass_result and outcome.result is not None:
                args = [json.loads(outcome.result), *step.args]
            else:
                args = step.args
            draft = self._draft(
                spec,
                state.parent_task_id,
                plan.chain_attempt,
                plan.step,
                plan.attempt,
                outcome.finished_at,
                plan.delay,
                args,
            )
            return outcome, draft
        if plan.succeeded:
            return outcome, ChainEnd(RunStatus.SUCCEEDED, plan.chain_attempt, len(spec.steps))
        failed = spec.steps[state.step]
        error = (
            f"step {state.step} ({failed.task_name}) failed after {state.attempt}"
            f" attempt{'s' if state.attempt != 1 else ''}"
            f" on chain attempt {state.chain_attempt}/{spec.max_chain_attempts}: {outcome.error}"
        )
        end = ChainEnd(
            RunStatus.ABORTED,
            state.chain_attempt,
            len(spec.steps),
            error=error,
            error_type=_ABORTED_TYPE,
            failed_step=state.step,
            failed_task=failed.task_name,
        )
        return outcome, end

    async def send(self, messages: list[StepMessage]) -> None:
        """Send the step attempts due now; arm a timer for each one due later."""
        now = self._clock.now()
        due: list[StepMessage] = []
        for message in messages:
            delay = (message.draft.due_at - now).total_seconds()
            if delay > 0:
                self._later(message, delay)
            else:
                due.append(message)
        await self._send_now(due)

    async def close(self) -> None:
        """Drop the timers of delayed sends (the scheduler's watchdog sends them) and write
        the marks of sends made."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        with contextlib.suppress(Exception):
            await self._flush()

    def _kick(self) -> None:
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        """One statement for the starts waiting, one for the sends to mark."""
        starts, self._starts = self._starts, []
        if starts:
            by_worker: dict[str, list[tuple[str, asyncio.Future[Any]]]] = {}
            for task_id, worker_id, future in starts:
                by_worker.setdefault(worker_id, []).append((task_id, future))
            for worker_id, waiting in by_worker.items():
                try:
                    answers = await self._store.start_steps(
                        [task_id for task_id, _ in waiting],
                        worker_id=worker_id,
                        now=self._clock.now(),
                    )
                except Exception as exc:
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                granted: set[str] = set()
                for task_id, future in waiting:
                    answer = answers.get(task_id)
                    if answer is not None and answer[1] is None:
                        if task_id in granted:  # delivered twice in one batch: started once
                            answer = (0, StepStatus.RUNNING)
                        granted.add(task_id)
                    if not future.done():
                        future.set_result(answer)
        sent, self._sent = self._sent, []
        if sent:
            try:
                await self._store.mark_steps_sent(sent, now=self._clock.now())
            except Exception as exc:  # the watchdog sends them again: a duplicate, skipped
                logger.debug("sent chain steps not marked: %s", exc)

    # ------------------------------------------------------------------ scheduler side

    async def watch(self) -> tuple[int, int, int]:
        """One pass of the scheduler's watchdog: attempts of dead workers made sendable again,
        attempts timed out, and attempts sent that were due but unsent. Returns the three
        counts."""
        now = self._clock.now()
        lease = timedelta(seconds=self._config.claim_lease_seconds)
        grace = timedelta(seconds=self._config.housekeeping_interval_seconds)
        resent = await self._store.resend_steps_of_lost_workers(
            silent_since=now - timedelta(seconds=self._config.worker_timeout_seconds), now=now
        )
        if resent:
            logger.warning(
                "%d chain steps were running on lost workers: sending them again", resent
            )
        advances = await self._store.time_out_steps(now=now, decide=self.decide)
        for advance in advances:
            await self.follow(advance)
        unsent = await self._store.claim_unsent_steps(
            due_before=now - grace, lease_until=now + lease, now=now
        )
        if unsent:
            logger.info("sending %d chain steps that were due and not sent", len(unsent))
            await self._send_now(unsent)
        return resent, len(advances), len(unsent)

    # ------------------------------------------------------------------ internals

    def _draft(
        self,
        spec: ChainSpec,
        parent_task_id: str,
        chain_attempt: int,
        index: int,
        attempt: int,
        now: datetime,
        delay: float,
        args: list[Any],
    ) -> StepDraft:
        step = spec.steps[index]
        due_at = now + timedelta(seconds=delay)
        return StepDraft(
            chain_attempt,
            index,
            attempt,
            step.task_name,
            step_task_id(parent_task_id, chain_attempt, index, attempt),
            list(args),
            dict(step.kwargs),
            due_at,
            None
            if step.timeout_seconds is None
            else due_at + timedelta(seconds=step.timeout_seconds),
        )

    async def _send_now(self, messages: list[StepMessage]) -> None:
        sent = [message.step_id for message in messages if await self._kiq(message)]
        if sent:
            self._sent.extend(sent)
            self._kick()

    async def _kiq(self, message: StepMessage) -> bool:
        """Send one step attempt; ``False`` if it was not sent (left to the watchdog, or
        failed for good when its task is unknown here)."""
        draft = message.draft
        task = self._broker.find_task(draft.task_name)
        if task is None:
            outcome = StepOutcome(
                draft.task_id,
                StepStatus.FAILED,
                self._clock.now(),
                error_type="UnknownTaskError",
                error=f"task {draft.task_name!r} is not registered on the broker",
            )
            advance = await self._store.fail_step(outcome, decide=self.decide)
            if advance is not None:
                await self.follow(advance)
            return False
        labels: dict[str, Any] = {
            CHAIN_JOB_ID_LABEL: message.job_id,
            CHAIN_SCHEDULED_FOR_LABEL: message.scheduled_for.isoformat(),
            CHAIN_TASK_ID_LABEL: message.parent_task_id,
            CHAIN_STEP_LABEL: draft.step,
            CHAIN_RUN_ID_LABEL: message.run_id,
            CHAIN_ATTEMPT_LABEL: draft.chain_attempt,
            CHAIN_STEP_ATTEMPT_LABEL: draft.attempt,
        }
        if draft.deadline_at is not None:
            remaining = (draft.deadline_at - self._clock.now()).total_seconds()
            labels[TIMEOUT_LABEL] = max(remaining, 0.001)
        try:
            await (
                task.kicker()
                .with_task_id(draft.task_id)
                .with_labels(**labels)
                .kiq(*draft.args, **draft.kwargs)
            )
        except Exception as exc:
            logger.warning(
                "chain run %d: step %d not sent (%s); the scheduler sends it again",
                message.run_id,
                draft.step,
                describe_error(exc),
            )
            return False
        return True

    def _later(self, message: StepMessage, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(timer)
            task = loop.create_task(self._send_later(message))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    async def _send_later(self, message: StepMessage) -> None:
        lease_until = self._clock.now() + timedelta(seconds=self._config.claim_lease_seconds)
        with contextlib.suppress(Exception):  # left to the watchdog
            if await self._store.claim_step_send(
                message.step_id, due_at=message.draft.due_at, lease_until=lease_until
            ):
                await self._send_now([message])

    async def _ended(self, advance: Advance) -> None:
        end = advance.end
        assert end is not None
        if end.status is RunStatus.SUCCEEDED:
            logger.debug("chain run %d succeeded", advance.run_id)
            result: TaskiqResult[Any] = TaskiqResult(
                is_err=False,
                log=None,
                return_value={"steps": end.steps, "chain_attempts": end.chain_attempts},
                execution_time=0.0,
            )
        else:
            logger.warning("chain run %d aborted: %s", advance.run_id, end.error)
            result = TaskiqResult(
                is_err=True,
                log=None,
                return_value=None,
                execution_time=0.0,
                error=ChainAbortedError(
                    f"chain {advance.parent_task_id} aborted: {end.error}",
                    step=end.failed_step,
                    task_name=end.failed_task,
                    error=end.error,
                    run_id=advance.run_id,
                ),
            )
        # The orchestrator's task id gets the chain's outcome, as an orchestrator that waited
        # for every step would have stored it.
        try:
            await self._broker.result_backend.set_result(advance.parent_task_id, result)
        except Exception as exc:
            logger.debug("chain run %d: result not stored: %s", advance.run_id, exc)


def _replace(outcome: StepOutcome, **changes: Any) -> StepOutcome:
    return dataclasses.replace(outcome, **changes)
