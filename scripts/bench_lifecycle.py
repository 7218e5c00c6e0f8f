#!/usr/bin/env python
"""Cost of the run lifecycle: a real ``taskiq worker`` on Redis, recording on and off.

    python scripts/bench_lifecycle.py [--db sqlite|postgres|both] [--jobs N] [--rounds R]

For each database and each round, the two modes one after the other (off, then on), each in
a fresh state: a new SQLite file or PostgreSQL database, a new Redis stream, a new worker
process ``taskiq worker scripts.bench_support.lifecycle_worker:broker --workers 1
--max-async-tasks 100`` whose ``SchedulerApp`` has ``record_lifecycle`` on or off. This
process runs the scheduler (a ``SchedulerApp`` on the same database and stream), writes N
one-off jobs due now with ``upsert_many`` and calls ``start()``; the worker executes the
no-op task (one Redis ``INCR``) once per fire.

Measured: executions/s from the worker's first execution to its last (times noted by the
task itself), and from ``start()`` to the last; the scheduler's send rate (``start()`` to
the last ``dispatched_at``); with recording on, the visibility lag: the counter and
``count(*) ... status = 'succeeded'`` are read every ``--poll`` seconds, and for each k the
lag is the time the table first showed k succeeded runs minus the time the counter first
showed k executions (resolution: one poll). At the end, the statuses of the runs and how
many have ``executions == 1``. One markdown table row per database, mode and round; the
ratio on/off is of the same round. Printed, never asserted (see ``scripts/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
SOURCE_ENV = "BENCH_LIFECYCLE_SOURCE"
SOURCE = os.environ.get(SOURCE_ENV)
COMMIT_ENV = "BENCH_LIFECYCLE_COMMIT"
"""A directory holding ``taskiq_beat/`` exported from ``--ref`` (and a copy of
``scripts/bench_support/``), set by :func:`main` for the process it re-runs itself in: both
this process and the worker import the package from there, not from the working tree."""
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
if SOURCE:
    sys.path.insert(0, SOURCE)  # before the editable install's finder (appended to meta_path)

import sqlalchemy as sa  # noqa: E402
from bench_support import lifecycle_worker as worker_module  # noqa: E402
from bench_support.common import (  # noqa: E402
    create_pg_database,
    drop_pg_database,
    postgres_answers,
    postgres_url,
    sqlite_url,
)
from redis.asyncio import Redis  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine  # noqa: E402

from taskiq_beat import (  # noqa: E402
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
)
from taskiq_beat.models import SchedulerRun  # noqa: E402
from taskiq_beat.triggers import Trigger  # noqa: E402

WORKER_TARGET = "scripts.bench_support.lifecycle_worker:broker"
WORKER_ARGS = ["--workers", "1", "--max-async-tasks", "100"]
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
UPSERT_CHUNK = 5_000
TARGET_RATIO = 0.70
TARGET_LAG = 1.0


@dataclasses.dataclass
class Result:
    """One measurement: a database, a mode, a round."""

    db: str
    mode: str
    round: int
    jobs: int
    rate_worker: float | None = None
    rate_from_start: float | None = None
    rate_sent: float | None = None
    ratio: float | None = None
    lag_p50: float | None = None
    lag_max: float | None = None
    last_visible: float | None = None
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    executions_one: int = 0
    executed: int = 0
    worker_cpu: float | None = None
    load_before: float | None = None
    stolen: float | None = None
    error: str | None = None
    calls: dict[str, float] = dataclasses.field(default_factory=dict)
    """With ``--count-statements``: ``start_runs`` / ``finish_runs`` calls, rows, seconds."""
    # --interval: the fires of the window (jobs x seconds), those whose run row ends done
    # (succeeded; with recording off, dispatched), and lateness in seconds: send
    # (``dispatched_at``) and start on the worker (``started_at``, recording on) after
    # ``scheduled_for``, as p50 / p99.
    due: int | None = None
    done: int | None = None
    late_send: tuple[float | None, float | None] = (None, None)
    late_start: tuple[float | None, float | None] = (None, None)


# ---------------------------------------------------------------------- the worker process


class WorkerProcess:
    """``taskiq worker`` in its own session; its output is read continuously (last lines
    kept) so that the pipe never fills."""

    def __init__(self, env: dict[str, str]) -> None:
        self.command = [sys.executable, "-m", "taskiq", "worker", WORKER_TARGET, *WORKER_ARGS]
        self.env = {**os.environ, **env}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._listening = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=SOURCE or ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._listening.wait(), STARTUP_TIMEOUT)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"no 'Listening started' within {STARTUP_TIMEOUT:.0f} s:\n" + self.tail()
            ) from None

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            del self.lines[:-200]
            if "Listening started" in line:
                self._listening.set()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    def executor_pid(self) -> int | None:
        """The child process that executes tasks (``--workers 1``: the only child)."""
        if self.process is None:
            return None
        pid = self.process.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
                found = [int(child) for child in children.read().split()]
        except OSError:
            return None
        return found[0] if found else None

    async def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL after :data:`STOP_TIMEOUT`."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a child left behind
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 5)


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of ``pid`` so far (``/proc/PID/stat``)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of the machine's CPU time its host took for others (``steal``) in between."""
    if before is None or after is None:
        return None
    deltas = [late - early for early, late in zip(before, after, strict=False)]
    total = sum(deltas)
    return deltas[7] / total if total > 0 else None


# ---------------------------------------------------------------------- one measurement


@contextlib.asynccontextmanager
async def fresh_database(kind: str) -> AsyncIterator[str]:
    """A new SQLite file, or a new PostgreSQL database dropped afterwards; its URL."""
    if kind == "sqlite":
        directory = tempfile.mkdtemp(prefix="taskiq_beat_bench_lifecycle_")
        try:
            yield sqlite_url(os.path.join(directory, "bench.sqlite3"))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    else:
        name = await create_pg_database()
        try:
            yield postgres_url(name)
        finally:
            await drop_pg_database(name)


async def _never_here(index: int) -> None:  # pragma: no cover
    raise AssertionError("the scheduler's process does not execute tasks")


def first_times(samples: Sequence[tuple[float, int]], jobs: int) -> list[float | None]:
    """For k = 1..jobs, the time of the first sample whose count was at least k."""
    times: list[float | None] = [None] * (jobs + 1)
    reached = 0
    for when, count in samples:
        count = min(count, jobs)
        while reached < count:
            reached += 1
            times[reached] = when
    return times[1:]


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def measure(db: str, record: bool, round_: int, args: argparse.Namespace) -> Result:
    mode = "on" if record else "off"
    jobs: int = args.jobs
    result = Result(db=db, mode=mode, round=round_, jobs=jobs)
    stream = f"taskiq_beat_bench_lifecycle_{uuid.uuid4().hex[:12]}"
    keys = [
        stream,
        worker_module.counter_key(stream),
        worker_module.first_key(stream),
        worker_module.last_key(stream),
        worker_module.calls_key(stream),
    ]
    print(f"[bench_lifecycle] {db} / {mode} / round {round_}: {jobs:,} jobs ...", file=sys.stderr)
    async with fresh_database(db) as url:
        engine = create_async_engine(url)
        redis = Redis.from_url(args.redis_url)
        broker = worker_module.make_broker(args.redis_url, stream)
        broker.register_task(_never_here, task_name=worker_module.TASK_NAME)
        app = SchedulerApp(
            broker=broker,
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
            config=worker_module.make_config(record),
        )
        worker = WorkerProcess(
            {
                worker_module.DATABASE_URL_ENV: url,
                worker_module.REDIS_URL_ENV: args.redis_url,
                worker_module.STREAM_ENV: stream,
                worker_module.JOBS_ENV: str(jobs),
                worker_module.LIFECYCLE_ENV: "1" if record else "0",
                worker_module.COUNT_ENV: "1" if args.count_statements else "0",
            }
        )
        try:
            async with engine.begin() as connection:
                await connection.run_sync(SchedulerBase.metadata.create_all)
            await broker.startup()  # the consumer group exists before anything is sent
            await worker.start()
            if args.interval:
                await _measure_interval(app, engine, worker, result, args)
            else:
                await _measure_started(app, engine, redis, worker, stream, result, args)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            print(worker.tail(), file=sys.stderr)
        finally:
            await app.stop()
            await worker.stop()
            await redis.delete(*keys)
            await redis.aclose()
            await broker.shutdown()
            await engine.dispose()
    return result


async def write_jobs(app: SchedulerApp, trigger: Trigger, jobs: int) -> None:
    """``jobs`` jobs of the worker's task with ``trigger``, ids ``bench-0000000``..., args
    [i], written ``UPSERT_CHUNK`` at a time."""
    definitions = [
        app.single(worker_module.TASK_NAME, args=[i]).definition(
            trigger=trigger, job_id=f"bench-{i:07d}"
        )
        for i in range(jobs)
    ]
    for offset in range(0, jobs, UPSERT_CHUNK):
        async with app.session_factory() as session:
            await app.upsert_many(session, definitions[offset : offset + UPSERT_CHUNK])


async def _measure_started(
    app: SchedulerApp,
    engine: AsyncEngine,
    redis: Redis,
    worker: WorkerProcess,
    stream: str,
    result: Result,
    args: argparse.Namespace,
) -> None:
    jobs = result.jobs
    await write_jobs(app, OneOffSchedule(run_at=datetime.now(timezone.utc)), jobs)
    succeeded = (
        sa.select(sa.func.count())
        .select_from(SchedulerRun)
        .where(SchedulerRun.status == RunStatus.SUCCEEDED)
    )
    counter_key = worker_module.counter_key(stream)
    executor = worker.executor_pid()
    profiler = start_py_spy(args, executor, result)

    result.load_before = os.getloadavg()[0]
    steal_before = cpu_times()
    cpu_before = process_cpu_seconds(executor)
    started = time.time()
    await app.start()
    counts: list[tuple[float, int]] = []
    visible: list[tuple[float, int]] = []
    deadline = started + args.max_wait
    while time.time() < deadline:
        executed = int(await redis.get(counter_key) or 0)
        counts.append((time.time(), executed))
        async with engine.connect() as connection:
            shown = int((await connection.execute(succeeded)).scalar_one())
        visible.append((time.time(), shown))
        if executed >= jobs and (shown >= jobs or result.mode == "off"):
            break
        if worker.process is not None and worker.process.returncode is not None:
            raise RuntimeError("the worker exited:\n" + worker.tail())
        await asyncio.sleep(args.poll)
    else:
        result.error = f"timeout after {args.max_wait:.0f} s"
    cpu_after = process_cpu_seconds(executor)
    result.stolen = stolen_share(steal_before, cpu_times())
    if cpu_before is not None and cpu_after is not None:
        result.worker_cpu = cpu_after - cpu_before
    if profiler is not None:
        await stop_py_spy(profiler)

    first_raw, last_raw = (
        await redis.get(worker_module.first_key(stream)),
        await redis.get(worker_module.last_key(stream)),
    )
    if first_raw and last_raw:
        first, last = float(first_raw), float(last_raw)
        if last > first:
            result.rate_worker = jobs / (last - first)
        result.rate_from_start = jobs / (last - started)
        if result.mode != "off":
            seen = first_times(visible, jobs)
            if seen[-1] is not None:
                result.last_visible = seen[-1] - last
    if result.mode != "off":
        executed_at, shown_at = first_times(counts, jobs), first_times(visible, jobs)
        lags = [
            max(0.0, shown - ran)
            for ran, shown in zip(executed_at, shown_at, strict=True)
            if ran is not None and shown is not None
        ]
        result.lag_p50, result.lag_max = nearest_rank(lags, 0.5), nearest_rank(lags, 1.0)

    await asyncio.sleep(args.settle)  # late writes (e.g. a duplicate) would show up here
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.select(
                SchedulerRun.status,
                sa.func.count(),
                sa.func.sum(sa.case((SchedulerRun.executions == 1, 1), else_=0)),
                sa.func.max(SchedulerRun.dispatched_at),
            ).group_by(SchedulerRun.status)
        )
        last_sent: datetime | None = None
        for status, count, once, sent in rows:
            result.statuses[RunStatus(status).value] = int(count)
            result.executions_one += int(once or 0)
            if sent is not None and (last_sent is None or sent > last_sent):
                last_sent = sent
    if last_sent is not None:
        if last_sent.tzinfo is None:
            last_sent = last_sent.replace(tzinfo=timezone.utc)
        result.rate_sent = jobs / max(1e-9, last_sent.timestamp() - started)
    result.executed = int(await redis.get(counter_key) or 0)
    calls = await redis.hgetall(worker_module.calls_key(stream))
    result.calls = {key.decode(): float(value) for key, value in calls.items()}


async def _measure_interval(
    app: SchedulerApp,
    engine: AsyncEngine,
    worker: WorkerProcess,
    result: Result,
    args: argparse.Namespace,
) -> None:
    """``--interval SECONDS``: jobs every second on the grid of whole seconds (as
    ``bench.py interval``); the window opens at the first whole second 2 s after
    ``start()`` is called and lasts SECONDS; then ``--settle`` plus up to ``--max-wait``
    for the worker to finish the window's fires. Read from the run rows of the window."""
    jobs = result.jobs
    every = PeriodicSchedule(
        interval=IntervalTrigger(seconds=1),
        start_at=datetime.now(timezone.utc).replace(microsecond=0),
    )
    await write_jobs(app, every, jobs)
    executor = worker.executor_pid()
    result.load_before = os.getloadavg()[0]
    steal_before = cpu_times()
    cpu_before = process_cpu_seconds(executor)
    began = time.time()
    await app.start()
    first = math.ceil(began) + 2.0
    end = first + args.interval
    await asyncio.sleep(max(0.0, end - time.time()))
    await app.stop()
    result.due = jobs * round(args.interval)
    window = (
        SchedulerRun.scheduled_for >= datetime.fromtimestamp(first, timezone.utc),
        SchedulerRun.scheduled_for < datetime.fromtimestamp(end, timezone.utc),
    )
    finished = RunStatus.SUCCEEDED if result.mode != "off" else RunStatus.DISPATCHED
    deadline = time.time() + args.max_wait
    while True:  # the worker finishes what was sent in the window
        async with engine.connect() as connection:
            done = int(
                await connection.scalar(
                    sa.select(sa.func.count()).where(*window, SchedulerRun.status == finished)
                )
                or 0
            )
        if done >= result.due or time.time() >= deadline:
            break
        await asyncio.sleep(args.poll)
    await asyncio.sleep(args.settle)
    cpu_after = process_cpu_seconds(executor)
    result.stolen = stolen_share(steal_before, cpu_times())
    if cpu_before is not None and cpu_after is not None:
        result.worker_cpu = cpu_after - cpu_before
    sends: list[float] = []
    starts: list[float] = []
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.select(
                SchedulerRun.status,
                SchedulerRun.scheduled_for,
                SchedulerRun.dispatched_at,
                SchedulerRun.started_at,
                SchedulerRun.executions,
            ).where(*window)
        )
        for status, scheduled, dispatched, started, executions in rows:
            status = RunStatus(status)
            result.statuses[status.value] = result.statuses.get(status.value, 0) + 1
            result.executions_one += int(executions == 1)
            if dispatched is not None:
                sends.append((dispatched - scheduled).total_seconds())
            if started is not None:
                starts.append((started - scheduled).total_seconds())
    result.done = result.statuses.get(finished.value, 0)
    result.late_send = (nearest_rank(sends, 0.5), nearest_rank(sends, 0.99))
    result.late_start = (nearest_rank(starts, 0.5), nearest_rank(starts, 0.99))


INTERVAL_HEADER = (
    "| db | mode | round | jobs x s | done | `dispatched_at` (written after the send)"
    " - scheduled, p50 / p99 ms | `started_at` (on the worker) - scheduled, p50 / p99 ms"
    " | final statuses | executions == 1"
    " | worker CPU ms/exec | load | steal |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_interval_row(row: Result, seconds: float) -> str:
    if row.error and row.done is None:
        return f"| {row.db} | {row.mode} | {row.round} | ERROR: {row.error} |"
    statuses = ", ".join(f"{name} {count:,}" for name, count in sorted(row.statuses.items()))
    done = f"{row.done or 0:,} / {row.due or 0:,} = {100 * (row.done or 0) / (row.due or 1):.1f} %"
    executed = row.done or 0
    cells = [
        row.db,
        row.mode,
        str(row.round),
        f"{row.jobs:,} x {seconds:g}",
        done,
        f"{_ms(row.late_send[0])} / {_ms(row.late_send[1])}",
        "-" if row.mode == "off" else f"{_ms(row.late_start[0])} / {_ms(row.late_start[1])}",
        statuses + (f" ({row.error})" if row.error else ""),
        f"{row.executions_one:,}" if row.mode != "off" else "-",
        "-"
        if row.worker_cpu is None or not executed
        else f"{1000 * row.worker_cpu / executed:.2f}",
        _n(row.load_before, 1),
        "-" if row.stolen is None else f"{100 * row.stolen:.0f} %",
    ]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------- py-spy (optional)


def start_py_spy(
    args: argparse.Namespace, pid: int | None, result: Result
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` on the worker's executing process, if ``--py-spy DIR`` was given."""
    if not args.py_spy or pid is None:
        return None
    os.makedirs(args.py_spy, exist_ok=True)
    base = os.path.join(args.py_spy, f"{result.db}-{result.mode}-r{result.round}")
    command = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
    command += ["--format", "raw", "-o", base + ".txt"]
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command[0] = py_spy
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def stop_py_spy(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for _ in range(100):
        if profiler.poll() is not None:
            return
        await asyncio.sleep(0.1)
    profiler.kill()


# ---------------------------------------------------------------------- the table


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:,.0f}"


HEADER = (
    "| db | mode | round | exec/s (first→last exec) | exec/s (start()→last) | sent/s "
    "| on/off | visible lag p50 / max ms | last run visible ms | final statuses "
    "| executions == 1 | worker CPU ms/exec | load | steal |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: Result) -> str:
    if row.error and row.rate_worker is None:
        return f"| {row.db} | {row.mode} | {row.round} | ERROR: {row.error} |"
    statuses = ", ".join(f"{name} {count:,}" for name, count in sorted(row.statuses.items()))
    ratio = "-" if row.ratio is None else f"{100 * row.ratio:.0f} %"
    lag = "-" if row.mode == "off" else f"{_ms(row.lag_p50)} / {_ms(row.lag_max)}"
    steal = "-" if row.stolen is None else f"{100 * row.stolen:.0f} %"
    cells = [
        row.db,
        row.mode,
        str(row.round),
        _n(row.rate_worker),
        _n(row.rate_from_start),
        _n(row.rate_sent),
        ratio,
        lag,
        "-" if row.mode == "off" else _ms(row.last_visible),
        statuses + (f" ({row.error})" if row.error else ""),
        f"{row.executions_one:,} / {row.jobs:,}" if row.mode != "off" else "-",
        "-" if row.worker_cpu is None else f"{1000 * row.worker_cpu / row.jobs:.2f}",
        _n(row.load_before, 1),
        steal,
    ]
    return "| " + " | ".join(cells) + " |"


def verdicts(results: list[Result]) -> list[str]:
    """Per database: the median on/off ratio of the rounds, of the worker's CPU per
    execution, and the worst visibility lag, against the issue's targets."""
    lines = []
    for db, mode in dict.fromkeys((row.db, row.mode) for row in results if row.mode != "off"):
        on = [row for row in results if row.db == db and row.mode == mode]
        off = [row for row in results if row.db == db and row.mode == "off"]
        ratios = [row.ratio for row in on if row.ratio is not None]
        ratio = statistics.median(ratios) if ratios else None
        cpu_on = [row.worker_cpu / row.jobs for row in on if row.worker_cpu is not None]
        cpu_off = [row.worker_cpu / row.jobs for row in off if row.worker_cpu is not None]
        lags = [row.lag_max for row in on if row.lag_max is not None]
        worst = max(lags) if lags else None
        cpu = (
            f"{1000 * statistics.median(cpu_on):.2f} vs {1000 * statistics.median(cpu_off):.2f}"
            if cpu_on and cpu_off
            else "-"
        )
        met_ratio = ratio is not None and ratio >= TARGET_RATIO
        met_lag = worst is not None and worst <= TARGET_LAG
        lines.append(
            f"- {db}, {mode}: {mode}/off median {'-' if ratio is None else f'{100 * ratio:.0f} %'}"
            f" (rounds: {', '.join(f'{100 * r:.0f} %' for r in ratios) or '-'};"
            f" target >= {100 * TARGET_RATIO:.0f} %: {'met' if met_ratio else 'NOT met'});"
            f" worker CPU ms/execution, median, {mode} vs off: {cpu};"
            f" visibility lag, worst: {_ms(worst)} ms"
            f" (target <= {1000 * TARGET_LAG:.0f} ms: {'met' if met_lag else 'NOT met'})"
        )
    return lines


def describe_calls(calls: dict[str, float]) -> str:
    """``start_runs`` / ``finish_runs`` calls of the worker, rows per call, ms per call."""
    parts = []
    for name in ("start_runs", "finish_runs"):
        count = calls.get(f"{name}:calls", 0.0)
        if not count:
            continue
        rows, seconds = calls.get(f"{name}:rows", 0.0), calls.get(f"{name}:seconds", 0.0)
        parts.append(
            f"{name} {count:,.0f} calls, {rows / count:.1f} rows/call,"
            f" {1000 * seconds / count:.1f} ms/call (wall), {seconds:.2f} s in all"
        )
    return "; ".join(parts)


def _commit(ref: str) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD" if ref == "worktree" else ref],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "taskiq_beat"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(out.strip())


# ---------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between two reads")
    parser.add_argument("--max-wait", type=float, default=120.0, help="cap of one measurement")
    parser.add_argument("--settle", type=float, default=0.5, help="wait before the final read")
    parser.add_argument("--py-spy", metavar="DIR", help="py-spy record the worker into DIR")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="jobs every 1 s for SECONDS instead of one-off jobs due at start()",
    )
    parser.add_argument(
        "--count-statements",
        action="store_true",
        help="count the worker's start_runs / finish_runs calls (printed after the table)",
    )
    parser.add_argument(
        "--ref",
        default="HEAD",
        help="the commit whose taskiq_beat/ is measured (exported with git archive), or"
        " 'worktree' for the working tree as it is",
    )
    return parser


async def run(args: argparse.Namespace) -> list[Result]:
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in dbs:
        why = await postgres_answers()
        if why is not None:
            print(f"[bench_lifecycle] PostgreSQL skipped: {why}", file=sys.stderr)
            dbs.remove("postgres")
    results: list[Result] = []
    for db in dbs:
        for round_ in range(1, args.rounds + 1):
            off = await measure(db, False, round_, args)
            rows = [off, await measure(db, True, round_, args)]
            for row in rows:
                if row is not off and off.rate_worker and row.rate_worker:
                    row.ratio = row.rate_worker / off.rate_worker
                results.append(row)
                line = format_interval_row(row, args.interval) if args.interval else format_row(row)
                print(line, file=sys.stderr, flush=True)
    return results


def rerun_on_export(args: argparse.Namespace, argv: list[str]) -> int:
    """Export ``taskiq_beat/`` at ``args.ref`` (and copy ``scripts/bench_support/``) into a
    temporary directory, and run this script again with :data:`SOURCE_ENV` pointing at it:
    the measurement does not see edits made meanwhile in the working tree."""
    commit = _commit(args.ref)  # resolved once: a commit made meanwhile is not measured
    directory = tempfile.mkdtemp(prefix="taskiq_beat_bench_lifecycle_src_")
    try:
        archive = subprocess.run(
            ["git", "archive", commit, "taskiq_beat"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
        shutil.copytree(
            SCRIPTS / "bench_support",
            Path(directory) / "scripts" / "bench_support",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        env = {**os.environ, SOURCE_ENV: directory, COMMIT_ENV: commit}
        return subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv], env=env
        ).returncode
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.ref != "worktree" and not SOURCE:
        return rerun_on_export(args, argv)
    command = shlex.join([".venv/bin/python", "scripts/bench_lifecycle.py", *argv])
    begun = datetime.now(timezone.utc)
    results = asyncio.run(run(args))
    if args.ref == "worktree":
        source = "the working tree" + (", uncommitted changes in taskiq_beat/" if _dirty() else "")
    else:
        source = f"taskiq_beat/ exported from {args.ref}"
    commit = os.environ.get(COMMIT_ENV) or _commit(args.ref)
    print(f"\n`{command}`: commit {commit} ({source}), {begun:%Y-%m-%d %H:%M} UTC")
    if args.interval:
        print(
            f"{args.jobs:,} jobs every 1 s (on whole seconds) for {args.interval:g} s from the"
            " first whole second 2 s after start(); 1 `taskiq worker` process"
            f" (`{' '.join(WORKER_ARGS)}`), RedisStreamBroker; done = run rows of the window"
            " `succeeded` (recording on) or `dispatched` (off). CPU of"
            f" {os.cpu_count()} cores shared with other work: see load / steal.\n"
        )
        print(INTERVAL_HEADER)
        for row in results:
            print(format_interval_row(row, args.interval))
        return 0 if all(row.error is None for row in results) else 1
    print(
        f"{args.jobs:,} one-off jobs due at start(); 1 `taskiq worker` process"
        f" (`{' '.join(WORKER_ARGS)}`), RedisStreamBroker; rates from the worker's first"
        " execution to its last (and from start()); lag resolution"
        f" {1000 * args.poll:.0f} ms (one poll). CPU of {os.cpu_count()} cores shared with"
        " other work: see load / steal.\n"
    )
    print(HEADER)
    for row in results:
        print(format_row(row))
    print()
    for line in verdicts(results):
        print(line)
    for row in results:
        if row.calls:
            print(f"- {row.db}, {row.mode}, round {row.round}: {describe_calls(row.calls)}")
    return 0 if all(row.error is None for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
