"""Health snapshot, the ``health`` command, Prometheus metrics and event callbacks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from taskiq_beat import (
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
)
from taskiq_beat.events import EventKind, SchedulerEvent
from taskiq_beat.exceptions import InvalidJobError
from taskiq_beat.metrics import serve_metrics
from tests.processes import free_port
from tests.test_cli import beat, json_of, write_app
from tests.test_lifecycle import LIFECYCLE, eventually, fire_now, run_status_is
from tests.utils import FakeClock, RecordingBroker


async def test_events_reach_sync_and_async_callbacks(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = SchedulerApp(
        broker=broker, session_factory=session_factory, config=LIFECYCLE, clock=clock
    )
    seen: list[SchedulerEvent] = []

    async def remember(event: SchedulerEvent) -> None:
        seen.append(event)

    for kind in EventKind:
        app.on_event(kind, seen.append if kind is EventKind.FIRE_SENT else remember)
    app.on_event("run_failed", lambda event: 1 / 0)  # a failing callback harms nothing

    ok = await fire_now(app, clock, "tests.record")
    bad = await fire_now(app, clock, "tests.fail")
    await run_status_is(session_factory, ok, RunStatus.SUCCEEDED)
    await run_status_is(session_factory, bad, RunStatus.FAILED)
    await eventually(lambda: _true(len(_of(seen, EventKind.RUN_FAILED)) == 1))

    # A job every minute, found 5 minutes late: the misfire rule skips four fires.
    async with session_factory() as session:
        job = await app.single("tests.record").schedule(
            session, trigger=PeriodicSchedule(interval=IntervalTrigger(minutes=1))
        )
    clock.advance(minutes=5)
    await app.engine.sync()
    await app.engine.tick()
    # A job whose task the broker no longer knows is disabled.
    async with session_factory() as session:
        gone = await app.single("tests.record").schedule(
            session, trigger=OneOffSchedule(run_at=clock.now())
        )
    broker.local_task_registry.pop("tests.record")
    await app.engine.sync()
    await app.engine.tick()
    await eventually(lambda: _true(bool(_of(seen, EventKind.JOB_DISABLED))))

    assert [e.job_id for e in _of(seen, EventKind.FIRE_SENT)][:2] == [ok, bad]
    assert all(e.task_id and e.run_id for e in _of(seen, EventKind.FIRE_SENT))
    assert next(e.job_id for e in _of(seen, EventKind.RUN_SUCCEEDED)) == ok
    [failed] = _of(seen, EventKind.RUN_FAILED)
    assert (failed.job_id, failed.error) == (bad, "RuntimeError: step failed (test)")
    [missed] = _of(seen, EventKind.FIRE_MISSED)
    assert missed.job_id == job.id
    [disabled] = _of(seen, EventKind.JOB_DISABLED)
    assert disabled.job_id == gone.id
    assert "not registered" in (disabled.error or "")

    with pytest.raises(InvalidJobError, match="kind"):
        app.on_event("exploded", seen.append)
    with pytest.raises(InvalidJobError, match="listener"):
        app.on_event(EventKind.FIRE_SENT, "not callable")  # type: ignore[arg-type]


async def test_health_snapshot_tells_overdue_jobs_workers_and_success_rate(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = SchedulerApp(
        broker=broker, session_factory=session_factory, config=LIFECYCLE, clock=clock
    )
    empty = await app.get_health_snapshot()
    assert (empty.behind, empty.overdue_jobs, empty.success_rate) == (False, 0, None)
    assert empty.workers_alive == 0

    for task in ("tests.record", "tests.record", "tests.record", "tests.fail"):
        job_id = await fire_now(app, clock, task)
        await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED, RunStatus.FAILED)
    assert app.lifecycle is not None
    await eventually(lambda: _true(app.lifecycle._registered))  # type: ignore[union-attr]
    healthy = await app.get_health_snapshot()
    assert (healthy.runs_succeeded, healthy.runs_failed) == (3, 1)
    assert healthy.success_rate == pytest.approx(0.75)
    assert healthy.workers_alive == 1
    assert healthy.fires_sent == 4
    assert healthy.behind is False

    # A job due 2 minutes ago that no scheduler sent: the schedule is behind.
    async with session_factory() as session:
        await app.single("tests.record").schedule(
            session, trigger=OneOffSchedule(run_at=clock.now() - timedelta(minutes=2))
        )
    behind = await app.get_health_snapshot()
    assert (behind.behind, behind.overdue_jobs) == (True, 1)
    assert behind.oldest_overdue_at == clock.now() - timedelta(minutes=2)
    assert (await app.get_health_snapshot(max_lag_seconds=600)).behind is False
    # Workers silent for longer than the timeout are not alive.
    clock.advance(LIFECYCLE.worker_timeout_seconds + 1)
    assert (await app.get_health_snapshot(max_lag_seconds=3600)).workers_alive == 0


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_health_command_exits_1_when_behind_or_unreachable(
    backend: str, tmp_path: Path, database_url: str, db_engine: Any
) -> None:
    target = f"{write_app(tmp_path, database_url)}:scheduler_app"
    fine = await beat("health", "--json", "--app", target, cwd=tmp_path)
    assert fine.returncode == 0, fine.stderr
    assert json_of(fine)["behind"] is False

    trigger = db_engine.dialect.identifier_preparer.quote("trigger")  # reserved on MySQL
    async with async_sessionmaker(db_engine)() as session:
        await session.execute(
            sa.text(
                f"INSERT INTO scheduler_job (id, task_name, kind, strategy, {trigger}, args,"
                " kwargs, metadata, is_enabled, next_run_at, revision, created_at, updated_at)"
                " VALUES ('late', 'cli.tick', 'single', 'one_off', '{}', '[]', '{}', '{}', 1,"
                " '2020-01-01 00:00:00.000000', 1, '2020-01-01 00:00:00.000000',"
                " '2020-01-01 00:00:00.000000')"
            )
        )
        await session.commit()
    late = await beat("health", "--app", target, cwd=tmp_path)
    assert late.returncode == 1
    assert "overdue_jobs" in late.stdout
    assert "2020-01-01" in late.stdout

    # A database server that does not answer (nothing listens on the port).
    nobody = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/taskiq_beat"
    down = await beat("health", "--db", nobody, cwd=tmp_path)
    assert down.returncode == 1
    assert "error" in down.stderr
    bad = await beat("health", "--max-lag", "-1", "--app", target, cwd=tmp_path)
    assert bad.returncode == 2
    assert "--max-lag" in bad.stderr


async def test_metrics_are_served_for_prometheus(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = SchedulerApp(
        broker=broker, session_factory=session_factory, config=LIFECYCLE, clock=clock
    )
    for _ in range(3):
        job_id = await fire_now(app, clock, "tests.record")
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    port = free_port()
    server = serve_metrics(app, port, addr="127.0.0.1")
    try:
        async with httpx.AsyncClient() as client:
            body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        server.shutdown()
        server.server_close()
    metrics = dict(
        line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")
    )
    assert float(metrics["taskiq_beat_fires_sent_total"]) == 3
    assert float(metrics["taskiq_beat_fires_failed_total"]) == 0
    assert float(metrics["taskiq_beat_scheduler_running"]) == 0
    assert 'taskiq_beat_lateness_seconds{quantile="0.99"}' in metrics
    assert float(metrics["taskiq_beat_runs_started_total"]) == 3


def _of(events: list[SchedulerEvent], kind: EventKind) -> list[SchedulerEvent]:
    return [event for event in events if event.kind is kind]


async def _true(value: bool) -> bool:
    return value
