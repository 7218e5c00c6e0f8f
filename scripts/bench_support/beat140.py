"""The same scenarios on taskiq-beat 1.4.0 (run by its own Python >= 3.12 interpreter).

``bench.py`` runs this module with the interpreter of ``.bench-venvs/taskiq-beat-1.4.0``,
where ``import taskiq_beat`` is the 1.4.0 release from PyPI (the repository root is not on
``sys.path`` there: only ``scripts/`` is). Its public API: ``SchedulerApp``, ``single(task=...)
.upsert(...)``, ``start()``/``stop()``, ``SchedulerConfig``.

1.4.0 has no bulk API and writes 225-1,000 jobs/s, so the non-bulk scenarios load their jobs
by copying one job row made through its API with SQLAlchemy Core. Its messages carry no
scheduled time, so lateness is read from its run rows (``dispatched_at - scheduled_for``,
``dispatched_at`` being taken just before ``kiq``).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from taskiq import AsyncBroker

import taskiq_beat  # taskiq-beat 1.4.0
from bench_support import apps, scenarios
from bench_support.brokers import make_broker
from bench_support.common import TASK_NAME, Options, epoch, job_id, percentiles
from bench_support.scenarios import fires_in_window, interval_result
from taskiq_beat import OneOffSchedule, SchedulerApp, SchedulerBase, SchedulerConfig
from taskiq_beat.models import SchedulerJob, SchedulerRun

SYSTEM = "beat140"
SETUP_KIND = {
    "burst": "due",
    "execute": "due",
    "interval": "every-second",
    "idle": "hourly",
    "propagation": "hourly",
}


def _version() -> str:
    from importlib.metadata import version

    return f"taskiq-beat {version('taskiq-beat')}"


def _trigger(kind: str) -> Any:
    return apps.trigger(kind, taskiq_beat)


def _config(opts: Options) -> Any:
    fields = {field.name for field in dataclasses.fields(SchedulerConfig)}
    known = {key: value for key, value in opts.config.items() if key in fields}
    return SchedulerConfig(**{"record_runs": True, **known})


def _app(opts: Options, broker: AsyncBroker) -> tuple[AsyncEngine, Any]:
    return apps.make_app(SchedulerApp, _config(opts), opts, broker)


async def setup(opts: Options) -> dict[str, Any]:
    async def load(kind: str, engine: AsyncEngine, app: Any) -> str:
        async with app.session_factory() as session:
            task = app.broker.find_task(TASK_NAME)
            await app.single(task=task, args=[0]).upsert(
                session, trigger=_trigger(kind), job_id=job_id(0)
            )
        await apps.copy_rows(engine, SchedulerJob.__table__, opts.jobs, "task_args")
        return "rows copied with SQLAlchemy Core (1.4.0 has no bulk API)"

    return await apps.setup(opts, SchedulerBase.metadata, SETUP_KIND, _app, load)


DISPATCHED = sa.select(sa.func.count(), sa.func.max(SchedulerRun.finished_at)).where(
    SchedulerRun.status == "dispatched"
)
"""How many run rows are ``dispatched``, and the latest ``finished_at``."""


async def measure(opts: Options) -> dict[str, Any]:
    # Every send is followed by its run row, but 1.4.0's stop() cancels a batch in flight.
    runs = apps.shared_scenarios(_app, _config, DISPATCHED, by_sends_when_partial=True)
    runs.update({"interval": _interval, "bulk": _bulk})
    return await scenarios.measure(opts, SYSTEM, runs, _version)


async def _interval(opts: Options) -> dict[str, Any]:
    run = await apps.interval(opts, _app)
    async with run.engine.connect() as connection:
        result = await connection.execute(
            sa.select(
                SchedulerRun.job_id, SchedulerRun.scheduled_for, SchedulerRun.dispatched_at
            ).where(SchedulerRun.status == "dispatched")
        )
        runs = result.all()
    await run.engine.dispose()
    seen, lateness = fires_in_window(
        (
            (job, epoch(scheduled_for), epoch(dispatched_at))
            for job, scheduled_for, dispatched_at in runs
            if dispatched_at is not None
        ),
        run.first,
        run.end,
    )
    return interval_result(
        opts,
        seen,
        lateness,
        rows=len(seen),
        busy=run.busy,
        dist_what="lateness: dispatched_at - scheduled_for of its run rows [ms]",
        sent=run.broker.goal.count,
    )


async def _bulk(opts: Options) -> dict[str, Any]:
    """No bulk API in 1.4.0: ``.upsert()`` one by one (one commit each), new then existing."""
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    task = broker.find_task(TASK_NAME)
    trigger = _trigger("hourly")
    jobs = min(opts.jobs, 2000)
    durations: list[float] = []
    for kwargs in ({}, {"v": 2}):
        began = time.perf_counter()
        for index in range(jobs):
            async with app.session_factory() as session:
                await app.single(task=task, args=[index], kwargs=kwargs).upsert(
                    session, trigger=trigger, job_id=job_id(index)
                )
        durations.append(time.perf_counter() - began)
    await engine.dispose()
    return {
        "rate": jobs / durations[0],
        "update_rate": jobs / durations[1],
        "single_rate": jobs / durations[0],
        "stored": jobs,
        "dist": percentiles([]),
        "dist_what": "",
        "note": f".upsert() one by one, {jobs} jobs (no bulk API)",
    }


async def writer(opts: Options) -> dict[str, Any]:
    return await apps.writer(opts, _app, _make_due)


async def _make_due(app: Any, session: Any, index: int, now: datetime) -> None:
    task = app.broker.find_task(TASK_NAME)
    await app.single(task=task, args=[index], kwargs={"t": now.timestamp()}).upsert(
        session, trigger=OneOffSchedule(run_at=now), job_id=job_id(index)
    )
