"""The scenarios run alike on this repository's taskiq-beat and on taskiq-beat 1.4.0.

Both have ``SchedulerApp(broker=..., session_factory=..., config=...)`` with ``start()`` /
``stop()``, a job table and a run table. What differs is passed in by ``ours`` and
``beat140``: ``open_app`` (its ``_app``, made with :func:`make_app`), how job 0 is made,
which column holds a job's args, which run rows count as sent. Imports SQLAlchemy and taskiq,
never ``taskiq_beat``: it runs under both interpreters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from bench_support.brokers import NoopBroker, make_broker
from bench_support.common import (
    UTC,
    Goal,
    Options,
    StallMonitor,
    cpu_percent,
    epoch,
    grace,
    job_id,
    percentiles,
    rss_mb,
    sleep_until,
    warmup,
)
from bench_support.scenarios import (
    Scenario,
    burst_broker,
    idle_window,
    propagate,
    writer_pause,
)

OpenApp = Callable[[Options, Any], tuple[AsyncEngine, Any]]
"""``_app(opts, broker)`` of an adapter: a new engine on ``opts.url`` and an app on it."""


def shared_scenarios(
    open_app: OpenApp,
    config: Callable[[Options], Any],
    sent: sa.Select[Any],
    *,
    by_sends_when_partial: bool = False,
) -> dict[str, Scenario]:
    """The scenarios run alike on both versions: ``burst`` and ``execute`` (see :func:`burst`),
    ``idle``, ``propagation`` (``config(opts)`` gives its sync interval)."""

    async def run_burst(opts: Options) -> dict[str, Any]:
        return await burst(opts, open_app, sent, by_sends_when_partial=by_sends_when_partial)

    async def run_idle(opts: Options) -> dict[str, Any]:
        return await idle(opts, open_app)

    async def run_propagation(opts: Options) -> dict[str, Any]:
        return await propagation(opts, open_app, config(opts).sync_interval_seconds)

    return {
        "burst": run_burst,
        "execute": run_burst,
        "idle": run_idle,
        "propagation": run_propagation,
    }


def make_app(app_class: Any, config: Any, opts: Options, broker: Any) -> tuple[AsyncEngine, Any]:
    """``app_class`` on a new engine and ``async_sessionmaker(expire_on_commit=False)``."""
    engine = create_async_engine(opts.url)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    app = app_class(broker=broker, session_factory=session_factory, config=config)
    return engine, app


def trigger(kind: str, api: Any) -> Any:
    """The trigger of every job of a setup ``kind``, made with the classes of ``api`` (the
    ``taskiq_beat`` module of either version)."""
    now = datetime.now(UTC)
    if kind == "due":
        return api.OneOffSchedule(run_at=now - timedelta(seconds=1))
    if kind == "every-second":
        # On the grid of whole seconds: fires at start_at + n s.
        return api.PeriodicSchedule(
            interval=api.IntervalTrigger(seconds=1), start_at=now.replace(microsecond=0)
        )
    if kind == "hourly":
        return api.PeriodicSchedule(interval=api.IntervalTrigger(hours=1))
    raise ValueError(kind)


async def close(app: Any, broker: Any, engine: AsyncEngine) -> None:
    """Stop the app, then its broker; dispose of the engine."""
    await app.stop()
    await broker.shutdown()
    await engine.dispose()


# ---------------------------------------------------------------------- setup


async def setup(
    opts: Options,
    metadata: sa.MetaData,
    kinds: Mapping[str, str],
    open_app: OpenApp,
    load: Callable[[str, AsyncEngine, Any], Awaitable[str]],
) -> dict[str, Any]:
    """Create the tables; then, for a scenario of ``kinds``, time ``load(kind, engine, app)``,
    which loads ``opts.jobs`` jobs of that kind and returns how (the ``setup`` field)."""
    engine = create_async_engine(opts.url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await engine.dispose()
    kind = kinds.get(opts.scenario)
    if kind is None:
        return {}
    engine, app = open_app(opts, make_broker("noop"))
    began = time.perf_counter()
    how = await load(kind, engine, app)
    elapsed = time.perf_counter() - began
    await engine.dispose()
    return {"setup": how, "setup_s": elapsed, "setup_rate": opts.jobs / elapsed}


async def copy_rows(engine: AsyncEngine, table: Any, jobs: int, args_column: str) -> None:
    """Copy the row of job 0 (made through the API) ``jobs - 1`` times with SQLAlchemy Core,
    each copy with its own id and ``[index]`` in ``args_column``."""
    async with engine.connect() as connection:
        result = await connection.execute(sa.select(table).where(table.c.id == job_id(0)))
        template = dict(result.mappings().one())
    for low in range(1, jobs, 5000):
        rows = [
            {**template, "id": job_id(index), args_column: [index]}
            for index in range(low, min(jobs, low + 5000))
        ]
        async with engine.begin() as connection:
            await connection.execute(table.insert(), rows)


# ---------------------------------------------------------------------- burst


async def wait_rows(
    engine: AsyncEngine,
    sent: sa.Select[Any],
    expected: int,
    timeout: float,
    *,
    every: float = 0.02,
) -> tuple[int, float]:
    """Poll the run table every ``every`` seconds until ``expected`` rows are sent; return
    their count and the latest time (epoch) among them, or now if none. ``sent`` selects
    that count and that time (so the end of a run does not depend on ``every``)."""
    deadline = time.time() + timeout
    while True:
        async with engine.connect() as connection:
            count, latest = (await connection.execute(sent)).one()
        if count >= expected or time.time() > deadline:
            return int(count), (epoch(latest) if latest is not None else time.time())
        await asyncio.sleep(every)


def write_done(path: str, rows: int, last_row: float) -> None:
    """Tell the other schedulers of a ``burst`` that the first one's count is done."""
    with open(path + ".tmp", "w", encoding="utf-8") as done:
        json.dump([rows, last_row], done)
    Path(path + ".tmp").replace(path)


def read_done(path: str) -> tuple[int, float] | None:
    """The count written by :func:`write_done`, if written yet."""
    try:
        with open(path, encoding="utf-8") as done:
            rows, last_row = json.load(done)
    except FileNotFoundError:
        return None
    return int(rows), float(last_row)


async def wait_done(path: str, timeout: float) -> tuple[int, float]:
    """The count written by :func:`write_done` (0 rows, now, if none within ``timeout``)."""
    deadline = time.time() + timeout
    while (done := read_done(path)) is None:
        if time.time() > deadline:
            return 0, time.time()
        await asyncio.sleep(0.01)
    return done


async def burst(
    opts: Options, open_app: OpenApp, sent: sa.Select[Any], *, by_sends_when_partial: bool = False
) -> dict[str, Any]:
    """All jobs due at ``start()``: time until every fire is sent (and executed) and recorded
    (``sent``: see :func:`wait_rows`). ``by_sends_when_partial``: a burst cut by
    ``--max-wait`` is timed and counted by its sends, not its run rows, and waited for 1 s at
    least (1.4.0, whose ``stop()`` cancels a batch in flight).

    One of several schedulers (``opts.sends_path``): starts at ``opts.start_at``, waits until
    the run table holds every fire (its own sends are a share of them), and writes its sends
    to ``opts.sends_path``."""
    several = bool(opts.sends_path)
    executed = Goal()
    broker = make_broker(burst_broker(opts), executed, send_cost=opts.send_cost)
    goal = broker.goal if isinstance(broker, NoopBroker) else executed
    engine, app = open_app(opts, broker)
    await broker.startup()
    if several:
        await sleep_until(opts.start_at)
    began = time.time()
    cpu_began = time.process_time()
    await app.start()
    started = time.time()
    budget = opts.max_wait - (started - began)
    if several:
        # Every process waits for all the rows; one counts them, the others wait for its
        # word (the end is the latest row's time, not when the count sees it).
        if opts.polls:
            rows, last_row = await wait_rows(engine, sent, opts.jobs, budget, every=0.25)
            write_done(opts.done_path, rows, last_row)
        else:
            rows, last_row = await wait_done(opts.done_path, budget + 10)
        complete = rows >= opts.jobs
    else:
        wait = max(1.0, budget) if by_sends_when_partial else budget
        complete = await goal.wait(opts.jobs, wait)
        # Every send is followed by its run row: wait for the last ones to be committed.
        rows, last_row = await wait_rows(engine, sent, goal.count, 30 if complete else 2)
    cpu = time.process_time() - cpu_began
    await close(app, broker, engine)
    if complete or not by_sends_when_partial:
        counted, end = rows, max(last_row, goal.last or began)
    else:
        counted, end = goal.count, goal.last or time.time()
    elapsed = end - began
    times = [at - began for at, _ in broker.kicks] if isinstance(broker, NoopBroker) else []
    if several and isinstance(broker, NoopBroker):
        broker.write_sends(opts.sends_path)
    return {
        "rate": counted / elapsed if elapsed > 0 else 0.0,
        "fires": goal.count,
        "rows": rows,
        "elapsed_s": elapsed,
        "start_s": started - began,
        "cpu_s": cpu,
        "partial": not complete,
        "dist": percentiles(times),
        "dist_what": "send time after start() [s]" if times else "",
    }


# ---------------------------------------------------------------------- interval, idle


@dataclasses.dataclass
class IntervalRun:
    """An ``interval`` run, stopped: its sends on ``broker``, its run rows behind ``engine``
    (still open), the window ``[first, end)`` and the process's CPU % over it."""

    broker: NoopBroker
    engine: AsyncEngine
    first: float
    end: float
    busy: float


async def interval(opts: Options, open_app: OpenApp) -> IntervalRun:
    """Jobs every second: run the scheduler through ``opts.seconds`` whole seconds from the
    first one 2 s after ``start()`` is called, and a grace period after them for late fires.

    One of several schedulers (``opts.sends_path``): ``start()`` at ``opts.start_at``, the
    window from the first whole second 2 s after that (the same for all); its sends are
    written to ``opts.sends_path``."""
    broker = make_broker("noop", send_cost=opts.send_cost)
    engine, app = open_app(opts, broker)
    await broker.startup()
    if opts.sends_path:
        await sleep_until(opts.start_at)
    began = opts.start_at if opts.sends_path else time.time()
    await app.start()
    # The window opens at the first whole second 2 s after start() was called (the common
    # start time, with several), as for TaskiqScheduler (see taskiq_sched._interval): both
    # get the same time to settle, ours to send the fires due since the setup.
    first = math.ceil(began) + 2.0
    end = first + opts.seconds
    # CPU over the window and a grace period after it, for late fires.
    busy = await cpu_percent(end + grace(opts.seconds) - time.time())
    await app.stop()
    await broker.shutdown()
    if opts.sends_path:
        broker.write_sends(opts.sends_path)
    return IntervalRun(broker, engine, first, end, busy)


async def idle(opts: Options, open_app: OpenApp) -> dict[str, Any]:
    """Jobs due in an hour: start() time, memory, CPU and event-loop stalls while idle."""
    broker = make_broker("noop")
    engine, app = open_app(opts, broker)
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
    return await idle_window(
        opts.seconds,
        monitor,
        lambda: close(app, broker, engine),
        start_s=start_s,
        start_stall=start_stall,
        rss_base=base,
        rss_loaded=loaded,
    )


# ---------------------------------------------------------------------- propagation


async def propagation(opts: Options, open_app: OpenApp, sync_interval: float) -> dict[str, Any]:
    """Another process changes jobs to "due now": time until this scheduler sends them."""
    broker = make_broker("noop", keep_messages=True)
    engine, app = open_app(opts, broker)
    await broker.startup()
    await app.start()
    await asyncio.sleep(warmup(opts.seconds))
    return await propagate(
        opts,
        broker,
        lambda: close(app, broker, engine),
        sync_interval=sync_interval,
        dist_what="change committed elsewhere -> sent here [ms]",
    )


async def writer(
    opts: Options,
    open_app: OpenApp,
    make_due: Callable[[Any, Any, int, datetime], Awaitable[object]],
) -> dict[str, Any]:
    """The other process of ``propagation``: ``make_due(app, session, index, now)`` (one
    ``.upsert()``) for jobs ``0 .. opts.jobs - 1``, one session each, spaced out."""
    broker = make_broker("noop")
    engine, app = open_app(opts, broker)
    for index in range(opts.jobs):
        async with app.session_factory() as session:
            await make_due(app, session, index, datetime.now(UTC))
        await writer_pause(opts, index)
    await engine.dispose()
    return {"sent": opts.jobs}
