"""Claims ahead of time (``SchedulerConfig.claim_ahead_seconds``): fires of jobs without a
policy are claimed before they are due and sent on time; a change heard before then takes
the fire back. On SQLite, PostgreSQL and MariaDB.

Most tests drive time with a fake clock and ``engine.tick()``; those with another process's
change run the scheduler's loop for real (a notification or a poll has to reach it).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from taskiq_beat import (
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.early import EarlyFires
from taskiq_beat.exceptions import InvalidConfigError
from taskiq_beat.store import ClaimedFires
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc
LEASE_END = datetime(2026, 1, 5, 13, 0, 0, tzinfo=UTC)  # of the unit tests' claims
AHEAD = SchedulerConfig(claim_ahead_seconds=0.5)


def every(seconds: float) -> PeriodicSchedule:
    return PeriodicSchedule(interval=IntervalTrigger(seconds=seconds))


@pytest.fixture
def config() -> SchedulerConfig:
    return AHEAD


SENT = "sent"  # dispatched, or moved on by the in-memory worker's lifecycle
_SENT = {RunStatus.DISPATCHED, RunStatus.RUNNING, RunStatus.SUCCEEDED}


async def runs(session: AsyncSession, job_id: str) -> list[tuple[RunStatus | str, datetime]]:
    result = await session.execute(
        sa.select(SchedulerRun.status, SchedulerRun.scheduled_for)
        .where(SchedulerRun.job_id == job_id)
        .order_by(SchedulerRun.scheduled_for)
    )
    rows: list[tuple[RunStatus | str, datetime]] = [
        (SENT if RunStatus(status) in _SENT else RunStatus(status), when) for status, when in result
    ]
    await session.commit()
    return rows


async def next_run_at(session: AsyncSession, job_id: str) -> datetime | None:
    value = await session.scalar(
        sa.select(SchedulerJob.next_run_at).where(SchedulerJob.id == job_id)
    )
    await session.commit()
    return value


async def claimed_ahead(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> tuple[str, datetime]:
    """A job every 10 s, its first fire claimed 0.4 s ahead: its id and that fire's time."""
    fire = clock.now() + timedelta(seconds=10)
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await app.engine.sync()
    clock.advance(9.6)
    assert await app.engine.tick() == 0
    assert await runs(session, job.id) == [(RunStatus.CLAIMED, fire)]
    return job.id, fire


async def test_a_fire_is_claimed_ahead_and_sent_on_its_time(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    start = clock.now()
    fire = start + timedelta(seconds=10)
    job = await app.single(task="tests.record", args=[1]).schedule(session, trigger=every(10))
    await app.engine.sync()

    clock.advance(9.4)  # not yet within the half second
    assert await app.engine.tick() == 0
    assert await runs(session, job.id) == []

    clock.advance(0.2)  # 0.4 s before the fire: claimed, not sent
    assert await app.engine.tick() == 0
    assert broker.sent == []
    assert await runs(session, job.id) == [(RunStatus.CLAIMED, fire)]
    assert await next_run_at(session, job.id) == fire + timedelta(seconds=10)
    assert 0 < app.engine._idle_delay() <= 0.4  # it wakes by the fire's time
    assert app.engine.next_due_at == fire  # as the health snapshot shows it

    clock.advance(0.3)
    assert await app.engine.tick() == 0  # still 0.1 s early
    clock.advance(0.1)
    assert await app.engine.tick() == 1
    [message] = broker.sent
    assert message.labels["taskiq_beat_scheduled_for"] == fire.isoformat()
    assert await runs(session, job.id) == [(SENT, fire)]


async def test_a_claim_ahead_holds_its_lease_from_the_fire_s_time(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await app.engine.sync()
    clock.advance(9.6)
    await app.engine.tick()
    lease = await session.scalar(
        sa.select(SchedulerRun.next_attempt_at).where(SchedulerRun.job_id == job.id)
    )
    await session.commit()
    fire = clock.now() + timedelta(seconds=0.4)
    assert lease == fire + timedelta(seconds=app.config.claim_lease_seconds)


async def test_a_pause_in_this_process_after_the_claim_stops_the_fire(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job_id, fire = await claimed_ahead(app, session, clock)

    await app.pause(session, job_id)
    clock.advance(0.4)
    assert await app.engine.tick() == 0
    clock.advance(5)
    assert await app.engine.tick() == 0
    assert broker.sent == []
    # As if never claimed: no run, and the job stopped at the fire it did not send.
    assert await runs(session, job_id) == []
    assert await next_run_at(session, job_id) == fire


async def test_an_edit_in_this_process_after_the_claim_sends_the_new_payload_on_time(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    fire = clock.now() + timedelta(seconds=10)
    await app.single(task="tests.record", args=[1]).upsert(
        session, trigger=every(10), job_id="edited"
    )
    await app.engine.sync()
    clock.advance(9.6)
    await app.engine.tick()
    assert await runs(session, "edited") == [(RunStatus.CLAIMED, fire)]

    await app.single(task="tests.record", args=[2]).upsert(
        session, trigger=every(10), job_id="edited"
    )
    clock.advance(0.4)
    sent = 0
    for _ in range(3):  # the claim undone, the job reloaded, claimed again and sent
        sent += await app.engine.tick()
    assert sent == 1
    [message] = broker.sent
    assert message.args == [2]
    assert message.labels["taskiq_beat_scheduled_for"] == fire.isoformat()
    assert await runs(session, "edited") == [(SENT, fire)]


async def test_a_deletion_in_this_process_after_the_claim_stops_the_fire(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    job_id, _ = await claimed_ahead(app, session, clock)
    await app.delete(session, job_id)
    clock.advance(0.4)
    assert await app.engine.tick() == 0
    assert broker.sent == []


async def test_a_job_with_a_policy_is_claimed_on_time(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    """Its limits count the runs going at the fire's time, not half a second before."""
    fire = clock.now() + timedelta(seconds=10)
    job = await (
        app.single(task="tests.record").policy(overlap="skip").schedule(session, trigger=every(10))
    )
    await app.engine.sync()
    clock.advance(9.6)
    assert await app.engine.tick() == 0
    assert await runs(session, job.id) == []
    assert app.engine._idle_delay() > 0  # no loop spinning until its time
    clock.advance(0.4)
    assert await app.engine.tick() == 1
    assert await runs(session, job.id) == [(SENT, fire)]


async def test_stop_gives_back_the_fires_claimed_ahead_to_the_next_scheduler(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    job_id, fire = await claimed_ahead(app, session, clock)
    await app.engine.stop()
    assert await runs(session, job_id) == []
    assert await next_run_at(session, job_id) == fire

    other_broker = RecordingBroker()

    @other_broker.task(task_name="tests.record")
    async def record() -> None: ...

    other = SchedulerApp(
        broker=other_broker, session_factory=session_factory, config=AHEAD, clock=clock
    )
    await other.engine.sync()
    clock.advance(0.4)
    assert await other.engine.tick() == 1
    assert broker.sent == []
    assert [m.labels["taskiq_beat_job_id"] for m in other_broker.sent] == [job_id]
    assert await runs(session, job_id) == [(SENT, fire)]


async def test_many_jobs_due_on_one_instant_are_all_claimed_before_it(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    fire = clock.now() + timedelta(seconds=10)
    trigger = every(10)
    definitions = [
        app.single(task="tests.record", args=[i]).definition(trigger=trigger, job_id=f"j{i:04d}")
        for i in range(600)  # more than two batches of the default size
    ]
    await app.upsert_many(session, definitions)
    await app.engine.sync()
    clock.advance(9.6)
    assert await app.engine.tick() == 0
    claimed = await session.scalar(
        sa.select(sa.func.count()).where(SchedulerRun.status == RunStatus.CLAIMED)
    )
    await session.commit()
    assert claimed == 600
    clock.advance(0.4)
    assert await app.engine.tick() == 600
    assert {m.labels["taskiq_beat_scheduled_for"] for m in broker.sent} == {fire.isoformat()}
    assert len({m.task_id for m in broker.sent}) == 600


def test_claim_ahead_must_be_shorter_than_the_look_ahead_window() -> None:
    with pytest.raises(InvalidConfigError, match=r"claim_ahead_seconds=2\.0"):
        SchedulerConfig.from_env(claim_ahead_seconds=2.0)  # the window: 2 x 1 s
    assert SchedulerConfig(claim_ahead_seconds=2.0, sync_interval_seconds=2).claim_ahead_seconds
    with pytest.raises(ValueError, match="claim_ahead_seconds"):
        SchedulerConfig(claim_ahead_seconds=-1)


# ---------------------------------------------------------------------- other processes

REAL = SchedulerConfig(claim_ahead_seconds=3, sync_interval_seconds=3, idle_sleep_seconds=0.1)


async def wait_for_run(
    session_factory: async_sessionmaker[AsyncSession], job_id: str, status: RunStatus
) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        async with session_factory() as session:
            found = await session.scalar(
                sa.select(sa.func.count()).where(
                    SchedulerRun.job_id == job_id, SchedulerRun.status == status
                )
            )
        if found:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {status.value} run of {job_id} within 10 s")


@pytest.mark.parametrize("listener", ["hearing", "deaf"])
@pytest.mark.parametrize("change", ["edit", "pause"])
async def test_a_change_from_another_process_after_the_claim_is_heard_before_the_fire(
    backend: str,
    listener: str,
    change: str,
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    """Claimed 3 s ahead; another app (as another process would) edits or pauses the job
    after the claim: the fire is sent with the new payload, or not at all. ``deaf``: on
    PostgreSQL, the scheduler's listener open but hearing nothing (as behind a pooler in
    transaction mode, which takes ``LISTEN`` and never delivers; here ``UNLISTEN`` behind
    its back): the change still counts, by the jobs' newest ``updated_at``."""
    if listener == "deaf" and backend != "postgresql":
        pytest.skip("only PostgreSQL listens")
    running = SchedulerApp(broker=broker, session_factory=session_factory, config=REAL)
    elsewhere = SchedulerApp(broker=broker, session_factory=session_factory, config=REAL)
    fire = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    due = OneOffSchedule(run_at=fire)
    async with session_factory() as session:
        await running.single(task="tests.record", args=[1]).upsert(
            session, trigger=due, job_id="far"
        )
    async with running:
        await wait_for_run(session_factory, "far", RunStatus.CLAIMED)
        if listener == "deaf":
            engine_listener = running.engine._listener
            assert engine_listener is not None
            raw = await engine_listener._connection.get_raw_connection()
            await raw.driver_connection.execute("UNLISTEN *")  # type: ignore[union-attr]
        assert datetime.now(UTC) < fire
        async with session_factory() as session:
            if change == "edit":
                await elsewhere.single(task="tests.record", args=[2]).upsert(
                    session, trigger=due, job_id="far"
                )
            else:
                await elsewhere.pause(session, "far")
        if change == "edit":
            await broker.wait_sent(1, timeout=10)
        else:
            await asyncio.sleep(max(0.0, (fire - datetime.now(UTC)).total_seconds()) + 0.5)
        if listener == "deaf":
            assert engine_listener.alive, "deaf, not dead: nothing told the scheduler"
    if change == "edit":
        [message] = broker.sent
        assert message.args == [2]
        assert message.labels["taskiq_beat_scheduled_for"] == fire.isoformat()
        assert datetime.now(UTC) >= fire
    else:
        assert broker.sent == []
        async with session_factory() as session:
            assert await runs(session, "far") == []


def test_fires_claimed_ahead_leave_each_at_its_own_time() -> None:
    """A batch spans several fire times (phases spread over the second): each fire is
    taken when its time comes, not before, and not all with the batch's first."""
    base = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    at = [base + timedelta(milliseconds=ms) for ms in (0, 100, 100, 250)]
    fires = ClaimedFires(
        [1, 2, 3, 4], ["a", "b", "c", "d"], at, ["t1", "t2", "t3", "t4"], *([["x"] * 4] * 4)
    )
    early = EarlyFires("me")
    for job_id, when in zip("abcd", at, strict=True):
        early.note(job_id, 1, when + timedelta(seconds=1))
    now = base - timedelta(milliseconds=1)
    assert len(early.hold(fires, now, heard=0, mark=None, lease_until=LEASE_END)) == 0
    assert early.next_at == base
    assert early.take_due(now) == ([], 0)
    [first], _ = early.take_due(base)
    assert first.fires.job_ids == ["a"]
    early.forget(first.fires.job_ids)
    [second], _ = early.take_due(base + timedelta(milliseconds=200))
    assert second.fires.job_ids == ["b", "c"]
    early.forget(second.fires.job_ids)
    early.cancel("d")
    undo, cancelled = early.drop_cancelled()
    assert cancelled == {"d"}
    assert undo == [(4, "d", at[3], at[3] + timedelta(seconds=1))]
    assert early.next_at is None
    assert "d" in early  # held until its claim is undone: never claimed ahead meanwhile


class _FailingStore:
    """What ``EarlyFires`` asks of the store, failing the first ``failures`` undos (a
    database out at that moment); the claims undone and the reads made are noted."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.undone: list[tuple[int, str, datetime, datetime | None]] = []

    async def unclaim(
        self, fires: list[tuple[int, str, datetime, datetime | None]], *, owner: str
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database down (test)")
        self.undone += fires

    async def last_change(self) -> None:
        return None

    async def load_jobs(self, job_ids: list[str]) -> list[Any]:
        return []


async def test_a_change_taken_back_during_an_outage_is_undone_at_the_next_pass() -> None:
    base = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    fires = ClaimedFires([1, 2], ["a", "b"], [base, base], ["t1", "t2"], *([["x"] * 2] * 4))
    early = EarlyFires("me")
    for job_id in "ab":
        early.note(job_id, 1, base + timedelta(seconds=1))
    early.hold(fires, base - timedelta(seconds=1), heard=0, mark=None, lease_until=LEASE_END)
    early.cancel("a")
    store = _FailingStore(failures=1)
    with pytest.raises(ConnectionError):
        await early.ready(store, base, heard=0)  # type: ignore[arg-type]
    assert store.undone == []
    assert "a" in early  # its undo is owed
    assert early.next_at == base  # b still waits
    ready, changed, _ = await early.ready(store, base, heard=0)  # type: ignore[arg-type]
    assert store.undone == [(1, "a", base, base + timedelta(seconds=1))]
    assert changed == {"a"}  # to reload, now that its claim is undone
    assert [batch.job_ids for batch in ready] == [["b"]]
    assert len(early) == 0


def _fires(*fires: tuple[str, datetime]) -> ClaimedFires:
    count = len(fires)
    return ClaimedFires(
        list(range(1, count + 1)),
        [job_id for job_id, _ in fires],
        [when for _, when in fires],
        [f"t{at}" for at in range(count)],
        *([["x"] * count] * 4),
    )


def test_batches_claimed_out_of_order_still_leave_each_fire_at_its_time() -> None:
    """A sync brings a job due before the end of a batch already waiting: its batch comes
    later but its fire is not held up by the first batch's later ones."""
    base = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    early = EarlyFires("me")
    for job_id in "axyz":
        early.note(job_id, 1, None)
    before = base - timedelta(seconds=1)
    hold = {"heard": 0, "mark": None, "lease_until": LEASE_END}
    early.hold(_fires(("a", base), ("y", base + timedelta(seconds=10))), before, **hold)
    [first], _ = early.take_due(base)
    assert first.fires.job_ids == ["a"]
    early.forget(["a"])
    early.hold(
        _fires(("x", base + timedelta(seconds=3)), ("z", base + timedelta(seconds=11))),
        base,
        **hold,
    )
    assert early.next_at == base + timedelta(seconds=3)
    [second], _ = early.take_due(base + timedelta(seconds=3))
    assert second.fires.job_ids == ["x"]
    taken, _ = early.take_due(base + timedelta(seconds=10))
    assert [batch.fires.job_ids for batch in taken] == [["y"]]
    taken, _ = early.take_due(base + timedelta(seconds=11))
    assert [batch.fires.job_ids for batch in taken] == [["z"]]


def test_a_fire_that_waited_past_its_lease_is_left_to_the_retries_path() -> None:
    """The database was out while it waited: any scheduler may take it by its lease now,
    so it is not sent from here as well."""
    base = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    early = EarlyFires("me", send_time=timedelta(seconds=10))
    early.note("a", 1, None)
    early.hold(
        _fires(("a", base)),
        base - timedelta(seconds=1),
        heard=0,
        mark=None,
        lease_until=base + timedelta(seconds=30),
    )
    assert early.take_due(base + timedelta(seconds=20)) == ([], 1)
    assert "a" not in early
    assert early.next_at is None


async def test_a_job_firing_more_often_than_the_lead_is_claimed_on_time(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    """Every 0.4 s with a lead of 0.5 s: two of its fires would be claimed at once."""
    job = await app.single(task="tests.record").schedule(session, trigger=every(0.4))
    await app.engine.sync()
    clock.advance(0.1)
    assert await app.engine.tick() == 0
    assert await runs(session, job.id) == []
    assert app.engine._idle_delay() > 0
    clock.advance(0.3)
    assert await app.engine.tick() == 1
    clock.advance(0.4)
    assert await app.engine.tick() == 1
    assert len(await runs(session, job.id)) == 2


async def test_a_fire_taken_over_by_another_scheduler_is_not_given_back(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    """Its lease ran out and another scheduler resent it: stopping leaves its run and the
    job's next fire as they are."""
    job_id, fire = await claimed_ahead(app, session, clock)
    await session.execute(
        sa.update(SchedulerRun)
        .where(SchedulerRun.job_id == job_id)
        .values(claimed_by="another", attempt=2)
    )
    await session.commit()
    await app.engine.stop()
    assert await runs(session, job_id) == [(RunStatus.CLAIMED, fire)]
    assert await next_run_at(session, job_id) == fire + timedelta(seconds=10)


async def test_a_deletion_heard_while_the_claim_runs_stops_the_fire(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, clock: FakeClock
) -> None:
    """The job is deleted in this process after the claim committed and before it
    returned: the fire is held already, and not sent."""
    job = await app.single(task="tests.record").schedule(session, trigger=every(10))
    await app.engine.sync()
    store = app.engine._store
    claim = store.claim

    async def claim_then_delete(*args: Any, **kwargs: Any) -> Any:
        claimed = await claim(*args, **kwargs)
        async with app.session_factory() as other:
            await app.delete(other, job.id)
        return claimed

    store.claim = claim_then_delete  # type: ignore[method-assign]
    clock.advance(9.6)
    assert await app.engine.tick() == 0
    store.claim = claim  # type: ignore[method-assign]
    clock.advance(0.4)
    assert await app.engine.tick() == 0
    assert broker.sent == []


def test_a_change_heard_while_its_claim_runs_survives_another_batch_s_check() -> None:
    """Job j is changed in this process while its claim runs; another batch's fires are
    checked meanwhile. j's mark is kept, so its fire, due when the claim returns, is not
    sent but taken back."""
    base = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
    early = EarlyFires("me")
    early.note("j", 1, base + timedelta(seconds=1))  # its claim is under way
    early.cancel("j")
    assert early.drop_cancelled() == ([], set())  # in no batch yet: still marked
    assert early.has_cancelled
    due = early.hold(
        _fires(("j", base)), base, heard=0, mark=None, lease_until=LEASE_END
    )  # the claim returns with the fire due
    assert len(due) == 0
    undo, changed = early.drop_cancelled()
    assert undo == [(1, "j", base, base + timedelta(seconds=1))]
    assert changed == {"j"}
    assert not early.has_cancelled
