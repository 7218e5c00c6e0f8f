"""Triggers: frozen, validated values that say when a job fires.

Every trigger has a pure ``get_next_run_at(after)`` returning the first fire strictly after
``after`` as an aware UTC datetime (or ``None`` when it never fires again), and round-trips
through a versioned JSON form (:func:`trigger_to_json` / :func:`trigger_from_json`).

A ``PeriodicSchedule`` is driven by one of three rules: an ``IntervalTrigger`` (a fixed
period), a ``CrontabTrigger`` (one cron expression) or a ``CalendarTrigger`` (a union of cron
expressions, each instant fired once). Where a trigger is expected, a cron string stands for a
``CrontabTrigger`` and an interval string (``"1h30m"``) or a ``timedelta`` for an
``IntervalTrigger``; both are stored as the trigger they stand for.

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
import re
from collections.abc import Sequence
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
    "CalendarTrigger",
    "CrontabTrigger",
    "ImmediateDispatch",
    "IntervalTrigger",
    "OneOffSchedule",
    "PeriodicSchedule",
    "Trigger",
    "TriggerInput",
    "format_interval",
    "latest_due_fire",
    "next_due_fire",
    "parse_interval",
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

    @classmethod
    def parse(cls, value: Any, field: str = "interval") -> IntervalTrigger:
        """Build an interval from a string such as ``"5m"``, ``"1h30m"`` or ``"90s"`` (the
        units as written are what is stored), a ``timedelta``, or a number of seconds.

        :raises InvalidTriggerError: naming ``field`` and the value, for anything else or a
            period that is not longer than zero.
        """
        if isinstance(value, IntervalTrigger):
            return value
        if isinstance(value, str):
            return cls(**_interval_parts(value, field))
        if isinstance(value, timedelta):
            return cls(**_timedelta_parts(value, field))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or value <= 0:
                raise InvalidTriggerError(field, value, "the interval must be longer than zero")
            return cls(seconds=value)
        raise InvalidTriggerError(
            field, value, "expected an interval string such as '5m' or '1h30m', or a timedelta"
        )


# An interval string: integers with the units w, d, h, m, s (seconds may have a fraction of up
# to six digits), largest unit first, each at most once, e.g. "1h30m", "90s", "1w 2d".
_INTERVAL_UNITS = (
    ("w", "weeks"),
    ("d", "days"),
    ("h", "hours"),
    ("m", "minutes"),
    ("s", "seconds"),
)
_INTERVAL_RE = re.compile(
    r"\s*(?:(?P<w>\d+)\s*w)?\s*(?:(?P<d>\d+)\s*d)?\s*(?:(?P<h>\d+)\s*h)?"
    r"\s*(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+(?:\.\d{1,6})?)\s*s)?\s*",
    re.IGNORECASE,
)
_INTERVAL_HELP = (
    "expected an interval such as '5m', '1h30m', '90s' or '1w 2d': whole numbers with the "
    "units w, d, h, m, s (largest first, each once)"
)
_MAX_INTERVAL = timedelta(days=100 * 366)


def _interval_parts(text: str, field: str) -> dict[str, float]:
    """The unit counts of an interval string, checked: ``{"hours": 1, "minutes": 30}``."""
    match = _INTERVAL_RE.fullmatch(text)
    if match is None or not any(match.groupdict().values()):
        raise InvalidTriggerError(field, text, _INTERVAL_HELP)
    parts: dict[str, float] = {}
    for unit, name in _INTERVAL_UNITS:
        count = match.group(unit)
        if count is not None:
            parts[name] = float(count) if "." in count else int(count)
    total = _timedelta_of(parts, field, text)
    if total <= timedelta(0):
        raise InvalidTriggerError(field, text, "the interval must be longer than zero")
    return parts


def _timedelta_of(parts: dict[str, float], field: str, value: Any) -> timedelta:
    try:
        total = timedelta(**parts)
    except OverflowError:
        total = _MAX_INTERVAL * 2
    if total > _MAX_INTERVAL:
        raise InvalidTriggerError(field, value, "the interval must be at most 100 years")
    return total


def _timedelta_parts(value: timedelta, field: str) -> dict[str, float]:
    """A positive ``timedelta`` as days, hours, minutes and seconds (zero units left out)."""
    if value <= timedelta(0):
        raise InvalidTriggerError(field, value, "the interval must be longer than zero")
    _timedelta_of({"days": value.days, "seconds": value.seconds}, field, value)
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts: dict[str, float] = {}
    for name, count in (("days", value.days), ("hours", hours), ("minutes", minutes)):
        if count:
            parts[name] = count
    if value.microseconds:
        parts["seconds"] = seconds + value.microseconds / 1_000_000
    elif seconds:
        parts["seconds"] = seconds
    return parts


def parse_interval(text: str, field: str = "interval") -> timedelta:
    """The period of an interval string (``"1h30m"`` is 90 minutes).

    :raises InvalidTriggerError: naming ``field`` and ``text`` if it is not an interval string
        (``"5 minutes ago"``) or not longer than zero.
    """
    if not isinstance(text, str):
        raise InvalidTriggerError(field, text, _INTERVAL_HELP)
    return timedelta(**_interval_parts(text, field))


def format_interval(period: timedelta) -> str:
    """The shortest interval string of a positive ``period``: ``format_interval(timedelta(
    minutes=90)) == "1h30m"``; :func:`parse_interval` reads it back to the same period."""
    if period <= timedelta(0):
        raise InvalidTriggerError("period", period, "the interval must be longer than zero")
    weeks, days = divmod(period.days, 7)
    hours, rest = divmod(period.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(
        f"{count}{unit}"
        for count, unit in ((weeks, "w"), (days, "d"), (hours, "h"), (minutes, "m"))
        if count
    )
    if period.microseconds:
        fraction = f"{period.microseconds:06d}".rstrip("0")
        text += f"{seconds}.{fraction}s"
    elif seconds:
        text += f"{seconds}s"
    return text


_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week", "second")


_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


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
    def cron(self) -> str:
        """The cron string of this trigger, as :meth:`from_expression` reads it: five fields
        when ``second`` is ``"0"``, else six with the seconds first."""
        fields = " ".join(getattr(self, name) for name in _CRON_FIELDS[:5])
        return fields if self.second == "0" else f"{self.second} {fields}"

    @classmethod
    def from_expression(
        cls, expression: str, timezone: str | None = None, *, field: str = "crontab"
    ) -> CrontabTrigger:
        """Build a trigger from a cron string: five fields (``"0 9 * * mon-fri"``: minute,
        hour, day of month, month, day of week; fires at second 0), six fields with the
        seconds first (``"*/10 * * * * *"``), or one of ``@yearly``, ``@annually``,
        ``@monthly``, ``@weekly``, ``@daily``, ``@midnight``, ``@hourly``.

        :raises InvalidTriggerError: naming ``field`` and the whole expression, with the cron
            field at fault in the reason.
        """
        if not isinstance(expression, str):
            raise InvalidTriggerError(field, expression, "expected a cron string")
        text = _CRON_ALIASES.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) == 5:
            parts.insert(0, "0")
        if len(parts) != 6:
            raise InvalidTriggerError(
                field,
                expression,
                "expected 5 cron fields (minute hour day-of-month month day-of-week), 6 with "
                "the seconds first, or an alias such as '@daily'",
            )
        names = ("second", *_CRON_FIELDS[:5])
        try:
            return cls(**dict(zip(names, parts, strict=True)), timezone=timezone)
        except InvalidJobError as exc:
            where = exc.field.rpartition(".")[2]
            reason = exc.reason if where == "timezone" else f"{where} {exc.value!r}: {exc.reason}"
            value = timezone if where == "timezone" else expression
            name = "timezone" if where == "timezone" else field
            raise InvalidTriggerError(name, value, reason) from None

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


MAX_CALENDAR_RULES = 64
"""Most cron rules one ``CalendarTrigger`` holds (each fire evaluates every rule)."""


class CalendarTrigger(_Frozen):
    """A union of cron rules: fires at every instant at which any of ``rules`` fires, once
    where several rules meet. Each rule is a ``CrontabTrigger`` or a cron string, with a
    timezone of its own (a rule without one takes ``SchedulerConfig.default_timezone`` when
    scheduled, like a ``CrontabTrigger``)."""

    rules: tuple[CrontabTrigger, ...]

    # Per rule, the last answer: (after, its next fire). The next fire of a rule stays the
    # same for any later ``after`` before it, so after a fire only the rules that fired are
    # evaluated again (a cron in a named zone costs about half a millisecond).
    # Kept with the rules they answer for: a copy with other rules must not reuse them.
    _answers: tuple[tuple[CrontabTrigger, ...], list[tuple[datetime, datetime] | None]] | None = (
        PrivateAttr(default=None)
    )

    def __init__(self, *, rules: Sequence[str | CrontabTrigger]) -> None:
        super().__init__(rules=rules)

    def __eq__(self, other: object) -> bool:
        # Equal by value: the remembered answers are not part of it (see CrontabTrigger).
        if isinstance(other, CalendarTrigger):
            return type(self) is type(other) and self.rules == other.rules
        return NotImplemented

    def __hash__(self) -> int:
        return hash((type(self), self.rules))

    @field_validator("rules", mode="before")
    @classmethod
    def _check_rules(cls, value: Any) -> Any:
        if isinstance(value, (str, CrontabTrigger)) or not isinstance(value, Sequence):
            raise InvalidJobError("rules", value, "expected a list of cron strings or triggers")
        if not 1 <= len(value) <= MAX_CALENDAR_RULES:
            raise InvalidJobError(
                "rules", value, f"expected 1 to {MAX_CALENDAR_RULES} rules, got {len(value)}"
            )
        return tuple(
            CrontabTrigger.from_expression(rule, field=f"rules[{index}]")
            if isinstance(rule, str)
            else rule
            for index, rule in enumerate(value)
        )

    def with_timezone(self, name: str) -> CalendarTrigger:
        """Return this union with ``timezone`` set to ``name`` on every rule that has none."""
        return CalendarTrigger(
            rules=tuple(rule if rule.timezone else rule.with_timezone(name) for rule in self.rules)
        )

    def get_next_run_at(self, after: datetime) -> datetime:
        """The earliest of the rules' next fires: one instant, however many rules meet there."""
        after = to_utc(after, "after")
        if self._answers is None or self._answers[0] is not self.rules:
            self._answers = (self.rules, [None] * len(self.rules))
        answers = self._answers[1]
        earliest: datetime | None = None
        for index, rule in enumerate(self.rules):
            known = answers[index]
            if known is not None and known[0] <= after < known[1]:
                following = known[1]
            else:
                following = rule.get_next_run_at(after)
                answers[index] = (after, following)
            if earliest is None or following < earliest:
                earliest = following
        assert earliest is not None
        return earliest


def _coerce_interval(value: Any) -> Any:
    if isinstance(value, (str, timedelta)):
        return IntervalTrigger.parse(value)
    return value


def _coerce_crontab(value: Any) -> Any:
    return CrontabTrigger.from_expression(value) if isinstance(value, str) else value


def _coerce_calendar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        try:
            return CalendarTrigger(rules=value)
        except InvalidJobError as exc:
            where = exc.field.removeprefix("CalendarTrigger.")
            raise InvalidJobError(f"calendar.{where}", exc.value, exc.reason) from None
    return value


class PeriodicSchedule(_Frozen):
    """Fire repeatedly by ``interval``, ``crontab`` or ``calendar`` (exactly one), between
    optional bounds. ``interval`` also takes an interval string (``"1h30m"``) or a
    ``timedelta``, ``crontab`` a cron string, ``calendar`` a list of cron strings or triggers;
    each is stored as the trigger it stands for."""

    interval: IntervalTrigger | None = None
    crontab: CrontabTrigger | None = None
    calendar: CalendarTrigger | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        return _coerce_interval(value)

    @field_validator("crontab", mode="before")
    @classmethod
    def _crontab(cls, value: Any) -> Any:
        return _coerce_crontab(value)

    @field_validator("calendar", mode="before")
    @classmethod
    def _calendar(cls, value: Any) -> Any:
        return _coerce_calendar(value)

    @field_validator("start_at", "end_at")
    @classmethod
    def _check_bounds(cls, value: datetime | None, info: Any) -> datetime | None:
        # After parsing, so that a naive ISO string is refused like a naive datetime.
        return _aware_utc(value, info.field_name)

    @model_validator(mode="after")
    def _check_one(self) -> PeriodicSchedule:
        given = [rule for rule in (self.interval, self.crontab, self.calendar) if rule is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of interval= or crontab= or calendar=")
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise InvalidJobError("end_at", self.end_at, "must be later than start_at")
        return self

    @property
    def strategy(self) -> JobStrategy:
        if self.interval is not None:
            return JobStrategy.INTERVAL
        return JobStrategy.CRONTAB if self.crontab is not None else JobStrategy.CALENDAR

    @property
    def _calendar_rule(self) -> CrontabTrigger | CalendarTrigger:
        rule = self.crontab if self.crontab is not None else self.calendar
        assert rule is not None
        return rule

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
        if self.start_at is not None and after < self.start_at:
            after = self.start_at - _ONE_MICROSECOND
        return self._bounded(self._calendar_rule.get_next_run_at(after))

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
    if cls is PeriodicSchedule:
        _check_stored_rules(fields, job_id)
    try:
        trigger = cls(**fields)
    except InvalidJobError as exc:
        raise CorruptJobError(job_id, f"invalid trigger: {exc}") from exc
    assert isinstance(trigger, (ImmediateDispatch, OneOffSchedule, PeriodicSchedule))
    return trigger


def _check_stored_rules(fields: dict[str, Any], job_id: str) -> None:
    """The stored form holds every rule as an object: the shorthands a ``PeriodicSchedule``
    accepts in code (a cron or interval string) are not a stored form."""
    for name in ("interval", "crontab", "calendar"):
        value = fields.get(name)
        if value is not None and not isinstance(value, dict):
            raise CorruptJobError(job_id, f"invalid trigger: {name} is not an object: {value!r}")
    calendar = fields.get("calendar")
    rules = calendar.get("rules") if isinstance(calendar, dict) else None
    if isinstance(rules, list) and not all(isinstance(rule, dict) for rule in rules):
        raise CorruptJobError(
            job_id, f"invalid trigger: a calendar rule is not an object: {rules!r}"
        )


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


TriggerInput = Trigger | str | timedelta
"""What a ``trigger`` argument takes: a trigger, a cron string (``"0 9 * * mon-fri"``, for
``PeriodicSchedule(crontab=...)``) or a ``timedelta`` (for ``PeriodicSchedule(interval=...)``)."""


def validate_trigger(value: Any, field: str = "trigger") -> Trigger:
    """Check that ``value`` is a trigger; a cron string or a ``timedelta`` becomes the
    ``PeriodicSchedule`` it stands for.

    :raises InvalidTriggerError: naming ``field`` and the value, for anything else.
    """
    if isinstance(value, str):
        try:
            crontab = CrontabTrigger.from_expression(value, field=field)
        except InvalidTriggerError as exc:
            if _INTERVAL_RE.fullmatch(value) and value.strip():
                raise InvalidTriggerError(
                    field,
                    value,
                    f"a trigger string is a cron expression; for an interval write "
                    f"every({value!r}) or give a timedelta",
                ) from None
            raise exc from None
        return PeriodicSchedule(crontab=crontab)
    if isinstance(value, timedelta):
        return PeriodicSchedule(interval=IntervalTrigger.parse(value, field))
    if not isinstance(value, (ImmediateDispatch, OneOffSchedule, PeriodicSchedule)):
        raise InvalidTriggerError(
            field,
            value,
            "expected ImmediateDispatch(), OneOffSchedule(...), PeriodicSchedule(...), a cron "
            "string or a timedelta",
        )
    return value
