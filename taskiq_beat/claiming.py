"""What the claim of a batch of due jobs asks of the store: the jobs as the engine holds
them (:class:`JobSnapshot`), and each fire's plan (:class:`ClaimPlanner`): which fire is
sent, which are missed, what the job's policy asks (limits, jitter).

The engine pops a batch of due jobs from its heap, has it planned here, and hands the
result to ``SchedulerStore.claim`` (or ``claim_with_policies``); what it does with the
claim's outcome (holding the next fires, fires claimed ahead) stays in the engine.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from taskiq_beat.dispatch import task_id_of
from taskiq_beat.enums import JobKind
from taskiq_beat.events import EventHooks, EventKind, SchedulerEvent
from taskiq_beat.exceptions import CorruptJobError
from taskiq_beat.policy import FirePlan, JobPolicy, jitter_of, plan_fire, policy_from_text
from taskiq_beat.store import Claims, FirePolicies, JobRecord
from taskiq_beat.triggers import Trigger, trigger_from_text

if TYPE_CHECKING:
    from taskiq_beat.config import SchedulerConfig
    from taskiq_beat.stats import EngineStats

__all__ = ["ClaimPlanner", "JobSnapshot", "PlannedClaim", "snapshot_of"]


class JobSnapshot(NamedTuple):
    """A job as the engine holds it, as of one revision: its trigger parsed, and what a fire
    sends (the task, and the stored JSON texts of the payload), which the claim's
    compare-and-set on ``revision`` proves current.

    The job's next fire time is not part of it (the engine keeps it beside, see
    ``SchedulerEngine._due``): a fire of a periodic job moves that time and keeps the
    snapshot. A snapshot lives as long as its revision, in the garbage collector's oldest
    generation; one made per fire (10k jobs every second) would be promoted there and die
    every second, and the collector would scan every object of the process each time that
    generation grows by a quarter (~90 ms with 100k jobs loaded, every second or two)."""

    id: str
    kind: JobKind
    trigger: Trigger
    revision: int
    task_name: str
    args: str
    kwargs: str
    metadata: str
    policy: JobPolicy | None = None
    """The job's policy; ``None`` for the defaults (most jobs: their fires take no detour)."""

    def holds(self, record: JobRecord) -> bool:
        """Whether ``record`` (a row read later) is this revision of the job, with the same
        payload (its fire time aside)."""
        return (
            self.revision == record.revision
            and self.args == record.args
            and self.kwargs == record.kwargs
            and self.metadata == record.metadata
            and self.task_name == record.task_name
        )


def snapshot_of(record: JobRecord) -> JobSnapshot | None:
    """The engine's snapshot of a job row; ``None`` when it has no fire to hold (paused,
    or done). Raises :class:`CorruptJobError` for a row it cannot read."""
    if record.next_run_at is None or not record.is_enabled:
        return None
    kind = record.kind
    if not isinstance(kind, JobKind):
        raise CorruptJobError(record.id, f"unknown kind {kind!r}")
    trigger = trigger_from_text(record.trigger, job_id=record.id)
    return JobSnapshot(
        record.id,
        kind,
        trigger,
        record.revision,
        record.task_name,
        record.args,
        record.kwargs,
        record.metadata,
        policy_from_text(record.policy, job_id=record.id),
    )


class PlannedClaim(NamedTuple):
    """A batch's claim as planned: the rows to compare-and-set, what the jobs' policies
    ask of it, and each job's next fire time after this one (in the batch's order)."""

    claims: Claims
    policies: FirePolicies
    following: list[datetime | None]


class ClaimPlanner:
    """Plans the claims of batches of due jobs with the scheduler's misfire grace; counts
    the fires it finds missed and tells the event hooks of them."""

    def __init__(self, config: SchedulerConfig, stats: EngineStats, events: EventHooks) -> None:
        self._grace = timedelta(seconds=config.misfire_grace_seconds)
        self._record_runs = config.record_runs
        self._stats = stats
        self._events = events

    def plan(
        self, batch: list[JobSnapshot], held_for: list[datetime], now: datetime
    ) -> PlannedClaim:
        """The claim of ``batch`` at ``now``, each job due since the time at the same index
        of ``held_for``."""
        claims = Claims()
        add = claims.add
        following: list[datetime | None] = []
        times: dict[datetime, str] = {}  # ISO text of each fire time, once per batch
        # The plan of each trigger, policy and time, once per batch: jobs that share a
        # schedule (triggers are shared objects, see trigger_from_text) are due at the same
        # times, and most have no policy.
        plans: dict[tuple[int, int, datetime], FirePlan] = {}
        policies = FirePolicies()
        for snapshot, expected in zip(batch, held_for, strict=True):
            policy = snapshot.policy
            key = (id(snapshot.trigger), id(policy), expected)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = self._plan_fire(snapshot.trigger, policy, expected, now)
            send = plan.send
            scheduled_for = expected if send is None else send
            following.append(plan.after)
            iso = times.get(scheduled_for)
            if iso is None:
                iso = times[scheduled_for] = scheduled_for.isoformat()
            if plan.missed_from is not None:
                self._missed(snapshot, plan, policies)
            if policy is not None:
                limit = policy.running_limit
                if limit is not None:
                    policies.limits[snapshot.id] = (limit, policy.overlap == "buffer_one")
                if policy.jitter_seconds and send is not None:
                    delay = jitter_of(snapshot.id, scheduled_for, policy.jitter_seconds)
                    policies.jitter[snapshot.id] = (delay, scheduled_for + timedelta(seconds=delay))
            add(
                snapshot.id,  # job_id
                expected,  # expected_next_run_at
                snapshot.revision,  # expected_revision
                scheduled_for,
                plan.after,  # new_next_run_at
                task_id_of(snapshot.id, iso),
                snapshot.task_name,
                snapshot.args,
                snapshot.kwargs,
                snapshot.metadata,
            )
        return PlannedClaim(claims, policies, following)

    def _plan_fire(
        self, trigger: Trigger, policy: JobPolicy | None, expected: datetime, now: datetime
    ) -> FirePlan:
        """What to send at ``now`` of a job due since ``expected`` (see ``plan_fire``)."""
        if policy is None:
            return plan_fire(trigger, expected, now, self._grace)
        grace = (
            self._grace
            if policy.misfire_grace_seconds is None
            else timedelta(seconds=policy.misfire_grace_seconds)
        )
        return plan_fire(trigger, expected, now, grace, policy.catch_up, policy.catch_up_limit)

    def _missed(self, snapshot: JobSnapshot, plan: FirePlan, policies: FirePolicies) -> None:
        """Note the fires a plan skips: a ``missed`` run for the stretch (the claimed run
        itself where nothing is sent), and a ``FIRE_MISSED`` event."""
        first = plan.missed_from
        assert first is not None
        if plan.missed_until is None or plan.missed_until == first:
            stretch = f"the fire of {first.isoformat()}"
            if plan.missed_until is None:
                end = plan.send if plan.send is not None else plan.after
                stretch = f"fires from {first.isoformat()}" + (
                    f" until before {end.isoformat()}" if end is not None else ""
                )
        else:
            stretch = f"fires from {first.isoformat()} to {plan.missed_until.isoformat()}"
        self._stats.fires_missed += 1
        policy = snapshot.policy
        mode = "latest" if policy is None else policy.catch_up
        reason = f"{stretch} missed: later than the misfire grace (catch_up={mode!r})"
        if plan.send is None:
            policies.unsent[snapshot.id] = reason
        elif self._record_runs:
            policies.missed.append(
                (snapshot.id, first, task_id_of(snapshot.id, first.isoformat()), reason)
            )
        if self._events.wants(EventKind.FIRE_MISSED):
            self._events.emit(
                SchedulerEvent(
                    EventKind.FIRE_MISSED,
                    snapshot.id,
                    scheduled_for=plan.send if plan.send is not None else first,
                    detail=reason,
                )
            )
