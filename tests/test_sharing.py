"""Several schedulers on one database share the work instead of waiting on each other.

Time is driven by a fake clock and ``engine.tick()``; a lock held by "another scheduler" is
a transaction opened here that holds a job's row (``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from taskiq_beat import (
    OneOffSchedule,
    SchedulerApp,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.models import SchedulerInstance
from taskiq_beat.sharing import slot_of
from taskiq_beat.store import SchedulerStore
from taskiq_beat.store._base import StatementTimeout
from taskiq_beat.store.dialects import sql_of_dialect
from tests.test_engine import due_one_offs, every
from tests.utils import FakeClock, RecordingBroker

# A claim that waited on another transaction's lock would hang the test: bound every wait.
_BOUND = 5.0


def job_ids_sent(broker: RecordingBroker) -> list[str]:
    return [m.labels["taskiq_beat_job_id"] for m in broker.sent]


async def recording_broker() -> RecordingBroker:
    broker = RecordingBroker()

    @broker.task(task_name="tests.record")
    async def record(*args: Any, **kwargs: Any) -> None:
        return None

    await broker.startup()
    return broker


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # SKIP LOCKED
async def test_a_job_held_by_another_transaction_is_skipped_at_once_and_claimed_once_free(
    backend: str,
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    db_engine: AsyncEngine,
) -> None:
    """Another scheduler's claim (here: a transaction holding the job's row) makes this
    scheduler's claim skip that job without waiting, and without an error; the rest of the
    batch is sent. Once the lock is gone (the holder rolled back: the fire is still due),
    the next sync brings the job back and its fire is sent, once."""
    for index in range(3):
        await app.single(task="tests.record", args=[index]).upsert(
            session, trigger=every(10), job_id=f"job-{index}"
        )
    await app.engine.sync()
    clock.advance(10)
    async with db_engine.connect() as holder:
        await holder.execute(
            sa.select(SchedulerJob.id).where(SchedulerJob.id == "job-1").with_for_update()
        )
        assert await asyncio.wait_for(app.engine.tick(), _BOUND) == 2
        assert sorted(job_ids_sent(broker)) == ["job-0", "job-2"]
        await holder.rollback()

    clock.advance(app.config.sync_interval_seconds)  # the next sync sees job-1 still due
    assert await asyncio.wait_for(app.engine.tick(), _BOUND) == 1
    assert sorted(job_ids_sent(broker)) == ["job-0", "job-1", "job-2"]
    runs = await session.execute(sa.select(SchedulerRun.job_id).order_by(SchedulerRun.job_id))
    assert list(runs.scalars()) == ["job-0", "job-1", "job-2"]


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # SKIP LOCKED
async def test_a_fire_taken_by_another_scheduler_meanwhile_is_left_to_it(
    backend: str,
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    db_engine: AsyncEngine,
) -> None:
    """The holder claims the fire itself (advances the job and commits): this scheduler
    skipped it and does not send it, then or later; its next fire is sent by whoever claims
    it first, once."""
    await app.single(task="tests.record").upsert(session, trigger=every(10), job_id="job")
    await app.engine.sync()
    clock.advance(10)
    claimed_at = clock.now()
    async with db_engine.connect() as holder:
        await holder.execute(
            sa.select(SchedulerJob.id).where(SchedulerJob.id == "job").with_for_update()
        )
        assert await asyncio.wait_for(app.engine.tick(), _BOUND) == 0
        await holder.execute(
            sa.update(SchedulerJob)
            .where(SchedulerJob.id == "job")
            .values(next_run_at=claimed_at + timedelta(seconds=10))
        )
        await holder.commit()
    clock.advance(app.config.sync_interval_seconds)
    assert await asyncio.wait_for(app.engine.tick(), _BOUND) == 0
    assert broker.sent == []
    clock.advance(10)
    assert await asyncio.wait_for(app.engine.tick(), _BOUND) == 1
    [message] = broker.sent
    assert (
        message.labels["taskiq_beat_scheduled_for"]
        == (claimed_at + timedelta(seconds=10)).isoformat()
    )


async def test_schedulers_holding_one_backlog_start_on_different_jobs(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Three schedulers holding the same 900 jobs due at the same time each take them in an
    order of their own: their first batches of 100 hardly overlap (about 11 jobs in common
    by chance), where with one order all three would claim the same 100 at once."""
    config = SchedulerConfig(dispatch_batch_size=100)
    brokers = [await recording_broker() for _ in range(3)]
    apps = [
        SchedulerApp(broker=b, session_factory=session_factory, config=config, clock=clock)
        for b in brokers
    ]
    due = clock.now() - timedelta(seconds=1)
    await apps[0].upsert_many(
        session,
        [
            apps[0]
            .single(task="tests.record", args=[index])
            .definition(trigger=OneOffSchedule(run_at=due), job_id=f"job-{index:04}")
            for index in range(900)
        ],
    )
    try:
        firsts = []
        for scheduler in apps:
            await scheduler.engine.sync()
            batch, _ = scheduler.engine._pop_due(clock.now())
            firsts.append({snapshot.id for snapshot in batch})
    finally:
        for b in brokers:
            await b.shutdown()
    assert [len(first) for first in firsts] == [100, 100, 100]
    overlaps = [len(a & b) for a, b in itertools.combinations(firsts, 2)]
    assert max(overlaps) < 35, overlaps


def test_a_statement_past_the_store_s_timeout_is_not_called_an_outage() -> None:
    """A timeout of the store (a long lock wait, a slow statement) and PostgreSQL's lock and
    cancel errors are told apart from a database that is down."""
    slow = StatementTimeout("no answer from the database within 10 s")
    assert SchedulerStore.contended(slow) == "no answer from the database within 10 s"

    class LockNotAvailableError(Exception):
        sqlstate = "55P03"

    lock = sa.exc.DBAPIError("UPDATE", {}, LockNotAvailableError("canceling statement"))
    assert SchedulerStore.contended(lock) == "LockNotAvailableError: canceling statement"
    refused = sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "refused"))
    assert SchedulerStore.contended(refused) is None
    assert SchedulerStore.contended(ValueError("a bug")) is None


@pytest.mark.parametrize(
    ("code", "contended"),
    [(1213, True), (1205, True), (3572, True), (1062, False), (2003, False)],
    ids=["deadlock", "lock_wait_timeout", "nowait", "duplicate_key", "cannot_connect"],
)
def test_mysql_lock_errors_are_contention_not_an_outage(code: int, contended: bool) -> None:
    """MySQL's and MariaDB's deadlock and lock-wait errors (a number, no SQLSTATE on the
    driver's exception) count as contention, like PostgreSQL's."""

    class MySQLError(Exception):
        pass

    error = sa.exc.OperationalError("UPDATE", {}, MySQLError(code, "message"))
    described = SchedulerStore.contended(error)
    assert (described is not None) is contended, described


async def test_a_slow_claim_is_reported_as_slow_not_as_the_database_unavailable(
    app: SchedulerApp,
    session: AsyncSession,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await app.single(task="tests.record").upsert(session, trigger=every(10), job_id="job")
    await app.engine.sync()
    clock.advance(10)

    async def slow_claim(*args: Any, **kwargs: Any) -> Any:
        raise StatementTimeout("no answer from the database within 10 s")

    monkeypatch.setattr(app.engine._store, "claim", slow_claim)
    with pytest.raises(StatementTimeout):
        await app.engine.tick()
    with caplog.at_level(logging.WARNING, logger="taskiq_beat"):
        app.engine._report_failure(StatementTimeout("no answer within 10 s"), 1, 0.5)
    [line] = [r.getMessage() for r in caplog.records]
    assert "database unavailable" not in line
    assert line.startswith("database slow or busy (no answer within 10 s)"), line


async def test_a_sync_drops_the_jobs_held_that_another_scheduler_took_meanwhile(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    """Jobs held in the heap, due, that the database no longer has due (another scheduler
    claimed them) leave the heap at the next sync instead of being claimed here in vain."""
    due = clock.now() - timedelta(seconds=1)
    for index in range(3):
        await app.single(task="tests.record").upsert(
            session, trigger=OneOffSchedule(run_at=due), job_id=f"job-{index}"
        )
    await app.engine.sync()
    assert app.engine.loaded_jobs == 3
    await session.execute(  # another scheduler claims job-0 and job-1
        sa.update(SchedulerJob)
        .where(SchedulerJob.id.in_(["job-0", "job-1"]))
        .values(next_run_at=None)
    )
    await session.commit()
    await app.engine.sync()
    assert app.engine.loaded_jobs == 1


# ---------------------------------------------------------------- sharing by slots


def test_a_job_s_slot_is_the_same_in_every_process_and_spreads_evenly() -> None:
    """The slot of a job comes from a hash every process computes alike (Python's ``hash`` of
    a string changes with each process: schedulers would not agree on whose a job is)."""
    assert [slot_of(f"job-{index}", 3) for index in range(10)] == [2, 0, 1, 0, 1, 2, 1, 0, 1, 0]
    assert slot_of("a", 1000) == 323
    counts = Counter(slot_of(f"job-{index:05}", 3) for index in range(3000))
    assert sorted(counts) == [0, 1, 2]
    assert all(900 <= count <= 1100 for count in counts.values()), counts


async def several_apps(
    count: int,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    *,
    sync_interval: float = 1.0,
    batch_size: int = 256,
) -> tuple[list[SchedulerApp], list[RecordingBroker]]:
    config = SchedulerConfig(
        sync_interval_seconds=sync_interval,
        dispatch_batch_size=batch_size,
        record_lifecycle=False,
    )
    brokers = [await recording_broker() for _ in range(count)]
    apps = [
        SchedulerApp(broker=b, session_factory=session_factory, config=config, clock=clock)
        for b in brokers
    ]
    return apps, brokers


def share_of(scheduler: SchedulerApp, job_ids: list[str]) -> set[str]:
    """The jobs of ``job_ids`` in ``scheduler``'s slot, as it takes them now."""
    index, count = scheduler.engine.share
    return {job_id for job_id in job_ids if slot_of(job_id, count) == index}


async def test_live_schedulers_each_claim_only_their_share(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three schedulers registered on one database each claim the due jobs of their slot,
    and only those: no claim is spent on another's job. Together they send every job once,
    each about a third; each says once at INFO how many share the jobs."""
    apps, brokers = await several_apps(3, session_factory, clock)
    due = clock.now() + timedelta(seconds=1)
    job_ids = [f"job-{index:03}" for index in range(300)]
    await apps[0].upsert_many(
        session,
        [
            apps[0]
            .single(task="tests.record")
            .definition(trigger=OneOffSchedule(run_at=due), job_id=job_id)
            for job_id in job_ids
        ],
    )
    try:
        for scheduler in apps:
            await scheduler.engine.sync()  # each registers; the last one sees all three
        assert [scheduler.engine.share[1] for scheduler in apps] == [1, 2, 3]
        clock.advance(1)  # the renewals and syncs are due, and so are the jobs
        with caplog.at_level(logging.INFO, logger="taskiq_beat.sharing"):
            sent = [await asyncio.wait_for(s.engine.tick(), _BOUND) for s in apps]
        claimed_by_others = [s.engine.stats.fires_sent - len(share_of(s, job_ids)) for s in apps]
    finally:
        for b in brokers:
            await b.shutdown()
    assert sorted(s.engine.share for s in apps) == [(0, 3), (1, 3), (2, 3)]
    shares = [set(job_ids_sent(b)) for b in brokers]
    for scheduler, share in zip(apps, shares, strict=True):
        assert share == share_of(scheduler, job_ids)
    assert claimed_by_others == [0, 0, 0]
    assert sum(sent) == 300
    assert set().union(*shares) == set(job_ids)
    assert all(70 <= len(share) <= 130 for share in shares), [len(s) for s in shares]
    lines = [r.getMessage() for r in caplog.records if "share the jobs" in r.getMessage()]
    assert lines.count("3 schedulers share the jobs; this one takes 1/3") == 2, lines
    runs = await session.execute(sa.select(SchedulerRun.job_id, SchedulerRun.claimed_by))
    by_job = Counter(job_id for job_id, _ in runs)
    assert set(by_job) == set(job_ids)
    assert max(by_job.values()) == 1


async def test_schedulers_starting_at_the_same_moment_all_register(
    backend: str,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Ten schedulers register on an empty registry at the same moment, five times over:
    each gets its row, none fails. (On MariaDB an update that finds no row locks the gap
    where the row would go, and inserts into that gap from several such transactions
    deadlocked: one scheduler's ``start()`` failed with error 1213.)"""
    stores = [SchedulerStore(session_factory) for _ in range(10)]
    now = clock.now()
    for round_ in range(5):
        ids = [f"scheduler-{round_}-{index}" for index in range(10)]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    store.renew_instance(
                        instance_id, now=now, silent_since=now - timedelta(seconds=30), joining=True
                    )
                    for store, instance_id in zip(stores, ids, strict=True)
                )
            ),
            _BOUND * 4,
        )
        assert all(instance_id in live for instance_id, live in zip(ids, results, strict=True))
        for store, instance_id in zip(stores, ids, strict=True):
            await store.remove_instance(instance_id)
    async with session_factory() as session:
        assert (await session.execute(sa.select(SchedulerInstance.id))).all() == []


@pytest.mark.parametrize("backend", ["postgresql"])  # the only listener
async def test_a_scheduler_joins_before_its_listener_opens_and_sees_who_joined_meanwhile(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``start()`` registers the scheduler before it opens its listener, so that others
    starting at the same moment see it at their first load. One that joins while that
    listener opens announces itself to nobody listening yet: the starting scheduler reads
    the registry again before its first load, and loads only its half."""
    (first, second), brokers = await several_apps(2, session_factory, clock)
    due = clock.now() + timedelta(seconds=1)
    job_ids = [f"job-{index:03}" for index in range(100)]
    await due_one_offs(first, session, due, 100)
    store = first.engine._store
    listen = store.listen
    registered: list[int] = []

    async def listen_as_another_joins(*args: Any) -> Any:
        async with session_factory() as reading:
            registered.append(len((await reading.execute(sa.select(SchedulerInstance))).all()))
        await second.engine.sync()  # joins now
        return await listen(*args)

    monkeypatch.setattr(store, "listen", listen_as_another_joins)
    try:
        await first.engine.start()
        share = first.engine.share
        loaded = first.engine.loaded_jobs
        await first.engine.stop()
        await second.engine.stop()
    finally:
        for b in brokers:
            await b.shutdown()
    assert registered == [1]  # the first scheduler's own row, before its listener
    assert share[1] == 2
    assert loaded == sum(slot_of(job_id, 2) == share[0] for job_id in job_ids)


class _PostgresError(Exception):
    """A driver's exception with PostgreSQL's SQLSTATE, as asyncpg's carry it."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "runs"),
    [
        (sa.exc.OperationalError("INSERT", {}, Exception(1213, "Deadlock found")), 2),
        (sa.exc.DBAPIError("INSERT", {}, _PostgresError("40P01", "deadlock detected")), 2),
        (sa.exc.OperationalError("INSERT", {}, Exception(1205, "Lock wait timeout")), 1),
        (sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError(111, "refused")), 1),
    ],
    ids=[
        "deadlock_runs_again",
        "postgres_deadlock_runs_again",
        "lock_wait_raises",
        "refused_raises",
    ],
)
async def test_a_renewal_that_deadlocks_runs_again_and_other_errors_are_raised(
    error: sa.exc.DBAPIError,
    runs: int,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deadlock (the server ended the transaction and asks for it again) runs the renewal
    again; a lock wait that timed out, or a database that refuses, is raised as it came
    (the engine reports it and tries at its next pass)."""
    store = SchedulerStore(session_factory)
    now = clock.now()
    calls: list[bool] = []
    renew = store._renew_instance

    async def failing_once(*args: Any) -> list[str]:
        calls.append(True)
        if len(calls) == 1:
            raise error
        return await renew(*args)

    monkeypatch.setattr(store, "_renew_instance", failing_once)
    if runs == 1:
        with pytest.raises(sa.exc.DBAPIError) as raised:
            await store.renew_instance("me", now=now, silent_since=now, joining=True)
        assert raised.value is error
    else:
        live = await store.renew_instance("me", now=now, silent_since=now, joining=True)
        assert live == ["me"]
    assert len(calls) == runs
    assert SchedulerStore.deadlocked(error) is (runs == 2)


async def test_a_silent_scheduler_s_share_is_taken_over(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Of two schedulers, one stops renewing its row (it died without a word). The other
    goes on sending its own share on time, takes the silent one's jobs once they are overdue
    by a sync interval, and once the silent one's lease has passed takes every job at its
    time. Every fire is sent, once."""
    (alive, silent), brokers = await several_apps(2, session_factory, clock)
    start = clock.now()
    job_ids = [f"job-{index:03}" for index in range(100)]
    await alive.upsert_many(
        session,
        [
            alive.single(task="tests.record").definition(trigger=every(10), job_id=job_id)
            for job_id in job_ids
        ],
    )
    try:
        await alive.engine.sync()
        await silent.engine.sync()
        clock.advance(10)  # first fire: both alive
        await alive.engine.tick()
        await silent.engine.tick()
        mine = share_of(alive, job_ids)
        theirs = set(job_ids) - mine
        assert alive.engine.share[1] == 2
        assert set(job_ids_sent(brokers[0])) == mine
        assert set(job_ids_sent(brokers[1])) == theirs
        # From now on ``silent`` never runs again.
        clock.advance(10)  # second fire, on time: only this one's share
        assert await alive.engine.tick() == len(mine)
        clock.advance(alive.config.sync_interval_seconds)  # the others' overdue by that
        assert await alive.engine.tick() == len(theirs)
        # Once the silent one's lease is over, this one takes every job on time.
        for _ in range(3):
            clock.advance(10)
            await alive.engine.tick()
        assert alive.engine.share == (0, 1)
        clock.set(start + timedelta(seconds=60))
        assert await alive.engine.tick() == 100
    finally:
        for b in brokers:
            await b.shutdown()
    messages = [
        (m.labels["taskiq_beat_job_id"], m.labels["taskiq_beat_scheduled_for"])
        for b in brokers
        for m in b.sent
    ]
    assert len(messages) == len(set(messages)), "nothing is sent twice"
    fires = {(start + timedelta(seconds=10 * n)).isoformat() for n in range(1, 7)}
    assert {(job, when) for job in job_ids for when in fires} == set(messages)
    instances = await session.execute(sa.select(SchedulerInstance.id))
    assert list(instances.scalars()) == [alive.engine.owner]


async def test_a_scheduler_that_stops_leaves_its_share_at_once(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """A scheduler that stops removes its row: the other takes every job at its next
    renewal, not a lease later."""
    (staying, leaving), brokers = await several_apps(2, session_factory, clock)
    await staying.single(task="tests.record").upsert(session, trigger=every(10), job_id="job")
    try:
        await staying.engine.sync()
        await leaving.engine.sync()
        clock.advance(1)
        await staying.engine.tick()
        assert staying.engine.share[1] == 2
        await leaving.engine.stop()
        clock.advance(1)
        await staying.engine.tick()
    finally:
        for b in brokers:
            await b.shutdown()
    assert staying.engine.share == (0, 1)
    instances = await session.execute(sa.select(SchedulerInstance.id))
    assert list(instances.scalars()) == [staying.engine.owner]


async def test_the_jobs_of_a_scheduler_that_stops_are_sent_on_time_by_the_other(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Two schedulers syncing every 5 s, each holding its own share; one stops. The other
    takes every job at its next renewal (a second later) and loads the jobs it did not
    hold at once, not at its next sync: the stopped one's fires, due 3 s after the stop,
    are sent on their time, once."""
    (staying, leaving), brokers = await several_apps(2, session_factory, clock, sync_interval=5)
    due = clock.now() + timedelta(seconds=3)
    job_ids = [f"job-{index:03}" for index in range(100)]
    await due_one_offs(staying, session, due, 100)
    try:
        await leaving.engine.sync()
        await staying.engine.sync()  # registered second: sees both, holds its own share
        assert staying.engine.share[1] == 2
        theirs = set(job_ids) - share_of(staying, job_ids)
        await leaving.engine.stop()
        clock.advance(1)
        assert await staying.engine.tick() == 0  # renewed: alone now
        assert staying.engine.share == (0, 1)
        clock.set(due)  # 2 s before its next sync
        assert await staying.engine.tick() == 100
    finally:
        for b in brokers:
            await b.shutdown()
    assert sorted(job_ids_sent(brokers[0])) == job_ids
    assert theirs, "the stopped scheduler had a share"
    assert brokers[1].sent == []


def recorded_loads(scheduler: SchedulerApp, monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """The ids each of ``scheduler``'s loads of due jobs returns, from now on."""
    store = scheduler.engine._store
    load_due = store.load_due
    loads: list[set[str]] = []

    async def recording_load_due(horizon: Any, **options: Any) -> Any:
        records = await load_due(horizon, **options)
        loads.append({record.id for record in records})
        return records

    monkeypatch.setattr(store, "load_due", recording_load_due)
    return loads


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # loads read only a share
@pytest.mark.parametrize("before", [1, 2])
async def test_a_scheduler_whose_share_changes_loads_the_jobs_new_to_it_at_once(
    backend: str,
    before: int,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scheduler syncing every 5 s holds its share of the jobs (all of them alone, or its
    half of two); one more starts. At its next renewal it takes a smaller share: one of two
    that becomes one of three has about half of its new jobs from the other's former half,
    which it never read. It loads them at once, not at its next sync, and only them (those
    of its old share still in its new one are held already, those that left it are let
    go; alone, it held every job), and sends its whole new share on time, once."""
    apps, brokers = await several_apps(before + 1, session_factory, clock, sync_interval=5)
    first, joining = apps[0], apps[-1]
    due = clock.now() + timedelta(seconds=3)
    job_ids = [f"job-{index:03}" for index in range(300)]
    await due_one_offs(first, session, due, 300)
    try:
        for app in apps[1:-1]:
            await app.engine.sync()
        await first.engine.sync()  # holds its own share, nothing more
        assert first.engine.share[1] == before
        old_share = share_of(first, job_ids)
        assert first.engine.loaded_jobs == len(old_share)
        await joining.engine.sync()  # one more scheduler starts
        clock.advance(1)
        loads = recorded_loads(first, monkeypatch)
        assert await first.engine.tick() == 0  # renewed: its share is smaller
        assert first.engine.share[1] == before + 1
        new_share = share_of(first, job_ids)
        assert len(new_share - old_share) > 30 or before == 1, "jobs it never read"
        # read in the renewal's pass, and only them; nothing at all if it held every job
        assert loads == ([new_share - old_share] if before > 1 else [])
        assert first.engine.loaded_jobs == len(new_share)
        clock.set(due)  # before the sync that would have come 5 s after the first one
        sent = await first.engine.tick()
    finally:
        for b in brokers:
            await b.shutdown()
    assert sorted(job_ids_sent(brokers[0])) == sorted(new_share)
    assert sent == len(new_share)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # loads read only a share
async def test_two_changes_of_share_before_a_load_leave_no_job_of_the_last_unread(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """One of two schedulers holds its half; a third starts and stops at once, and the
    first renews twice before it loads the jobs new to its share: it took a third and let
    go of the rest of its half, then got its half back. It reads its whole window again
    (its share is the one it last loaded whole, but it no longer holds all of it), and
    sends its whole half on time, once."""
    apps, brokers = await several_apps(3, session_factory, clock, sync_interval=5)
    first, second, third = apps
    due = clock.now() + timedelta(seconds=3)
    job_ids = [f"job-{index:03}" for index in range(300)]
    await due_one_offs(first, session, due, 300)
    try:
        await second.engine.sync()
        await first.engine.sync()  # holds its half
        half = share_of(first, job_ids)
        await third.engine.sync()
        await first.engine._renew(clock.now())  # one of three: lets go of part of its half
        assert first.engine.loaded_jobs < len(half)
        await third.engine.stop()
        await first.engine._renew(clock.now())  # one of two again, before any load
        assert share_of(first, job_ids) == half
        clock.advance(1)
        assert await first.engine.tick() == 0
        assert first.engine.loaded_jobs == len(half)
        clock.set(due)
        sent = await first.engine.tick()
    finally:
        for b in brokers:
            await b.shutdown()
    assert sorted(job_ids_sent(brokers[0])) == sorted(half)
    assert sent == len(half)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # loads read only a share
async def test_a_first_load_cut_short_is_not_taken_for_the_whole_window(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """The first load reads the first ``limit`` jobs of the scheduler's share, and beside
    them the earliest of the others' overdue jobs: more rows than ``limit`` in all. It is
    still cut short: the first pass reads the rest of the share and sends all of it."""
    (first, second), brokers = await several_apps(2, session_factory, clock, batch_size=5)
    due = clock.now() - timedelta(seconds=5)  # overdue: the others' come with the first load
    job_ids = [f"job-{index:03}" for index in range(100)]
    await due_one_offs(first, session, due, 100)
    try:
        await second.engine.sync()
        await first.engine._renew(clock.now())
        await first.engine._load_window(clock.now(), limit=10)  # as start() does, shorter
        mine = share_of(first, job_ids)
        assert first.engine.loaded_jobs > 10  # its first 10, and some of the other's
        sent = await first.engine.tick()
    finally:
        for b in brokers:
            await b.shutdown()
    assert set(job_ids_sent(brokers[0])) >= mine
    assert sent >= len(mine)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # loads read only a share
async def test_a_scheduler_behind_on_its_own_jobs_loads_little_of_the_others_backlog(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Two schedulers, a backlog due at once. While one is behind on its own share, its
    syncs read that share and only the earliest two batches of the other's overdue jobs
    (it helps only with nothing of its own due); once its own are sent, the next sync
    brings the rest of the other's (which never ran), and it sends them, once."""
    (helper, idle), brokers = await several_apps(2, session_factory, clock, batch_size=10)
    due = clock.now() + timedelta(seconds=1)
    job_ids = [f"job-{index:03}" for index in range(200)]
    await due_one_offs(helper, session, due, 200)
    try:
        await idle.engine.sync()
        await helper.engine.sync()  # both registered; the helper holds its own share
        mine = share_of(helper, job_ids)
        assert helper.engine.share[1] == 2
        clock.advance(3)  # the backlog overdue by 2 s; the idle scheduler never runs again
        await helper.engine.sync()
        assert helper.engine.loaded_jobs == len(mine) + 2 * 10  # behind: 2 batches of theirs
        first = await helper.engine.tick()
        assert len(mine) <= first <= len(mine) + 2 * 10
        clock.advance(1)  # the next sync: nothing of its own due, so the others' come
        assert first + await helper.engine.tick() == len(job_ids)
    finally:
        for b in brokers:
            await b.shutdown()
    assert sorted(job_ids_sent(brokers[0])) == job_ids
    assert brokers[1].sent == []


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # loads read only a share
async def test_a_helper_that_loses_a_batch_to_the_owner_waits_for_its_next_sync(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scheduler done with its own share holds the other's overdue jobs to help with; the
    other, alive, sends them meanwhile. The helper's first claims of them are lost to it,
    and it claims no more of them while its next sync reads the database (it went on
    through every one it held, a batch at a time, each lost): that sync finds none left."""
    (helper, owner), brokers = await several_apps(2, session_factory, clock, batch_size=10)
    due = clock.now() + timedelta(seconds=1)
    job_ids = [f"job-{index:03}" for index in range(200)]
    await due_one_offs(helper, session, due, 200)
    try:
        await owner.engine.sync()
        await helper.engine.sync()
        clock.advance(1)
        await owner.engine.sync()  # both registered, each holding its share
        theirs = share_of(owner, job_ids)
        clock.advance(3)  # the backlog overdue by 3 s
        while await helper.engine.tick():  # its own share (and a little of the other's)
            pass
        await helper.engine.sync()  # nothing of its own left: it holds the other's
        held = helper.engine.loaded_jobs
        assert held > 50
        assert await owner.engine.tick() == held  # the owner at work on them meanwhile
        store = helper.engine._store
        claim, load_due = store.claim, store.load_due
        claimed: list[int] = []

        async def counting_claim(claims: Any, **options: Any) -> Any:
            claimed.append(len(claims))
            return await claim(claims, **options)

        async def slow_load_due(horizon: Any, **options: Any) -> Any:
            await asyncio.sleep(0.2)  # claims go on while a sync reads
            return await load_due(horizon, **options)

        monkeypatch.setattr(store, "claim", counting_claim)
        monkeypatch.setattr(store, "load_due", slow_load_due)
        for _ in range(3):
            assert await helper.engine.tick() == 0
            clock.advance(1)
    finally:
        for b in brokers:
            await b.shutdown()
    assert sum(claimed) <= 2 * 10, (claimed, held)  # the claims in flight when the first was lost
    assert helper.engine.loaded_jobs == 0
    assert sorted(job_ids_sent(brokers[0]) + job_ids_sent(brokers[1])) == job_ids
    assert set(job_ids_sent(brokers[1])) <= theirs


async def test_a_scheduler_helps_with_another_s_jobs_from_the_end_its_owner_reaches_last(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Two schedulers sharing 200 jobs due at one time: each holds the other's jobs in the
    reverse of the order their owner takes them, so one that has done its own share and
    helps with the rest starts where the owner will come last."""
    (first, second), brokers = await several_apps(2, session_factory, clock)
    due = clock.now() - timedelta(seconds=5)  # overdue: each loads the other's jobs too
    await first.upsert_many(
        session,
        [
            first.single(task="tests.record").definition(
                trigger=OneOffSchedule(run_at=due), job_id=f"job-{index:03}"
            )
            for index in range(200)
        ],
    )
    try:
        await first.engine.sync()
        await second.engine.sync()
        clock.advance(1)  # both renew, and see each other
        await first.engine.sync()
        await second.engine.sync()
    finally:
        for b in brokers:
            await b.shutdown()
    for owner, helper in ((first, second), (second, first)):
        taken = [job_id for _, _, job_id in sorted(owner.engine._heap)]
        helped = [job_id for _, _, job_id in sorted(helper.engine._foreign)]
        assert 60 <= len(taken) <= 140
        assert helped == taken[::-1]


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_the_database_computes_each_job_s_slot_as_the_engine_does(
    backend: str, session: AsyncSession
) -> None:
    """On PostgreSQL, MySQL and MariaDB a sync loads only this scheduler's share (and the
    others' jobs it may help with): the database's slot of a job must be the engine's."""
    ids = [f"job-{index}" for index in range(50)] + ["a", "ü-ß", "x" * 64, "日本-job"]
    sql = sql_of_dialect(session.bind.dialect.name)
    for count in (2, 3, 7):
        slots = {}
        for job_id in ids:
            slot = sql.slot_of_job(sa.literal(job_id, sa.String()), count)
            assert slot is not None
            slots[job_id] = (await session.execute(sa.select(slot))).scalar_one()
        assert slots == {job_id: slot_of(job_id, count) for job_id in ids}


async def test_a_sync_loads_only_this_scheduler_s_share_where_the_database_can(
    backend: str,
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Sharing with another, a scheduler on PostgreSQL or MariaDB reads only its own jobs
    due within the window (and the other's overdue ones, none here); on SQLite it reads all
    of them and keeps the other's aside."""
    (first, second), brokers = await several_apps(2, session_factory, clock)
    due = clock.now() + timedelta(seconds=2)
    job_ids = [f"job-{index:03}" for index in range(200)]
    await first.upsert_many(
        session,
        [
            first.single(task="tests.record").definition(
                trigger=OneOffSchedule(run_at=due), job_id=job_id
            )
            for job_id in job_ids
        ],
    )
    try:
        await first.engine.sync()
        await second.engine.sync()
        clock.advance(1)
        await first.engine.sync()  # renews (two schedulers), then loads the window
        await first.engine.sync()
    finally:
        for b in brokers:
            await b.shutdown()
    mine = share_of(first, job_ids)
    assert first.engine.share[1] == 2
    assert 60 <= len(mine) <= 140
    expected = len(job_ids) if backend == "sqlite" else len(mine)
    assert first.engine.loaded_jobs == expected
    assert {job_id for _, _, job_id in first.engine._heap} == mine


async def test_two_helpers_start_on_different_jobs_of_a_third_scheduler(
    session: AsyncSession,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Of three schedulers, the two that may help with the third one's overdue jobs start
    at different places in them: one where the owner comes last, the other halfway."""
    apps, brokers = await several_apps(3, session_factory, clock)
    due = clock.now() - timedelta(seconds=5)
    await apps[0].upsert_many(
        session,
        [
            apps[0]
            .single(task="tests.record")
            .definition(trigger=OneOffSchedule(run_at=due), job_id=f"job-{index:03}")
            for index in range(600)
        ],
    )
    try:
        for scheduler in apps:
            await scheduler.engine.sync()
        clock.advance(1)
        for scheduler in apps:
            await scheduler.engine.sync()
    finally:
        for b in brokers:
            await b.shutdown()
    by_slot = {s.engine.share[0]: s.engine for s in apps}
    owner = by_slot[2]
    taken = [job_id for _, _, job_id in sorted(owner._heap)]
    first, second = (
        [job_id for _, _, job_id in sorted(by_slot[slot]._foreign) if job_id in set(taken)]
        for slot in (0, 1)
    )
    assert first == taken[::-1]
    ranks = {job_id: rank for _, rank, job_id in owner._heap}
    lower = [job_id for job_id in taken if ranks[job_id] < 1 << 63]
    upper = taken[len(lower) :]
    assert 0.3 < len(lower) / len(taken) < 0.7
    assert second == lower[::-1] + upper[::-1]  # from halfway down, then from the end
    assert not set(first[:50]) & set(second[:50])
