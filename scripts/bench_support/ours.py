"""The scenarios on this repository's taskiq-beat, through its public API only.

Jobs are written with ``builder.definition(...)`` + ``SchedulerApp.upsert_many()`` (or, for
very large setups of the non-bulk scenarios, by copying one job row made through the API
with SQLAlchemy Core: ``--setup clone``); the scheduler runs with ``start()``/``stop()``; the
results are read from the broker (send time, labels) and from the run table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from taskiq import AsyncBroker

import taskiq_beat
from bench_support import apps, scenarios
from bench_support.brokers import make_broker
from bench_support.common import TASK_NAME, UTC, Options, epoch, job_id, percentiles
from bench_support.scenarios import fires_in_window, interval_result
from taskiq_beat import (
    SCHEDULED_FOR_LABEL,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
    Trigger,
)

SYSTEM = "ours"
CLONE_ABOVE = 200_000
"""``--setup auto`` copies rows with SQLAlchemy Core above this many jobs (non-bulk only)."""

SETUP_KIND = {
    "burst": "due",
    "execute": "due",
    "interval": "every-second",
    "interval-spread": "every-second-spread",
    "idle": "hourly",
    "propagation": "hourly",
}


def _version() -> str:
    from importlib.metadata import version

    return f"taskiq-beat {version('taskiq-beat')} (this repo)"


def _triggers(kind: str, jobs: int) -> Callable[[int], Trigger]:
    """The trigger of job ``index``: the same for all, except for ``every-second-spread``,
    whose jobs start ``index / jobs`` s apart (phases spread evenly over the second)."""
    if kind != "every-second-spread":
        trigger = _trigger(kind)
        return lambda index: trigger
    base = datetime.now(UTC).replace(microsecond=0)
    return lambda index: PeriodicSchedule(
        interval=IntervalTrigger(seconds=1),
        start_at=base + timedelta(microseconds=1_000_000 * index // jobs),
    )


def _trigger(kind: str) -> Trigger:
    return cast(Trigger, apps.trigger(kind, taskiq_beat))


def _config(opts: Options) -> SchedulerConfig:
    return SchedulerConfig(**{"record_runs": True, **opts.config})


def _app(opts: Options, broker: AsyncBroker) -> tuple[AsyncEngine, SchedulerApp]:
    return apps.make_app(SchedulerApp, _config(opts), opts, broker)


def _sessions(app: SchedulerApp) -> async_sessionmaker[AsyncSession]:
    return app.session_factory


async def upsert_chunks(
    app: SchedulerApp,
    trigger: Trigger | Callable[[int], Trigger],
    jobs: int,
    chunk: int,
    *,
    kwargs: dict[str, Any] | None = None,
) -> list[float]:
    """Write ``jobs`` jobs with ``upsert_many``, ``chunk`` per call; return each call's time.

    ``trigger`` is one trigger for all, or a function of the job's index."""
    trigger_of = trigger if callable(trigger) else (lambda index: trigger)
    durations: list[float] = []
    for low in range(0, jobs, chunk):
        began = time.perf_counter()
        definitions = [
            app.single(TASK_NAME, args=[index], kwargs=kwargs).definition(
                trigger=trigger_of(index), job_id=job_id(index)
            )
            for index in range(low, min(jobs, low + chunk))
        ]
        async with _sessions(app)() as session:
            await app.upsert_many(session, definitions)
        durations.append(time.perf_counter() - began)
    return durations


async def clone_rows(app: SchedulerApp, engine: AsyncEngine, trigger: Trigger, jobs: int) -> None:
    """Make job 0 through the API, then copy its row ``jobs - 1`` times with SQLAlchemy Core."""
    async with _sessions(app)() as session:
        await app.single(TASK_NAME, args=[0]).upsert(session, trigger=trigger, job_id=job_id(0))
    table = SchedulerJob.__table__
    assert isinstance(table, sa.Table)
    await apps.copy_rows(engine, table, jobs, "args")


async def setup(opts: Options) -> dict[str, Any]:
    """Create the tables and load the jobs of the scenario (in a process of its own)."""

    async def load(kind: str, engine: AsyncEngine, app: SchedulerApp) -> str:
        method = opts.setup
        if method == "auto":
            method = "clone" if opts.jobs > CLONE_ABOVE else "api"
        if kind == "every-second-spread":
            method = "api"  # copies of one row would share its phase
        if method == "api":
            await upsert_chunks(app, _triggers(kind, opts.jobs), opts.jobs, opts.chunk)
            return "upsert_many"
        await clone_rows(app, engine, _trigger(kind), opts.jobs)
        return "rows copied with SQLAlchemy Core"

    return await apps.setup(opts, SchedulerBase.metadata, SETUP_KIND, _app, load)


SENT = sa.or_(
    SchedulerRun.status.in_([RunStatus.DISPATCHED, RunStatus.RUNNING, RunStatus.SUCCEEDED]),
    sa.and_(SchedulerRun.status == RunStatus.FAILED, SchedulerRun.finished_at.is_not(None)),
)
"""A run row that was sent: ``dispatched``, or moved on by a worker's lifecycle (which may
start it before the scheduler records the send: its ``dispatched_at`` then stays empty)."""
DISPATCHED = sa.select(
    sa.func.count(),
    sa.func.max(sa.func.coalesce(SchedulerRun.dispatched_at, SchedulerRun.started_at)),
).where(SENT)
"""How many run rows were sent, and the latest time one was (sent or started)."""


async def measure(opts: Options) -> dict[str, Any]:
    runs = apps.shared_scenarios(_app, _config, DISPATCHED)
    runs.update({"interval": _interval, "interval-spread": _interval, "bulk": _bulk})
    return await scenarios.measure(opts, SYSTEM, runs, _version)


async def _interval(opts: Options) -> dict[str, Any]:
    """Jobs every second for ``seconds``: fires sent of those due, and their lateness."""
    run = await apps.interval(opts, _app)
    steady: list[float] = []
    seen, lateness = fires_in_window(
        (
            (labels["taskiq_beat_job_id"], epoch(labels[SCHEDULED_FOR_LABEL]), at)
            for at, labels in run.broker.kicks
        ),
        run.first,
        run.end,
        steady,
    )
    async with run.engine.connect() as connection:
        rows = await connection.scalar(
            sa.select(sa.func.count()).where(
                SENT,
                SchedulerRun.scheduled_for >= datetime.fromtimestamp(run.first, UTC),
                SchedulerRun.scheduled_for < datetime.fromtimestamp(run.end, UTC),
            )
        )
    await run.engine.dispose()
    return interval_result(
        opts,
        seen,
        lateness,
        rows=rows,
        busy=run.busy,
        dist_what="lateness: send - scheduled [ms]",
        steady=steady,
        window=[run.first, run.end],
    )


async def _idle(opts: Options) -> dict[str, Any]:
    return await apps.idle(opts, _app)


async def _bulk(opts: Options) -> dict[str, Any]:
    """``upsert_many`` of new jobs, then of the same jobs again (updates); ``.upsert()`` alone."""
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    trigger = _trigger("hourly")
    began = time.perf_counter()
    created = await upsert_chunks(app, trigger, opts.jobs, opts.chunk)
    create_s = time.perf_counter() - began
    began = time.perf_counter()
    updated = await upsert_chunks(app, trigger, opts.jobs, opts.chunk, kwargs={"v": 2})
    update_s = time.perf_counter() - began
    singles = min(opts.jobs, 1000)
    began = time.perf_counter()
    for index in range(opts.jobs, opts.jobs + singles):
        async with _sessions(app)() as session:
            await app.single(TASK_NAME, args=[index]).upsert(
                session, trigger=trigger, job_id=job_id(index)
            )
    single_s = time.perf_counter() - began
    async with engine.connect() as connection:
        stored = await connection.scalar(sa.select(sa.func.count()).select_from(SchedulerJob))
    await engine.dispose()
    return {
        "rate": opts.jobs / create_s,
        "update_rate": opts.jobs / update_s,
        "single_rate": singles / single_s,
        "stored": stored,
        "chunk": opts.chunk,
        "dist": percentiles(created + updated),
        "dist_what": f"one upsert_many() of {min(opts.chunk, opts.jobs)} jobs [s]",
    }


async def writer(opts: Options) -> dict[str, Any]:
    """The other process: makes ``jobs`` existing jobs due now, one ``.upsert()`` each."""
    return {**await apps.writer(opts, _app, _make_due), "pid": os.getpid()}


async def _make_due(app: SchedulerApp, session: AsyncSession, index: int, now: datetime) -> None:
    await app.single(TASK_NAME, args=[index], kwargs={"t": now.timestamp()}).upsert(
        session, trigger=OneOffSchedule(run_at=now), job_id=job_id(index)
    )
