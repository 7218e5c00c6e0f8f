"""Shorthands for the schedules people write most: ``every("5m")``, ``daily(at="09:30")``,
``hourly(minute=15)``, ``weekly(on="mon", at="08:00")``, ``cron("0 9 * * mon-fri")`` and
``calendar(...)``, a union of cron rules.

Each returns a ``PeriodicSchedule`` over the existing triggers (an ``IntervalTrigger``, a
``CrontabTrigger`` or a ``CalendarTrigger``), stored exactly as that schedule written out in
full: ``daily(at="09:30", tz="Europe/Berlin")`` is
``PeriodicSchedule(crontab=CrontabTrigger(minute="30", hour="9", timezone="Europe/Berlin"))``.
Every shorthand takes ``start_at`` / ``end_at`` bounds; a bad value raises
``InvalidTriggerError`` naming the argument and the value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, time, timedelta
from typing import Any

from taskiq_beat.exceptions import InvalidTriggerError
from taskiq_beat.triggers import (
    CalendarTrigger,
    CrontabTrigger,
    IntervalTrigger,
    PeriodicSchedule,
    resolve_timezone,
)

__all__ = ["calendar", "cron", "daily", "every", "hourly", "weekly"]

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_WEEKDAY_NAMES = {
    **{name: name for name in _WEEKDAYS},
    "sunday": "sun",
    "monday": "mon",
    "tuesday": "tue",
    "wednesday": "wed",
    "thursday": "thu",
    "friday": "fri",
    "saturday": "sat",
}
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


def every(
    interval: str | timedelta | float,
    *,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire every ``interval``: a string such as ``"5m"``, ``"1h30m"``, ``"90s"``,
    ``"1w 2d"`` (units w, d, h, m, s), a ``timedelta``, or a number of seconds.

    Without ``start_at`` the first fire is one period after the job is scheduled; with it,
    fires fall on ``start_at + n * interval``.
    """
    return _periodic({"interval": IntervalTrigger.parse(interval, "interval")}, start_at, end_at)


def cron(
    expression: str,
    *,
    tz: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire on a cron string (``"0 9 * * mon-fri"``; six fields put the seconds first), in
    the IANA timezone ``tz`` (default: ``SchedulerConfig.default_timezone``)."""
    _check_tz(tz)
    crontab = CrontabTrigger.from_expression(expression, tz, field="expression")
    return _periodic({"crontab": crontab}, start_at, end_at)


def daily(
    at: str | time = "00:00",
    *,
    tz: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire every day at the wall-clock time ``at`` (``"09:30"``, ``"09:30:15"`` or a
    ``datetime.time``) in ``tz``. Across daylight saving changes the cron rules apply: a time
    skipped by the clock fires at the end of the gap, a repeated one fires once."""
    hour, minute, second = _time_of(at)
    return _crontab(start_at, end_at, tz, second=second, minute=minute, hour=hour)


def hourly(
    minute: int = 0,
    *,
    second: int = 0,
    tz: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire every hour at ``minute`` (and ``second``) past the hour. ``tz`` matters only in
    zones whose offset is not whole hours (``Asia/Kolkata``)."""
    return _crontab(
        start_at,
        end_at,
        tz,
        second=_in_range("second", second, 59),
        minute=_in_range("minute", minute, 59),
    )


def weekly(
    on: str | Sequence[str] = "mon",
    at: str | time = "00:00",
    *,
    tz: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire on the weekday ``on`` (``"mon"`` or ``"monday"``, a range ``"mon-fri"``, or a
    list of them) at ``at`` in ``tz``."""
    days = [on] if isinstance(on, str) else on
    if not isinstance(days, Sequence) or not days:
        raise InvalidTriggerError("on", on, "expected a weekday such as 'mon', or a list of them")
    names: list[str] = []
    for day in days:
        ends = day.strip().lower().split("-") if isinstance(day, str) else [None]
        found = [_WEEKDAY_NAMES.get(end) if end else None for end in ends]
        if len(found) > 2 or None in found:
            raise InvalidTriggerError(
                "on",
                day,
                "expected a weekday: mon, tue, wed, thu, fri, sat, sun (or in full), or a "
                "range such as 'mon-fri'",
            )
        name = "-".join(name for name in found if name)
        if name not in names:
            names.append(name)
    names.sort(key=lambda name: (_WEEKDAYS.index(name[:3]) + 6) % 7)  # Monday first
    hour, minute, second = _time_of(at)
    return _crontab(
        start_at,
        end_at,
        tz,
        second=second,
        minute=minute,
        hour=hour,
        day_of_week=",".join(names),
    )


def calendar(
    *rules: str | CrontabTrigger | PeriodicSchedule,
    tz: str | None = None,
    start_at: datetime | None = None,
    end_at: datetime | None = None,
) -> PeriodicSchedule:
    """Fire at every instant at which any of ``rules`` fires, once where rules meet.

    A rule is a cron string, a ``CrontabTrigger``, or a schedule made by ``cron()``,
    ``daily()``, ``hourly()``, ``weekly()`` or ``calendar()`` without bounds of its own (give
    the bounds to ``calendar()``). ``tz`` is the timezone of the rules that name none.
    """
    _check_tz(tz)
    flat: list[str | CrontabTrigger] = []
    for index, rule in enumerate(rules):
        if isinstance(rule, PeriodicSchedule):
            if rule.start_at is not None or rule.end_at is not None:
                raise InvalidTriggerError(
                    f"rules[{index}]", rule, "give start_at/end_at to calendar() itself"
                )
            if rule.crontab is not None:
                flat.append(rule.crontab)
            elif rule.calendar is not None:
                flat.extend(rule.calendar.rules)
            else:
                raise InvalidTriggerError(
                    f"rules[{index}]", rule, "an interval cannot be part of a calendar"
                )
        else:
            flat.append(rule)
    try:
        union = CalendarTrigger(rules=flat)
    except InvalidTriggerError as exc:
        field = exc.field.removeprefix("CalendarTrigger.")
        raise InvalidTriggerError(field, exc.value, exc.reason) from None
    if tz is not None:
        union = union.with_timezone(tz)
    return _periodic({"calendar": union}, start_at, end_at)


def _periodic(
    rule: dict[str, Any], start_at: datetime | None, end_at: datetime | None
) -> PeriodicSchedule:
    return PeriodicSchedule(**rule, start_at=start_at, end_at=end_at)


def _crontab(
    start_at: datetime | None, end_at: datetime | None, tz: str | None, **fields: Any
) -> PeriodicSchedule:
    _check_tz(tz)
    crontab = CrontabTrigger(**{name: str(value) for name, value in fields.items()}, timezone=tz)
    return _periodic({"crontab": crontab}, start_at, end_at)


def _check_tz(tz: str | None) -> None:
    if tz is not None:
        if not isinstance(tz, str):
            raise InvalidTriggerError("tz", tz, "expected an IANA timezone name")
        resolve_timezone(tz, "tz")


def _in_range(field: str, value: Any, highest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= highest:
        raise InvalidTriggerError(field, value, f"expected a whole number from 0 to {highest}")
    return value


def _time_of(at: Any) -> tuple[int, int, int]:
    """``(hour, minute, second)`` of ``at``: ``"HH:MM"``, ``"HH:MM:SS"`` or a naive ``time``."""
    if isinstance(at, time):
        if at.tzinfo is not None or at.microsecond:
            raise InvalidTriggerError(
                "at", at, "expected a time without timezone or microseconds (give tz=)"
            )
        return at.hour, at.minute, at.second
    match = _TIME_RE.fullmatch(at.strip()) if isinstance(at, str) else None
    if match is None:
        raise InvalidTriggerError("at", at, "expected a wall-clock time 'HH:MM' or 'HH:MM:SS'")
    hour, minute, second = (int(part) if part else 0 for part in match.groups())
    if hour > 23 or minute > 59 or second > 59:
        raise InvalidTriggerError("at", at, "no such time of day")
    return hour, minute, second
