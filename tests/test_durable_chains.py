"""Durable chains: progress in the database, steps advanced on completion (run lifecycle on).

Taskiq's in-memory broker executes the messages in this process, with the app's lifecycle
middleware; the scheduler's watchdog pass is called by the tests with the clock moved.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from taskiq import AsyncTaskiqTask

from taskiq_beat import (
    ChainAbortedError,
    ChainStep,
    EventKind,
    InvalidJobError,
    RunStatus,
    SchedulerApp,
    SchedulerConfig,
    SchedulerEvent,
    SchedulerRun,
    cli,
)
from taskiq_beat.chain import CHAIN_RUN_ID_LABEL, ChainSpec, Plan, ResolvedStep, plan_after
from taskiq_beat.enums import StepStatus
from taskiq_beat.models import SchedulerChainStep, SchedulerWorker
from tests.processes import wait_until
from tests.utils import FakeClock, RecordingBroker

WAIT = 10.0


@pytest.fixture
def config() -> SchedulerConfig:
    return SchedulerConfig(
        record_lifecycle=True,
        lifecycle_flush_seconds=0.01,
        housekeeping_interval_seconds=5.0,
        worker_timeout_seconds=30.0,
    )


@pytest.fixture
async def broker() -> AsyncIterator[RecordingBroker]:
    broker = RecordingBroker()
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


class Steps:
    """The tasks of the tests, and what they did."""

    def __init__(self, broker: RecordingBroker) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.release = asyncio.Event()
        self.calls: dict[str, int] = {}

        @broker.task(task_name="durable.collect")
        async def collect(year: int, month: int) -> dict[str, int]:
            self.log.append(("collect", year, month))
            return {"year": year, "month": month}

        @broker.task(task_name="durable.render")
        async def render(*args: Any, fmt: str) -> str:
            self.log.append(("render", *args, fmt))
            return fmt

        @broker.task(task_name="durable.upload")
        async def upload() -> str:
            self.log.append(("upload",))
            return "ok"

        @broker.task(task_name="durable.broken")
        async def broken() -> None:
            self.log.append(("broken",))
            raise RuntimeError("always fails")

        @broker.task(task_name="durable.blocks_once")
        async def blocks_once() -> str:
            """Waits for ``release`` on its first call; returns at once afterwards."""
            self.calls["blocks_once"] = calls = self.calls.get("blocks_once", 0) + 1
            self.log.append(("blocks_once", calls))
            if calls == 1:
                await self.release.wait()
            return f"call {calls}"

        @broker.task(task_name="durable.opaque")
        async def opaque() -> object:
            self.log.append(("opaque",))
            return object()


@pytest.fixture
def steps(broker: RecordingBroker) -> Steps:
    return Steps(broker)


@pytest.fixture
def app(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    config: SchedulerConfig,
    clock: FakeClock,
    steps: Steps,
) -> SchedulerApp:
    return SchedulerApp(broker=broker, session_factory=session_factory, config=config, clock=clock)


async def step_rows(app: SchedulerApp) -> list[SchedulerChainStep]:
    async with app.session_factory() as session:
        rows = await session.execute(sa.select(SchedulerChainStep).order_by(SchedulerChainStep.id))
        return list(rows.scalars())


async def eventually(check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll the database with ``check`` until it returns something truthy (bounded)."""
    return await wait_until(check, WAIT, interval=0.01)


async def test_steps_run_in_order_and_pass_results(
    app: SchedulerApp, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = await app.chain(
        steps=[
            ChainStep(task="durable.collect", args=[2026, 4]),
            ChainStep(task="durable.render", kwargs={"fmt": "pdf"}, pass_result=True),
            ChainStep(task="durable.upload"),
        ],
        wait_poll_interval_seconds=0.01,
    ).run(timeout=WAIT)

    assert steps.log == [
        ("collect", 2026, 4),
        ("render", {"year": 2026, "month": 4}, "pdf"),
        ("upload",),
    ]
    run = outcome.run
    assert run.status is RunStatus.SUCCEEDED
    assert run.finished_at is not None
    assert outcome.result == "ok"
    assert [(s.step, s.attempt, s.status, s.executions) for s in outcome.steps] == [
        (0, 1, StepStatus.SUCCEEDED, 1),
        (1, 1, StepStatus.SUCCEEDED, 1),
        (2, 1, StepStatus.SUCCEEDED, 1),
    ]
    assert outcome.steps[1].args == [{"year": 2026, "month": 4}]
    assert len({s.task_id for s in outcome.steps}) == 3
    # Each step's message names its run; the orchestrator's task id gets the chain's outcome.
    step_messages = [m for m in app.broker.sent if CHAIN_RUN_ID_LABEL in m.labels]  # type: ignore[attr-defined]
    assert [int(m.labels[CHAIN_RUN_ID_LABEL]) for m in step_messages] == [run.id] * 3
    result = await AsyncTaskiqTask(run.task_id, app.broker.result_backend).get_result()
    assert result.return_value == {"steps": 3, "chain_attempts": 1}
    # list_runs shows the steps; to_dict carries them.
    async with app.session_factory() as session:
        [listed] = await app.list_runs(session, run.job_id)
    assert [step["status"] for step in listed.to_dict()["steps"]] == ["succeeded"] * 3
    assert listed.to_dict()["steps"][0]["result"] == {"year": 2026, "month": 4}
    # A durable chain's fire ends without a result by design: Taskiq's warning is left out.
    assert not [r for r in caplog.records if "skipped setting result" in r.getMessage()]


async def test_a_failing_step_is_retried_then_the_chain_is_aborted(
    app: SchedulerApp, steps: Steps
) -> None:
    events: list[SchedulerEvent] = []
    app.on_event(EventKind.RUN_FAILED, events.append)
    with pytest.raises(ChainAbortedError) as caught:
        await app.chain(
            steps=[
                ChainStep(task="durable.upload"),
                ChainStep(task="durable.broken", max_attempts=2),
                ChainStep(task="durable.render", kwargs={"fmt": "pdf"}),
            ],
            on_failure="stop",
            wait_poll_interval_seconds=0.01,
        ).run(timeout=WAIT)
    assert (caught.value.step, caught.value.task_name) == (1, "durable.broken")
    assert "RuntimeError: always fails" in (caught.value.error or "")
    assert steps.log == [("upload",), ("broken",), ("broken",)]
    rows = await step_rows(app)
    assert [(r.step, r.attempt, r.status) for r in rows] == [
        (0, 1, StepStatus.SUCCEEDED),
        (1, 1, StepStatus.FAILED),
        (1, 2, StepStatus.FAILED),
    ]
    async with app.session_factory() as session:
        run = await session.get(SchedulerRun, rows[0].run_id)
    assert run is not None
    assert run.status is RunStatus.ABORTED
    assert run.error_type == "taskiq_beat.exceptions.ChainAbortedError"
    assert "step 1 (durable.broken) failed after 2 attempts" in (run.error or "")
    # The job counts the chain once, as a failure.
    async with app.session_factory() as session:
        job = await app.get_job(session, run.job_id)
    assert (job.run_count, job.failure_count) == (1, 1)
    await wait_until(lambda: events, WAIT)
    [event] = events
    assert (event.job_id, event.run_id, event.error) == (run.job_id, run.id, run.error)


async def test_restart_runs_the_chain_again_up_to_max_chain_attempts(
    app: SchedulerApp, steps: Steps
) -> None:
    with pytest.raises(ChainAbortedError):
        await app.chain(
            steps=[ChainStep(task="durable.upload"), ChainStep(task="durable.broken")],
            on_failure="restart",
            max_chain_attempts=3,
            wait_poll_interval_seconds=0.01,
        ).run(timeout=WAIT)
    assert steps.log == [("upload",), ("broken",)] * 3
    rows = await step_rows(app)
    assert [(r.chain_attempt, r.step) for r in rows] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
    ]


async def test_a_redelivered_step_message_is_not_executed_again(
    app: SchedulerApp, steps: Steps, broker: RecordingBroker
) -> None:
    outcome = await app.chain(
        steps=[ChainStep(task="durable.upload"), ChainStep(task="durable.collect", args=[1, 2])],
        wait_poll_interval_seconds=0.01,
    ).run(timeout=WAIT)
    first = next(m for m in broker.sent if m.task_name == "durable.upload")
    task = broker.find_task("durable.upload")
    assert task is not None
    await task.kicker().with_task_id(first.task_id).with_labels(**first.labels).kiq()
    await broker.wait_all()
    assert steps.log == [("upload",), ("collect", 1, 2)]
    assert len(await step_rows(app)) == 2
    assert outcome.run.status is RunStatus.SUCCEEDED


async def test_a_timed_out_step_is_retried_with_a_new_task_id_and_its_late_result_ignored(
    app: SchedulerApp, steps: Steps, clock: FakeClock
) -> None:
    handle = await app.chain(
        steps=[ChainStep(task="durable.blocks_once", timeout_seconds=10, max_attempts=2)],
        wait_poll_interval_seconds=0.01,
    ).start()

    async def running() -> bool:
        rows = await step_rows(app)
        return bool(rows) and rows[0].status is StepStatus.RUNNING

    await eventually(running)
    clock.advance(11)
    assert await app.housekeeper.watch_chains() == (0, 1, 0)
    outcome = await handle.wait(WAIT)  # the retry ran meanwhile
    first, retry = await step_rows(app)
    assert first.status is StepStatus.TIMED_OUT
    assert "TimeoutError" in (first.error or "")
    assert retry.attempt == 2
    assert retry.task_id != first.task_id
    steps.release.set()  # the late first attempt ends now: its outcome is ignored
    await app.broker.wait_all()  # type: ignore[attr-defined]
    assert steps.log == [("blocks_once", 1), ("blocks_once", 2)]
    assert outcome.result == "call 2"
    first, retry = await step_rows(app)
    assert (first.status, first.result) == (StepStatus.TIMED_OUT, None)
    assert retry.status is StepStatus.SUCCEEDED


async def test_a_step_of_a_lost_worker_is_sent_again_and_runs_once_more(
    app: SchedulerApp, steps: Steps, clock: FakeClock
) -> None:
    handle = await app.chain(
        steps=[ChainStep(task="durable.blocks_once"), ChainStep(task="durable.upload")],
        wait_poll_interval_seconds=0.01,
    ).start()

    async def running() -> SchedulerChainStep | None:
        rows = await step_rows(app)
        return rows[0] if rows and rows[0].status is StepStatus.RUNNING else None

    await eventually(running)
    # Its worker goes silent (as a killed one would).
    async with app.session_factory() as session:
        await session.execute(
            sa.insert(SchedulerWorker).values(
                id="ghost",
                hostname="gone",
                pid=1,
                started_at=clock.now(),
                last_seen_at=clock.now(),
            )
        )
        await session.execute(sa.update(SchedulerChainStep).values(worker_id="ghost"))
        await session.commit()
    clock.advance(40)
    resent, timed_out, _ = await app.housekeeper.watch_chains()
    assert (resent, timed_out) == (1, 0)
    [row] = await step_rows(app)
    assert (row.status, row.dispatched_at, row.worker_id) == (StepStatus.PENDING, None, None)
    clock.advance(6)  # past the grace the sender had
    assert await app.housekeeper.watch_chains() == (0, 0, 1)
    steps.release.set()
    outcome = await handle.wait(WAIT)
    # Sent again with the same task id: it ran a second time; the chain went on once.
    assert steps.log == [("blocks_once", 1), ("blocks_once", 2), ("upload",)]
    first, second = outcome.steps
    assert (first.executions, first.attempt, first.status) == (2, 1, StepStatus.SUCCEEDED)
    assert second.status is StepStatus.SUCCEEDED


async def test_delays_are_due_times_sent_by_the_scheduler_not_sleeps(
    app: SchedulerApp, steps: Steps, clock: FakeClock
) -> None:
    handle = await app.chain(
        steps=[
            ChainStep(task="durable.upload", post_delay_ms=60_000),
            ChainStep(task="durable.broken", max_attempts=2, retry_delay_seconds=120),
        ],
        wait_poll_interval_seconds=0.01,
    ).start()

    async def waiting() -> SchedulerChainStep | None:
        rows = await step_rows(app)
        return rows[1] if len(rows) == 2 else None

    second = await eventually(waiting)
    [first, _] = await step_rows(app)
    assert first.finished_at is not None
    assert (second.status, second.dispatched_at) == (StepStatus.PENDING, None)
    assert (second.due_at - first.finished_at).total_seconds() == 60
    # Nothing is sent before it is due (and the grace of the worker's own timer is over).
    assert await app.housekeeper.watch_chains() == (0, 0, 0)
    clock.advance(66)
    assert await app.housekeeper.watch_chains() == (0, 0, 1)

    async def retry_recorded() -> SchedulerChainStep | None:
        rows = await step_rows(app)
        return rows[2] if len(rows) == 3 else None

    retry = await eventually(retry_recorded)
    assert retry.attempt == 2
    assert (retry.due_at - clock.now()).total_seconds() == 120
    clock.advance(126)
    assert await app.housekeeper.watch_chains() == (0, 0, 1)
    with pytest.raises(ChainAbortedError):
        await handle.wait(WAIT)
    assert steps.log == [("upload",), ("broken",), ("broken",)]


async def test_a_result_that_cannot_be_passed_fails_the_step(
    app: SchedulerApp, steps: Steps
) -> None:
    with pytest.raises(ChainAbortedError) as caught:
        await app.chain(
            steps=[
                ChainStep(task="durable.opaque"),
                ChainStep(task="durable.render", kwargs={"fmt": "x"}, pass_result=True),
            ],
            wait_poll_interval_seconds=0.01,
        ).run(timeout=WAIT)
    assert caught.value.step == 0
    assert "cannot be passed" in (caught.value.error or "")
    assert steps.log == [("opaque",)]


def test_the_first_step_cannot_take_a_previous_result(app: SchedulerApp) -> None:
    with pytest.raises(InvalidJobError, match=r"steps\[0\]\.pass_result"):
        app.chain(steps=[ChainStep(task="durable.upload", pass_result=True)])


async def test_deleting_the_job_deletes_its_chain(app: SchedulerApp, steps: Steps) -> None:
    outcome = await app.chain(
        steps=[ChainStep(task="durable.upload")], wait_poll_interval_seconds=0.01
    ).run(timeout=WAIT)
    async with app.session_factory() as session:
        await app.delete(session, outcome.run.job_id)
    assert await step_rows(app) == []


def test_chain_aborted_error_keeps_its_details_through_pickling() -> None:
    error = ChainAbortedError("chain x aborted", step=2, task_name="t", error="E: no", run_id=7)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.step, copy.task_name, copy.error, copy.run_id) == (
        "chain x aborted",
        2,
        "t",
        "E: no",
        7,
    )


async def test_without_the_lifecycle_run_waits_for_the_orchestrator_in_the_worker(
    broker: RecordingBroker,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
    steps: Steps,
) -> None:
    broker.max_async_tasks = 30  # the orchestrator waits in a slot of its own
    app = SchedulerApp(
        broker=RecordingBroker(),
        session_factory=session_factory,
        config=SchedulerConfig(record_lifecycle=False),
        clock=clock,
    )
    Steps(app.broker)  # type: ignore[arg-type]
    await app.broker.startup()
    try:
        outcome = await app.chain(
            steps=[ChainStep(task="durable.upload"), ChainStep(task="durable.upload")],
            wait_poll_interval_seconds=0.01,
        ).run(timeout=WAIT)
    finally:
        await app.broker.shutdown()
    assert outcome.run.status is RunStatus.DISPATCHED
    assert outcome.steps == []


async def test_a_short_delay_is_sent_by_the_worker_that_recorded_it(
    app: SchedulerApp, steps: Steps
) -> None:
    outcome = await app.chain(
        steps=[
            ChainStep(task="durable.upload", post_delay_ms=20),
            ChainStep(task="durable.broken", max_attempts=2, retry_delay_seconds=0.02),
        ],
        wait_poll_interval_seconds=0.01,
    ).start()
    with pytest.raises(ChainAbortedError):
        await outcome.wait(WAIT)  # no watchdog pass: the worker's timers sent both
    assert steps.log == [("upload",), ("broken",), ("broken",)]
    rows = await step_rows(app)
    assert [(row.step, row.attempt) for row in rows] == [(0, 1), (1, 1), (1, 2)]
    assert all(row.dispatched_at is not None for row in rows)


async def test_the_dashboard_shows_a_chain_runs_steps(
    app: SchedulerApp, steps: Steps, clock: FakeClock
) -> None:
    httpx = pytest.importorskip("httpx")
    dashboard_module = pytest.importorskip("taskiq_beat.dashboard")
    with pytest.raises(ChainAbortedError):
        await app.chain(
            steps=[
                ChainStep(task="durable.upload"),
                ChainStep(task="durable.broken", max_attempts=2),
            ],
            wait_poll_interval_seconds=0.01,
        ).run(timeout=WAIT)
    dashboard = dashboard_module.create_dashboard(app, clock=clock)
    transport = httpx.ASGITransport(app=dashboard)
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        page = await client.get("/runs")
    assert page.status_code == 200
    shown = re.findall(r'<li data-step="(\d+)"[^>]*>([^<]+)</li>', page.text)
    assert shown == [("0", "0 succeeded"), ("1", "1 failed"), ("1", "1.2 failed")]
    assert "badge-aborted" in page.text


def _spec(**options: Any) -> ChainSpec:
    step = {"args": [], "kwargs": {}, "retry_delay_seconds": 1.5, "timeout_seconds": None}
    return ChainSpec(
        steps=[
            ResolvedStep(task_name="a", max_attempts=1, post_delay_ms=250, **step),
            ResolvedStep(task_name="b", max_attempts=2, post_delay_ms=0, **step),
        ],
        **options,
    )


@pytest.mark.parametrize(
    ("options", "at", "succeeded", "expected"),
    [
        ({}, (1, 0, 1), True, Plan(1, 1, 1, 0.25)),
        ({}, (1, 1, 1), True, Plan(1, succeeded=True)),
        ({}, (1, 1, 1), False, Plan(1, 1, 2, 1.5)),
        ({}, (1, 1, 2), False, Plan(1)),
        ({"on_failure": "restart", "max_chain_attempts": 2}, (1, 1, 2), False, Plan(2, 0, 1)),
        ({"on_failure": "restart", "max_chain_attempts": 2}, (2, 1, 2), False, Plan(2)),
    ],
    ids=["next", "last", "retry", "stop", "restart", "restarts_used"],
)
def test_the_chain_policy(
    options: dict[str, Any], at: tuple[int, int, int], succeeded: bool, expected: Plan
) -> None:
    assert plan_after(_spec(**options), *at, succeeded=succeeded) == expected


async def test_the_runs_command_shows_a_chain_runs_steps(
    app: SchedulerApp, steps: Steps, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = await app.chain(
        steps=[ChainStep(task="durable.upload"), ChainStep(task="durable.collect", args=[1, 2])],
        wait_poll_interval_seconds=0.01,
    ).run(timeout=WAIT)
    code = await asyncio.to_thread(cli.main, ["runs", outcome.run.job_id, "--db", database_url])
    assert code == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "STEPS" in header
    assert "0:succeeded 1:succeeded" in row


async def test_the_worker_cancels_a_step_at_its_timeout_and_records_it_timed_out(
    app: SchedulerApp, steps: Steps
) -> None:
    outcome = await app.chain(
        steps=[ChainStep(task="durable.blocks_once", timeout_seconds=0.05, max_attempts=2)],
        wait_poll_interval_seconds=0.01,
    ).run(timeout=WAIT)  # no watchdog pass: Taskiq's timeout label ended the first attempt
    first, retry = outcome.steps
    assert (first.status, first.error_type) == (StepStatus.TIMED_OUT, "TimeoutError")
    assert first.task_id != retry.task_id
    assert (retry.attempt, retry.status) == (2, StepStatus.SUCCEEDED)
    assert outcome.result == "call 2"
