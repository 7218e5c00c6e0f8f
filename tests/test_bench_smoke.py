"""Smoke test of ``scripts/bench.py``: every scenario runs end to end, tiny, and prints its row.

Nothing is asserted about the numbers (benchmarks are not tests): only that each scenario
runs through the same code path as a real run (fresh processes, a fresh database, the
public API) and reports its table row without an error. SQLite always; PostgreSQL when it
answers. To keep this file within ~20 s, the runs start at once (in parallel, two groups of
scenarios per database), and ``--inline-setup`` loads the 20 jobs in the measuring process
instead of in a process of its own. The first SQLite group also passes
``--switch-interval``, which its rows must report as set in the measuring processes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import redis_url_or_skip
from tests.utils import PG_HOST, PG_PORT, postgres_unavailable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
SWITCH = ["--switch-interval", "0.001"]  # for the first SQLite group
GROUPS = {
    "sqlite": [
        ["ceiling", "ceiling-exec", "bulk", "burst", "execute"],
        ["interval", "interval-spread", "idle", "propagation"],
    ],
    "postgres": [
        ["bulk", "burst", "execute", "interval-spread"],
        ["interval", "idle", "propagation"],
    ],
}

pytestmark = pytest.mark.timeout(90)

Runs = dict[str, list[tuple[list[str], "subprocess.Popen[str]"]] | str]


def _postgres_problem() -> str | None:
    """``None`` when PostgreSQL answers (asked the way bench.py asks), else why not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_support.common import postgres_answers
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return asyncio.run(postgres_answers())


def _start(db: str, scenarios: list[str], extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    command = [sys.executable, str(BENCH), *scenarios, "--db", db, *extra]
    command += ["--jobs", "20", "--seconds", "1", "--chunk", "7", "--inline-setup"]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    """Every bench run, started together; for PostgreSQL, why it cannot run if it cannot."""
    first, *others = GROUPS["sqlite"]
    started: Runs = {
        "sqlite": [
            (first, _start("sqlite", first, tuple(SWITCH))),
            *((group, _start("sqlite", group)) for group in others),
        ]
    }
    problem = _postgres_problem()
    if problem is None:
        started["postgres"] = [(group, _start("postgres", group)) for group in GROUPS["postgres"]]
    else:
        started["postgres"] = problem
    yield started
    for value in started.values():
        for _, process in value if isinstance(value, list) else []:
            if process.poll() is None:
                process.kill()
                process.communicate()


def _check(value: list[tuple[list[str], subprocess.Popen[str]]] | str) -> list[str]:
    """Check every run's rows; return the rows of the first run."""
    assert isinstance(value, list)
    first: list[str] = []
    for scenarios, process in value:
        stdout, stderr = process.communicate(timeout=80)
        assert process.returncode == 0, stdout + stderr
        lines = stdout.splitlines()
        for scenario in scenarios:
            rows = [line for line in lines if line.startswith(f"| {scenario}: ")]
            assert rows, f"no row for {scenario}:\n{stdout}\n{stderr}"
            for row in rows:
                assert "failed" not in row, row
                assert "timed out" not in row, row
            if process is value[0][1]:
                first += rows
        if "ceiling" in scenarios:  # each other scenario beside a ceiling measured before it
            others = [name for name in scenarios if not name.startswith("ceiling")]
            ceilings = [line for line in lines if line.startswith("| ceiling: ")]
            # the first, and one before each other scenario (execute has ceiling-exec's)
            assert len(ceilings) == 1 + len([n for n in others if n != "execute"]), stdout
            for name in ("bulk", "burst"):  # (execute: beside ceiling-exec's, below)
                rows = [line for line in lines if line.startswith(f"| {name}: ")]
                assert all(row.split(" | ")[-3].endswith("/s") for row in rows), stdout
            bursts = [line for line in lines if line.startswith("| burst: ")]
            assert all("% of the ceiling" in row for row in bursts), stdout
        executes = [line for line in lines if line.startswith("| execute: ")]
        ceilings = [line for line in lines if line.startswith("| ceiling-exec: ")]
        if executes:  # each with a ceiling of its own, measured just before it
            assert len(ceilings) == len(executes), stdout
            assert all("% of ceiling-exec" in row for row in executes), stdout
    return first


def test_sqlite_every_scenario_prints_its_row(runs: Runs) -> None:
    switched = _check(runs["sqlite"])
    assert switched
    assert all(f"switch interval {SWITCH[1]} s" in row for row in switched), switched


def test_postgres_every_scenario_prints_its_row(runs: Runs) -> None:
    problem = runs["postgres"]
    if isinstance(problem, str):
        postgres_unavailable(OSError(f"{PG_HOST}:{PG_PORT}: {problem}"))
    _check(problem)


def test_lifecycle_interval_prints_its_rows() -> None:
    """``bench_lifecycle.py --interval``: a real worker, recording off then on, one row each."""
    redis_url = redis_url_or_skip()
    command = [sys.executable, str(ROOT / "scripts" / "bench_lifecycle.py"), "--db", "sqlite"]
    command += ["--jobs", "5", "--interval", "1", "--rounds", "1", "--max-wait", "20"]
    command += ["--redis-url", redis_url, "--ref", "worktree"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=80)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| sqlite | ")]
    assert [row.split(" | ")[1] for row in rows] == ["off", "on"], done.stdout
    for row in rows:
        assert "ERROR" not in row, row
        assert "5 x 1" in row, row
