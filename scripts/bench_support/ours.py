"""The scenarios on this repository's taskiq-beat, through its public API only.

Jobs are written with ``builder.definition(...)`` + ``SchedulerApp.upsert_many()`` (or, for
very large setups of the non-bulk scenarios, by copying one job row made through the API
with SQLAlchemy Core: ``--setup clone``); the scheduler runs with ``start()``/``stop()``; the
results are read from the broker (send time, labels) and from the run table.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
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
    now = datetime.now(UTC)
    if kind == "due":
        return OneOffSchedule(run_at=now - timedelta(seconds=1))
    if kind == "every-second":
        # On the grid of whole seconds: fires at start_at + n s.
        return PeriodicSchedule(
            interval=IntervalTrigger(seconds=1), start_at=now.replace(microsecond=0)
        )
    if kind == "hourly":
        return PeriodicSchedule(interval=IntervalTrigger(hours=1))
    raise ValueError(kind)


def _config(opts: Options) -> SchedulerConfig:
    return SchedulerConfig(**{"record_runs": True, **opts.config})


def _app(opts: Options, broker: AsyncBroker) -> tuple[AsyncEngine, SchedulerApp]:
    engine = create_async_engine(opts.url)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    app = SchedulerApp(broker=broker, session_factory=session_factory, config=_config(opts))
    return engine, app


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
    async with engine.connect() as connection:
        result = await connection.execute(sa.select(table).where(table.c.id == job_id(0)))
        template = dict(result.mappings().one())
    for low in range(1, jobs, 5000):
        rows = [
            {**template, "id": job_id(index), "args": [index]}
            for index in range(low, min(jobs, low + 5000))
        ]
        async with engine.begin() as connection:
            await connection.execute(table.insert(), rows)


async def setup(opts: Options) -> dict[str, Any]:
    """Create the tables and load the jobs of the scenario (in a process of its own)."""
    engine = create_async_engine(opts.url)
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    await engine.dispose()
    kind = SETUP_KIND.get(opts.scenario)
    if kind is None:
        return {}
    method = opts.setup
    if method == "auto":
        method = "clone" if opts.jobs > CLONE_ABOVE else "api"
    if kind == "every-second-spread":
        method = "api"  # copies of one row would share its phase
    engine, app = _app(opts, make_broker("noop"))
    began = time.perf_counter()
    if method == "api":
        await upsert_chunks(app, _triggers(kind, opts.jobs), opts.jobs, opts.chunk)
    else:
        await clone_rows(app, engine, _trigger(kind), opts.jobs)
    elapsed = time.perf_counter() - began
    await engine.dispose()
    return {
        "setup": "upsert_many" if method == "api" else "rows copied with SQLAlchemy Core",
        "setup_s": elapsed,
        "setup_rate": opts.jobs / elapsed,
    }


async def _dispatched(engine: AsyncEngine) -> tuple[int, float | None]:
    """How many run rows are ``dispatched``, and the latest ``dispatched_at`` (epoch)."""
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.select(sa.func.count(), sa.func.max(SchedulerRun.dispatched_at)).where(
                SchedulerRun.status == RunStatus.DISPATCHED
            )
        )
        count, latest = result.one()
    return int(count), (None if latest is None else epoch(latest))


async def _wait_rows(engine: AsyncEngine, expected: int, timeout: float) -> tuple[int, float]:
    """Poll the run table until ``expected`` rows are dispatched; return count and end time."""
    deadline = time.time() + timeout
    while True:
        count, latest = await _dispatched(engine)
        if count >= expected or time.time() > deadline:
            return count, latest if latest is not None else time.time()
        await asyncio.sleep(0.02)


async def measure(opts: Options) -> dict[str, Any]:
    scenario = opts.scenario
    with Profiled(opts.profile) as profiled:
        if scenario in ("burst", "execute"):
            result = await _burst(opts, "noop" if scenario == "burst" else "inmemory")
        elif scenario in ("interval", "interval-spread"):
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


async def _burst(opts: Options, broker_kind: str) -> dict[str, Any]:
    """All jobs due at ``start()``: time until every fire is sent (and executed) and recorded."""
    executed = Goal()
    broker = make_broker(broker_kind, executed)
    goal = broker.goal if isinstance(broker, NoopBroker) else executed
    engine, app = _app(opts, broker)
    await broker.startup()
    began = time.time()
    await app.start()
    started = time.time()
    complete = await goal.wait(opts.jobs, opts.max_wait - (started - began))
    # Every send is followed by its run row: wait for the last ones to be committed.
    rows, last_row = await _wait_rows(engine, goal.count, 30 if complete else 2)
    await app.stop()
    await broker.shutdown()
    await engine.dispose()
    end = max(last_row, goal.last or began)
    elapsed = end - began
    times = [at - began for at, _ in broker.kicks] if isinstance(broker, NoopBroker) else []
    return {
        "rate": rows / elapsed if elapsed > 0 else 0.0,
        "fires": goal.count,
        "rows": rows,
        "elapsed_s": elapsed,
        "start_s": started - began,
        "partial": not complete,
        "dist": percentiles(times),
        "dist_what": "send time after start() [s]" if times else "",
    }


async def _interval(opts: Options) -> dict[str, Any]:
    """Jobs every second for ``seconds``: fires sent of those due, and their lateness."""
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    await broker.startup()
    await app.start()
    first = float(math.ceil(time.time() + 0.3))  # the first whole second after 0.3 s
    end = first + opts.seconds
    # CPU over the window and a grace period after it, for late fires.
    busy = await cpu_percent(end + grace(opts.seconds) - time.time())
    await app.stop()
    await broker.shutdown()
    lateness: list[float] = []
    seen: set[tuple[str, float]] = set()
    for at, labels in broker.kicks:
        scheduled = epoch(labels[SCHEDULED_FOR_LABEL])
        if first <= scheduled < end:
            seen.add((labels["taskiq_beat_job_id"], scheduled))
            lateness.append((at - scheduled) * 1000)
    async with engine.connect() as connection:
        rows = await connection.scalar(
            sa.select(sa.func.count()).where(
                SchedulerRun.status == RunStatus.DISPATCHED,
                SchedulerRun.scheduled_for >= datetime.fromtimestamp(first, UTC),
                SchedulerRun.scheduled_for < datetime.fromtimestamp(end, UTC),
            )
        )
    await engine.dispose()
    due = opts.jobs * round(opts.seconds)
    return {
        "done": len(seen),
        "due": due,
        "pct": 100 * len(seen) / due if due else 0.0,
        "rows": rows,
        "cpu_pct": busy,
        "dist": percentiles(lateness),
        "dist_what": "lateness: send - scheduled [ms]",
    }


async def _idle(opts: Options) -> dict[str, Any]:
    """Jobs due in an hour: start() time, memory, CPU and event-loop stalls while idle."""
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
    await asyncio.sleep(warmup(opts.seconds))  # let the first syncs after start() pass
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


async def _propagation(opts: Options) -> dict[str, Any]:
    """Another process changes jobs to "due now": time until this scheduler sends them."""
    broker = make_broker("noop", keep_messages=True)
    engine, app = _app(opts, broker)
    await broker.startup()
    await app.start()
    await asyncio.sleep(warmup(opts.seconds))
    count = max(3, round(opts.seconds / opts.spacing))
    writer = await asyncio.create_subprocess_exec(
        *_writer_command(opts, count),
        stdout=asyncio.subprocess.PIPE,
    )
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


def _writer_command(opts: Options, count: int) -> list[str]:
    command = [sys.executable, opts.bench_path, "_run", "propagation"]
    command += ["--system", opts.system, "--phase", "writer", "--db", opts.db, "--url", opts.url]
    command += ["--jobs", str(count), "--spacing", str(opts.spacing)]
    return command


async def writer(opts: Options) -> dict[str, Any]:
    """The other process: makes ``jobs`` existing jobs due now, one ``.upsert()`` each."""
    broker = make_broker("noop")
    engine, app = _app(opts, broker)
    for index in range(opts.jobs):
        async with _sessions(app)() as session:
            now = datetime.now(UTC)
            await app.single(TASK_NAME, args=[index], kwargs={"t": now.timestamp()}).upsert(
                session, trigger=OneOffSchedule(run_at=now), job_id=job_id(index)
            )
        await asyncio.sleep(opts.spacing * (0.5 + (index * 7919 % 100) / 100))
    await engine.dispose()
    return {"sent": opts.jobs, "pid": os.getpid()}
