"""The same scenarios on Taskiq's own scheduler (``TaskiqScheduler``), and the kiq ceilings.

The scheduler loop is taskiq's ``SchedulerLoop.run()`` from ``taskiq/cli/scheduler/run.py``,
driven in-process exactly as ``taskiq scheduler`` drives it (``startup()``, then ``run()``
with ``update_interval`` / ``loop_interval``), with ``broker.is_scheduler_process = True``.
Schedules come from a source kept in memory (``ScheduledTask`` objects), except where
another process must change them (propagation) or where writing them is what is measured
(bulk): there ``taskiq_redis.ListRedisScheduleSource`` is used.

Taskiq has no scheduled time per send: a send's "scheduled time" is the whole second of the
loop tick that decided to send it (the loop ticks on whole seconds). The tick is passed from
the loop to the send through a context variable (``create_task`` copies the context).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

from taskiq import AsyncBroker, ScheduledTask, TaskiqScheduler
from taskiq.abc.schedule_source import ScheduleSource
from taskiq.cli.scheduler.run import SchedulerLoop, get_all_schedules
from taskiq.message import BrokerMessage

from bench_support import scenarios
from bench_support.brokers import NoopBroker, make_broker
from bench_support.common import (
    TASK_NAME,
    UTC,
    Goal,
    Options,
    StallMonitor,
    cpu_percent,
    grace,
    job_id,
    percentiles,
    rss_mb,
    warmup,
)
from bench_support.scenarios import (
    burst_broker,
    fires_in_window,
    idle_window,
    interval_result,
    propagate,
    writer_pause,
)

SYSTEM = "taskiq"
_TICK: contextvars.ContextVar[float | None] = contextvars.ContextVar("bench_tick", default=None)
UPDATE_INTERVAL = timedelta(seconds=60)
"""``taskiq scheduler``'s default ``--update-interval``: how often sources are re-read."""


def _version() -> str:
    from importlib.metadata import version

    return f"taskiq {version('taskiq')} TaskiqScheduler"


class MemorySource(ScheduleSource):
    """Schedules held in memory (what ``LabelScheduleSource`` does, without task labels)."""

    def __init__(self, schedules: list[ScheduledTask]) -> None:
        self.schedules = schedules

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules)


class TickLoop(SchedulerLoop):
    """Taskiq's loop, noting the time of the tick that decides each send."""

    first_tick: float | None = None

    def _is_schedule_ready_to_send(self, task: ScheduledTask, now: datetime) -> bool:
        stamp = now.timestamp()
        if self.first_tick is None:
            self.first_tick = stamp
        _TICK.set(stamp)  # copied into the send task created right after this call
        return super()._is_schedule_ready_to_send(task, now)


class TickBroker(NoopBroker):
    """The no-op broker, also noting which tick each send belongs to."""

    async def kick(self, message: BrokerMessage) -> None:
        message.labels["bench_tick"] = _TICK.get()
        await super().kick(message)


def _scheduled(index: int, **when: Any) -> ScheduledTask:
    return ScheduledTask(
        task_name=TASK_NAME, labels={}, args=[index], kwargs={}, schedule_id=job_id(index), **when
    )


def _in_an_hour() -> str:
    """A cron expression due an hour from now (once a day)."""
    when = datetime.now(UTC) + timedelta(hours=1)
    return f"{when.minute} {when.hour} * * *"


async def _run_loop(
    broker: AsyncBroker, source: ScheduleSource, update_interval: timedelta = UPDATE_INTERVAL
) -> tuple[TaskiqScheduler, TickLoop, asyncio.Task[None]]:
    broker.is_scheduler_process = True
    scheduler = TaskiqScheduler(broker=broker, sources=[source])
    await source.startup()
    await scheduler.startup()
    loop = TickLoop(scheduler)
    task = asyncio.create_task(
        loop.run(update_interval=update_interval, loop_interval=timedelta(seconds=1))
    )
    return scheduler, loop, task


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Cancelling the loop also cancels a schedule reload in flight, whose done-callback
    then raises ``CancelledError``: harmless, keep it off the output."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


async def _stop_loop(scheduler: TaskiqScheduler, task: asyncio.Task[None]) -> None:
    asyncio.get_running_loop().set_exception_handler(_ignore_cancelled)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await scheduler.shutdown()
    for source in scheduler.sources:
        await source.shutdown()


async def setup(opts: Options) -> dict[str, Any]:
    if opts.scenario != "propagation":
        return {}
    source = _redis_source(opts)
    await source.startup()
    cron = _in_an_hour()
    for index in range(opts.jobs):
        await source.add_schedule(_scheduled(index, cron=cron))
    await source.shutdown()
    return {"setup": "ListRedisScheduleSource.add_schedule"}


async def measure(opts: Options) -> dict[str, Any]:
    runs: dict[str, scenarios.Scenario] = {
        "ceiling": _ceiling,
        "ceiling-exec": _ceiling_exec,
        "burst": _burst,
        "execute": _burst,
        "interval": _interval,
        "idle": _idle,
        "bulk": _bulk,
        "propagation": _propagation,
    }
    return await scenarios.measure(opts, SYSTEM, runs, _version)


def _labels(index: int) -> dict[str, str]:
    """The labels taskiq-beat puts on a send, so that the ceiling does the same work."""
    scheduled = datetime.now(UTC).isoformat()
    return {"taskiq_beat_job_id": job_id(index), "taskiq_beat_scheduled_for": scheduled}


REPEATS = 3
"""Each ceiling is measured this many times in its process; the median is reported."""


async def _ceiling(opts: Options) -> dict[str, Any]:
    """``kiq`` alone, one after another, on the no-op broker; no scheduler at all."""
    jobs = opts.jobs
    broker = make_broker("noop")
    await broker.startup()
    task = broker.find_task(TASK_NAME)
    labelled: list[float] = []
    plain: list[float] = []
    for _ in range(REPEATS):
        broker.forget_kicks()
        began = time.perf_counter()
        for index in range(jobs):
            await task.kicker().with_labels(**_labels(index)).kiq(index)
        labelled.append(jobs / (time.perf_counter() - began))
        broker.forget_kicks()
        began = time.perf_counter()
        for index in range(jobs):
            await task.kiq(index)
        plain.append(jobs / (time.perf_counter() - began))
    await broker.shutdown()
    return {
        "rate": statistics.median(labelled),
        "plain_rate": statistics.median(plain),
        "rates": labelled,
        "fires": jobs,
        "version": f"{_version().split(' Taskiq')[0]}, no scheduler",
        "note": f"median of {REPEATS}",
    }


async def _ceiling_exec(opts: Options) -> dict[str, Any]:
    """``kiq`` + execution of the no-op task on ``InMemoryBroker``, without a scheduler."""
    jobs = opts.jobs
    rates: list[float] = []
    for _ in range(REPEATS):
        executed = Goal()
        broker = make_broker("inmemory", executed)
        await broker.startup()
        task = broker.find_task(TASK_NAME)
        began = time.time()
        for index in range(jobs):
            await task.kicker().with_labels(**_labels(index)).kiq(index)
        await executed.wait(jobs, opts.max_wait)
        rates.append(executed.count / ((executed.last or time.time()) - began))
        await broker.shutdown()
    return {
        "rate": statistics.median(rates),
        "rates": rates,
        "fires": jobs,
        "version": f"{_version().split(' Taskiq')[0]}, no scheduler",
        "note": f"median of {REPEATS}",
    }


async def _burst(opts: Options) -> dict[str, Any]:
    """One-off schedules whose time is past: all due at the first tick."""
    broker_kind = burst_broker(opts)
    past = datetime.now(UTC) - timedelta(seconds=1)
    schedules = [_scheduled(index, time=past) for index in range(opts.jobs)]
    executed = Goal()
    broker = TickBroker() if broker_kind == "noop" else make_broker(broker_kind, executed)
    goal = broker.goal if broker_kind == "noop" else executed
    began = time.time()
    scheduler, loop, runner = await _run_loop(broker, MemorySource(schedules))
    complete = await goal.wait(opts.jobs, opts.max_wait)
    await _stop_loop(scheduler, runner)
    first = loop.first_tick or began
    elapsed = (goal.last or time.time()) - first
    times = [at - first for at, _ in broker.kicks] if broker_kind == "noop" else []
    return {
        "rate": goal.count / elapsed if elapsed > 0 else 0.0,
        "fires": goal.count,
        "rows": None,
        "elapsed_s": elapsed,
        "start_s": first - began,
        "partial": not complete,
        "dist": percentiles(times),
        "dist_what": "send time after the first tick [s]" if times else "",
        "note": "nothing persisted; timed from the first tick (the loop waits for a whole second)",
    }


async def _interval(opts: Options) -> dict[str, Any]:
    schedules = [_scheduled(index, interval=1) for index in range(opts.jobs)]
    broker = TickBroker()
    began = time.time()
    scheduler, _, runner = await _run_loop(broker, MemorySource(schedules))
    first = math.ceil(began) + 2.0
    end = first + opts.seconds
    busy = await cpu_percent(end + grace(opts.seconds) - time.time())
    await _stop_loop(scheduler, runner)
    steady: list[float] = []
    seen, lateness = fires_in_window(
        (
            (labels["schedule_id"], math.floor(labels["bench_tick"]), at)
            for at, labels in broker.kicks
            if labels.get("bench_tick") is not None
        ),
        first,
        end,
        steady,
    )
    return interval_result(
        opts,
        seen,
        lateness,
        rows=None,
        busy=busy,
        dist_what="lateness: send - whole second of its tick [ms]",
        steady=steady,
    )


async def _idle(opts: Options) -> dict[str, Any]:
    """Cron schedules due in an hour (checked by the loop every second)."""
    cron = _in_an_hour()
    base = rss_mb()
    schedules = [_scheduled(index, cron=cron) for index in range(opts.jobs)]
    broker = make_broker("noop")
    source = MemorySource(schedules)
    scheduler = TaskiqScheduler(broker=broker, sources=[source])
    began = time.perf_counter()
    await get_all_schedules(scheduler)  # what the loop does first: its start-up cost
    start_s = time.perf_counter() - began
    monitor = StallMonitor()
    monitor.start()
    scheduler, _, runner = await _run_loop(broker, source)
    await asyncio.sleep(1.5)  # past the wait for a whole second and the first tick
    start_stall = max(await monitor.stop(), default=0.0)
    loaded = rss_mb()
    return await idle_window(
        opts.seconds,
        monitor,
        lambda: _stop_loop(scheduler, runner),
        start_s=start_s,
        start_stall=start_stall,
        rss_base=base,
        rss_loaded=loaded,
        note="in-memory source; start = loading the schedules",
    )


def _redis_source(opts: Options) -> Any:
    from taskiq_redis import ListRedisScheduleSource

    return ListRedisScheduleSource(opts.redis_url, prefix=opts.prefix or "bench")


async def _drop_redis_keys(opts: Options) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(opts.redis_url) as redis:
        keys = [key async for key in redis.scan_iter(f"{opts.prefix}:*", count=10_000)]
        for low in range(0, len(keys), 10_000):
            await redis.delete(*keys[low : low + 10_000])


async def _bulk(opts: Options) -> dict[str, Any]:
    """``add_schedule`` one by one (taskiq has no bulk API) on a Redis schedule source."""
    source = _redis_source(opts)
    await source.startup()
    cron = _in_an_hour()
    jobs = min(opts.jobs, 10_000)
    schedules = [_scheduled(i, cron=cron) for i in range(jobs)]
    began = time.perf_counter()
    for schedule in schedules:
        await source.add_schedule(schedule)
    elapsed = time.perf_counter() - began
    await source.shutdown()
    await _drop_redis_keys(opts)
    return {
        "rate": jobs / elapsed,
        "update_rate": None,
        "single_rate": None,
        "stored": jobs,
        "dist": percentiles([]),
        "dist_what": "",
        "note": f"ListRedisScheduleSource.add_schedule one by one ({jobs} schedules)",
    }


async def _propagation(opts: Options) -> dict[str, Any]:
    """Another process adds "due now" schedules to Redis; the loop re-reads the source every
    ``sync_interval_seconds`` (``--set``; 1 s like taskiq-beat, where taskiq's default is 60)."""
    interval = float(opts.config.get("sync_interval_seconds", 1.0))
    broker = make_broker("noop", keep_messages=True)
    scheduler, _, runner = await _run_loop(
        broker, _redis_source(opts), update_interval=timedelta(seconds=interval)
    )
    await asyncio.sleep(1 + warmup(opts.seconds))  # the first tick waits for a whole second

    async def stop() -> None:
        await _stop_loop(scheduler, runner)
        await _drop_redis_keys(opts)

    return await propagate(
        opts,
        broker,
        stop,
        sync_interval=interval,
        dist_what="schedule added elsewhere -> sent here [ms]",
        writer_args=("--prefix", opts.prefix, "--redis-url", opts.redis_url),
        note=f"ListRedisScheduleSource, update_interval={interval:g} s (CLI default 60 s)",
    )


async def writer(opts: Options) -> dict[str, Any]:
    source = _redis_source(opts)
    await source.startup()
    for index in range(opts.jobs):
        now = datetime.now(UTC)
        schedule = ScheduledTask(
            task_name=TASK_NAME,
            labels={},
            args=[index],
            kwargs={"t": now.timestamp()},
            schedule_id=f"prop-{index}",
            time=now,
        )
        await source.add_schedule(schedule)
        await writer_pause(opts, index)
    await source.shutdown()
    return {"sent": opts.jobs}
