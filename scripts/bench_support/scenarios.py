"""Scenario scaffolding shared by the three systems measured (see ``scripts/README.md``).

What a scenario does once a scheduler is running, whichever it is, and the result it reports:
each adapter (``ours``, ``taskiq_sched``, ``beat140``) keeps only how its scheduler is built,
started and stopped, and where its sends are read from. Imports taskiq (through ``brokers``)
but neither ``taskiq_beat`` nor SQLAlchemy: it runs under taskiq-beat 1.4.0's interpreter
too, and adds nothing to the memory measured of the TaskiqScheduler runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from bench_support.brokers import NoopBroker
from bench_support.common import (
    Options,
    Profiled,
    StallMonitor,
    cpu_percent,
    load_average,
    peak_rss_mb,
    percentiles,
    rss_mb,
)

Scenario = Callable[[Options], Awaitable[dict[str, Any]]]
"""Runs one scenario in the measuring process and returns its result fields."""
Stop = Callable[[], Awaitable[object]]
"""Stops the scheduler under test (and its broker, and what else it holds)."""


async def measure(
    opts: Options, system: str, scenarios: Mapping[str, Scenario], version: Callable[[], str]
) -> dict[str, Any]:
    """Run ``opts.scenario`` from ``scenarios`` (profiled when ``--profile`` asks); add the
    profile's buckets and the system's ``version`` (unless the scenario set its own)."""
    with Profiled(opts.profile) as profiled:
        scenario = scenarios.get(opts.scenario)
        if scenario is None:
            raise SystemExit(f"scenario {opts.scenario!r} is not run on {system}")
        result = await scenario(opts)
    if profiled.breakdown:
        result["profile"] = profiled.breakdown
        result["profile_detail"] = dict(list(profiled.detail.items())[:12])
    result.setdefault("version", version())
    return result


def burst_broker(opts: Options) -> str:
    """The broker of a burst: the no-op one for ``burst``, ``InMemoryBroker`` for ``execute``."""
    return "noop" if opts.scenario == "burst" else "inmemory"


# ---------------------------------------------------------------------- interval


def fires_in_window(
    fires: Iterable[tuple[str, float, float]],
    first: float,
    end: float,
    steady: list[float] | None = None,
) -> tuple[set[tuple[str, float]], list[float]]:
    """The fires scheduled in ``[first, end)``, once per job and scheduled time, and the
    lateness of each send of them in ms. ``fires``: ``(job, scheduled, sent)``, in epoch s.

    ``steady`` gets the lateness of the sends of fires scheduled in the window's second half:
    the steady state, after what the start brought (ours starts with the fires due since the
    setup process wrote the jobs, a few seconds' worth, to send first)."""
    seen: set[tuple[str, float]] = set()
    lateness: list[float] = []
    half = first + (end - first) / 2
    for job, scheduled, sent in fires:
        if first <= scheduled < end:
            seen.add((job, scheduled))
            late = (sent - scheduled) * 1000
            lateness.append(late)
            if steady is not None and scheduled >= half:
                steady.append(late)
    return seen, lateness


def interval_result(
    opts: Options,
    seen: set[tuple[str, float]],
    lateness: list[float],
    *,
    rows: int | None,
    busy: float,
    dist_what: str,
    steady: list[float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The result of ``interval``: fires done of those due (jobs x whole seconds), lateness
    (and that of the window's second half, ``steady``, see :func:`fires_in_window`)."""
    due = opts.jobs * round(opts.seconds)
    if steady is not None:
        extra["dist_steady"] = percentiles(steady)
    return {
        "done": len(seen),
        "due": due,
        "pct": 100 * len(seen) / due if due else 0.0,
        "rows": rows,
        "cpu_pct": busy,
        "dist": percentiles(lateness),
        "dist_what": dist_what,
        **extra,
    }


# ---------------------------------------------------------------------- idle


async def idle_window(
    seconds: float,
    monitor: StallMonitor,
    stop: Stop,
    *,
    start_s: float,
    start_stall: float,
    rss_base: float | None,
    rss_loaded: float | None,
    note: str | None = None,
) -> dict[str, Any]:
    """The rest of ``idle`` once the scheduler is started and settled: CPU over the first half
    of the window (without the ticker), event-loop stalls over the second half, RSS at its
    end; then ``stop()`` and the result."""
    half = max(seconds / 2, 0.5)
    busy = await cpu_percent(half)
    monitor.start()
    await asyncio.sleep(half)
    stalls = await monitor.stop()
    idle = rss_mb()
    await stop()
    result = {
        "start_s": start_s,
        "rss_base_mb": rss_base,
        "rss_loaded_mb": rss_loaded,
        "rss_mb": idle,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_pct": busy,
        "start_stall_ms": start_stall * 1000,
        "dist": percentiles([s * 1000 for s in stalls]),
        "dist_what": "event-loop stall while idle [ms]",
        "stall_cpu_ms": 1000 * monitor.cpu_of_longest(),
        "load": load_average(),
    }
    if note is not None:
        result["note"] = note
    return result


# ---------------------------------------------------------------------- propagation


def writer_command(opts: Options, count: int, *extra: str) -> list[str]:
    """``bench.py _run propagation --phase writer`` for ``count`` changes, by this interpreter."""
    command = [sys.executable, opts.bench_path, "_run", "propagation"]
    command += ["--system", opts.system, "--phase", "writer", "--db", opts.db, "--url", opts.url]
    command += ["--jobs", str(count), "--spacing", str(opts.spacing), *extra]
    return command


async def writer_pause(opts: Options, index: int) -> None:
    """The writer's pause after change ``index``: ``opts.spacing`` on average, uneven."""
    await asyncio.sleep(opts.spacing * (0.5 + (index * 7919 % 100) / 100))


async def propagate(
    opts: Options,
    broker: NoopBroker,
    stop: Stop,
    *,
    sync_interval: float,
    dist_what: str,
    writer_args: tuple[str, ...] = (),
    note: str | None = None,
) -> dict[str, Any]:
    """The rest of ``propagation`` once the scheduler runs: a writer process makes its
    changes; wait until all are sent (at most 3 sync intervals + 3 s), ``stop()``, and report
    each change's latency (send time here - the writer's clock, passed as kwarg ``t``)."""
    count = max(3, round(opts.seconds / opts.spacing))
    writer = await asyncio.create_subprocess_exec(
        *writer_command(opts, count, *writer_args),
        stdout=asyncio.subprocess.PIPE,
    )
    await writer.communicate()
    await broker.goal.wait(count, sync_interval * 3 + 3)
    await stop()
    latency = [(at - kwargs["t"]) * 1000 for at, kwargs in broker.sent_kwargs() if "t" in kwargs]
    result = {
        "seen": len(latency),
        "sent": count,
        "sync_interval_s": sync_interval,
        "dist": percentiles(latency),
        "dist_what": dist_what,
    }
    if note is not None:
        result["note"] = note
    return result
