"""Several schedulers at once (``bench.py --schedulers K``): K measuring processes of one
scenario on one database, started together; their sends merged into one result.

Each process is the scenario's usual measuring process (``bench.py _run SCENARIO --phase
measure``) with ``--start-at`` (the wall-clock time at which all of them call ``start()``)
and ``--sends-path`` (where it writes its sends once stopped). ``burst``: each waits until
the run table holds every fire, whoever sent it: the first polls the table (``--polls``)
and writes its count to ``--done-path``, the others wait for that file (K processes polling
the table would cost the database more the more of them there are). The parent (this
module) merges: fires/s over the whole run, send times or lateness over every send, sends
per process, and fires sent more than once (by one process or by two). Standard library
only (runs in the parent, which does not import taskiq).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_support.common import RESULT_MARK, percentiles
from bench_support.cpulimit import CpuQuota

SCENARIOS = ("burst", "interval", "interval-spread")
"""The scenarios that run with several schedulers."""
_STARTUP_S = 2.0  # imports and connecting before the common start, plus this per process
_STARTUP_PER_PROCESS_S = 0.7


def measure(
    command: list[str],
    schedulers: int,
    scenario: str,
    timeout: float,
    cwd: Path,
    cpu_quota: float | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``command`` (one measuring process) ``schedulers`` times at once; merge. With
    ``cpu_quota``, each process gets that share of one core (see ``cpulimit``)."""
    start_at = time.time() + _STARTUP_S + _STARTUP_PER_PROCESS_S * schedulers
    quota = CpuQuota(cpu_quota) if cpu_quota else None
    with tempfile.TemporaryDirectory(prefix="taskiq_beat_bench_sends_") as folder:
        paths = [os.path.join(folder, f"{index}.jsonl") for index in range(schedulers)]
        done = ["--done-path", os.path.join(folder, "done.json")]
        children = [
            subprocess.Popen(
                [*command, "--start-at", repr(start_at), "--sends-path", path, *done]
                + (["--polls"] if index == 0 else []),
                stdout=subprocess.PIPE,
                text=True,
                cwd=cwd,
            )
            for index, path in enumerate(paths)
        ]
        if quota is not None:
            for child in children:
                quota.place(child.pid)
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for child in children:
            try:
                out, _ = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                out, _ = child.communicate()
                errors.append(f"timed out after {timeout:.0f} s")
                continue
            result = _result_of(out) if child.returncode == 0 else None
            if result is None:
                errors.append(f"exit status {child.returncode}; output: {out[-500:]}")
            else:
                results.append(result)
        if quota is not None:
            quota.close()
        if errors:
            return None, "; ".join(errors)
        sends = [_read_sends(path) for path in paths]
    if scenario == "burst":
        return _merge_burst(results, sends, start_at), None
    return _merge_interval(results, sends), None


def _result_of(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    return None


def _read_sends(path: str) -> list[tuple[float, str, float]]:
    """``(send time, job id, scheduled time)`` of one process's sends."""
    with open(path, encoding="utf-8") as sends:
        return [tuple(json.loads(line)) for line in sends]  # type: ignore[misc]


def _shares(sends: list[list[tuple[float, str, float]]]) -> dict[str, Any]:
    """Sends per process, and sends of a fire (job, scheduled time) beyond its first."""
    per_process = [len(mine) for mine in sends]
    distinct = {(job, scheduled) for mine in sends for _, job, scheduled in mine}
    return {"per_process": per_process, "duplicates": sum(per_process) - len(distinct)}


def _merge_burst(
    results: list[dict[str, Any]], sends: list[list[tuple[float, str, float]]], start_at: float
) -> dict[str, Any]:
    """Fires/s = run rows / (the last row or send - the common start); send times after it."""
    elapsed = max(result["elapsed_s"] for result in results)
    rows = max(result["rows"] for result in results)
    times = [at - start_at for mine in sends for at, _, _ in mine]
    return {
        "rate": rows / elapsed if elapsed > 0 else 0.0,
        "fires": sum(result["fires"] for result in results),
        "rows": rows,
        "elapsed_s": elapsed,
        "start_s": max(result["start_s"] for result in results),
        "cpu_s": [result["cpu_s"] for result in results],
        "partial": any(result["partial"] for result in results),
        "dist": percentiles(times),
        "dist_what": "send time after start() [s]",
        "version": results[0]["version"],
        **_shares(sends),
    }


def _merge_interval(
    results: list[dict[str, Any]], sends: list[list[tuple[float, str, float]]]
) -> dict[str, Any]:
    """Fires done of those due in the window, by any process; lateness of every send."""
    from bench_support.scenarios import fires_in_window  # imports taskiq: only when needed

    first = results[0]["window"][0]
    end = results[0]["window"][1]
    steady: list[float] = []
    seen, lateness = fires_in_window(
        ((job, scheduled, at) for mine in sends for at, job, scheduled in mine),
        first,
        end,
        steady,
    )
    due = results[0]["due"]
    return {
        "dist_steady": percentiles(steady),
        "done": len(seen),
        "due": due,
        "pct": 100 * len(seen) / due if due else 0.0,
        "rows": max(result["rows"] or 0 for result in results),
        "cpu_pct": sum(result["cpu_pct"] for result in results),
        "dist": percentiles(lateness),
        "dist_what": results[0]["dist_what"],
        "version": results[0]["version"],
        **_shares(sends),
    }


def describe(row: dict[str, Any]) -> str:
    """Sends per process and duplicates, for the row's notes."""
    shares = " / ".join(f"{count:,}" for count in row["per_process"])
    text = f"sends per scheduler {shares}; sent twice: {row['duplicates']:,}"
    if "cpu_s" in row:  # burst: each process's CPU from start() until every row was there
        cpu = " / ".join(f"{seconds:.2f}" for seconds in row["cpu_s"])
        text += f"; CPU per scheduler {cpu} s"
    return text
