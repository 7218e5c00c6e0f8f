#!/usr/bin/env python
"""Cost of per-job policies: the same burst with and without them, in one run.

    python scripts/bench_policies.py [--db sqlite|postgres|both] [--jobs N] [--rounds R]

For each database, round and mode, a fresh database (a new SQLite file, or a new PostgreSQL
database dropped afterwards) gets N periodic jobs (every hour) all due now, written with
``upsert_many``; a ``SchedulerApp`` on a no-op broker (nothing executes) then starts, and the
time from ``start()`` until every job's fire is handled (sent, or held back by its policy)
is measured. Modes:

- ``none``: no policy (the path every job without one takes);
- ``skip, room``: ``overlap="skip"``; no run is going, so each fire is counted and sent
  (the overlap check's read in the claim's transaction);
- ``skip, busy``: the same, each job with a run still going: every fire is recorded
  ``skipped`` (the check's read and its write);
- ``jitter``: ``jitter_seconds=0.001``: each fire is claimed, delayed, then sent by the
  retries path (two passes through the database);
- ``catch-up all``: ``catch_up="all"``, each job 3 fires behind, more than its grace: three
  fires per job, sent one after the other (N x 3 fires).

Printed per row: fires handled per second, and the ratio to ``none`` of the same round and
database. Printed, never asserted (see scripts/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import sqlalchemy as sa  # noqa: E402
from bench_support.common import (  # noqa: E402
    create_pg_database,
    drop_pg_database,
    postgres_answers,
    postgres_url,
    sqlite_url,
)
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from taskiq import AsyncBroker  # noqa: E402
from taskiq.message import BrokerMessage  # noqa: E402

from taskiq_beat import (  # noqa: E402
    IntervalTrigger,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
    fire_task_id,
)

TASK = "bench.noop"
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "skip, room": {"overlap": "skip"},
    "skip, busy": {"overlap": "skip"},
    "jitter": {"jitter_seconds": 0.001},
    "catch-up all": {"catch_up": "all", "misfire_grace_seconds": 0},
}
FIRES_PER_JOB = {"catch-up all": 3}


class CountingBroker(AsyncBroker):
    """Sends nowhere; counts the sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def kick(self, message: BrokerMessage) -> None:
        self.sent += 1

    async def listen(self) -> Any:  # pragma: no cover - never listened to
        raise NotImplementedError


@contextlib.asynccontextmanager
async def fresh_database(kind: str) -> AsyncIterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield sqlite_url(str(Path(directory) / "bench.sqlite3"))
        return
    name = await create_pg_database()
    try:
        yield postgres_url(name)
    finally:
        await drop_pg_database(name)


async def measure(db: str, mode: str, jobs: int, max_wait: float) -> dict[str, Any]:
    async with fresh_database(db) as url:
        engine = create_async_engine(url)
        async with engine.begin() as connection:
            await connection.run_sync(SchedulerBase.metadata.create_all)
        broker = CountingBroker()
        broker.register_task(_noop, task_name=TASK)
        app = SchedulerApp(
            broker=broker,
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
            config=SchedulerConfig(record_lifecycle=True),
        )
        now = datetime.now(timezone.utc)
        behind = FIRES_PER_JOB.get(mode, 1)
        period = timedelta(hours=1)
        # The grid's fires: ``behind`` of them are due, the last one 1 s ago.
        start_at = now - (behind - 1) * period - timedelta(seconds=1)
        trigger = PeriodicSchedule(interval=IntervalTrigger(hours=1), start_at=start_at)
        builder = app.single(TASK)
        if MODES[mode]:
            builder = builder.policy(**MODES[mode])
        async with app.session_factory() as session:
            for low in range(0, jobs, 10_000):
                await app.upsert_many(
                    session,
                    [
                        builder.definition(trigger=trigger, job_id=f"job-{index:07d}")
                        for index in range(low, min(jobs, low + 10_000))
                    ],
                )
            # Due now: each job's next fire is its grid's first (``behind`` fires ago).
            await session.execute(sa.update(SchedulerJob).values(next_run_at=start_at))
            await session.commit()
            if mode == "skip, busy":  # a run of each job still going, an hour old
                earlier = start_at - period
                await session.execute(
                    sa.insert(SchedulerRun),
                    [
                        {
                            "job_id": f"job-{index:07d}",
                            "scheduled_for": earlier,
                            "status": RunStatus.RUNNING,
                            "task_id": fire_task_id(f"job-{index:07d}", earlier),
                            "attempt": 1,
                            "created_at": now,
                            "updated_at": now,
                        }
                        for index in range(jobs)
                    ],
                )
                await session.commit()
        expected = jobs * behind
        # Sent, or recorded skipped (the runs made above stay "running": not counted).
        handled = sa.select(sa.func.count()).where(
            SchedulerRun.status.in_([RunStatus.DISPATCHED, RunStatus.SKIPPED])
        )
        began = time.perf_counter()
        await app.start()
        done = 0
        try:
            while time.perf_counter() - began < max_wait:
                await asyncio.sleep(0.05)
                async with engine.connect() as connection:
                    done = int((await connection.execute(handled)).scalar_one())
                if done >= expected:
                    break
            took = time.perf_counter() - began
        finally:
            await app.stop()
            await engine.dispose()
        return {
            "db": db,
            "mode": mode,
            "fires": expected,
            "handled": done,
            "sent": broker.sent,
            "seconds": took,
            "rate": done / took if took else None,
        }


async def _noop() -> None:  # pragma: no cover - never executed (the broker sends nowhere)
    return None


def row(result: dict[str, Any], baseline: float | None) -> str:
    ratio = f"{result['rate'] / baseline:.2f}x" if baseline and result["rate"] else "-"
    return (
        f"| {result['db']} | {result['round']} | {result['mode']} | {result['fires']:,}"
        f" | {result['handled']:,} | {result['sent']:,} | {result['seconds']:.2f}"
        f" | {result['rate']:,.0f} | {ratio} |"
    )


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in dbs and (why := await postgres_answers()) is not None:
        print(f"[bench] PostgreSQL skipped: {why}", file=sys.stderr)
        dbs.remove("postgres")
    results = []
    print("| db | round | mode | fires | handled | sent | s | fires/s | vs none |")
    print("|---|---|---|---|---|---|---|---|---|")
    for db in dbs:
        for round_ in range(1, args.rounds + 1):
            baseline = None
            for mode in MODES:
                result = await measure(db, mode, args.jobs, args.max_wait)
                result["round"] = round_
                if mode == "none":
                    baseline = result["rate"]
                print(row(result, baseline), flush=True)
                results.append(result)
    print()
    for db in dbs:
        for mode in MODES:
            if mode == "none":
                continue
            ratios = []
            for round_ in range(1, args.rounds + 1):
                mine = [
                    r for r in results if (r["db"], r["mode"], r["round"]) == (db, mode, round_)
                ]
                none = [
                    r for r in results if (r["db"], r["mode"], r["round"]) == (db, "none", round_)
                ]
                if mine and none and none[0]["rate"]:
                    ratios.append(mine[0]["rate"] / none[0]["rate"])
            if ratios:
                print(f"{db}, {mode}: median {statistics.median(ratios):.2f}x of no policy")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-wait", type=float, default=120.0)
    args = parser.parse_args(argv)
    print(
        f"taskiq-beat policies benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC;"
        f" command: bench_policies.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    results = asyncio.run(run(args))
    return 0 if all(r["handled"] >= r["fires"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
