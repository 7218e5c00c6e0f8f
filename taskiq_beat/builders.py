"""Job builders: ``scheduler_app.single(...)`` and ``scheduler_app.chain(...)``.

A builder checks what the job will send (task, JSON arguments) when it is made, and stores
the job with ``.schedule()`` (always a new job) or ``.upsert()`` (create or update by id).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from taskiq_beat.chain import CHAIN_TASK_NAME, ChainSpec, ChainStep, OnFailure, ResolvedStep
from taskiq_beat.enums import JobKind
from taskiq_beat.exceptions import InvalidJobError, UnknownTaskError
from taskiq_beat.models import TASK_NAME_MAX_LENGTH
from taskiq_beat.policy import CATCH_UP_LIMIT, CatchUp, JobPolicy, Overlap, check_policy

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from taskiq import AsyncBroker

    from taskiq_beat.chain import ChainHandle, ChainOutcome
    from taskiq_beat.models import SchedulerJob
    from taskiq_beat.triggers import TriggerInput

__all__ = [
    "ChainJobBuilder",
    "ChainScheduleBuilder",
    "JobDefinition",
    "JobSpec",
    "SingleJobBuilder",
    "SingleScheduleBuilder",
]


@dataclass(frozen=True)
class JobSpec:
    """What a job sends when it fires, checked."""

    task_name: str
    kind: JobKind
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    policy: JobPolicy | None = None
    """The job's policy; ``None`` for the defaults."""


@dataclass(frozen=True)
class JobDefinition:
    """A job to upsert in bulk with ``SchedulerApp.upsert_many()``: ``.upsert()``'s arguments,
    kept for later. Made by ``builder.definition(...)``."""

    spec: JobSpec
    trigger: TriggerInput
    job_id: str
    name: str | None = None
    description: str | None = None
    is_enabled: bool = True


class JobWriter(Protocol):
    """What builders need from the app: storing a job spec under a trigger."""

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
    ) -> SchedulerJob: ...

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
    ) -> SchedulerJob: ...


_B = TypeVar("_B", bound="_Builder")


class _Builder:
    def __init__(self, writer: JobWriter, spec: JobSpec) -> None:
        self._writer = writer
        self.spec = spec

    def policy(
        self: _B,
        *,
        misfire_grace_seconds: float | timedelta | None = None,
        catch_up: CatchUp = "latest",
        catch_up_limit: int = CATCH_UP_LIMIT,
        overlap: Overlap = "allow",
        max_running: int | None = None,
        jitter_seconds: float | timedelta = 0.0,
    ) -> _B:
        """The same job with this policy (see :mod:`taskiq_beat.policy`); fields left out
        keep their defaults. Stored by ``.schedule()`` / ``.upsert()`` with the job; an upsert
        that changes only the policy keeps the job's next run.

        :raises InvalidJobError: naming the field and the value that are wrong.
        """
        checked = check_policy(
            misfire_grace_seconds=misfire_grace_seconds,
            catch_up=catch_up,
            catch_up_limit=catch_up_limit,
            overlap=overlap,
            max_running=max_running,
            jitter_seconds=jitter_seconds,
        )
        policy = None if checked.is_default else checked
        return type(self)(self._writer, replace(self.spec, policy=policy))

    async def schedule(
        self,
        session: AsyncSession,
        trigger: TriggerInput | None = None,
        *,
        job_id: str | None = None,
        name: str | None = None,
        description: str | None = None,
        is_enabled: bool = True,
    ) -> SchedulerJob:
        """Store a new job and return its row. Without a trigger the task is sent at once.

        ``trigger`` also takes a cron string (``"0 9 * * mon-fri"``) or a ``timedelta``.

        :raises InvalidJobError: on bad input (nothing is stored), including an existing
            ``job_id`` (use :meth:`upsert` to update a job).
        """
        return await self._writer.schedule_spec(
            self.spec,
            session,
            trigger,
            job_id=job_id,
            name=name,
            description=description,
            is_enabled=is_enabled,
        )

    async def upsert(
        self,
        session: AsyncSession,
        *,
        trigger: TriggerInput,
        job_id: str,
        name: str | None = None,
        description: str | None = None,
        is_enabled: bool = True,
    ) -> SchedulerJob:
        """Create the job ``job_id`` or update it in place; return its row.

        ``next_run_at`` is kept when the trigger, the task and the enabled state did not
        change, and recalculated when any of them did.

        :raises InvalidJobError: on bad input, including ``ImmediateDispatch`` (nothing is stored).
        """
        return await self._writer.upsert_spec(
            self.spec,
            session,
            trigger=trigger,
            job_id=job_id,
            name=name,
            description=description,
            is_enabled=is_enabled,
        )

    def definition(
        self,
        *,
        trigger: TriggerInput,
        job_id: str,
        name: str | None = None,
        description: str | None = None,
        is_enabled: bool = True,
    ) -> JobDefinition:
        """The job as a value for ``SchedulerApp.upsert_many()`` (checked when upserted)."""
        return JobDefinition(self.spec, trigger, job_id, name, description, is_enabled)


class SingleJobBuilder(_Builder):
    """Builds a job that sends one task."""


class ChainStarter(Protocol):
    """What a chain builder needs from the app to start a chain now."""

    async def start_chain_spec(
        self,
        spec: JobSpec,
        session: AsyncSession | None,
        *,
        job_id: str | None,
        name: str | None,
        description: str | None,
    ) -> ChainHandle: ...


class ChainJobBuilder(_Builder):
    """Builds a job that runs steps in order through the chain orchestrator."""

    async def start(
        self,
        session: AsyncSession | None = None,
        *,
        job_id: str | None = None,
        name: str | None = None,
        description: str | None = None,
    ) -> ChainHandle:
        """Start the chain now, without a schedule: a job with one fire (as ``.schedule()``
        without a trigger), whose handle can be awaited (``await handle.wait()``).

        ``session`` defaults to a session of the app's own.

        :raises InvalidJobError: on bad input (nothing is stored), a ``job_id`` taken included.
        """
        starter: ChainStarter = self._writer  # type: ignore[assignment]
        return await starter.start_chain_spec(
            self.spec, session, job_id=job_id, name=name, description=description
        )

    async def run(
        self,
        session: AsyncSession | None = None,
        *,
        job_id: str | None = None,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
    ) -> ChainOutcome:
        """Start the chain now (see :meth:`start`) and wait for its end (at most ``timeout``
        seconds: ``TimeoutError``, the chain goes on).

        :raises ChainAbortedError: when it gave up, naming the failing step and its error.
        """
        handle = await self.start(session, job_id=job_id, name=name, description=description)
        return await handle.wait(timeout)


SingleScheduleBuilder = SingleJobBuilder
"""taskiq-beat 1.4's name of :class:`SingleJobBuilder` (what ``single()`` returns)."""
ChainScheduleBuilder = ChainJobBuilder
"""taskiq-beat 1.4's name of :class:`ChainJobBuilder` (what ``chain()`` returns)."""


def task_name_of(broker: AsyncBroker, task: Any, field_name: str = "task") -> str:
    """Return the registered name of ``task`` (a Taskiq task or a name) on ``broker``.

    :raises UnknownTaskError: if the broker has no such task.
    """
    name = getattr(task, "task_name", task)
    if not isinstance(name, str) or not name:
        raise InvalidJobError(field_name, task, "expected a Taskiq task or its registered name")
    if len(name) > TASK_NAME_MAX_LENGTH:
        raise InvalidJobError(
            field_name, name, f"longer than {TASK_NAME_MAX_LENGTH} characters ({len(name)})"
        )
    if broker.find_task(name) is None:
        raise UnknownTaskError(name, field_name)
    return name


def json_value(field_name: str, value: Any, expected: type) -> Any:
    """Check that ``value`` is a JSON ``expected`` (list or dict) and return a JSON copy."""
    if not isinstance(value, expected):
        kind = "list" if expected is list else "dict"
        raise InvalidJobError(field_name, value, f"expected a JSON-serializable {kind}")
    if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
        raise InvalidJobError(field_name, value, "keys must be strings")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(field_name, value, f"not JSON-serializable: {exc}") from None
    return json.loads(text)


def single_spec(
    broker: AsyncBroker,
    task: Any,
    args: Sequence[Any] | None,
    kwargs: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
) -> JobSpec:
    """Check the arguments of ``single(...)``."""
    return JobSpec(
        task_name=task_name_of(broker, task),
        kind=JobKind.SINGLE,
        args=json_value("args", [] if args is None else _listed(args), list),
        kwargs=json_value("kwargs", kwargs if kwargs is not None else {}, dict),
        metadata=json_value("metadata", metadata if metadata is not None else {}, dict),
    )


def chain_spec(
    broker: AsyncBroker,
    steps: Sequence[ChainStep],
    *,
    on_failure: OnFailure,
    max_chain_attempts: int,
    default_step_max_attempts: int,
    default_step_retry_delay_seconds: float,
    default_step_timeout_seconds: float | None,
    wait_poll_interval_seconds: float,
    metadata: dict[str, Any] | None,
) -> JobSpec:
    """Check the arguments of ``chain(...)`` and resolve every step's defaults."""
    if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps:
        raise InvalidJobError("steps", steps, "expected a non-empty list of ChainStep")
    if on_failure not in ("stop", "restart"):
        raise InvalidJobError("on_failure", on_failure, "expected 'stop' or 'restart'")
    _at_least("max_chain_attempts", max_chain_attempts, 1)
    _at_least("default_step_max_attempts", default_step_max_attempts, 1)
    _non_negative("default_step_retry_delay_seconds", default_step_retry_delay_seconds)
    if default_step_timeout_seconds is not None:
        _positive("default_step_timeout_seconds", default_step_timeout_seconds)
    _positive("wait_poll_interval_seconds", wait_poll_interval_seconds)
    resolved = []
    for index, step in enumerate(steps):
        where = f"steps[{index}]"
        if not isinstance(step, ChainStep):
            raise InvalidJobError(where, step, "expected a ChainStep")
        resolved.append(
            ResolvedStep(
                task_name=task_name_of(broker, step.task_name, f"{where}.task"),
                args=json_value(f"{where}.args", step.args, list),
                kwargs=json_value(f"{where}.kwargs", step.kwargs, dict),
                max_attempts=step.max_attempts or default_step_max_attempts,
                retry_delay_seconds=(
                    step.retry_delay_seconds
                    if step.retry_delay_seconds is not None
                    else default_step_retry_delay_seconds
                ),
                timeout_seconds=(
                    step.timeout_seconds
                    if step.timeout_seconds is not None
                    else default_step_timeout_seconds
                ),
                post_delay_ms=step.post_delay_ms,
                pass_result=step.pass_result,
            )
        )
    if resolved[0].pass_result:
        raise InvalidJobError(
            "steps[0].pass_result", True, "the first step has no previous result to pass"
        )
    chain = ChainSpec(
        steps=resolved,
        on_failure=on_failure,
        max_chain_attempts=max_chain_attempts,
        wait_poll_interval_seconds=wait_poll_interval_seconds,
    )
    return JobSpec(
        task_name=CHAIN_TASK_NAME,
        kind=JobKind.CHAIN,
        kwargs={"chain": chain.model_dump(mode="json")},
        metadata=json_value("metadata", metadata if metadata is not None else {}, dict),
    )


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _number(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidJobError(field_name, value, "expected a finite number")
    return float(value)


def _at_least(field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidJobError(field_name, value, f"expected an integer >= {minimum}")


def _positive(field_name: str, value: Any) -> None:
    if _number(field_name, value) <= 0:
        raise InvalidJobError(field_name, value, "must be greater than zero")


def _non_negative(field_name: str, value: Any) -> None:
    if _number(field_name, value) < 0:
        raise InvalidJobError(field_name, value, "must not be negative")
