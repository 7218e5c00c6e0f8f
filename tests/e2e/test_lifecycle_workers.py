"""Run lifecycle with real ``taskiq worker`` processes on a real Redis stream broker.

The workers import :mod:`tests.e2e.lifecycle.app`, whose ``SchedulerApp`` adds the lifecycle
middleware to their broker: nothing else is set up on the worker side. This process runs the
scheduler (a ``SchedulerApp`` on the same database and stream) and reads the run rows and the
executions the tasks logged in Redis. On SQLite (one file shared by three processes), on
PostgreSQL and on MariaDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from taskiq_beat import (
    OneOffSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerRun,
)
from taskiq_beat.models import SchedulerWorker
from tests.e2e.lifecycle import app as worker_app
from tests.processes import PYTHON, ManagedProcess, redis_url_or_skip, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
FIRES = 1000


@contextlib.asynccontextmanager
async def deployment(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[SchedulerApp, Any, Redis, list[ManagedProcess], Any]]:
    """The tables, a stream of this test's own, the scheduler's app (not started), a Redis
    client, the worker processes started so far, and a function that starts one more."""
    redis_url = redis_url_or_skip()
    stream = f"taskiq-beat-lifecycle-{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.drop_all)
        await connection.run_sync(SchedulerBase.metadata.create_all)
    broker = worker_app.make_broker(redis_url, stream)
    for name in ("lifecycle.ok", "lifecycle.fail", "lifecycle.slow", "lifecycle.chain_step"):
        broker.register_task(_never_here, task_name=name)
    app = SchedulerApp(
        broker=broker,
        session_factory=async_sessionmaker(engine, expire_on_commit=False),
        config=worker_app.CONFIG,
    )
    await broker.startup()  # creates the stream's consumer group before anything is sent
    redis = Redis.from_url(redis_url)
    workers: list[ManagedProcess] = []
    env = {
        worker_app.DATABASE_URL_ENV: database_url,
        worker_app.REDIS_URL_ENV: redis_url,
        worker_app.STREAM_ENV: stream,
    }

    async def start_worker(*options: str) -> ManagedProcess:
        process = ManagedProcess(
            [
                PYTHON,
                "-m",
                "taskiq",
                "worker",
                "tests.e2e.lifecycle.app:broker",
                "--workers",
                "1",
                *options,
            ],
            name=f"worker-{len(workers) + 1}",
            cwd=ROOT,
            env=env,
            log_dir=tmp_path,
        )
        workers.append(process)
        await process.start()
        await process.wait_for_output(r"Listening started", STARTUP_TIMEOUT)
        return process

    try:
        yield app, engine, redis, workers, start_worker
    finally:
        await app.stop()
        for process in workers:
            await process.cleanup()
        await redis.delete(stream, worker_app.executed_key(stream))
        await redis.aclose()
        await broker.shutdown()
        await engine.dispose()


async def _never_here(*args: Any, **kwargs: Any) -> None:  # pragma: no cover
    raise AssertionError("the scheduler's process does not execute tasks")


async def runs(engine: AsyncEngine) -> list[SchedulerRun]:
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        return list((await session.execute(sa.select(SchedulerRun))).scalars())


async def executions(redis: Redis, app: SchedulerApp) -> list[dict[str, Any]]:
    stream = app.broker.queue_name  # type: ignore[attr-defined]
    return [json.loads(raw) for raw in await redis.lrange(worker_app.executed_key(stream), 0, -1)]


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def lifecycle_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'lifecycle.sqlite3'}"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    return str(request.getfixturevalue("postgres_url"))


async def test_workers_report_outcomes_and_execute_each_fire_once(
    lifecycle_database: str, tmp_path: Path
) -> None:
    async with deployment(lifecycle_database, tmp_path) as (app, engine, redis, workers, start):
        await asyncio.gather(start(), start())
        due = OneOffSchedule(run_at=now())
        async with app.session_factory() as session:
            await app.upsert_many(
                session,
                [
                    app.single("lifecycle.ok", kwargs={"n": n}).definition(
                        trigger=due, job_id=f"ok-{n:04}"
                    )
                    for n in range(FIRES)
                ]
                + [
                    app.single("lifecycle.fail", kwargs={"n": 7}).definition(
                        trigger=due, job_id="fail"
                    ),
                    app.single("lifecycle.slow", kwargs={"seconds": 1.0}).definition(
                        trigger=due, job_id="slow"
                    ),
                ],
            )
        await app.start()

        async def all_final() -> list[SchedulerRun] | None:
            rows = await runs(engine)
            final = [r for r in rows if r.status in (RunStatus.SUCCEEDED, RunStatus.FAILED)]
            return rows if len(final) == FIRES + 2 else None

        details = lambda: "\n".join(w.describe() for w in workers)  # noqa: E731
        rows = await wait_until(all_final, 90, interval=0.2, details=details, watch=workers)
        by_job = {run.job_id: run for run in rows}
        ok = [run for run in rows if run.job_id.startswith("ok-")]
        assert len(ok) == FIRES
        assert all(run.status is RunStatus.SUCCEEDED for run in ok)
        assert all(run.executions == 1 and run.duration_seconds is not None for run in ok)
        assert all(run.started_at <= run.finished_at for run in ok)  # type: ignore[operator]
        async with app.session_factory() as session:
            alive = (await session.execute(sa.select(SchedulerWorker.id))).scalars().all()
        assert len(alive) == 2
        assert {run.worker_id for run in rows} <= set(alive)

        failed = by_job["fail"]
        assert failed.status is RunStatus.FAILED
        assert (failed.error_type, failed.error) == ("ValueError", "ValueError: bad input 7")
        slow = by_job["slow"]
        assert slow.status is RunStatus.SUCCEEDED
        assert slow.duration_seconds is not None
        assert 1.0 <= slow.duration_seconds < 10

        started = Counter(
            e["task_id"] for e in await executions(redis, app) if e["event"] == "start"
        )
        assert len(started) == FIRES + 2
        assert set(started.values()) == {1}
        print(f"\n{FIRES + 2} fires, {sum(started.values())} executions, workers {alive}")

        # A scheduler killed between its kiq and its record sends the fire again with the
        # same task id: the broker holds two messages of one fire, the workers run it once.
        async with app.session_factory() as session:
            job = await app.single("lifecycle.slow", kwargs={"seconds": 0.5}).schedule(
                session, trigger=OneOffSchedule(run_at=now()), job_id="twice"
            )

        async def sent() -> SchedulerRun | None:
            found = [r for r in await runs(engine) if r.job_id == job.id]
            return found[0] if found else None

        first = await wait_until(sent, 30, interval=0.02, details=details)
        await (
            app.broker.find_task("lifecycle.slow")  # type: ignore[union-attr]
            .kicker()
            .with_task_id(first.task_id)
            .with_labels(
                taskiq_beat_job_id=job.id,
                taskiq_beat_scheduled_for=first.scheduled_for.isoformat(),
                taskiq_beat_run_id=first.id,
            )
            .kiq(seconds=0.5)
        )

        async def settled() -> bool:
            [run] = [r for r in await runs(engine) if r.job_id == job.id]
            if run.status is not RunStatus.SUCCEEDED:
                return False
            return any("delivered again" in w.output for w in workers)

        await wait_until(settled, 30, interval=0.1, details=details, watch=workers)
        twice = [e for e in await executions(redis, app) if e["task_id"] == first.task_id]
        assert [e["event"] for e in twice] == ["start", "end"]


async def test_a_worker_killed_mid_task_leaves_a_lost_run_that_runs_once_more(
    lifecycle_database: str, tmp_path: Path
) -> None:
    async with deployment(lifecycle_database, tmp_path) as (app, engine, redis, workers, start):
        doomed = await start()
        async with app.session_factory() as session:
            await app.single(
                "lifecycle.slow", kwargs={"seconds": 60.0, "first_only": True}
            ).schedule(session, trigger=OneOffSchedule(run_at=now()))
        await app.start()

        async def running() -> SchedulerRun | None:
            found = [r for r in await runs(engine) if r.status is RunStatus.RUNNING]
            return found[0] if found else None

        first = await wait_until(running, 30, interval=0.05, watch=workers)
        await doomed.kill()
        survivor = await start()

        async def lost() -> SchedulerRun | None:
            [run] = await runs(engine)
            return run if run.status is RunStatus.LOST else None

        lost_run = await wait_until(lost, 30, interval=0.05, details=survivor.describe)
        assert lost_run.worker_id == first.worker_id
        assert "stopped renewing its heartbeat" in (lost_run.error or "")

        nudge = app.broker.find_task("lifecycle.ok")
        assert nudge is not None

        async def done() -> SchedulerRun | None:
            [run] = await runs(engine)
            if run.status is RunStatus.SUCCEEDED:
                return run
            # taskiq-redis's stream broker claims a dead consumer's messages only after it
            # read new ones: a plain message (not a fire: the lifecycle leaves it alone).
            await nudge.kiq(n=0)
            return None

        # The stream redelivers the dead worker's message: it runs once more, on the survivor.
        rerun = await wait_until(done, 60, interval=0.5, details=survivor.describe)
        assert rerun.executions == 2
        assert rerun.worker_id != first.worker_id
        events = [e["event"] for e in await executions(redis, app) if e["task_id"] == first.task_id]
        assert events == ["start", "start", "end"]
        await asyncio.sleep(worker_app.REDELIVER_AFTER_MS / 1000 + 1)  # no third execution
        events = [e["event"] for e in await executions(redis, app) if e["task_id"] == first.task_id]
        assert events == ["start", "start", "end"]
