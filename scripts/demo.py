"""A runnable tour of taskiq-beat: three jobs firing on an embedded SQLite database.

Run it with ``python scripts/demo.py`` (or ``bash scripts/demo.sh`` on a fresh machine).
It schedules

- an interval job (every 2 s, created with ``.upsert`` under the id ``demo.heartbeat``),
- a cron job with a seconds field (``second="*/5"``: at :00, :05, :10, ... of every minute),
- a 3-step chain (extract -> transform -> load) every 6 s, starting 1 s in,
- a flaky job every 3 s that fails every other run (its error is recorded),
- a slow report every second that takes 2.5 s, with the per-job policy
  ``overlap="skip"``: fires while the last report is still running are recorded ``skipped``,

runs the scheduler for 14.5 s (``--seconds N`` to change that), stops it and prints the run
history that the scheduler wrote to the database.

Everything runs in this one process: ``InMemoryBroker`` executes each task as soon as the
scheduler sends it, so no separate worker is needed; the lifecycle middleware that
``SchedulerApp`` adds to the broker writes each outcome onto its run, as it would in a
``taskiq worker`` process. The database is
``.demo/demo.sqlite3`` under the repository root, deleted and recreated at every run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import Context, InMemoryBroker, TaskiqDepends

from taskiq_beat import (
    SCHEDULED_FOR_LABEL,
    ChainStep,
    CrontabTrigger,
    IntervalTrigger,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / ".demo"

broker = InMemoryBroker()
counts: Counter[str] = Counter()


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _say(text: str) -> None:
    print(f"{_stamp()} >>> {text}", flush=True)


@broker.task(task_name="demo.heartbeat")
async def heartbeat(
    source: str,
    context: Context = TaskiqDepends(),  # noqa: B008 - Taskiq's dependency injection
) -> None:
    counts["heartbeat"] += 1
    scheduled_for = context.message.labels.get(SCHEDULED_FOR_LABEL, "?")
    _say(f"heartbeat #{counts['heartbeat']} from {source} (scheduled for {scheduled_for})")
    await asyncio.sleep(random.uniform(0.05, 0.3))  # some work: its duration is recorded


@broker.task(task_name="demo.flaky")
async def flaky() -> None:
    counts["flaky"] += 1
    if counts["flaky"] % 2 == 0:
        _say(f"flaky run #{counts['flaky']}: failing (every other run does)")
        raise ConnectionError("upstream did not answer (the demo fails every other run)")
    await asyncio.sleep(0.1)
    _say(f"flaky run #{counts['flaky']}: succeeded")


@broker.task(task_name="demo.report")
async def report() -> None:
    counts["report"] += 1
    _say(f"report #{counts['report']}: started, takes 2.5 s (fires meanwhile are skipped)")
    await asyncio.sleep(2.5)


@broker.task(task_name="demo.cron_tick")
async def cron_tick(
    context: Context = TaskiqDepends(),  # noqa: B008 - Taskiq's dependency injection
) -> None:
    counts["cron"] += 1
    team = context.message.labels.get("team", "?")  # the job's metadata arrives as labels
    _say(f"cron tick #{counts['cron']} for team {team!r} (second is a multiple of 5)")


@broker.task(task_name="demo.extract")
async def extract(source: str) -> int:
    _say(f"chain step 1/3: extract from {source!r}")
    return 3


@broker.task(task_name="demo.transform")
async def transform(*, factor: int) -> int:
    _say(f"chain step 2/3: transform (x{factor})")
    return factor


@broker.task(task_name="demo.load")
async def load(target: str) -> None:
    counts["chain"] += 1
    _say(f"chain step 3/3: load into {target!r} -- chain run #{counts['chain']} complete")


async def schedule_jobs(app: SchedulerApp, session_factory: async_sessionmaker[Any]) -> None:
    now = datetime.now(timezone.utc)
    async with session_factory() as session:
        await app.single(heartbeat, kwargs={"source": "interval"}).upsert(
            session,
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=2)),
            job_id="demo.heartbeat",
            name="heartbeat every 2 s",
        )
        await app.single(cron_tick, metadata={"team": "demo"}).upsert(
            session,
            trigger=PeriodicSchedule(crontab=CrontabTrigger(second="*/5")),
            job_id="demo.cron",
            name="cron second=*/5",
        )
        await app.chain(
            steps=[
                ChainStep(task=extract, args=["orders.csv"]),
                ChainStep(task=transform, kwargs={"factor": 2}, post_delay_ms=200),
                ChainStep(task="demo.load", args=["warehouse"], max_attempts=2),
            ],
            on_failure="stop",
            wait_poll_interval_seconds=0.1,
        ).upsert(
            session,
            trigger=PeriodicSchedule(
                interval=IntervalTrigger(seconds=6), start_at=now + timedelta(seconds=1)
            ),
            job_id="demo.chain",
            name="3-step chain every 6 s",
        )
        await app.single(flaky).upsert(
            session,
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=3)),
            job_id="demo.flaky",
            name="flaky every 3 s",
        )
        await (
            app.single(report)
            .policy(overlap="skip")
            .upsert(
                session,
                trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=1)),
                job_id="demo.report",
                name="slow report every 1 s, overlap=skip",
            )
        )
        for job in await app.list_jobs(session):
            _say(f"job {job.id!r} ({job.strategy.value}) first fire at {_clock(job.next_run_at)}")


def _clock(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%H:%M:%S.%f")[:-3]


def _delay(run: SchedulerRun) -> str:
    if run.dispatched_at is None:
        return "-"
    return f"{(run.dispatched_at - run.scheduled_for).total_seconds() * 1000:.0f} ms"


def _duration(run: SchedulerRun) -> str:
    if run.duration_seconds is None:
        return "-"
    return f"{run.duration_seconds * 1000:.0f} ms"


def _error(run: SchedulerRun) -> str:
    if run.error is None:
        return ""
    return run.error if len(run.error) <= 60 else run.error[:59] + "…"


def _job_name(jobs: dict[str, SchedulerJob], job_id: str) -> str:
    job = jobs.get(job_id)
    return job.name if job is not None and job.name else job_id


async def print_history(app: SchedulerApp, session_factory: async_sessionmaker[Any]) -> int:
    async with session_factory() as session:
        jobs = {job.id: job for job in await app.list_jobs(session)}
        runs = await app.list_runs(session, limit=None)
    runs.sort(key=lambda run: (run.scheduled_for, run.job_id))
    header = ("job", "scheduled_for (UTC)", "sent after", "status", "ran for", "error")
    rows = [
        (
            _job_name(jobs, run.job_id),
            run.scheduled_for.strftime("%H:%M:%S.%f")[:-3],
            _delay(run),
            run.status.value,
            _duration(run),
            _error(run),
        )
        for run in runs
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        padded = (cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        return "  ".join(padded).rstrip()

    print(flush=True)
    print(f"Run history ({len(runs)} runs, from scheduler_app.list_runs):")
    print(line(header))
    print(line(tuple("-" * width for width in widths)))
    for row in rows:
        print(line(row))
    print()
    print("Runs per job (counters the workers keep on each job):")
    per_job = Counter(run.job_id for run in runs)
    skipped = Counter(run.job_id for run in runs if run.status is RunStatus.SKIPPED)
    for job_id in sorted(jobs):
        job = jobs[job_id]
        last = (
            "-"
            if job.last_duration_seconds is None
            else f"{job.last_duration_seconds * 1000:.0f} ms"
        )
        print(
            f"  {job_id:<16} {per_job[job_id]:>3} fires, {job.success_count:>3} succeeded,"
            f" {job.failure_count:>3} failed, last run took {last}"
            + (f" ({skipped[job_id]} skipped by its policy)" if skipped[job_id] else "")
        )
    print(flush=True)
    return len(runs)


def fresh_database(directory: Path) -> Path:
    """Return the path of a database that does not exist yet, so every run starts clean.

    The default directory (``.demo/``) is deleted and recreated; in a directory given with
    ``--dir`` only the demo's own database files are deleted.
    """
    if directory.resolve() == DEFAULT_DIR:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "demo.sqlite3"
    for suffix in ("", "-journal", "-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    return database


async def main(seconds: float, database: Path) -> int:
    engine = create_async_engine(f"sqlite+aiosqlite:///{database}")
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    app = SchedulerApp(
        broker=broker,
        session_factory=session_factory,
        config=SchedulerConfig(sync_interval_seconds=1.0),
    )
    await broker.startup()
    try:
        await schedule_jobs(app, session_factory)
        _say(f"starting the scheduler for {seconds:g} s (database: {database})")
        async with app:
            await asyncio.sleep(seconds)
        # Let tasks the scheduler already sent (such as a chain in progress) finish.
        try:
            await asyncio.wait_for(broker.wait_all(), timeout=5)
        except asyncio.TimeoutError:
            _say("some tasks were still running after 5 s; not waiting for them")
        await broker.shutdown()  # the lifecycle middleware writes the last outcomes
        total = await print_history(app, session_factory)
    finally:
        await broker.shutdown()
        await engine.dispose()
    if total == 0 and seconds >= 3:
        print("error: no runs were recorded", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=14.5,
        help="how long the scheduler runs before the history is printed (default: 14.5)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="directory for demo.sqlite3 (default: .demo/ in the repository, recreated)",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be greater than zero")
    return args


if __name__ == "__main__":
    options = parse_args()
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime  # log in UTC, like the rest of the output
    logging.getLogger("taskiq").setLevel(logging.WARNING)  # one line per task is enough
    sys.exit(asyncio.run(main(options.seconds, fresh_database(options.dir))))
