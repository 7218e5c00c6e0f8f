"""Property-based tests (hypothesis): our cron agrees with croniter, and bad input of any shape
raises our documented exceptions.

Cron agreement is checked in UTC, and in named timezones away from daylight-saving changes
(at the changes our own DST rules apply instead; ``tests/test_triggers.py`` pins those down).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from croniter import croniter
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy.pool import NullPool

from taskiq_beat import (
    ChainStep,
    CrontabTrigger,
    IntervalTrigger,
    InvalidJobError,
    InvalidTriggerError,
    OneOffSchedule,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
)
from taskiq_beat.builders import json_value
from taskiq_beat.triggers import trigger_from_json, trigger_to_json

UTC = timezone.utc
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (field, lowest value, highest value) in croniter's order (seconds last).
FIELDS = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day_of_month", 1, 28),  # 29-31 can never fire in some months: tested elsewhere
    ("month_of_year", 1, 12),
    ("day_of_week", 0, 6),
    ("second", 0, 59),
]


@st.composite
def cron_field(draw: st.DrawFn, low: int, high: int) -> str:
    kind = draw(st.sampled_from(["star", "value", "range", "step", "list", "range_step"]))
    value = st.integers(low, high)
    if kind == "star":
        return "*"
    if kind == "value":
        return str(draw(value))
    if kind == "range":
        a, b = sorted((draw(value), draw(value)))
        return f"{a}-{b}"
    if kind == "step":
        return f"*/{draw(st.integers(1, high - low + 1))}"
    if kind == "list":
        return ",".join(str(v) for v in sorted(set(draw(st.lists(value, min_size=1, max_size=4)))))
    a, b = sorted((draw(value), draw(value)))
    return f"{a}-{b}/{draw(st.integers(1, max(1, b - a + 1)))}"


@st.composite
def cron_spec(draw: st.DrawFn) -> dict[str, str]:
    return {name: draw(cron_field(low, high)) for name, low, high in FIELDS}


moments = st.datetimes(
    min_value=datetime(2001, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)
)


def croniter_fires(spec: dict[str, str], start_wall: datetime, count: int) -> list[datetime]:
    expression = " ".join(spec[name] for name, _, _ in FIELDS)
    iterator = croniter(expression, start_wall)
    return [iterator.get_next(datetime) for _ in range(count)]


@EXAMPLES
@given(spec=cron_spec(), start=moments)
def test_cron_agrees_with_croniter_in_utc(spec: dict[str, str], start: datetime) -> None:
    trigger = CrontabTrigger(**spec, timezone="UTC")
    expected = [w.replace(tzinfo=UTC) for w in croniter_fires(spec, start.replace(tzinfo=None), 3)]
    fires, after = [], start
    for _ in range(3):
        after = trigger.get_next_run_at(after)
        fires.append(after)
    assert fires == expected


def _far_from_transitions(zone: ZoneInfo, *instants: datetime) -> bool:
    """No UTC offset change within three hours of any of ``instants``."""
    for instant in instants:
        offsets = {(instant + timedelta(hours=h)).astimezone(zone).utcoffset() for h in (-3, 0, 3)}
        if len(offsets) > 1:
            return False
    return True


@EXAMPLES
@given(spec=cron_spec(), start=moments, zone_name=st.sampled_from(ZONES))
def test_cron_agrees_with_croniter_in_named_zones_away_from_dst(
    spec: dict[str, str], start: datetime, zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    trigger = CrontabTrigger(**spec, timezone=zone_name)
    walls = croniter_fires(spec, start.astimezone(zone).replace(tzinfo=None), 3)
    expected = [w.replace(tzinfo=zone).astimezone(UTC) for w in walls]
    assume(_far_from_transitions(zone, start, *expected))
    fires, after = [], start
    for _ in range(3):
        after = trigger.get_next_run_at(after)
        fires.append(after)
    assert fires == expected


@EXAMPLES
@given(spec=cron_spec(), zone_name=st.sampled_from([*ZONES, None]))
def test_every_valid_trigger_survives_its_stored_form(
    spec: dict[str, str], zone_name: str | None
) -> None:
    trigger = PeriodicSchedule(crontab=CrontabTrigger(**spec, timezone=zone_name))
    assert trigger_from_json(trigger_to_json(trigger)) == trigger


bad_field_values = st.one_of(
    st.integers(60, 10_000).map(str),
    st.integers(-1000, -1).map(str),
    st.text(alphabet="abcxyz!@#%^&()[]{}|;:<>?~", min_size=1, max_size=8),
    st.just(""),
    st.just("1 2"),
    st.just("*/0"),
)


@EXAMPLES
@given(field=st.sampled_from(["minute", "second"]), value=bad_field_values)
def test_invalid_cron_fields_name_the_field(field: str, value: str) -> None:
    # For minute and second, every one of these values is invalid.
    with pytest.raises(InvalidTriggerError) as raised:
        CrontabTrigger(**{field: value})
    assert field in raised.value.field


@EXAMPLES
@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)))
def test_naive_datetimes_are_refused_everywhere(moment: datetime) -> None:
    with pytest.raises(InvalidTriggerError, match="run_at"):
        OneOffSchedule(run_at=moment)
    with pytest.raises(InvalidTriggerError, match="start_at"):
        PeriodicSchedule(interval=IntervalTrigger(seconds=1), start_at=moment)
    with pytest.raises(InvalidJobError, match="after"):
        CrontabTrigger().get_next_run_at(moment)


@EXAMPLES
@given(
    parts=st.dictionaries(
        st.sampled_from(["weeks", "days", "hours", "minutes", "seconds"]),
        st.one_of(
            st.floats(max_value=0, allow_nan=False, allow_infinity=False),
            st.just(math.nan),
            st.just(math.inf),
            st.just(-math.inf),
        ),
        min_size=1,
    )
)
def test_intervals_that_are_not_positive_and_finite_are_refused(parts: dict[str, float]) -> None:
    with pytest.raises(InvalidTriggerError) as raised:
        IntervalTrigger(**parts)
    assert raised.value.field.startswith("IntervalTrigger")


class Opaque:
    pass


not_json = st.recursive(
    st.one_of(
        st.just(float("nan")),
        st.just(float("inf")),
        st.binary(min_size=1, max_size=4),
        st.sets(st.integers(), min_size=1, max_size=3),
        st.builds(Opaque),
        st.complex_numbers(allow_nan=False, allow_infinity=False),
    ),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3),
        st.dictionaries(st.text(max_size=3), inner, min_size=1, max_size=3),
    ),
    max_leaves=4,
)


@EXAMPLES
@given(bad=not_json)
def test_payloads_that_are_not_json_are_refused(bad: Any) -> None:
    for field, wrap in (
        ("args", lambda v: [v]),
        ("kwargs", lambda v: {"x": v}),
        ("metadata", lambda v: {"x": v}),
    ):
        with pytest.raises(InvalidJobError) as raised:
            json_value(field, wrap(bad), list if field == "args" else dict)
        assert raised.value.field == field


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=10,
)


@EXAMPLES
@given(value=json_values)
def test_json_payloads_round_trip_unchanged(value: Any) -> None:
    assert json_value("args", [value], list) == [value]
    assert json_value("kwargs", {"k": value}, dict) == {"k": value}


@st.composite
def bad_job_ids(draw: st.DrawFn) -> Any:
    return draw(
        st.one_of(
            st.text(min_size=256, max_size=300),
            st.just(""),
            st.integers(),
            st.none().map(lambda _: b"bytes"),
            st.lists(st.text(), max_size=2),
        )
    )


@pytest.fixture(scope="module")
def bare_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchedulerApp]:
    """An app on a real SQLite file with the tables, shared by the examples of a test."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from taskiq import InMemoryBroker

    path = tmp_path_factory.mktemp("properties") / "beat.sqlite3"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool)

    async def create() -> None:
        async with engine.begin() as connection:
            await connection.run_sync(SchedulerBase.metadata.create_all)

    asyncio.run(create())
    broker = InMemoryBroker()
    broker.register_task(lambda: None, task_name="noop")
    yield SchedulerApp(
        broker=broker, session_factory=async_sessionmaker(engine), config=SchedulerConfig()
    )
    asyncio.run(engine.dispose())


async def _schedule_and_count(app: SchedulerApp, job_id: Any) -> tuple[Exception | None, int]:
    async with app.session_factory() as session:
        error: Exception | None = None
        try:
            await app.single(task="noop").schedule(
                session,
                trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=1)),
                job_id=job_id,
            )
        except Exception as exc:
            error = exc
        count = await session.execute(sa.select(sa.func.count()).select_from(SchedulerJob))
        return error, int(count.scalar_one())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(job_id=bad_job_ids())
def test_bad_job_ids_are_refused_and_nothing_is_stored(bare_app: SchedulerApp, job_id: Any) -> None:
    error, stored = asyncio.run(_schedule_and_count(bare_app, job_id))
    assert isinstance(error, InvalidJobError)
    assert error.field == "job_id"
    assert stored == 0


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.builds(
            ChainStep,
            task=st.just("noop"),
            args=st.lists(st.integers(), max_size=3),
            max_attempts=st.integers(1, 5),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_valid_chains_are_accepted(bare_app: SchedulerApp, steps: list[ChainStep]) -> None:
    builder = bare_app.chain(steps=steps)
    assert len(builder.spec.kwargs["chain"]["steps"]) == len(steps)
