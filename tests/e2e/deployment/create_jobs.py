"""A client process of the deployment: creates the test's jobs through the public API.

``python -m tests.e2e.deployment.create_jobs`` (with the app's environment) creates an
interval job, a cron job with seconds, a one-off job and a one-off 3-step chain, then prints
the created jobs as one JSON object (job id -> ``SchedulerJob.to_dict()``) on stdout. It does
not start the scheduler: the scheduler process picks the jobs up at its next sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from taskiq_beat import (
    ChainStep,
    CrontabTrigger,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
)
from tests.e2e.deployment import names
from tests.e2e.deployment.app import engine, record, scheduler_app, step_a, step_b, step_c


async def create_jobs() -> dict[str, Any]:
    app = scheduler_app
    now = datetime.now(timezone.utc)
    created = []
    try:
        async with app.session_factory() as session:
            created.append(
                await app.single(record, kwargs={"kind": "interval"}).schedule(
                    session,
                    trigger=PeriodicSchedule(
                        interval=IntervalTrigger(seconds=names.INTERVAL_SECONDS)
                    ),
                    job_id=names.INTERVAL_JOB,
                    name="every second",
                )
            )
            created.append(
                await app.single(record, kwargs={"kind": "cron"}).schedule(
                    session,
                    trigger=PeriodicSchedule(crontab=CrontabTrigger(second=names.CRON_SECONDS)),
                    job_id=names.CRON_JOB,
                    name="even seconds",
                )
            )
            created.append(
                await app.single(record, kwargs={"kind": "one_off"}).schedule(
                    session,
                    trigger=OneOffSchedule(
                        run_at=now + timedelta(seconds=names.ONE_OFF_DELAY_SECONDS)
                    ),
                    job_id=names.ONE_OFF_JOB,
                    name="once",
                )
            )
            created.append(
                await app.chain(
                    steps=[
                        ChainStep(task=step_a, kwargs={"position": 1}),
                        ChainStep(task=step_b, kwargs={"position": 2}),
                        ChainStep(task=step_c.task_name, kwargs={"position": 3}),
                    ],
                    default_step_timeout_seconds=20.0,
                    wait_poll_interval_seconds=0.05,
                ).schedule(
                    session,
                    trigger=OneOffSchedule(
                        run_at=now + timedelta(seconds=names.CHAIN_DELAY_SECONDS)
                    ),
                    job_id=names.CHAIN_JOB,
                    name="three steps",
                )
            )
    finally:
        await engine.dispose()
    return {job.id: job.to_dict() for job in created}


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    jobs = asyncio.run(create_jobs())
    sys.stdout.write(json.dumps(jobs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
