"""Several scheduler processes on one database send every fire exactly once.

Three ``taskiq-beat run`` processes share one database (PostgreSQL, MariaDB or an SQLite
file) and one Redis queue; 200 jobs fire
every second for 30 s. The broker must receive each due fire once: the ledger compares the
messages in the queue with the run rows (see :mod:`tests.reliability.harness`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from tests.reliability.harness import BACKENDS, Backend, cluster, grid, utcnow, whole_second

pytestmark = pytest.mark.slow

JOBS = 200
SECONDS = 30
SCHEDULERS = 3


@pytest.mark.parametrize("backend", BACKENDS)
async def test_three_schedulers_send_every_fire_exactly_once(
    tmp_path: Path, redis_url: str, backend: Backend
) -> None:
    async with cluster(tmp_path, backend, redis_url) as c:
        schedulers = await asyncio.gather(
            *(c.start_scheduler(f"scheduler-{i}") for i in range(SCHEDULERS))
        )
        start_at = whole_second(2)
        end_at = start_at + timedelta(seconds=SECONDS - 1)
        jobs = await c.add_interval_jobs(JOBS, start_at=start_at, end_at=end_at)
        expected = {(job, when) for job in jobs for when in grid(start_at, end_at)}

        await asyncio.sleep((end_at - utcnow()).total_seconds())
        ledger = await c.settle(len(expected), timeout=20, watch=schedulers)
        report = ledger.check(expected)

        print(f"\n{backend}, {SCHEDULERS} schedulers: {report}")
        assert report.sent == report.expected, "a scheduler ran all along: nothing to coalesce"
        assert report.resent == 0, "no scheduler died: nothing may be sent twice"
        shares = Counter(run.claimed_by for run in ledger.runs)
        assert len(shares) == SCHEDULERS, f"every scheduler claims fires: {shares}"
        for scheduler in schedulers:
            assert await scheduler.terminate(10) == 0, c.details()
