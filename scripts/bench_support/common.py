"""Measurement tools shared by every scheduler measured (standard library only).

Runs under this repository's interpreter and under the separate Python 3.12 venv that holds
taskiq-beat 1.4.0; it imports neither ``taskiq_beat`` nor taskiq (see ``brokers``), so that
the parent process of ``bench.py`` starts fast. ``asyncpg`` is imported where it is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

UTC = timezone.utc
RESULT_MARK = "@@BENCH_RESULT@@ "
"""Prefix of the one stdout line in which a child process reports its result as JSON."""
TASK_NAME = "bench.noop"
"""The task every scheduler sends: it does nothing."""

PG_HOST = os.environ.get("TASKIQ_BEAT_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TASKIQ_BEAT_PG_PORT", "5432"))
PG_USER = os.environ.get("TASKIQ_BEAT_PG_USER", "postgres")


@dataclasses.dataclass
class Options:
    """What one child process is asked to do (parsed from ``bench.py _run`` arguments)."""

    scenario: str
    system: str
    phase: str
    db: str
    url: str
    jobs: int
    seconds: float
    chunk: int = 10_000
    setup: str = "auto"
    max_wait: float = 120.0
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    profile: str | None = None
    bench_path: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = ""
    spacing: float = 0.25
    send_cost: float = 0.0
    """CPU (s) each send of the no-op broker burns (busy-waiting): a broker that costs CPU."""
    start_at: float = 0.0
    """With several schedulers: the wall-clock time at which each calls ``start()``."""
    sends_path: str = ""
    """With several schedulers: where this one writes its sends, for the parent to merge."""
    done_path: str = ""
    """With several schedulers (``burst``): where the first one writes the count and time of
    the run rows once every fire has one; the others wait for that file, not the database."""
    polls: bool = False
    """With several schedulers (``burst``): whether this one is the first (it polls)."""


def job_id(index: int) -> str:
    return f"bench-{index:07d}"


def emit(result: dict[str, Any]) -> None:
    """Report the result of a child process to its parent (one JSON line on stdout)."""
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max (nearest rank) of ``values``; ``None`` each when empty."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": rank(0.50), "p99": rank(0.99), "max": ordered[-1], "n": len(ordered)}


def _proc_status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (``VmRSS``)."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """Highest resident set size of this process so far, in MiB (``VmHWM``)."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb / 1024


def epoch(value: datetime | str) -> float:
    """Seconds since the epoch of an aware datetime or ISO string (naive means UTC)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class Goal:
    """Counts events (sends, executions) and lets a coroutine wait for a number of them."""

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self._target: int | None = None
        self._reached: asyncio.Event | None = None

    def hit(self) -> float:
        now = time.time()
        self.count += 1
        if self.first is None:
            self.first = now
        self.last = now
        if self._target is not None and self.count >= self._target and self._reached:
            self._reached.set()
        return now

    async def wait(self, target: int, timeout: float) -> bool:
        """Wait until ``target`` events happened; ``False`` if ``timeout`` passed first."""
        if self.count >= target:
            return True
        self._target, self._reached = target, asyncio.Event()
        try:
            await asyncio.wait_for(self._reached.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._target = self._reached = None
        return True


class StallMonitor:
    """A ticker that sleeps ``interval`` again and again and notes how late each wake-up is.

    Its lateness is how long the event loop was blocked: by work on the loop, by another
    thread of the process holding the GIL (aiosqlite's), or, on a busy machine, by waiting
    for a core. ``busy`` holds the CPU time of the whole process during each sleep: close to
    the stall when the process itself was busy, near zero when it waited for the machine.
    The ticker costs ~1 % of a core at 10 ms, so CPU is measured in a window without it.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.stalls: list[float] = []
        self.busy: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.stalls, self.busy = [], []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(self.interval)
            self.stalls.append(max(0.0, time.perf_counter() - before - self.interval))
            self.busy.append(time.process_time() - cpu)

    def cpu_of_longest(self) -> float:
        """CPU time of the process during the longest stall (0 when none)."""
        if not self.stalls:
            return 0.0
        return self.busy[self.stalls.index(max(self.stalls))]

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        return self.stalls


async def cpu_percent(seconds: float) -> float:
    """CPU time this process used while sleeping ``seconds``, in % of one core."""
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)


def load_average() -> float | None:
    """The machine's 1-minute load average (other work skews every number: see README)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def grace(seconds: float) -> float:
    """How long a timed scenario waits after its window for late fires (2 s; less in short
    smoke runs)."""
    return min(2.0, max(0.5, seconds / 2))


def warmup(seconds: float) -> float:
    """How long a scenario lets the scheduler settle after ``start()`` (1 s; less in short
    smoke runs)."""
    return min(1.0, max(0.2, seconds / 4))


async def sleep_until(when: float) -> None:
    """Sleep until the wall-clock time ``when`` (seconds since the epoch)."""
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


# ---------------------------------------------------------------------- databases


def sqlite_url(path: str) -> str:
    return f"sqlite+aiosqlite:///{path}"


def postgres_url(name: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


async def _pg_admin(statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(
        f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres", timeout=5
    )
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_pg_database() -> str:
    """Create an empty database ``taskiq_beat_bench_<random>``; return its name."""
    name = f"taskiq_beat_bench_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    return name


async def drop_pg_database(name: str) -> None:
    await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MYSQL_HOST = os.environ.get("TASKIQ_BEAT_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TASKIQ_BEAT_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("TASKIQ_BEAT_MYSQL_USER", "root")


def mariadb_url(name: str) -> str:
    return f"mysql+asyncmy://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"


_SERVER_PROCESSES = {"postgres": ("postgres",), "mariadb": ("mariadbd", "mysqld")}
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def server_cpu_seconds(db: str) -> float | None:
    """The CPU time the database server on this machine has used so far (user and system,
    its ended children's included), or ``None`` where it does not run here (SQLite, a
    server on another host, no ``/proc``).

    Read from ``/proc``: PostgreSQL's backends, which end with their connections, leave
    their time to the postmaster's children's counters; MariaDB is one process. Every
    process of that name on this machine counts: another cluster, or another client's
    queries meanwhile, would be counted too (run the benchmarks on a quiet machine)."""
    names = _SERVER_PROCESSES.get(db)
    host = PG_HOST if db == "postgres" else MYSQL_HOST
    if names is None or host not in _LOCAL_HOSTS:
        return None
    ticks = 0
    found = False
    try:
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # ended meanwhile
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name not in names:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the name
        ticks += sum(int(field) for field in fields[11:15])
        found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


async def _mysql_admin(statement: str) -> None:
    import asyncmy

    connection = await asyncmy.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, connect_timeout=5
    )
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(statement)
    finally:
        connection.close()


async def create_mariadb_database() -> str:
    """Create an empty MariaDB/MySQL database ``taskiq_beat_bench_<random>``; its name."""
    name = f"taskiq_beat_bench_{uuid.uuid4().hex[:12]}"
    await _mysql_admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    return name


async def drop_mariadb_database(name: str) -> None:
    await _mysql_admin(f"DROP DATABASE IF EXISTS `{name}`")


async def mariadb_answers() -> str | None:
    """``None`` when MariaDB (or MySQL) answers, else why not."""
    try:
        await _mysql_admin("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def postgres_answers() -> str | None:
    """``None`` when PostgreSQL answers, else why not."""
    try:
        await _pg_admin("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


PROFILE_BUCKETS = [
    ("/sqlalchemy/", "SQL (SQLAlchemy + driver)"),
    ("/asyncpg/", "SQL (SQLAlchemy + driver)"),
    ("/aiosqlite/", "SQL (SQLAlchemy + driver)"),
    ("/sqlite3/", "SQL (SQLAlchemy + driver)"),
    ("/taskiq_beat/", "scheduler (taskiq_beat)"),
    ("/taskiq/", "kiq (taskiq: kicker, formatter, broker)"),
    ("/taskiq_redis/", "kiq (taskiq: kicker, formatter, broker)"),
    ("/logging/", "logging"),
    ("/bench_support/", "bench harness (broker.kick, waits)"),
    ("/pyinstrument/", "profiler"),
]
"""Where a profile sample's time goes: the innermost frame from one of these paths decides
(standard-library frames count for the caller that is; ``epoll`` is waiting for I/O)."""


SCHEDULER_BUCKET = "scheduler (taskiq_beat)"


def profile_breakdown(root: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per bucket of a pyinstrument frame tree (see ``PROFILE_BUCKETS``), and the
    scheduler bucket's seconds per innermost ``taskiq_beat`` function (with what it calls
    outside the other buckets: ``uuid``, ``datetime``, ``asyncio.timeout``...)."""
    totals: dict[str, float] = {}
    detail: dict[str, float] = {}
    stack: list[tuple[Any, str, str]] = [(root, "event loop, asyncio, other", "")]
    while stack:
        frame, inherited, owner = stack.pop()
        path = (frame.file_path or "").replace("\\", "/")
        bucket = next((name for part, name in PROFILE_BUCKETS if part in path), inherited)
        if path == "<built-in>" and frame.function.endswith(("poll", "select")):
            bucket = "waiting for I/O (epoll)"
        if "/taskiq_beat/" in path:
            owner = f"{path.rsplit('/', 1)[-1]}:{frame.function}"
        own = max(0.0, frame.time - sum(child.time for child in frame.children))
        totals[bucket] = totals.get(bucket, 0.0) + own
        if bucket == SCHEDULER_BUCKET:
            detail[owner] = detail.get(owner, 0.0) + own
        stack.extend((child, bucket, owner) for child in frame.children)

    def ordered(values: dict[str, float]) -> dict[str, float]:
        return dict(sorted(values.items(), key=lambda item: -item[1]))

    return ordered(totals), ordered(detail)


class Profiled:
    """Profile the block with pyinstrument (all Python frames of the main thread) if asked.

    Writes a text report to ``path`` (and an HTML one next to it), and keeps the time per
    bucket of :func:`profile_breakdown` in ``breakdown`` (and ``detail``). A no-op when
    ``path`` is ``None``.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.breakdown: dict[str, float] = {}
        self.detail: dict[str, float] = {}
        self._profiler: Any = None

    def __enter__(self) -> Profiled:
        if self.path:
            from pyinstrument import Profiler

            self._profiler = Profiler(interval=0.001, async_mode="disabled")
            self._profiler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._profiler is None:
            return
        self._profiler.stop()
        assert self.path is not None
        session = self._profiler.last_session
        self.breakdown, self.detail = profile_breakdown(session.root_frame())
        total = sum(self.breakdown.values()) or 1.0
        lines = [
            f"{seconds:8.2f} s {100 * seconds / total:5.1f} %  {name}"
            for name, seconds in self.breakdown.items()
        ]
        with open(self.path, "w", encoding="utf-8") as report:
            report.write("Time by bucket (wall time of the main thread):\n")
            report.write("\n".join(lines) + "\n\n")
            report.write(f"{SCHEDULER_BUCKET} by innermost taskiq_beat function:\n")
            for name, seconds in list(self.detail.items())[:25]:
                report.write(f"{seconds:8.2f} s  {name}\n")
            report.write("\n")
            report.write(self._profiler.output_text(unicode=False, color=False))
        html = os.path.splitext(self.path)[0] + ".html"
        with open(html, "w", encoding="utf-8") as report:
            report.write(self._profiler.output_html())
