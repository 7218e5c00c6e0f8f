"""Durable chains with real ``taskiq worker`` processes on a real Redis stream broker.

The deployment of :mod:`tests.e2e.test_lifecycle_workers`: workers importing
:mod:`tests.e2e.lifecycle.app` (its ``SchedulerApp`` adds the lifecycle middleware), this
process running the scheduler (whose housekeeping is the chains' watchdog). Each worker has
a single slot (``--max-async-tasks 1``): a chain that held a slot while its steps ran could
never finish there.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from taskiq_beat import ChainStep, RunStatus
from taskiq_beat.enums import StepStatus
from taskiq_beat.models import SchedulerChainStep
from tests.e2e.lifecycle import app as worker_app
from tests.e2e.test_lifecycle_workers import deployment, executions, lifecycle_database
from tests.processes import wait_until

pytestmark = pytest.mark.slow

__all__ = ["lifecycle_database"]  # the fixture, shared

STEP = "lifecycle.chain_step"


async def step_rows(engine: AsyncEngine) -> list[SchedulerChainStep]:
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        rows = await session.execute(sa.select(SchedulerChainStep).order_by(SchedulerChainStep.id))
        return list(rows.scalars())


def counted(events: list[dict[str, Any]], event: str) -> Counter[str]:
    return Counter(e["name"] for e in events if e["event"] == event and "name" in e)


async def test_a_chain_resumes_after_its_worker_is_killed_mid_step(
    lifecycle_database: str, tmp_path: Path
) -> None:
    async with deployment(lifecycle_database, tmp_path) as (app, engine, redis, workers, start):
        doomed = await start("--max-async-tasks", "1")
        await app.start()  # the scheduler: its housekeeping watches the chains
        handle = await app.chain(
            steps=[
                ChainStep(task=STEP, kwargs={"name": "first"}),
                ChainStep(task=STEP, kwargs={"name": "second", "hang_once": True}),
                ChainStep(task=STEP, kwargs={"name": "third"}),
            ],
            wait_poll_interval_seconds=0.1,
        ).start()

        async def second_running() -> SchedulerChainStep | None:
            rows = await step_rows(engine)
            found = [r for r in rows if r.step == 1 and r.status is StepStatus.RUNNING]
            return found[0] if found else None

        hung = await wait_until(second_running, 30, interval=0.05, watch=workers)
        await doomed.kill()
        survivor = await start("--max-async-tasks", "1")

        async def ended() -> bool:
            rows = await step_rows(engine)
            return len(rows) == 3 and rows[-1].status is StepStatus.SUCCEEDED

        details = lambda: "\n".join(w.describe() for w in workers)  # noqa: E731
        await wait_until(ended, 60, interval=0.1, details=details)
        outcome = await handle.wait(60)
        assert outcome.run.status is RunStatus.SUCCEEDED
        rows = outcome.steps
        assert [(r.step, r.attempt, r.status) for r in rows] == [
            (0, 1, StepStatus.SUCCEEDED),
            (1, 1, StepStatus.SUCCEEDED),
            (2, 1, StepStatus.SUCCEEDED),
        ]
        # The unfinished step ran again, with the same task id, on the new worker; the step
        # that had succeeded did not.
        assert rows[1].task_id == hung.task_id
        assert rows[1].executions == 2
        assert rows[1].worker_id not in (None, hung.worker_id)
        assert rows[2].worker_id == rows[1].worker_id
        events = await executions(redis, app)
        assert counted(events, "start") == {"first": 1, "second": 2, "third": 1}
        assert counted(events, "end") == {"first": 1, "second": 1, "third": 1}

        # The stream redelivers the dead worker's message once it is idle long enough (its
        # listener claims such messages after reading new ones): not executed again.
        nudge = app.broker.find_task("lifecycle.ok")
        assert nudge is not None
        for _ in range(3):
            await asyncio.sleep(worker_app.REDELIVER_AFTER_MS / 1000)
            await nudge.kiq(n=0)
        await wait_until(
            lambda: "delivered again" in survivor.output,
            30,
            interval=0.2,
            details=survivor.describe,
        )
        events = await executions(redis, app)
        assert counted(events, "start") == {"first": 1, "second": 2, "third": 1}
        assert [(r.status, r.executions) for r in await step_rows(engine)] == [
            (StepStatus.SUCCEEDED, 1),
            (StepStatus.SUCCEEDED, 2),
            (StepStatus.SUCCEEDED, 1),
        ]
