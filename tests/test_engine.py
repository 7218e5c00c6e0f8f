"""The engine: windowed sync, claim-before-send, coalescing, retries, stop — on both backends.

Time is driven by a fake clock and ``engine.tick()``; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import sqlite3
import types
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from taskiq_beat import (
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
    fire_task_id,
)
from taskiq_beat import claiming as claiming_module
from taskiq_beat import engine as engine_module
from taskiq_beat.policy import FirePlan
from taskiq_beat.reporting import FailedSends
from taskiq_beat.store import ChangeListener, Claims, SchedulerStore
from taskiq_beat.store.dialects import postgresql as store_module
from taskiq_beat.store.dialects.postgresql import _PostgresBatchSql
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc


def every(seconds: float) -> PeriodicSchedule:
    return PeriodicSchedule(interval=IntervalTrigger(seconds=seconds))


async def runs_of(session: AsyncSession, job_id: str) -> list[SchedulerRun]:
    result = await session.execute(
        sa.select(SchedulerRun)
        .where(SchedulerRun.job_id == job_id)
        .order_by(SchedulerRun.scheduled_for)
        .execution_options(populate_existing=True)
    )
    runs = list(result.scalars())
    await session.commit()
    return runs


async def reload(session: AsyncSession, job_id: str) -> SchedulerJob:
    result = await session.execute(
        sa.select(SchedulerJob)
        .where(SchedulerJob.id == job_id)
        .execution_options(populate_existing=True)
    )
    job = result.scalar_one()
    await session.commit()
    return job


def second_app(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    config: SchedulerConfig | None = None,
) -> SchedulerApp:
    """Another scheduler on the same database (as a second process would be)."""
    return SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)


async def test_interval_job_fires_on_schedule_and_stays_on_its_grid(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    job = await app.single(task="tests.record", args=[1]).schedule(session, trigger=every(10))
    await app.engine.sync()

    assert await app.engine.tick() == 0
    clock.advance(10.7)  # a late tick: the next fire still counts from the scheduled time
    assert await app.engine.tick() == 1
    clock.advance(9.3)
    assert await app.engine.tick() == 1

    scheduled = [r.scheduled_for for r in await runs_of(session, job.id)]
    assert scheduled == [start + timedelta(seconds=10), start + timedelta(seconds=20)]
    assert (await reload(session, job.id)).next_run_at == start + timedelta(seconds=30)
    assert [m.task_id for m in broker.sent] == [fire_task_id(job.id, t) for t in scheduled]
    assert broker.state.executed == [((1,), {}), ((1,), {})]


async def test_missed_fires_coalesce_into_the_latest_one(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(misfire_grace_seconds=0),
        clock=clock,
    )
    start = clock.now()
    job = await app.single(task="tests.record").schedule(session, trigger=every(5))
    clock.advance(52)  # ten fires were due while the scheduler was away
    await app.engine.sync()
    assert await app.engine.tick() == 1
    missed, run = await runs_of(session, job.id)
    assert run.scheduled_for == start + timedelta(seconds=50)
    assert run.status is not RunStatus.MISSED  # sent
    # History shows the gap: one row for the stretch of fires not sent.
    assert missed.scheduled_for == start + timedelta(seconds=5)
    assert missed.status is RunStatus.MISSED
    assert missed.finished_at == clock.now()
    assert missed.error is not None
    assert f"until before {run.scheduled_for.isoformat()}" in missed.error
    assert (await reload(session, job.id)).next_run_at == start + timedelta(seconds=55)
    assert len(broker.sent) == 1


async def test_fires_within_the_misfire_grace_are_each_sent_in_order(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    assert app.config.misfire_grace_seconds == 30
    start = clock.now()
    job = await app.single(task="tests.record").schedule(session, trigger=every(5))
    clock.advance(52)  # fires 5..50 due; 25..50 are at most 30 s late, 5..20 are missed
    await app.engine.sync()
    assert await app.engine.tick() == 6
    expected = [start + timedelta(seconds=s) for s in (25, 30, 35, 40, 45, 50)]
    missed, *runs = await runs_of(session, job.id)
    assert [r.scheduled_for for r in runs] == expected
    assert (missed.scheduled_for, missed.status) == (
        start + timedelta(seconds=5),
        RunStatus.MISSED,
    )
    assert [m.task_id for m in broker.sent] == [fire_task_id(job.id, t) for t in expected]
    assert (await reload(session, job.id)).next_run_at == start + timedelta(seconds=55)


async def test_one_off_fires_once(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(
        session, trigger=OneOffSchedule(run_at=clock.now() + timedelta(seconds=3))
    )
    await app.engine.sync()
    clock.advance(3)
    assert await app.engine.tick() == 1
    clock.advance(60)
    await app.engine.sync()
    assert await app.engine.tick() == 0
    assert (await reload(session, job.id)).next_run_at is None
    assert len(await runs_of(session, job.id)) == 1


async def test_past_one_off_fires_at_once(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    await app.single(task="tests.record").schedule(
        session, trigger=OneOffSchedule(run_at=clock.now() - timedelta(days=1))
    )
    await app.engine.sync()
    assert await app.engine.tick() == 1


async def test_end_at_stops_a_periodic_job(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    trigger = PeriodicSchedule(
        interval=IntervalTrigger(seconds=10), end_at=clock.now() + timedelta(seconds=25)
    )
    job = await app.single(task="tests.record").schedule(session, trigger=trigger)
    await app.engine.sync()
    fired = 0
    for _ in range(5):
        clock.advance(10)
        fired += await app.engine.tick()
    assert fired == 2
    assert (await reload(session, job.id)).next_run_at is None


async def test_sync_loads_only_jobs_due_within_the_window(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    for index in range(30):
        await app.single(task="tests.record").upsert(
            session, trigger=PeriodicSchedule(interval=IntervalTrigger(hours=1)), job_id=f"l{index}"
        )
    for index in range(3):
        await app.single(task="tests.record").upsert(
            session, trigger=every(1), job_id=f"soon{index}"
        )
    # A fresh engine, as after a restart, loads the three jobs due soon and nothing else.
    other = second_app(app.broker, session_factory, clock)  # type: ignore[arg-type]
    await other.engine.sync()
    assert other.engine.loaded_jobs == 3


async def test_in_process_changes_reach_the_engine_without_a_sync(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(sync_interval_seconds=3600),
        clock=clock,
    )
    await app.engine.sync()
    async with session_factory() as session:
        job = await app.single(task="tests.record").schedule(session, trigger=every(2))
        clock.advance(2)
        assert await app.engine.tick() == 1
        await app.pause(session, job.id)
        clock.advance(2)
        assert await app.engine.tick() == 0
        await app.resume(session, job.id)
        clock.advance(2)
        assert await app.engine.tick() == 1


async def test_claim_loses_to_a_concurrent_edit_and_nothing_is_sent(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await app.engine.sync()  # the engine now holds next_run_at = +10 s
    # Another process moves the job an hour later behind this engine's back.
    later = clock.now() + timedelta(hours=1)
    await session.execute(
        sa.update(SchedulerJob)
        .where(SchedulerJob.id == job.id)
        .values(next_run_at=later, revision=SchedulerJob.revision + 1)
    )
    await session.commit()

    clock.advance(10)
    assert await app.engine.tick() == 0
    assert broker.sent == []
    assert await runs_of(session, job.id) == []
    assert (await reload(session, job.id)).next_run_at == later


async def test_a_payload_edited_by_another_process_is_the_one_sent(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The engine sends the payload it loaded with the job; an edit elsewhere bumps the
    revision, so the claim fails, the job is reloaded, and the edited payload is sent."""
    # No sync before the fire (it would see the edit): the claim has to catch it.
    app = second_app(broker, session_factory, clock, SchedulerConfig(sync_interval_seconds=60))
    await app.single(task="tests.record", args=[1], metadata={"v": "old"}).upsert(
        session, trigger=every(10), job_id="edited"
    )
    await app.engine.sync()  # the engine now holds args [1]
    other = second_app(broker, session_factory, clock)
    async with session_factory() as other_session:
        await other.single(task="tests.record", args=[2], metadata={"v": "new"}).upsert(
            other_session, trigger=every(10), job_id="edited"
        )
    clock.advance(10)
    assert await app.engine.tick() == 0  # the claim lost to the edit; the job is reloaded
    assert await app.engine.tick() == 1
    [message] = broker.sent
    assert message.args == [2]
    assert message.labels["v"] == "new"
    clock.advance(10)
    assert await app.engine.tick() == 1
    assert [m.args for m in broker.sent] == [[2], [2]]


async def test_an_edit_in_this_process_sends_the_new_payload_without_a_sync(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    await app.single(task="tests.record", args=[1]).upsert(
        session, trigger=every(10), job_id="edited"
    )
    await app.engine.sync()
    await app.single(task="tests.record", args=[2], kwargs={"k": 3}).upsert(
        session, trigger=every(10), job_id="edited"
    )
    clock.advance(10)
    assert await app.engine.tick() == 1
    [message] = broker.sent
    assert (message.args, message.kwargs) == ([2], {"k": 3})


async def test_claim_loses_to_a_pause_from_another_process(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await app.engine.sync()
    other = second_app(broker, session_factory, clock)
    async with session_factory() as other_session:
        await other.pause(other_session, job.id)
    clock.advance(10)
    assert await app.engine.tick() == 0
    assert broker.sent == []


async def test_two_schedulers_send_each_fire_once(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    other = second_app(broker, session_factory, clock)
    for index in range(20):
        await app.single(task="tests.record", args=[index]).upsert(
            session, trigger=every(1), job_id=f"job-{index}"
        )
    for _ in range(5):
        clock.advance(1)
        await app.engine.sync()
        await other.engine.sync()
        await asyncio.gather(app.engine.tick(), other.engine.tick())

    task_ids = [m.task_id for m in broker.sent]
    assert len(task_ids) == 100
    assert len(set(task_ids)) == 100
    count = await session.execute(sa.select(sa.func.count()).select_from(SchedulerRun))
    assert count.scalar_one() == 100


async def test_failed_send_is_retried_with_the_same_task_id(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(60))
    await app.engine.sync()
    clock.advance(60)
    broker.fail_sends = True
    assert await app.engine.tick() == 0
    [run] = await runs_of(session, job.id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert "unreachable" in run.error
    assert run.next_attempt_at == clock.now() + timedelta(seconds=5)
    # The schedule itself moved on.
    assert (await reload(session, job.id)).next_run_at == run.scheduled_for + timedelta(minutes=1)

    broker.fail_sends = False
    clock.advance(4)
    assert await app.engine.tick() == 0  # not yet
    clock.advance(1)
    assert await app.engine.tick() == 1
    [run] = await runs_of(session, job.id)
    assert run.status is RunStatus.DISPATCHED
    assert run.attempt == 2
    assert [m.task_id for m in broker.sent] == [fire_task_id(job.id, run.scheduled_for)]


async def test_a_broker_down_for_long_is_logged_in_a_few_lines_then_one_every_5_s(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every batch and every resend fails while the broker is down: the first three
    batches are logged a line each, then one line every 5 s sums up the rest, and one INFO
    line says when sends go through again. Nothing is lost from the counts."""
    for index in range(3):
        await app.single(task="tests.record", args=[index]).schedule(session, trigger=every(1))
    await app.engine.sync()
    broker.fail_sends = True
    with caplog.at_level(logging.INFO, logger="taskiq_beat.engine"):
        for _ in range(40):
            clock.advance(0.5)
            await app.engine.tick()
            await app.engine.sync()
        down = [r for r in caplog.records if r.levelno == logging.WARNING]
        failed = app.engine.stats.fires_failed
        broker.fail_sends = False
        clock.advance(1)
        await app.engine.tick()

    assert failed >= 3 * 20, "each of the 3 jobs failed at least once a second for 20 s"
    first, rest = down[:3], down[3:]
    assert all(r.getMessage().startswith("dispatch of 3 fires failed (job ") for r in first)
    assert all(r.getMessage().startswith("dispatch still failing: ") for r in rest)
    assert 3 <= len(rest) <= 4, [r.getMessage() for r in down]  # 20 s, a line every 5 s
    times = [r.created for r in rest]
    assert all(r.exc_info is None for r in down)
    logged = 3 * 3 + sum(int(r.getMessage().split()[3]) for r in rest)
    assert logged <= failed
    [back] = [r for r in caplog.records if "working again" in r.getMessage()]
    assert back.levelno == logging.INFO
    assert f"({failed} fires)" in back.getMessage()
    assert times == sorted(times)
    assert len(broker.sent) >= 3, "the fires due were sent once the broker was back"


def test_a_broker_that_fails_now_and_then_is_logged_at_the_same_pace() -> None:
    """Every other batch fails for a minute (four a second): a line for the first failure,
    then one every 5 s at most summing up the rest, and a line saying sends work again only
    after a failure that was logged, not one per failure and one per recovery."""
    logger = logging.getLogger("tests.failed_sends")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        failed_sends = FailedSends(logger)
        start = datetime(2026, 1, 5, 12, tzinfo=timezone.utc)
        fire = SimpleNamespace(job_id="job", scheduled_for=start)
        for step in range(240):
            now = start + timedelta(seconds=step / 4)
            if step % 2:
                failed_sends.sent(now)
            else:
                failed_sends.failed(5, fire, "refused", now, now)  # type: ignore[arg-type]
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    back = [r for r in records if r.levelno == logging.INFO]
    assert warnings[0].getMessage().startswith("dispatch of 5 fires failed (job job")
    assert 11 <= len(warnings) <= 13, [r.getMessage() for r in warnings]  # 60 s / 5 s + 1
    assert len(back) == len(warnings)
    summed = sum(int(r.getMessage().split()[3]) for r in warnings[1:])
    assert 5 + summed >= 5 * (120 - 10)  # every failure counted, the last 5 s aside


async def test_task_unknown_at_dispatch_disables_the_job_once(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @broker.task(task_name="tests.temporary")
    async def temporary() -> None:
        return None

    doomed = await app.single(task="tests.temporary").schedule(session, trigger=every(1))
    healthy = await app.single(task="tests.record").schedule(session, trigger=every(1))
    del broker.local_task_registry["tests.temporary"]
    await app.engine.sync()
    with caplog.at_level(logging.WARNING, logger="taskiq_beat"):
        for _ in range(4):
            clock.advance(1)
            await app.engine.tick()
            await app.engine.sync()

    job = await reload(session, doomed.id)
    assert job.is_enabled is False
    assert job.last_error is not None
    assert "tests.temporary" in job.last_error
    [run] = await runs_of(session, doomed.id)
    assert run.status is RunStatus.FAILED
    assert run.next_attempt_at is None
    assert len(await runs_of(session, healthy.id)) == 4
    disabling = [r for r in caplog.records if "disabling job" in r.getMessage()]
    assert len(disabling) == 1


async def test_corrupt_trigger_disables_only_that_job(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    bad = await app.single(task="tests.record").schedule(session, trigger=every(1))
    good = await app.single(task="tests.record").schedule(session, trigger=every(1))
    await session.execute(
        sa.update(SchedulerJob)
        .where(SchedulerJob.id == bad.id)
        .values(trigger={"version": 99, "type": "periodic"})
    )
    await session.commit()
    clock.advance(1)
    await app.engine.sync()
    assert await app.engine.tick() == 1
    job = await reload(session, bad.id)
    assert job.is_enabled is False
    assert job.last_error is not None
    assert "version" in job.last_error
    assert [m.labels["taskiq_beat_job_id"] for m in broker.sent] == [good.id]


async def test_corrupt_args_disable_the_job(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(1))
    await session.execute(
        sa.update(SchedulerJob).where(SchedulerJob.id == job.id).values(args={"not": "a list"})
    )
    await session.commit()
    clock.advance(1)
    await app.engine.sync()
    assert await app.engine.tick() == 0
    stored = await reload(session, job.id)
    assert stored.is_enabled is False
    assert stored.last_error is not None
    assert "args" in stored.last_error
    assert broker.sent == []


async def test_record_runs_false_keeps_no_history_but_sends(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(record_runs=False),
        clock=clock,
    )
    async with session_factory() as session:
        job = await app.single(task="tests.record").schedule(session, trigger=every(1))
        await app.engine.sync()
        clock.advance(1)
        assert await app.engine.tick() == 1
        assert await runs_of(session, job.id) == []
    assert len(broker.sent) == 1


async def test_a_claimed_fire_left_by_a_crashed_scheduler_is_resent_after_its_lease(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    due = clock.advance(10)
    # A scheduler claims the fire and dies before sending it.
    store = SchedulerStore(session_factory)
    claims = Claims()
    claims.add(
        job_id=job.id,
        expected_next_run_at=due,
        expected_revision=job.revision,
        scheduled_for=due,
        new_next_run_at=due + timedelta(seconds=10),
        task_id=fire_task_id(job.id, due),
        task_name=job.task_name,
        args=json.dumps(job.args),
        kwargs=json.dumps(job.kwargs),
        metadata=json.dumps(job.job_metadata),
    )
    fires, lost = await store.claim(
        claims,
        now=due,
        lease_until=due + timedelta(seconds=30),
        owner="crashed",
    )
    assert len(fires) == 1
    assert not lost

    await app.engine.sync()
    assert await app.engine.tick() == 0  # the lease still holds
    assert broker.sent == []
    clock.advance(30)
    await app.engine.sync()
    sent = await app.engine.tick()
    resent = [m for m in broker.sent if m.task_id == fire_task_id(job.id, due)]
    assert len(resent) == 1
    assert sent >= 1
    runs = {r.scheduled_for: r for r in await runs_of(session, job.id)}
    assert runs[due].status is RunStatus.DISPATCHED


async def due_noop_jobs(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    config: SchedulerConfig,
    count: int,
) -> SchedulerApp:
    """An app on ``broker`` with ``count`` jobs of the task ``tests.noop``, all due now."""
    broker.register_task(lambda: None, task_name="tests.noop")
    await broker.startup()
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)
    async with session_factory() as session:
        for index in range(count):
            await app.single(task="tests.noop").upsert(
                session, trigger=every(60), job_id=f"job-{index}"
            )
    clock.advance(60)
    return app


async def test_stop_mid_batch_releases_unsent_fires_and_nothing_is_sent_twice(
    session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    class SlowBroker(RecordingBroker):
        async def kick(self, message: Any) -> None:
            started.set()
            await gate.wait()
            await super().kick(message)

    broker = SlowBroker()
    # The scheduler's statuses alone: the in-memory broker runs the no-op tasks it is sent.
    config = SchedulerConfig(dispatch_concurrency=2, record_lifecycle=False)
    app = await due_noop_jobs(broker, session_factory, clock, config, 10)
    await app.start()
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(app.stop())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(stopping, 5)

    first_round = [m.task_id for m in broker.sent]
    assert len(first_round) == 2
    async with session_factory() as session:
        result = await session.execute(sa.select(SchedulerRun))
        runs = list(result.scalars())
    assert len(runs) == 10
    assert sum(r.status is RunStatus.DISPATCHED for r in runs) == 2
    released = [r for r in runs if r.status is RunStatus.CLAIMED]
    assert len(released) == 8
    assert all(r.next_attempt_at == clock.now() and r.claimed_by is None for r in released)

    # The next scheduler sends the released fires at once, each exactly once.
    successor = SchedulerApp(broker=broker, session_factory=session_factory, clock=clock)
    await successor.engine.sync()
    assert await successor.engine.tick() == 8
    task_ids = [m.task_id for m in broker.sent]
    assert len(task_ids) == 10
    assert len(set(task_ids)) == 10
    await broker.shutdown()


async def test_a_hanging_broker_holds_a_batch_for_one_timeout_and_every_fire_is_retried(
    session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    hang = asyncio.Event()
    hang.set()

    class HangingBroker(RecordingBroker):
        async def kick(self, message: Any) -> None:
            if hang.is_set():
                await asyncio.Event().wait()  # never answers, like a blackholed connection
            await super().kick(message)

    broker = HangingBroker()
    config = SchedulerConfig(
        dispatch_concurrency=4, dispatch_timeout_seconds=0.2, dispatch_retry_seconds=5
    )
    app = await due_noop_jobs(broker, session_factory, clock, config, 40)
    await app.engine.sync()
    began = asyncio.get_running_loop().time()
    assert await app.engine.tick() == 0
    took = asyncio.get_running_loop().time() - began
    assert took < 1.0, f"one timeout (0.2 s) for the batch, not ten (2 s): {took:.2f} s"

    async with session_factory() as session:
        runs = list((await session.execute(sa.select(SchedulerRun))).scalars())
    assert len(runs) == 40
    assert all(r.status is RunStatus.FAILED for r in runs)
    assert all(r.next_attempt_at == clock.now() + timedelta(seconds=5) for r in runs)
    errors = sorted({r.error for r in runs if r.error})
    assert errors == [
        "kiq timed out after 0.2 s",
        "not sent: kiq timed out after 0.2 s (another send of the batch)",
    ]
    assert sum(r.error == errors[0] for r in runs) == 4  # the sends in flight

    hang.clear()  # the broker answers again: every fire goes out once, at its retry time
    clock.advance(5)
    await app.engine.sync()
    assert await app.engine.tick() == 40
    assert len({m.task_id for m in broker.sent}) == 40 == len(broker.sent)
    await broker.shutdown()


async def test_sql_per_batch_does_not_grow_with_the_batch(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    db_engine: AsyncEngine,
) -> None:
    async def statements_for(count: int, prefix: str) -> int:
        for index in range(count):
            await app.single(task="tests.record").upsert(
                session, trigger=every(60), job_id=f"{prefix}{index}"
            )
        clock.advance(60)
        await app.engine.sync()
        executed: list[str] = []

        def count_statement(*args: Any) -> None:
            executed.append(args[2])

        event.listen(db_engine.sync_engine, "before_cursor_execute", count_statement)
        try:
            assert await app.engine.tick() >= count
        finally:
            event.remove(db_engine.sync_engine, "before_cursor_execute", count_statement)
        return len(executed)

    small = await statements_for(2, "a")
    large = await statements_for(60, "b")
    assert large == small


async def test_batches_grow_while_behind_and_shrink_back(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No run lifecycle: on MySQL a worker counting an outcome holds its job's row in share
    # mode for a moment (the foreign key), which a claim skips, and the sizes would vary.
    config = SchedulerConfig(dispatch_batch_size=4, record_lifecycle=False)
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)
    store = app.engine._store
    claimed: list[int] = []
    claim = store.claim

    async def counting_claim(claims: Any, **kwargs: Any) -> Any:
        claimed.append(len(claims))
        return await claim(claims, **kwargs)

    monkeypatch.setattr(store, "claim", counting_claim)
    async with session_factory() as session:
        await app.upsert_many(
            session,
            [
                app.single(task="tests.record", args=[index]).definition(
                    trigger=every(60), job_id=f"job-{index:03}"
                )
                for index in range(300)
            ],
        )
    clock.advance(60)
    await app.engine.sync()
    assert await app.engine.tick() == 300
    assert claimed == [4, 8, 16, 32, 64, 128, 48]  # doubling up to 32 x 4, then the rest

    claimed.clear()
    clock.advance(60)
    assert await app.engine.tick() == 300
    assert claimed == [4, 8, 16, 32, 64, 128, 48]  # back to the base size after the backlog

    # A failing broker brings batches back to the base size (the two batches claimed while
    # the first one was sent had grown already).
    claimed.clear()
    broker.fail_sends = True
    clock.advance(60)
    assert await app.engine.tick() == 0
    assert claimed == [4, 8, 16] + [4] * 68
    async with session_factory() as session:
        assert len(await app.list_runs(session, limit=None)) == 900


async def due_one_offs(app: SchedulerApp, session: AsyncSession, at: datetime, count: int) -> None:
    """``count`` one-off jobs of ``tests.record`` due at ``at``: ids ``job-000``..., args [i]."""
    await app.upsert_many(
        session,
        [
            app.single(task="tests.record", args=[index]).definition(
                trigger=OneOffSchedule(run_at=at), job_id=f"job-{index:03}"
            )
            for index in range(count)
        ],
    )


async def test_a_scheduler_behind_its_backlog_still_syncs_every_sync_interval(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass still sending when a sync falls due claims no further batch: it ends after the
    batches under way, and the next pass syncs first (changes made elsewhere are not held
    up by a backlog, and the look-ahead window moves on)."""
    config = SchedulerConfig(dispatch_batch_size=4)  # sync every 1 s
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)
    store = app.engine._store
    loads: list[datetime] = []
    load_due = store.load_due

    async def counting_load_due(horizon: datetime, **options: Any) -> Any:
        loads.append(clock.now())
        return await load_due(horizon, **options)

    kick = broker.kick

    async def slow_kick(message: Any) -> None:
        clock.advance(0.05)  # 140 sends: 7 s, seven sync intervals
        await kick(message)

    monkeypatch.setattr(store, "load_due", counting_load_due)
    monkeypatch.setattr(broker, "kick", slow_kick)
    async with session_factory() as session:
        await due_one_offs(app, session, clock.now(), 140)
    await app.engine.sync()
    started = clock.now()
    # Batches of 4, 8 and 16 go out in 1.4 s; those of 32 and 64 claimed by then are sent,
    # and no further batch is claimed: the sync due at 1 s comes first.
    assert await app.engine.tick() == 4 + 8 + 16 + 32 + 64
    assert loads == [started]
    assert await app.engine.tick() == 16
    assert len(loads) == 2
    assert loads[1] > started + timedelta(seconds=1)
    assert sorted(m.args[0] for m in broker.sent) == list(range(140))


async def test_the_sync_interval_counts_from_the_end_of_a_long_load(
    app: SchedulerApp, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.engine._store
    load_due = store.load_due
    loads: list[datetime] = []

    async def slow_load_due(horizon: datetime, **options: Any) -> Any:
        loads.append(clock.now())
        clock.advance(3)  # longer than the sync interval (1 s)
        return await load_due(horizon, **options)

    monkeypatch.setattr(store, "load_due", slow_load_due)
    await app.engine.sync()
    await app.engine.tick()
    assert len(loads) == 1  # not again at once
    clock.advance(1)
    await app.engine.tick()
    assert len(loads) == 2


async def test_a_claimed_job_whose_next_fire_is_within_the_look_ahead_stays_loaded(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    """The next fire of a job just claimed stays in the heap when it is due within the
    look-ahead from now, also past the last sync's window (syncs come a little more than
    a sync interval apart: such jobs would drop out between two, to be loaded again)."""
    start = clock.now()
    trigger = PeriodicSchedule(
        interval=IntervalTrigger(seconds=1.5), start_at=start + timedelta(seconds=0.9)
    )
    await app.single(task="tests.record").upsert(session, trigger=trigger, job_id="job")
    await app.engine.sync()  # window: up to start + 2 s; next sync at start + 1 s
    clock.advance(0.9)
    assert await app.engine.tick() == 1  # no sync: not due yet
    # The next fire, start + 2.4 s, is past the window but within 2 s from now.
    assert app.engine.loaded_jobs == 1


async def test_a_sync_that_takes_long_spaces_out_the_next_ones(
    app: SchedulerApp, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync reads every job due, a backlog waiting in the heap included: one that took
    0.3 s is followed by the next after 3 s at the earliest, not after the sync interval."""
    store = app.engine._store
    load_due = store.load_due
    loads: list[datetime] = []
    elapsed = [0.0]  # the engine's measure of a sync's duration

    async def slow_load_due(horizon: datetime, **options: Any) -> Any:
        loads.append(clock.now())
        elapsed[0] += 0.3
        return await load_due(horizon, **options)

    monkeypatch.setattr(store, "load_due", slow_load_due)
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: elapsed[0]))
    await app.engine.sync()
    clock.advance(2.5)
    await app.engine.tick()
    assert len(loads) == 1  # the sync interval (1 s) is over, ten times 0.3 s is not
    clock.advance(0.6)
    await app.engine.tick()
    assert len(loads) == 2


async def test_start_sends_the_first_jobs_due_while_the_first_pass_loads_the_rest(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scheduler that starts with a backlog loads only the jobs due first, and its first
    pass sends them while it reads the rest of the window: the rest cannot arrive before a
    fire of the first ones was sent (the load below waits for one), yet every job is sent,
    and claimed, once."""
    monkeypatch.setattr(engine_module, "_FIRST_LOAD", 5)
    await due_one_offs(app, session, clock.now() - timedelta(seconds=5), 12)
    store = app.engine._store
    load_due, claim = store.load_due, store.claim
    limits: list[int | None] = []
    claimed: list[str] = []

    async def load_after_a_send(horizon: datetime, *, limit: int | None = None) -> Any:
        limits.append(limit)
        if limit is None:
            await broker.wait_sent(1)
        return await load_due(horizon, limit=limit)

    async def counting_claim(claims: Claims, **options: Any) -> Any:
        claimed.extend(claims.job_ids)
        return await claim(claims, **options)

    monkeypatch.setattr(store, "load_due", load_after_a_send)
    monkeypatch.setattr(store, "claim", counting_claim)
    await app.engine.start()
    assert app.engine.loaded_jobs == 5  # the first five due; the rest come with the first pass
    try:
        await broker.wait_sent(12)
    finally:
        await app.engine.stop()
    assert limits[:2] == [5, None]
    assert sorted(m.args[0] for m in broker.sent) == list(range(12))
    assert sorted(claimed) == [f"job-{index:03}" for index in range(12)]


async def test_a_sync_under_way_does_not_bring_back_a_job_claimed_meanwhile(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pass claims what is due while its sync reads the database. A row the sync read
    before a claim committed is older than what the engine knows of that job: merged, it
    would put the one-off job back in the heap, to be claimed again (and lost)."""
    await due_one_offs(app, session, clock.now(), 3)
    # A load takes no time here: the next sync is not spaced out by a slow first one (it
    # would not be due below, and the claim would wait for its read for ever).
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: 0.0))
    await app.engine.sync()
    clock.advance(1.5)  # the next sync is due
    store = app.engine._store
    load_due, claim = store.load_due, store.claim
    read, claims_done = asyncio.Event(), asyncio.Event()
    claimed: list[str] = []

    async def stale_load_due(horizon: datetime, **options: Any) -> Any:
        records = await load_due(horizon, **options)
        read.set()
        await asyncio.wait_for(claims_done.wait(), 10)
        return records

    async def claim_after_the_read(claims: Claims, **options: Any) -> Any:
        await asyncio.wait_for(read.wait(), 10)
        claimed.extend(claims.job_ids)
        try:
            return await claim(claims, **options)
        finally:
            claims_done.set()

    monkeypatch.setattr(store, "load_due", stale_load_due)
    monkeypatch.setattr(store, "claim", claim_after_the_read)
    assert await app.engine.tick() == 3
    assert sorted(claimed) == ["job-000", "job-001", "job-002"]  # once each
    assert app.engine.loaded_jobs == 0
    assert len(broker.sent) == 3


async def test_on_sqlite_the_engine_s_transactions_take_turns(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    db_engine: AsyncEngine,
    backend: str,
) -> None:
    """Two writers at once would make SQLite's busy handler sleep; they queue instead."""
    for index in range(6):
        await app.single(task="tests.record").upsert(
            session, trigger=every(60), job_id=f"job-{index}"
        )
    clock.advance(60)
    open_transactions: list[int] = [0]
    most: list[int] = [0]

    def began(*_: Any) -> None:
        open_transactions[0] += 1
        most[0] = max(most[0], open_transactions[0])

    def ended(*_: Any) -> None:
        open_transactions[0] -= 1

    events = [("begin", began), ("commit", ended), ("rollback", ended)]
    for name, listener in events:
        event.listen(db_engine.sync_engine, name, listener)
    try:
        await app.engine.sync()
        store = app.engine._store
        now = clock.now()
        batches = [Claims() for _ in range(3)]
        for index in range(6):
            batches[index // 2].add(
                f"job-{index}",
                now,
                1,
                now,
                now + timedelta(seconds=60),
                fire_task_id(f"job-{index}", now),
                "tests.record",
                "[]",
                "{}",
                "{}",
            )
        lease = now + timedelta(seconds=30)
        results = await asyncio.gather(
            *(store.claim(batch, now=now, lease_until=lease, owner="me") for batch in batches)
        )
    finally:
        for name, listener in events:
            event.remove(db_engine.sync_engine, name, listener)
    assert sum(len(fires) for fires, _ in results) == 6
    if backend == "sqlite":
        assert most[0] == 1
    else:
        assert most[0] >= 1  # PostgreSQL runs them side by side


async def jobs_every_10s(
    app: SchedulerApp, session: AsyncSession, count: int
) -> list[SchedulerJob]:
    """``count`` jobs of ``tests.record`` every 10 s: ids ``job-0``..., args [i]."""
    return [
        await app.single(task="tests.record", args=[index]).schedule(
            session, trigger=every(10), job_id=f"job-{index}"
        )
        for index in range(count)
    ]


def claims_for(jobs: list[SchedulerJob], due: datetime) -> Claims:
    """The claims of the fires of ``jobs`` (every 10 s) at ``due``, as the rows are now."""
    claims = Claims()
    for job in jobs:
        claims.add(
            job.id,
            due,
            job.revision,
            due,
            due + timedelta(seconds=10),
            fire_task_id(job.id, due),
            job.task_name,
            json.dumps(job.args),
            "{}",
            "{}",
        )
    return claims


async def test_a_claim_whose_fire_has_a_run_already_is_neither_sent_nor_lost(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    job = await app.single(task="tests.record", args=[7]).schedule(session, trigger=every(10))
    due = clock.advance(10)
    store = SchedulerStore(session_factory)
    claims = claims_for([job], due)
    lease = due + timedelta(seconds=30)
    [fire], lost = await store.claim(claims, now=due, lease_until=lease, owner="first")
    assert not lost
    assert (fire.job_id, fire.scheduled_for, fire.args) == (job.id, due, "[7]")
    # The job is put back on the same fire time (as a hand edit would): the compare-and-set
    # succeeds again, but the fire has its run row, so it is not claimed a second time.
    await session.execute(
        sa.update(SchedulerJob).where(SchedulerJob.id == job.id).values(next_run_at=due)
    )
    await session.commit()
    fires, lost = await store.claim(claims, now=due, lease_until=lease, owner="second")
    assert list(fires) == []
    assert lost == set()
    [run] = await runs_of(session, job.id)
    assert run.claimed_by == "first"
    # A claim whose compare-and-set fails is lost.
    fires, lost = await store.claim(claims, now=due, lease_until=lease, owner="third")
    assert (list(fires), lost) == ([], {job.id})


async def test_a_batch_mixing_new_fires_fires_with_runs_and_lost_claims_gets_each_right(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """One claim of six jobs: two fires already have their run rows (they are advanced, not
    sent), one job changed meanwhile (lost), three are new: each fire returned carries the
    id of its own run row."""
    jobs = await jobs_every_10s(app, session, 6)
    due = clock.advance(10)
    store = SchedulerStore(session_factory)
    lease = due + timedelta(seconds=30)
    batch = claims_for(jobs, due)  # as loaded before the changes below
    # Jobs 1 and 4 fire once and are put back on the same time, runs kept (a hand edit).
    fires, _ = await store.claim(
        claims_for([jobs[1], jobs[4]], due), now=due, lease_until=lease, owner="a"
    )
    assert len(fires) == 2
    await session.execute(
        sa.update(SchedulerJob)
        .where(SchedulerJob.id.in_([jobs[1].id, jobs[4].id]))
        .values(next_run_at=due)
    )
    await session.execute(  # job 2 changed by another process: its claim is lost
        sa.update(SchedulerJob)
        .where(SchedulerJob.id == jobs[2].id)
        .values(revision=SchedulerJob.revision + 1)
    )
    await session.commit()

    fires, lost = await store.claim(batch, now=due, lease_until=lease, owner="b")
    assert lost == {jobs[2].id}
    assert sorted(fire.job_id for fire in fires) == [jobs[0].id, jobs[3].id, jobs[5].id]
    for fire in fires:
        run = await session.get(SchedulerRun, fire.run_id, populate_existing=True)
        assert run is not None
        assert (run.job_id, run.scheduled_for, run.claimed_by) == (fire.job_id, due, "b")
    await session.commit()
    for job in jobs:
        expected = due if job is jobs[2] else due + timedelta(seconds=10)
        assert (await reload(session, job.id)).next_run_at == expected


def tracked_objects_within(root: object) -> int:
    """How many objects the cyclic garbage collector tracks among ``root`` and all it
    refers to (modules and classes excluded: they are no one's per-fire cost)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        current = stack.pop()
        if id(current) in seen or not gc.is_tracked(current):
            continue
        if isinstance(current, (type, types.ModuleType)):
            continue
        seen.add(id(current))
        stack.extend(gc.get_referents(current))
    return len(seen)


async def test_a_claimed_batch_holds_no_tracked_object_per_fire(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """A batch lives from its claim until it is recorded: an object per fire that the
    collector tracks would reach its oldest generation and make it scan the whole process
    over and over. The batch is a few columns, whatever its size; its fires read as fires."""
    jobs = await jobs_every_10s(app, session, 40)
    due = clock.advance(10)
    store = SchedulerStore(session_factory)
    lease = due + timedelta(seconds=30)
    few, _ = await store.claim(claims_for(jobs[:4], due), now=due, lease_until=lease, owner="a")
    many, _ = await store.claim(claims_for(jobs[4:], due), now=due, lease_until=lease, owner="a")

    assert (len(few), len(many)) == (4, 36)
    assert tracked_objects_within(many) == tracked_objects_within(few) <= 10
    assert [fire.job_id for fire in many] == [job.id for job in jobs[4:]]
    assert many[-1] == list(many)[35] == many[35:][0]
    assert many[0].args == "[4]"
    assert many[0].scheduled_for == due
    assert many[0].task_id == fire_task_id(jobs[4].id, due)


async def test_a_periodic_job_fires_again_and_again_from_the_object_loaded_once(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    """What the engine holds of a job lives as long as its revision, not one fire: a fire
    of 10k jobs every second would otherwise promote 10k objects a second to the collector's
    oldest generation, and each time it grew by a quarter, a full collection (~90 ms with
    100k jobs loaded) would stall the loop."""
    ids = {f"held-once-{uuid.uuid4().hex}" for _ in range(3)}  # this test's alone
    for index, job_id in enumerate(sorted(ids)):
        await app.single(task="tests.record", args=[index]).schedule(
            session, trigger=every(1), job_id=job_id
        )
    await app.engine.sync()

    def snapshots() -> list[object]:
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, claiming_module.JobSnapshot) and o.id in ids
        ]

    clock.advance(1)
    assert await app.engine.tick() == 3
    loaded = snapshots()  # kept alive here: a new object cannot take an old one's place
    assert len(loaded) == 3
    for _ in range(3):
        clock.advance(1)
        assert await app.engine.tick() == 3
    held = snapshots()
    assert len(held) == 3
    assert all(any(now is then for then in loaded) for now in held)


async def test_jobs_sharing_a_schedule_have_their_next_fire_worked_out_once_per_batch(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """40 jobs every 10 s share one trigger and one fire time: one computation for the
    batch, and each job still gets its fire and its next one."""
    jobs = await jobs_every_10s(app, session, 40)
    await app.engine.sync()
    computed: list[datetime] = []
    real = claiming_module.plan_fire

    def counting(*args: Any) -> FirePlan:
        computed.append(args[1])
        return real(*args)

    monkeypatch.setattr(claiming_module, "plan_fire", counting)
    due = clock.advance(10)
    assert await app.engine.tick() == 40

    assert computed == [due]
    for job in jobs:
        assert [run.scheduled_for for run in await runs_of(session, job.id)] == [due]
        assert (await reload(session, job.id)).next_run_at == due + timedelta(seconds=10)


async def test_start_runs_the_loop_in_the_background(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(sync_interval_seconds=0.05, idle_sleep_seconds=0.05),
    )
    async with session_factory() as session:
        job = await app.single(task="tests.record").schedule(session, trigger=every(0.05))
    async with app:
        assert app.is_running
        await broker.wait_sent(3)
    assert not app.is_running
    assert len(broker.sent_for(job.id)) >= 3
    sent = len(broker.sent)
    await asyncio.sleep(0.1)
    assert len(broker.sent) == sent  # stopped means stopped


async def test_start_and_stop_are_idempotent(app: SchedulerApp) -> None:
    await app.stop()
    await app.start()
    await app.start()
    assert app.is_running
    await app.stop()
    await app.stop()
    assert not app.is_running


async def test_a_stopped_scheduler_sends_again_when_started_again(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(sync_interval_seconds=0.05, idle_sleep_seconds=0.05),
    )
    async with session_factory() as session:
        await app.single(task="tests.record").schedule(session, trigger=every(0.05))
    async with app:
        await broker.wait_sent(1)
    sent = len(broker.sent)
    async with app:
        await broker.wait_sent(sent + 2)
    async with session_factory() as session:
        runs = await app.list_runs(session, limit=None)
    assert all(run.attempt == 1 for run in runs)


async def kill_listeners(db_engine: AsyncEngine) -> None:
    """Terminate the PostgreSQL backends of this database's listening connections."""
    async with db_engine.connect() as connection:
        await connection.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                " AND datname = current_database()"
            )
        )


@pytest.mark.parametrize("backend", ["postgresql"])  # LISTEN/NOTIFY is PostgreSQL's
async def test_changes_from_another_process_wake_the_scheduler_at_once(
    backend: str,
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
) -> None:
    hour = SchedulerConfig(sync_interval_seconds=3600, idle_sleep_seconds=3600)
    running = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    elsewhere = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    loop = asyncio.get_running_loop()
    async with running:
        async with session_factory() as session:
            created = loop.time()
            await elsewhere.single(task="tests.record").schedule(
                session, trigger=OneOffSchedule(run_at=datetime.now(UTC))
            )
        await broker.wait_sent(1, timeout=5)
        first_latency = loop.time() - created

        # The listening connection dies (a failover, an idle timeout): the engine listens again.
        await kill_listeners(db_engine)
        async with session_factory() as session:
            await elsewhere.single(task="tests.record").schedule(
                session, trigger=OneOffSchedule(run_at=datetime.now(UTC))
            )
        await broker.wait_sent(2, timeout=10)
    # An hour-long sync interval: only the notification can have woken the scheduler.
    assert first_latency < 2


async def deafen_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listeners open as behind a pooler in transaction mode: ``LISTEN`` taken, nothing
    delivered (here: ``UNLISTEN`` on the listener's connection right after)."""
    start = ChangeListener.start

    async def deaf(listener: ChangeListener) -> None:
        await start(listener)
        raw = await listener._connection.get_raw_connection()
        await raw.driver_connection.execute("UNLISTEN *")  # type: ignore[union-attr]

    monkeypatch.setattr(ChangeListener, "start", deaf)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_another_scheduler_s_test_notification_is_not_a_change(
    backend: str, broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """A scheduler that starts checks that its listener hears its own test notification;
    the others hear it too, and take it for no change of any job."""
    hour = SchedulerConfig(sync_interval_seconds=3600, idle_sleep_seconds=3600)
    first = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    second = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    async with first:
        heard = first.engine._changes_heard
        async with second:
            await asyncio.sleep(0.3)
            assert second.engine._listener is not None
            assert second.engine._listener.alive
        await asyncio.sleep(0.3)
        assert first.engine._changes_heard == heard


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_listener_lost_while_tested_is_opened_again_not_given_up(
    backend: str,
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listening connection dies while its test notification is awaited: that is a
    listener lost (opened again later), not a deaf one (given up for polling)."""
    hour = SchedulerConfig(sync_interval_seconds=3600, idle_sleep_seconds=3600)
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)

    async def kill_the_listener(payload: str) -> None:  # instead of notifying
        await kill_listeners(db_engine)

    monkeypatch.setattr(app.engine._store, "_notify", kill_the_listener)
    caplog.set_level(logging.WARNING, logger="taskiq_beat.engine")
    await app.start()
    try:
        assert app.engine._can_listen, "not given up for polling"
        assert app.engine._listener is None
    finally:
        await app.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any("cannot listen for job changes" in line and "lost" in line for line in said), said
    assert not any("test notification" in line for line in said), said


# No LISTEN, or one that hears nothing (PostgreSQL behind a pooler in transaction mode):
# updated_at is polled.
@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql"])
async def test_changes_from_another_process_reach_a_polling_scheduler_within_a_poll(
    backend: str,
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hour = SchedulerConfig(sync_interval_seconds=3600, idle_sleep_seconds=3600)
    running = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    elsewhere = SchedulerApp(broker=broker, session_factory=session_factory, config=hour)
    loop = asyncio.get_running_loop()
    if backend == "postgresql":
        await deafen_listeners(monkeypatch)
    caplog.set_level(logging.WARNING, logger="taskiq_beat.engine")
    async with running:
        for sent in (1, 2):
            async with session_factory() as session:
                created = loop.time()
                await elsewhere.single(task="tests.record").schedule(
                    session, trigger=OneOffSchedule(run_at=datetime.now(UTC))
                )
            await broker.wait_sent(sent, timeout=5)
            # An hour-long sync interval: only the poll (every 0.5 s) can have seen it.
            assert loop.time() - created < 1
    deaf = [r.getMessage() for r in caplog.records if "test notification" in r.getMessage()]
    if backend == "postgresql":
        assert len(deaf) == 1, deaf
        assert "a connection pooler in transaction mode" in deaf[0]
    else:
        assert deaf == []


async def edit_one_of_two_and_run(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    assignment: str,
) -> tuple[str, str]:
    """Two jobs every second; ``SET assignment`` on the first behind the API's back; three
    passes. The other job must have fired each time and the edited one never. Returns the
    edited job's id and ``last_error``, after checking it is disabled."""
    poisoned = await app.single(task="tests.record").schedule(session, trigger=every(1))
    healthy = await app.single(task="tests.record").schedule(session, trigger=every(1))
    await session.execute(
        sa.text(f"UPDATE scheduler_job SET {assignment} WHERE id = :id"), {"id": poisoned.id}
    )
    await session.commit()
    for _ in range(3):
        clock.advance(1)
        await app.engine.sync()
        await app.engine.tick()
    assert len(broker.sent_for(healthy.id)) == 3
    assert broker.sent_for(poisoned.id) == []
    result = await session.execute(
        sa.select(SchedulerJob.is_enabled, SchedulerJob.last_error).where(
            SchedulerJob.id == poisoned.id
        )
    )
    is_enabled, last_error = result.one()
    await session.commit()
    assert is_enabled is False
    return poisoned.id, last_error


@pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL refuses invalid JSON on write
@pytest.mark.parametrize("column", ["trigger", "args", "kwargs", "metadata"])
async def test_a_row_with_unparsable_json_is_disabled_alone(
    backend: str,
    column: str,
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskiq_beat"):
        poisoned, last_error = await edit_one_of_two_and_run(
            app, session, broker, clock, f"{column} = '{{not json'"
        )
    assert "unreadable JSON" in last_error
    assert [r for r in caplog.records if poisoned in r.getMessage()] != []
    assert len([r for r in caplog.records if "disabling job" in r.getMessage()]) == 1
    # Management still reads the row: listings show the value it could not parse.
    listed = {job.id: job.to_dict() for job in await app.list_jobs(session)}
    assert "unreadable JSON" in json.dumps(listed[poisoned], default=str)


async def test_a_row_of_an_unknown_kind_is_disabled_alone(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    _, last_error = await edit_one_of_two_and_run(app, session, broker, clock, "kind = 'bogus'")
    assert "unknown kind 'bogus'" in last_error


@pytest.mark.parametrize(
    "stored",
    [
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC),  # no microseconds
        datetime(2026, 3, 29, 1, 30, 0, 1, tzinfo=UTC),
        datetime(2026, 10, 25, 3, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
async def test_the_engine_reads_next_run_at_as_the_orm_does(
    stored: datetime, app: SchedulerApp, session: AsyncSession, session_factory: Any
) -> None:
    """The engine loads rows without SQLAlchemy's type processing: its times must be the
    ORM's, aware and in UTC, on both databases."""
    job = await app.single(task="tests.record").schedule(session, trigger=every(60))
    await session.execute(
        sa.update(SchedulerJob).where(SchedulerJob.id == job.id).values(next_run_at=stored)
    )
    await session.commit()
    orm = (await reload(session, job.id)).next_run_at
    (record,) = await SchedulerStore(session_factory).load_jobs([job.id])
    assert record.next_run_at == orm == stored
    assert record.next_run_at is not None
    assert record.next_run_at.tzinfo is UTC
    assert record.is_enabled is True
    (due,) = await SchedulerStore(session_factory).load_due(stored)
    assert due == record


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22 18:19:14", datetime(2026, 11, 22, 18, 19, 14, tzinfo=UTC)),
        ("2026-11-22T18:19:14.5+01:00", datetime(2026, 11, 22, 17, 19, 14, 500000, tzinfo=UTC)),
        ("2026-11-22 18:19:14.25", datetime(2026, 11, 22, 18, 19, 14, 250000, tzinfo=UTC)),
    ],
)
async def test_a_hand_written_sqlite_time_is_read_as_utc(
    backend: str,
    text: str,
    expected: datetime,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: Any,
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(60))
    await session.execute(
        sa.text("UPDATE scheduler_job SET next_run_at = :text WHERE id = :id"),
        {"text": text, "id": job.id},
    )
    await session.commit()
    (record,) = await SchedulerStore(session_factory).load_jobs([job.id])
    assert record.next_run_at == expected
    assert record.next_run_at is not None
    assert record.next_run_at.tzinfo is UTC


@pytest.mark.parametrize("lock", ["EXCLUSIVE", "IMMEDIATE"])
async def test_a_locked_sqlite_file_is_waited_out_with_one_line_per_retry(
    tmp_path: Any, broker: RecordingBroker, caplog: pytest.LogCaptureFixture, lock: str
) -> None:
    """Another process holding SQLite's write lock longer than the busy timeout: the loop
    reports "database is locked" in one warning line (no traceback), retries, and sends the
    fire once the lock is gone. (An exclusive lock stops the reads too; an immediate one
    only the writes: the claim, whose statements run on aiosqlite's connection directly.)"""
    path = tmp_path / "locked.sqlite3"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.05})
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    app = SchedulerApp(
        broker=broker,
        session_factory=factory,
        config=SchedulerConfig(sync_interval_seconds=0.1, idle_sleep_seconds=0.05),
    )
    async with factory() as session:
        job = await app.single(task="tests.record").schedule(
            session, trigger=OneOffSchedule(run_at=datetime.now(UTC) + timedelta(seconds=0.3))
        )
    other = sqlite3.connect(path, isolation_level=None)
    try:
        with caplog.at_level(logging.INFO, logger="taskiq_beat"):
            async with app:
                other.execute(f"BEGIN {lock}")  # another process writing for a while
                await asyncio.sleep(0.7)  # the job is due at 0.3 s: a few failed passes
                assert broker.sent == [], "nothing can be claimed while the file is locked"
                other.execute("COMMIT")
                await broker.wait_sent(1, timeout=5)
    finally:
        other.close()
        if app.lifecycle is not None:  # the in-memory broker ran the task: stop reporting
            await app.lifecycle.close()
        await engine.dispose()

    outage = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    assert outage, caplog.text
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in outage)
    assert "database is locked" in outage[0].getMessage()
    assert any("running again after" in r.getMessage() for r in caplog.records)
    assert [m.task_id for m in broker.sent] == [fire_task_id(job.id, job.next_run_at)]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), "ConnectionRefusedError"),
        (TimeoutError("the database did not answer within 2 s"), "TimeoutError"),
        (sa.exc.TimeoutError("QueuePool limit reached"), "TimeoutError"),
        (
            sa.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked")),
            "OperationalError: database is locked",
        ),
        (
            sa.exc.DBAPIError("SELECT 1", {}, ConnectionError("lost"), connection_invalidated=True),
            "ConnectionError: lost",
        ),
        (sa.exc.IntegrityError("INSERT", {}, ValueError("duplicate key")), None),
        (ValueError("a bug"), None),
        (KeyError("job"), None),
    ],
)
def test_outages_are_told_from_other_failures(error: BaseException, reason: str | None) -> None:
    described = SchedulerStore.unavailable(error)
    if reason is None:
        assert described is None
    else:
        assert described is not None
        assert reason in described, described


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_claim_looks_its_jobs_up_by_primary_key(
    backend: str, app: SchedulerApp, session: AsyncSession, db_engine: AsyncEngine
) -> None:
    """The work of a claim grows with its batch, not with the table: PostgreSQL's plan
    finds the batch's jobs through the primary key, not by reading every job."""
    await app.upsert_many(
        session,
        [
            app.single(task="tests.record").definition(trigger=every(60), job_id=f"job-{i:05}")
            for i in range(40_000)
        ],
    )
    async with db_engine.connect() as connection:
        await connection.execute(sa.text("ANALYZE scheduler_job"))
        await connection.commit()
    store = SchedulerStore(async_sessionmaker(db_engine))
    records = await store.load_jobs([f"job-{i:05}" for i in range(0, 40_000, 20)])
    claims = Claims()
    for r in records:
        assert r.next_run_at is not None
        claims.add(
            r.id, r.next_run_at, r.revision, r.next_run_at, None, r.id, "t", "[]", "{}", "{}"
        )
    statement = _PostgresBatchSql.claim_all
    params = _PostgresBatchSql().claim_params(claims)
    now = datetime.now(UTC)
    params.update(owner="o", lease_until=now, now=now)
    params["status"] = "claimed"
    compiled = statement.compile(dialect=db_engine.dialect)
    arguments = tuple(params[name] for name in compiled.positiontup or ())
    async with db_engine.connect() as connection:
        result = await connection.exec_driver_sql(f"EXPLAIN {compiled}", arguments)
        plan = "\n".join(row[0] for row in result)
    assert "Seq Scan on scheduler_job" not in plan, plan
    assert "pk_scheduler_job" in plan, plan


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_claim_times_travel_to_postgresql_to_the_microsecond(
    backend: str, db_engine: AsyncEngine
) -> None:
    """PostgreSQL's claim sends times as whole microseconds since 1970 and turns them back
    into timestamptz in SQL: exact for every time a job can hold, also before 1970 and past
    2**53 microseconds (year 2255), where one product in double precision would round."""
    values = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, 0, 1, tzinfo=UTC),
        datetime(2255, 6, 5, 23, 47, 34, 740_993, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ]
    statement = sa.text(
        f"SELECT {store_module._from_micros('m')}"
        " FROM unnest(CAST(:micros AS BIGINT[])) WITH ORDINALITY AS t(m, n) ORDER BY n"
    )
    async with db_engine.connect() as connection:
        result = await connection.execute(
            statement, {"micros": [store_module._micros(v) for v in values]}
        )
        assert [row[0] for row in result] == values


async def test_info_logs_a_summary_a_minute_not_a_line_per_batch(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for index in range(3):
        await app.single(task="tests.record").upsert(
            session, trigger=every(10), job_id=f"summary-{index}"
        )
    with caplog.at_level(logging.INFO, logger="taskiq_beat.engine"):
        for _ in range(6):  # a minute of fires, one batch every 10 s
            clock.advance(10)
            await app.engine.sync()
            assert await app.engine.tick() == 3
        assert not [r for r in caplog.records if r.levelno == logging.INFO]
        clock.advance(10)
        await app.engine.sync()
        await app.engine.tick()
    # 60 s after the first batch: the 7 batches since, the first one included.
    [summary] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert summary.startswith("sent 21 fires in the last 60 s (0 sends failed)"), summary


async def test_the_summary_says_how_far_behind_and_how_many_fires_were_missed(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    session: AsyncSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past what it can send, the once-a-minute line says how many fires wait here and how
    late the oldest is, and how many stretches the misfire policy skipped (also counted for
    the health snapshot)."""
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(misfire_grace_seconds=5, dispatch_batch_size=2),
        clock=clock,
    )
    jobs = 30
    await app.upsert_many(
        session,
        [
            app.single("tests.record").definition(trigger=every(10), job_id=f"behind-{index}")
            for index in range(jobs)
        ],
    )
    with caplog.at_level(logging.INFO, logger="taskiq_beat.engine"):
        clock.advance(10)
        await app.engine.sync()
        assert await app.engine.tick() == jobs  # the first summary's start
        clock.advance(65)  # away for six fires: each job sends its latest, skips the rest
        await app.engine.sync()
        # The pass's first batch ends the minute; most jobs still wait at their fire of
        # 55 s ago (each sends its latest, of 5 s ago, when claimed).
        assert await app.engine.tick() == jobs
    [summary] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    found = re.search(
        r"; (\d+) jobs due and waiting \(the oldest fire 55\.0 s late\); (\d+) missed", summary
    )
    assert found is not None, summary
    waiting, missed_then = int(found[1]), int(found[2])
    assert 0 < waiting < jobs - 1, summary
    assert 0 < missed_then <= jobs - waiting, summary  # counted as each batch is claimed
    assert app.engine.stats.fires_missed == jobs
    assert (await app.get_health_snapshot()).fires_missed == jobs
    missed = [r for r in await runs_of(session, "behind-0") if r.status is RunStatus.MISSED]
    assert len(missed) == 1
