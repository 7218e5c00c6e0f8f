"""Triggers: frozen, validated values that say when a job fires.

Every trigger has a pure ``get_next_run_at(after)`` returning the first fire strictly after
``after`` as an aware UTC datetime (or ``None`` when it never fires again), and round-trips
through a versioned JSON form (:func:`trigger_to_json` / :func:`trigger_from_json`).

Cron in a named timezone follows wall-clock time across daylight saving changes:

- a wall-clock time that does not exist (spring forward) fires once, at the first instant
  after the gap;
- a time that occurs twice (fall back) fires once, at its first occurrence, when the hour
  field is fixed; when the hour field is a wildcard or a step (``*``, ``*/2``) the schedule
  keeps firing in real time through the repeated hour.
"""

from __future__ import annotations

import functools
import json
import math
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from taskiq_beat.clock import to_utc
from taskiq_beat.enums import JobStrategy
from taskiq_beat.exceptions import CorruptJobError, InvalidJobError, InvalidTriggerError
from taskiq_beat.models import decode_json

__all__ = [
    "TRIGGER_FORMAT_VERSION",
    "CrontabTrigger",
    "ImmediateDispatch",
    "IntervalTrigger",
    "OneOffSchedule",
    "PeriodicSchedule",
    "Trigger",
    "latest_due_fire",
    "next_due_fire",
    "resolve_timezone",
    "trigger_from_json",
    "trigger_from_text",
    "trigger_to_json",
]

TRIGGER_FORMAT_VERSION = 1
"""Version of the stored JSON form of triggers; a stored payload of another version is refused."""

_UTC = timezone.utc
_ONE_MICROSECOND = timedelta(microseconds=1)
# A cron that matches no date within this many years is impossible (e.g. February 30).
_CRON_SEARCH_YEARS = 30


def resolve_timezone(name: str, field: str = "timezone") -> ZoneInfo:
    """Return the IANA timezone ``name``.

    :raises InvalidTriggerError: naming ``field`` if the timezone is unknown.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise InvalidTriggerError(field, name, "unknown IANA timezone") from exc


class _Frozen(BaseModel):
    """Base of trigger values: frozen, no unknown fields, errors raised as our own."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = type(self).__name__
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, InvalidJobError):
                raise InvalidTriggerError(
                    f"{name}.{cause.field}", cause.value, cause.reason
                ) from None
            where = ".".join(str(part) for part in error["loc"])
            field = f"{name}.{where}" if where else name
            reason = str(error["msg"]).removeprefix("Value error, ")
            raise InvalidTriggerError(field, error.get("input"), reason) from None


def _aware_utc(value: datetime | None, field: str) -> datetime | None:
    return None if value is None else to_utc(value, field)


class ImmediateDispatch(_Frozen):
    """Send the task at once, when ``.schedule()`` is called. Valid with ``.schedule()`` only."""

    @property
    def strategy(self) -> JobStrategy:
        return JobStrategy.IMMEDIATE

    def first_run_at(self, now: datetime) -> datetime | None:
        return None

    def get_next_run_at(self, after: datetime) -> datetime | None:
        to_utc(after, "after")
        return None


class OneOffSchedule(_Frozen):
    """Fire once at ``run_at`` (at once if ``run_at`` is already past)."""

    run_at: datetime

    @property
    def strategy(self) -> JobStrategy:
        return JobStrategy.ONE_OFF

    @field_validator("run_at")
    @classmethod
    def _check_run_at(cls, value: datetime) -> datetime:
        # After parsing, so that a naive ISO string is refused like a naive datetime.
        return to_utc(value, "run_at")

    def first_run_at(self, now: datetime) -> datetime | None:
        return self.run_at

    def get_next_run_at(self, after: datetime) -> datetime | None:
        after = to_utc(after, "after")
        return self.run_at if self.run_at > after else None


class IntervalTrigger(_Frozen):
    """A fixed period: any combination of weeks, days, hours, minutes and seconds (total > 0)."""

    weeks: float = 0
    days: float = 0
    hours: float = 0
    minutes: float = 0
    seconds: float = 0

    @model_validator(mode="after")
    def _check_positive(self) -> IntervalTrigger:
        for name in ("weeks", "days", "hours", "minutes", "seconds"):
            if getattr(self, name) < 0:
                raise InvalidJobError(name, getattr(self, name), "must not be negative")
        try:
            period = self.period
        except OverflowError:
            raise InvalidJobError(
                "period", self.model_dump(), "the interval is too long for a timedelta"
            ) from None
        if period <= timedelta(0):
            raise InvalidJobError("period", period, "the interval must be longer than zero")
        return self

    @functools.cached_property
    def period(self) -> timedelta:
        """The interval as a ``timedelta`` (microsecond precision). Computed once: it is read
        on every fire (pydantic keeps cached properties out of equality and dumps)."""
        return timedelta(
            weeks=self.weeks,
            days=self.days,
            hours=self.hours,
            minutes=self.minutes,
            seconds=self.seconds,
        )


_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week", "second")


class CrontabTrigger(_Frozen):
    """A cron specification with a seconds field, evaluated by croniter.

    Standard cron semantics: ``day_of_week`` 0 (or 7) is Sunday, names like ``mon`` and ``jan``
    work, ``L`` means the last day of the month. When both ``day_of_month`` and ``day_of_week``
    are restricted a day matching either fires (as in cron). ``timezone`` is an IANA name; a
    trigger without one takes ``SchedulerConfig.default_timezone`` when it is scheduled, and
    UTC when evaluated on its own.
    """

    second: str = "0"
    minute: str = "*"
    hour: str = "*"
    day_of_month: str = "*"
    month_of_year: str = "*"
    day_of_week: str = "*"
    timezone: str | None = None

    _iterator: croniter | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        # Equal by value: pydantic also compares private attributes, and the cached iterator
        # above is not part of the value (an evaluated trigger must still equal a fresh one).
        if isinstance(other, CrontabTrigger):
            return type(self) is type(other) and self.__dict__ == other.__dict__
        return NotImplemented

    @field_validator(*_CRON_FIELDS, mode="before")
    @classmethod
    def _check_field(cls, value: Any, info: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
            raise ValueError("expected one cron field, such as '*', '5', '*/10', '1-5' or 'mon'")
        probe = ["*"] * 6
        probe[_CRON_FIELDS.index(info.field_name)] = value.strip()
        if not croniter.is_valid(" ".join(probe)):
            raise ValueError(f"not a valid cron {info.field_name} field")
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError, TypeError):
                raise ValueError("unknown IANA timezone") from None
        return value

    @model_validator(mode="after")
    def _check_satisfiable(self) -> CrontabTrigger:
        try:
            croniter(
                self.expression, datetime(2000, 1, 1), max_years_between_matches=_CRON_SEARCH_YEARS
            ).get_next(datetime)
        except CroniterBadDateError:
            raise InvalidJobError(
                "day_of_month",
                self.day_of_month,
                f"never occurs in month_of_year={self.month_of_year!r}",
            ) from None
        return self

    @property
    def expression(self) -> str:
        """The croniter expression (seconds last)."""
        return " ".join(getattr(self, name) for name in _CRON_FIELDS)

    @property
    def _zone(self) -> tzinfo:
        return ZoneInfo(self.timezone) if self.timezone else _UTC

    @property
    def hour_is_wildcard(self) -> bool:
        """True for an hour field ``*`` or ``*/n``: fires in real time when clocks go back."""
        return self.hour.startswith("*")

    def with_timezone(self, name: str) -> CrontabTrigger:
        """Return this trigger with ``timezone`` set to ``name`` (validated)."""
        return CrontabTrigger(**{**self.model_dump(), "timezone": name})

    def _wall_after(self, wall: datetime) -> datetime:
        """Return the first naive wall-clock match strictly after ``wall``."""
        if self._iterator is None:
            self._iterator = croniter(
                self.expression, wall, max_years_between_matches=_CRON_SEARCH_YEARS
            )
        else:
            self._iterator.set_current(wall, force=True)
        result: datetime = self._iterator.get_next(datetime)
        return result

    def _instants(self, wall: datetime) -> list[datetime]:
        """Return the real instants (UTC) at which the wall-clock time ``wall`` fires."""
        zone = self._zone
        first = wall.replace(tzinfo=zone, fold=0).astimezone(_UTC)
        second = wall.replace(tzinfo=zone, fold=1).astimezone(_UTC)
        if first == second:
            return [first]
        if first < second:  # occurs twice (fall back)
            return [first, second] if self.hour_is_wildcard else [first]
        # does not exist (spring forward): the first instant after the gap
        return [_transition_between(zone, second, first)]

    def get_next_run_at(self, after: datetime) -> datetime:
        after = to_utc(after, "after")
        zone = self._zone
        if zone is _UTC:
            return self._wall_after(after.replace(tzinfo=None)).replace(tzinfo=_UTC)
        local = after.astimezone(zone)
        wall = local.replace(tzinfo=None)
        # For wall-clock times later than ``wall``, the instants later than ``after`` come in
        # wall-clock order, so the first such time that fires gives the answer. Inside a
        # repeated period (the clock went back by ``shift``) two things differ: in the first
        # pass, a wildcard-hour time already passed comes round again in the second pass and
        # may come first; in the second pass, the fixed times of the period do not fire again,
        # so the search starts at its end. Neither visits every time of the period (thousands
        # of steps for a cron firing every second).
        best: datetime | None = None
        start = wall
        shift = _fold_shift(zone, wall)
        if shift and local.fold == 0 and self.hour_is_wildcard:
            transition = _transition_between(zone, after, after + shift)
            period_start = transition.astimezone(zone).replace(tzinfo=None)
            repeated = self._wall_after(period_start - _ONE_MICROSECOND)
            if repeated <= wall:  # its second occurrence is the earliest one still to come
                best = self._instants(repeated)[-1]
        elif shift and local.fold == 1 and not self.hour_is_wildcard:
            transition = _transition_between(zone, after - shift, after)
            period_end = transition.astimezone(zone).replace(tzinfo=None) + shift
            start = max(wall, period_end - _ONE_MICROSECOND)
        candidate_wall = start
        while True:
            candidate_wall = self._wall_after(candidate_wall)
            later = [instant for instant in self._instants(candidate_wall) if instant > after]
            if later:
                return later[0] if best is None else min(best, later[0])


def _fold_shift(zone: tzinfo, wall: datetime) -> timedelta:
    """How far the clock goes back when ``wall`` occurs twice in ``zone``; zero otherwise."""
    first = wall.replace(tzinfo=zone, fold=0).utcoffset()
    second = wall.replace(tzinfo=zone, fold=1).utcoffset()
    if first is None or second is None or first <= second:
        return timedelta(0)
    return first - second


def _transition_between(zone: tzinfo, low: datetime, high: datetime) -> datetime:
    """Return the first instant in ``(low, high]`` whose UTC offset equals ``high``'s."""
    target = high.astimezone(zone).utcoffset()
    lo, hi = math.floor(low.timestamp()), math.ceil(high.timestamp())
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if datetime.fromtimestamp(middle, _UTC).astimezone(zone).utcoffset() == target:
            hi = middle
        else:
            lo = middle
    return datetime.fromtimestamp(hi, _UTC)


class PeriodicSchedule(_Frozen):
    """Fire repeatedly by ``interval`` or by ``crontab`` (exactly one), between optional bounds."""

    interval: IntervalTrigger | None = None
    crontab: CrontabTrigger | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None

    @field_validator("start_at", "end_at")
    @classmethod
    def _check_bounds(cls, value: datetime | None, info: Any) -> datetime | None:
        # After parsing, so that a naive ISO string is refused like a naive datetime.
        return _aware_utc(value, info.field_name)

    @model_validator(mode="after")
    def _check_one(self) -> PeriodicSchedule:
        if (self.interval is None) == (self.crontab is None):
            raise ValueError("give exactly one of interval= or crontab=")
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise InvalidJobError("end_at", self.end_at, "must be later than start_at")
        return self

    @property
    def strategy(self) -> JobStrategy:
        return JobStrategy.INTERVAL if self.interval is not None else JobStrategy.CRONTAB

    def first_run_at(self, now: datetime) -> datetime | None:
        """The first fire of a job scheduled at ``now``."""
        now = to_utc(now, "now")
        if self.start_at is not None and self.start_at >= now:
            if self.interval is not None:
                return self._bounded(self.start_at)
            return self.get_next_run_at(self.start_at - _ONE_MICROSECOND)
        return self.get_next_run_at(now)

    def get_next_run_at(self, after: datetime) -> datetime | None:
        after = to_utc(after, "after")
        if self.interval is not None:
            period = self.interval.period
            if self.start_at is None:
                return self._bounded(after + period)
            if after < self.start_at:
                return self._bounded(self.start_at)
            steps = (after - self.start_at) // period + 1
            return self._bounded(self.start_at + steps * period)
        assert self.crontab is not None
        if self.start_at is not None and after < self.start_at:
            after = self.start_at - _ONE_MICROSECOND
        return self._bounded(self.crontab.get_next_run_at(after))

    def _bounded(self, value: datetime) -> datetime | None:
        return None if self.end_at is not None and value > self.end_at else value


Trigger = ImmediateDispatch | OneOffSchedule | PeriodicSchedule
"""Any trigger accepted by ``.schedule()``."""


def latest_due_fire(
    trigger: Trigger, first_due: datetime, now: datetime
) -> tuple[datetime, datetime | None]:
    """Coalesce overdue fires: return ``(latest fire <= now, first fire > now)``.

    ``first_due`` is a fire time not later than ``now`` (the job's ``next_run_at``). Fires
    between it and ``now`` are skipped in favour of the latest one, which is the one sent.
    """
    if isinstance(trigger, PeriodicSchedule) and trigger.interval is not None:
        period = trigger.interval.period
        limit = now if trigger.end_at is None else min(now, trigger.end_at)
        latest = first_due + max(0, (limit - first_due) // period) * period
        return latest, trigger._bounded(latest + period)
    latest = first_due
    following = trigger.get_next_run_at(latest)
    steps = 0
    while following is not None and following <= now:
        steps += 1
        if steps == 64:
            # Far behind: jump close to ``now`` instead of walking every missed fire.
            latest, following = _jump_near(trigger, latest, now)
            continue
        latest = following
        following = trigger.get_next_run_at(latest)
    return latest, following


def next_due_fire(
    trigger: Trigger, first_due: datetime, now: datetime, grace: timedelta
) -> tuple[datetime, datetime | None]:
    """The fire to send at ``now`` for a job due since ``first_due``, and the fire after it.

    A fire found at most ``grace`` late is sent as it was scheduled, so a scheduler that is
    behind (busy, or back after a short outage) catches up fire by fire, in order. Fires
    more than ``grace`` late are missed: they are skipped when a fire within ``grace``
    follows them, and otherwise coalesced into the latest of them, sent once. ``grace`` of
    zero coalesces every overdue fire into the latest one.
    """
    if now - first_due <= grace:
        return first_due, trigger.get_next_run_at(first_due)
    latest, following = latest_due_fire(trigger, first_due, now - grace)
    if following is not None and following <= now:
        return following, trigger.get_next_run_at(following)
    return latest, following


def _jump_near(
    trigger: Trigger, floor: datetime, now: datetime
) -> tuple[datetime, datetime | None]:
    """Return ``(latest fire <= now, first fire > now)`` given a fire ``floor`` that is followed
    by another fire ``<= now``, in a number of evaluations logarithmic in ``now - floor``.

    Searches for the latest start whose next fire is still due (``next(low) <= now``), first by
    doubling the distance back from ``now``, then by bisection down to a microsecond; walking
    fire by fire from the doubled distance could take millions of steps for a cron that fires
    every second only on some days.
    """
    high = now  # the next fire after ``high`` is later than ``now`` (or there is none)
    back = timedelta(seconds=1)
    while True:
        low = max(floor, now - back)
        probe = trigger.get_next_run_at(low)
        if probe is not None and probe <= now:
            break
        if low == floor:  # not reached when called as documented
            return floor, probe
        high = low
        back *= 2
    # next(low) <= now < next(high), so the latest due fire is next(s) for the last such s.
    while high - low > _ONE_MICROSECOND:
        middle = low + (high - low) // 2
        candidate = trigger.get_next_run_at(middle)
        if candidate is not None and candidate <= now:
            low, probe = middle, candidate
        else:
            high = middle
    return probe, trigger.get_next_run_at(probe)


# ---------------------------------------------------------------------------------------------
# Stored form
# ---------------------------------------------------------------------------------------------

_TriggerType = Literal["immediate", "one_off", "periodic"]
_TYPE_OF: dict[type[_Frozen], _TriggerType] = {
    ImmediateDispatch: "immediate",
    OneOffSchedule: "one_off",
    PeriodicSchedule: "periodic",
}
_CLASS_OF: dict[str, type[_Frozen]] = {name: cls for cls, name in _TYPE_OF.items()}


def trigger_to_json(trigger: Trigger) -> dict[str, Any]:
    """Return the stored JSON form of ``trigger``: its fields plus ``type`` and ``version``."""
    data = trigger.model_dump(mode="json", exclude_none=True)
    return {"version": TRIGGER_FORMAT_VERSION, "type": _TYPE_OF[type(trigger)], **data}


def trigger_from_json(data: Any, *, job_id: str = "?") -> Trigger:
    """Rebuild a trigger from its stored form.

    :raises CorruptJobError: if the payload is not a trigger of a known version.
    """
    if not isinstance(data, dict):
        raise CorruptJobError(job_id, f"trigger is not a JSON object: {data!r}")
    fields = dict(data)
    version = fields.pop("version", None)
    if version != TRIGGER_FORMAT_VERSION:
        raise CorruptJobError(job_id, f"unknown trigger format version {version!r}")
    kind = fields.pop("type", None)
    cls = _CLASS_OF.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CorruptJobError(job_id, f"unknown trigger type {data.get('type')!r}")
    try:
        trigger = cls(**fields)
    except InvalidJobError as exc:
        raise CorruptJobError(job_id, f"invalid trigger: {exc}") from exc
    assert isinstance(trigger, (ImmediateDispatch, OneOffSchedule, PeriodicSchedule))
    return trigger


def trigger_from_text(text: str, *, job_id: str = "?") -> Trigger:
    """Rebuild a trigger from its stored JSON text, parsing each distinct text once.

    Triggers are frozen values, so jobs whose stored triggers read the same share one object
    (many jobs share a schedule; a scheduler loading 100k jobs parses a handful of texts).

    :raises CorruptJobError: if the text is not a trigger of a known version.
    """
    try:
        return _parse_trigger_text(text)
    except (ValueError, CorruptJobError):
        pass  # again, uncached, for an error that names the job
    return trigger_from_json(decode_json(text), job_id=job_id)


@functools.lru_cache(maxsize=4096)
def _parse_trigger_text(text: str) -> Trigger:
    return trigger_from_json(json.loads(text))


def validate_trigger(value: Any, field: str = "trigger") -> Trigger:
    """Check that ``value`` is a trigger object."""
    if not isinstance(value, (ImmediateDispatch, OneOffSchedule, PeriodicSchedule)):
        raise InvalidJobError(
            field,
            value,
            "expected ImmediateDispatch(), OneOffSchedule(...) or PeriodicSchedule(...)",
        )
    return value
