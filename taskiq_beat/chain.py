"""Chains: steps run in order on a worker by the task ``taskiq_beat.chain_orchestrator``.

A chain job sends one message, to the orchestrator, whose kwargs hold the whole chain. The
orchestrator sends each step with ``kiq``, waits for its result with ``wait_result`` (so the
broker needs a result backend), retries a failed step up to its ``max_attempts``, and then
either stops (raising :class:`ChainAbortedError`) or restarts the chain from its first step,
up to ``max_chain_attempts`` runs of the chain.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from taskiq import Context, TaskiqDepends

from taskiq_beat.dispatch import JOB_ID_LABEL, SCHEDULED_FOR_LABEL
from taskiq_beat.exceptions import ChainAbortedError, InvalidJobError

if TYPE_CHECKING:
    from taskiq import AsyncBroker

__all__ = [
    "CHAIN_JOB_ID_LABEL",
    "CHAIN_ORCHESTRATOR_TASK_NAME",
    "CHAIN_SCHEDULED_FOR_LABEL",
    "CHAIN_STEP_LABEL",
    "CHAIN_TASK_ID_LABEL",
    "CHAIN_TASK_NAME",
    "ChainSpec",
    "ChainStep",
    "TaskChain",
    "chain_orchestrator",
    "register_chain_orchestrator",
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
        for index, step in enumerate(spec.steps):
            error = await _run_step(broker, step, spec, trace, chain_attempt, index)
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
    raise ChainAbortedError(f"chain {parent} aborted: {last_error}")


async def _run_step(
    broker: AsyncBroker,
    step: ResolvedStep,
    spec: ChainSpec,
    trace: dict[str, str],
    chain_attempt: int,
    index: int,
) -> str | None:
    """Run one step with its retries; return ``None`` on success or the last error."""
    parent = trace[CHAIN_TASK_ID_LABEL]
    task = broker.find_task(step.task_name)
    if task is None:
        return f"task {step.task_name!r} is not registered on the broker"
    error = ""
    for attempt in range(1, step.max_attempts + 1):
        task_id = uuid.uuid5(uuid.NAMESPACE_OID, f"{parent}:{chain_attempt}:{index}:{attempt}").hex
        try:
            kicker = (
                task.kicker()
                .with_task_id(task_id)
                .with_labels(**trace, **{CHAIN_STEP_LABEL: index})
            )
            handle = await kicker.kiq(*step.args, **step.kwargs)
            result = await handle.wait_result(
                check_interval=spec.wait_poll_interval_seconds,
                timeout=step.timeout_seconds if step.timeout_seconds is not None else -1.0,
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if not result.is_err:
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


def register_chain_orchestrator(broker: AsyncBroker) -> None:
    """Register the orchestrator task on ``broker`` (done by ``SchedulerApp``; idempotent).

    Call it in a worker that does not build a ``SchedulerApp``.
    """
    if CHAIN_TASK_NAME not in broker.local_task_registry:
        broker.register_task(chain_orchestrator, task_name=CHAIN_TASK_NAME)
