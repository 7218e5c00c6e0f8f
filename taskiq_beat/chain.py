"""Chains: steps run in order, started by the task ``taskiq_beat.chain_orchestrator``.

A chain job sends one message, to the orchestrator, whose kwargs hold the whole chain. Two
ways to run it:

- **Durable** (a worker with the run lifecycle, :mod:`taskiq_beat.worker`): the orchestrator
  records the chain and its first step in the database, sends that step and returns: it holds
  no worker slot while the steps run. Each step's outcome is recorded by the worker that ran
  it, which sends what comes next (:mod:`taskiq_beat.chain_runner`); the scheduler's
  housekeeping times out steps and sends what a dead worker could not.
- **In the worker** (no lifecycle): the orchestrator sends each step with ``kiq``, waits for
  its result with ``wait_result`` (so the broker needs a result backend) polling every
  ``wait_poll_interval_seconds``, and moves on.

Either way a failed step is retried up to its ``max_attempts``; then the chain stops
(:class:`ChainAbortedError`) or restarts from its first step, up to ``max_chain_attempts``
runs of the chain. :func:`plan_after` is that policy, shared by both.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from taskiq import AsyncTaskiqTask, Context, TaskiqDepends, TaskiqMessage
from taskiq.exceptions import NoResultError

from taskiq_beat.dispatch import JOB_ID_LABEL, SCHEDULED_FOR_LABEL
from taskiq_beat.enums import RunStatus, StepStatus
from taskiq_beat.exceptions import ChainAbortedError, InvalidJobError
from taskiq_beat.models import decode_json

if TYPE_CHECKING:
    from taskiq import AsyncBroker

    from taskiq_beat.models import SchedulerChainStep, SchedulerRun

__all__ = [
    "CHAIN_ATTEMPT_LABEL",
    "CHAIN_JOB_ID_LABEL",
    "CHAIN_ORCHESTRATOR_TASK_NAME",
    "CHAIN_RUN_ID_LABEL",
    "CHAIN_SCHEDULED_FOR_LABEL",
    "CHAIN_STEP_ATTEMPT_LABEL",
    "CHAIN_STEP_LABEL",
    "CHAIN_TASK_ID_LABEL",
    "CHAIN_TASK_NAME",
    "ChainHandle",
    "ChainOutcome",
    "ChainSpec",
    "ChainStep",
    "Plan",
    "TaskChain",
    "chain_orchestrator",
    "plan_after",
    "register_chain_orchestrator",
    "step_task_id",
]

logger = logging.getLogger(__name__)

CHAIN_TASK_NAME = "taskiq_beat.chain_orchestrator"
"""The name under which the orchestrator task is registered on the broker."""
CHAIN_ORCHESTRATOR_TASK_NAME = CHAIN_TASK_NAME
"""taskiq-beat 1.4's name of :data:`CHAIN_TASK_NAME`."""

OnFailure = Literal["stop", "restart"]

CHAIN_JOB_ID_LABEL = "taskiq_beat_chain_job_id"
"""Label of a step's message: the id of the chain job whose fire runs the step."""
CHAIN_SCHEDULED_FOR_LABEL = "taskiq_beat_chain_scheduled_for"
"""Label of a step's message: the scheduled time of that fire."""
CHAIN_TASK_ID_LABEL = "taskiq_beat_chain_task_id"
"""Label of a step's message: the task id of the orchestrator running the chain."""
CHAIN_STEP_LABEL = "taskiq_beat_chain_step"
"""Label of a step's message: the step's position in the chain, from 0."""
CHAIN_RUN_ID_LABEL = "taskiq_beat_chain_run_id"
"""Label of a durable chain step's message: the id of the chain's run (its ``scheduler_run``
row); the worker records the step's outcome on its ``scheduler_chain_step`` row."""
CHAIN_ATTEMPT_LABEL = "taskiq_beat_chain_attempt"
"""Label of a durable chain step's message: which run of the chain (1 unless restarted)."""
CHAIN_STEP_ATTEMPT_LABEL = "taskiq_beat_chain_step_attempt"
"""Label of a durable chain step's message: the attempt of the step, from 1."""

ChainStarter = Callable[["ChainSpec", TaskiqMessage], Awaitable[None]]
CHAIN_STARTER: contextvars.ContextVar[ChainStarter | None] = contextvars.ContextVar(
    "taskiq_beat_chain_starter", default=None
)
"""Set by the lifecycle middleware for an orchestrator message it tracks: the orchestrator
then records the chain and returns (durable chains) instead of running it."""


class ChainStep(BaseModel):
    """One step of a chain: a task (object or registered name) with its arguments and budget.

    ``max_attempts``, ``retry_delay_seconds`` and ``timeout_seconds`` left ``None`` take the
    chain's defaults. ``timeout_seconds=None`` (after defaults) waits for the result forever.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    task: Any
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int | None = Field(default=None, ge=1)
    retry_delay_seconds: float | None = Field(default=None, ge=0)
    timeout_seconds: float | None = Field(default=None, gt=0)
    post_delay_ms: int = Field(default=0, ge=0)
    pass_result: bool = False
    """Pass the previous step's result as this step's first positional argument."""

    def __init__(self, task: Any = None, **data: Any) -> None:
        try:
            super().__init__(task=task, **data)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = "ChainStep." + ".".join(str(part) for part in error["loc"])
            reason = str(error["msg"]).removeprefix("Value error, ")
            raise InvalidJobError(field, error.get("input"), reason) from None

    @field_validator("task", mode="before")
    @classmethod
    def _task_name(cls, value: Any) -> str:
        name = getattr(value, "task_name", value)
        if not isinstance(name, str) or not name:
            raise ValueError("expected a Taskiq task or its registered name")
        return name

    @property
    def task_name(self) -> str:
        name: str = self.task
        return name


class ResolvedStep(BaseModel):
    """A step as stored in the job: every default applied."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    max_attempts: int = Field(ge=1)
    retry_delay_seconds: float = Field(ge=0)
    timeout_seconds: float | None = Field(gt=0)
    post_delay_ms: int = Field(ge=0)
    pass_result: bool = False


class ChainSpec(BaseModel):
    """A whole chain as the orchestrator receives it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: list[ResolvedStep] = Field(min_length=1)
    on_failure: OnFailure = "stop"
    max_chain_attempts: int = Field(default=1, ge=1)
    wait_poll_interval_seconds: float = Field(default=0.5, gt=0)


TaskChain = ChainSpec
"""taskiq-beat 1.4's name of the whole chain as the orchestrator receives it: here
:class:`ChainSpec` (every step's defaults resolved). Build chains with ``chain(steps=...)``."""


async def chain_orchestrator(
    chain: dict[str, Any],
    context: Context = TaskiqDepends(),  # noqa: B008 - Taskiq's dependency injection
) -> dict[str, Any]:
    """Run the chain's steps in order on this worker; see the module docstring."""
    spec = ChainSpec.model_validate(chain)
    starter = CHAIN_STARTER.get()
    if starter is not None:
        # Durable: record the chain, send its first step, and free this worker slot. The
        # run's outcome (and this task's result) is written when the last step ends.
        await starter(spec, context.message)
        raise NoResultError
    broker = context.broker
    parent = context.message.task_id
    labels = context.message.labels
    trace = {
        CHAIN_JOB_ID_LABEL: labels.get(JOB_ID_LABEL, ""),
        CHAIN_SCHEDULED_FOR_LABEL: labels.get(SCHEDULED_FOR_LABEL, ""),
        CHAIN_TASK_ID_LABEL: parent,
    }
    last_error = ""
    for chain_attempt in range(1, spec.max_chain_attempts + 1):
        failed_at: int | None = None
        previous: list[Any] = []
        for index, step in enumerate(spec.steps):
            error = await _run_step(broker, step, spec, trace, chain_attempt, index, previous[-1:])
            if error is not None:
                failed_at, last_error = index, error
                break
            if step.post_delay_ms:
                await asyncio.sleep(step.post_delay_ms / 1000)
        if failed_at is None:
            return {"steps": len(spec.steps), "chain_attempts": chain_attempt}
        logger.warning(
            "chain %s: step %d (%s) failed on chain attempt %d/%d: %s",
            parent,
            failed_at,
            spec.steps[failed_at].task_name,
            chain_attempt,
            spec.max_chain_attempts,
            last_error,
        )
        if spec.on_failure == "stop":
            break
    raise ChainAbortedError(
        f"chain {parent} aborted: {last_error}",
        step=failed_at,
        task_name=None if failed_at is None else spec.steps[failed_at].task_name,
        error=last_error,
    )


def step_task_id(parent: str, chain_attempt: int, index: int, attempt: int) -> str:
    """The Taskiq task id of one attempt of one step of the chain whose fire has the task id
    ``parent``: the same for every send of that attempt, another for every other attempt."""
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{parent}:{chain_attempt}:{index}:{attempt}").hex


async def _run_step(
    broker: AsyncBroker,
    step: ResolvedStep,
    spec: ChainSpec,
    trace: dict[str, str],
    chain_attempt: int,
    index: int,
    previous: list[Any],
) -> str | None:
    """Run one step with its retries; return ``None`` on success or the last error.

    ``previous`` holds the previous step's result (appended here on success)."""
    parent = trace[CHAIN_TASK_ID_LABEL]
    task = broker.find_task(step.task_name)
    if task is None:
        return f"task {step.task_name!r} is not registered on the broker"
    args = [*previous[-1:], *step.args] if step.pass_result else step.args
    error = ""
    for attempt in range(1, step.max_attempts + 1):
        task_id = step_task_id(parent, chain_attempt, index, attempt)
        try:
            kicker = (
                task.kicker()
                .with_task_id(task_id)
                .with_labels(**trace, **{CHAIN_STEP_LABEL: index})
            )
            handle = await kicker.kiq(*args, **step.kwargs)
            result = await handle.wait_result(
                check_interval=spec.wait_poll_interval_seconds,
                timeout=step.timeout_seconds if step.timeout_seconds is not None else -1.0,
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if not result.is_err:
                previous.append(result.return_value)
                return None
            error = f"{type(result.error).__name__}: {result.error}"
        if attempt < step.max_attempts:
            logger.info(
                "chain %s: step %d (%s) attempt %d/%d failed: %s",
                parent,
                index,
                step.task_name,
                attempt,
                step.max_attempts,
                error,
            )
            if step.retry_delay_seconds:
                await asyncio.sleep(step.retry_delay_seconds)
    return error


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What follows the end of one step attempt (see :func:`plan_after`).

    ``step`` set: send that attempt (``chain_attempt``, ``step``, ``attempt``) after ``delay``
    seconds. ``step`` ``None``: the chain is over, ``succeeded`` or not.
    """

    chain_attempt: int
    step: int | None = None
    attempt: int = 1
    delay: float = 0.0
    succeeded: bool = False


def plan_after(
    spec: ChainSpec, chain_attempt: int, step: int, attempt: int, *, succeeded: bool
) -> Plan:
    """The chain's policy: what follows attempt ``attempt`` of step ``step`` in run
    ``chain_attempt`` of the chain, which ``succeeded`` or not."""
    current = spec.steps[step]
    if succeeded:
        if step + 1 < len(spec.steps):
            return Plan(chain_attempt, step + 1, 1, current.post_delay_ms / 1000)
        return Plan(chain_attempt, succeeded=True)
    if attempt < current.max_attempts:
        return Plan(chain_attempt, step, attempt + 1, current.retry_delay_seconds)
    if spec.on_failure == "restart" and chain_attempt < spec.max_chain_attempts:
        return Plan(chain_attempt + 1, 0, 1)
    return Plan(chain_attempt)


def register_chain_orchestrator(broker: AsyncBroker) -> None:
    """Register the orchestrator task on ``broker`` (done by ``SchedulerApp``; idempotent).

    Call it in a worker that does not build a ``SchedulerApp``.
    """
    if CHAIN_TASK_NAME not in broker.local_task_registry:
        broker.register_task(chain_orchestrator, task_name=CHAIN_TASK_NAME)


@dataclasses.dataclass(frozen=True)
class ChainOutcome:
    """A chain run that succeeded: its run, with its step attempts (``run.steps``)."""

    run: SchedulerRun

    @property
    def steps(self) -> list[SchedulerChainStep]:
        """Every step attempt, in the order they were recorded (empty without the lifecycle)."""
        return list(self.run.steps)

    @property
    def result(self) -> Any:
        """What the last step returned (``None`` when it was not kept: see
        ``RESULT_MAX_LENGTH``, or without the lifecycle)."""
        done = [step for step in self.run.steps if step.status is StepStatus.SUCCEEDED]
        return decode_json(done[-1].result) if done else None


_FINAL = (RunStatus.SUCCEEDED, RunStatus.ABORTED)


@dataclasses.dataclass
class ChainHandle:
    """A chain started with ``scheduler_app.chain(...).start()``: its job, run and task id.

    ``await handle.wait()`` returns its :class:`ChainOutcome` once it succeeded and raises
    :class:`ChainAbortedError` (with the failing step and its error) once it gave up, reading
    the run every ``poll_seconds`` (the chain's ``wait_poll_interval_seconds``).
    """

    job_id: str
    run_id: int
    task_id: str
    poll_seconds: float
    read_run: Callable[[int], Awaitable[SchedulerRun | None]]
    """Reads the run (with its steps) in a session of its own."""
    result_backend: Any = None
    """Without the run lifecycle: where the orchestrator stores the chain's outcome."""

    async def wait(self, timeout: float | None = None) -> ChainOutcome:
        """Wait for the chain's end (at most ``timeout`` seconds: ``TimeoutError``).

        :raises ChainAbortedError: when the chain gave up.
        """
        return await asyncio.wait_for(self._wait(timeout), timeout)

    async def _wait(self, timeout: float | None) -> ChainOutcome:
        if self.result_backend is not None:
            result = await AsyncTaskiqTask(self.task_id, self.result_backend).wait_result(
                check_interval=self.poll_seconds, timeout=-1.0 if timeout is None else timeout
            )
            if result.is_err:
                error = result.error
                if isinstance(error, ChainAbortedError):
                    raise error
                raise ChainAbortedError(f"chain {self.task_id} failed: {error}")
        while True:
            run = await self.read_run(self.run_id)
            if run is None:
                raise ChainAbortedError(
                    f"chain run {self.run_id} is gone (its job was deleted)", run_id=self.run_id
                )
            if self.result_backend is not None or run.status is RunStatus.SUCCEEDED:
                return ChainOutcome(run)
            if run.status in _FINAL or (
                run.status is RunStatus.FAILED and run.finished_at is not None
            ):
                raise aborted_error(run)
            await asyncio.sleep(self.poll_seconds)


def aborted_error(run: SchedulerRun) -> ChainAbortedError:
    """The :class:`ChainAbortedError` of a chain run that gave up, from its rows."""
    failed = [step for step in run.steps if step.status is not StepStatus.SUCCEEDED]
    last = failed[-1] if failed else None
    return ChainAbortedError(
        f"chain {run.task_id} aborted: {run.error}",
        step=None if last is None else last.step,
        task_name=None if last is None else last.task_name,
        error=run.error if last is None else last.error,
        run_id=run.id,
    )
