"""SIGTERM or SIGINT in the middle of a large batch: the scheduler exits promptly, and what it
had claimed but not sent goes back at once, so the next scheduler sends it, once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from taskiq_beat import RunStatus
from tests.processes import wait_until
from tests.reliability.harness import BACKENDS, Backend, cluster, utcnow

pytestmark = pytest.mark.slow

JOBS = 3000
SEND_DELAY = 0.02
STOP_BOUND = 3.0
"""Seconds from the signal to the exit: the sends in flight finish (32 of 20 ms here), the
rest is released in one statement; ``shutdown_timeout_seconds`` (10 s) is the hard cap."""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
async def test_a_signal_mid_batch_exits_promptly_and_leaves_nothing_to_send_twice(
    tmp_path: Path,
    redis_url: str,
    backend: Backend,
    signal_name: str,
) -> None:
    async with cluster(tmp_path, backend, redis_url) as c:
        config = {"dispatch_batch_size": JOBS}
        first = await c.start_scheduler("first", config=config, send_delay=SEND_DELAY)
        run_at = utcnow()
        jobs = await c.add_one_off_jobs(JOBS, run_at=run_at)

        async def sending() -> bool:
            return int(await c.redis.llen(c.queue)) >= 100

        await wait_until(sending, timeout=20, details=c.details, watch=[first])
        signalled = time.monotonic()
        first.send_signal(getattr(signal, signal_name))
        code = await first.wait(STOP_BOUND + 10)
        took = time.monotonic() - signalled
        assert code == 0, c.details()
        assert took <= STOP_BOUND, c.details(f"exit took {took:.2f} s")

        stopped = await c.ledger()
        held = [
            run
            for run in stopped.runs
            if run.status is not RunStatus.DISPATCHED and run.claimed_by is not None
        ]
        assert not held, c.details(f"claims still held after the stop: {held[:5]}")
        assert 0 < len(stopped.messages) < JOBS, "the signal came in the middle of the batch"

        second = await c.start_scheduler("second", config=config)
        ledger = await c.settle(JOBS, timeout=30, watch=[second])
        report = ledger.check({(job, run_at) for job in jobs})
        print(
            f"\n{backend} {signal_name}: exit {took:.2f} s after the signal, "
            f"{len(stopped.messages)} sent before it; {report}"
        )
        assert report.resent == 0
        assert report.sent == JOBS
        assert await second.terminate(10) == 0, c.details()
