#!/usr/bin/env python
"""Durable chains at scale: N chains of S steps at once, on W real ``taskiq worker`` processes.

    python scripts/bench_chains.py [--db postgres|sqlite] [--chains 1000] [--steps 3]
        [--workers 2] [--redis-url redis://127.0.0.1:6379/0]

A new database (a PostgreSQL database ``taskiq_beat_bench_<random>``, dropped afterwards, or
a new SQLite file) and a new Redis stream; W worker processes ``taskiq worker
scripts.bench_support.chain_worker:broker --workers 1`` (taskiq's default of 100 tasks at
once each); this process runs the scheduler (``SchedulerApp`` with the package's defaults).
It writes N one-off chain jobs due now with ``upsert_many`` and calls ``start()``: the
scheduler sends the N chains' fires, the workers start them and run their steps.

Printed: the time from ``start()`` until every chain run is final, chains and steps per
second, the runs' statuses, the step rows' statuses, and the duplicate step executions: each
step execution adds one to a Redis counter of its (run, step), and every count above one is a
duplicate. Exit status 1 if any chain did not succeed or a step ran twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import sqlalchemy as sa  # noqa: E402
from bench_support import chain_worker  # noqa: E402
from bench_support.common import (  # noqa: E402
    create_pg_database,
    drop_pg_database,
    postgres_url,
    sqlite_url,
)
from redis.asyncio import Redis  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

from taskiq_beat import (  # noqa: E402
    ChainStep,
    OneOffSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerRun,
)
from taskiq_beat.models import SchedulerChainStep  # noqa: E402

WORKER_TARGET = "scripts.bench_support.chain_worker:broker"
STARTUP_TIMEOUT = 60.0
FINISH_TIMEOUT = 900.0


class Worker:
    """``taskiq worker`` in a session of its own; its output read (and the tail kept)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._listening = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskiq",
            "worker",
            WORKER_TARGET,
            "--workers",
            "1",
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._listening.wait(), STARTUP_TIMEOUT)

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            del self.lines[:-100]
            if "Listening started" in line:
                self._listening.set()

    async def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def fresh_database(kind: str) -> AsyncIterator[str]:
    if kind == "sqlite":
        directory = tempfile.mkdtemp(prefix="taskiq_beat_bench_chains_")
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


async def _never_here(chain: int) -> None:  # pragma: no cover
    raise AssertionError("the scheduler's process does not execute tasks")


async def measure(args: argparse.Namespace, url: str) -> bool:
    stream = f"taskiq-beat-bench-chains-{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    broker = chain_worker.make_broker(args.redis_url, stream)
    broker.register_task(_never_here, task_name=chain_worker.TASK_NAME)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    app = SchedulerApp(broker=broker, session_factory=factory, config=chain_worker.CONFIG)
    await broker.startup()  # the stream's consumer group, before anything is sent
    redis = Redis.from_url(args.redis_url)
    env = {
        chain_worker.DATABASE_URL_ENV: url,
        chain_worker.REDIS_URL_ENV: args.redis_url,
        chain_worker.STREAM_ENV: stream,
    }
    workers = [Worker(env) for _ in range(args.workers)]
    try:
        await asyncio.gather(*(worker.start() for worker in workers))
        due = OneOffSchedule(run_at=datetime.now(timezone.utc))
        async with factory() as session:
            await app.upsert_many(
                session,
                [
                    app.chain(
                        steps=[
                            ChainStep(task=chain_worker.TASK_NAME, args=[n])
                            for _ in range(args.steps)
                        ]
                    ).definition(trigger=due, job_id=f"chain-{n:05}")
                    for n in range(args.chains)
                ],
            )
        began = time.monotonic()
        await app.start()
        final = (RunStatus.SUCCEEDED, RunStatus.ABORTED, RunStatus.FAILED, RunStatus.LOST)
        while True:
            async with factory() as session:
                done = (
                    await session.execute(
                        sa.select(sa.func.count()).where(SchedulerRun.status.in_(final))
                    )
                ).scalar_one()
            if done >= args.chains:
                break
            if time.monotonic() - began > FINISH_TIMEOUT:
                print(f"timed out with {done}/{args.chains} chains final", file=sys.stderr)
                for worker in workers:
                    print("\n".join(worker.lines[-20:]), file=sys.stderr)
                break
            await asyncio.sleep(0.1)
        took = time.monotonic() - began
        await app.stop()
        async with factory() as session:
            runs = Counter(
                dict(
                    list(
                        await session.execute(
                            sa.select(SchedulerRun.status, sa.func.count()).group_by(
                                SchedulerRun.status
                            )
                        )
                    )
                )
            )
            steps = Counter(
                dict(
                    list(
                        await session.execute(
                            sa.select(SchedulerChainStep.status, sa.func.count()).group_by(
                                SchedulerChainStep.status
                            )
                        )
                    )
                )
            )
            timings = list(
                await session.execute(
                    sa.select(
                        SchedulerChainStep.created_at,
                        SchedulerChainStep.started_at,
                        SchedulerChainStep.finished_at,
                    )
                )
            )
        queued = sorted(
            (started - created).total_seconds() for created, started, _ in timings if started
        )
        ran = sorted(
            (finished - started).total_seconds()
            for _, started, finished in timings
            if started and finished
        )
        counts = [
            int(v) for v in (await redis.hgetall(chain_worker.executions_key(stream))).values()
        ]
        executions = sum(counts)
        duplicates = sum(count - 1 for count in counts if count > 1)
        expected = args.chains * args.steps
        succeeded = runs.get(RunStatus.SUCCEEDED, 0)
        print(
            f"{args.db}: {args.chains} chains x {args.steps} steps on {args.workers} workers:"
            f" {took:.1f} s from start() to every chain final"
            f" ({succeeded / took:.0f} chains/s, {executions / took:.0f} steps/s)"
        )
        print(
            "  a step from recorded to started: "
            f"p50 {_q(queued, 0.5):.2f} s, p99 {_q(queued, 0.99):.2f} s;"
            f" started to finished: p50 {_q(ran, 0.5):.3f} s, p99 {_q(ran, 0.99):.3f} s"
        )
        print(f"  runs: {dict((s.value, n) for s, n in runs.items())}")
        print(f"  step rows: {dict((s.value, n) for s, n in steps.items())}")
        print(
            f"  step executions: {executions} (expected {expected}),"
            f" distinct (run, step): {len(counts)}, duplicate step runs: {duplicates}"
        )
        return succeeded == args.chains and duplicates == 0 and len(counts) == expected
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers))
        await redis.delete(stream, chain_worker.executions_key(stream))
        await redis.aclose()
        await broker.shutdown()
        await engine.dispose()


def _q(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run(args: argparse.Namespace) -> bool:
    async with fresh_database(args.db) as url:
        return await measure(args, url)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    return 0 if asyncio.run(run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
