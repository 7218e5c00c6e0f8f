"""Durable chains: a chain run's progress, step attempt by step attempt.

The contract (see :mod:`taskiq_beat.chain_runner` for who calls what):

- :meth:`ChainOperations.start_chain` records a chain (its spec, beside its run) and its first
  step attempt in one transaction, once per run: a second start of the same run records
  nothing. The run is ``running`` from then on, and its ``worker_id`` is cleared: no worker
  holds the chain between its steps, so a worker's death never marks the chain's run
  ``lost``.
- Every step attempt is a ``scheduler_chain_step`` row written *before* its message is sent
  (an outbox): ``due_at`` is when to send it, ``dispatched_at`` when it was sent. A sender
  that may race another one (the worker's delayed send, the scheduler's watchdog) first
  pushes ``due_at`` forward by compare-and-set (:meth:`claim_step_send`,
  :meth:`claim_unsent_steps`): a lease, after which another sender may send it again with the
  same task id.
- :meth:`start_steps` moves a step attempt from ``pending`` to ``running`` by compare-and-set
  on its task id: a second delivery of the message finds it running or finished and is not
  executed.
- :meth:`finish_step` writes an outcome only onto the execution that produced it (still
  ``running``, same ``executions``), and in the same transaction records what follows (the
  next attempt, unique on ``(run_id, chain_attempt, step, attempt)``, or the run's end). A
  late or repeated outcome changes nothing and sends nothing.
- :meth:`time_out_steps` ends the attempts past their ``deadline_at`` as ``timed_out`` the
  same way: a late outcome of such an attempt is then ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from taskiq_beat.enums import RunStatus, StepStatus
from taskiq_beat.models import SchedulerChain, SchedulerChainStep, SchedulerWorker, is_mysql
from taskiq_beat.store._base import StoreCore, _time_limited
from taskiq_beat.store._common import _dialect_name, _insert_for, _returns_rows, _run
from taskiq_beat.store.lifecycle import _count_on_jobs

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

_MYSQL_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY

__all__ = [
    "Advance",
    "ChainEnd",
    "ChainOperations",
    "ChainState",
    "StepDraft",
    "StepMessage",
    "StepOutcome",
]

_chain = cast("sa.Table", SchedulerChain.__table__)
_step = cast("sa.Table", SchedulerChainStep.__table__)
_worker = cast("sa.Table", SchedulerWorker.__table__)
_LIVE = (StepStatus.PENDING, StepStatus.RUNNING)
_CHUNK = 500


@dataclasses.dataclass(frozen=True, slots=True)
class StepDraft:
    """A step attempt to record (and then send at ``due_at``)."""

    chain_attempt: int
    step: int
    attempt: int
    task_name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    due_at: datetime
    deadline_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class StepMessage:
    """A recorded step attempt, with what its message carries (see ``ChainRunner.send``)."""

    step_id: int
    run_id: int
    job_id: str
    scheduled_for: datetime
    parent_task_id: str
    """The task id of the chain's fire (its orchestrator message)."""
    draft: StepDraft


@dataclasses.dataclass(frozen=True, slots=True)
class StepOutcome:
    """How one execution of a step attempt ended (``executions`` ``None``: whichever)."""

    task_id: str
    status: StepStatus
    finished_at: datetime
    executions: int | None = None
    duration_seconds: float | None = None
    result: str | None = None
    """The JSON text of the result, when it is kept (see ``RESULT_MAX_LENGTH``)."""
    error_type: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ChainState:
    """What a chain's policy needs to know when a step attempt ends."""

    run_id: int
    job_id: str
    scheduled_for: datetime
    parent_task_id: str
    spec: dict[str, Any]
    chain_attempt: int
    step: int
    attempt: int
    args: list[Any]
    """What the attempt that ended was sent with (a retry sends the same)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChainEnd:
    """A chain run that is over: ``status`` (``succeeded`` or ``aborted``) and why."""

    status: RunStatus
    chain_attempts: int
    steps: int
    error: str | None = None
    error_type: str | None = None
    failed_step: int | None = None
    failed_task: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Advance:
    """What a finished step attempt led to: a step attempt to send, or the chain's end."""

    run_id: int
    parent_task_id: str
    job_id: str = ""
    send: StepMessage | None = None
    end: ChainEnd | None = None
    outcome: StepOutcome | None = None
    """The outcome as written (the policy may have turned a success into a failure)."""


Decide = Callable[[ChainState, StepOutcome], tuple[StepOutcome, StepDraft | ChainEnd]]
"""The chain's policy: given the state and an outcome, the outcome to write and what follows."""


class ChainOperations(StoreCore):
    """Durable chains: starts, step attempts, outcomes, timeouts and resends."""

    @_time_limited
    async def start_chain(
        self, run_id: int, *, spec: dict[str, Any], first: StepDraft, now: datetime
    ) -> StepMessage | None:
        """Record the chain of run ``run_id`` and its first step attempt; return the attempt
        to send, or ``None`` when the run has no row or its chain was started already."""
        async with self._transaction() as session:
            run = (
                await session.execute(
                    sa.select(_run.c.job_id, _run.c.scheduled_for, _run.c.task_id).where(
                        _run.c.id == run_id
                    )
                )
            ).first()
            if run is None:
                return None
            insert = _insert_for(_dialect_name(session))(_chain).values(
                run_id=run_id, spec=spec, chain_attempt=first.chain_attempt, created_at=now
            )
            if not await _insert_once(session, insert, [_chain.c.run_id]):
                return None
            # Running from now on, whoever started it (a start made while the database was
            # unreachable left it as it was), and held by no worker.
            await session.execute(
                sa.update(_run)
                .where(_run.c.id == run_id, _run.c.finished_at.is_(None))
                .values(
                    status=RunStatus.RUNNING,
                    started_at=sa.func.coalesce(_run.c.started_at, now),
                    executions=sa.func.coalesce(sa.func.nullif(_run.c.executions, 0), 1),
                    next_attempt_at=None,
                    worker_id=None,
                    updated_at=now,
                )
            )
            step_id = await _insert_step(session, run_id, first, now)
        return StepMessage(step_id, run_id, run.job_id, run.scheduled_for, run.task_id, first)

    @_time_limited
    async def start_steps(
        self, task_ids: Sequence[str], *, worker_id: str, now: datetime
    ) -> dict[str, tuple[int, StepStatus | None]]:
        """Move the step attempts ``task_ids`` that are ``pending`` to ``running``.

        Returns, by task id, ``(executions, None)`` when this delivery may execute it, and
        ``(0, status)`` when it runs or ran already (a duplicate). A task id not in the
        answer has no step attempt. The same task id twice starts once.
        """
        answer: dict[str, tuple[int, StepStatus | None]] = {}
        wanted = list(dict.fromkeys(task_ids))
        async with self._transaction() as session:
            for at in range(0, len(wanted), _CHUNK):
                chunk = wanted[at : at + _CHUNK]
                pending = (_step.c.task_id.in_(chunk), _step.c.status == StepStatus.PENDING)
                start = sa.update(_step).values(
                    status=StepStatus.RUNNING,
                    started_at=now,
                    worker_id=worker_id,
                    executions=_step.c.executions + 1,
                    dispatched_at=sa.func.coalesce(_step.c.dispatched_at, now),
                )
                started: Any
                if _returns_rows(_dialect_name(session)):
                    started = await session.execute(
                        start.where(*pending).returning(_step.c.task_id, _step.c.executions)
                    )
                else:  # MySQL: the pending ones locked, then started
                    locked = list(
                        await session.execute(
                            sa.select(_step.c.id, _step.c.task_id, _step.c.executions)
                            .where(*pending)
                            .order_by(_step.c.id)
                            .with_for_update()
                        )
                    )
                    if locked:
                        await session.execute(
                            start.where(_step.c.id.in_([row[0] for row in locked]))
                        )
                    started = [(task_id, executions + 1) for _, task_id, executions in locked]
                for task_id, executions in started:
                    answer[task_id] = (int(executions), None)
                refused = [task_id for task_id in chunk if task_id not in answer]
                if refused:
                    rows = await session.execute(
                        sa.select(_step.c.task_id, _step.c.status).where(
                            _step.c.task_id.in_(refused)
                        )
                    )
                    for task_id, status in rows:
                        answer[task_id] = (0, StepStatus(status))
        return answer

    @_time_limited
    async def finish_step(self, outcome: StepOutcome, *, decide: Decide) -> Advance | None:
        """Write ``outcome`` onto its running execution and record what follows (see the
        module docstring); ``None`` if the attempt is not running that execution.

        With ``outcome.executions`` ``None`` (an execution started while the database was
        unreachable, unchecked) the attempt may also still be ``pending``."""
        statuses = _LIVE if outcome.executions is None else (StepStatus.RUNNING,)
        async with self._transaction() as session:
            return await _finish(session, outcome, statuses, decide)

    @_time_limited
    async def fail_step(self, outcome: StepOutcome, *, decide: Decide) -> Advance | None:
        """End a step attempt that could not be sent (still ``pending``) with ``outcome``."""
        async with self._transaction() as session:
            return await _finish(session, outcome, (StepStatus.PENDING,), decide)

    @_time_limited
    async def mark_steps_sent(self, step_ids: Sequence[int], *, now: datetime) -> None:
        """Record that the messages of these step attempts reached the broker."""
        if not step_ids:
            return
        async with self._transaction() as session:
            await session.execute(
                sa.update(_step)
                .where(_step.c.id.in_(list(step_ids)), _step.c.dispatched_at.is_(None))
                .values(dispatched_at=now)
            )

    @_time_limited
    async def claim_step_send(
        self, step_id: int, *, due_at: datetime, lease_until: datetime
    ) -> bool:
        """Take the send of a step attempt still unsent and due at ``due_at`` (nobody took
        it meanwhile): its ``due_at`` becomes ``lease_until``."""
        async with self._transaction() as session:
            result = await session.execute(
                sa.update(_step)
                .where(
                    _step.c.id == step_id,
                    _step.c.status == StepStatus.PENDING,
                    _step.c.dispatched_at.is_(None),
                    _step.c.due_at == due_at,
                )
                .values(due_at=lease_until)
            )
        return bool(getattr(result, "rowcount", 0))

    @_time_limited
    async def claim_unsent_steps(
        self, *, due_before: datetime, lease_until: datetime, now: datetime, limit: int = 500
    ) -> list[StepMessage]:
        """Take the sends of up to ``limit`` unsent step attempts due before ``due_before``
        (their ``due_at`` becomes ``lease_until``); return them to send."""
        async with self._transaction() as session:
            rows = list(
                await session.execute(
                    _select_messages()
                    .where(
                        _step.c.status == StepStatus.PENDING,
                        _step.c.dispatched_at.is_(None),
                        _step.c.due_at <= due_before,
                    )
                    .order_by(_step.c.due_at)
                    .limit(limit)
                )
            )
            taken: list[StepMessage] = []
            for row in rows:
                claimed = await session.execute(
                    sa.update(_step)
                    .where(
                        _step.c.id == row.id,
                        _step.c.status == StepStatus.PENDING,
                        _step.c.dispatched_at.is_(None),
                        _step.c.due_at == row.due_at,
                    )
                    .values(due_at=lease_until)
                )
                if getattr(claimed, "rowcount", 0):
                    taken.append(_message(row, now))
        return taken

    @_time_limited
    async def time_out_steps(
        self, *, now: datetime, decide: Decide, limit: int = 500
    ) -> list[Advance]:
        """End the step attempts still pending or running past their ``deadline_at`` as
        ``timed_out``, and record what follows each."""
        async with self._transaction() as session:
            late = list(
                await session.execute(
                    sa.select(_step.c.task_id, _step.c.deadline_at, _step.c.started_at)
                    .where(_step.c.status.in_(_LIVE), _step.c.deadline_at <= now)
                    .order_by(_step.c.deadline_at)
                    .limit(limit)
                )
            )
            advances: list[Advance] = []
            for task_id, deadline_at, started_at in late:
                timeout = (deadline_at - started_at).total_seconds() if started_at else None
                outcome = StepOutcome(
                    task_id,
                    StepStatus.TIMED_OUT,
                    now,
                    duration_seconds=timeout,
                    error_type="TimeoutError",
                    error=f"TimeoutError: no outcome by its deadline {deadline_at.isoformat()}",
                )
                advance = await _finish(session, outcome, _LIVE, decide)
                if advance is not None:
                    advances.append(advance)
        return advances

    @_time_limited
    async def resend_steps_of_lost_workers(
        self, *, silent_since: datetime, now: datetime, limit: int = 500
    ) -> int:
        """Step attempts ``running`` on a worker that stopped, or was not seen since
        ``silent_since``, become ``pending`` and unsent (due now): the watchdog sends them
        again with the same task id, and their redelivery may run them. Returns how many."""
        gone = sa.select(_worker.c.id).where(
            sa.or_(_worker.c.stopped_at.is_not(None), _worker.c.last_seen_at < silent_since)
        )
        async with self._transaction() as session:
            ids = list(
                (
                    await session.execute(
                        sa.select(_step.c.id)
                        .where(
                            _step.c.status == StepStatus.RUNNING,
                            _step.c.worker_id.in_(gone.scalar_subquery()),
                        )
                        .limit(limit)
                    )
                ).scalars()
            )
            if ids:
                await session.execute(
                    sa.update(_step)
                    .where(_step.c.id.in_(ids), _step.c.status == StepStatus.RUNNING)
                    .values(
                        status=StepStatus.PENDING,
                        dispatched_at=None,
                        due_at=now,
                        error=sa.literal("worker ")
                        + sa.func.coalesce(_step.c.worker_id, "?")
                        + sa.literal(" was lost while running it; sent again"),
                        worker_id=None,
                    )
                )
        return len(ids)


def _select_messages() -> sa.Select[Any]:
    return sa.select(
        _step.c.id,
        _step.c.run_id,
        _run.c.job_id,
        _run.c.scheduled_for,
        _run.c.task_id.label("parent_task_id"),
        _step.c.chain_attempt,
        _step.c.step,
        _step.c.attempt,
        _step.c.task_name,
        _step.c.task_id,
        _step.c.args,
        _step.c.kwargs,
        _step.c.due_at,
        _step.c.deadline_at,
    ).join(_run, _run.c.id == _step.c.run_id)


def _message(row: Any, now: datetime) -> StepMessage:
    draft = StepDraft(
        row.chain_attempt,
        row.step,
        row.attempt,
        row.task_name,
        row.task_id,
        list(row.args),
        dict(row.kwargs),
        now,
        row.deadline_at,
    )
    return StepMessage(row.id, row.run_id, row.job_id, row.scheduled_for, row.parent_task_id, draft)


async def _insert_step(
    session: AsyncSession | Any, run_id: int, draft: StepDraft, now: datetime
) -> int:
    insert = sa.insert(_step).values(
        run_id=run_id,
        chain_attempt=draft.chain_attempt,
        step=draft.step,
        attempt=draft.attempt,
        task_name=draft.task_name,
        task_id=draft.task_id,
        status=StepStatus.PENDING,
        args=draft.args,
        kwargs=draft.kwargs,
        due_at=draft.due_at,
        deadline_at=draft.deadline_at,
        executions=0,
        created_at=now,
    )
    if not _returns_rows(_dialect_name(session)):  # MySQL: the id the insert generated
        result: Any = await session.execute(insert)
        return int(result.inserted_primary_key[0])
    step_id = (await session.execute(insert.returning(_step.c.id))).scalar_one()
    return int(step_id)


async def _insert_once(session: AsyncSession | Any, insert: Any, key: list[Any]) -> bool:
    """Run ``insert`` unless its row exists (by the unique ``key``); whether it inserted.
    (MySQL: in a savepoint, undone on the duplicate key: its ``ON DUPLICATE KEY`` counts a
    row found as one affected, and cannot tell.)"""
    if is_mysql(_dialect_name(session)):
        try:
            async with session.begin_nested():
                await session.execute(insert)
        except IntegrityError as exc:
            if exc.orig is None or exc.orig.args[:1] != (_MYSQL_DUPLICATE_KEY,):
                raise
            return False
        return True
    inserted = await session.execute(insert.on_conflict_do_nothing(index_elements=key))
    return bool(getattr(inserted, "rowcount", 0))


async def _finish(
    session: AsyncSession | Any,
    outcome: StepOutcome,
    from_statuses: Sequence[StepStatus],
    decide: Decide,
) -> Advance | None:
    """Write ``outcome`` if the attempt is in one of ``from_statuses`` (and runs
    ``outcome.executions``, if given), then record what the policy says follows."""
    row = (
        await session.execute(
            sa.select(
                _step.c.id,
                _step.c.status,
                _step.c.executions,
                _step.c.chain_attempt,
                _step.c.step,
                _step.c.attempt,
                _step.c.args,
                _step.c.run_id,
                _run.c.job_id,
                _run.c.scheduled_for,
                _run.c.task_id,
                _run.c.started_at,
                _chain.c.spec,
            )
            .join(_run, _run.c.id == _step.c.run_id)
            .join(_chain, _chain.c.run_id == _step.c.run_id)
            .where(_step.c.task_id == outcome.task_id)
        )
    ).first()
    if row is None or StepStatus(row.status) not in from_statuses:
        return None
    if outcome.executions is not None and row.executions != outcome.executions:
        return None
    state = ChainState(
        row.run_id,
        row.job_id,
        row.scheduled_for,
        row.task_id,
        row.spec,
        row.chain_attempt,
        row.step,
        row.attempt,
        list(row.args),
    )
    outcome, follows = decide(state, outcome)
    condition = [_step.c.id == row.id, _step.c.status == row.status]
    if outcome.executions is not None:
        condition.append(_step.c.executions == outcome.executions)
    written = await session.execute(
        sa.update(_step)
        .where(*condition)
        .values(
            status=outcome.status,
            finished_at=outcome.finished_at,
            duration_seconds=outcome.duration_seconds,
            result=outcome.result,
            error_type=outcome.error_type,
            error=outcome.error,
        )
    )
    if not getattr(written, "rowcount", 0):
        return None
    if isinstance(follows, StepDraft):
        if follows.chain_attempt != row.chain_attempt:
            await session.execute(
                sa.update(_chain)
                .where(_chain.c.run_id == row.run_id)
                .values(chain_attempt=follows.chain_attempt)
            )
        step_id = await _insert_step(session, row.run_id, follows, outcome.finished_at)
        message = StepMessage(
            step_id, row.run_id, row.job_id, row.scheduled_for, row.task_id, follows
        )
        return Advance(row.run_id, row.task_id, row.job_id, send=message, outcome=outcome)
    duration = (
        (outcome.finished_at - row.started_at).total_seconds()
        if row.started_at is not None
        else None
    )
    ended = await session.execute(
        sa.update(_run)
        .where(_run.c.id == row.run_id, _run.c.status == RunStatus.RUNNING)
        .values(
            status=follows.status,
            finished_at=outcome.finished_at,
            updated_at=outcome.finished_at,
            duration_seconds=duration,
            error=follows.error,
            error_type=follows.error_type,
        )
    )
    if getattr(ended, "rowcount", 0):
        await _count_on_jobs(session, [(row.job_id, follows.status, outcome.finished_at, duration)])
    return Advance(row.run_id, row.task_id, row.job_id, end=follows, outcome=outcome)
