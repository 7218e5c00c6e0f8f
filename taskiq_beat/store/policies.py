"""The SQL of per-job policies (see :mod:`taskiq_beat.policy`): what a claim does with the
fires that its jobs' policies hold back, and the release of waiting fires.

Each runs inside the claim's transaction (or the retries' claim), after the compare-and-set
that made the fires this scheduler's: on PostgreSQL the claim holds the job rows
(``FOR NO KEY UPDATE``) until it commits, so two schedulers never decide the overlap of one
job at once; SQLite has one writer. Batches without a policy never come here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import ACTIVE_RUNS_SQL
from taskiq_beat.policy import JobPolicy
from taskiq_beat.store._common import _dialect_name, _Executor, _insert_unless_there, _job, _run
from taskiq_beat.store.values import FirePolicies, PolicyOutcome

__all__ = ["WAIT_RECHECK", "apply_policies", "limits_of", "release_waiting"]

_GOING = (RunStatus.CLAIMED.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value)
_WAITING = RunStatus.WAITING.value
WAIT_RECHECK = timedelta(seconds=1)
"""How often a waiting fire whose job still has its runs going is looked at again."""


async def apply_policies(
    session: _Executor,
    policies: FirePolicies,
    inserted: dict[str, int],
    *,
    now: datetime,
) -> PolicyOutcome:
    """Apply ``policies`` to the runs a claim just inserted (``inserted``: job id -> run id).

    Missed stretches become ``missed`` rows; a fire its overlap policy holds back becomes
    ``skipped`` or ``waiting``; a jittered fire is left ``claimed`` by nobody, due for the
    retries path at its delayed time. Returns what is not to be sent now."""
    held: set[str] = set()
    unsent = {job_id: reason for job_id, reason in policies.unsent.items() if job_id in inserted}
    if unsent:
        await _finish(session, inserted, unsent, RunStatus.MISSED, now)
        held.update(unsent)
    missed = [row for row in policies.missed if row[0] in inserted]
    if missed:
        await _insert_missed(session, missed, now)
    limited = {
        job_id: limit
        for job_id, limit in policies.limits.items()
        if job_id in inserted and job_id not in held
    }
    if limited:
        skipped, waiting = await _over_limit(session, limited, inserted)
        if skipped:
            await _finish(session, inserted, skipped, RunStatus.SKIPPED, now)
        if waiting:
            await session.execute(
                sa.update(_run)
                .where(_run.c.id.in_([inserted[job_id] for job_id in waiting]))
                .values(
                    status=_WAITING, attempt=0, claimed_by=None, next_attempt_at=now, updated_at=now
                )
            )
        held.update(skipped, waiting)
    jittered = {
        job_id: delay
        for job_id, delay in policies.jitter.items()
        if job_id in inserted and job_id not in held and delay[0] > 0
    }
    delayed_until = {due for _, due in jittered.values()}
    if jittered:
        params = [
            {"run": inserted[job_id], "due": due, "jitter": seconds}
            for job_id, (seconds, due) in jittered.items()
        ]
        await session.execute(
            sa.update(_run)
            .where(_run.c.id == sa.bindparam("run"))
            .values(
                attempt=0,
                claimed_by=None,
                next_attempt_at=sa.bindparam("due"),
                jitter_seconds=sa.bindparam("jitter"),
                updated_at=now,
            ),
            params,
        )
        held.update(jittered)
    return PolicyOutcome(frozenset(held), tuple(sorted(delayed_until)))


async def _finish(
    session: _Executor,
    inserted: dict[str, int],
    reasons: dict[str, str],
    status: RunStatus,
    now: datetime,
) -> None:
    """Close the runs of ``reasons``'s jobs unsent, with ``status`` and the reason."""
    await session.execute(
        sa.update(_run)
        .where(_run.c.id == sa.bindparam("run"))
        .values(
            status=status,
            claimed_by=None,
            next_attempt_at=None,
            finished_at=now,
            error=sa.bindparam("reason"),
            updated_at=now,
        ),
        [{"run": inserted[job_id], "reason": reason} for job_id, reason in reasons.items()],
    )


async def _insert_missed(
    session: _Executor, missed: Sequence[tuple[str, datetime, str, str]], now: datetime
) -> None:
    """One ``missed`` row per stretch; none where that fire has a run already."""
    insert = _insert_unless_there(
        _dialect_name(session), _run, [_run.c.job_id, _run.c.scheduled_for]
    )
    await session.execute(
        insert,
        [
            {
                "job_id": job_id,
                "scheduled_for": first,
                "status": RunStatus.MISSED,
                "task_id": task_id,
                "attempt": 0,
                "error": reason,
                "finished_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for job_id, first, task_id, reason in missed
        ],
    )


async def _counts(
    session: _Executor, job_ids: Iterable[str], leave_out: Iterable[int]
) -> dict[str, dict[str, int]]:
    """Runs going or waiting per job and status (through the partial index of such runs),
    leaving out the runs ``leave_out``."""
    rows = await session.execute(
        sa.select(_run.c.job_id, _run.c.status, sa.func.count())
        .where(
            _run.c.job_id.in_(list(job_ids)),
            sa.text(ACTIVE_RUNS_SQL),  # as written in the index: its condition is proven
            _run.c.id.not_in(list(leave_out)),
        )
        .group_by(_run.c.job_id, _run.c.status)
    )
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for job_id, status, count in rows:
        counts[job_id][getattr(status, "value", status)] = count
    return counts


async def _over_limit(
    session: _Executor, limited: dict[str, tuple[int, bool]], inserted: dict[str, int]
) -> tuple[dict[str, str], set[str]]:
    """Of the new runs of ``limited``'s jobs, those to skip (with the reason) and those to
    keep waiting."""
    counts = await _counts(session, limited, [inserted[job_id] for job_id in limited])
    skipped: dict[str, str] = {}
    waiting: set[str] = set()
    for job_id, (limit, buffer) in limited.items():
        per_status = counts.get(job_id, {})
        going = sum(per_status.get(status, 0) for status in _GOING)
        if going < limit:
            continue
        if buffer and not per_status.get(_WAITING):
            waiting.add(job_id)
        else:
            runs = "run" if going == 1 else "runs"
            skipped[job_id] = f"{going} {runs} of the job still going (max_running={limit})"
    return skipped, waiting


async def release_waiting(
    session: _Executor,
    waiting: Sequence[tuple[int, str]],
    limits: dict[str, int],
    *,
    now: datetime,
) -> set[int]:
    """Of the ``waiting`` runs ``(run id, job id)`` due for a look, the ones whose job has
    fewer runs going than its limit (``limits``; a job that lost its policy has none): they
    may be claimed and sent. The others are looked at again after :data:`WAIT_RECHECK`."""
    job_ids = {job_id for _, job_id in waiting}
    dialect_name = _dialect_name(session)
    if dialect_name != "sqlite":
        # Wait for a claim of the same job under way: it may add a run going.
        await session.execute(
            sa.select(_job.c.id)
            .where(_job.c.id.in_(sorted(job_ids)))
            .order_by(_job.c.id)
            # FOR NO KEY UPDATE, as the claim takes (MySQL: FOR UPDATE, as its claim takes)
            .with_for_update(key_share=dialect_name == "postgresql")
        )
    counts = await _counts(session, job_ids, ())
    free: dict[str, int] = {}
    for job_id in job_ids:
        limit = limits.get(job_id)
        going = sum(counts.get(job_id, {}).get(status, 0) for status in _GOING)
        free[job_id] = (limit - going) if limit is not None else len(waiting)
    released: set[int] = set()
    later: list[int] = []
    for run_id, job_id in waiting:
        if free[job_id] > 0:
            free[job_id] -= 1
            released.add(run_id)
        else:
            later.append(run_id)
    if later:
        await session.execute(
            sa.update(_run)
            .where(_run.c.id.in_(later))
            .values(next_attempt_at=now + WAIT_RECHECK, updated_at=now)
        )
    return released


def limits_of(policies: dict[str, Any]) -> dict[str, int]:
    """Running limits from jobs' stored policies (job id -> stored JSON value)."""
    limits: dict[str, int] = {}
    for job_id, stored in policies.items():
        try:
            limit = JobPolicy.from_json(stored).running_limit
        except ValueError:
            continue
        if limit is not None:
            limits[job_id] = limit
    return limits
