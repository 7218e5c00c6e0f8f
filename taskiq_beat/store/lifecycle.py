"""What the workers write of the runs they execute, and the scheduler's housekeeping of it.

Every write here is a batch: a worker gathers the starts and finishes of its concurrent
executions and sends each kind in one statement (plus one for the jobs' counters).

The executed-once contract:

- :meth:`LifecycleOperations.start_runs` moves a run to ``running`` by compare-and-set, and
  only from a state in which nobody executes it: ``claimed`` or ``dispatched`` (the first
  delivery), ``failed`` without ``finished_at`` (a ``kiq`` that counted as failed though the
  message got through), or ``lost`` once (a redelivery after its worker died). A second
  delivery of the same fire finds it ``running`` or finished, and is not executed. A retry
  by Taskiq's retry middleware (a higher ``_retries`` label) may start a run whose earlier
  attempt failed.
- :meth:`LifecycleOperations.finish_runs` writes an outcome only onto the execution that
  produced it (the run is still ``running`` with that execution number and retry count), so
  a late outcome never overwrites a newer attempt, and counts it on the job once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

from taskiq_beat.enums import JobSource, JobStrategy, RunStatus
from taskiq_beat.models import (
    SchedulerChain,
    SchedulerChainStep,
    SchedulerJobStats,
    SchedulerWorker,
)
from taskiq_beat.store._base import StoreCore, _time_limited
from taskiq_beat.store._common import _dialect_name, _job, _returns_rows, _run, _upsert
from taskiq_beat.store.dialects import batch_sql

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["Finish", "HealthCounts", "LifecycleOperations", "RunStart"]

_worker = cast("sa.Table", SchedulerWorker.__table__)
_stats = cast("sa.Table", SchedulerJobStats.__table__)
_chain = cast("sa.Table", SchedulerChain.__table__)
_chain_step = cast("sa.Table", SchedulerChainStep.__table__)
_CHUNK = 500  # rows per statement: ~10 parameters a row, within every server's limit


@dataclasses.dataclass(frozen=True, slots=True)
class RunStart:
    """A delivery of a fire that a worker is about to execute: the run id and job id from its
    labels, and its Taskiq retry count (0 for the first attempt)."""

    run_id: int
    job_id: str
    retries: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Finish:
    """The outcome of one execution, for the run it started (``executions``, ``retries``)."""

    run_id: int
    job_id: str
    executions: int
    retries: int
    status: RunStatus
    finished_at: datetime
    duration_seconds: float
    error_type: str | None = None
    error: str | None = None


class LifecycleOperations(StoreCore):
    """Run lifecycle: worker-side starts and finishes, worker heartbeats, lost runs, retention."""

    # ------------------------------------------------------------------ worker side

    @_time_limited
    async def start_runs(
        self, starts: Sequence[RunStart], *, worker_id: str, now: datetime
    ) -> dict[int, tuple[int, RunStatus | None]]:
        """Move the runs of ``starts`` to ``running`` where nobody executes them.

        Returns, by run id, ``(executions, None)`` for each run this worker may execute now
        (its execution number), and ``(0, status)`` for each run that exists but is not
        startable (executed or being executed: the delivery is a duplicate). A run id not in
        the answer has no row with that job id (a hand-edited label, a deleted job).
        """
        answer: dict[int, tuple[int, RunStatus | None]] = {}
        if not starts:
            return answer
        first = list({(s.run_id, s.job_id): None for s in starts if s.retries <= 0})
        again = [start for start in starts if start.retries > 0]
        async with self._transaction() as session:
            batch = batch_sql(session)
            for at in range(0, len(first), _CHUNK):
                for run_id, executions in await batch.start_runs(
                    session, first[at : at + _CHUNK], worker_id=worker_id, now=now
                ):
                    answer[run_id] = (executions, None)
            for start in again:
                restarted = await batch.restart_run(
                    session,
                    start.run_id,
                    start.job_id,
                    retries=start.retries,
                    worker_id=worker_id,
                    now=now,
                )
                if restarted is not None:
                    answer[restarted[0]] = (restarted[1], None)
            refused = [start for start in starts if start.run_id not in answer]
            for at in range(0, len(refused), _CHUNK):
                chunk = refused[at : at + _CHUNK]
                rows = await session.execute(
                    sa.select(_run.c.id, _run.c.status).where(
                        sa.tuple_(_run.c.id, _run.c.job_id).in_(
                            [(start.run_id, start.job_id) for start in chunk]
                        )
                    )
                )
                for run_id, status in rows:
                    answer[run_id] = (0, RunStatus(status))
        return answer

    @_time_limited
    async def finish_runs(self, finishes: Sequence[Finish]) -> set[int]:
        """Write each outcome onto the execution that produced it, and count it on its job.
        Returns the run ids written (an outcome whose run moved on is dropped)."""
        written: set[int] = set()
        if not finishes:
            return written
        async with self._transaction() as session:
            for at in range(0, len(finishes), _CHUNK):
                chunk = finishes[at : at + _CHUNK]
                done = await _write_outcomes(session, chunk)
                written.update(run_id for run_id, *_ in done)
                await _count_on_jobs(
                    session, [(job, status, at, took) for _, job, status, at, took in done]
                )
        return written

    @_time_limited
    async def register_worker(
        self, worker_id: str, *, hostname: str, pid: int, now: datetime
    ) -> None:
        """Announce a worker (or renew it, if it is known already)."""
        async with self._transaction() as session:
            await session.execute(
                _upsert(
                    _dialect_name(session),
                    _worker,
                    lambda _: {"last_seen_at": now, "stopped_at": None},
                    {
                        "id": worker_id,
                        "hostname": hostname,
                        "pid": pid,
                        "started_at": now,
                        "last_seen_at": now,
                        "stopped_at": None,
                    },
                )
            )

    @_time_limited
    async def renew_worker(self, worker_id: str, *, now: datetime) -> bool:
        """Renew the worker's heartbeat; ``False`` if it has no row (register it again)."""
        async with self._transaction() as session:
            result = await session.execute(
                sa.update(_worker)
                .where(_worker.c.id == worker_id)
                .values(last_seen_at=now, stopped_at=None)
            )
        return bool(getattr(result, "rowcount", 0))

    @_time_limited
    async def stop_worker(self, worker_id: str, *, now: datetime, reason: str) -> int:
        """A worker that stops: runs it still has ``running`` become ``lost`` with ``reason``
        (they did not finish here), and the worker is marked stopped. Returns how many."""
        async with self._transaction() as session:
            lost = await _lose_runs(session, [worker_id], now=now, reason=reason)
            await session.execute(
                sa.update(_worker).where(_worker.c.id == worker_id).values(stopped_at=now)
            )
        return len(lost)

    # ------------------------------------------------------------------ scheduler side

    @_time_limited
    async def lose_runs_of_silent_workers(
        self, *, now: datetime, silent_since: datetime, limit: int = 100
    ) -> dict[str, list[tuple[int, str, str]]]:
        """Mark the ``running`` runs of workers not seen since ``silent_since`` as ``lost``
        (with the reason), and those workers stopped. Returns, per worker, the runs lost
        (run id, job id, reason)."""
        lost: dict[str, list[tuple[int, str, str]]] = {}
        async with self._transaction() as session:
            silent = list(
                await session.execute(
                    sa.select(_worker.c.id, _worker.c.last_seen_at)
                    .where(_worker.c.stopped_at.is_(None), _worker.c.last_seen_at < silent_since)
                    .order_by(_worker.c.last_seen_at)
                    .limit(limit)
                )
            )
            for worker_id, last_seen_at in silent:
                reason = (
                    f"worker {worker_id} stopped renewing its heartbeat"
                    f" (last seen {last_seen_at.isoformat()})"
                )
                lost[worker_id] = [
                    (run_id, job_id, reason)
                    for run_id, job_id in await _lose_runs(
                        session, [worker_id], now=now, reason=reason
                    )
                ]
            if silent:
                await session.execute(
                    sa.update(_worker)
                    .where(_worker.c.id.in_([worker_id for worker_id, _ in silent]))
                    .values(stopped_at=now)
                )
        return lost

    @_time_limited
    async def purge_history(self, *, before: datetime, limit: int) -> tuple[int, int]:
        """Delete up to ``limit`` finished runs scheduled before ``before``, and up to
        ``limit`` one-off jobs that fired for the last time before it (with their runs;
        not those declared in code).
        Returns ``(runs, jobs)`` deleted; call again while either is ``limit``."""
        async with self._transaction() as session:
            old_runs = (
                sa.select(_run.c.id)
                .where(
                    _run.c.scheduled_for < before,
                    _run.c.next_attempt_at.is_(None),
                    _run.c.status.not_in([RunStatus.CLAIMED, RunStatus.RUNNING]),
                )
                .limit(limit)
            )
            ids = list((await session.execute(old_runs)).scalars())
            if ids:
                # Chains' rows first: SQLite cascades only where foreign keys are on.
                await _delete_chains(session, _run.c.id.in_(ids))
                await session.execute(sa.delete(_run).where(_run.c.id.in_(ids)))
            done_jobs = (
                sa.select(_job.c.id)
                .where(
                    _job.c.strategy.in_([JobStrategy.ONE_OFF, JobStrategy.IMMEDIATE]),
                    _job.c.next_run_at.is_(None),
                    _job.c.last_run_at < before,
                    # A one-off declared in code stays: deleted, the next start would
                    # declare it anew and it would fire again.
                    _job.c.source == JobSource.API,
                )
                .limit(limit)
            )
            job_ids = list((await session.execute(done_jobs)).scalars())
            if job_ids:
                # Their runs first: SQLite cascades only where foreign keys are on.
                await _delete_chains(
                    session,
                    sa.and_(
                        _run.c.job_id.in_(job_ids),
                        _run.c.status.not_in([RunStatus.CLAIMED, RunStatus.RUNNING]),
                    ),
                )
                await session.execute(
                    sa.delete(_run).where(
                        _run.c.job_id.in_(job_ids),
                        _run.c.status.not_in([RunStatus.CLAIMED, RunStatus.RUNNING]),
                    )
                )
                await session.execute(
                    sa.delete(_job).where(
                        _job.c.id.in_(job_ids),
                        ~sa.exists().where(_run.c.job_id == _job.c.id),
                    )
                )
        return len(ids), len(job_ids)

    @_time_limited
    async def health_counts(
        self, *, seen_since: datetime, runs_since: datetime, overdue_before: datetime
    ) -> HealthCounts:
        """Workers alive, outcomes of the runs scheduled since ``runs_since``, and the enabled
        jobs still due before ``overdue_before``: index range scans, no table scan."""
        async with self._reading() as session:
            workers = await session.execute(
                sa.select(sa.func.count()).where(
                    _worker.c.stopped_at.is_(None), _worker.c.last_seen_at >= seen_since
                )
            )
            outcomes: dict[RunStatus, int] = dict(
                list(
                    await session.execute(
                        sa.select(_run.c.status, sa.func.count())
                        .where(
                            _run.c.scheduled_for >= runs_since,
                            _run.c.status.in_(
                                [
                                    RunStatus.SUCCEEDED,
                                    RunStatus.FAILED,
                                    RunStatus.LOST,
                                    RunStatus.ABORTED,
                                ]
                            ),
                            _run.c.finished_at.is_not(None),
                        )
                        .group_by(_run.c.status)
                    )
                )
            )
            overdue, oldest = (
                await session.execute(
                    sa.select(sa.func.count(), sa.func.min(_job.c.next_run_at)).where(
                        _job.c.is_enabled.is_(True), _job.c.next_run_at < overdue_before
                    )
                )
            ).one()
        succeeded = outcomes.get(RunStatus.SUCCEEDED, 0)
        failed = sum(
            outcomes.get(status, 0)
            for status in (RunStatus.FAILED, RunStatus.LOST, RunStatus.ABORTED)
        )
        return HealthCounts(int(workers.scalar_one()), succeeded, failed, int(overdue), oldest)


async def _delete_chains(session: AsyncSession | Any, runs: sa.ColumnElement[bool]) -> None:
    """Delete the chain rows of the runs that match ``runs``."""
    chosen = sa.select(_run.c.id).where(runs).scalar_subquery()
    await session.execute(sa.delete(_chain_step).where(_chain_step.c.run_id.in_(chosen)))
    await session.execute(sa.delete(_chain).where(_chain.c.run_id.in_(chosen)))


async def _write_outcomes(
    session: AsyncSession | Any, finishes: Sequence[Finish]
) -> list[tuple[int, str, RunStatus, datetime, float]]:
    """One UPDATE for the batch (the dialect's, see ``write_outcomes``); returns the run id,
    job, status, finish time and duration of each run written."""
    by_id = {finish.run_id: finish for finish in finishes}
    written = await batch_sql(session).write_outcomes(
        session,
        [
            (
                f.run_id,
                f.executions,
                f.retries,
                f.status.value,
                f.finished_at,
                f.duration_seconds,
                f.error_type,
                f.error,
            )
            for f in finishes
        ],
    )
    return [
        (
            run_id,
            job_id,
            by_id[run_id].status,
            by_id[run_id].finished_at,
            by_id[run_id].duration_seconds,
        )
        for run_id, job_id in written
    ]


async def _lose_runs(
    session: AsyncSession | Any, worker_ids: list[str], *, now: datetime, reason: str
) -> list[tuple[int, str]]:
    """``running`` runs of ``worker_ids`` become ``lost`` (counted on their jobs as failures);
    returns their run and job ids."""
    running = (_run.c.worker_id.in_(worker_ids), _run.c.status == RunStatus.RUNNING)
    lost = sa.update(_run).values(
        status=RunStatus.LOST,
        finished_at=now,
        updated_at=now,
        error_type="WorkerLost",
        error=reason,
    )
    if _returns_rows(_dialect_name(session)):
        rows = list(await session.execute(lost.where(*running).returning(_run.c.id, _run.c.job_id)))
    else:  # the runs locked first, then changed: the same rows
        rows = list(
            await session.execute(
                sa.select(_run.c.id, _run.c.job_id)
                .where(*running)
                .order_by(_run.c.id)
                .with_for_update()
            )
        )
        if rows:
            await session.execute(lost.where(_run.c.id.in_([run_id for run_id, _ in rows])))
    await _count_on_jobs(session, [(job_id, RunStatus.LOST, now, None) for _, job_id in rows])
    return [(run_id, job_id) for run_id, job_id in rows]


async def _count_on_jobs(
    session: AsyncSession | Any,
    outcomes: Sequence[tuple[str, RunStatus, datetime, float | None]],
) -> None:
    """Add ``outcomes`` (job id, status, finish time, duration) to their jobs' counters in
    ``scheduler_job_stats``: one upsert for the batch, a row per job, in job id order (two
    workers' batches never wait on each other in a cycle). The job's own row is not
    touched: a scheduler's claim never finds it locked by a worker counting."""
    if not outcomes:
        return
    per_job: dict[str, dict[str, Any]] = {}
    for job_id, status, finished_at, duration in sorted(outcomes, key=lambda o: o[2]):
        row = per_job.setdefault(
            job_id,
            {
                "job_id": job_id,
                "run_count": 0,
                "success_count": 0,
                "failure_count": 0,
                "last_success_at": None,
                "last_failure_at": None,
                "last_duration_seconds": None,
            },
        )
        row["run_count"] += 1
        if status is RunStatus.SUCCEEDED:
            row["success_count"] += 1
            row["last_success_at"] = finished_at
        else:
            row["failure_count"] += 1
            row["last_failure_at"] = finished_at
        if duration is not None:
            row["last_duration_seconds"] = duration
    # Jobs deleted meanwhile are left out by the statement (a join on the jobs).
    await batch_sql(session).count_outcomes(
        session,
        [
            (
                job_id,
                row["run_count"],
                row["success_count"],
                row["failure_count"],
                row["last_success_at"],
                row["last_failure_at"],
                row["last_duration_seconds"],
            )
            for job_id, row in sorted(per_job.items())
        ],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class HealthCounts:
    """What the database says of the schedule's health (see ``SchedulerHealthSnapshot``)."""

    workers_alive: int
    runs_succeeded: int
    runs_failed: int
    overdue_jobs: int
    oldest_overdue_at: datetime | None
