"""Schedules declared in code: ``@scheduler_app.periodic``, ``define()``, their apply at start,
and two scheduler processes of different code versions on one database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from taskiq_beat import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    InvalidJobError,
    OneOffSchedule,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerConfig,
    SchedulerJob,
)
from taskiq_beat.enums import JobSource
from tests.utils import UTC, FakeClock, RecordingBroker

EVERY_MINUTE = PeriodicSchedule(interval=IntervalTrigger(minutes=1))
CONFIG = SchedulerConfig(record_lifecycle=False)


def _broker() -> RecordingBroker:
    broker = RecordingBroker()

    @broker.task(task_name="tests.record")
    async def record(*args: Any, **kwargs: Any) -> None:
        return None

    @broker.task(task_name="tests.other")
    async def other(*args: Any, **kwargs: Any) -> None:
        return None

    return broker


@asynccontextmanager
async def _process(
    url: str, clock: FakeClock, version: int, declare: Callable[[SchedulerApp], None]
) -> AsyncIterator[SchedulerApp]:
    """A scheduler process of its own (engine, broker, app) on the database at ``url``,
    with the declarations that ``declare`` makes, at ``schedule_version=version``."""
    engine = create_async_engine(url)
    try:
        app = SchedulerApp(
            broker=_broker(),
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
            config=CONFIG,
            clock=clock,
            schedule_version=version,
        )
        declare(app)
        yield app
    finally:
        await engine.dispose()


async def _jobs(session: AsyncSession) -> dict[str, SchedulerJob]:
    result = await session.execute(
        sa.select(SchedulerJob).execution_options(populate_existing=True)
    )
    jobs = {job.id: job for job in result.scalars()}
    await session.commit()
    session.expunge_all()  # snapshots: a later read makes new objects
    return jobs


@pytest.fixture
def declaring_app(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> SchedulerApp:
    if broker.find_task("tests.other") is None:

        @broker.task(task_name="tests.other")
        async def other(*args: Any, **kwargs: Any) -> None:
            return None

    return SchedulerApp(broker=broker, session_factory=session_factory, config=CONFIG, clock=clock)


async def test_periodic_and_define_are_applied_with_their_source_and_hash(
    declaring_app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    app = declaring_app
    record = broker.find_task("tests.record")
    assert app.periodic("*/5 * * * *", job_id="every-5", kwargs={"n": 1})(record) is record

    @app.periodic(timedelta(seconds=90))
    @broker.task(task_name="tests.every_90s")
    async def every_90s() -> None:
        return None

    app.define(
        app.single(task="tests.record", args=[1]).definition(trigger=EVERY_MINUTE, job_id="defined")
    )
    plan = await app.apply_declarations()
    assert plan.applied
    assert plan.added == ["defined", "every-5", "tests.every_90s"]
    jobs = await _jobs(session)
    assert set(jobs) == {"defined", "every-5", "tests.every_90s"}
    assert {job.source for job in jobs.values()} == {JobSource.CODE}
    assert all(len(job.definition_hash or "") == 64 for job in jobs.values())
    assert {job.schedule_version for job in jobs.values()} == {0}
    assert jobs["every-5"].trigger["crontab"]["minute"] == "*/5"
    assert jobs["every-5"].trigger["crontab"]["timezone"] == "UTC"
    assert jobs["every-5"].next_run_at == clock.now() + timedelta(minutes=5)
    assert jobs["tests.every_90s"].next_run_at == clock.now() + timedelta(seconds=90)
    assert jobs["every-5"].kwargs == {"n": 1}


async def test_start_applies_the_declarations_and_a_declared_job_fires(
    declaring_app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    app = declaring_app
    app.define(
        app.single(task="tests.record").definition(
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=1)), job_id="fast"
        )
    )
    await app.start()
    try:
        assert set(await _jobs(session)) == {"fast"}
    finally:
        await app.stop()
    # The next scheduler process (declaring the same) fires it.
    scheduler = SchedulerApp(
        broker=broker, session_factory=app.session_factory, config=CONFIG, clock=clock
    )
    # Without declarations an app leaves the declared jobs alone (it may lack the modules).
    assert (await scheduler.apply_declarations()).removed == []
    scheduler.define(
        app.single(task="tests.record").definition(
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=1)), job_id="fast"
        )
    )
    assert (await scheduler.apply_declarations()).unchanged == ["fast"]
    await scheduler.engine.sync()
    clock.advance(1)
    assert await scheduler.engine.tick() == 1
    assert [m.labels["taskiq_beat_job_id"] for m in broker.sent] == ["fast"]


async def test_an_unchanged_declaration_is_not_written_and_a_pause_survives(
    declaring_app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    app = declaring_app
    app.define(app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="j"))
    await app.apply_declarations()
    await app.pause(session, "j")
    before = (await _jobs(session))["j"]
    clock.advance(30)
    plan = await app.apply_declarations()
    assert (plan.applied, plan.unchanged, plan.changed) == (False, ["j"], [])
    after = (await _jobs(session))["j"]
    assert (after.is_enabled, after.revision, after.updated_at) == (
        False,
        before.revision,
        before.updated_at,
    )


async def test_a_changed_declaration_is_rewritten_as_upsert_would(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
) -> None:
    def app_with(args: list[int], trigger: PeriodicSchedule) -> SchedulerApp:
        app = SchedulerApp(
            broker=broker, session_factory=session_factory, config=CONFIG, clock=clock
        )
        app.define(
            app.single(task="tests.record", args=args).definition(trigger=trigger, job_id="j")
        )
        return app

    await app_with([1], EVERY_MINUTE).apply_declarations()
    first = (await _jobs(session))["j"]
    clock.advance(20)
    plan = await app_with([2], EVERY_MINUTE).apply_declarations()
    assert plan.changed == ["j"]
    payload_only = (await _jobs(session))["j"]
    assert payload_only.args == [2]
    assert payload_only.next_run_at == first.next_run_at  # the schedule is kept
    assert payload_only.revision == first.revision + 1
    assert payload_only.definition_hash != first.definition_hash
    every_hour = PeriodicSchedule(interval=IntervalTrigger(hours=1))
    await app_with([2], every_hour).apply_declarations()
    rescheduled = (await _jobs(session))["j"]
    assert rescheduled.next_run_at == clock.now() + timedelta(hours=1)


async def test_a_job_no_longer_declared_is_disabled_and_declaring_it_again_enables_it(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
) -> None:
    def app_with(*job_ids: str) -> SchedulerApp:
        app = SchedulerApp(
            broker=broker, session_factory=session_factory, config=CONFIG, clock=clock
        )
        app.define(
            *(
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id=job_id)
                for job_id in job_ids
            )
        )
        return app

    await app_with("a", "b").apply_declarations()
    plan = await app_with("a").apply_declarations()
    assert plan.removed == ["b"]
    jobs = await _jobs(session)
    assert (jobs["b"].is_enabled, jobs["b"].next_run_at, jobs["b"].definition_hash) == (
        False,
        None,
        None,
    )
    assert jobs["a"].is_enabled
    # Applying again: nothing more to remove (the retired row is not reported twice).
    assert (await app_with("a").apply_declarations()).removed == []
    clock.advance(5)
    plan = await app_with("a", "b").apply_declarations()
    assert plan.changed == ["b"]
    again = (await _jobs(session))["b"]
    assert again.is_enabled
    assert again.next_run_at == clock.now() + timedelta(minutes=1)
    # define() without definitions: the app declares in code that nothing is left.
    plan = await app_with().apply_declarations()
    assert plan.removed == ["a", "b"]


async def test_jobs_made_through_the_api_are_never_touched(
    declaring_app: SchedulerApp, session: AsyncSession
) -> None:
    app = declaring_app
    await app.single(task="tests.other").upsert(session, trigger=EVERY_MINUTE, job_id="shared")
    await app.single(task="tests.other").upsert(session, trigger=EVERY_MINUTE, job_id="api-only")
    before = await _jobs(session)
    app.define(app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="shared"))
    plan = await app.apply_declarations()
    assert (plan.conflicts, plan.added, plan.removed) == (["shared"], [], [])
    after = await _jobs(session)
    for job_id in ("shared", "api-only"):
        assert after[job_id].source is JobSource.API
        assert after[job_id].task_name == "tests.other"
        assert after[job_id].revision == before[job_id].revision
    # upsert_many over a declared job keeps its owner.
    app.define(app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="mine"))
    await app.apply_declarations()
    await app.upsert_many(
        session,
        [app.single(task="tests.other").definition(trigger=EVERY_MINUTE, job_id="mine")],
    )
    assert (await _jobs(session))["mine"].source is JobSource.CODE


async def test_a_dry_run_reports_and_writes_nothing(
    declaring_app: SchedulerApp, session: AsyncSession
) -> None:
    app = declaring_app
    app.define(app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="new"))
    plan = await app.apply_declarations(dry_run=True)
    assert (plan.applied, plan.added) == (False, ["new"])
    assert await _jobs(session) == {}


@pytest.mark.parametrize(
    ("declare", "field"),
    [
        pytest.param(
            lambda app: app.periodic("*/5 * * *")(app.broker.find_task("tests.record")),
            "trigger",
            id="cron_of_four_fields",
        ),
        pytest.param(
            lambda app: app.periodic("99 * * * *")(app.broker.find_task("tests.record")),
            "CrontabTrigger.minute",
            id="cron_minute_out_of_range",
        ),
        pytest.param(
            lambda app: app.periodic(ImmediateDispatch())(app.broker.find_task("tests.record")),
            "trigger",
            id="immediate_dispatch",
        ),
        pytest.param(
            lambda app: app.periodic(timedelta(0))(app.broker.find_task("tests.record")),
            "trigger",
            id="zero_interval",
        ),
        pytest.param(lambda app: app.periodic(EVERY_MINUTE)(print), "task", id="not_a_task"),
        pytest.param(
            lambda app: app.define(
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="x"),
                app.single(task="tests.other").definition(trigger=EVERY_MINUTE, job_id="x"),
            ),
            "job_id",
            id="declared_twice",
        ),
        pytest.param(lambda app: app.define("tests.record"), "definitions", id="not_a_definition"),
    ],
)
async def test_bad_declarations_fail_at_once_naming_the_field(
    declaring_app: SchedulerApp, session: AsyncSession, declare: Any, field: str
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        declare(declaring_app)
    assert raised.value.field == field
    assert len(declaring_app.declarations) == 0
    await declaring_app.apply_declarations()
    assert await _jobs(session) == {}


def test_schedule_version_must_be_a_non_negative_integer(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    for bad in (-1, True, "2"):
        with pytest.raises(InvalidJobError) as raised:
            SchedulerApp(broker=broker, session_factory=session_factory, schedule_version=bad)  # type: ignore[arg-type]
        assert raised.value.field == "schedule_version"


def _old_code(app: SchedulerApp) -> None:
    """Version 1: jobs a (every minute) and b."""
    app.define(
        app.single(task="tests.record", args=["v1"]).definition(trigger=EVERY_MINUTE, job_id="a"),
        app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="b"),
    )


def _new_code(app: SchedulerApp) -> None:
    """Version 2: a changed, b gone, c new."""
    app.define(
        app.single(task="tests.record", args=["v2"]).definition(trigger=EVERY_MINUTE, job_id="a"),
        app.single(task="tests.other").definition(trigger=EVERY_MINUTE, job_id="c"),
    )


def _assert_new_code_state(jobs: dict[str, SchedulerJob]) -> None:
    # b exists (disabled) if version 1 applied first, not at all if version 2 did.
    assert set(jobs) - {"b"} == {"a", "c"}
    assert jobs["a"].args == ["v2"]
    assert "b" not in jobs or not jobs["b"].is_enabled
    assert jobs["c"].is_enabled
    assert {job.schedule_version for job in jobs.values()} == {2}


async def test_an_older_schedule_version_never_overwrites_a_newer_one(
    database_url: str, session: AsyncSession, clock: FakeClock
) -> None:
    async with (
        _process(database_url, clock, 1, _old_code) as old,
        _process(database_url, clock, 2, _new_code) as new,
    ):
        assert (await old.apply_declarations()).added == ["a", "b"]
        plan = await new.apply_declarations()
        assert (plan.added, plan.changed, plan.removed) == (["c"], ["a"], ["b"])
        # The old deployment restarts (or was still rolling out): it changes nothing.
        clock.advance(60)
        plan = await old.apply_declarations()
        assert (plan.skipped, plan.applied, plan.stored_version) == (True, False, 2)
        _assert_new_code_state(await _jobs(session))
        # Its diff says so too, and `start()` goes on scheduling what the database holds.
        assert (await old.apply_declarations(dry_run=True)).skipped


async def test_two_versions_applying_at_once_end_with_the_newer_one(
    database_url: str, session: AsyncSession, clock: FakeClock
) -> None:
    """Both orders, started together, on two engines (two processes' connection pools)."""
    for round_ in range(4):
        async with (
            _process(database_url, clock, 1, _old_code) as old,
            _process(database_url, clock, 2, _new_code) as new,
        ):
            first, second = (old, new) if round_ % 2 else (new, old)
            await asyncio.gather(first.apply_declarations(), second.apply_declarations())
        _assert_new_code_state(await _jobs(session))
        await session.execute(sa.delete(SchedulerJob))
        await session.commit()


async def test_an_equal_version_is_last_writer_wins(
    database_url: str, session: AsyncSession, clock: FakeClock
) -> None:
    async with (
        _process(database_url, clock, 3, _old_code) as first,
        _process(database_url, clock, 3, _new_code) as second,
    ):
        await first.apply_declarations()
        await second.apply_declarations()
        jobs = await _jobs(session)
        assert jobs["a"].args == ["v2"]
        assert not jobs["b"].is_enabled
        await first.apply_declarations()
        jobs = await _jobs(session)
        assert jobs["a"].args == ["v1"]
        assert jobs["b"].is_enabled
        assert not jobs["c"].is_enabled


async def test_a_crontab_declared_without_timezone_takes_the_default(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(default_timezone="Asia/Tokyo", record_lifecycle=False),
        clock=clock,
    )
    app.periodic(CrontabTrigger(minute="0", hour="9"), job_id="tokyo")(
        broker.find_task("tests.record")
    )
    await app.apply_declarations()
    job = (await _jobs(session))["tokyo"]
    assert job.trigger["crontab"]["timezone"] == "Asia/Tokyo"
    assert job.next_run_at is not None
    assert job.next_run_at.astimezone(UTC).hour == 0


async def test_the_retention_keeps_a_declared_one_off_that_fired(
    declaring_app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    """Deleted, it would be declared anew at the next start, and fire again."""
    app = declaring_app
    run_at = clock.now() + timedelta(minutes=1)
    app.define(
        app.single(task="tests.record").definition(
            trigger=OneOffSchedule(run_at=run_at), job_id="declared-once"
        )
    )
    await app.apply_declarations()
    await app.single(task="tests.record").upsert(
        session, trigger=OneOffSchedule(run_at=run_at), job_id="api-once"
    )
    await session.execute(sa.update(SchedulerJob).values(next_run_at=None, last_run_at=run_at))
    await session.commit()
    store = app._store
    assert await store.purge_history(before=run_at + timedelta(days=2), limit=100) == (0, 1)
    assert set(await _jobs(session)) == {"declared-once"}
    assert (await app.apply_declarations()).unchanged == ["declared-once"]


async def test_an_apply_waits_for_the_one_in_progress(
    database_url: str, session: AsyncSession, clock: FakeClock
) -> None:
    """The lock that serializes applies: held by one process, the other's apply waits for
    its commit and then sees what it wrote."""
    async with (
        _process(database_url, clock, 2, _new_code) as new,
        _process(database_url, clock, 1, _old_code) as old,
    ):
        async with new.session_factory() as holder:
            await new._store.lock_declarations(holder)
            waiting = asyncio.create_task(old.apply_declarations())
            done, _ = await asyncio.wait({waiting}, timeout=0.5)
            assert not done  # blocked on the lock, not failed
            await new.apply_declarations(holder)  # applies and commits: the lock is free
        plan = await waiting
        assert (plan.skipped, plan.stored_version) == (True, 2)
    _assert_new_code_state(await _jobs(session))


async def test_a_declared_policy_is_applied_and_a_policy_change_keeps_the_next_run(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
) -> None:
    def app_with(jitter: float) -> SchedulerApp:
        app = SchedulerApp(
            broker=broker, session_factory=session_factory, config=CONFIG, clock=clock
        )
        builder = app.single(task="tests.record").policy(jitter_seconds=jitter)
        app.define(builder.definition(trigger=EVERY_MINUTE, job_id="guarded"))
        return app

    await app_with(5.0).apply_declarations()
    first = (await _jobs(session))["guarded"]
    assert first.policy is not None
    assert first.policy["jitter_seconds"] == 5.0
    clock.advance(10)
    plan = await app_with(10.0).apply_declarations()
    assert plan.changed == ["guarded"]
    second = (await _jobs(session))["guarded"]
    assert second.policy is not None
    assert second.policy["jitter_seconds"] == 10.0
    assert second.next_run_at == first.next_run_at
