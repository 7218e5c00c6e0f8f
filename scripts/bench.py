#!/usr/bin/env python
"""Benchmarks of taskiq-beat: one scenario per fresh process, one table row per scenario.

    python scripts/bench.py [SCENARIO ...|all] [--db sqlite|postgres|mariadb|both|all]
                            [--jobs N]
                            [--seconds S] [--vs] [--systems ours,taskiq,beat140] ...

Scenarios (see scripts/README.md for what each measures and its target):

    ceiling       raw kiq on a no-op broker, no scheduler (the ceiling of any scheduler)
    ceiling-exec  raw kiq + execute on InMemoryBroker, no scheduler
    bulk          creating jobs with upsert_many (jobs/s)
    burst         N jobs all due: claim + kiq + run row on a no-op broker (fires/s)
    execute       the same on InMemoryBroker executing a no-op task (% of ceiling-exec)
    interval      N jobs every 1 s for S seconds, all due on the same instant:
                  fires done / due, lateness
    interval-spread  the same with the jobs' phases spread evenly over the second
    idle          N jobs due in an hour: start() time, RSS, CPU, event-loop stalls
    propagation   jobs changed by another process: time until this scheduler sends them

Each scenario runs in fresh processes: ``bench.py _run SCENARIO --phase setup`` fills a new
database (a new SQLite file, or a new PostgreSQL or MariaDB database that is dropped
afterwards; ``--db mysql`` is the same as ``mariadb``: any server asyncmy reaches), then
``bench.py _run SCENARIO --phase measure`` measures, and prints its result as one JSON line.
``--vs`` (or ``scripts/compare.py``) runs the same scenarios on Taskiq's ``TaskiqScheduler``
and on taskiq-beat 1.4.0 (in a Python 3.12 venv under ``.bench-venvs/``) and prints ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_support import several  # noqa: E402
from bench_support.common import (  # noqa: E402
    RESULT_MARK,
    Options,
    create_mariadb_database,
    create_pg_database,
    drop_mariadb_database,
    drop_pg_database,
    emit,
    mariadb_answers,
    mariadb_url,
    postgres_answers,
    postgres_url,
    server_cpu_seconds,
    sqlite_url,
)

ROOT = SCRIPTS.parent
BENCH = SCRIPTS / "bench.py"
BEAT140_VENV = ROOT / ".bench-venvs" / "taskiq-beat-1.4.0"
BEAT140_REQUIREMENTS = ["taskiq-beat==1.4.0", "aiosqlite", "asyncpg", "greenlet"]

SCENARIOS = [
    "ceiling",
    "ceiling-exec",
    "bulk",
    "burst",
    "execute",
    "interval",
    "interval-spread",
    "idle",
    "propagation",
]
DEFAULT_JOBS = {
    "ceiling": 100_000,
    "ceiling-exec": 100_000,
    "bulk": 100_000,
    "burst": 100_000,
    "execute": 100_000,
    "interval": 10_000,
    "interval-spread": 10_000,
    "idle": 100_000,
    "propagation": 10_000,
}
DEFAULT_SECONDS = {"interval": 30.0, "interval-spread": 30.0, "idle": 20.0, "propagation": 5.0}
TITLES = {
    "ceiling": "raw kiq, no-op broker",
    "ceiling-exec": "raw kiq + execute, InMemoryBroker",
    "bulk": "bulk upsert of new jobs",
    "burst": "all due, no-op broker",
    "execute": "all due, InMemoryBroker executing",
    "interval": "every 1 s, all on the same instant",
    "interval-spread": "every 1 s, phases spread over the second",
    "idle": "idle (next fire in 1 h)",
    "propagation": "change from another process",
}
TARGETS = {
    "ceiling": "(ceiling)",
    "ceiling-exec": "(ceiling)",
    "bulk": ">= 10,000 jobs/s",
    "burst": ">= 20,000 fires/s",
    "execute": ">= 60 % of ceiling-exec",
    "interval": "100 %; p99 <= 50 ms",
    "interval-spread": "100 %; p99 <= 50 ms",
    "idle": "CPU <= 2 %, stall <= 20 ms, RSS <= 150 MB, start <= 1 s",
    "propagation": "<= sync interval; PG <= 100 ms",
}
DIST_UNIT = {
    "burst": "s",
    "execute": "s",
    "bulk": "s",
    "interval": "ms",
    "interval-spread": "ms",
    "idle": "ms",
    "propagation": "ms",
}
SYSTEM_NAMES = {
    "ours": "taskiq-beat (this repo)",
    "taskiq": "TaskiqScheduler",
    "beat140": "taskiq-beat 1.4.0",
    "kiq": "kiq only",
}
SYSTEMS = ["ours", "taskiq", "beat140"]


# ---------------------------------------------------------------------- child processes


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py _run")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--system", choices=[*SYSTEMS, "kiq"], required=True)
    parser.add_argument(
        "--phase", choices=["setup", "measure", "writer", "both"], default="measure"
    )
    parser.add_argument("--db", default="sqlite")
    parser.add_argument("--url", default="")
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--setup", choices=["auto", "api", "clone"], default="auto")
    parser.add_argument("--max-wait", type=float, default=120.0)
    parser.add_argument("--config", default="{}", help="SchedulerConfig fields as JSON")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--spacing", type=float, default=0.25)
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--switch-interval", type=float, default=None)
    parser.add_argument("--send-cost-us", type=float, default=0.0)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--sends-path", default="")
    parser.add_argument("--done-path", default="")
    parser.add_argument("--polls", action="store_true")
    return parser


def child_main(argv: Sequence[str]) -> None:
    """``bench.py _run ...``: run one phase of one scenario and print its result line."""
    args = _child_parser().parse_args(argv)
    if args.log_level:
        import logging

        logging.basicConfig(  # the process id: several schedulers log to one terminal
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(relativeCreated)6.0f %(process)d %(levelname)s %(name)s: %(message)s",
        )
    opts = Options(
        scenario=args.scenario,
        system=args.system,
        phase=args.phase,
        db=args.db,
        url=args.url,
        jobs=args.jobs,
        seconds=args.seconds,
        chunk=args.chunk,
        setup=args.setup,
        max_wait=args.max_wait,
        config=json.loads(args.config),
        profile=args.profile,
        bench_path=str(BENCH),
        redis_url=args.redis_url,
        prefix=args.prefix,
        spacing=args.spacing,
        send_cost=args.send_cost_us / 1e6,
        start_at=args.start_at,
        sends_path=args.sends_path,
        done_path=args.done_path,
        polls=args.polls,
    )
    if args.system == "ours":
        from bench_support import ours as module
    elif args.system == "beat140":
        from bench_support import beat140 as module  # type: ignore[no-redef]
    else:
        from bench_support import taskiq_sched as module  # type: ignore[no-redef]
    if args.switch_interval is not None and args.phase != "setup":
        sys.setswitchinterval(args.switch_interval)
    if args.phase == "both":  # --inline-setup: setup, then measure, in this one process

        async def both(opts: Options) -> dict[str, Any]:
            return {**await module.setup(opts), **await module.measure(opts)}

        result = asyncio.run(both(opts))
    else:
        phase: Callable[[Options], Any] = getattr(module, args.phase)
        result = asyncio.run(phase(opts))
    if args.switch_interval is not None:
        result["note"] = "; ".join(
            filter(None, [result.get("note"), f"switch interval {sys.getswitchinterval():g} s"])
        )
    emit(result)


# ---------------------------------------------------------------------- the parent


@dataclasses.dataclass
class Plan:
    scenarios: list[str]
    systems: list[str]
    dbs: list[str]
    jobs: int | None
    seconds: float | None
    chunk: int
    setup: str
    max_wait: float
    config: dict[str, Any]
    profile: str | None
    log_level: str | None
    python312: str | None
    redis_url: str
    inline_setup: bool = False
    switch_interval: float | None = None
    schedulers: list[int] | None = None
    send_cost_us: float = 0.0
    cpu_quota: float | None = None


def _run_child(
    python: str, arguments: list[str], timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``python bench.py _run ...``; return its result, or ``None`` and the error."""
    command = [python, str(BENCH), "_run", *arguments]
    try:
        completed = subprocess.run(
            command, stdout=subprocess.PIPE, timeout=timeout, text=True, check=False, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARK) and completed.returncode == 0:
            return json.loads(line[len(RESULT_MARK) :]), None
    return None, f"exit status {completed.returncode}; output: {completed.stdout[-500:]}"


class Database:
    """A fresh database for one scenario run: an SQLite file, a PostgreSQL or a MariaDB
    database."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.url = ""
        self._dir: str | None = None
        self._pg_name: str | None = None
        self._mariadb_name: str | None = None

    def __enter__(self) -> Database:
        if self.kind == "sqlite":
            self._dir = tempfile.mkdtemp(prefix="taskiq_beat_bench_")
            self.url = sqlite_url(os.path.join(self._dir, "bench.sqlite3"))
        elif self.kind == "postgres":
            self._pg_name = asyncio.run(create_pg_database())
            self.url = postgres_url(self._pg_name)
        elif self.kind == "mariadb":
            self._mariadb_name = asyncio.run(create_mariadb_database())
            self.url = mariadb_url(self._mariadb_name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._pg_name is not None:
            asyncio.run(drop_pg_database(self._pg_name))
        if self._mariadb_name is not None:
            asyncio.run(drop_mariadb_database(self._mariadb_name))


def _python_for(system: str, plan: Plan) -> str | None:
    if system == "beat140":
        return plan.python312
    return sys.executable


def run_one(
    plan: Plan, system: str, scenario: str, db: str, schedulers: int | None = None
) -> dict[str, Any]:
    """Setup and measure one scenario of one system on one database, each in a new process
    (with ``schedulers``, that many measuring processes at once, see ``several``)."""
    jobs = plan.jobs if plan.jobs is not None else DEFAULT_JOBS[scenario]
    seconds = plan.seconds if plan.seconds is not None else DEFAULT_SECONDS.get(scenario, 0.0)
    row: dict[str, Any] = {"system": system, "scenario": scenario, "db": db, "jobs": jobs}
    row["seconds"] = seconds
    if schedulers is not None:
        row["schedulers"] = schedulers
        row["send_cost_us"] = plan.send_cost_us
        row["cpu_quota"] = plan.cpu_quota
    python = _python_for(system, plan)
    if python is None:
        row["error"] = "skipped: no Python >= 3.12 for taskiq-beat 1.4.0"
        return row
    common = ["--system", system, "--jobs", str(jobs), "--seconds", str(seconds)]
    common += ["--chunk", str(plan.chunk), "--setup", plan.setup]
    common += ["--max-wait", str(plan.max_wait), "--config", json.dumps(plan.config)]
    common += [
        "--redis-url",
        plan.redis_url,
        "--prefix",
        f"taskiq_beat_bench_{uuid.uuid4().hex[:8]}",
    ]
    if plan.log_level:
        common += ["--log-level", plan.log_level]
    if plan.switch_interval is not None:
        common += ["--switch-interval", str(plan.switch_interval)]
    if plan.send_cost_us:
        common += ["--send-cost-us", str(plan.send_cost_us)]
    timeout = plan.max_wait + seconds + 600
    print(f"[bench] {system} / {db} / {scenario}: {jobs:,} jobs ...", file=sys.stderr, flush=True)
    with Database(db) as database:
        common += ["--db", db, "--url", database.url]
        setup: dict[str, Any] | None = {}
        if not plan.inline_setup:
            setup, error = _run_child(python, [scenario, "--phase", "setup", *common], timeout)
            if setup is None:
                row["error"] = f"setup failed: {error}"
                return row
        phase = "both" if plan.inline_setup else "measure"
        measure_args = [scenario, "--phase", phase, *common]
        if plan.profile:
            os.makedirs(plan.profile, exist_ok=True)
            path = os.path.join(plan.profile, f"{system}-{scenario}-{db}.txt")
            measure_args += ["--profile", path]
        row["load_before"] = os.getloadavg()[0]
        before = _cpu_times()
        server_before = server_cpu_seconds(db)
        if schedulers is None:
            result, error = _run_child(python, measure_args, timeout)
        else:
            result, error = several.measure(
                [python, str(BENCH), "_run", *measure_args],
                schedulers,
                scenario,
                timeout,
                ROOT,
                cpu_quota=plan.cpu_quota,
            )
        row["stolen"] = _stolen_share(before, _cpu_times())
        server_after = server_cpu_seconds(db)
        # (With --inline-setup the measuring process writes the jobs too: not counted.)
        if server_before is not None and server_after is not None and not plan.inline_setup:
            row["server_cpu_s"] = server_after - server_before
    if result is None:
        row["error"] = f"measure failed: {error}"
        return row
    row.update(setup or {})
    row.update(result)
    return row


def _cpu_times() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``: user, nice, system, idle, iowait,
    irq, softirq, steal), or ``None`` where there is no such file."""
    try:
        with open("/proc/stat") as stat:
            return [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def _stolen_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the CPU time that passed between two readings, the share a virtual machine's host
    took for others (steal): the cores a scenario had were that much slower than idle ones."""
    if before is None or after is None:
        return None
    deltas = [late - early for early, late in zip(before, after, strict=False)]
    total = sum(deltas)
    return deltas[7] / total if total > 0 else None


def _dbs_for(system: str, scenario: str, dbs: list[str]) -> list[str]:
    if system == "kiq":
        return ["-"]
    if system == "taskiq":
        return ["redis"] if scenario in ("bulk", "propagation") else ["memory"]
    return dbs


def _systems_for(scenario: str, systems: list[str]) -> list[str]:
    if scenario.startswith("ceiling"):
        return ["kiq"]
    if scenario == "interval-spread":
        # TaskiqScheduler ticks on whole seconds and 1.4.0 drops sub-second start times:
        # neither can spread phases within the second; their "interval" row is the same.
        return [system for system in systems if system == "ours"]
    return systems


def _schedulers_for(system: str, scenario: str, plan: Plan) -> list[int | None]:
    """``--schedulers``: the numbers of schedulers run at once (ours, burst and interval)."""
    if plan.schedulers is None or system != "ours" or scenario not in several.SCENARIOS:
        return [None]
    return list(plan.schedulers)


def run_plan(plan: Plan) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    scenarios = list(plan.scenarios)
    if "execute" in scenarios and "ceiling-exec" in scenarios:
        scenarios.remove("ceiling-exec")  # each execute row comes after one of its own
    print(TABLE_HEADER, flush=True)
    measured_ceiling = False
    for scenario in scenarios:
        if measured_ceiling and not scenario.startswith("ceiling") and scenario != "execute":
            # Each scenario's rows beside a ceiling measured just before them (as execute's
            # beside ceiling-exec): the rows of one run can then be set against their own.
            ceiling = run_one(plan, "kiq", "ceiling", "-")
            results.append(ceiling)
            print(format_row(ceiling), flush=True)
        measured_ceiling = measured_ceiling or scenario == "ceiling"
        for system in _systems_for(scenario, plan.systems):
            for db in _dbs_for(system, scenario, plan.dbs):
                if scenario == "execute":
                    # The share is of a ceiling measured just before, not minutes before:
                    # this machine's speed moves by a third within a quarter of an hour.
                    ceiling = run_one(plan, "kiq", "ceiling-exec", "-")
                    results.append(ceiling)
                    print(format_row(ceiling), flush=True)
                for schedulers in _schedulers_for(system, scenario, plan):
                    row = run_one(plan, system, scenario, db, schedulers)
                    _add_ratio(row, results)
                    results.append(row)
                    print(format_row(row), flush=True)
    return results


def _add_ratio(row: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    """The ceiling a row is set against: for ``execute`` the ``ceiling-exec`` row measured
    last before it (and the row's share of it), for the others the last ``ceiling`` row's
    labelled ``kiq`` rate, if the run measured one."""
    if row["scenario"].startswith("ceiling"):
        return
    wanted = "ceiling-exec" if row["scenario"] == "execute" else "ceiling"
    for other in reversed(earlier):
        if other["scenario"] == wanted and other.get("rate"):
            row["ceiling_rate"] = other["rate"]
            if "rate" in row:
                row["ratio"] = row["rate"] / other["rate"]
            return


# ---------------------------------------------------------------------- the table

TABLE_HEADER = (
    "| scenario | system | db | jobs | result | p50 | p99 | max | ceiling | target | met |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _dist(row: dict[str, Any]) -> list[str]:
    dist = row.get("dist") or {}
    unit = DIST_UNIT.get(row["scenario"], "")
    digits = 3 if unit == "s" else 1
    cells = []
    for key in ("p50", "p99", "max"):
        value = dist.get(key)
        cells.append("-" if value is None else f"{value:,.{digits}f} {unit}")
    return cells


def describe(row: dict[str, Any]) -> str:
    """The main result of a row, in words."""
    scenario = row["scenario"]
    if scenario == "ceiling":
        each = f"{1e6 / row['rate']:.0f} µs each; " if row["rate"] else ""
        return f"{_n(row['rate'])} kiq/s ({each}plain `task.kiq()`: {_n(row['plain_rate'])}/s)"
    if scenario == "ceiling-exec":
        return f"{_n(row['rate'])} kiq+execute/s"
    if scenario in ("burst", "execute"):
        text = f"{_n(row['rate'])} fires/s"
        if "ratio" in row:
            text += f" = {100 * row['ratio']:.0f} % of " + (
                "ceiling-exec" if scenario == "execute" else "the ceiling"
            )
        text += f" ({_n(row['fires'])} sent"
        if row.get("rows") is not None:
            text += f", {_n(row['rows'])} run rows"
        text += f", {row['elapsed_s']:.2f} s; start() {row['start_s']:.2f} s)"
        text += _cpu_per_fire(row)
        if row.get("partial"):
            text += f" PARTIAL: stopped after --max-wait of {_n(row['fires'])} fires"
        return text
    if scenario in ("interval", "interval-spread"):
        text = f"{_n(row['done'])} / {_n(row['due'])} fires done = {row['pct']:.1f} %"
        if row.get("seconds") and row.get("ceiling_rate"):
            rate = row["done"] / row["seconds"]
            text += f" ({_n(rate)}/s = {100 * rate / row['ceiling_rate']:.0f} % of the ceiling)"
        if row.get("sent") is not None:
            text += f" ({_n(row['sent'])} sends in all, also of fires due before the window)"
        steady = row.get("dist_steady") or {}
        if steady.get("n"):
            text += (
                f"; lateness in the window's second half p50 {steady['p50']:,.0f} ms,"
                f" p99 {steady['p99']:,.0f} ms"
            )
        return text + f"; CPU {row['cpu_pct']:.0f} %"
    if scenario == "idle":
        return (
            f"CPU {row['cpu_pct']:.2f} %; RSS {_n(row['rss_mb'])} MB (before start() "
            f"{_n(row['rss_base_mb'])}, peak {_n(row['peak_rss_mb'])}); start() "
            f"{row['start_s']:.2f} s (its stall {_n(row['start_stall_ms'])} ms); longest stall: "
            f"{_n(row['stall_cpu_ms'])} ms CPU of this process in it (load {_n(row['load'], 1)})"
        )
    if scenario == "bulk":
        text = f"{_n(row['rate'])} jobs/s"
        if row.get("update_rate") is not None:
            text += f"; again (updates) {_n(row['update_rate'])}/s"
        if row.get("single_rate") is not None:
            text += f"; `.upsert()` alone {_n(row['single_rate'])}/s"
        return text
    if scenario == "propagation":
        return (
            f"{row['seen']} / {row['sent']} changes seen; sync interval {row['sync_interval_s']} s"
        )
    return "?"


def _cpu_per_fire(row: dict[str, Any]) -> str:
    """CPU a fire: the scheduler processes' (from ``start()`` until every row was there)
    and the database server's (the whole measuring phase), where measured."""
    fires = row.get("fires") or 0
    cpu = row.get("cpu_s")
    if not fires or cpu is None:
        return ""
    scheduler = sum(cpu) if isinstance(cpu, list) else cpu
    text = f"; CPU a fire: scheduler {1e6 * scheduler / fires:,.0f} µs"
    if row.get("server_cpu_s") is not None:
        text += f", database server {1e6 * row['server_cpu_s'] / fires:,.0f} µs"
    return text


def verdict(row: dict[str, Any]) -> str:
    """Whether this repository's scheduler meets the issue's target (other systems: blank)."""
    if row["system"] != "ours" or "error" in row:
        return ""
    scenario = row["scenario"]
    dist = row.get("dist") or {}
    misses: list[str] = []
    if scenario == "burst" and row["rate"] < 20_000:
        misses.append("rate")
    if scenario == "execute" and row.get("ratio", 0) < 0.60:
        misses.append("ratio")
    if scenario in ("interval", "interval-spread"):
        if row["done"] < row["due"]:
            misses.append("done")
        if (dist.get("p99") or 0) > 50:
            misses.append("p99")
    if scenario == "idle":
        if row["cpu_pct"] > 2:
            misses.append("CPU")
        if (dist.get("max") or 0) > 20:
            misses.append("stall")
        if (row["rss_mb"] or 0) > 150:
            misses.append("RSS")
        if row["start_s"] > 1:
            misses.append("start")
    if scenario == "bulk" and row["rate"] < 10_000:
        misses.append("rate")
    if scenario == "propagation":
        limit = 100.0 if row["db"] == "postgres" else 1000 * row["sync_interval_s"]
        if row["seen"] < row["sent"]:
            misses.append("missed")
        if (dist.get("max") or 0) > limit:
            misses.append("latency")
    return "yes" if not misses else "NO: " + ", ".join(misses)


def format_row(row: dict[str, Any]) -> str:
    title = f"{row['scenario']}: {TITLES[row['scenario']]}"
    system = row.get("version") or SYSTEM_NAMES[row["system"]]
    if row.get("schedulers") is not None:
        system += f" x {row['schedulers']} schedulers"
        if row.get("send_cost_us"):
            system += f", {row['send_cost_us']:g} µs CPU a send"
        if row.get("cpu_quota"):
            system += f", {row['cpu_quota']:g} core each"
    jobs = _n(row["jobs"])
    if row.get("seconds") and row["scenario"] in DEFAULT_SECONDS:
        jobs += f" x {row['seconds']:g} s"
    if "error" in row:
        cells = [title, system, row["db"], jobs, row["error"], "-", "-", "-"]
    else:
        result = describe(row)
        notes = [row[key] for key in ("setup", "note") if row.get(key)]
        if row.get("setup") and row.get("setup_rate"):
            notes[0] = f"setup: {row['setup']} at {_n(row['setup_rate'])} jobs/s"
        if (row.get("load_before") or 0) >= 0.5:
            notes.append(f"machine load {row['load_before']:.1f} before it")
        if (row.get("stolen") or 0) >= 0.02:
            notes.append(f"{row['stolen']:.0%} of the CPU taken by the VM host meanwhile")
        if row.get("per_process") is not None:
            notes.append(several.describe(row))
        if notes:
            result += " [" + "; ".join(notes) + "]"
        cells = [title, system, row["db"], jobs, result, *_dist(row)]
    ceiling = row.get("ceiling_rate")
    cells += [
        "-" if ceiling is None else f"{_n(ceiling)}/s",
        TARGETS[row["scenario"]],
        verdict(row),
    ]
    return "| " + " | ".join(cells) + " |"


RATIO_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    # scenario: (label, key or "dist.<key>", higher is better)
    "bulk": [("jobs/s", "rate", True)],
    "burst": [("fires/s", "rate", True), ("start() s", "start_s", False)],
    "execute": [("fires/s", "rate", True)],
    "interval": [("% done", "pct", True), ("lateness p99 ms", "dist.p99", False)],
    "interval-spread": [("% done", "pct", True), ("lateness p99 ms", "dist.p99", False)],
    "idle": [
        ("CPU %", "cpu_pct", False),
        ("stall max ms", "dist.max", False),
        ("RSS MB", "rss_mb", False),
        ("start() s", "start_s", False),
    ],
    "propagation": [("latency p50 ms", "dist.p50", False), ("latency max ms", "dist.max", False)],
}


def _metric(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or "error" in row:
        return None
    value = (row.get("dist") or {}).get(key[5:]) if key.startswith("dist.") else row.get(key)
    return None if value is None else float(value)


def ratio_table(results: list[dict[str, Any]]) -> str:
    """Ours against the others, per scenario and metric: "x times better" (>1 is better)."""

    def find(system: str, scenario: str, db: str | None) -> dict[str, Any] | None:
        for row in results:
            same = row["system"] == system and row["scenario"] == scenario
            if same and (db is None or row["db"] == db):
                return row
        return None

    def cell(ours: float | None, other: float | None, higher: bool) -> str:
        if ours is None or other is None or ours == 0 or other == 0:
            return "-"
        factor = ours / other if higher else other / ours
        return f"{factor:,.1f}x"

    lines = [
        "| scenario | metric | db | ours | TaskiqScheduler | ours better by | "
        "taskiq-beat 1.4.0 | ours better by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, metrics in RATIO_METRICS.items():
        for db in sorted({r["db"] for r in results if r["system"] == "ours"}):
            ours_row = find("ours", scenario, db)
            if ours_row is None:
                continue
            taskiq_row = find("taskiq", scenario, None)
            old_row = find("beat140", scenario, db)
            for label, key, higher in metrics:
                ours, taskiq, old = (_metric(r, key) for r in (ours_row, taskiq_row, old_row))
                lines.append(
                    f"| {scenario} | {label} | {db} | {_fmt(ours)} | {_fmt(taskiq)} | "
                    f"{cell(ours, taskiq, higher)} | {_fmt(old)} | {cell(ours, old, higher)} |"
                )
    return "\n".join(lines)


def profile_tables(results: list[dict[str, Any]]) -> str:
    """The ``--profile`` breakdowns: seconds, share, and microseconds per fire, per bucket."""
    out: list[str] = []
    for row in results:
        breakdown: dict[str, float] = row.get("profile") or {}
        if not breakdown:
            continue
        fires = row.get("fires") or row.get("done") or 0
        total = sum(breakdown.values()) or 1.0
        out.append(
            f"\nProfile of {row['system']} / {row['db']} / {row['scenario']} "
            f"({_n(fires)} fires; main thread, wall time):\n"
        )
        out.append("| where | seconds | share | per fire |\n|---|---|---|---|")
        for name, seconds in breakdown.items():
            per_fire = f"{1e6 * seconds / fires:,.1f} us" if fires else "-"
            out.append(f"| {name} | {seconds:.2f} | {100 * seconds / total:.1f} % | {per_fire} |")
        for name, seconds in (row.get("profile_detail") or {}).items():
            per_fire = f"{1e6 * seconds / fires:,.1f} us" if fires else "-"
            out.append(f"| - of which in `{name}` | {seconds:.2f} | | {per_fire} |")
    return "\n".join(out)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


# ---------------------------------------------------------------------- taskiq-beat 1.4.0


def _python312_candidates() -> list[str]:
    found = []
    if os.environ.get("BENCH_PYTHON312"):
        found.append(os.environ["BENCH_PYTHON312"])
    for name in ("python3.14", "python3.13", "python3.12"):
        path = shutil.which(name)
        if path:
            found.append(path)
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        for version in sorted(pyenv.iterdir(), reverse=True):
            for name in ("python3.14", "python3.13", "python3.12"):
                if (version / "bin" / name).exists():
                    found.append(str(version / "bin" / name))
    return found


def _works(python: str) -> bool:
    check = "import sys, venv; sys.exit(sys.version_info < (3, 12))"
    try:
        return (
            subprocess.run([python, "-c", check], capture_output=True, timeout=30).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_beat140() -> str | None:
    """The interpreter of a venv holding taskiq-beat 1.4.0, made on first use; ``None``
    (with a message) when no Python >= 3.12 is available or the install fails."""
    python = BEAT140_VENV / "bin" / "python"
    if python.exists() and _installed_140(str(python)):
        return str(python)
    base = next((p for p in _python312_candidates() if _works(p)), None)
    if base is None:
        print("[bench] taskiq-beat 1.4.0 skipped: no Python >= 3.12 found", file=sys.stderr)
        return None
    print(f"[bench] creating {BEAT140_VENV} with {base}", file=sys.stderr, flush=True)
    try:
        subprocess.run([base, "-m", "venv", str(BEAT140_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *BEAT140_REQUIREMENTS], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"[bench] taskiq-beat 1.4.0 skipped: install failed: {exc}", file=sys.stderr)
        return None
    return str(python) if _installed_140(str(python)) else None


def _installed_140(python: str) -> bool:
    check = "from importlib.metadata import version; assert version('taskiq-beat') == '1.4.0'"
    return subprocess.run([python, "-c", check], capture_output=True, cwd="/").returncode == 0


# ---------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help="any of: " + ", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--db",
        choices=["sqlite", "postgres", "mariadb", "mysql", "both", "all"],
        default="both",
        help="both: SQLite and PostgreSQL; all: and MariaDB (mysql: the same as mariadb)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="jobs in every scenario")
    parser.add_argument("--seconds", type=float, default=None, help="duration of timed ones")
    parser.add_argument("--vs", action="store_true", help="also TaskiqScheduler and 1.4.0")
    parser.add_argument(
        "--systems", default=None, help="comma list of ours,taskiq,beat140 (default: ours)"
    )
    parser.add_argument("--chunk", type=int, default=10_000, help="jobs per upsert_many()")
    parser.add_argument(
        "--setup",
        choices=["auto", "api", "clone"],
        default="auto",
        help="how non-bulk scenarios load jobs: upsert_many (api), copied rows (clone), "
        "or auto (api up to 200k jobs)",
    )
    parser.add_argument("--max-wait", type=float, default=120.0, help="cap per burst, s")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a SchedulerConfig field (JSON value), e.g. --set dispatch_batch_size=1024",
    )
    parser.add_argument("--profile", default=None, metavar="DIR", help="pyinstrument reports")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all results")
    parser.add_argument("--log-level", default=None, help="configure logging in the children")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="S",
        help="sys.setswitchinterval(S) in the measuring processes (an application's setting; "
        "Python's default is 0.005)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--schedulers",
        default=None,
        metavar="K[,K...]",
        help="run burst and interval with K schedulers (processes) at once, e.g. 1,2,3",
    )
    parser.add_argument(
        "--send-cost-us",
        type=float,
        default=0.0,
        metavar="US",
        help="CPU each send of the no-op broker burns, busy-waiting (a broker that costs CPU)",
    )
    parser.add_argument(
        "--cpu-quota",
        type=float,
        default=None,
        metavar="F",
        help="with --schedulers: each scheduler process limited to F of one core (a control "
        "group each; needs a writable cgroup hierarchy), so that the schedulers' CPU is the "
        "limit rather than the machine's",
    )
    parser.add_argument(
        "--inline-setup",
        action="store_true",
        help="load the jobs in the measuring process, not in one of its own (faster; for "
        "smoke tests: RSS then includes the setup's memory)",
    )
    return parser


def _config_overrides(items: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_run"]:
        child_main(argv[1:])
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in [*SCENARIOS, "all"]]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r} (choose from {', '.join(SCENARIOS)})")
    if args.profile and importlib.util.find_spec("pyinstrument") is None:
        parser.error("--profile needs pyinstrument in this interpreter: pip install pyinstrument")
    if not args.scenarios or "all" in args.scenarios:
        scenarios = list(SCENARIOS)
    else:
        scenarios = list(dict.fromkeys(args.scenarios))
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    else:
        systems = list(SYSTEMS) if args.vs else ["ours"]
    dbs = {"both": ["sqlite", "postgres"], "all": ["sqlite", "postgres", "mariadb"]}.get(
        args.db, ["mariadb" if args.db == "mysql" else args.db]
    )
    if "postgres" in dbs:
        why = asyncio.run(postgres_answers())
        if why is not None:
            print(f"[bench] PostgreSQL skipped: {why}", file=sys.stderr)
            dbs.remove("postgres")
    if "mariadb" in dbs:
        why = asyncio.run(mariadb_answers())
        if why is not None:
            print(f"[bench] MariaDB skipped: {why}", file=sys.stderr)
            dbs.remove("mariadb")
    python312 = ensure_beat140() if "beat140" in systems else None
    plan = Plan(
        scenarios=scenarios,
        systems=systems,
        dbs=dbs,
        jobs=args.jobs,
        seconds=args.seconds,
        chunk=args.chunk,
        setup=args.setup,
        max_wait=args.max_wait,
        config=_config_overrides(args.set),
        profile=args.profile,
        log_level=args.log_level,
        python312=python312,
        redis_url=args.redis_url,
        inline_setup=args.inline_setup,
        switch_interval=args.switch_interval,
        schedulers=[int(k) for k in args.schedulers.split(",")] if args.schedulers else None,
        send_cost_us=args.send_cost_us,
        cpu_quota=args.cpu_quota,
    )
    began = datetime.now(timezone.utc)
    wall = time.perf_counter()
    print(
        f"taskiq-beat benchmarks, {began:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; command: {Path(sys.argv[0]).name} "
        f"{' '.join(sys.argv[1:])}\n",
        flush=True,
    )
    results = run_plan(plan)
    if len(systems) > 1:
        print("\nOurs against the others (same run; >1x means ours is better):\n")
        print(ratio_table(results))
    if any(row.get("profile") for row in results):
        print(profile_tables(results))
    print(f"\n(total {time.perf_counter() - wall:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=1, default=str)
    return 1 if any("error" in row for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
