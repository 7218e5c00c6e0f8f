"""Run lifecycle: workers write each fire's outcome onto its run, and execute it once.

The tasks run in this process on Taskiq's in-memory broker, through the same middleware a
``taskiq worker`` process uses (``tests/e2e/test_lifecycle_workers.py`` runs real workers on
Redis). Every test runs on SQLite, on PostgreSQL and on MariaDB.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from taskiq import SimpleRetryMiddleware, TaskiqMessage
from taskiq.message import BrokerMessage

from taskiq_beat import (
    OneOffSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.dispatch import JOB_ID_LABEL, RUN_ID_LABEL
from taskiq_beat.housekeeping import Housekeeper
from taskiq_beat.models import ERROR_MAX_LENGTH, SchedulerWorker
from taskiq_beat.store.lifecycle import _count_on_jobs
from taskiq_beat.worker import RunLifecycleMiddleware
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc
LIFECYCLE = SchedulerConfig(record_lifecycle=True, lifecycle_flush_seconds=0.01)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds (bounded: fails after ``timeout`` seconds)."""
    async with asyncio.timeout(timeout) if hasattr(asyncio, "timeout") else _Bounded(timeout):
        while not await check():  # noqa: ASYNC110 - it polls the database, no event to wait on
            await asyncio.sleep(0.01)


class _Bounded:  # pragma: no cover - Python 3.10 has no asyncio.timeout
    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handle = asyncio.get_running_loop().call_later(self._seconds, task.cancel)

    async def __aexit__(self, *exc: object) -> None:
        self._handle.cancel()


async def runs_of(factory: async_sessionmaker[AsyncSession], job_id: str) -> list[SchedulerRun]:
    async with factory() as session:
        result = await session.execute(
            sa.select(SchedulerRun).where(SchedulerRun.job_id == job_id).order_by(SchedulerRun.id)
        )
        return list(result.scalars())


async def job_row(factory: async_sessionmaker[AsyncSession], job_id: str) -> SchedulerJob:
    async with factory() as session:
        return (
            await session.execute(sa.select(SchedulerJob).where(SchedulerJob.id == job_id))
        ).scalar_one()


async def run_status_is(
    factory: async_sessionmaker[AsyncSession], job_id: str, *statuses: RunStatus
) -> None:
    async def reached() -> bool:
        runs = await runs_of(factory, job_id)
        return bool(runs) and all(run.status in statuses for run in runs)

    await eventually(reached)


def lifecycle_app(
    broker: RecordingBroker,
    factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    config: SchedulerConfig = LIFECYCLE,
) -> SchedulerApp:
    app = SchedulerApp(broker=broker, session_factory=factory, config=config, clock=clock)
    assert app.lifecycle is not None
    return app


async def fire_now(app: SchedulerApp, clock: FakeClock, task: str, **kwargs: Any) -> str:
    """Schedule a one-off job of ``task`` due now, send it, and return the job id."""
    async with app.session_factory() as session:
        job = await app.single(task, kwargs=kwargs).schedule(
            session, trigger=OneOffSchedule(run_at=clock.now())
        )
    assert await app.engine.tick() == 1
    return job.id


async def deliver_again(broker: RecordingBroker, message: TaskiqMessage) -> None:
    """The broker delivers ``message`` once more (a redelivery, or a second send)."""
    await broker.kick(
        BrokerMessage(
            task_id=message.task_id,
            task_name=message.task_name,
            message=broker.formatter.dumps(message).message,
            labels=message.labels,
        )
    )


async def test_a_run_goes_running_then_succeeded_with_its_times_and_counters(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    gate = asyncio.Event()

    @broker.task(task_name="tests.gated")
    async def gated() -> str:
        await gate.wait()
        return "done"

    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.gated")
    await run_status_is(session_factory, job_id, RunStatus.RUNNING)
    [running] = await runs_of(session_factory, job_id)
    assert running.started_at == clock.now()
    assert running.worker_id == app.lifecycle.worker_id  # type: ignore[union-attr]
    assert running.executions == 1
    assert running.finished_at is None

    clock.advance(2)
    gate.set()
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    [run] = await runs_of(session_factory, job_id)
    assert run.finished_at == clock.now()
    assert run.duration_seconds is not None
    assert 0 <= run.duration_seconds < 5
    assert run.error is None
    assert run.error_type is None
    assert run.next_attempt_at is None
    job = await job_row(session_factory, job_id)
    assert (job.run_count, job.success_count, job.failure_count) == (1, 1, 0)
    assert job.last_success_at == run.finished_at
    assert job.last_failure_at is None
    assert job.last_duration_seconds == pytest.approx(run.duration_seconds)
    assert job.revision == 1  # counting is not a change of the job


async def test_a_task_sent_from_inside_a_fire_does_not_finish_the_fire(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    """A chain's orchestrator sends its steps from inside its own execution: each step runs
    in a copy of the orchestrator's context, and must not write onto the orchestrator's run."""
    gate = asyncio.Event()
    children: list[int] = []

    @broker.task(task_name="tests.child")
    async def child() -> None:
        children.append(1)

    @broker.task(task_name="tests.parent")
    async def parent() -> None:
        await child.kiq()
        await gate.wait()

    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.parent")
    await eventually(lambda: _true(children == [1]))
    await asyncio.sleep(0.1)  # the child's outcome would be written by now
    await run_status_is(session_factory, job_id, RunStatus.RUNNING)
    gate.set()
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)


async def test_a_failing_task_is_recorded_failed_with_its_type_and_not_resent(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.fail")
    await run_status_is(session_factory, job_id, RunStatus.FAILED)
    [run] = await runs_of(session_factory, job_id)
    assert run.error_type == "RuntimeError"
    assert run.error == "RuntimeError: step failed (test)"
    assert run.finished_at is not None
    assert run.next_attempt_at is None
    job = await job_row(session_factory, job_id)
    assert (job.run_count, job.success_count, job.failure_count) == (1, 0, 1)
    assert job.last_failure_at == run.finished_at

    # A task that failed is not a send that failed: the scheduler does not send it again.
    clock.advance(60)
    assert await app.engine.tick() == 0
    assert len(broker.sent_for(job_id)) == 1


class Halt(BaseException):
    """Not an Exception: Taskiq's receiver still catches it as the task's error."""


async def test_base_exceptions_and_long_messages_are_recorded_bounded(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    @broker.task(task_name="tests.halt")
    async def halt() -> None:
        raise Halt("stop " + "x" * (3 * ERROR_MAX_LENGTH))

    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.halt")
    await run_status_is(session_factory, job_id, RunStatus.FAILED)
    [run] = await runs_of(session_factory, job_id)
    assert run.error_type == "tests.test_lifecycle.Halt"
    assert run.error is not None
    assert run.error.startswith("Halt: stop xxx")
    assert len(run.error) <= ERROR_MAX_LENGTH
    assert run.error.endswith("(truncated)")


async def test_a_second_delivery_of_a_finished_fire_is_not_executed(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.record", n=1)
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    [before] = await runs_of(session_factory, job_id)

    with caplog.at_level(logging.INFO, logger="taskiq_beat.worker"):
        await deliver_again(broker, broker.sent_for(job_id)[0])
        assert app.lifecycle is not None
        await eventually(lambda: _true(app.lifecycle.stats.duplicates_skipped == 1))  # type: ignore[union-attr]
    await asyncio.sleep(0.05)  # let the skipped delivery finish in the receiver
    assert broker.state.executed == [((), {"n": 1})]
    [after] = await runs_of(session_factory, job_id)
    assert (after.status, after.executions, after.finished_at) == (
        before.status,
        before.executions,
        before.finished_at,
    )
    skipped = [r for r in caplog.records if "delivered again" in r.getMessage()]
    assert len(skipped) == 1
    # The first execution's result is kept: the duplicate stored none over it.
    result = await broker.result_backend.get_result(before.task_id)
    assert result.return_value == 1


async def test_concurrent_deliveries_of_one_fire_execute_it_once(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @broker.task(task_name="tests.counted")
    async def counted() -> None:
        calls.append(1)
        await gate.wait()

    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.counted")
    message = broker.sent_for(job_id)[0]
    await asyncio.gather(*(deliver_again(broker, message) for _ in range(3)))
    await run_status_is(session_factory, job_id, RunStatus.RUNNING)
    assert app.lifecycle is not None
    await eventually(lambda: _true(app.lifecycle.stats.duplicates_skipped == 3))  # type: ignore[union-attr]
    gate.set()
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    assert calls == [1]
    assert app.lifecycle.stats.started == 1


async def test_taskiq_retries_run_again_and_are_counted_on_the_run(
    session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    broker = RecordingBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=3, default_retry_label=True)
    )
    attempts: list[int] = []

    @broker.task(task_name="tests.flaky")
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)} failed")
        return "ok"

    await broker.startup()
    try:
        app = lifecycle_app(broker, session_factory, clock)
        job_id = await fire_now(app, clock, "tests.flaky")

        async def third_attempt_done() -> bool:
            runs = await runs_of(session_factory, job_id)
            return len(attempts) == 3 and runs[0].status is RunStatus.SUCCEEDED

        await eventually(third_attempt_done)
        [run] = await runs_of(session_factory, job_id)
        assert (run.retries, run.executions, run.error) == (2, 1, None)
        job = await job_row(session_factory, job_id)
        # Each attempt's outcome is counted once: two failures, then the success.
        assert (job.success_count, job.run_count) == (1, job.failure_count + 1)
    finally:
        assert app.lifecycle is not None
        await app.lifecycle.close()
        await broker.shutdown()


async def test_a_run_of_a_silent_worker_is_lost_and_its_redelivery_runs_once_more(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @broker.task(task_name="tests.hanging")
    async def hanging() -> None:
        calls.append(1)
        if len(calls) == 1:
            await gate.wait()  # the first execution never ends: its worker "dies"

    config = SchedulerConfig(record_lifecycle=True, lifecycle_flush_seconds=0.01)
    app = lifecycle_app(broker, session_factory, clock, config)
    job_id = await fire_now(app, clock, "tests.hanging")
    await run_status_is(session_factory, job_id, RunStatus.RUNNING)
    assert app.lifecycle is not None
    await eventually(lambda: _true(app.lifecycle._registered))  # type: ignore[union-attr]
    housekeeper = Housekeeper(store=app._store, config=config, clock=clock)

    assert await housekeeper.find_lost_runs() == 0  # its worker is alive
    clock.advance(config.worker_timeout_seconds + 1)  # and now silent for too long
    assert await housekeeper.find_lost_runs() == 1
    [lost] = await runs_of(session_factory, job_id)
    assert lost.status is RunStatus.LOST
    assert lost.worker_id is not None
    assert lost.error is not None
    assert lost.worker_id in lost.error
    assert "heartbeat" in lost.error
    job = await job_row(session_factory, job_id)
    assert (job.run_count, job.failure_count) == (1, 1)

    message = broker.sent_for(job_id)[0]
    await deliver_again(broker, message)  # the broker redelivers: it runs once more
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    await deliver_again(broker, message)  # and not a third time
    assert app.lifecycle is not None
    await eventually(lambda: _true(app.lifecycle.stats.duplicates_skipped == 1))  # type: ignore[union-attr]
    assert calls == [1, 1]
    [run] = await runs_of(session_factory, job_id)
    assert (run.status, run.executions) == (RunStatus.SUCCEEDED, 2)

    # The first execution ending late does not overwrite the second's outcome.
    gate.set()
    await asyncio.sleep(0.1)
    [still] = await runs_of(session_factory, job_id)
    assert (still.status, still.executions, still.finished_at) == (
        RunStatus.SUCCEEDED,
        2,
        run.finished_at,
    )


async def test_a_run_id_matching_no_row_runs_the_task_with_one_warning(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = lifecycle_app(broker, session_factory, clock)
    assert app.lifecycle is not None
    with caplog.at_level(logging.WARNING, logger="taskiq_beat.worker"):
        for labels in (
            {JOB_ID_LABEL: "no-such-job", RUN_ID_LABEL: 424242},
            {JOB_ID_LABEL: "no-such-job", RUN_ID_LABEL: 424243},
            {JOB_ID_LABEL: "edited", RUN_ID_LABEL: "not a number"},
        ):
            await broker.find_task("tests.record").kicker().with_labels(**labels).kiq(x=1)  # type: ignore[union-attr]
        await eventually(lambda: _true(len(broker.state.executed) == 3))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "executed without a lifecycle" in warnings[0].getMessage()
    assert app.lifecycle.stats.unchecked == 2


async def test_tasks_still_run_while_the_database_is_unreachable(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'dir' / 'db'}")
    factory = async_sessionmaker(engine, expire_on_commit=False)
    broker = RecordingBroker()
    executed: list[int] = []

    @broker.task(task_name="tests.work")
    async def work(n: int) -> None:
        executed.append(n)

    middleware = RunLifecycleMiddleware(factory, config=LIFECYCLE, clock=clock)
    broker.add_middlewares(middleware)
    await broker.startup()
    try:
        with caplog.at_level(logging.WARNING, logger="taskiq_beat.worker"):
            for n in range(3):
                await (
                    work.kicker().with_labels(**{JOB_ID_LABEL: "job", RUN_ID_LABEL: n + 1}).kiq(n=n)
                )
            await eventually(lambda: _true(len(executed) == 3))
        assert sorted(executed) == [0, 1, 2]
        assert middleware.stats.unchecked == 3
        outages = [r for r in caplog.records if "database unavailable" in r.getMessage()]
        assert len(outages) == 1
    finally:
        await middleware.close()
        await broker.shutdown()
        await engine.dispose()


async def test_an_upsert_keeps_the_counters(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = lifecycle_app(broker, session_factory, clock)
    job_id = await fire_now(app, clock, "tests.record")
    await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED)
    later = OneOffSchedule(run_at=clock.now() + timedelta(hours=1))
    async with session_factory() as session:
        await app.upsert_many(
            session, [app.single("tests.record").definition(trigger=later, job_id=job_id)]
        )
        await app.single("tests.record", kwargs={"v": 2}).upsert(
            session, trigger=later, job_id=job_id
        )
    job = await job_row(session_factory, job_id)
    assert (job.run_count, job.success_count) == (1, 1)
    assert job.last_success_at is not None


async def test_counters_add_up_over_batches_and_keep_the_latest_times(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    """The counters' upsert when the job's row is there already (``EXCLUDED``; on MySQL and
    MariaDB the SELECT's own columns): counts add up, an older time or a missing one (JSON
    ``null`` in the batch) keeps the newer time stored, a batch without a duration keeps the
    last one."""
    app = lifecycle_app(broker, session_factory, clock)
    async with session_factory() as session:
        job = await app.single("tests.record").schedule(
            session, trigger=OneOffSchedule(run_at=clock.now() + timedelta(hours=1))
        )
    at = clock.now()
    second = timedelta(seconds=1)
    batches = [
        [(job.id, RunStatus.SUCCEEDED, at, 1.5)],
        [
            (job.id, RunStatus.FAILED, at + 2 * second, None),
            (job.id, RunStatus.SUCCEEDED, at - 5 * second, 0.25),
        ],
        [(job.id, RunStatus.FAILED, at + second, None)],
    ]
    for batch in batches:
        async with session_factory.begin() as session:
            await _count_on_jobs(session, batch)
    row = await job_row(session_factory, job.id)
    assert (row.run_count, row.success_count, row.failure_count) == (4, 2, 2)
    assert (row.last_success_at, row.last_failure_at) == (at, at + 2 * second)
    assert row.last_duration_seconds == pytest.approx(0.25)


async def test_list_runs_filters_by_status_and_time_and_pages_newest_first(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    app = lifecycle_app(broker, session_factory, clock)
    start = clock.now()
    jobs = []
    for n in range(4):
        jobs.append(await fire_now(app, clock, "tests.fail" if n % 2 else "tests.record"))
        clock.advance(60)
    for job_id in jobs:
        await run_status_is(session_factory, job_id, RunStatus.SUCCEEDED, RunStatus.FAILED)
    async with session_factory() as session:
        every = await app.list_runs(session, limit=None)
        assert [run.job_id for run in every] == jobs[::-1]
        failed = await app.list_runs(session, status="failed")
        assert [run.job_id for run in failed] == [jobs[3], jobs[1]]
        window = await app.list_runs(
            session, since=start + timedelta(seconds=60), until=start + timedelta(seconds=180)
        )
        assert [run.job_id for run in window] == [jobs[2], jobs[1]]
        page = await app.list_runs(session, limit=2, offset=1)
        assert [run.job_id for run in page] == [jobs[2], jobs[1]]
        for bad in ({"offset": -1}, {"since": datetime(2026, 1, 1)}, {"status": "done"}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                await app.list_runs(session, **bad)  # type: ignore[arg-type]


async def test_retention_deletes_old_finished_history_in_batches(
    broker: RecordingBroker, session_factory: async_sessionmaker[AsyncSession], clock: FakeClock
) -> None:
    config = SchedulerConfig(
        record_lifecycle=True, lifecycle_flush_seconds=0.01, run_history_retention_days=1
    )
    app = lifecycle_app(broker, session_factory, clock, config)
    old = await fire_now(app, clock, "tests.record")
    await run_status_is(session_factory, old, RunStatus.SUCCEEDED)
    clock.advance(days=2)
    recent = await fire_now(app, clock, "tests.record")
    await run_status_is(session_factory, recent, RunStatus.SUCCEEDED)

    housekeeper = Housekeeper(store=app._store, config=config, clock=clock)
    assert await housekeeper.purge_history() == (1, 1)
    async with session_factory() as session:
        assert [job.id for job in await app.list_jobs(session)] == [recent]
        assert [run.job_id for run in await app.list_runs(session)] == [recent]
        workers = (await session.execute(sa.select(SchedulerWorker))).scalars().all()
        assert len(workers) == 1


async def _true(value: bool) -> bool:
    return value


async def test_outcomes_wait_out_a_locked_database_and_are_written_after(
    tmp_path: Any, broker: RecordingBroker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The database refusing writes (SQLite locked by another process) while a task ends:
    its outcome is kept, one warning says so, and it is written once the lock is gone."""
    path = tmp_path / "locked.sqlite3"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 0.05})
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    gate = asyncio.Event()

    @broker.task(task_name="tests.gated")
    async def gated() -> None:
        await gate.wait()

    app = lifecycle_app(broker, factory, clock)
    assert app.lifecycle is not None
    other = sqlite3.connect(path, isolation_level=None)
    try:
        job_id = await fire_now(app, clock, "tests.gated")
        await run_status_is(factory, job_id, RunStatus.RUNNING)
        with caplog.at_level(logging.INFO, logger="taskiq_beat.worker"):
            other.execute("BEGIN EXCLUSIVE")  # another process holds the file
            gate.set()
            await eventually(lambda: _true(app.lifecycle._outage))  # type: ignore[union-attr]
            await asyncio.sleep(0.3)  # a retry or two meet the lock as well
            other.execute("COMMIT")
            await run_status_is(factory, job_id, RunStatus.SUCCEEDED)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "keeping run outcomes" in warnings[0].getMessage()
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        assert app.lifecycle.stats.finished_written == 1
    finally:
        other.close()
        await app.lifecycle.close()
        await engine.dispose()
