"""The documented API: builders, upsert, management calls, bad input — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from taskiq_beat import (
    ChainStep,
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    InvalidJobError,
    JobKind,
    JobNotFoundError,
    JobStrategy,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
    UnknownTaskError,
    fire_task_id,
)
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc
EVERY_MINUTE = PeriodicSchedule(interval=IntervalTrigger(minutes=1))


async def count_rows(session: AsyncSession, model: type[Any]) -> int:
    result = await session.execute(sa.select(sa.func.count()).select_from(model))
    await session.commit()
    return int(result.scalar_one())


# ---------------------------------------------------------------------------- schedule


async def test_schedule_without_trigger_sends_at_once_and_stores_job_and_run(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record", args=[42], kwargs={"label": "ping"}).schedule(
        session
    )

    assert job.strategy is JobStrategy.IMMEDIATE
    assert job.kind is JobKind.SINGLE
    assert job.next_run_at is None
    [message] = broker.sent
    assert message.task_name == "tests.record"
    assert message.args == [42]
    assert message.kwargs == {"label": "ping"}
    assert message.task_id == fire_task_id(job.id, clock.now())
    [run] = await app.list_runs(session, job.id)
    assert run.status is RunStatus.DISPATCHED
    assert run.scheduled_for == clock.now()
    assert run.task_id == message.task_id
    assert run.next_attempt_at is None


async def test_explicit_immediate_dispatch_is_the_default(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=ImmediateDispatch())
    assert job.strategy is JobStrategy.IMMEDIATE
    assert len(broker.sent) == 1


async def test_schedule_accepts_task_object_and_returns_readable_row(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    task = broker.find_task("tests.record")
    job = await app.single(task=task, metadata={"scope": "system"}).schedule(
        session,
        trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=5)),
        name="Heartbeat",
        description="every 5 s",
    )
    assert job.task_name == "tests.record"
    assert job.name == "Heartbeat"
    assert job.description == "every 5 s"
    assert job.job_metadata == {"scope": "system"}
    assert job.next_run_at == clock.now() + timedelta(seconds=5)
    assert job.is_enabled is True
    assert job.created_at.tzinfo is not None
    assert broker.sent == []


async def test_rows_stay_readable_with_expire_on_commit(
    broker: RecordingBroker, db_engine: Any, clock: FakeClock
) -> None:
    factory = async_sessionmaker(db_engine)  # expire_on_commit=True, SQLAlchemy's default
    app = SchedulerApp(broker=broker, session_factory=factory, clock=clock)
    async with factory() as session:
        job = await app.single(task="tests.record").schedule(session, trigger=EVERY_MINUTE)
        paused = await app.pause(session, job.id)
        listed = await app.list_jobs(session)
    # Reading attributes after the commits must not need I/O.
    assert job.next_run_at == clock.now() + timedelta(minutes=1)
    assert paused.is_enabled is False
    assert [j.id for j in listed] == [job.id]


async def test_one_off_and_cron_next_run_at(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    run_at = clock.now() + timedelta(minutes=10)
    one_off = await app.single(task="tests.record").schedule(
        session, trigger=OneOffSchedule(run_at=run_at)
    )
    cron = await app.single(task="tests.record").schedule(
        session,
        trigger=PeriodicSchedule(crontab=CrontabTrigger(second="0", minute="*/5", hour="*")),
    )
    assert one_off.strategy is JobStrategy.ONE_OFF
    assert one_off.next_run_at == run_at
    assert cron.strategy is JobStrategy.CRONTAB
    assert cron.next_run_at == datetime(2026, 1, 5, 12, 5, tzinfo=UTC)


async def test_one_off_in_a_non_utc_zone_is_stored_as_utc(
    app: SchedulerApp, session: AsyncSession, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    plus_two = timezone(timedelta(hours=2))
    job = await app.single(task="tests.record").schedule(
        session, trigger=OneOffSchedule(run_at=datetime(2026, 1, 5, 14, 30, tzinfo=plus_two))
    )
    async with session_factory() as fresh:
        stored = await app.get_job(fresh, job.id)
    assert stored.next_run_at == datetime(2026, 1, 5, 12, 30, tzinfo=UTC)
    assert stored.next_run_at is not None
    assert stored.next_run_at.utcoffset() == timedelta(0)


async def test_default_timezone_applies_to_crontab_without_timezone(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(default_timezone="Asia/Tokyo"),
        clock=clock,
    )
    async with session_factory() as session:
        job = await app.single(task="tests.record").schedule(
            session, trigger=PeriodicSchedule(crontab=CrontabTrigger(minute="0", hour="9"))
        )
    # 09:00 in Tokyo (UTC+9) is 00:00 UTC; the clock stands at 2026-01-05 12:00 UTC.
    assert job.next_run_at == datetime(2026, 1, 6, 0, 0, tzinfo=UTC)
    assert job.trigger["crontab"]["timezone"] == "Asia/Tokyo"


async def test_chain_job_stores_resolved_steps(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker
) -> None:
    job = await app.chain(
        steps=[
            ChainStep(task="tests.record", args=[1]),
            ChainStep(task=broker.find_task("tests.record"), max_attempts=3, post_delay_ms=5),
        ],
        on_failure="restart",
        max_chain_attempts=2,
        default_step_timeout_seconds=30.0,
    ).schedule(session, trigger=EVERY_MINUTE)
    assert job.kind is JobKind.CHAIN
    assert job.task_name == "taskiq_beat.chain_orchestrator"
    chain = job.kwargs["chain"]
    assert chain["on_failure"] == "restart"
    assert chain["max_chain_attempts"] == 2
    assert [s["max_attempts"] for s in chain["steps"]] == [1, 3]
    assert [s["timeout_seconds"] for s in chain["steps"]] == [30.0, 30.0]
    assert chain["steps"][1]["post_delay_ms"] == 5


# ---------------------------------------------------------------------------- upsert


async def test_upsert_creates_then_updates_without_duplicates(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    first = await app.single(task="tests.record").upsert(
        session, trigger=EVERY_MINUTE, job_id="system.cleanup", name="Cleanup"
    )
    clock.advance(20)
    second = await app.single(task="tests.record", args=[7]).upsert(
        session, trigger=EVERY_MINUTE, job_id="system.cleanup", name="Cleanup v2"
    )
    assert await count_rows(session, SchedulerJob) == 1
    assert second.id == first.id == "system.cleanup"
    assert second.name == "Cleanup v2"
    assert second.args == [7]
    # Same trigger, task and enabled state: next_run_at is kept.
    assert second.next_run_at == datetime(2026, 1, 5, 12, 1, tzinfo=UTC)
    assert second.revision == 2


@pytest.mark.parametrize(
    ("change", "expected_next"),
    [
        pytest.param(
            {"trigger": PeriodicSchedule(interval=IntervalTrigger(minutes=5))},
            datetime(2026, 1, 5, 12, 5, 20, tzinfo=UTC),
            id="trigger_changed",
        ),
        pytest.param(
            {"task": "tests.fail"}, datetime(2026, 1, 5, 12, 1, 20, tzinfo=UTC), id="task_changed"
        ),
    ],
)
async def test_upsert_recalculates_next_run_at_when_schedule_changes(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    change: dict[str, Any],
    expected_next: datetime,
) -> None:
    await app.single(task="tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
    clock.advance(20)
    job = await app.single(task=change.get("task", "tests.record")).upsert(
        session, trigger=change.get("trigger", EVERY_MINUTE), job_id="j"
    )
    assert job.next_run_at == expected_next


async def test_upsert_recalculates_when_enabled_state_changes(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    await app.single(task="tests.record").upsert(
        session, trigger=EVERY_MINUTE, job_id="j", is_enabled=False
    )
    clock.advance(30)
    job = await app.single(task="tests.record").upsert(
        session, trigger=EVERY_MINUTE, job_id="j", is_enabled=True
    )
    assert job.is_enabled is True
    assert job.next_run_at == clock.now() + timedelta(minutes=1)


async def test_upsert_with_immediate_dispatch_is_refused_and_stores_nothing(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker
) -> None:
    with pytest.raises(ValueError, match="ImmediateDispatch"):
        await app.single(task="tests.record").upsert(
            session, trigger=ImmediateDispatch(), job_id="x"
        )
    assert await count_rows(session, SchedulerJob) == 0
    assert broker.sent == []


async def test_schedule_with_existing_job_id_is_refused(
    app: SchedulerApp, session: AsyncSession
) -> None:
    await app.single(task="tests.record").schedule(session, trigger=EVERY_MINUTE, job_id="dup")
    with pytest.raises(InvalidJobError, match="dup") as raised:
        await app.single(task="tests.record", args=[1]).schedule(
            session, trigger=EVERY_MINUTE, job_id="dup"
        )
    assert raised.value.field == "job_id"
    [job] = await app.list_jobs(session)
    assert job.args == []
    # Again with the existing row loaded in the same session (no SQLAlchemy warning either).
    await app.get_job(session, "dup")
    with pytest.raises(InvalidJobError, match="dup"):
        await app.single(task="tests.record").schedule(session, trigger=EVERY_MINUTE, job_id="dup")


# ---------------------------------------------------------------------------- management


async def test_pause_resume_run_now_delete(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=EVERY_MINUTE)

    paused = await app.pause(session, job.id)
    assert paused.is_enabled is False
    assert (await app.list_jobs(session, is_enabled=False))[0].id == job.id

    clock.advance(90)
    resumed = await app.resume(session, job.id)
    assert resumed.is_enabled is True
    assert resumed.next_run_at == clock.now() + timedelta(minutes=1)

    run = await app.run_now(session, job.id)
    assert isinstance(run, SchedulerRun)
    assert run.status is RunStatus.DISPATCHED
    assert run.scheduled_for == clock.now()
    assert [m.task_id for m in broker.sent] == [run.task_id]
    # run_now leaves the schedule alone.
    assert (await app.get_job(session, job.id)).next_run_at == resumed.next_run_at

    await app.delete(session, job.id)
    assert await count_rows(session, SchedulerJob) == 0
    assert await count_rows(session, SchedulerRun) == 0


@pytest.mark.parametrize("operation", ["pause", "resume", "run_now", "delete", "get_job"])
async def test_missing_job_raises_lookup_error_naming_the_id(
    app: SchedulerApp, session: AsyncSession, operation: str
) -> None:
    with pytest.raises(JobNotFoundError, match="no-such-job") as raised:
        await getattr(app, operation)(session, "no-such-job")
    assert isinstance(raised.value, LookupError)
    assert raised.value.job_id == "no-such-job"


async def test_list_jobs_filters_and_pages(app: SchedulerApp, session: AsyncSession) -> None:
    for index in range(5):
        await app.single(task="tests.record").upsert(
            session, trigger=EVERY_MINUTE, job_id=f"job-{index}", is_enabled=index != 2
        )
    await app.single(task="tests.fail").upsert(session, trigger=EVERY_MINUTE, job_id="other")

    assert [j.id for j in await app.list_jobs(session, limit=2)] == ["job-0", "job-1"]
    assert [j.id for j in await app.list_jobs(session, limit=2, offset=2)] == ["job-2", "job-3"]
    assert [j.id for j in await app.list_jobs(session, is_enabled=False)] == ["job-2"]
    assert [j.id for j in await app.list_jobs(session, task_name="tests.fail")] == ["other"]


async def test_list_runs_newest_first_with_limit_and_status(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=EVERY_MINUTE)
    for _ in range(3):
        clock.advance(1)
        await app.run_now(session, job.id)
    runs = await app.list_runs(session, job.id, limit=2)
    assert [r.scheduled_for for r in runs] == [clock.now(), clock.now() - timedelta(seconds=1)]
    assert len(await app.list_runs(session, job_id=job.id, status="dispatched")) == 3
    assert await app.list_runs(session, job_id=job.id, status=RunStatus.FAILED) == []
    with pytest.raises(InvalidJobError, match="status"):
        await app.list_runs(session, job.id, status="exploded")


# ---------------------------------------------------------------------------- bad input


class NotJson:
    pass


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"task": "no.such.task"}, "task", id="unknown_task_name"),
        pytest.param({"task": 123}, "task", id="task_not_a_name"),
        pytest.param({"task": "tests.record", "args": [NotJson()]}, "args", id="args_not_json"),
        pytest.param({"task": "tests.record", "args": "abc"}, "args", id="args_not_a_list"),
        pytest.param(
            {"task": "tests.record", "kwargs": {"x": {1, 2}}}, "kwargs", id="kwargs_not_json"
        ),
        pytest.param({"task": "tests.record", "kwargs": {1: "a"}}, "kwargs", id="kwargs_int_key"),
        pytest.param(
            {"task": "tests.record", "args": [float("nan")]}, "args", id="args_nan_not_json"
        ),
        pytest.param(
            {"task": "tests.record", "metadata": {"x": NotJson()}}, "metadata", id="metadata"
        ),
    ],
)
async def test_bad_builder_input_names_field_and_stores_nothing(
    app: SchedulerApp, session: AsyncSession, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        await app.single(**kwargs).schedule(session, trigger=EVERY_MINUTE)
    assert raised.value.field == field
    assert field in str(raised.value)
    assert await count_rows(session, SchedulerJob) == 0


async def test_unknown_task_error_is_a_value_error_naming_the_task(
    app: SchedulerApp,
) -> None:
    with pytest.raises(UnknownTaskError, match=r"no\.such\.task") as raised:
        app.single(task="no.such.task")
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("schedule_kwargs", "field"),
    [
        pytest.param({"job_id": "x" * 256}, "job_id", id="job_id_too_long"),
        pytest.param({"job_id": ""}, "job_id", id="job_id_empty"),
        pytest.param({"job_id": 17}, "job_id", id="job_id_not_a_string"),
        pytest.param({"name": "n" * 300}, "name", id="name_too_long"),
        pytest.param({"trigger": "every minute"}, "trigger", id="trigger_not_a_trigger"),
        pytest.param({"is_enabled": "yes"}, "is_enabled", id="is_enabled_not_bool"),
    ],
)
async def test_bad_schedule_arguments_name_field_and_store_nothing(
    app: SchedulerApp, session: AsyncSession, schedule_kwargs: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {"trigger": EVERY_MINUTE, **schedule_kwargs}
    with pytest.raises(InvalidJobError) as raised:
        await app.single(task="tests.record").schedule(session, **arguments)
    assert raised.value.field == field
    assert await count_rows(session, SchedulerJob) == 0


async def test_job_id_of_maximum_length_is_accepted(
    app: SchedulerApp, session: AsyncSession
) -> None:
    job = await app.single(task="tests.record").upsert(
        session, trigger=EVERY_MINUTE, job_id="x" * 255
    )
    assert (await app.get_job(session, "x" * 255)).id == job.id


async def test_a_task_name_longer_than_its_column_is_refused_before_the_database(
    app: SchedulerApp, broker: RecordingBroker, session: AsyncSession
) -> None:
    long_name = "t" * 256

    @broker.task(task_name=long_name)
    async def long_named() -> None:
        return None

    with pytest.raises(InvalidJobError, match="longer than 255 characters") as raised:
        app.single(task=long_name)
    assert raised.value.field == "task"
    assert str(raised.value).startswith("invalid task='tttt")
    assert await count_rows(session, SchedulerJob) == 0


async def test_ids_names_and_texts_at_their_limits_round_trip(
    app: SchedulerApp, broker: RecordingBroker, session: AsyncSession
) -> None:
    """The longest job id and task name, in 4-byte characters (MySQL's utf8mb4), ids that
    differ only in case or accents as different jobs (its binary collation), and a
    description beyond MySQL's 64 KiB TEXT."""
    task_name = "\N{SNAKE}" * 255

    @broker.task(task_name=task_name)
    async def snake() -> None:
        return None

    job_id = "\N{GRINNING FACE}" * 255
    description = "d" * 70_000
    await app.single(task=task_name).upsert(
        session, trigger=EVERY_MINUTE, job_id=job_id, description=description
    )
    for other in ("job", "Job", "jöb"):
        await app.single(task="tests.record").upsert(session, trigger=EVERY_MINUTE, job_id=other)
    stored = await app.get_job(session, job_id)
    assert (stored.id, stored.task_name, stored.description) == (job_id, task_name, description)
    assert [job.id for job in await app.list_jobs(session) if len(job.id) == 3] == [
        "Job",
        "job",
        "jöb",
    ]


@pytest.mark.parametrize(
    ("chain_kwargs", "field"),
    [
        pytest.param({"steps": []}, "steps", id="no_steps"),
        pytest.param({"steps": ["tests.record"]}, "steps[0]", id="step_not_chainstep"),
        pytest.param(
            {"steps": [ChainStep(task="no.such.task")]}, "steps[0].task", id="unknown_step_task"
        ),
        pytest.param(
            {"steps": [ChainStep(task="tests.record", args=[NotJson()])]},
            "steps[0].args",
            id="step_args_not_json",
        ),
        pytest.param({"on_failure": "explode"}, "on_failure", id="bad_on_failure"),
        pytest.param({"max_chain_attempts": 0}, "max_chain_attempts", id="zero_chain_attempts"),
        pytest.param(
            {"default_step_timeout_seconds": -1}, "default_step_timeout_seconds", id="neg_timeout"
        ),
        pytest.param(
            {"wait_poll_interval_seconds": 0}, "wait_poll_interval_seconds", id="zero_poll"
        ),
    ],
)
async def test_bad_chain_input_names_field(
    app: SchedulerApp, chain_kwargs: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {"steps": [ChainStep(task="tests.record")], **chain_kwargs}
    with pytest.raises(InvalidJobError) as raised:
        app.chain(**arguments)
    assert raised.value.field == field


def test_chain_step_validates_its_fields() -> None:
    with pytest.raises(InvalidJobError, match="max_attempts"):
        ChainStep(task="tests.record", max_attempts=0)
    with pytest.raises(InvalidJobError, match="post_delay_ms"):
        ChainStep(task="tests.record", post_delay_ms=-5)


async def test_naive_datetime_is_rejected_naming_the_field(
    app: SchedulerApp, session: AsyncSession
) -> None:
    with pytest.raises(InvalidJobError, match="run_at") as raised:
        OneOffSchedule(run_at=datetime(2026, 1, 1, 12, 0))
    assert "naive" in str(raised.value)
    assert await count_rows(session, SchedulerJob) == 0


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param({"sync_interval_seconds": 0}, "sync_interval_seconds", id="zero_sync"),
        pytest.param({"idle_sleep_seconds": -1}, "idle_sleep_seconds", id="negative_idle"),
        pytest.param({"dispatch_concurrency": 0}, "dispatch_concurrency", id="zero_concurrency"),
        pytest.param({"dispatch_batch_size": 0}, "dispatch_batch_size", id="zero_batch"),
        pytest.param({"default_timezone": "Mars/Olympus"}, "default_timezone", id="unknown_tz"),
        pytest.param({"sync_interval": 1}, "sync_interval", id="unknown_field"),
    ],
)
def test_config_rejects_bad_values(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**settings)


def test_config_defaults_match_the_documented_ones() -> None:
    config = SchedulerConfig()
    assert config.sync_interval_seconds == 1.0
    assert config.idle_sleep_seconds == 0.2
    assert config.dispatch_retry_seconds == 5
    assert config.dispatch_concurrency == 32
    assert config.dispatch_batch_size == 256
    assert config.record_runs is True
    assert config.default_timezone == "UTC"


# ---------------------------------------------------------------------------- logging, races


async def test_management_calls_log_under_taskiq_beat(
    app: SchedulerApp, session: AsyncSession, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="taskiq_beat"):
        job = await app.single(task="tests.record").upsert(
            session, trigger=EVERY_MINUTE, job_id="logged"
        )
        await app.pause(session, job.id)
        await app.resume(session, job.id)
        await app.run_now(session, job.id)
        await app.delete(session, job.id)
        await app.start()
        await app.stop()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("taskiq_beat.")]
    for expected in (
        "upserted job logged",
        "paused job logged",
        "resumed job logged",
        "ran job logged now",
        "deleted job logged",
        "scheduler started",
        "scheduler stopped",
    ):
        assert any(expected in m for m in messages), (expected, messages)


async def test_concurrent_upserts_of_one_id_leave_one_row(
    app: SchedulerApp, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    async def upsert(index: int) -> SchedulerJob:
        async with session_factory() as session:
            return await app.single(task="tests.record", args=[index]).upsert(
                session, trigger=EVERY_MINUTE, job_id="raced"
            )

    jobs = await asyncio.gather(*(upsert(index) for index in range(5)))
    assert {job.id for job in jobs} == {"raced"}
    async with session_factory() as session:
        assert await count_rows(session, SchedulerJob) == 1
        [stored] = await app.list_jobs(session)
    assert stored.args in ([0], [1], [2], [3], [4])


# ---------------------------------------------------------------------------- upsert_many


async def test_upsert_many_creates_then_updates_like_upsert(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    every_five = PeriodicSchedule(interval=IntervalTrigger(minutes=5))
    definitions = [
        app.single(task="tests.record", args=[index]).definition(
            trigger=EVERY_MINUTE, job_id=f"bulk-{index}", name=f"Bulk {index}"
        )
        for index in range(50)
    ]
    definitions.append(
        app.chain(steps=[ChainStep(task="tests.record")]).definition(
            trigger=every_five, job_id="bulk-chain"
        )
    )
    assert await app.upsert_many(session, definitions) == 51
    jobs = {job.id: job for job in await app.list_jobs(session)}
    assert len(jobs) == 51
    assert jobs["bulk-7"].args == [7]
    assert jobs["bulk-7"].name == "Bulk 7"
    assert jobs["bulk-7"].next_run_at == clock.now() + timedelta(minutes=1)
    assert jobs["bulk-chain"].kind is JobKind.CHAIN
    assert jobs["bulk-chain"].revision == 1

    clock.advance(20)
    again = [
        app.single(task="tests.record", args=[index, "v2"]).definition(
            trigger=every_five if index == 0 else EVERY_MINUTE, job_id=f"bulk-{index}"
        )
        for index in range(3)
    ]
    assert await app.upsert_many(session, again) == 3
    jobs = {job.id: job for job in await app.list_jobs(session)}
    assert len(jobs) == 51
    # The trigger changed: rescheduled from now. Unchanged: next_run_at kept, args updated.
    assert jobs["bulk-0"].next_run_at == clock.now() + timedelta(minutes=5)
    assert jobs["bulk-1"].next_run_at == clock.now() - timedelta(seconds=20) + timedelta(minutes=1)
    assert jobs["bulk-1"].args == [1, "v2"]
    assert jobs["bulk-1"].revision == 2
    assert jobs["bulk-1"].name is None
    assert jobs["bulk-1"].created_at == jobs["bulk-9"].created_at


async def test_upsert_many_jobs_reach_the_running_engine(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    await app.engine.sync()
    definitions = [
        app.single(task="tests.record").definition(
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=1)), job_id=f"fast-{index}"
        )
        for index in range(5)
    ]
    await app.upsert_many(session, definitions)
    clock.advance(1)
    assert await app.engine.tick() == 5


@pytest.mark.parametrize(
    ("make", "field"),
    [
        pytest.param(lambda app: ["not a definition"], "definitions", id="not_a_definition"),
        pytest.param(
            lambda app: [
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="same"),
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="same"),
            ],
            "job_id",
            id="id_given_twice",
        ),
        pytest.param(
            lambda app: [
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="ok"),
                app.single(task="tests.record").definition(
                    trigger=ImmediateDispatch(), job_id="now"
                ),
            ],
            "trigger",
            id="immediate_dispatch",
        ),
        pytest.param(
            lambda app: [
                app.single(task="tests.record").definition(trigger=EVERY_MINUTE, job_id="x" * 300)
            ],
            "job_id",
            id="job_id_too_long",
        ),
    ],
)
async def test_upsert_many_refuses_bad_input_and_stores_nothing(
    app: SchedulerApp, session: AsyncSession, make: Any, field: str
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        await app.upsert_many(session, make(app))
    assert raised.value.field == field
    assert await count_rows(session, SchedulerJob) == 0


async def test_upsert_many_applies_the_default_timezone(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(default_timezone="Asia/Tokyo"),
        clock=clock,
    )
    cron = PeriodicSchedule(crontab=CrontabTrigger(minute="0", hour="9"))
    async with session_factory() as session:
        await app.upsert_many(
            session, [app.single(task="tests.record").definition(trigger=cron, job_id="tokyo")]
        )
        job = await app.get_job(session, "tokyo")
    assert job.next_run_at == datetime(2026, 1, 6, 0, 0, tzinfo=UTC)
