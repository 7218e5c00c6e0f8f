"""Chains run by the orchestrator task on Taskiq's in-memory broker (with its result backend)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from taskiq import AsyncTaskiqTask, TaskiqResult

from taskiq_beat import (
    CHAIN_TASK_NAME,
    JOB_ID_LABEL,
    SCHEDULED_FOR_LABEL,
    ChainAbortedError,
    ChainStep,
    SchedulerApp,
)
from taskiq_beat.chain import (
    CHAIN_JOB_ID_LABEL,
    CHAIN_SCHEDULED_FOR_LABEL,
    CHAIN_STEP_LABEL,
    CHAIN_TASK_ID_LABEL,
)
from tests.utils import RecordingBroker


@pytest.fixture
def steps_log(broker: RecordingBroker) -> list[Any]:
    log: list[Any] = []
    flaky_calls = {"n": 0}

    @broker.task(task_name="chain.collect")
    async def collect(year: int, month: int) -> dict[str, int]:
        log.append(("collect", year, month))
        return {"year": year, "month": month}

    @broker.task(task_name="chain.render")
    async def render(*, format: str) -> str:
        log.append(("render", format))
        return format

    @broker.task(task_name="chain.upload")
    async def upload() -> str:
        log.append(("upload",))
        return "ok"

    @broker.task(task_name="chain.flaky")
    async def flaky() -> None:
        flaky_calls["n"] += 1
        log.append(("flaky", flaky_calls["n"]))
        if flaky_calls["n"] < 2:
            raise RuntimeError("first call fails")

    @broker.task(task_name="chain.broken")
    async def broken() -> None:
        log.append(("broken",))
        raise RuntimeError("always fails")

    @broker.task(task_name="chain.slow")
    async def slow() -> None:
        log.append(("slow",))
        await asyncio.sleep(5)

    return log


async def run_chain(
    app: SchedulerApp, session: AsyncSession, steps: list[ChainStep], **options: Any
) -> TaskiqResult[Any]:
    """Schedule the chain for immediate dispatch and wait for the orchestrator's result."""
    job = await app.chain(steps=steps, wait_poll_interval_seconds=0.01, **options).schedule(session)
    [run] = await app.list_runs(session, job.id)
    handle: AsyncTaskiqTask[Any] = AsyncTaskiqTask(run.task_id, app.broker.result_backend)
    return await handle.wait_result(check_interval=0.01, timeout=10)


def test_scheduler_app_registers_the_orchestrator(
    app: SchedulerApp, broker: RecordingBroker
) -> None:
    assert broker.find_task(CHAIN_TASK_NAME) is not None
    assert CHAIN_TASK_NAME == "taskiq_beat.chain_orchestrator"


async def test_steps_run_in_order(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app,
        session,
        [
            ChainStep(task="chain.collect", args=[2026, 4]),
            ChainStep(task="chain.render", kwargs={"format": "pdf"}, post_delay_ms=20),
            ChainStep(task="chain.upload", timeout_seconds=5),
        ],
    )
    assert not result.is_err, result.error
    assert result.return_value == {"steps": 3, "chain_attempts": 1}
    assert steps_log == [("collect", 2026, 4), ("render", "pdf"), ("upload",)]
    # Each step's message names the chain fire it belongs to, under labels of its own.
    orchestrator, *steps = app.broker.sent  # type: ignore[attr-defined]
    assert [m.task_name for m in steps] == ["chain.collect", "chain.render", "chain.upload"]
    for position, message in enumerate(steps):
        assert message.labels[CHAIN_JOB_ID_LABEL] == orchestrator.labels[JOB_ID_LABEL]
        assert message.labels[CHAIN_SCHEDULED_FOR_LABEL] == orchestrator.labels[SCHEDULED_FOR_LABEL]
        assert message.labels[CHAIN_TASK_ID_LABEL] == orchestrator.task_id
        assert int(message.labels[CHAIN_STEP_LABEL]) == position
        assert JOB_ID_LABEL not in message.labels


async def test_a_step_is_retried_within_its_budget(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app,
        session,
        [ChainStep(task="chain.flaky", max_attempts=3), ChainStep(task="chain.upload")],
    )
    assert not result.is_err, result.error
    assert steps_log == [("flaky", 1), ("flaky", 2), ("upload",)]


async def test_stop_aborts_after_the_step_budget(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app,
        session,
        [
            ChainStep(task="chain.upload"),
            ChainStep(task="chain.broken", max_attempts=2),
            ChainStep(task="chain.render", kwargs={"format": "pdf"}),
        ],
        on_failure="stop",
    )
    assert result.is_err
    assert isinstance(result.error, ChainAbortedError)
    assert steps_log == [("upload",), ("broken",), ("broken",)]


async def test_restart_runs_the_chain_again_up_to_max_chain_attempts(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app,
        session,
        [ChainStep(task="chain.upload"), ChainStep(task="chain.broken")],
        on_failure="restart",
        max_chain_attempts=3,
    )
    assert result.is_err
    assert isinstance(result.error, ChainAbortedError)
    assert steps_log == [("upload",), ("broken",)] * 3


async def test_step_timeout_counts_as_a_failure(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app, session, [ChainStep(task="chain.slow", timeout_seconds=0.05)], on_failure="stop"
    )
    assert result.is_err
    assert isinstance(result.error, ChainAbortedError)
    assert "Timeout" in str(result.error)


async def test_chain_defaults_apply_to_steps(
    app: SchedulerApp, session: AsyncSession, steps_log: list[Any]
) -> None:
    result = await run_chain(
        app,
        session,
        [ChainStep(task="chain.flaky")],
        default_step_max_attempts=2,
        default_step_retry_delay_seconds=0.01,
    )
    assert not result.is_err, result.error
    assert steps_log == [("flaky", 1), ("flaky", 2)]
