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

import asyncio
import dataclasses
import math
import sys
import time
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from taskiq import AsyncBroker

from bench_support.brokers import NoopBroker, make_broker
from bench_support.common import (
    TASK_NAME,
    UTC,
    Goal,
    Options,
    Profiled,
    StallMonitor,
    cpu_percent,
    epoch,
    grace,
    job_id,
    load_average,
    peak_rss_mb,
    percentiles,
    rss_mb,
    warmup,
)
from taskiq_beat import (  # taskiq-beat 1.4.0
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
)
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
    now = datetime.now(UTC)
    if kind == "due":
        return OneOffSchedule(run_at=now - timedelta(seconds=1))
    if kind == "every-second":
        return PeriodicSchedule(
            interval=IntervalTrigger(seconds=1), start_at=now.replace(microsecond=0)
        )
    if kind == "hourly":
        return PeriodicSchedule(interval=IntervalTrigger(hours=1))
    raise ValueError(kind)


def _config(opts: Options) -> Any:
    fields = {field.name for field in dataclasses.fields(SchedulerConfig)}
    known = {key: value for key, value in opts.config.items() if key in fields}
    return SchedulerConfig(**{"record_runs": True, **known})


def _app(opts: Options, broker: AsyncBroker) -> tuple[AsyncEngine, Any]:
    engine = create_async_engine(opts.url)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=_config(opts))
    return engine, app


async def setup(opts: Options) -> dict[str, Any]:
    engine = create_async_engine(opts.url)
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    await engine.dispose()
    kind = SETUP_KIND.get(opts.scenario)
    if kind is None:
        return {}
    engine, app = _app(opts, make_broker("noop"))
    began = time.perf_counter()
    async with app.session_factory() as session:
        task = app.broker.find_task(TASK_NAME)
        await app.single(task=task, args=[0]).upsert(
            session, trigger=_trigger(kind), job_id=job_id(0)
        )
    table = SchedulerJob.__table__
    async with engine.connect() as connection:
        result = await connection.execute(sa.select(table).where(table.c.id == job_id(0)))
        template = dict(result.mappings().one())
    for low in range(1, opts.jobs, 5000):
        rows = [
            {**template, "id": job_id(index), "task_args": [index]}
            for index in range(low, min(opts.jobs, low + 5000))
        ]
        async with engine.begin() as connection:
            await connection.execute(table.insert(), rows)
    elapsed = time.perf_counter() - began
    await engine.dispose()
    return {
        "setup": "rows copied with SQLAlchemy Core (1.4.0 has no bulk API)",
        "setup_s": elapsed,
        "setup_rate": opts.jobs / elapsed,
    }


async def measure(opts: Options) -> dict[str, Any]:
    scenario = opts.scenario
    with Profiled(opts.profile) as profiled:
        if scenario in ("burst", "execute"):
            result = await _burst(opts, "noop" if scenario == "burst" else "inmemory")
        elif scenario == "interval":
            result = await _interval(opts)
        elif scenario == "idle":
            result = await _idle(opts)
        elif scenario == "bulk":
            result = await _bulk(opts)
        elif scenario == "propagation":
            result = await _propagation(opts)
        else:
            raise SystemExit(f"scenario {scenario!r} is not run on {SYSTEM}")
    if profiled.breakdown:
        result["profile"] = profiled.breakdown
        result["profile_detail"] = dict(list(profiled.detail.items())[:12])
    result["version"] = _version()
    return result


async def _wait_rows(engine: AsyncEngine, expected: int, timeout: float) -> tuple[int, float]:
    deadline = time.time() + timeout
    while True:
        async with engine.connect() as connection:
            result = await connection.execute(
                sa.select(sa.func.count(), sa.func.max(SchedulerRun.finished_at)).where(
                    SchedulerRun.status == "dispatched"
                )
            )
            count, latest = result.one()
        if count >= expected or time.time() > deadline:
            return int(count), (epoch(latest) if latest is not None else time.time())
        await asyncio.sleep(0.02)


async def _burst(opts: Options, broker_kind: str) -> dict[str, Any]:
    executed = Goal()
    broker = make_broker(broker_kind, executed)
    goal = broker.goal if isinstance(broker, NoopBroker) else executed
    engine, app = _app(opts, broker)
    await broker.startup()
    began = time.time()
    await app.start()
    started = time.time()
    complete = await goal.wait(opts.jobs, max(1.0, opts.max_wait - (started - began)))
    # Every send is followed by its run row (1.4.0's stop() cancels a batch in flight).
    rows, last_row = await _wait_rows(engine, goal.count, 30 if complete else 2)
    await app.stop()
    await broker.shutdown()
    await engine.dispose()
    end = max(last_row, goal.last or began) if complete else (goal.last or time.time())
    elapsed = end - began
    times = [at - began for at, _ in broker.kicks] if isinstance(broker, NoopBroker) else []
    return {
        "rate": (rows if complete else goal.count) / elapsed if elapsed > 0 else 0.0,
        "fires": goal.count,
        "rows": rows,
        "elapsed_s": elapsed,
        "start_s": started - began,
        "partial": not complete,
        "dist": percentiles(times),
        "dist_what": "send time after start() [s]" if times else "",
    }


async def _interval(opts: Options) -> dict[str, Any]:
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    await broker.startup()
    await app.start()
    first = float(math.ceil(time.time() + 0.3))  # the first whole second after 0.3 s
    end = first + opts.seconds
    busy = await cpu_percent(end + grace(opts.seconds) - time.time())
    await app.stop()
    await broker.shutdown()
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.select(
                SchedulerRun.job_id, SchedulerRun.scheduled_for, SchedulerRun.dispatched_at
            ).where(SchedulerRun.status == "dispatched")
        )
        runs = result.all()
    await engine.dispose()
    lateness: list[float] = []
    seen: set[tuple[str, float]] = set()
    for job, scheduled_for, dispatched_at in runs:
        scheduled = epoch(scheduled_for)
        if first <= scheduled < end and dispatched_at is not None:
            seen.add((job, scheduled))
            lateness.append((epoch(dispatched_at) - scheduled) * 1000)
    due = opts.jobs * round(opts.seconds)
    return {
        "done": len(seen),
        "due": due,
        "pct": 100 * len(seen) / due if due else 0.0,
        "rows": len(seen),
        "sent": broker.goal.count,
        "cpu_pct": busy,
        "dist": percentiles(lateness),
        "dist_what": "lateness: dispatched_at - scheduled_for of its run rows [ms]",
    }


async def _idle(opts: Options) -> dict[str, Any]:
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    await broker.startup()
    base = rss_mb()
    monitor = StallMonitor()
    monitor.start()
    began = time.perf_counter()
    await app.start()
    start_s = time.perf_counter() - began
    start_stall = max(await monitor.stop(), default=0.0)
    loaded = rss_mb()
    await asyncio.sleep(warmup(opts.seconds))
    half = max(opts.seconds / 2, 0.5)
    busy = await cpu_percent(half)
    monitor.start()
    await asyncio.sleep(half)
    stalls = await monitor.stop()
    idle = rss_mb()
    await app.stop()
    await broker.shutdown()
    await engine.dispose()
    return {
        "start_s": start_s,
        "rss_base_mb": base,
        "rss_loaded_mb": loaded,
        "rss_mb": idle,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_pct": busy,
        "start_stall_ms": start_stall * 1000,
        "dist": percentiles([s * 1000 for s in stalls]),
        "dist_what": "event-loop stall while idle [ms]",
        "stall_cpu_ms": 1000 * monitor.cpu_of_longest(),
        "load": load_average(),
    }


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


async def _propagation(opts: Options) -> dict[str, Any]:
    broker = make_broker("noop", keep_messages=True)
    engine, app = _app(opts, broker)
    await broker.startup()
    await app.start()
    await asyncio.sleep(warmup(opts.seconds))
    count = max(3, round(opts.seconds / opts.spacing))
    command = [sys.executable, opts.bench_path, "_run", "propagation", "--system", SYSTEM]
    command += ["--phase", "writer", "--db", opts.db, "--url", opts.url, "--jobs", str(count)]
    command += ["--spacing", str(opts.spacing)]
    writer = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    await writer.communicate()
    await broker.goal.wait(count, _config(opts).sync_interval_seconds * 3 + 3)
    await app.stop()
    await broker.shutdown()
    await engine.dispose()
    latency = [(at - kwargs["t"]) * 1000 for at, kwargs in broker.sent_kwargs() if "t" in kwargs]
    return {
        "seen": len(latency),
        "sent": count,
        "sync_interval_s": _config(opts).sync_interval_seconds,
        "dist": percentiles(latency),
        "dist_what": "change committed elsewhere -> sent here [ms]",
    }


async def writer(opts: Options) -> dict[str, Any]:
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    task = broker.find_task(TASK_NAME)
    for index in range(opts.jobs):
        async with app.session_factory() as session:
            now = datetime.now(UTC)
            await app.single(task=task, args=[index], kwargs={"t": now.timestamp()}).upsert(
                session, trigger=OneOffSchedule(run_at=now), job_id=job_id(index)
            )
        await asyncio.sleep(opts.spacing * (0.5 + (index * 7919 % 100) / 100))
    await engine.dispose()
    return {"sent": opts.jobs}
