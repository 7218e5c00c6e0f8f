"""Tests of ``taskiq_beat.triggers``: pure computation, no database, no sleeping.

Covered:

- ``ImmediateDispatch`` and ``OneOffSchedule``: first fire, next fire, strategy.
- ``IntervalTrigger`` / ``PeriodicSchedule(interval=...)``: the period of any combination of
  units (fractions included), ``after + period`` without ``start_at``, the ``start_at`` grid,
  ``end_at``, real-time behaviour across a DST change.
- ``CrontabTrigger`` in UTC: strictly-after semantics at microsecond precision, the seconds
  field, Sunday as 0 and 7, names, ``L``, the day_of_month / day_of_week OR rule, and
  agreement with croniter's own iteration for a list of specifications, in UTC and in named
  timezones (away from DST changes).
- DST in named timezones (New York, Berlin, London, Lord Howe's 30-minute shift, Chatham's
  45-minute one, Santiago's midnight changes): missing wall-clock times fire once after the
  gap, repeated fixed times fire once at their first occurrence, ``*`` / ``*/n`` hours fire in
  real time through the repeated hour, also when evaluated from inside either pass of it.
  Expected instants are written by hand in UTC; every case is also checked from a dense set of
  ``after`` values and through ``latest_due_fire``.
- ``PeriodicSchedule(crontab=...)`` with ``start_at`` / ``end_at``.
- ``latest_due_fire``: interval grid, cron grid, ``end_at``, and outages long enough that
  walking fire by fire would take millions of evaluations (the number of evaluations is
  counted).
- Validation: every error names the field and the value; naive datetimes; bounds; both or
  neither of interval / crontab; zero, negative, NaN, infinite and overflowing intervals;
  impossible crons; unknown timezones; unknown keyword arguments; frozen values.
- Stored form: the JSON round trip of every trigger type, the exact stored form of a few, and
  corrupted payloads raising ``CorruptJobError``.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from pydantic import ValidationError

from taskiq_beat.enums import JobStrategy
from taskiq_beat.exceptions import CorruptJobError, InvalidJobError, InvalidTriggerError
from taskiq_beat.triggers import (
    TRIGGER_FORMAT_VERSION,
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    Trigger,
    latest_due_fire,
    next_due_fire,
    resolve_timezone,
    trigger_from_json,
    trigger_from_text,
    trigger_to_json,
)

UTC = timezone.utc
NEW_YORK = "America/New_York"
BERLIN = "Europe/Berlin"
LONDON = "Europe/London"
LORD_HOWE = "Australia/Lord_Howe"
CHATHAM = "Pacific/Chatham"
SANTIAGO = "America/Santiago"
KOLKATA = "Asia/Kolkata"

SECOND = timedelta(seconds=1)
MICROSECOND = timedelta(microseconds=1)


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> datetime:
    """An aware UTC datetime."""
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def walk(trigger: CrontabTrigger | PeriodicSchedule, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` fires after ``after``, each evaluated from the previous one."""
    fires: list[datetime] = []
    current = after
    for _ in range(count):
        following = trigger.get_next_run_at(current)
        assert following is not None
        fires.append(following)
        current = following
    return fires


def walk_until_none(trigger: PeriodicSchedule, after: datetime, limit: int = 100) -> list[datetime]:
    """Every fire after ``after`` until the trigger stops (at most ``limit``)."""
    fires: list[datetime] = []
    current: datetime | None = trigger.get_next_run_at(after)
    while current is not None:
        fires.append(current)
        assert len(fires) <= limit, "the trigger did not stop"
        current = trigger.get_next_run_at(current)
    return fires


def assert_utc(value: datetime | None) -> None:
    """``value`` is an aware datetime in UTC."""
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


def cron(**fields: Any) -> PeriodicSchedule:
    """A periodic schedule driven by ``CrontabTrigger(**fields)``."""
    return PeriodicSchedule(crontab=CrontabTrigger(**fields))


def every(**period: float) -> PeriodicSchedule:
    """A periodic schedule driven by ``IntervalTrigger(**period)``."""
    return PeriodicSchedule(interval=IntervalTrigger(**period))


# ---------------------------------------------------------------------------------------------
# ImmediateDispatch and OneOffSchedule
# ---------------------------------------------------------------------------------------------


def test_immediate_dispatch_never_fires_on_schedule() -> None:
    trigger = ImmediateDispatch()
    now = utc(2026, 1, 1)
    assert trigger.strategy is JobStrategy.IMMEDIATE
    assert trigger.first_run_at(now) is None
    assert trigger.get_next_run_at(now) is None


def test_one_off_fires_once_at_run_at() -> None:
    run_at = utc(2026, 6, 1, 12)
    trigger = OneOffSchedule(run_at=run_at)
    assert trigger.strategy is JobStrategy.ONE_OFF
    assert trigger.first_run_at(utc(2026, 1, 1)) == run_at
    assert trigger.get_next_run_at(run_at - MICROSECOND) == run_at
    assert trigger.get_next_run_at(run_at) is None
    assert trigger.get_next_run_at(run_at + SECOND) is None


def test_one_off_in_the_past_still_fires_once() -> None:
    run_at = utc(2020, 1, 1)
    trigger = OneOffSchedule(run_at=run_at)
    assert trigger.first_run_at(utc(2026, 1, 1)) == run_at
    assert trigger.get_next_run_at(run_at) is None


def test_one_off_run_at_is_stored_in_utc() -> None:
    local = datetime(2026, 7, 1, 8, 30, tzinfo=ZoneInfo(NEW_YORK))  # EDT, UTC-4
    trigger = OneOffSchedule(run_at=local)
    assert trigger.run_at == utc(2026, 7, 1, 12, 30)
    assert trigger.run_at.tzinfo is UTC


def test_one_off_accepts_an_iso_string_with_offset() -> None:
    trigger = OneOffSchedule(run_at="2026-07-01T14:30:00+02:00")  # type: ignore[arg-type]
    assert trigger.run_at == utc(2026, 7, 1, 12, 30)
    assert_utc(trigger.run_at)


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "period"),
    [
        ({"seconds": 90}, timedelta(seconds=90)),
        ({"minutes": 1.5}, timedelta(seconds=90)),
        ({"seconds": 0.25}, timedelta(milliseconds=250)),
        ({"hours": 0.5}, timedelta(minutes=30)),
        ({"days": 1, "hours": 12}, timedelta(hours=36)),
        ({"weeks": 2}, timedelta(days=14)),
        (
            {"weeks": 1, "days": 1, "hours": 1, "minutes": 1, "seconds": 1},
            timedelta(days=8, hours=1, minutes=1, seconds=1),
        ),
        ({"seconds": 0.000001}, MICROSECOND),
    ],
    ids=["90s", "1.5min", "quarter_second", "half_hour", "day_and_half", "weeks", "all", "1us"],
)
def test_interval_period(fields: dict[str, float], period: timedelta) -> None:
    assert IntervalTrigger(**fields).period == period


def test_interval_without_start_at_fires_period_after_after() -> None:
    schedule = every(minutes=5)
    after = utc(2026, 1, 1, 10, 3, 17, 250)
    assert schedule.strategy is JobStrategy.INTERVAL
    assert schedule.get_next_run_at(after) == after + timedelta(minutes=5)
    assert schedule.first_run_at(after) == after + timedelta(minutes=5)
    assert_utc(schedule.get_next_run_at(after))


def test_interval_of_90_seconds_fires_every_90_seconds() -> None:
    start = utc(2026, 1, 1, 10)
    fires = walk(every(seconds=90), start, 5)
    assert fires == [
        utc(2026, 1, 1, 10, 1, 30),
        utc(2026, 1, 1, 10, 3),
        utc(2026, 1, 1, 10, 4, 30),
        utc(2026, 1, 1, 10, 6),
        utc(2026, 1, 1, 10, 7, 30),
    ]


def test_interval_after_in_another_timezone_returns_utc() -> None:
    after = datetime(2026, 1, 1, 5, tzinfo=ZoneInfo(NEW_YORK))  # 10:00 UTC
    result = every(hours=1).get_next_run_at(after)
    assert result == utc(2026, 1, 1, 11)
    assert result is not None
    assert result.tzinfo is UTC


def test_interval_with_future_start_at_first_fires_at_start_at() -> None:
    start = utc(2026, 3, 1, 9)
    schedule = PeriodicSchedule(interval=IntervalTrigger(hours=2), start_at=start)
    now = utc(2026, 2, 1)
    assert schedule.first_run_at(now) == start
    assert schedule.first_run_at(start) == start  # start_at == now: fires at once
    assert schedule.get_next_run_at(now) == start
    assert schedule.get_next_run_at(start - MICROSECOND) == start
    assert schedule.get_next_run_at(start) == start + timedelta(hours=2)


def test_interval_with_past_start_at_stays_on_the_start_at_grid() -> None:
    start = utc(2026, 1, 1, 0, 0, 10)
    schedule = PeriodicSchedule(interval=IntervalTrigger(seconds=90), start_at=start)
    now = start + timedelta(seconds=90 * 2 + 45)  # halfway between grid points 2 and 3
    assert schedule.first_run_at(now) == start + timedelta(seconds=270)
    # from a point on the grid: the next point (strictly after)
    assert schedule.get_next_run_at(start + timedelta(seconds=270)) == start + timedelta(
        seconds=360
    )
    # from just before a point: that point
    assert schedule.get_next_run_at(start + timedelta(seconds=270) - MICROSECOND) == (
        start + timedelta(seconds=270)
    )
    # an off-grid after does not shift the grid
    assert walk(schedule, start + timedelta(seconds=1000, microseconds=3), 3) == [
        start + timedelta(seconds=1080),
        start + timedelta(seconds=1170),
        start + timedelta(seconds=1260),
    ]


def test_interval_end_at_stops_the_schedule() -> None:
    start = utc(2026, 1, 1, 12)
    end = start + timedelta(minutes=20)
    schedule = PeriodicSchedule(interval=IntervalTrigger(minutes=10), start_at=start, end_at=end)
    # a fire exactly at end_at still happens; nothing after it
    assert walk_until_none(schedule, start - SECOND) == [
        start,
        start + timedelta(minutes=10),
        end,
    ]
    assert schedule.get_next_run_at(end) is None
    assert schedule.first_run_at(end + SECOND) is None


def test_interval_end_at_without_start_at() -> None:
    end = utc(2026, 1, 1, 12)
    schedule = PeriodicSchedule(interval=IntervalTrigger(minutes=10), end_at=end)
    assert schedule.get_next_run_at(end - timedelta(minutes=10)) == end
    assert schedule.get_next_run_at(end - timedelta(minutes=9)) is None
    assert schedule.first_run_at(end - timedelta(minutes=5)) is None


def test_interval_counts_real_time_across_dst() -> None:
    # Midnight EST on the day New York springs forward; 24 real hours later it is 01:00 EDT.
    start = datetime(2026, 3, 8, 0, 0, tzinfo=ZoneInfo(NEW_YORK))
    schedule = PeriodicSchedule(interval=IntervalTrigger(days=1), start_at=start)
    assert schedule.start_at == utc(2026, 3, 8, 5)
    assert schedule.get_next_run_at(schedule.start_at) == utc(2026, 3, 9, 5)  # 01:00 EDT


# ---------------------------------------------------------------------------------------------
# Cron in UTC: hand-computed semantics
# ---------------------------------------------------------------------------------------------


def test_cron_defaults_fire_every_minute_on_second_zero() -> None:
    trigger = CrontabTrigger()
    assert trigger.expression == "* * * * * 0"
    assert walk(trigger, utc(2026, 1, 1, 10, 0, 30), 3) == [
        utc(2026, 1, 1, 10, 1),
        utc(2026, 1, 1, 10, 2),
        utc(2026, 1, 1, 10, 3),
    ]


def test_cron_next_is_strictly_after_to_the_microsecond() -> None:
    trigger = CrontabTrigger(minute="*/5")
    fire = utc(2026, 1, 1, 10, 5)
    assert trigger.get_next_run_at(fire - MICROSECOND) == fire
    assert trigger.get_next_run_at(fire) == utc(2026, 1, 1, 10, 10)
    assert trigger.get_next_run_at(fire + MICROSECOND) == utc(2026, 1, 1, 10, 10)
    every_second = CrontabTrigger(second="*")
    assert every_second.get_next_run_at(utc(2026, 1, 1, 10, 0, 0, 500_000)) == utc(
        2026, 1, 1, 10, 0, 1
    )
    assert every_second.get_next_run_at(utc(2026, 1, 1, 9, 59, 59, 999_999)) == utc(2026, 1, 1, 10)


def test_cron_seconds_field() -> None:
    trigger = CrontabTrigger(second="15,45", minute="0")
    assert walk(trigger, utc(2026, 1, 1, 9, 59), 4) == [
        utc(2026, 1, 1, 10, 0, 15),
        utc(2026, 1, 1, 10, 0, 45),
        utc(2026, 1, 1, 11, 0, 15),
        utc(2026, 1, 1, 11, 0, 45),
    ]


def test_cron_result_is_utc_whatever_the_timezone_of_after() -> None:
    trigger = CrontabTrigger(minute="0", hour="12")
    after = datetime(2026, 1, 1, 3, tzinfo=ZoneInfo("Asia/Tokyo"))  # 2025-12-31 18:00 UTC
    result = trigger.get_next_run_at(after)
    assert result == utc(2026, 1, 1, 12)
    assert result.tzinfo is UTC
    zoned = CrontabTrigger(minute="0", hour="12", timezone="Asia/Tokyo")
    zoned_result = zoned.get_next_run_at(after)
    assert zoned_result == utc(2026, 1, 1, 3)  # 12:00 JST
    assert_utc(zoned_result)


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_cron_sunday_is_0_and_7(sunday: str) -> None:
    # 2026-05-03 and 2026-05-10 are Sundays.
    trigger = CrontabTrigger(minute="30", hour="8", day_of_week=sunday)
    assert walk(trigger, utc(2026, 4, 30), 2) == [utc(2026, 5, 3, 8, 30), utc(2026, 5, 10, 8, 30)]


def test_cron_day_and_month_names() -> None:
    # 2026: Jan 5 and Jul 6 are the first Mondays of January and July.
    trigger = CrontabTrigger(
        minute="0", hour="0", day_of_month="1-7", month_of_year="jan,jul", day_of_week="mon"
    )
    # day_of_month and day_of_week both restricted: a day matching either fires.
    assert walk(trigger, utc(2025, 12, 31), 3) == [
        utc(2026, 1, 1),
        utc(2026, 1, 2),
        utc(2026, 1, 3),
    ]
    mondays = CrontabTrigger(minute="0", hour="0", month_of_year="jul", day_of_week="mon")
    assert walk(mondays, utc(2026, 1, 1), 2) == [utc(2026, 7, 6), utc(2026, 7, 13)]


def test_cron_last_day_of_month() -> None:
    trigger = CrontabTrigger(minute="0", hour="0", day_of_month="L")
    assert walk(trigger, utc(2026, 1, 15), 4) == [
        utc(2026, 1, 31),
        utc(2026, 2, 28),
        utc(2026, 3, 31),
        utc(2026, 4, 30),
    ]
    february = CrontabTrigger(minute="0", hour="0", day_of_month="L", month_of_year="feb")
    assert walk(february, utc(2026, 3, 1), 3) == [
        utc(2027, 2, 28),
        utc(2028, 2, 29),
        utc(2029, 2, 28),
    ]


def test_cron_day_of_month_or_day_of_week() -> None:
    # Friday or the 13th; 2026-02-13 and 2026-03-13 are Fridays.
    trigger = CrontabTrigger(minute="0", hour="0", day_of_month="13", day_of_week="fri")
    assert walk(trigger, utc(2026, 1, 31), 7) == [
        utc(2026, 2, 6),
        utc(2026, 2, 13),
        utc(2026, 2, 20),
        utc(2026, 2, 27),
        utc(2026, 3, 6),
        utc(2026, 3, 13),
        utc(2026, 3, 20),
    ]
    # Only the day of month restricted: just the 13th.
    thirteenth = CrontabTrigger(minute="0", hour="0", day_of_month="13")
    assert walk(thirteenth, utc(2026, 1, 31), 2) == [utc(2026, 2, 13), utc(2026, 3, 13)]


def test_cron_february_30_or_monday_is_satisfiable() -> None:
    # Impossible day of month, but the day-of-week alternative fires (Mondays in February).
    trigger = CrontabTrigger(
        minute="0", hour="0", day_of_month="30", month_of_year="2", day_of_week="mon"
    )
    assert walk(trigger, utc(2026, 1, 1), 2) == [utc(2026, 2, 2), utc(2026, 2, 9)]


def test_cron_leap_day() -> None:
    trigger = CrontabTrigger(minute="0", hour="0", day_of_month="29", month_of_year="2")
    assert walk(trigger, utc(2026, 1, 1), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]


def test_cron_integer_fields_and_whitespace() -> None:
    trigger = CrontabTrigger(second=5, minute=7, hour=" 9 ")  # type: ignore[arg-type]
    assert (trigger.second, trigger.minute, trigger.hour) == ("5", "7", "9")
    assert trigger.expression == "7 9 * * * 5"
    assert trigger == CrontabTrigger(second="5", minute="7", hour="9")
    assert trigger.get_next_run_at(utc(2026, 1, 1)) == utc(2026, 1, 1, 9, 7, 5)


def test_cron_without_timezone_is_utc() -> None:
    plain = CrontabTrigger(minute="15", hour="3")
    explicit = CrontabTrigger(minute="15", hour="3", timezone="UTC")
    after = utc(2026, 10, 25, 0, 30)
    assert (
        plain.get_next_run_at(after) == explicit.get_next_run_at(after) == utc(2026, 10, 25, 3, 15)
    )


def test_with_timezone_returns_a_new_validated_trigger() -> None:
    plain = CrontabTrigger(minute="0", hour="9")
    zoned = plain.with_timezone(BERLIN)
    assert zoned.timezone == BERLIN
    assert plain.timezone is None
    assert zoned == CrontabTrigger(minute="0", hour="9", timezone=BERLIN)
    assert zoned.get_next_run_at(utc(2026, 7, 1)) == utc(2026, 7, 1, 7)  # 09:00 CEST
    with pytest.raises(InvalidTriggerError) as caught:
        plain.with_timezone("Nowhere/Atlantis")
    assert caught.value.field == "CrontabTrigger.timezone"
    assert caught.value.value == "Nowhere/Atlantis"


@pytest.mark.parametrize(
    ("hour", "wildcard"),
    [("*", True), ("*/2", True), ("*/1", True), ("1", False), ("0-23", False), ("1,2", False)],
)
def test_hour_is_wildcard(hour: str, wildcard: bool) -> None:
    assert CrontabTrigger(hour=hour).hour_is_wildcard is wildcard


def test_resolve_timezone() -> None:
    assert resolve_timezone(BERLIN) == ZoneInfo(BERLIN)
    with pytest.raises(InvalidTriggerError) as caught:
        resolve_timezone("Nowhere/Atlantis")
    assert caught.value.field == "timezone"
    assert "timezone='Nowhere/Atlantis'" in str(caught.value)
    with pytest.raises(InvalidTriggerError) as custom:
        resolve_timezone("", field="config.default_timezone")
    assert custom.value.field == "config.default_timezone"


# ---------------------------------------------------------------------------------------------
# Cron agreement with croniter away from DST changes
# ---------------------------------------------------------------------------------------------

# (second, minute, hour, day_of_month, month_of_year, day_of_week)
CRON_SPECS: list[tuple[str, str, str, str, str, str]] = [
    ("0", "*/15", "*", "*", "*", "*"),
    ("*/10", "5-7", "*", "*", "*", "*"),
    ("0", "0", "9-17", "*", "*", "mon-fri"),
    ("59", "59", "23", "L", "*", "*"),
    ("0", "0", "12", "1,15", "*", "sun"),
    ("0", "0", "0", "13", "*", "fri"),
    ("0", "0", "0", "1", "jan,jul", "*"),
    ("0", "30", "8", "*", "*", "7"),
    ("0", "30", "8", "*", "*", "0"),
    ("0", "0", "0", "29", "feb", "*"),
    ("0", "0", "6", "1-7", "*", "mon"),
    ("0", "0", "*/6", "*", "*", "sat,sun"),
    ("0", "*/7", "*", "*", "*", "*"),
    ("0", "30", "3-23/2", "*", "*", "*"),
    ("0", "0", "0", "L", "2", "*"),
    ("0", "0", "10", "*", "*", "fri#3"),
    ("15", "45", "3", "1", "1-12/3", "*"),
    ("0,30", "0", "0,12", "*", "*", "*"),
    ("0", "0", "4", "*", "MAR-MAY", "TUE,THU"),
]
CRON_SPEC_IDS = [
    "every_15_minutes",
    "seconds_step_in_minute_range",
    "business_hours_weekdays",
    "last_day_of_month_last_second",
    "dom_list_or_sunday",
    "friday_or_13th",
    "month_names",
    "sunday_as_7",
    "sunday_as_0",
    "leap_day",
    "first_week_or_monday",
    "weekend_every_6_hours",
    "minute_step_7",
    "hour_range_with_step",
    "last_day_of_february",
    "third_friday",
    "quarterly_month_step",
    "lists",
    "upper_case_names",
]
# Starting points, and the timezones to evaluate in: none of these specs fires between 01:00
# and 03:00 local time, the only hours New York and Berlin change their clocks.
CRON_STARTS = [utc(2026, 5, 3, 10, 17, 23, 123_456), utc(2027, 1, 30, 23, 59, 59)]
CRON_ZONES = [None, NEW_YORK, BERLIN, KOLKATA]
CRON_FIRES = 8


def croniter_fires(
    spec: tuple[str, str, str, str, str, str], zone_name: str | None, after: datetime
) -> list[datetime]:
    """The next fires by croniter itself: naive local wall times, made aware with zoneinfo."""
    second, minute, hour, day_of_month, month_of_year, day_of_week = spec
    expression = f"{minute} {hour} {day_of_month} {month_of_year} {day_of_week} {second}"
    zone = ZoneInfo(zone_name) if zone_name else UTC
    iterator = croniter(expression, after.astimezone(zone).replace(tzinfo=None))
    fires: list[datetime] = []
    for _ in range(CRON_FIRES):
        wall: datetime = iterator.get_next(datetime)
        first = wall.replace(tzinfo=zone, fold=0)
        second_pass = wall.replace(tzinfo=zone, fold=1)
        # the comparison is only meaningful for wall times that exist exactly once
        assert first.utcoffset() == second_pass.utcoffset(), f"{wall} is a DST edge"
        fires.append(first.astimezone(UTC))
    return fires


@pytest.mark.parametrize("after", CRON_STARTS, ids=["may_2026", "end_of_january_2027"])
@pytest.mark.parametrize("zone_name", CRON_ZONES, ids=["utc", "new_york", "berlin", "kolkata"])
@pytest.mark.parametrize("spec", CRON_SPECS, ids=CRON_SPEC_IDS)
def test_cron_agrees_with_croniter(
    spec: tuple[str, str, str, str, str, str], zone_name: str | None, after: datetime
) -> None:
    second, minute, hour, day_of_month, month_of_year, day_of_week = spec
    trigger = CrontabTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
        timezone=zone_name,
    )
    fires = walk(trigger, after, CRON_FIRES)
    assert fires == croniter_fires(spec, zone_name, after)
    for fire in fires:
        assert_utc(fire)


# ---------------------------------------------------------------------------------------------
# Cron across DST changes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone_name", "instant", "offset_before", "offset_after"),
    [
        (NEW_YORK, utc(2026, 3, 8, 7), -5 * 60, -4 * 60),
        (NEW_YORK, utc(2026, 11, 1, 6), -4 * 60, -5 * 60),
        (BERLIN, utc(2026, 3, 29, 1), 60, 120),
        (BERLIN, utc(2026, 10, 25, 1), 120, 60),
        (LONDON, utc(2026, 10, 25, 1), 60, 0),
        (LORD_HOWE, utc(2026, 4, 4, 15), 11 * 60, 10 * 60 + 30),
        (LORD_HOWE, utc(2026, 10, 3, 15, 30), 10 * 60 + 30, 11 * 60),
        (CHATHAM, utc(2026, 9, 26, 14), 12 * 60 + 45, 13 * 60 + 45),
        (SANTIAGO, utc(2026, 4, 5, 3), -3 * 60, -4 * 60),
        (SANTIAGO, utc(2026, 9, 6, 4), -4 * 60, -3 * 60),
    ],
    ids=[
        "ny_spring",
        "ny_fall",
        "berlin_spring",
        "berlin_fall",
        "london_fall",
        "lord_howe_fall",
        "lord_howe_spring",
        "chatham_spring",
        "santiago_fall",
        "santiago_spring",
    ],
)
def test_tzdata_transitions_assumed_below(
    zone_name: str, instant: datetime, offset_before: int, offset_after: int
) -> None:
    """The DST cases below were computed by hand from these transitions."""
    zone = ZoneInfo(zone_name)
    assert (instant - MICROSECOND).astimezone(zone).utcoffset() == timedelta(minutes=offset_before)
    assert instant.astimezone(zone).utcoffset() == timedelta(minutes=offset_after)


@dataclass(frozen=True)
class DstCase:
    """A cron in a named timezone, a start, and every fire after it up to the last listed."""

    trigger: CrontabTrigger
    after: datetime
    expected: list[datetime]


DST_CASES: dict[str, DstCase] = {
    # New York springs forward 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC).
    "spring_gap_fixed_time_ny": DstCase(
        CrontabTrigger(minute="30", hour="2", timezone=NEW_YORK),
        utc(2026, 3, 6, 12),
        [
            utc(2026, 3, 7, 7, 30),  # 02:30 EST
            utc(2026, 3, 8, 7),  # 02:30 does not exist: 03:00 EDT, the end of the gap
            utc(2026, 3, 9, 6, 30),  # 02:30 EDT
            utc(2026, 3, 10, 6, 30),
        ],
    ),
    "spring_gap_whole_missing_hour_fires_once_ny": DstCase(
        CrontabTrigger(minute="*", hour="2", timezone=NEW_YORK),
        utc(2026, 3, 7, 7, 58),
        [
            utc(2026, 3, 7, 7, 59),  # 02:59 EST
            utc(2026, 3, 8, 7),  # 02:00..02:59 all missing: one fire at 03:00 EDT
            utc(2026, 3, 9, 6),  # 02:00 EDT
            utc(2026, 3, 9, 6, 1),
        ],
    ),
    "spring_wildcard_hour_ny": DstCase(
        CrontabTrigger(minute="*/30", hour="*", timezone=NEW_YORK),
        utc(2026, 3, 8, 5, 45),
        [
            utc(2026, 3, 8, 6),  # 01:00 EST
            utc(2026, 3, 8, 6, 30),  # 01:30 EST
            utc(2026, 3, 8, 7),  # 02:00, 02:30 (missing) and 03:00 EDT: one fire
            utc(2026, 3, 8, 7, 30),  # 03:30 EDT
            utc(2026, 3, 8, 8),  # 04:00 EDT
        ],
    ),
    "spring_gap_seconds_ny": DstCase(
        CrontabTrigger(second="*/20", minute="59", hour="1,2", timezone=NEW_YORK),
        utc(2026, 3, 8, 6, 58),
        [
            utc(2026, 3, 8, 6, 59),  # 01:59:00 EST
            utc(2026, 3, 8, 6, 59, 20),
            utc(2026, 3, 8, 6, 59, 40),
            utc(2026, 3, 8, 7),  # 02:59:00/20/40 missing: one fire at 03:00 EDT
            utc(2026, 3, 9, 5, 59),  # 01:59:00 EDT
        ],
    ),
    # New York falls back 2026-11-01 02:00 EDT -> 01:00 EST (06:00 UTC).
    "fall_back_fixed_time_ny_first_occurrence": DstCase(
        CrontabTrigger(minute="30", hour="1", timezone=NEW_YORK),
        utc(2026, 10, 30, 12),
        [
            utc(2026, 10, 31, 5, 30),  # 01:30 EDT
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT; not again at 01:30 EST
            utc(2026, 11, 2, 6, 30),  # 01:30 EST
            utc(2026, 11, 3, 6, 30),
        ],
    ),
    "fall_back_fixed_hour_minute_steps_ny": DstCase(
        CrontabTrigger(minute="*/30", hour="1", timezone=NEW_YORK),
        utc(2026, 11, 1, 4),
        [
            utc(2026, 11, 1, 5),  # 01:00 EDT
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT
            utc(2026, 11, 2, 6),  # 01:00 EST the next day
            utc(2026, 11, 2, 6, 30),
        ],
    ),
    "fall_back_fixed_hour_range_ny": DstCase(
        CrontabTrigger(minute="0", hour="0-2", timezone=NEW_YORK),
        utc(2026, 11, 1, 3),
        [
            utc(2026, 11, 1, 4),  # 00:00 EDT
            utc(2026, 11, 1, 5),  # 01:00 EDT (not 01:00 EST: the hour field is not `*`)
            utc(2026, 11, 1, 7),  # 02:00 EST
            utc(2026, 11, 2, 5),  # 00:00 EST
        ],
    ),
    "fall_back_wildcard_hour_real_time_ny": DstCase(
        CrontabTrigger(minute="*/30", hour="*", timezone=NEW_YORK),
        utc(2026, 11, 1, 4, 15),
        [
            utc(2026, 11, 1, 4, 30),  # 00:30 EDT
            utc(2026, 11, 1, 5),  # 01:00 EDT
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT
            utc(2026, 11, 1, 6),  # 01:00 EST
            utc(2026, 11, 1, 6, 30),  # 01:30 EST
            utc(2026, 11, 1, 7),  # 02:00 EST
            utc(2026, 11, 1, 7, 30),  # 02:30 EST
        ],
    ),
    "fall_back_step_hour_real_time_ny": DstCase(
        CrontabTrigger(minute="0", hour="*/1", timezone=NEW_YORK),
        utc(2026, 11, 1, 3, 30),
        [
            utc(2026, 11, 1, 4),  # 00:00 EDT
            utc(2026, 11, 1, 5),  # 01:00 EDT
            utc(2026, 11, 1, 6),  # 01:00 EST
            utc(2026, 11, 1, 7),  # 02:00 EST
            utc(2026, 11, 1, 8),  # 03:00 EST
        ],
    ),
    "fall_back_from_inside_repeated_hour_first_pass": DstCase(
        CrontabTrigger(minute="*/30", hour="*", timezone=NEW_YORK),
        utc(2026, 11, 1, 5, 10),  # 01:10 EDT
        [
            utc(2026, 11, 1, 5, 30),  # 01:30 EDT
            utc(2026, 11, 1, 6),  # 01:00 EST
            utc(2026, 11, 1, 6, 30),  # 01:30 EST
            utc(2026, 11, 1, 7),  # 02:00 EST
        ],
    ),
    "fall_back_from_inside_repeated_hour_first_pass_earlier_minute": DstCase(
        CrontabTrigger(minute="10", hour="*", timezone=NEW_YORK),
        utc(2026, 11, 1, 5, 20),  # 01:20 EDT, after 01:10 EDT fired
        [
            utc(2026, 11, 1, 6, 10),  # 01:10 EST, the second pass
            utc(2026, 11, 1, 7, 10),  # 02:10 EST
        ],
    ),
    "fall_back_from_inside_repeated_hour_second_pass": DstCase(
        CrontabTrigger(minute="*/30", hour="*", timezone=NEW_YORK),
        utc(2026, 11, 1, 6, 10),  # 01:10 EST
        [
            utc(2026, 11, 1, 6, 30),  # 01:30 EST
            utc(2026, 11, 1, 7),  # 02:00 EST
            utc(2026, 11, 1, 7, 30),  # 02:30 EST
        ],
    ),
    "fall_back_from_inside_repeated_hour_fixed_time_first_pass": DstCase(
        CrontabTrigger(minute="45", hour="1", timezone=NEW_YORK),
        utc(2026, 11, 1, 5, 10),  # 01:10 EDT
        [
            utc(2026, 11, 1, 5, 45),  # 01:45 EDT
            utc(2026, 11, 2, 6, 45),  # 01:45 EST the next day; not 01:45 EST today
        ],
    ),
    "fall_back_from_inside_repeated_hour_fixed_time_second_pass": DstCase(
        CrontabTrigger(minute="45", hour="1", timezone=NEW_YORK),
        utc(2026, 11, 1, 6, 10),  # 01:10 EST: 01:45 EDT already fired
        [
            utc(2026, 11, 2, 6, 45),  # 01:45 EST the next day
            utc(2026, 11, 3, 6, 45),
        ],
    ),
    "fall_back_every_20_seconds_across_the_change_ny": DstCase(
        CrontabTrigger(second="*/20", minute="*", hour="*", timezone=NEW_YORK),
        utc(2026, 11, 1, 5, 59, 10),  # 01:59:10 EDT
        [
            utc(2026, 11, 1, 5, 59, 20),  # 01:59:20 EDT
            utc(2026, 11, 1, 5, 59, 40),  # 01:59:40 EDT
            utc(2026, 11, 1, 6),  # 01:00:00 EST
            utc(2026, 11, 1, 6, 0, 20),  # 01:00:20 EST
        ],
    ),
    "fall_back_every_20_seconds_fixed_hour_second_pass_ny": DstCase(
        CrontabTrigger(second="*/20", minute="*", hour="1", timezone=NEW_YORK),
        utc(2026, 11, 1, 5, 59, 10),  # 01:59:10 EDT
        [
            utc(2026, 11, 1, 5, 59, 20),  # 01:59:20 EDT
            utc(2026, 11, 1, 5, 59, 40),  # 01:59:40 EDT; hour 1 does not fire again in EST
            utc(2026, 11, 2, 6),  # 01:00:00 EST the next day
            utc(2026, 11, 2, 6, 0, 20),
        ],
    ),
    # Berlin springs forward 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC).
    "spring_wildcard_hour_berlin": DstCase(
        CrontabTrigger(minute="15", hour="*", timezone=BERLIN),
        utc(2026, 3, 28, 23, 30),  # 00:30 CET
        [
            utc(2026, 3, 29, 0, 15),  # 01:15 CET
            utc(2026, 3, 29, 1),  # 02:15 missing: 03:00 CEST
            utc(2026, 3, 29, 1, 15),  # 03:15 CEST
            utc(2026, 3, 29, 2, 15),  # 04:15 CEST
        ],
    ),
    "spring_gap_fixed_time_berlin": DstCase(
        CrontabTrigger(minute="30", hour="2", timezone=BERLIN),
        utc(2026, 3, 27, 12),
        [
            utc(2026, 3, 28, 1, 30),  # 02:30 CET
            utc(2026, 3, 29, 1),  # missing: 03:00 CEST
            utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        ],
    ),
    # Berlin falls back 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC).
    "fall_back_step_hour_real_time_berlin": DstCase(
        CrontabTrigger(minute="30", hour="*/2", timezone=BERLIN),
        utc(2026, 10, 24, 21),  # 23:00 CEST
        [
            utc(2026, 10, 24, 22, 30),  # 00:30 CEST
            utc(2026, 10, 25, 0, 30),  # 02:30 CEST
            utc(2026, 10, 25, 1, 30),  # 02:30 CET
            utc(2026, 10, 25, 3, 30),  # 04:30 CET
            utc(2026, 10, 25, 5, 30),  # 06:30 CET
        ],
    ),
    "fall_back_fixed_time_berlin_first_occurrence": DstCase(
        CrontabTrigger(minute="30", hour="2", timezone=BERLIN),
        utc(2026, 10, 23, 12),
        [
            utc(2026, 10, 24, 0, 30),  # 02:30 CEST
            utc(2026, 10, 25, 0, 30),  # 02:30 CEST, first occurrence only
            utc(2026, 10, 26, 1, 30),  # 02:30 CET
        ],
    ),
    # London falls back 2026-10-25 02:00 BST -> 01:00 GMT (01:00 UTC).
    "fall_back_wildcard_hour_london": DstCase(
        CrontabTrigger(minute="0", hour="*", timezone=LONDON),
        utc(2026, 10, 24, 22, 30),
        [
            utc(2026, 10, 24, 23),  # 00:00 BST
            utc(2026, 10, 25, 0),  # 01:00 BST
            utc(2026, 10, 25, 1),  # 01:00 GMT
            utc(2026, 10, 25, 2),  # 02:00 GMT
        ],
    ),
    # Lord Howe Island shifts by 30 minutes: 2026-04-05 02:00 (+11) -> 01:30 (+10:30) at
    # 2026-04-04 15:00 UTC, and 2026-10-04 02:00 (+10:30) -> 02:30 (+11) at 2026-10-03 15:30 UTC.
    "lord_howe_half_hour_shift": DstCase(
        CrontabTrigger(minute="*/15", hour="*", timezone=LORD_HOWE),
        utc(2026, 4, 4, 13, 50),  # 00:50 +11
        [
            utc(2026, 4, 4, 14),  # 01:00 +11
            utc(2026, 4, 4, 14, 15),  # 01:15 +11
            utc(2026, 4, 4, 14, 30),  # 01:30 +11
            utc(2026, 4, 4, 14, 45),  # 01:45 +11
            utc(2026, 4, 4, 15),  # 01:30 +10:30
            utc(2026, 4, 4, 15, 15),  # 01:45 +10:30
            utc(2026, 4, 4, 15, 30),  # 02:00 +10:30
            utc(2026, 4, 4, 15, 45),  # 02:15 +10:30
        ],
    ),
    "lord_howe_half_hour_fixed_time_first_occurrence": DstCase(
        CrontabTrigger(minute="45", hour="1", timezone=LORD_HOWE),
        utc(2026, 4, 3, 12),
        [
            utc(2026, 4, 3, 14, 45),  # 04-04 01:45 +11
            utc(2026, 4, 4, 14, 45),  # 04-05 01:45 +11, first occurrence only
            utc(2026, 4, 5, 15, 15),  # 04-06 01:45 +10:30
        ],
    ),
    "lord_howe_half_hour_gap": DstCase(
        CrontabTrigger(minute="*/15", hour="*", timezone=LORD_HOWE),
        utc(2026, 10, 3, 15),  # 01:30 +10:30
        [
            utc(2026, 10, 3, 15, 15),  # 01:45 +10:30
            utc(2026, 10, 3, 15, 30),  # 02:00, 02:15 (missing) and 02:30 +11: one fire
            utc(2026, 10, 3, 15, 45),  # 02:45 +11
            utc(2026, 10, 3, 16),  # 03:00 +11
        ],
    ),
    # Chatham springs forward 45 minutes: 2026-09-27 02:45 (+12:45) -> 03:45 (+13:45).
    "chatham_45_minute_gap": DstCase(
        CrontabTrigger(minute="0", hour="3", timezone=CHATHAM),
        utc(2026, 9, 25, 12),
        [
            utc(2026, 9, 25, 14, 15),  # 09-26 03:00 +12:45
            utc(2026, 9, 26, 14),  # 09-27 03:00 missing: 03:45 +13:45
            utc(2026, 9, 27, 13, 15),  # 09-28 03:00 +13:45
        ],
    ),
    # Santiago changes at midnight: 2026-09-06 00:00 (-04) -> 01:00 (-03), and
    # 2026-04-05 00:00 (-03) -> 2026-04-04 23:00 (-04).
    "santiago_missing_midnight": DstCase(
        CrontabTrigger(minute="0", hour="0", timezone=SANTIAGO),
        utc(2026, 9, 4, 12),
        [
            utc(2026, 9, 5, 4),  # 09-05 00:00 -04
            utc(2026, 9, 6, 4),  # 09-06 00:00 missing: 01:00 -03
            utc(2026, 9, 7, 3),  # 09-07 00:00 -03
        ],
    ),
    "santiago_repeated_hour_before_midnight": DstCase(
        CrontabTrigger(minute="30", hour="23", timezone=SANTIAGO),
        utc(2026, 4, 3, 12),
        [
            utc(2026, 4, 4, 2, 30),  # 04-03 23:30 -03
            utc(2026, 4, 5, 2, 30),  # 04-04 23:30 -03, first occurrence only
            utc(2026, 4, 6, 3, 30),  # 04-05 23:30 -04
        ],
    ),
}
DST_IDS = list(DST_CASES)


@pytest.mark.parametrize("case", list(DST_CASES.values()), ids=DST_IDS)
def test_dst_fires(case: DstCase) -> None:
    fires = walk(case.trigger, case.after, len(case.expected))
    assert fires == case.expected
    for fire in fires:
        assert_utc(fire)


def _probes(case: DstCase) -> Iterator[datetime]:
    """``after`` values: a 7-minute grid over the case, and each fire and its neighbours."""
    probe = case.after
    while probe < case.expected[-1]:
        yield probe
        probe += timedelta(minutes=7)
    for fire in case.expected[:-1]:
        for delta in (-SECOND, -MICROSECOND, timedelta(0), MICROSECOND, SECOND):
            if case.after <= fire + delta < case.expected[-1]:
                yield fire + delta


@pytest.mark.parametrize("case", list(DST_CASES.values()), ids=DST_IDS)
def test_dst_next_fire_from_any_after(case: DstCase) -> None:
    """From any ``after`` the next fire is the first listed fire strictly after it."""
    for after in _probes(case):
        expected = min(fire for fire in case.expected if fire > after)
        assert case.trigger.get_next_run_at(after) == expected, f"after={after.isoformat()}"


@pytest.mark.parametrize("case", list(DST_CASES.values()), ids=DST_IDS)
def test_dst_latest_due_fire(case: DstCase) -> None:
    schedule = PeriodicSchedule(crontab=case.trigger)
    first = case.expected[0]
    for index in range(len(case.expected) - 1):
        fire, following = case.expected[index], case.expected[index + 1]
        assert latest_due_fire(schedule, first, fire) == (fire, following)
        assert latest_due_fire(schedule, first, following - MICROSECOND) == (fire, following)


@pytest.mark.parametrize(
    ("fields", "after", "expected"),
    [
        ({"second": "*"}, utc(2026, 11, 1, 5, 0, 30), utc(2026, 11, 1, 5, 0, 31)),
        ({"second": "*"}, utc(2026, 11, 1, 5, 59, 59), utc(2026, 11, 1, 6)),
        ({"second": "*"}, utc(2026, 11, 1, 6, 10, 30), utc(2026, 11, 1, 6, 10, 31)),
        ({"second": "*", "hour": "1"}, utc(2026, 11, 1, 5, 0, 30), utc(2026, 11, 1, 5, 0, 31)),
        ({"second": "*", "hour": "1"}, utc(2026, 11, 1, 6, 0, 1), utc(2026, 11, 2, 6)),
        ({"second": "*", "minute": "0", "hour": "*"}, utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6)),
    ],
    ids=[
        "wildcard_first_pass",
        "wildcard_end_of_first_pass",
        "wildcard_second_pass",
        "fixed_hour_first_pass",
        "fixed_hour_second_pass",
        "wildcard_sparse_first_pass",
    ],
)
def test_dense_cron_inside_repeated_hour_is_cheap(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, str], after: datetime, expected: datetime
) -> None:
    """Inside a repeated hour a cron firing every second does not visit every second of it."""
    trigger = CrontabTrigger(timezone=NEW_YORK, **fields)
    steps = 0
    original: Callable[..., Any] = croniter.get_next

    def counting(self: croniter, *args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(croniter, "get_next", counting)
    assert trigger.get_next_run_at(after) == expected
    assert steps <= 5


def test_fall_back_wildcard_walk_in_new_york_local_time() -> None:
    """The brief's example, read back as New York wall-clock times with their offsets."""
    zone = ZoneInfo(NEW_YORK)
    trigger = CrontabTrigger(minute="*/30", hour="*", timezone=NEW_YORK)
    fires = walk(trigger, datetime(2026, 11, 1, 0, 45, tzinfo=zone), 5)
    assert [fire.astimezone(zone).strftime("%H:%M %Z") for fire in fires] == [
        "01:00 EDT",
        "01:30 EDT",
        "01:00 EST",
        "01:30 EST",
        "02:00 EST",
    ]


# ---------------------------------------------------------------------------------------------
# PeriodicSchedule(crontab=...)
# ---------------------------------------------------------------------------------------------


def test_cron_schedule_strategy_and_next() -> None:
    schedule = cron(minute="*/5")
    assert schedule.strategy is JobStrategy.CRONTAB
    assert schedule.first_run_at(utc(2026, 1, 1, 10, 1)) == utc(2026, 1, 1, 10, 5)
    assert schedule.get_next_run_at(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 10)


def test_cron_schedule_future_start_at_on_a_fire_fires_at_start_at() -> None:
    start = utc(2026, 2, 1, 10, 15)
    schedule = PeriodicSchedule(crontab=CrontabTrigger(minute="*/15"), start_at=start)
    assert schedule.first_run_at(utc(2026, 1, 1)) == start
    assert schedule.get_next_run_at(utc(2026, 1, 1)) == start
    assert schedule.get_next_run_at(start) == start + timedelta(minutes=15)


def test_cron_schedule_future_start_at_between_fires() -> None:
    start = utc(2026, 2, 1, 10, 16)
    schedule = PeriodicSchedule(crontab=CrontabTrigger(minute="*/15"), start_at=start)
    assert schedule.first_run_at(utc(2026, 1, 1)) == utc(2026, 2, 1, 10, 30)
    assert schedule.get_next_run_at(start - timedelta(days=3)) == utc(2026, 2, 1, 10, 30)


def test_cron_schedule_past_start_at_fires_after_now() -> None:
    schedule = PeriodicSchedule(crontab=CrontabTrigger(minute="*/15"), start_at=utc(2020, 1, 1))
    assert schedule.first_run_at(utc(2026, 1, 1, 10, 1)) == utc(2026, 1, 1, 10, 15)


def test_cron_schedule_end_at_stops_it() -> None:
    schedule = PeriodicSchedule(
        crontab=CrontabTrigger(minute="0", hour="*/6"),
        start_at=utc(2026, 1, 1, 5),
        end_at=utc(2026, 1, 2, 6),
    )
    assert walk_until_none(schedule, utc(2025, 12, 1)) == [
        utc(2026, 1, 1, 6),
        utc(2026, 1, 1, 12),
        utc(2026, 1, 1, 18),
        utc(2026, 1, 2, 0),
        utc(2026, 1, 2, 6),  # exactly end_at: still fires
    ]
    assert schedule.first_run_at(utc(2026, 1, 2, 6)) is None


def test_cron_schedule_bounds_in_another_timezone() -> None:
    zone = ZoneInfo(BERLIN)
    schedule = PeriodicSchedule(
        crontab=CrontabTrigger(minute="0", hour="9", timezone=BERLIN),
        start_at=datetime(2026, 7, 1, 9, tzinfo=zone),
    )
    assert schedule.start_at == utc(2026, 7, 1, 7)
    assert schedule.start_at is not None
    assert schedule.start_at.tzinfo is UTC
    assert schedule.first_run_at(utc(2026, 6, 1)) == utc(2026, 7, 1, 7)


# ---------------------------------------------------------------------------------------------
# next_due_fire: the misfire grace
# ---------------------------------------------------------------------------------------------

GRACE = timedelta(seconds=30)


def test_next_due_fire_sends_a_fire_within_the_grace_as_scheduled() -> None:
    schedule = every(seconds=5)
    first_due = utc(2026, 1, 1, 12)
    for late in (0, 4.9, 5, 29.999999, 30):
        now = first_due + timedelta(seconds=late)
        assert next_due_fire(schedule, first_due, now, GRACE) == (
            first_due,
            first_due + timedelta(seconds=5),
        ), late


def test_next_due_fire_skips_missed_fires_when_one_within_the_grace_follows() -> None:
    schedule = every(seconds=5)
    first_due = utc(2026, 1, 1, 12)
    now = first_due + timedelta(seconds=52)  # 0..50 due; 25..50 within 30 s
    assert next_due_fire(schedule, first_due, now, GRACE) == (
        first_due + timedelta(seconds=25),
        first_due + timedelta(seconds=30),
    )


def test_next_due_fire_coalesces_missed_fires_when_none_within_the_grace_follows() -> None:
    schedule = every(seconds=3600)
    first_due = utc(2026, 1, 1, 12)
    now = first_due + timedelta(hours=5, seconds=31)
    assert next_due_fire(schedule, first_due, now, GRACE) == (
        first_due + timedelta(hours=5),
        first_due + timedelta(hours=6),
    )
    one_off = OneOffSchedule(run_at=first_due)
    assert next_due_fire(one_off, first_due, first_due + timedelta(days=3), GRACE) == (
        first_due,
        None,
    )


def test_next_due_fire_without_grace_is_latest_due_fire() -> None:
    schedule = CRON_EVERY_MINUTE = PeriodicSchedule(crontab=CrontabTrigger(minute="*"))
    first_due = utc(2026, 1, 1, 12)
    now = first_due + timedelta(minutes=90, seconds=1)
    assert next_due_fire(CRON_EVERY_MINUTE, first_due, now, timedelta(0)) == latest_due_fire(
        schedule, first_due, now
    )


def test_next_due_fire_respects_end_at() -> None:
    start = utc(2026, 1, 1)
    schedule = PeriodicSchedule(
        interval=IntervalTrigger(seconds=10), start_at=start, end_at=start + timedelta(seconds=20)
    )
    assert next_due_fire(
        schedule, start + timedelta(seconds=20), start + timedelta(minutes=9), GRACE
    ) == (
        start + timedelta(seconds=20),
        None,
    )
    assert next_due_fire(
        schedule, start + timedelta(seconds=10), start + timedelta(seconds=25), GRACE
    ) == (
        start + timedelta(seconds=10),
        start + timedelta(seconds=20),
    )


# ---------------------------------------------------------------------------------------------
# latest_due_fire
# ---------------------------------------------------------------------------------------------


def test_latest_due_fire_interval_without_start_at() -> None:
    period = timedelta(seconds=90)
    schedule = every(seconds=90)
    first_due = utc(2026, 1, 1, 12, 0, 7)
    assert latest_due_fire(schedule, first_due, first_due) == (first_due, first_due + period)
    assert latest_due_fire(schedule, first_due, first_due + period - MICROSECOND) == (
        first_due,
        first_due + period,
    )
    now = first_due + 10 * period + timedelta(seconds=45)
    assert latest_due_fire(schedule, first_due, now) == (
        first_due + 10 * period,
        first_due + 11 * period,
    )


def test_latest_due_fire_interval_stays_on_start_at_grid() -> None:
    period = timedelta(seconds=90)
    start = utc(2026, 1, 1, 0, 0, 10)
    schedule = PeriodicSchedule(interval=IntervalTrigger(seconds=90), start_at=start)
    now = start + 7 * period + timedelta(seconds=30)
    assert latest_due_fire(schedule, start + 3 * period, now) == (
        start + 7 * period,
        start + 8 * period,
    )


def test_latest_due_fire_interval_end_at_inside_the_outage() -> None:
    period = timedelta(minutes=10)
    start = utc(2026, 1, 1)
    schedule = PeriodicSchedule(
        interval=IntervalTrigger(minutes=10), start_at=start, end_at=start + 5 * period + SECOND
    )
    assert latest_due_fire(schedule, start, start + 20 * period) == (start + 5 * period, None)


def test_latest_due_fire_interval_very_long_outage() -> None:
    schedule = every(seconds=1)
    first_due = utc(2016, 1, 1)
    now = utc(2026, 1, 1, 0, 0, 0, 1)
    assert latest_due_fire(schedule, first_due, now) == (utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 1))


def test_latest_due_fire_cron() -> None:
    schedule = cron(minute="*/5")
    first_due = utc(2026, 1, 1, 10)
    assert latest_due_fire(schedule, first_due, first_due) == (first_due, utc(2026, 1, 1, 10, 5))
    assert latest_due_fire(schedule, first_due, utc(2026, 1, 1, 10, 17, 30)) == (
        utc(2026, 1, 1, 10, 15),
        utc(2026, 1, 1, 10, 20),
    )
    assert latest_due_fire(schedule, first_due, utc(2026, 1, 1, 10, 15)) == (
        utc(2026, 1, 1, 10, 15),
        utc(2026, 1, 1, 10, 20),
    )


def test_latest_due_fire_cron_end_at_inside_the_outage() -> None:
    schedule = PeriodicSchedule(crontab=CrontabTrigger(minute="0"), end_at=utc(2026, 1, 5, 7, 30))
    assert latest_due_fire(schedule, utc(2026, 1, 1), utc(2026, 2, 1)) == (
        utc(2026, 1, 5, 7),
        None,
    )


def test_latest_due_fire_one_off_and_immediate() -> None:
    run_at = utc(2026, 1, 1)
    assert latest_due_fire(OneOffSchedule(run_at=run_at), run_at, utc(2026, 2, 1)) == (run_at, None)
    assert latest_due_fire(ImmediateDispatch(), run_at, utc(2026, 2, 1)) == (run_at, None)


LATEST_DUE_SPECS: list[dict[str, str]] = [
    {"minute": "*/5"},
    {"second": "*/7", "minute": "*/10"},
    {"minute": "0", "hour": "9-17", "day_of_week": "tue-sat"},
    {"minute": "*/10", "hour": "*", "timezone": NEW_YORK},
    {"minute": "30", "hour": "1", "timezone": NEW_YORK},
    {"second": "*", "minute": "0-4", "hour": "0"},
]


@pytest.mark.parametrize(
    "fields",
    LATEST_DUE_SPECS,
    ids=["5min", "7s", "business_hours", "ny_10min_wildcard", "ny_fixed_1_30", "bursts"],
)
@pytest.mark.parametrize(
    "now",
    [utc(2026, 10, 31, 17, 3, 4, 5), utc(2026, 11, 1, 5, 44), utc(2026, 11, 1, 6, 12, 31)],
    ids=["before_fall_back", "first_pass", "second_pass"],
)
def test_latest_due_fire_matches_walking_every_fire(fields: dict[str, str], now: datetime) -> None:
    schedule = cron(**fields)
    first_due = schedule.get_next_run_at(utc(2026, 10, 31, 0, 0, 0, 1))
    assert first_due is not None
    assert first_due <= now
    latest, following = first_due, schedule.get_next_run_at(first_due)
    while following is not None and following <= now:
        latest, following = following, schedule.get_next_run_at(following)
    assert latest_due_fire(schedule, first_due, now) == (latest, following)


LONG_OUTAGES: list[tuple[dict[str, str], datetime, datetime, datetime, datetime]] = [
    # (cron fields, first_due, now, latest fire <= now, first fire > now)
    (
        {"second": "*"},
        utc(2026, 1, 1),
        utc(2026, 1, 31, 0, 0, 0, 500_000),
        utc(2026, 1, 31),
        utc(2026, 1, 31, 0, 0, 1),
    ),
    (
        {"second": "*", "hour": "0-11"},
        utc(2026, 1, 1),
        utc(2026, 1, 3, 23, 59),
        utc(2026, 1, 3, 11, 59, 59),
        utc(2026, 1, 4),
    ),
    (
        {"second": "*", "day_of_month": "1-3"},
        utc(2026, 1, 1),
        utc(2026, 1, 31),
        utc(2026, 1, 3, 23, 59, 59),
        utc(2026, 2, 1),
    ),
    (
        {"second": "*", "timezone": NEW_YORK},
        utc(2026, 10, 1),
        utc(2026, 11, 1, 6, 10, 30, 250),  # 01:10:30 EST, the second pass
        utc(2026, 11, 1, 6, 10, 30),
        utc(2026, 11, 1, 6, 10, 31),
    ),
    (
        {"second": "*", "timezone": NEW_YORK},
        utc(2026, 10, 1),
        utc(2026, 11, 1, 5, 10, 30, 250),  # 01:10:30 EDT, the first pass
        utc(2026, 11, 1, 5, 10, 30),
        utc(2026, 11, 1, 5, 10, 31),
    ),
    (
        {"minute": "30", "hour": "1", "timezone": NEW_YORK},
        utc(2026, 1, 1, 6, 30),  # 01:30 EST
        utc(2026, 11, 1, 6, 45),  # 01:45 EST, the second pass: 01:30 fired at 01:30 EDT
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
    ),
    (
        {"minute": "*/30", "hour": "*", "timezone": NEW_YORK},
        utc(2026, 1, 1, 5),
        utc(2026, 11, 1, 5, 59, 59),  # 01:59:59 EDT, the first pass
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 6),  # 01:00 EST
    ),
]


@pytest.mark.parametrize(
    ("fields", "first_due", "now", "latest", "following"),
    LONG_OUTAGES,
    ids=[
        "every_second_30_days",
        "every_second_half_of_each_day",
        "every_second_three_days_a_month",
        "every_second_ny_into_second_pass",
        "every_second_ny_into_first_pass",
        "fixed_time_ny_daily_into_second_pass",
        "half_hourly_ny_ten_months",
    ],
)
def test_latest_due_fire_long_outage_is_fast(
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, str],
    first_due: datetime,
    now: datetime,
    latest: datetime,
    following: datetime,
) -> None:
    """Far behind, the latest fire is found in few evaluations, not one per missed fire."""
    calls = 0
    original: Callable[[PeriodicSchedule, datetime], datetime | None] = (
        PeriodicSchedule.get_next_run_at
    )

    def counting(self: PeriodicSchedule, after: datetime) -> datetime | None:
        nonlocal calls
        calls += 1
        return original(self, after)

    monkeypatch.setattr(PeriodicSchedule, "get_next_run_at", counting)
    assert latest_due_fire(cron(**fields), first_due, now) == (latest, following)
    assert calls <= 300


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

NAIVE = datetime(2026, 1, 1, 12)
AWARE = utc(2026, 1, 1, 12)


@pytest.mark.parametrize(
    ("build", "field", "value"),
    [
        (lambda: CrontabTrigger(second="60"), "CrontabTrigger.second", "60"),
        (lambda: CrontabTrigger(minute="61"), "CrontabTrigger.minute", "61"),
        (lambda: CrontabTrigger(minute="60"), "CrontabTrigger.minute", "60"),
        (lambda: CrontabTrigger(minute="*/0"), "CrontabTrigger.minute", "*/0"),
        (lambda: CrontabTrigger(minute="L"), "CrontabTrigger.minute", "L"),
        (lambda: CrontabTrigger(minute="abc"), "CrontabTrigger.minute", "abc"),
        (lambda: CrontabTrigger(minute=""), "CrontabTrigger.minute", ""),
        (lambda: CrontabTrigger(minute="1 2"), "CrontabTrigger.minute", "1 2"),
        (lambda: CrontabTrigger(minute=None), "CrontabTrigger.minute", None),  # type: ignore[arg-type]
        (lambda: CrontabTrigger(minute=True), "CrontabTrigger.minute", True),  # type: ignore[arg-type]
        (lambda: CrontabTrigger(minute=-1), "CrontabTrigger.minute", -1),  # type: ignore[arg-type]
        (lambda: CrontabTrigger(hour="24"), "CrontabTrigger.hour", "24"),
        (lambda: CrontabTrigger(day_of_month="0"), "CrontabTrigger.day_of_month", "0"),
        (lambda: CrontabTrigger(day_of_month="32"), "CrontabTrigger.day_of_month", "32"),
        (lambda: CrontabTrigger(month_of_year="13"), "CrontabTrigger.month_of_year", "13"),
        (lambda: CrontabTrigger(month_of_year="0"), "CrontabTrigger.month_of_year", "0"),
        (lambda: CrontabTrigger(month_of_year="jam"), "CrontabTrigger.month_of_year", "jam"),
        (lambda: CrontabTrigger(day_of_week="8"), "CrontabTrigger.day_of_week", "8"),
        (lambda: CrontabTrigger(day_of_week="funday"), "CrontabTrigger.day_of_week", "funday"),
        (
            lambda: CrontabTrigger(day_of_month="30", month_of_year="2"),
            "CrontabTrigger.day_of_month",
            "30",
        ),
        (
            lambda: CrontabTrigger(day_of_month="31", month_of_year="4,6,9,11"),
            "CrontabTrigger.day_of_month",
            "31",
        ),
        (
            lambda: CrontabTrigger(timezone="Mars/Olympus_Mons"),
            "CrontabTrigger.timezone",
            "Mars/Olympus_Mons",
        ),
        (lambda: CrontabTrigger(timezone=""), "CrontabTrigger.timezone", ""),
        (
            lambda: CrontabTrigger(timezone="../../etc/passwd"),
            "CrontabTrigger.timezone",
            "../../etc/passwd",
        ),
        (lambda: CrontabTrigger(timezone=5), "CrontabTrigger.timezone", 5),  # type: ignore[arg-type]
        (lambda: CrontabTrigger(minutes="5"), "CrontabTrigger.minutes", "5"),  # type: ignore[call-arg]
        (lambda: IntervalTrigger(seconds=-1), "IntervalTrigger.seconds", -1.0),
        (lambda: IntervalTrigger(weeks=-1, days=8), "IntervalTrigger.weeks", -1.0),
        (lambda: IntervalTrigger(), "IntervalTrigger.period", timedelta(0)),
        (lambda: IntervalTrigger(seconds=0), "IntervalTrigger.period", timedelta(0)),
        (lambda: IntervalTrigger(seconds=1e-7), "IntervalTrigger.period", timedelta(0)),
        (lambda: IntervalTrigger(seconds=math.nan), "IntervalTrigger.seconds", math.nan),
        (lambda: IntervalTrigger(minutes=math.inf), "IntervalTrigger.minutes", math.inf),
        (lambda: IntervalTrigger(hours=-math.inf), "IntervalTrigger.hours", -math.inf),
        (lambda: IntervalTrigger(seconds="abc"), "IntervalTrigger.seconds", "abc"),  # type: ignore[arg-type]
        (lambda: IntervalTrigger(second=5), "IntervalTrigger.second", 5),  # type: ignore[call-arg]
        (lambda: ImmediateDispatch(now=True), "ImmediateDispatch.now", True),  # type: ignore[call-arg]
        (lambda: OneOffSchedule(run_at=NAIVE), "OneOffSchedule.run_at", NAIVE),
        (
            lambda: OneOffSchedule(run_at="2026-01-01T12:00:00"),  # type: ignore[arg-type]
            "OneOffSchedule.run_at",
            NAIVE,
        ),
        (lambda: OneOffSchedule(run_at="soon"), "OneOffSchedule.run_at", "soon"),  # type: ignore[arg-type]
        (lambda: OneOffSchedule(run_at=AWARE, when=1), "OneOffSchedule.when", 1),  # type: ignore[call-arg]
        (
            lambda: PeriodicSchedule(interval=IntervalTrigger(seconds=1), start_at=NAIVE),
            "PeriodicSchedule.start_at",
            NAIVE,
        ),
        (
            lambda: PeriodicSchedule(interval=IntervalTrigger(seconds=1), end_at=NAIVE),
            "PeriodicSchedule.end_at",
            NAIVE,
        ),
        (
            lambda: PeriodicSchedule(
                interval=IntervalTrigger(seconds=1),
                end_at="2026-01-01T12:00:00",  # type: ignore[arg-type]
            ),
            "PeriodicSchedule.end_at",
            NAIVE,
        ),
        (
            lambda: PeriodicSchedule(
                interval=IntervalTrigger(seconds=1), start_at=AWARE, end_at=AWARE
            ),
            "PeriodicSchedule.end_at",
            AWARE,
        ),
        (
            lambda: PeriodicSchedule(
                crontab=CrontabTrigger(), start_at=AWARE, end_at=AWARE - SECOND
            ),
            "PeriodicSchedule.end_at",
            AWARE - SECOND,
        ),
        (
            lambda: PeriodicSchedule(crontab=CrontabTrigger(), every=5),  # type: ignore[call-arg]
            "PeriodicSchedule.every",
            5,
        ),
        (
            lambda: PeriodicSchedule(interval=CrontabTrigger()),  # type: ignore[arg-type]
            "PeriodicSchedule.interval",
            CrontabTrigger(),
        ),
    ],
    ids=[
        "second_60",
        "minute_61",
        "minute_60",
        "minute_step_0",
        "minute_L",
        "minute_word",
        "minute_empty",
        "minute_two_fields",
        "minute_none",
        "minute_bool",
        "minute_negative_int",
        "hour_24",
        "day_of_month_0",
        "day_of_month_32",
        "month_13",
        "month_0",
        "month_bad_name",
        "day_of_week_8",
        "day_of_week_bad_name",
        "february_30",
        "31st_of_short_months",
        "unknown_timezone",
        "empty_timezone",
        "path_timezone",
        "timezone_not_a_string",
        "cron_unknown_keyword",
        "negative_seconds",
        "negative_weeks_with_positive_total",
        "zero_interval",
        "zero_seconds",
        "sub_microsecond_interval",
        "nan_interval",
        "inf_interval",
        "minus_inf_interval",
        "non_numeric_interval",
        "interval_unknown_keyword",
        "immediate_unknown_keyword",
        "one_off_naive",
        "one_off_naive_iso_string",
        "one_off_garbage_string",
        "one_off_unknown_keyword",
        "start_at_naive",
        "end_at_naive",
        "end_at_naive_iso_string",
        "end_at_equal_start_at",
        "end_at_before_start_at",
        "periodic_unknown_keyword",
        "interval_given_a_crontab",
    ],
)
def test_invalid_trigger_names_field_and_value(
    build: Callable[[], object], field: str, value: object
) -> None:
    with pytest.raises(InvalidTriggerError) as caught:
        build()
    error = caught.value
    assert isinstance(error, InvalidJobError)
    assert isinstance(error, ValueError)
    assert error.field == field
    assert repr(error.value) == repr(value)
    assert f"{field}={value!r}" in str(error)
    assert error.reason


def test_missing_one_off_run_at() -> None:
    with pytest.raises(InvalidTriggerError) as caught:
        OneOffSchedule()  # type: ignore[call-arg]
    assert caught.value.field == "OneOffSchedule.run_at"
    assert "required" in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {
            "interval": IntervalTrigger(seconds=1),
            "crontab": CrontabTrigger(),
        },
        {"start_at": AWARE},
    ],
    ids=["neither", "both", "bounds_only"],
)
def test_periodic_needs_exactly_one_of_interval_and_crontab(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidTriggerError) as caught:
        PeriodicSchedule(**fields)
    assert caught.value.field == "PeriodicSchedule"
    assert "exactly one of interval= or crontab=" in str(caught.value)


def test_interval_too_long_for_a_timedelta() -> None:
    with pytest.raises(InvalidTriggerError) as caught:
        IntervalTrigger(weeks=1e12)
    assert caught.value.field == "IntervalTrigger.period"
    assert "1000000000000.0" in str(caught.value)


def test_nested_errors_name_the_inner_field() -> None:
    with pytest.raises(InvalidTriggerError) as interval:
        PeriodicSchedule(interval={"seconds": -5})  # type: ignore[arg-type]
    assert interval.value.field.startswith("PeriodicSchedule.")
    assert interval.value.field.endswith(".seconds")
    assert interval.value.value == -5
    with pytest.raises(InvalidTriggerError) as crontab:
        PeriodicSchedule(crontab={"minute": "61"})  # type: ignore[arg-type]
    assert crontab.value.field.endswith(".minute")
    assert crontab.value.value == "61"


TRIGGERS_FOR_AFTER: list[Trigger | CrontabTrigger] = [
    ImmediateDispatch(),
    OneOffSchedule(run_at=AWARE),
    every(seconds=10),
    PeriodicSchedule(interval=IntervalTrigger(seconds=10), start_at=AWARE),
    cron(),
    cron(timezone=NEW_YORK),
    CrontabTrigger(),
    CrontabTrigger(timezone=BERLIN),
]
TRIGGER_FOR_AFTER_IDS = [
    "immediate",
    "one_off",
    "interval",
    "interval_start_at",
    "cron",
    "cron_ny",
    "crontab_trigger",
    "crontab_trigger_berlin",
]


@pytest.mark.parametrize("trigger", TRIGGERS_FOR_AFTER, ids=TRIGGER_FOR_AFTER_IDS)
def test_get_next_run_at_rejects_naive_after(trigger: Trigger | CrontabTrigger) -> None:
    with pytest.raises(InvalidJobError) as caught:
        trigger.get_next_run_at(NAIVE)
    assert caught.value.field == "after"
    assert f"after={NAIVE!r}" in str(caught.value)


@pytest.mark.parametrize("schedule", [every(seconds=10), cron()], ids=["interval", "cron"])
def test_first_run_at_rejects_naive_now(schedule: PeriodicSchedule) -> None:
    with pytest.raises(InvalidJobError) as caught:
        schedule.first_run_at(NAIVE)
    assert caught.value.field == "now"


@pytest.mark.parametrize(
    ("trigger", "field", "value"),
    [
        (ImmediateDispatch(), "extra", 1),
        (OneOffSchedule(run_at=AWARE), "run_at", AWARE + SECOND),
        (IntervalTrigger(seconds=1), "seconds", 2.0),
        (CrontabTrigger(), "minute", "5"),
        (CrontabTrigger(), "timezone", BERLIN),
        (every(seconds=1), "end_at", AWARE),
        (cron(), "crontab", CrontabTrigger(minute="5")),
    ],
    ids=[
        "immediate",
        "one_off",
        "interval",
        "crontab_field",
        "crontab_timezone",
        "periodic_bound",
        "periodic_crontab",
    ],
)
def test_triggers_are_frozen(trigger: object, field: str, value: object) -> None:
    before = copy.deepcopy(trigger)
    with pytest.raises(ValidationError):
        setattr(trigger, field, value)
    assert trigger == before


# ---------------------------------------------------------------------------------------------
# Equality and hashing
# ---------------------------------------------------------------------------------------------


def test_evaluated_cron_still_equals_a_fresh_one() -> None:
    """Evaluating a cron caches an iterator; that must not change its value."""
    used = CrontabTrigger(minute="*/5", timezone=BERLIN)
    used.get_next_run_at(AWARE)
    fresh = CrontabTrigger(minute="*/5", timezone=BERLIN)
    assert used == fresh
    assert not used != fresh  # noqa: SIM202
    assert hash(used) == hash(fresh)
    assert len({used, fresh}) == 1
    assert used != CrontabTrigger(minute="*/5")
    assert used != "*/5 * * * * 0"
    schedule = PeriodicSchedule(crontab=used)
    schedule.get_next_run_at(AWARE)
    assert schedule == PeriodicSchedule(crontab=CrontabTrigger(minute="*/5", timezone=BERLIN))


def test_evaluated_cron_survives_copy_and_pickle() -> None:
    trigger = CrontabTrigger(minute="*/5")
    first = trigger.get_next_run_at(AWARE)
    for clone in (copy.copy(trigger), copy.deepcopy(trigger), pickle.loads(pickle.dumps(trigger))):
        assert clone == trigger
        assert clone.get_next_run_at(AWARE) == first


def test_an_interval_keeps_its_period_out_of_its_value() -> None:
    """The period is computed once and kept on the trigger; it is not part of its value."""
    used = PeriodicSchedule(interval=IntervalTrigger(minutes=5))
    used.get_next_run_at(AWARE)
    fresh = PeriodicSchedule(interval=IntervalTrigger(minutes=5))
    assert used == fresh
    assert hash(used) == hash(fresh)
    assert used.interval is not None
    assert used.interval.period == timedelta(minutes=5)
    assert used.interval.model_dump() == IntervalTrigger(minutes=5).model_dump()
    assert trigger_to_json(used) == trigger_to_json(fresh)
    for clone in (copy.deepcopy(used), pickle.loads(pickle.dumps(used))):
        assert clone == fresh
        assert clone.get_next_run_at(AWARE) == fresh.get_next_run_at(AWARE)


def test_equal_triggers_hash_alike() -> None:
    assert hash(IntervalTrigger(seconds=60)) == hash(IntervalTrigger(seconds=60.0))
    assert hash(OneOffSchedule(run_at=AWARE)) == hash(
        OneOffSchedule(run_at=AWARE.astimezone(ZoneInfo(NEW_YORK)))
    )
    assert ImmediateDispatch() == ImmediateDispatch()


# ---------------------------------------------------------------------------------------------
# Stored form
# ---------------------------------------------------------------------------------------------

ROUND_TRIP: list[Trigger] = [
    ImmediateDispatch(),
    OneOffSchedule(run_at=utc(2026, 3, 8, 7)),
    OneOffSchedule(run_at=datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo(NEW_YORK))),
    OneOffSchedule(run_at=utc(2026, 1, 1, 0, 0, 0, 123_456)),
    every(seconds=90),
    every(weeks=1, days=2, hours=3.5, minutes=4.25, seconds=5.125),
    PeriodicSchedule(interval=IntervalTrigger(minutes=15), start_at=utc(2026, 1, 1)),
    PeriodicSchedule(
        interval=IntervalTrigger(hours=1),
        start_at=utc(2026, 1, 1),
        end_at=datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=ZoneInfo(BERLIN)),
    ),
    cron(),
    cron(
        second="*/10",
        minute="0-30/5",
        hour="9-17",
        day_of_month="L",
        month_of_year="jan,jul",
        day_of_week="mon-fri",
        timezone=LORD_HOWE,
    ),
    PeriodicSchedule(
        crontab=CrontabTrigger(minute="0", hour="*/2", timezone=NEW_YORK),
        start_at=utc(2026, 2, 1),
        end_at=utc(2027, 2, 1),
    ),
    PeriodicSchedule(crontab=CrontabTrigger(day_of_week="7"), end_at=utc(2030, 1, 1)),
]
ROUND_TRIP_IDS = [
    "immediate",
    "one_off",
    "one_off_from_local_second_pass",
    "one_off_microseconds",
    "interval",
    "interval_all_units_fractional",
    "interval_start_at",
    "interval_start_end_local",
    "cron_defaults",
    "cron_all_fields_timezone",
    "cron_timezone_bounds",
    "cron_end_only",
]


@pytest.mark.parametrize("trigger", ROUND_TRIP, ids=ROUND_TRIP_IDS)
def test_round_trip_through_json(trigger: Trigger) -> None:
    stored = trigger_to_json(trigger)
    assert stored["version"] == TRIGGER_FORMAT_VERSION == 1
    assert stored["type"] in {"immediate", "one_off", "periodic"}
    text = json.dumps(stored)
    restored = trigger_from_json(json.loads(text))
    assert type(restored) is type(trigger)
    assert restored == trigger
    assert trigger_to_json(restored) == stored
    after = utc(2026, 6, 1, 12, 34, 56)
    assert restored.get_next_run_at(after) == trigger.get_next_run_at(after)
    for name in ("run_at", "start_at", "end_at"):
        value = getattr(restored, name, None)
        if value is not None:
            assert_utc(value)


@pytest.mark.parametrize("trigger", ROUND_TRIP, ids=ROUND_TRIP_IDS)
def test_round_trip_after_evaluation(trigger: Trigger) -> None:
    trigger.get_next_run_at(utc(2026, 6, 1))
    assert trigger_from_json(json.loads(json.dumps(trigger_to_json(trigger)))) == trigger


def test_stored_forms() -> None:
    assert trigger_to_json(ImmediateDispatch()) == {"version": 1, "type": "immediate"}
    assert trigger_to_json(OneOffSchedule(run_at=utc(2026, 1, 2, 3, 4, 5))) == {
        "version": 1,
        "type": "one_off",
        "run_at": "2026-01-02T03:04:05Z",
    }
    assert trigger_to_json(every(seconds=90)) == {
        "version": 1,
        "type": "periodic",
        "interval": {"weeks": 0, "days": 0, "hours": 0, "minutes": 0, "seconds": 90},
    }
    assert trigger_to_json(
        PeriodicSchedule(
            crontab=CrontabTrigger(minute="*/5", timezone=BERLIN),
            start_at=datetime(2026, 1, 1, 1, tzinfo=ZoneInfo(BERLIN)),
        )
    ) == {
        "version": 1,
        "type": "periodic",
        "crontab": {
            "second": "0",
            "minute": "*/5",
            "hour": "*",
            "day_of_month": "*",
            "month_of_year": "*",
            "day_of_week": "*",
            "timezone": BERLIN,
        },
        "start_at": "2026-01-01T00:00:00Z",
    }


def test_from_json_accepts_a_minimal_hand_written_payload() -> None:
    restored = trigger_from_json(
        {
            "version": 1,
            "type": "periodic",
            "crontab": {"minute": "5"},
            "end_at": "2027-01-01T00:00:00+01:00",
        }
    )
    assert restored == PeriodicSchedule(
        crontab=CrontabTrigger(minute="5"), end_at=utc(2026, 12, 31, 23)
    )


def test_from_json_does_not_modify_its_input() -> None:
    payload = {"version": 1, "type": "one_off", "run_at": "2026-01-01T00:00:00Z"}
    snapshot = copy.deepcopy(payload)
    trigger_from_json(payload)
    assert payload == snapshot


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "immediate",
        1,
        {},
        {"type": "immediate"},
        {"version": 2, "type": "immediate"},
        {"version": 0, "type": "immediate"},
        {"version": "1", "type": "immediate"},
        {"version": None, "type": "immediate"},
        {"version": 1},
        {"version": 1, "type": None},
        {"version": 1, "type": "cron"},
        {"version": 1, "type": "interval", "seconds": 5},
        {"version": 1, "type": "IMMEDIATE"},
        {"version": 1, "type": ["immediate"]},
        {"version": 1, "type": {"name": "immediate"}},
        {"version": 1, "type": "immediate", "run_at": "2026-01-01T00:00:00Z"},
        {"version": 1, "type": "one_off"},
        {"version": 1, "type": "one_off", "run_at": "garbage"},
        {"version": 1, "type": "one_off", "run_at": "2026-01-01T00:00:00"},
        {"version": 1, "type": "one_off", "run_at": None},
        {"version": 1, "type": "periodic"},
        {
            "version": 1,
            "type": "periodic",
            "interval": {"seconds": 5},
            "crontab": {"minute": "5"},
        },
        {"version": 1, "type": "periodic", "interval": {"seconds": -5}},
        {"version": 1, "type": "periodic", "interval": {"seconds": 0}},
        {"version": 1, "type": "periodic", "interval": "5s"},
        {"version": 1, "type": "periodic", "interval": {"weeks": 1e300}},
        {"version": 1, "type": "periodic", "interval": {"seconds": 5, "ms": 1}},
        {"version": 1, "type": "periodic", "crontab": {"minute": "61"}},
        {"version": 1, "type": "periodic", "crontab": {"day_of_month": "30", "month_of_year": "2"}},
        {"version": 1, "type": "periodic", "crontab": {"timezone": "Mars/Olympus_Mons"}},
        {"version": 1, "type": "periodic", "crontab": "*/5 * * * *"},
        {
            "version": 1,
            "type": "periodic",
            "crontab": {},
            "start_at": "2026-02-01T00:00:00Z",
            "end_at": "2026-01-01T00:00:00Z",
        },
        {"version": 1, "type": "periodic", "crontab": {}, "start_at": "2026-02-01T00:00:00"},
    ],
    ids=[
        "none",
        "list",
        "string",
        "int",
        "empty",
        "missing_version",
        "version_2",
        "version_0",
        "version_string",
        "version_null",
        "missing_type",
        "type_null",
        "unknown_type",
        "inner_type_name",
        "type_wrong_case",
        "type_list",
        "type_object",
        "immediate_extra_field",
        "one_off_missing_run_at",
        "one_off_garbage_run_at",
        "one_off_naive_run_at",
        "one_off_null_run_at",
        "periodic_neither",
        "periodic_both",
        "interval_negative",
        "interval_zero",
        "interval_not_an_object",
        "interval_overflow",
        "interval_extra_field",
        "crontab_bad_minute",
        "crontab_february_30",
        "crontab_unknown_timezone",
        "crontab_as_string",
        "end_before_start",
        "naive_start_at",
    ],
)
def test_corrupt_payloads(payload: Any) -> None:
    with pytest.raises(CorruptJobError) as caught:
        trigger_from_json(payload, job_id="job-42")
    assert caught.value.job_id == "job-42"
    assert "'job-42'" in str(caught.value)
    assert caught.value.reason


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 99, "type": "periodic"}',
        '{"version": 1, "type": "periodic", "crontab": {"minute": "61"}}',
        "{not json",
        "[]",
    ],
    ids=["unknown_version", "bad_cron", "not_json", "not_an_object"],
)
def test_corrupt_stored_text_names_the_job_every_time(text: str) -> None:
    for job_id in ("job-1", "job-2"):  # errors are not cached: each names its own job
        with pytest.raises(CorruptJobError) as caught:
            trigger_from_text(text, job_id=job_id)
        assert caught.value.job_id == job_id


def test_stored_text_is_parsed_once_and_shared() -> None:
    trigger = PeriodicSchedule(crontab=CrontabTrigger(minute="*/5", timezone=BERLIN))
    text = json.dumps(trigger_to_json(trigger))
    first = trigger_from_text(text, job_id="a")
    assert first == trigger
    assert trigger_from_text(text, job_id="b") is first
    # A shared cron trigger still answers for each job independently.
    after = datetime(2026, 3, 29, 0, 7, tzinfo=UTC)
    assert first.get_next_run_at(after) == trigger.get_next_run_at(after)
    assert first.get_next_run_at(after - timedelta(days=30)) == trigger.get_next_run_at(
        after - timedelta(days=30)
    )
    assert "unreadable JSON" in str(_corrupt("{not json"))


def _corrupt(text: str) -> CorruptJobError:
    with pytest.raises(CorruptJobError) as caught:
        trigger_from_text(text, job_id="x")
    return caught.value


def test_corrupt_payload_keeps_the_validation_error_as_cause() -> None:
    with pytest.raises(CorruptJobError) as caught:
        trigger_from_json({"version": 1, "type": "periodic", "crontab": {"minute": "61"}})
    assert caught.value.job_id == "?"
    assert isinstance(caught.value.__cause__, InvalidTriggerError)
    assert "minute='61'" in caught.value.reason
