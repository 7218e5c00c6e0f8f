"""Per-job policies with the injected clock, on SQLite and PostgreSQL: missed fires under each
catch-up mode and at the grace boundary, overlap (skip, buffer_one, max_running), jitter,
backfill; bad input names its field and stores nothing.

Run lifecycle states are written here as a worker would (a broker that executes nothing);
tests/e2e/test_policies_workers.py runs the overlap policies with real workers.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from taskiq.message import BrokerMessage

from taskiq_beat import (
    ChainStep,
    CrontabTrigger,
    IntervalTrigger,
    InvalidJobError,
    JobNotFoundError,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
    fire_task_id,
)
from taskiq_beat.policy import MAX_BACKFILL, jitter_of
from tests.utils import FakeClock, RecordingBroker


class HoldingBroker(RecordingBroker):
    """Keeps what it is sent and runs nothing: the tests play the workers."""

    async def kick(self, message: BrokerMessage) -> None:
        self.sent.append(self.formatter.loads(message.message))


@pytest.fixture
async def holding() -> Any:
    broker = HoldingBroker()

    @broker.task(task_name="tests.record")
    async def record() -> None:  # never executed here
        return None

    await broker.startup()
    yield broker
    await broker.shutdown()


@pytest.fixture
def lifecycle_app(
    holding: HoldingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> SchedulerApp:
    """An app whose workers report (overlap policies need it), with a broker that runs
    nothing."""
    return SchedulerApp(
        broker=holding,
        session_factory=session_factory,
        config=SchedulerConfig(sync_interval_seconds=1.0, record_lifecycle=True),
        clock=clock,
    )


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
    job = (
        await session.execute(
            sa.select(SchedulerJob)
            .where(SchedulerJob.id == job_id)
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    await session.commit()
    return job


async def set_status(session: AsyncSession, run: SchedulerRun, status: RunStatus) -> None:
    """What a worker writes (see taskiq_beat.worker): the run ends, or is lost."""
    await session.execute(
        sa.update(SchedulerRun)
        .where(SchedulerRun.id == run.id)
        .values(status=status, next_attempt_at=None)
    )
    await session.commit()


async def fire_at(app: SchedulerApp, clock: FakeClock, when: datetime) -> int:
    """Move the clock to ``when`` and run one pass after a sync; the fires sent."""
    clock.set(when)
    await app.engine.sync()
    return await app.engine.tick()


# ---------------------------------------------------------------------------- input


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"catch_up": "sometimes"}, "catch_up"),
        ({"catch_up_limit": 0}, "catch_up_limit"),
        ({"misfire_grace_seconds": -1}, "misfire_grace_seconds"),
        ({"misfire_grace_seconds": float("nan")}, "misfire_grace_seconds"),
        ({"overlap": "queue"}, "overlap"),
        ({"max_running": 0}, "max_running"),
        ({"max_running": True}, "max_running"),
        ({"jitter_seconds": -0.5}, "jitter_seconds"),
        ({"jitter_seconds": "5"}, "jitter_seconds"),
    ],
)
async def test_a_bad_policy_names_its_field_and_value_and_stores_nothing(
    app: SchedulerApp, session: AsyncSession, given: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobError) as raised:
        await (
            app.single(task="tests.record")
            .policy(**given)
            .schedule(session, trigger=every(10), job_id="bad")
        )
    assert raised.value.field == field
    assert repr(given[field]) in str(raised.value) or str(given[field]) in str(raised.value)
    assert await app.list_jobs(session) == []


async def test_an_overlap_policy_needs_workers_that_report(
    app: SchedulerApp, session: AsyncSession
) -> None:
    assert not app.config.record_lifecycle
    builder = app.single(task="tests.record").policy(overlap="skip")
    with pytest.raises(InvalidJobError, match="record_lifecycle") as raised:
        await builder.upsert(session, trigger=every(10), job_id="skips")
    assert raised.value.field == "overlap"
    assert await app.list_jobs(session) == []


async def test_a_policy_round_trips_and_changing_it_alone_keeps_the_next_run(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await (
        app.single(task="tests.record")
        .policy(catch_up="all", catch_up_limit=5, jitter_seconds=timedelta(seconds=4))
        .upsert(session, trigger=every(60), job_id="p")
    )
    assert job.policy == {"catch_up": "all", "catch_up_limit": 5, "jitter_seconds": 4.0}
    next_run, revision = job.next_run_at, job.revision
    clock.advance(10)
    job = await (
        app.single(task="tests.record")
        .policy(catch_up="none", misfire_grace_seconds=3)
        .upsert(session, trigger=every(60), job_id="p")
    )
    stored = await reload(session, "p")
    assert stored.policy == {"misfire_grace_seconds": 3.0, "catch_up": "none"}
    assert stored.to_dict()["policy"] == stored.policy
    assert (stored.next_run_at, stored.revision) == (next_run, revision + 1)
    # max_running alone is "skip" with that limit; back to the defaults stores none.
    assert app.single(task="tests.record").policy(max_running=3).spec.policy is not None
    await app.single(task="tests.record").upsert(session, trigger=every(60), job_id="p")
    assert (await reload(session, "p")).policy is None
    # In bulk as well.
    definition = (
        app.single(task="tests.record")
        .policy(catch_up="none")
        .definition(trigger=every(60), job_id="p")
    )
    await app.upsert_many(session, [definition])
    stored = await reload(session, "p")
    assert stored.policy == {"catch_up": "none"}
    assert stored.next_run_at == next_run


# ---------------------------------------------------------------------------- catch-up


async def catch_up_job(app: SchedulerApp, session: AsyncSession, **policy: Any) -> SchedulerJob:
    """A job every 10 s with the policy; the scheduler then stays away for 95 s (fires at
    10..90 are due, the one at 90 is 5 s late)."""
    return await (
        app.single(task="tests.record")
        .policy(misfire_grace_seconds=0, **policy)
        .schedule(session, trigger=every(10), job_id="late")
    )


@pytest.mark.parametrize(
    ("policy", "sent", "missed_from"),
    [
        ({"catch_up": "latest"}, [90], 10),
        ({"catch_up": "all"}, [10, 20, 30, 40, 50, 60, 70, 80, 90], None),
        ({"catch_up": "all", "catch_up_limit": 3}, [70, 80, 90], 10),
        ({"catch_up": "none"}, [], 10),
    ],
    ids=["latest", "all", "all-capped", "none"],
)
async def test_downtime_under_each_catch_up_mode(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    policy: dict[str, Any],
    sent: list[int],
    missed_from: int | None,
) -> None:
    start = clock.now()
    job = await catch_up_job(app, session, **policy)
    assert await fire_at(app, clock, start + timedelta(seconds=95)) == len(sent)

    times = [start + timedelta(seconds=s) for s in sent]
    assert [m.task_id for m in broker.sent] == [fire_task_id(job.id, t) for t in times]
    runs = await runs_of(session, job.id)
    assert [r.scheduled_for for r in runs if r.status is not RunStatus.MISSED] == times
    missed = [r for r in runs if r.status is RunStatus.MISSED]
    if missed_from is None:
        assert missed == []
    else:
        [stretch] = missed  # one row for the whole stretch
        assert stretch.scheduled_for == start + timedelta(seconds=missed_from)
        assert stretch.finished_at == clock.now()
        assert stretch.error is not None
        assert "missed" in stretch.error
    assert (await reload(session, job.id)).next_run_at == start + timedelta(seconds=100)


async def test_none_waits_for_the_next_fire_and_sends_it(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    job = await catch_up_job(app, session, catch_up="none")
    assert await fire_at(app, clock, start + timedelta(seconds=95)) == 0
    assert await fire_at(app, clock, start + timedelta(seconds=100)) == 1
    assert [m.task_id for m in broker.sent] == [
        fire_task_id(job.id, start + timedelta(seconds=100))
    ]


@pytest.mark.parametrize("catch_up", ["none", "latest"])
async def test_the_grace_boundary_on_both_sides(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    catch_up: str,
) -> None:
    """A fire exactly the grace late is sent; a microsecond later it is missed."""
    start = clock.now()
    job = await (
        app.single(task="tests.record")
        .policy(misfire_grace_seconds=5, catch_up=catch_up)  # type: ignore[arg-type]
        .schedule(session, trigger=every(10), job_id="edge")
    )
    assert await fire_at(app, clock, start + timedelta(seconds=15)) == 1  # 10, 5 s late
    late = start + timedelta(seconds=25, microseconds=1)  # 20, 5 s + 1 µs late
    sent = await fire_at(app, clock, late)
    runs = await runs_of(session, job.id)
    assert runs[0].status is not RunStatus.MISSED
    second = runs[1]
    assert second.scheduled_for == start + timedelta(seconds=20)
    if catch_up == "none":
        assert sent == 0
        assert second.status is RunStatus.MISSED
    else:  # "latest": the only fire overdue stands for itself, sent late
        assert sent == 1
        assert second.status is not RunStatus.MISSED
    assert (await reload(session, job.id)).next_run_at == start + timedelta(seconds=30)


# ---------------------------------------------------------------------------- overlap


async def test_skip_records_fires_while_a_run_is_going(
    lifecycle_app: SchedulerApp, session: AsyncSession, holding: HoldingBroker, clock: FakeClock
) -> None:
    app, start = lifecycle_app, clock.now()
    job = await (
        app.single(task="tests.record")
        .policy(overlap="skip")
        .schedule(session, trigger=every(10), job_id="skip")
    )
    assert await fire_at(app, clock, start + timedelta(seconds=10)) == 1
    assert await fire_at(app, clock, start + timedelta(seconds=20)) == 0  # run 1 dispatched
    first, second = await runs_of(session, job.id)
    assert first.status is RunStatus.DISPATCHED
    assert second.status is RunStatus.SKIPPED
    assert second.error is not None
    assert "max_running=1" in second.error
    await set_status(session, first, RunStatus.RUNNING)
    assert await fire_at(app, clock, start + timedelta(seconds=30)) == 0  # still running
    await set_status(session, first, RunStatus.SUCCEEDED)
    assert await fire_at(app, clock, start + timedelta(seconds=40)) == 1
    # A run that was lost blocks nothing.
    fourth = (await runs_of(session, job.id))[-1]
    await set_status(session, fourth, RunStatus.LOST)
    assert await fire_at(app, clock, start + timedelta(seconds=50)) == 1
    statuses = [r.status for r in await runs_of(session, job.id)]
    assert statuses == [
        RunStatus.SUCCEEDED,
        RunStatus.SKIPPED,
        RunStatus.SKIPPED,
        RunStatus.LOST,
        RunStatus.DISPATCHED,
    ]
    assert len(holding.sent) == 3


async def test_buffer_one_keeps_one_fire_waiting_and_sends_it_when_the_run_ends(
    lifecycle_app: SchedulerApp, session: AsyncSession, holding: HoldingBroker, clock: FakeClock
) -> None:
    app, start = lifecycle_app, clock.now()
    job = await (
        app.single(task="tests.record")
        .policy(overlap="buffer_one")
        .schedule(session, trigger=every(10), job_id="buffer")
    )
    assert await fire_at(app, clock, start + timedelta(seconds=10)) == 1
    assert await fire_at(app, clock, start + timedelta(seconds=20)) == 0
    assert await fire_at(app, clock, start + timedelta(seconds=30)) == 0
    first, waiting, skipped = await runs_of(session, job.id)
    assert (waiting.status, skipped.status) == (RunStatus.WAITING, RunStatus.SKIPPED)
    assert await fire_at(app, clock, start + timedelta(seconds=32)) == 0  # still going
    await set_status(session, first, RunStatus.SUCCEEDED)
    assert await fire_at(app, clock, start + timedelta(seconds=34)) == 1
    released = (await runs_of(session, job.id))[1]
    assert released.status is RunStatus.DISPATCHED
    assert [m.task_id for m in holding.sent] == [
        fire_task_id(job.id, start + timedelta(seconds=10)),
        fire_task_id(job.id, start + timedelta(seconds=20)),  # its own identity
    ]
    # The released fire is going now: the next one waits again.
    assert await fire_at(app, clock, start + timedelta(seconds=40)) == 0
    assert (await runs_of(session, job.id))[-1].status is RunStatus.WAITING


async def test_max_running_lets_that_many_go(
    lifecycle_app: SchedulerApp, session: AsyncSession, holding: HoldingBroker, clock: FakeClock
) -> None:
    app, start = lifecycle_app, clock.now()
    job = await (
        app.single(task="tests.record")
        .policy(max_running=2)
        .schedule(session, trigger=every(10), job_id="two")
    )
    sent = [await fire_at(app, clock, start + timedelta(seconds=10 * n)) for n in (1, 2, 3)]
    assert sent == [1, 1, 0]
    first = (await runs_of(session, job.id))[0]
    await set_status(session, first, RunStatus.FAILED)
    assert await fire_at(app, clock, start + timedelta(seconds=40)) == 1
    assert [r.status for r in await runs_of(session, job.id)] == [
        RunStatus.FAILED,
        RunStatus.DISPATCHED,
        RunStatus.SKIPPED,
        RunStatus.DISPATCHED,
    ]


# ---------------------------------------------------------------------------- jitter


async def test_jitter_delays_the_send_and_keeps_the_fire_identity(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    job = await (
        app.single(task="tests.record")
        .policy(jitter_seconds=30)
        .schedule(session, trigger=every(60), job_id="jittery")
    )
    due = start + timedelta(seconds=60)
    delay = jitter_of(job.id, due, 30)
    assert 0 < delay < 30
    assert await fire_at(app, clock, due) == 0
    [run] = await runs_of(session, job.id)
    assert (run.status, run.jitter_seconds) == (RunStatus.CLAIMED, delay)
    assert run.next_attempt_at == due + timedelta(seconds=delay)
    clock.set(due + timedelta(seconds=delay) - timedelta(microseconds=1))
    assert await app.engine.tick() == 0
    clock.set(due + timedelta(seconds=delay))
    assert await app.engine.tick() == 1  # no sync needed: the engine knows when
    [run] = await runs_of(session, job.id)
    assert (run.scheduled_for, run.status, run.jitter_seconds) == (
        due,
        RunStatus.DISPATCHED,
        delay,
    )
    [message] = broker.sent
    assert message.task_id == fire_task_id(job.id, due)
    assert (await reload(session, job.id)).next_run_at == due + timedelta(seconds=60)


# ---------------------------------------------------------------------------- backfill


async def cron_job(app: SchedulerApp, session: AsyncSession) -> SchedulerJob:
    """Every 10 minutes, from now (12:00 UTC) on."""
    return await app.single(task="tests.record").schedule(
        session,
        trigger=PeriodicSchedule(crontab=CrontabTrigger(minute="*/10", timezone="UTC")),
        job_id="cron",
    )


async def test_backfill_sends_each_fire_of_the_range_once_even_when_called_twice(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job = await cron_job(app, session)
    start, end = clock.now() - timedelta(hours=1), clock.now() - timedelta(minutes=30)
    assert await app.backfill(session, job.id, start=start, end=end) == 4
    assert await app.backfill(session, job.id, start=start, end=end) == 0
    await app.engine.sync()
    assert await app.engine.tick() == 4
    times = [start + timedelta(minutes=10 * n) for n in range(4)]  # 11:00 .. 11:30
    assert sorted(m.task_id for m in broker.sent) == sorted(fire_task_id(job.id, t) for t in times)
    runs = await runs_of(session, job.id)
    assert [(r.scheduled_for, r.status) for r in runs] == [(t, RunStatus.DISPATCHED) for t in times]
    # Again, after they were sent: nothing more.
    assert await app.backfill(session, job.id, start=start, end=end) == 0
    await app.engine.sync()
    assert await app.engine.tick() == 0
    assert len(broker.sent) == 4
    assert (await reload(session, job.id)).next_run_at == clock.now() + timedelta(minutes=10)


async def test_backfill_sends_missed_fires(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    job = await catch_up_job(app, session, catch_up="none")
    assert await fire_at(app, clock, start + timedelta(seconds=95)) == 0
    queued = await app.backfill(
        session, job.id, start=start + timedelta(seconds=10), end=start + timedelta(seconds=30)
    )
    assert queued == 3  # the missed row at 10 and the fires at 20 and 30
    assert await fire_at(app, clock, start + timedelta(seconds=96)) == 3
    runs = await runs_of(session, job.id)
    assert [r.status for r in runs] == [RunStatus.DISPATCHED] * 3


async def test_bad_backfill_names_its_field_and_queues_nothing(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await cron_job(app, session)
    now = clock.now()
    naive = now.replace(tzinfo=None)
    for start, end, field in [
        (naive, now, "start"),
        (now - timedelta(hours=1), naive, "end"),
        (now, now - timedelta(hours=1), "end"),
        (now - timedelta(hours=1), now + timedelta(hours=1), "end"),
        (now - timedelta(minutes=10 * (MAX_BACKFILL + 1)), now, "end"),
    ]:
        with pytest.raises(InvalidJobError) as raised:
            await app.backfill(session, job.id, start=start, end=end)
        assert raised.value.field == field
    with pytest.raises(JobNotFoundError):
        await app.backfill(session, "nope", start=now - timedelta(hours=1), end=now)
    assert await runs_of(session, job.id) == []


async def test_policies_on_a_stored_row_that_is_no_policy_disable_that_job_alone(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    good = await app.single(task="tests.record").schedule(session, trigger=every(10))
    bad = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await session.execute(
        sa.update(SchedulerJob)
        .where(SchedulerJob.id == bad.id)
        .values(policy={"overlap": "sometimes"}, revision=SchedulerJob.revision + 1)
    )
    await session.commit()
    assert await fire_at(app, clock, start + timedelta(seconds=10)) == 1
    await app.engine.tick()  # applies the disabling
    stored = await reload(session, bad.id)
    assert not stored.is_enabled
    assert stored.last_error is not None
    assert "policy" in stored.last_error
    assert [m.task_id for m in broker.sent] == [
        fire_task_id(good.id, start + timedelta(seconds=10))
    ]
    assert json.loads(json.dumps(stored.to_dict()))["policy"] == {"overlap": "sometimes"}


async def test_a_chain_takes_a_policy_too(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await (
        app.chain([ChainStep(task="tests.record"), ChainStep(task="tests.record")])
        .policy(catch_up="none", jitter_seconds=2)
        .upsert(session, trigger=every(60), job_id="chained")
    )
    assert (await reload(session, job.id)).policy == {"catch_up": "none", "jitter_seconds": 2.0}
