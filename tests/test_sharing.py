"""Several schedulers on one database share the work instead of waiting on each other.

Time is driven by a fake clock and ``engine.tick()``; a lock held by "another scheduler" is
a transaction opened here that holds a job's row (``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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
from taskiq_beat.store import SchedulerStore
from taskiq_beat.store._base import StatementTimeout
from tests.test_engine import every
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
