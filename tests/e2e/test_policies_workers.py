"""Overlap policies with real ``taskiq worker`` processes and two schedulers on PostgreSQL.

Three jobs fire every second a task that runs 2.5 s: ``overlap="skip"``, ``"buffer_one"``
and ``max_running=2``. Two schedulers share them; two workers run what is sent (the
deployment of tests/e2e/test_lifecycle_workers.py). Afterwards every fire of each job has
exactly one run row, the runs sent are exactly the runs executed (each once), and at no
moment did more runs of a job execute than its policy allows.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from taskiq_beat import IntervalTrigger, PeriodicSchedule, RunStatus, SchedulerApp, SchedulerRun
from tests.e2e.lifecycle import app as worker_app
from tests.e2e.test_lifecycle_workers import deployment, executions, runs
from tests.processes import redis_url_or_skip, wait_until

pytestmark = pytest.mark.slow

TASK_SECONDS = 2.5
FIRING_SECONDS = 9.0
LIMITS = {"skip": 1, "buffer": 1, "two": 2}
_UNSENT = (RunStatus.SKIPPED, RunStatus.WAITING, RunStatus.MISSED)
_GOING = (RunStatus.CLAIMED, RunStatus.DISPATCHED, RunStatus.RUNNING)


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals that overlap at one instant (an end before a start at a tie)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    going = most = 0
    for _, step in events:
        going += step
        most = max(most, going)
    return most


async def test_overlap_policies_hold_with_two_schedulers_and_real_workers(
    postgres_url: str, tmp_path: Path
) -> None:
    async with deployment(postgres_url, tmp_path) as (app, engine, redis, workers, start):
        await asyncio.gather(start(), start())
        second_broker = worker_app.make_broker(
            redis_url_or_skip(),
            app.broker.queue_name,  # type: ignore[attr-defined]
        )
        second_broker.register_task(lambda: None, task_name="lifecycle.slow")
        second = SchedulerApp(
            broker=second_broker,
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
            config=worker_app.CONFIG,
        )
        await second_broker.startup()
        anchor = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)
        every_second = PeriodicSchedule(interval=IntervalTrigger(seconds=1), start_at=anchor)
        slow = app.single("lifecycle.slow", kwargs={"seconds": TASK_SECONDS})
        async with app.session_factory() as session:
            await slow.policy(overlap="skip").schedule(session, every_second, job_id="skip")
            await slow.policy(overlap="buffer_one").schedule(session, every_second, job_id="buffer")
            await slow.policy(max_running=2).schedule(session, every_second, job_id="two")
        try:
            await asyncio.gather(app.start(), second.start())
            await asyncio.sleep(2 + FIRING_SECONDS)
        finally:
            await asyncio.gather(app.stop(), second.stop())
            await second_broker.shutdown()

        async def settled() -> list[SchedulerRun] | None:
            rows = await runs(engine)
            return None if any(r.status in _GOING for r in rows) else rows

        details = lambda: "\n".join(w.describe() for w in workers)  # noqa: E731
        rows = await wait_until(settled, 60, interval=0.2, details=details, watch=workers)
        executed = Counter(
            e["task_id"] for e in await executions(redis, app) if e["event"] == "start"
        )
        report = []
        for job_id, limit in LIMITS.items():
            mine = sorted((r for r in rows if r.job_id == job_id), key=lambda r: r.scheduled_for)
            times = [r.scheduled_for for r in mine]
            # Every fire from the first to the last has one row: nothing lost, nothing doubled.
            assert times == [times[0] + timedelta(seconds=n) for n in range(len(times))]
            assert len(times) >= FIRING_SECONDS - 2
            sent = [r for r in mine if r.status not in _UNSENT]
            skipped = [r for r in mine if r.status is RunStatus.SKIPPED]
            waiting = [r for r in mine if r.status is RunStatus.WAITING]
            assert all(r.status is RunStatus.SUCCEEDED for r in sent), [r.status for r in sent]
            # The runs sent are the runs executed, each once.
            assert {r.task_id: 1 for r in sent} == {
                t: n for t, n in executed.items() if t in {r.task_id for r in mine}
            }
            spans = [(r.started_at, r.finished_at) for r in sent]
            assert most_at_once(spans) <= limit  # type: ignore[arg-type]
            assert skipped  # the task is slower than its interval
            if job_id == "skip":
                assert not waiting
            assert len(waiting) <= 1
            report.append(
                f"{job_id}: {len(mine)} fires, {len(sent)} sent and executed,"
                f" {len(skipped)} skipped, {len(waiting)} waiting,"
                f" at most {most_at_once(spans)} at once"  # type: ignore[arg-type]
            )
        # max_running=2 lets twice as many go as skip's one (within a fire).
        two = sum(1 for r in rows if r.job_id == "two" and r.status is RunStatus.SUCCEEDED)
        one = sum(1 for r in rows if r.job_id == "skip" and r.status is RunStatus.SUCCEEDED)
        assert two > one
        print("\n" + "\n".join(report))
