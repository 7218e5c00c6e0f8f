"""``taskiq-beat jobs diff`` and ``jobs apply``: the schedules declared in an app's code."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from taskiq_beat import SchedulerJob
from tests.test_cli import beat, json_of

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
