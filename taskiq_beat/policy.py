"""Per-job policies: what happens to missed fires, to fires that would overlap a run still
going, and how much random delay (jitter) a fire gets.

A policy is stored on the job row (``scheduler_job.policy``, JSON; ``NULL`` for a job with
the defaults) and set with ``builder.policy(...)``. The scheduler applies it when it claims a
fire (see :mod:`taskiq_beat.engine` and :mod:`taskiq_beat.store.claims`); the fire's
identity (its scheduled time and task id) never depends on it, so exactly-once holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, get_args

from taskiq_beat.exceptions import CorruptJobError, InvalidJobError
from taskiq_beat.triggers import PeriodicSchedule, Trigger, latest_due_fire

__all__ = [
    "CATCH_UP_LIMIT",
    "MAX_BACKFILL",
    "CatchUp",
    "FirePlan",
    "JobPolicy",
    "Overlap",
    "fires_between",
    "jitter_of",
    "plan_fire",
    "policy_from_text",
]

CatchUp = Literal["latest", "all", "none"]
"""What a job does with fires missed for longer than its grace (the scheduler was down,
stalled or far behind): ``"latest"`` sends one fire that stands for all of them (the
default, and what a job without a policy does); ``"all"`` sends each, in order, at most
``catch_up_limit`` of them (the oldest beyond that are missed); ``"none"`` sends none and
waits for the next fire to come."""
Overlap = Literal["allow", "skip", "buffer_one"]
"""What a fire does while runs of the same job are still going (claimed, sent or running):
``"allow"`` (the default) sends it anyway; ``"skip"`` records it ``skipped`` once
``max_running`` runs (default 1) are going; ``"buffer_one"`` keeps one such fire
``waiting`` and sends it when a run ends (further ones are ``skipped``)."""

CATCH_UP_LIMIT = 100
MAX_BACKFILL = 10_000
"""Most fires one ``backfill()`` call queues (a longer range is refused: do it in parts)."""
"""Default of ``catch_up_limit``: most missed fires that ``catch_up="all"`` sends."""
_MAX_CATCH_UP_LIMIT = 100_000
_ONE_MICROSECOND = timedelta(microseconds=1)
_CATCH_UPS: tuple[str, ...] = get_args(CatchUp)
_OVERLAPS: tuple[str, ...] = get_args(Overlap)


@dataclasses.dataclass(frozen=True, slots=True)
class JobPolicy:
    """A job's policy; every field has the default of a job without one.

    Made (and checked) by ``builder.policy(...)``; see :data:`CatchUp` and :data:`Overlap`.
    """

    misfire_grace_seconds: float | None = None
    """How late a fire may be sent as scheduled; ``None``: the scheduler's
    ``SchedulerConfig.misfire_grace_seconds``."""
    catch_up: CatchUp = "latest"
    catch_up_limit: int = CATCH_UP_LIMIT
    overlap: Overlap = "allow"
    max_running: int | None = None
    """Most runs of the job going at once; ``None`` with ``overlap="allow"``: no limit,
    otherwise 1. Given alone, it means ``overlap="skip"``."""
    jitter_seconds: float = 0.0
    """Each fire is sent up to this much later than scheduled, by an amount drawn for the
    fire (the same on every scheduler); it is recorded on the run."""

    @property
    def running_limit(self) -> int | None:
        """How many runs may go at once; ``None`` for no limit."""
        if self.overlap == "allow":
            return None
        return self.max_running or 1

    @property
    def is_default(self) -> bool:
        return self == _DEFAULT

    def to_json(self) -> dict[str, Any] | None:
        """The stored form: the fields that differ from the defaults (``None`` if none do)."""
        values = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default
        }
        return values or None

    @classmethod
    def from_json(cls, value: Any, *, job_id: str | None = None) -> JobPolicy:
        """The policy of a stored form (``None``: the defaults).

        :raises CorruptJobError: if the stored form is not one (with ``job_id``), else
            :class:`InvalidJobError`.
        """
        if value is None:
            return _DEFAULT
        try:
            if not isinstance(value, dict):
                raise InvalidJobError("policy", value, "expected a JSON object")
            return check_policy(**value)
        except (InvalidJobError, TypeError) as exc:
            if job_id is None:
                raise
            raise CorruptJobError(job_id, f"unreadable policy {value!r}: {exc}") from None


_DEFAULT = JobPolicy()


def check_policy(
    *,
    misfire_grace_seconds: Any = None,
    catch_up: Any = "latest",
    catch_up_limit: Any = CATCH_UP_LIMIT,
    overlap: Any = "allow",
    max_running: Any = None,
    jitter_seconds: Any = 0.0,
) -> JobPolicy:
    """A policy from user input, checked field by field.

    :raises InvalidJobError: naming the first field that is wrong, and its value.
    """
    if misfire_grace_seconds is not None:
        misfire_grace_seconds = _seconds("misfire_grace_seconds", misfire_grace_seconds)
    if catch_up not in _CATCH_UPS:
        raise InvalidJobError("catch_up", catch_up, f"expected one of {', '.join(_CATCH_UPS)}")
    if (
        isinstance(catch_up_limit, bool)
        or not isinstance(catch_up_limit, int)
        or not 1 <= catch_up_limit <= _MAX_CATCH_UP_LIMIT
    ):
        raise InvalidJobError(
            "catch_up_limit", catch_up_limit, f"expected an integer from 1 to {_MAX_CATCH_UP_LIMIT}"
        )
    if overlap not in _OVERLAPS:
        raise InvalidJobError("overlap", overlap, f"expected one of {', '.join(_OVERLAPS)}")
    if max_running is not None:
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            raise InvalidJobError("max_running", max_running, "expected an integer >= 1")
        if overlap == "allow":
            overlap = "skip"  # a limit alone: the general form of "skip"
        if max_running == 1:
            max_running = None  # the default limit of "skip" and "buffer_one"
    jitter = _seconds("jitter_seconds", jitter_seconds)
    return JobPolicy(
        misfire_grace_seconds=misfire_grace_seconds,
        catch_up=catch_up,
        catch_up_limit=catch_up_limit,
        overlap=overlap,
        max_running=max_running,
        jitter_seconds=jitter,
    )


def _seconds(field_name: str, value: Any) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidJobError(field_name, value, "expected a finite number of seconds")
    if value < 0:
        raise InvalidJobError(field_name, value, "must not be negative")
    return float(value)


@lru_cache(maxsize=1024)
def _parse(text: str, job_id: str) -> JobPolicy:
    try:
        value = json.loads(text)
    except ValueError:
        raise CorruptJobError(job_id, f"unreadable policy {text[:80]!r}") from None
    return JobPolicy.from_json(value, job_id=job_id)


def policy_from_text(text: str | None, *, job_id: str) -> JobPolicy | None:
    """The policy of a stored JSON text; ``None`` for the defaults (no text, or ``null``).
    Equal texts give one shared object.

    :raises CorruptJobError: if the text is no policy.
    """
    if text is None or text == "null":
        return None
    try:
        policy = _parse(text, "")
    except CorruptJobError as exc:
        raise CorruptJobError(job_id, exc.reason) from None
    return None if policy.is_default else policy


@dataclasses.dataclass(frozen=True, slots=True)
class FirePlan:
    """What to do with a job due since ``expected``, at ``now``.

    ``send``: the fire to send (``None``: none, the job moves on to ``after``);
    ``after``: the job's next fire time; ``missed_from``: the first of the fires skipped
    (``None`` if none was), which history records as one ``missed`` run for the stretch up
    to ``missed_until`` (the last fire skipped, or ``None`` where it is not worth finding)."""

    send: datetime | None
    after: datetime | None
    missed_from: datetime | None = None
    missed_until: datetime | None = None


def plan_fire(
    trigger: Trigger,
    expected: datetime,
    now: datetime,
    grace: timedelta,
    catch_up: CatchUp = "latest",
    limit: int = CATCH_UP_LIMIT,
) -> FirePlan:
    """The fire to send at ``now`` for a job due since ``expected`` (see :data:`CatchUp`).

    A fire at most ``grace`` late is sent as scheduled, whatever the mode: a scheduler
    a little behind catches up fire by fire.
    """
    if now - expected <= grace:
        return FirePlan(expected, trigger.get_next_run_at(expected))
    if catch_up == "all":
        start = _last_fires_start(trigger, expected, now, limit)
        if start == expected:
            return FirePlan(expected, trigger.get_next_run_at(expected))
        return FirePlan(start, trigger.get_next_run_at(start), expected, None)
    # The last fire more than ``grace`` late, and the first one at most that late.
    latest, following = latest_due_fire(trigger, expected, now - grace - _ONE_MICROSECOND)
    if following is not None and following <= now:  # within the grace: sent as scheduled
        return FirePlan(following, trigger.get_next_run_at(following), expected, latest)
    if catch_up == "none":
        return FirePlan(None, following, expected, latest)
    if latest == expected:  # one fire overdue: it stands for itself
        return FirePlan(expected, following)
    return FirePlan(latest, following, expected, _before(trigger, expected, latest))


def _before(trigger: Trigger, first: datetime, send: datetime) -> datetime | None:
    """The fire before ``send`` when it is ``first``'s next (the common case of a stretch of
    one); ``None`` (unknown) otherwise."""
    if send == first:
        return None
    following = trigger.get_next_run_at(first)
    return first if following == send else None


def _fires_from(trigger: Trigger, start: datetime, now: datetime, most: int) -> int:
    """How many fires are at or after ``start`` (itself a fire time or not) and at or before
    ``now``, counting no further than ``most + 1``."""
    count = 0
    when = trigger.get_next_run_at(start - _ONE_MICROSECOND)
    while when is not None and when <= now and count <= most:
        count += 1
        when = trigger.get_next_run_at(when)
    return count


def _last_fires_start(trigger: Trigger, expected: datetime, now: datetime, limit: int) -> datetime:
    """The first of the last ``limit`` fires from ``expected`` (a fire) up to ``now``:
    ``expected`` itself when there are no more than ``limit``. An interval's fires are
    counted; a crontab's (whose next fire after any instant is on its calendar) found by
    bisection on time, each probe counting at most ``limit + 1`` fires."""
    interval = _interval_of(trigger)
    if interval is not None:
        assert isinstance(trigger, PeriodicSchedule)
        last = now if trigger.end_at is None else min(now, trigger.end_at)
        count = max(0, (last - expected) // interval) + 1
        return expected + max(0, count - limit) * interval
    if _fires_from(trigger, expected, now, limit) <= limit:
        return expected
    low, high = expected, now  # more than ``limit`` fires from low; at most from high
    while high - low > _ONE_MICROSECOND:
        middle = low + (high - low) // 2
        if _fires_from(trigger, middle, now, limit) > limit:
            low = middle
        else:
            high = middle
    start = trigger.get_next_run_at(high - _ONE_MICROSECOND)
    return start if start is not None else expected


def _interval_of(trigger: Trigger) -> timedelta | None:
    if isinstance(trigger, PeriodicSchedule) and trigger.interval is not None:
        return trigger.interval.period
    return None


def fires_between(
    trigger: Trigger, start: datetime, end: datetime, most: int, *, anchor: datetime | None
) -> list[datetime] | None:
    """The fires of ``trigger`` from ``start`` to ``end`` (both included), in order;
    ``None`` if there are more than ``most``. An interval's fires are on the grid of
    ``anchor`` (a fire time of the job: its next or last run), or of its ``start_at``."""
    fires: list[datetime] = []
    interval = _interval_of(trigger)
    if interval is not None:
        assert isinstance(trigger, PeriodicSchedule)
        grid = trigger.start_at or anchor
        if grid is None:
            return []
        steps = -((grid - start) // interval)  # ceil((start - grid) / interval)
        when: datetime | None = grid + steps * interval
        if trigger.start_at is not None and when is not None and when < trigger.start_at:
            when = trigger.start_at
        if when is not None and trigger.end_at is not None and when > trigger.end_at:
            when = None
    else:
        when = trigger.get_next_run_at(start - _ONE_MICROSECOND)
    while when is not None and when <= end:
        if len(fires) == most:
            return None
        fires.append(when)
        when = trigger.get_next_run_at(when)
    return fires


def jitter_of(job_id: str, scheduled_for: datetime, bound: float) -> float:
    """The delay of one fire, in ``[0, bound)`` seconds: drawn from a hash of the fire's
    identity, so every scheduler (and a restarted one) gives it the same delay."""
    if bound <= 0:
        return 0.0
    digest = hashlib.blake2b(
        f"{job_id}\x00{scheduled_for.isoformat()}".encode(), digest_size=8
    ).digest()
    fraction = int.from_bytes(digest, "big") / 2**64
    return round(fraction * bound, 6)
