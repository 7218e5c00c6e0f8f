"""``taskiq-beat jobs diff`` and ``jobs apply``: the schedules declared in an app's code."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from taskiq_beat import SchedulerJob
from tests.test_cli import beat, count_dispatched, json_of

DECLARING_APP = """
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import SchedulerApp, SchedulerConfig

broker = InMemoryBroker()
scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=async_sessionmaker(create_async_engine({url!r}), expire_on_commit=False),
    config=SchedulerConfig(record_lifecycle=False),
    schedule_version={version},
)

for job_id in {job_ids!r}:
    @scheduler_app.periodic("0 * * * *", job_id=job_id, kwargs={{"version": {version}}})
    @broker.task(task_name="cli." + job_id)
    async def tick(version: int) -> None:
        return None
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


def write_app(directory: Path, url: str, version: int, *job_ids: str) -> str:
    name = f"declaring_{uuid.uuid4().hex[:8]}"
    text = DECLARING_APP.format(url=url, version=version, job_ids=list(job_ids))
    (directory / f"{name}.py").write_text(text)
    return f"{name}:scheduler_app"


async def _stored(db_engine: AsyncEngine) -> dict[str, tuple[bool, int | None]]:
    async with db_engine.connect() as connection:
        rows = await connection.execute(
            sa.select(SchedulerJob.id, SchedulerJob.is_enabled, SchedulerJob.schedule_version)
        )
        return {job_id: (bool(enabled), version) for job_id, enabled, version in rows}


async def test_diff_then_apply_then_a_new_version(
    project: Path, database_url: str, db_engine: AsyncEngine
) -> None:
    first = write_app(project, database_url, 1, "a", "b")
    diff = await beat("jobs", "diff", "--app", first, cwd=project)
    assert diff.returncode == 0, diff.stderr
    assert "+ a  (added)" in diff.stdout
    assert "2 changes to apply" in diff.stdout
    assert await _stored(db_engine) == {}  # a diff writes nothing

    applied = json_of(await beat("jobs", "apply", "--json", "--app", first, cwd=project))
    assert (applied["applied"], applied["added"]) == (True, ["a", "b"])
    assert await _stored(db_engine) == {"a": (True, 1), "b": (True, 1)}

    second = write_app(project, database_url, 2, "a", "c")
    diff = json_of(await beat("jobs", "diff", "--json", "--app", second, cwd=project))
    assert (diff["added"], diff["changed"], diff["removed"]) == (["c"], ["a"], ["b"])
    table = await beat("jobs", "apply", "--app", second, cwd=project)
    assert "- b  (no longer declared: disabled)" in table.stdout
    assert await _stored(db_engine) == {"a": (True, 2), "b": (False, 2), "c": (True, 2)}

    # The first version again: refused, nothing written.
    stale = await beat("jobs", "apply", "--app", first, cwd=project)
    assert stale.returncode == 0, stale.stderr
    assert "not applied" in stale.stdout
    assert await _stored(db_engine) == {"a": (True, 2), "b": (False, 2), "c": (True, 2)}


async def test_diff_needs_the_app(project: Path, database_url: str, db_engine: AsyncEngine) -> None:
    result = await beat("jobs", "diff", "--db", database_url, cwd=project)
    assert result.returncode == 2
    assert "--app" in result.stderr


RUNNING_APP = """
from datetime import timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import SchedulerApp, SchedulerConfig

broker = InMemoryBroker()
scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=async_sessionmaker(create_async_engine({url!r}), expire_on_commit=False),
    config=SchedulerConfig(
        sync_interval_seconds=0.2, idle_sleep_seconds=0.05, record_lifecycle=False
    ),
)


@scheduler_app.periodic(timedelta(seconds=0.2), job_id="declared.fast")
@broker.task(task_name="cli.fast")
async def fast() -> None:
    return None
"""


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["-m", "taskiq_beat.cli", "run"], id="taskiq-beat_run"),
        pytest.param(["-m", "taskiq", "beat"], id="taskiq_beat_plugin"),
    ],
)
async def test_the_scheduler_process_applies_the_declarations_at_start(
    project: Path, database_url: str, db_engine: AsyncEngine, command: list[str]
) -> None:
    name = f"running_{uuid.uuid4().hex[:8]}"
    (project / f"{name}.py").write_text(RUNNING_APP.format(url=database_url))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        f"{name}:scheduler_app",
        "--log-level",
        "warning",
        cwd=project,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while (  # noqa: ASYNC110 - polling another process's writes, bounded by the deadline
            await count_dispatched(db_engine) < 2
            and time.monotonic() < deadline
            and process.returncode is None
        ):
            await asyncio.sleep(0.1)
        assert process.returncode is None, "the scheduler process died"
        assert await count_dispatched(db_engine) >= 2
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    async with db_engine.connect() as connection:
        [(source, version)] = await connection.execute(
            sa.select(SchedulerJob.source, SchedulerJob.schedule_version)
        )
    assert (source.value, version) == ("code", 0)
