"""The triggers people write: interval strings and ``timedelta``, cron strings, ``daily()`` /
``hourly()`` / ``weekly()``, and calendar unions with bounds.

Each shorthand is stored as the trigger it stands for; these tests check that (the stored
form is the one of the trigger written out), that the fire times are the cron's, that a
union fires each instant once, and that bad input names the argument and its value and
stores nothing (through the app, on SQLite and PostgreSQL).
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime, time, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession

from taskiq_beat import (
    CalendarTrigger,
    CrontabTrigger,
    IntervalTrigger,
    InvalidTriggerError,
    JobStrategy,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerJob,
    SchedulerRun,
    calendar,
    cron,
    daily,
    every,
    format_interval,
    hourly,
    parse_interval,
    weekly,
)
from taskiq_beat.triggers import (
    next_due_fire,
    trigger_from_json,
    trigger_to_json,
    validate_trigger,
)
from tests.test_properties import cron_spec
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc
BERLIN = "Europe/Berlin"
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AWARE = datetime(2027, 1, 4, 8, 0, tzinfo=UTC)  # a Monday


def fires(
    trigger: PeriodicSchedule | CrontabTrigger | CalendarTrigger, after: datetime, count: int
) -> list[datetime]:
    out: list[datetime] = []
    for _ in range(count):
        following = trigger.get_next_run_at(after)
        if following is None:
            break
        out.append(following)
        after = following
    return out


def stored(trigger: Any) -> dict[str, Any]:
    return trigger_to_json(validate_trigger(trigger))


# ---------------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(
    ("text", "period", "written"),
    [
        ("5m", timedelta(minutes=5), IntervalTrigger(minutes=5)),
        ("1h30m", timedelta(minutes=90), IntervalTrigger(hours=1, minutes=30)),
        ("90s", timedelta(seconds=90), IntervalTrigger(seconds=90)),
        ("1w 2d", timedelta(days=9), IntervalTrigger(weeks=1, days=2)),
        ("2H", timedelta(hours=2), IntervalTrigger(hours=2)),
        (" 1d12h ", timedelta(days=1, hours=12), IntervalTrigger(days=1, hours=12)),
        ("0.25s", timedelta(milliseconds=250), IntervalTrigger(seconds=0.25)),
    ],
    ids=["5m", "1h30m", "90s", "1w_2d", "upper_case", "spaces", "fraction"],
)
def test_interval_strings_are_stored_as_the_interval_written_out(
    text: str, period: timedelta, written: IntervalTrigger
) -> None:
    assert parse_interval(text) == period
    schedule = every(text)
    assert schedule.interval is not None
    assert schedule.interval.period == period
    assert stored(schedule) == stored(PeriodicSchedule(interval=written))
    assert PeriodicSchedule(interval=text) == schedule
    assert schedule.strategy is JobStrategy.INTERVAL


def test_timedelta_and_seconds_are_intervals_too() -> None:
    delta = timedelta(hours=1, minutes=30, seconds=5, microseconds=250)
    assert every(delta).interval == IntervalTrigger(hours=1, minutes=30, seconds=5.00025)
    assert every(delta).interval.period == delta  # type: ignore[union-attr]
    assert every(90) == every("90s")
    assert validate_trigger(timedelta(minutes=5)) == every("5m")
    assert PeriodicSchedule(interval=timedelta(days=2)).interval == IntervalTrigger(days=2)


@pytest.mark.parametrize(
    "value",
    [
        "5 minutes ago",
        "",
        "5",
        "-5m",
        "5ms",
        "m",
        "1m1h",
        "5m5m",
        "1.5h",
        "0s",
        "0h0m",
        "100000w",
        timedelta(0),
        timedelta(seconds=-1),
        0,
        -3,
        math.nan,
        math.inf,
        True,
        None,
        [5],
    ],
    ids=repr,
)
def test_bad_intervals_name_the_argument_and_value(value: Any) -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        every(value)
    assert raised.value.field == "interval"
    assert raised.value.value is value or raised.value.value == value
    assert repr(value)[:20] in str(raised.value)


@EXAMPLES
@given(period=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=36_000)))
def test_interval_strings_round_trip(period: timedelta) -> None:
    text = format_interval(period)
    assert parse_interval(text) == period
    assert format_interval(parse_interval(text)) == text
    schedule = every(text)
    assert trigger_from_json(trigger_to_json(schedule)) == schedule
    assert every(period).interval.period == period  # type: ignore[union-attr]


@EXAMPLES
@given(
    parts=st.fixed_dictionaries(
        {},
        optional={unit: st.integers(0, 500) for unit in ("w", "d", "h", "m", "s")},
    ).filter(lambda parts: any(parts.values())),
    spaced=st.booleans(),
)
def test_written_interval_strings_read_as_their_sum(parts: dict[str, int], spaced: bool) -> None:
    order = ("w", "d", "h", "m", "s")
    text = (" " if spaced else "").join(f"{parts[unit]}{unit}" for unit in order if unit in parts)
    expected = timedelta(
        weeks=parts.get("w", 0),
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
        minutes=parts.get("m", 0),
        seconds=parts.get("s", 0),
    )
    assert parse_interval(text) == expected
    assert parse_interval(format_interval(expected)) == expected


# --------------------------------------------------------------------------------- cron strings


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("0 9 * * mon-fri", {"minute": "0", "hour": "9", "day_of_week": "mon-fri"}),
        ("*/10 * * * * *", {"second": "*/10"}),
        (
            "30 0 9 1 jan *",
            {
                "second": "30",
                "minute": "0",
                "hour": "9",
                "day_of_month": "1",
                "month_of_year": "jan",
            },
        ),
        ("@daily", {"minute": "0", "hour": "0"}),
        ("@hourly", {"minute": "0"}),
        ("@weekly", {"minute": "0", "hour": "0", "day_of_week": "0"}),
        ("@monthly", {"minute": "0", "hour": "0", "day_of_month": "1"}),
        ("@yearly", {"minute": "0", "hour": "0", "day_of_month": "1", "month_of_year": "1"}),
    ],
    ids=[
        "weekdays",
        "six_fields",
        "six_fields_all",
        "daily",
        "hourly",
        "weekly",
        "monthly",
        "yearly",
    ],
)
def test_cron_strings_stand_for_their_crontab(text: str, fields: dict[str, str]) -> None:
    expected = CrontabTrigger(**fields, timezone=BERLIN)
    assert CrontabTrigger.from_expression(text, BERLIN) == expected
    assert cron(text, tz=BERLIN) == PeriodicSchedule(crontab=expected)
    assert PeriodicSchedule(crontab=text) == PeriodicSchedule(crontab=CrontabTrigger(**fields))
    assert validate_trigger(text) == PeriodicSchedule(crontab=CrontabTrigger(**fields))


@EXAMPLES
@given(spec=cron_spec(), zone=st.sampled_from([None, "UTC", BERLIN, "America/New_York"]))
def test_a_crontab_reads_back_from_its_cron_string(spec: dict[str, str], zone: str | None) -> None:
    trigger = CrontabTrigger(**spec, timezone=zone)
    assert CrontabTrigger.from_expression(trigger.cron, zone) == trigger


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("0 9 * * mon-fry", "day_of_week"),
        ("61 * * * *", "minute"),
        ("0 9 * *", "5 cron fields"),
        ("0 0 0 9 * * * *", "5 cron fields"),
        ("@fortnightly", "5 cron fields"),
        ("0 0 30 2 *", "day_of_month"),
    ],
    ids=["bad_weekday", "minute_61", "four_fields", "eight_fields", "unknown_alias", "feb_30"],
)
def test_bad_cron_strings_name_the_argument_the_value_and_the_field(text: str, named: str) -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        cron(text)
    assert raised.value.field == "expression"
    assert raised.value.value == text
    assert named in str(raised.value)
    with pytest.raises(InvalidTriggerError) as raised:
        validate_trigger(text)
    assert raised.value.field == "trigger"
    with pytest.raises(InvalidTriggerError) as raised:
        PeriodicSchedule(crontab=text)
    assert raised.value.field == "PeriodicSchedule.crontab"


def test_an_interval_string_as_a_trigger_points_to_every() -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        validate_trigger("5m")
    assert raised.value.field == "trigger"
    assert "every('5m')" in str(raised.value)


def test_an_unknown_timezone_is_named() -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        cron("0 9 * * *", tz="Mars/Olympus_Mons")
    assert raised.value.field == "tz"
    assert raised.value.value == "Mars/Olympus_Mons"
    with pytest.raises(InvalidTriggerError) as raised:
        CrontabTrigger.from_expression("0 9 * * *", "Mars/Olympus_Mons")
    assert raised.value.field == "timezone"


# ------------------------------------------------------------------- daily, hourly and weekly


@EXAMPLES
@given(
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    second=st.integers(0, 59),
    zone=st.sampled_from([None, "UTC", BERLIN, "Asia/Kolkata"]),
    day=st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
)
def test_helpers_equal_the_cron_they_stand_for(
    hour: int, minute: int, second: int, zone: str | None, day: str
) -> None:
    at = f"{hour:02d}:{minute:02d}:{second:02d}"
    assert daily(at=at, tz=zone) == cron(f"{second} {minute} {hour} * * *", tz=zone)
    assert daily(at=time(hour, minute, second), tz=zone) == daily(at=at, tz=zone)
    assert hourly(minute, second=second, tz=zone) == cron(f"{second} {minute} * * * *", tz=zone)
    assert weekly(on=day, at=at, tz=zone) == cron(f"{second} {minute} {hour} * * {day}", tz=zone)
    if second == 0:
        assert daily(at=f"{hour}:{minute:02d}", tz=zone) == cron(f"{minute} {hour} * * *", tz=zone)


def test_helper_fires_are_the_crons() -> None:
    assert fires(daily(at="09:30"), AWARE, 3) == [
        datetime(2027, 1, 4, 9, 30, tzinfo=UTC),
        datetime(2027, 1, 5, 9, 30, tzinfo=UTC),
        datetime(2027, 1, 6, 9, 30, tzinfo=UTC),
    ]
    assert fires(hourly(minute=15), AWARE, 2) == [
        datetime(2027, 1, 4, 8, 15, tzinfo=UTC),
        datetime(2027, 1, 4, 9, 15, tzinfo=UTC),
    ]
    assert fires(weekly(on=["fri", "monday"], at="07:00"), AWARE, 3) == [
        datetime(2027, 1, 8, 7, 0, tzinfo=UTC),
        datetime(2027, 1, 11, 7, 0, tzinfo=UTC),
        datetime(2027, 1, 15, 7, 0, tzinfo=UTC),
    ]
    assert weekly(on="mon-fri", at="08:00") == cron("0 8 * * mon-fri")
    assert weekly(on=["sat", "Monday", "mon"]).crontab.day_of_week == "mon,sat"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("day", "after", "expected"),
    [
        # 2027-03-28: clocks go from 02:00 to 03:00; 02:30 does not exist and fires at 03:00.
        pytest.param(
            "02:30",
            datetime(2027, 3, 27, 12, 0, tzinfo=UTC),
            [
                datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
                datetime(2027, 3, 29, 0, 30, tzinfo=UTC),
            ],
            id="spring_skip_hour",
        ),
        # 2027-10-31: clocks go from 03:00 back to 02:00; 02:30 happens twice, fires once.
        pytest.param(
            "02:30",
            datetime(2027, 10, 30, 12, 0, tzinfo=UTC),
            [
                datetime(2027, 10, 31, 0, 30, tzinfo=UTC),
                datetime(2027, 11, 1, 1, 30, tzinfo=UTC),
            ],
            id="fall_repeated_hour",
        ),
        # Away from the change the wall-clock time stays: 09:30 is 08:30 UTC in winter time
        # and 07:30 UTC in summer time.
        pytest.param(
            "09:30",
            datetime(2027, 3, 27, 12, 0, tzinfo=UTC),
            [
                datetime(2027, 3, 28, 7, 30, tzinfo=UTC),
                datetime(2027, 3, 29, 7, 30, tzinfo=UTC),
            ],
            id="spring_morning",
        ),
        pytest.param(
            "09:30",
            datetime(2027, 10, 30, 12, 0, tzinfo=UTC),
            [
                datetime(2027, 10, 31, 8, 30, tzinfo=UTC),
                datetime(2027, 11, 1, 8, 30, tzinfo=UTC),
            ],
            id="fall_morning",
        ),
    ],
)
def test_daily_in_berlin_across_daylight_saving(
    day: str, after: datetime, expected: list[datetime]
) -> None:
    assert fires(daily(at=day, tz=BERLIN), after, 2) == expected


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (lambda: daily(at="25:00"), "at", "25:00"),
        (lambda: daily(at="9.30"), "at", "9.30"),
        (lambda: daily(at=930), "at", 930),
        (lambda: daily(at=time(9, 30, tzinfo=UTC)), "at", time(9, 30, tzinfo=UTC)),
        (lambda: daily(at="09:30", tz="Nowhere/City"), "tz", "Nowhere/City"),
        (lambda: hourly(minute=60), "minute", 60),
        (lambda: hourly(minute=-1), "minute", -1),
        (lambda: hourly(minute="15"), "minute", "15"),
        (lambda: hourly(second=99), "second", 99),
        (lambda: weekly(on="funday"), "on", "funday"),
        (lambda: weekly(on=[]), "on", []),
        (lambda: weekly(on="mon-fri-sat"), "on", "mon-fri-sat"),
        (lambda: weekly(on=[1]), "on", 1),
    ],
    ids=repr,
)
def test_bad_helper_arguments_name_the_argument_and_value(
    make: Any, field: str, value: Any
) -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        make()
    assert raised.value.field == field
    assert raised.value.value == value


# ---------------------------------------------------------------------------- calendar unions

ZONES = st.sampled_from([None, BERLIN, "America/New_York"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(cron_spec(), ZONES), min_size=1, max_size=4),
    start=st.datetimes(
        min_value=datetime(2001, 1, 1), max_value=datetime(2060, 12, 31), timezones=st.just(UTC)
    ),
)
def test_a_calendar_fires_the_sorted_merge_of_its_rules_each_instant_once(
    specs: list[tuple[dict[str, str], str | None]], start: datetime
) -> None:
    rules = [CrontabTrigger(**spec, timezone=zone) for spec, zone in specs]
    union = calendar(*rules)
    count = 25
    got = fires(union, start, count)
    assert all(earlier < later for earlier, later in itertools.pairwise(got))
    merged = sorted({moment for rule in rules for moment in fires(rule, start, count)})
    assert got == merged[:count]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(cron_spec(), ZONES), min_size=1, max_size=3),
    moments=st.lists(
        st.datetimes(
            min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_a_calendar_answers_any_order_of_questions_as_a_fresh_one(
    specs: list[tuple[dict[str, str], str | None]], moments: list[datetime]
) -> None:
    """The union remembers each rule's last answer; asked in any order (the engine's
    catch-up bisects), it answers as a union that never answered before."""
    rules = [CrontabTrigger(**spec, timezone=zone) for spec, zone in specs]
    union = CalendarTrigger(rules=rules)
    for moment in moments:
        for after in (moment, union.get_next_run_at(moment) - timedelta(microseconds=1)):
            assert union.get_next_run_at(after) == CalendarTrigger(rules=rules).get_next_run_at(
                after
            )


def test_where_two_rules_meet_the_calendar_fires_once() -> None:
    union = calendar("0 9 * * *", "0 9 * * mon", daily(at="09:00"), "*/30 9 * * *")
    assert fires(union, AWARE, 4) == [
        datetime(2027, 1, 4, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 4, 9, 30, tzinfo=UTC),
        datetime(2027, 1, 5, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 5, 9, 30, tzinfo=UTC),
    ]
    assert union.strategy is JobStrategy.CALENDAR


def test_calendar_rules_keep_their_own_timezones() -> None:
    union = calendar(daily(at="09:00", tz="Asia/Tokyo"), "0 9 * * *", tz=BERLIN)
    assert union.calendar is not None
    assert [rule.timezone for rule in union.calendar.rules] == ["Asia/Tokyo", BERLIN]
    assert fires(union, AWARE, 2) == [
        datetime(2027, 1, 5, 0, 0, tzinfo=UTC),  # 09:00 in Tokyo
        datetime(2027, 1, 5, 8, 0, tzinfo=UTC),  # 09:00 in Berlin
    ]


def test_bounds_hold_on_every_periodic_trigger() -> None:
    start, end = datetime(2027, 1, 5, 0, 0, tzinfo=UTC), datetime(2027, 1, 7, 0, 0, tzinfo=UTC)
    union = calendar("0 9 * * *", "0 18 * * *", start_at=start, end_at=end)
    assert fires(union, AWARE, 10) == [
        datetime(2027, 1, 5, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 5, 18, 0, tzinfo=UTC),
        datetime(2027, 1, 6, 9, 0, tzinfo=UTC),
        datetime(2027, 1, 6, 18, 0, tzinfo=UTC),
    ]
    assert union.first_run_at(AWARE) == datetime(2027, 1, 5, 9, 0, tzinfo=UTC)
    interval = every("12h", start_at=start, end_at=end)
    assert fires(interval, AWARE, 10) == [
        start,
        start + timedelta(hours=12),
        start + timedelta(hours=24),
        start + timedelta(hours=36),
        end,
    ]
    assert fires(daily(at="12:00", start_at=start, end_at=end), AWARE, 10) == [
        datetime(2027, 1, 5, 12, 0, tzinfo=UTC),
        datetime(2027, 1, 6, 12, 0, tzinfo=UTC),
    ]


def test_missed_calendar_fires_coalesce_like_any_cron() -> None:
    union = calendar("0 9 * * *", "0 18 * * *", "0 9 * * mon")
    first_due = datetime(2027, 1, 4, 9, 0, tzinfo=UTC)
    now = datetime(2027, 1, 7, 10, 0, tzinfo=UTC)  # down for three days
    sent, following = next_due_fire(union, first_due, now, timedelta(seconds=30))
    assert sent == datetime(2027, 1, 7, 9, 0, tzinfo=UTC)  # the latest missed, once
    assert following == datetime(2027, 1, 7, 18, 0, tzinfo=UTC)
    # Within the grace, each fire is sent as scheduled, in order.
    late = datetime(2027, 1, 4, 9, 0, 20, tzinfo=UTC)
    assert next_due_fire(union, first_due, late, timedelta(seconds=30)) == (
        first_due,
        datetime(2027, 1, 4, 18, 0, tzinfo=UTC),
    )


def test_a_calendar_survives_its_stored_form() -> None:
    union = calendar(
        "0 9 * * mon-fri",
        weekly(on="sat", at="12:00", tz=BERLIN),
        start_at=AWARE,
        end_at=AWARE + timedelta(days=365),
    )
    data = trigger_to_json(union)
    assert data["type"] == "periodic"
    assert [rule["hour"] for rule in data["calendar"]["rules"]] == ["9", "12"]
    assert trigger_from_json(data) == union


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: calendar(), "rules"),
        (lambda: calendar("0 9 * * *", "nonsense"), "rules[1]"),
        (lambda: calendar(every("5m")), "rules[0]"),
        (lambda: calendar(daily(at="09:00", start_at=AWARE)), "rules[0]"),
        (lambda: calendar(*["0 9 * * *"] * 65), "rules"),
        (
            lambda: PeriodicSchedule(calendar=["0 9 * * *", "61 * * * *"]),
            "PeriodicSchedule.calendar.rules[1]",
        ),
        (lambda: PeriodicSchedule(crontab="0 9 * * *", calendar=["0 9 * * *"]), "PeriodicSchedule"),
    ],
    ids=[
        "empty",
        "bad_rule",
        "interval_rule",
        "bounded_rule",
        "too_many",
        "schedule_bad_rule",
        "crontab_and_calendar",
    ],
)
def test_bad_calendars_name_the_rule(make: Any, field: str) -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        make()
    assert raised.value.field == field


@pytest.mark.parametrize(
    "payload",
    [
        {"version": 1, "type": "periodic", "calendar": ["0 9 * * *"]},
        {"version": 1, "type": "periodic", "calendar": {"rules": ["0 9 * * *"]}},
        {"version": 1, "type": "periodic", "calendar": {"rules": "0 9 * * *"}},
        {"version": 1, "type": "periodic", "calendar": {"rules": []}},
        {"version": 1, "type": "periodic", "calendar": {"rules": [{"minute": "61"}]}},
        {"version": 1, "type": "periodic", "interval": "5m"},
    ],
    ids=["list", "string_rule", "string_rules", "no_rules", "bad_rule", "interval_string"],
)
def test_stored_calendars_are_objects_only(payload: dict[str, Any]) -> None:
    from taskiq_beat import CorruptJobError

    with pytest.raises(CorruptJobError):
        trigger_from_json(payload, job_id="job-7")


# ------------------------------------------------------------------------ through the app


async def count(session: AsyncSession, model: Any) -> int:
    result = await session.execute(sa.select(sa.func.count()).select_from(model))
    return int(result.scalar_one())


async def test_shorthands_are_stored_as_the_trigger_they_stand_for(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    clock.set(AWARE)
    task = app.single(task="tests.record")
    by_string = await task.upsert(session, trigger="0 9 * * mon-fri", job_id="cron-string")
    assert by_string.strategy is JobStrategy.CRONTAB
    assert by_string.trigger == trigger_to_json(
        PeriodicSchedule(
            crontab=CrontabTrigger(minute="0", hour="9", day_of_week="mon-fri", timezone="UTC")
        )
    )
    assert by_string.next_run_at == datetime(2027, 1, 4, 9, 0, tzinfo=UTC)
    by_delta = await task.schedule(session, trigger=timedelta(minutes=5), job_id="delta")
    assert by_delta.trigger == trigger_to_json(
        PeriodicSchedule(interval=IntervalTrigger(minutes=5))
    )
    assert by_delta.next_run_at == AWARE + timedelta(minutes=5)
    by_helper = await task.upsert(session, trigger=daily(at="09:30", tz=BERLIN), job_id="daily")
    assert by_helper.trigger == trigger_to_json(
        PeriodicSchedule(crontab=CrontabTrigger(minute="30", hour="9", timezone=BERLIN))
    )
    assert by_helper.next_run_at == datetime(2027, 1, 4, 8, 30, tzinfo=UTC)
    written = await app.upsert_many(
        session, [task.definition(trigger="*/15 * * * *", job_id="bulk-cron")]
    )
    assert written == 1
    assert (await app.get_job(session, "bulk-cron")).next_run_at == AWARE + timedelta(minutes=15)


async def test_a_calendar_job_round_trips_and_fires_each_instant_once(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock, broker: RecordingBroker
) -> None:
    clock.set(AWARE)
    union = calendar("0 9 * * *", "0 9 * * mon", "30 9 * * *")  # no timezone: the app's
    job = await app.single(task="tests.record").upsert(session, trigger=union, job_id="cal")
    assert job.strategy is JobStrategy.CALENDAR
    stored_trigger = trigger_from_json((await app.get_job(session, "cal")).trigger)
    assert stored_trigger == calendar("0 9 * * *", "0 9 * * mon", "30 9 * * *", tz="UTC")
    assert job.next_run_at == datetime(2027, 1, 4, 9, 0, tzinfo=UTC)
    # Upserting the same union again keeps the schedule.
    again = await app.single(task="tests.record").upsert(session, trigger=union, job_id="cal")
    assert again.next_run_at == job.next_run_at
    await app.engine.sync()
    sent: list[datetime] = []
    for moment in (datetime(2027, 1, 4, 9, 0), datetime(2027, 1, 4, 9, 30)):
        clock.set(moment.replace(tzinfo=UTC))
        assert await app.engine.tick() == 1
        sent.append(clock.now())
    runs = (
        (await session.execute(sa.select(SchedulerRun.scheduled_for).order_by(SchedulerRun.id)))
        .scalars()
        .all()
    )
    assert [run.astimezone(UTC) for run in runs] == sent
    assert len(broker.sent) == 2
    session.expire_all()
    assert (await app.get_job(session, "cal")).next_run_at == datetime(2027, 1, 5, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("trigger", "value"),
    [
        ("0 9 * * mon-fry", "0 9 * * mon-fry"),
        ("5m", "5m"),
        ("", ""),
        (timedelta(0), timedelta(0)),
        (timedelta(minutes=-5), timedelta(minutes=-5)),
    ],
    ids=["bad_weekday", "interval_string", "empty_string", "zero_delta", "negative_delta"],
)
async def test_bad_trigger_arguments_name_the_trigger_and_store_nothing(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    trigger: Any,
    value: Any,
) -> None:
    task = app.single(task="tests.record")
    for call in (
        lambda: task.schedule(session, trigger=trigger),
        lambda: task.upsert(session, trigger=trigger, job_id="bad"),
        lambda: app.upsert_many(session, [task.definition(trigger=trigger, job_id="bad")]),
    ):
        with pytest.raises(InvalidTriggerError) as raised:
            await call()
        assert raised.value.field == "trigger"
        assert raised.value.value == value
    assert await count(session, SchedulerJob) == 0
    assert await count(session, SchedulerRun) == 0
    assert broker.sent == []
