"""Schedulers killed with SIGKILL lose no fire, and send a fire twice only with its task id.

- failover (PostgreSQL, MariaDB): of two schedulers, the one killed was slow to send, so it
  dies holding claimed fires; the other sends every later fire at once and the dead one's
  claims when their lease runs out;
- crash anywhere (the three databases): one scheduler, killed at random moments of its busy
  second 20 times and started again each time; every fire is sent (those due while none ran
  a little late, within the misfire grace), and a fire may reach the broker twice only when
  it was sent again after its lease (``attempt`` > 1), with the same task id; a real
  ``taskiq worker`` then executes every message, and each fire once.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from taskiq_beat import RunStatus
from tests.processes import wait_until
from tests.reliability.harness import (
    BACKENDS,
    Backend,
    Ledger,
    Run,
    cluster,
    grid,
    utcnow,
    whole_second,
)

pytestmark = pytest.mark.slow

SECOND = timedelta(seconds=1)
SYNC_INTERVAL = 1.0
LEASE = 3.0
CONFIG = {
    "sync_interval_seconds": SYNC_INTERVAL,
    "claim_lease_seconds": LEASE,
    "dispatch_timeout_seconds": 2.0,
}


async def sleep_until(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - utcnow()).total_seconds()))


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_the_surviving_scheduler_sends_the_killed_ones_fires(
    tmp_path: Path, redis_url: str, backend: Backend
) -> None:
    async with cluster(tmp_path, backend, redis_url) as c:
        # 100 fires a second at 0.1 s a send, 32 at a time: the slow one is always sending.
        slow, steady = await asyncio.gather(
            c.start_scheduler("slow", config=CONFIG, send_delay=0.1),
            c.start_scheduler("steady", config=CONFIG),
        )
        start_at = whole_second(2)
        end_at = start_at + 19 * SECOND
        jobs = await c.add_interval_jobs(100, start_at=start_at, end_at=end_at)
        expected = {(job, when) for job in jobs for when in grid(start_at, end_at)}

        # Kill the slow one while it holds claimed fires it has not recorded as sent (the
        # two race for each second's fires; it wins some of them within a few seconds).
        slow_owner = (await slow.wait_for_output(r"scheduler started \(instance (\w+)\)", 1))[1]
        await sleep_until(start_at + 3 * SECOND)

        async def holding() -> list[Run]:
            return [
                run
                for run in await c.runs()
                if run.claimed_by == slow_owner and run.status is RunStatus.CLAIMED
            ]

        held = await wait_until(holding, timeout=12, interval=0.05, details=c.details)
        killed_at = utcnow()
        await slow.kill()

        await sleep_until(end_at)
        ledger = await c.settle(len(expected), timeout=20, watch=[steady])
        report = ledger.check(expected)
        assert report.sent == report.expected, "the survivor ran all along: nothing coalesced"

        orphans = [run for run in ledger.runs if run.attempt > 1]
        after_kill = [run for run in ledger.runs if run.scheduled_for >= killed_at]
        late = max(run.dispatched_at - run.scheduled_for for run in after_kill)  # type: ignore[operator]
        assert orphans, "the fires the slow one held were sent again"
        orphans_sent_by = max(run.dispatched_at for run in orphans)  # type: ignore[type-var]
        print(
            f"\nfailover ({backend}): {report}; the dead one held {len(held)} claimed fires; "
            f"{len(orphans)} fires sent again, the last "
            f"{(orphans_sent_by - killed_at).total_seconds():.2f} s after the kill; "
            f"later fires at most {late.total_seconds():.3f} s late"
        )
        assert {run.fire for run in held} <= {run.fire for run in orphans}
        assert late <= 2 * SYNC_INTERVAL * SECOND, "the survivor sends later fires in time"
        assert orphans_sent_by - killed_at <= (LEASE + 2 * SYNC_INTERVAL) * SECOND
        assert await steady.terminate(10) == 0, c.details()
        assert_each_fire_executed_once(
            ledger, await c.execute_all(timeout=180), f"failover ({backend})"
        )


def assert_each_fire_executed_once(ledger: Ledger, executed: list[str], label: str) -> None:
    """Every task id the broker received was executed, each once (a duplicate message at the
    broker included)."""
    counts = Counter(executed)
    duplicates = sum(n - 1 for n in ledger.resent.values())
    print(
        f"{label}: {len(ledger.messages)} messages ({duplicates} duplicates at the broker),"
        f" {len(executed)} executions, duplicates executed: {sum(n - 1 for n in counts.values())}"
    )
    assert set(counts) == set(ledger.received), "every fire the broker received ran"
    assert max(counts.values()) == 1, "a fire sent twice is executed once"


CRASHES = 20


@pytest.mark.parametrize("backend", BACKENDS)
async def test_killed_anywhere_twenty_times_no_fire_is_lost(
    tmp_path: Path, redis_url: str, backend: Backend
) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    async with cluster(tmp_path, backend, redis_url) as c:
        # 500 fires each second at 5 ms a send: the loop is busy claiming, sending and
        # recording for a good part of every second, where the kills land.
        start = {"config": CONFIG, "send_delay": 0.005}
        scheduler = await c.start_scheduler("scheduler-0", **start)
        start_at = whole_second(1)
        end_at = start_at + 300 * SECOND  # beyond the test: it stops firing when checked
        jobs = await c.add_interval_jobs(500, start_at=start_at, end_at=end_at)
        for crash in range(CRASHES):
            moment = whole_second(0) + rng.uniform(0.0, 0.5) * SECOND
            await sleep_until(moment)
            assert scheduler.running, c.details()
            await scheduler.kill()
            scheduler = await c.start_scheduler(f"scheduler-{crash + 1}", **start)
        # Fires up to ``last`` are checked. The last scheduler started behind (the fires due
        # while it started up); the jobs are disabled once it has claimed every fire up to
        # ``last``, which it must do well within the misfire grace (30 s).
        last = whole_second(0)
        expected = {(job, when) for job in jobs for when in grid(start_at, last)}

        async def caught_up() -> bool:
            runs = await c.runs()
            return len({(r.job_id, r.scheduled_for) for r in runs} & expected) == len(expected)

        await sleep_until(last + SECOND)
        await wait_until(
            caught_up,
            timeout=15,
            interval=0.25,
            message=f"the last scheduler did not claim every fire due up to {last}",
            details=c.details,
            watch=[scheduler],
        )
        await c.disable_all()
        ledger = await c.settle(timeout=LEASE + 20, watch=[scheduler])
        # Each restart takes a second or two, far less than the misfire grace (30 s): the
        # fires due meanwhile are sent late, each one, none coalesced.
        report = ledger.check(expected, until=last)
        print(
            f"\n{backend}: {CRASHES} SIGKILLs (seed {seed}): {report}; "
            f"sent twice with one task id: {len(ledger.resent)}"
        )
        assert report.sent == report.expected
        assert await scheduler.terminate(10) == 0, c.details()

        # A real worker executes every message, the duplicates included: each fire once.
        assert_each_fire_executed_once(ledger, await c.execute_all(timeout=180), backend)
