"""``taskiq-beat db upgrade`` on a database that taskiq-beat 1.4.0 made, on SQLite and PostgreSQL.

The database comes from ``tests/fixtures/v14/`` (what the real 1.4.0 package wrote, captured
with ``capture.sh``), and in the ``package`` cases from the real package itself, in a
subprocess: 1.4.0 needs Python >= 3.12, so the test installs it into a venv of its own
(``.bench-venvs/taskiq-beat-1.4.0``, shared with ``scripts/bench.py --vs``) made with the
first Python >= 3.12 it finds (``TASKIQ_BEAT_V14_PYTHON`` names one with 1.4.0 installed
already). Where this machine has no such Python, those cases are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from taskiq_beat import SchedulerApp, SchedulerConfig, SchedulerJob, SchedulerRun
from taskiq_beat.chain import CHAIN_TASK_NAME
from taskiq_beat.exceptions import InvalidTriggerError
from taskiq_beat.migrate import (
    V14_ARCHIVE_TABLES,
    describe_upgrade,
    is_v14_database,
    upgrade_database,
)
from taskiq_beat.triggers import trigger_from_json, trigger_to_json
from taskiq_beat.v14 import convert_trigger, v14_day_of_week
from tests.test_cli import beat
from tests.test_migrations import HEAD, VERSION_TABLE, _schema_diff
from tests.utils import UTC, FakeClock, RecordingBroker, temporary_postgres_database

FIXTURES = Path(__file__).parent / "fixtures" / "v14"
V14_VENV = Path(__file__).resolve().parents[1] / ".bench-venvs" / "taskiq-beat-1.4.0"
V14_REQUIREMENTS = ["taskiq-beat==1.4.0", "aiosqlite", "asyncpg", "greenlet"]


def _has_v14(python: str) -> bool:
    check = "from importlib.metadata import version; assert version('taskiq-beat') == '1.4.0'"
    return subprocess.run([python, "-c", check], capture_output=True, cwd="/").returncode == 0


def _python312() -> str | None:
    """The first Python >= 3.12 on this machine (PATH, then pyenv's versions)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (14, 13, 12)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        for version in sorted(pyenv.iterdir(), reverse=True):
            candidates += [str(version / "bin" / f"python3.{minor}") for minor in (14, 13, 12)]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = [candidate, "-c", "import sys, venv; assert sys.version_info >= (3, 12)"]
            if subprocess.run(probe, capture_output=True).returncode == 0:
                return candidate
    return None


@pytest.fixture(scope="session")
def v14_python() -> str:
    """A Python with the real taskiq-beat 1.4.0 installed (made on first use)."""
    given = os.environ.get("TASKIQ_BEAT_V14_PYTHON")
    if given:
        return given
    python = V14_VENV / "bin" / "python"
    if python.exists() and _has_v14(str(python)):
        return str(python)
    base = _python312()
    if base is None:
        pytest.skip("taskiq-beat 1.4.0 needs Python >= 3.12, and this machine has none")
    subprocess.run([base, "-m", "venv", "--clear", str(V14_VENV)], check=True, timeout=300)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *V14_REQUIREMENTS,
        ],
        check=True,
        timeout=600,
    )
    assert _has_v14(str(python))
    return str(python)


def _load_fixture(url: str, backend: str) -> None:
    script = (FIXTURES / f"{backend}.sql").read_text()
    if backend == "sqlite":
        database = make_url(url).database
        assert database is not None
        with sqlite3.connect(database) as connection:
            connection.executescript(script)
        return

    async def load() -> None:
        plain = make_url(url).set(drivername="postgresql")
        connection = await asyncpg.connect(plain.render_as_string(hide_password=False))
        try:
            await connection.execute(script)
        finally:
            await connection.close()

    asyncio.run(load())


def _make_with_package(url: str, python: str) -> None:
    # The run, then the pause of one job in a process of its own (see make_database.py).
    for extra in ([], ["--pause"]):
        made = subprocess.run(
            [python, "-I", str(FIXTURES / "make_database.py"), url, *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # What the 1.4.0 package printed, when it fails (captured, it would be lost).
        assert made.returncode == 0, f"make_database.py exited {made.returncode}:\n{made.stderr}"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["fixture", "package"])
async def v14_url(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> AsyncIterator[str]:
    """A database as taskiq-beat 1.4.0 left it."""
    python = request.getfixturevalue("v14_python") if request.param == "package" else None

    async def fill(url: str) -> None:
        if python is None:
            await asyncio.to_thread(_load_fixture, url, backend)
        else:
            await asyncio.to_thread(_make_with_package, url, python)

    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'v14.sqlite3'}"
        await fill(url)
        yield url
        return
    async with temporary_postgres_database("taskiq_beat_v14") as url:
        await fill(url)
        yield url


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def _read(url: str, statement: str) -> list[dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [dict(row) for row in (await connection.execute(sa.text(statement))).mappings()]
    finally:
        await engine.dispose()


async def _on(url: str, work: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(work)
    finally:
        await engine.dispose()


async def test_upgrade_converts_a_v14_database_in_place(v14_url: str) -> None:
    before = {row["id"]: row for row in await _read(v14_url, "SELECT * FROM scheduler_job")}
    old_runs = await _read(v14_url, "SELECT * FROM scheduler_run")
    assert await _on(v14_url, is_v14_database)

    done = await asyncio.to_thread(upgrade_database, v14_url)
    assert any("copy 12 jobs" in line for line in done)

    assert not await _on(v14_url, is_v14_database)
    versions = await _read(v14_url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert [row["version_num"] for row in versions] == [HEAD]
    # Our tables are exactly the models'; the archive is all that is left over.
    diff = await _on(v14_url, _schema_diff)
    assert {entry[1].name for entry in diff if entry[0] == "remove_table"} == set(
        V14_ARCHIVE_TABLES.values()
    )
    assert [entry for entry in diff if entry[0] != "remove_table"] == []
    archived = await _read(v14_url, "SELECT id FROM taskiq_beat_v14_job")
    assert {row["id"] for row in archived} == set(before)
    assert len(await _read(v14_url, "SELECT id FROM taskiq_beat_v14_run")) == len(old_runs)

    engine = create_async_engine(v14_url)
    try:
        async with async_sessionmaker(engine)() as session:
            jobs = {job.id: job for job in (await session.scalars(sa.select(SchedulerJob)))}
            runs = list(await session.scalars(sa.select(SchedulerRun)))
    finally:
        await engine.dispose()

    assert set(jobs) == set(before)
    for job_id, old in before.items():
        job = jobs[job_id]
        assert job.is_enabled == bool(old["is_enabled"]), job_id
        assert job.next_run_at == _utc(old["next_run_at"]), job_id
        assert job.last_run_at == _utc(old["last_run_at"]), job_id
        assert job.created_at == _utc(old["created_at"]), job_id
        assert job.task_name == old["task_name"]
        assert (job.name, job.description) == (old["name"], old["description"])
        assert job.args == _json(old["task_args"])
        assert job.job_metadata == _json(old["metadata_payload"])
        assert job.strategy.value == old["strategy"]
        assert job.source.value == "api"
        trigger_from_json(job.trigger, job_id=job_id)  # readable by this package
        if job.task_name != CHAIN_TASK_NAME:
            assert job.kwargs == _json(old["task_kwargs"])

    # Triggers mean what they meant in 1.4.
    report = jobs["report.hourly"]
    assert report.trigger["interval"]["hours"] == 1
    assert report.kwargs == {"fmt": "pdf"}
    weekday = jobs["weekday.morning"].trigger["crontab"]
    assert (weekday["day_of_week"], weekday["hour"], weekday["timezone"]) == (
        "1-5",  # 1.4's "0-4": Monday to Friday
        "7",
        "Europe/Berlin",
    )
    assert jobs["sunday.noon"].trigger["crontab"]["day_of_week"] == "0"  # 1.4's "6"
    bounded = jobs["bounded.ten_minutes"].trigger
    old_bounds = _json(before["bounded.ten_minutes"]["trigger_payload"])
    assert _utc(bounded["start_at"]) == _utc(old_bounds["start_at"])
    assert _utc(bounded["end_at"]) == _utc(old_bounds["end_at"])
    once = jobs["once.tomorrow"].trigger
    assert _utc(once["run_at"]) == _utc(_json(before["once.tomorrow"]["trigger_payload"])["run_at"])
    chain = jobs["chain.nightly"]
    assert chain.kind.value == "chain"
    spec = chain.kwargs["chain"]
    assert (spec["on_failure"], spec["max_chain_attempts"]) == ("restart", 2)
    assert [(step["task_name"], step["max_attempts"]) for step in spec["steps"]] == [
        ("legacy.report", 1),
        ("legacy.tick", 3),
    ]

    # History: one run per fire, with 1.4's task ids.
    dispatched = {
        (row["job_id"], _utc(row["scheduled_for"])): row["broker_task_id"]
        for row in old_runs
        if row["status"] == "dispatched"
    }
    assert dispatched
    ours = {(run.job_id, run.scheduled_for): run for run in runs}
    for key, task_id in dispatched.items():
        assert ours[key].status.value == "dispatched"
        assert ours[key].task_id == task_id
    assert {run.job_id for run in runs if run.status.value == "failed"} == {
        row["job_id"] for row in old_runs if row["status"] == "failed"
    }


async def test_the_converted_database_runs_with_our_scheduler(v14_url: str) -> None:
    await asyncio.to_thread(upgrade_database, v14_url)
    [row] = await _read(v14_url, "SELECT next_run_at FROM scheduler_job WHERE id = 'report.hourly'")
    due = _utc(row["next_run_at"])
    assert due is not None
    broker = RecordingBroker()
    for name in ("legacy.report", "legacy.tick", "legacy.broken"):

        @broker.task(task_name=name)
        async def task(*args: Any, **kwargs: Any) -> None:
            return None

    clock = FakeClock(due - timedelta(seconds=1))
    engine = create_async_engine(v14_url)
    try:
        app = SchedulerApp(
            broker=broker,
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
            config=SchedulerConfig(record_lifecycle=False, misfire_grace_seconds=0.5),
            clock=clock,
        )
        await broker.startup()
        await app.engine.sync()
        clock.set(due)
        assert await app.engine.tick() >= 1
        [message] = broker.sent_for("report.hourly")
        assert (message.args, message.kwargs) == ([1, "a"], {"fmt": "pdf"})
        assert message.labels["team"] == "ops"
        async with app.session_factory() as session:
            job = await app.get_job(session, "report.hourly")
            [run] = await app.list_runs(session, "report.hourly")
        assert job.next_run_at == due + timedelta(hours=1)
        assert (run.scheduled_for, run.status.value) == (due, "dispatched")
    finally:
        await broker.shutdown()
        await engine.dispose()


async def test_dry_run_says_what_it_would_do_and_changes_nothing(
    v14_url: str, tmp_path: Path
) -> None:
    result = await beat("db", "upgrade", "--dry-run", "--db", v14_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "taskiq-beat 1.4 database found" in result.stdout
    assert "would rename scheduler_job to taskiq_beat_v14_job" in result.stdout
    assert "would copy 12 jobs" in result.stdout
    assert await _on(v14_url, is_v14_database)
    tables = await _on(v14_url, lambda c: set(sa.inspect(c).get_table_names()))
    assert tables == {"scheduler_job", "scheduler_run"}

    result = await beat("db", "upgrade", "--db", v14_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "database upgraded to head" in result.stdout
    after = await asyncio.to_thread(describe_upgrade, v14_url)
    assert after == [f"current revision: {HEAD}", "nothing to apply"]


async def test_a_job_that_cannot_be_converted_is_kept_disabled_with_the_reason(
    v14_url: str,
) -> None:
    engine = create_async_engine(v14_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(
                    "UPDATE scheduler_job SET trigger_payload = :payload WHERE id = 'report.hourly'"
                ),
                {"payload": json.dumps({"strategy": "interval", "interval": {"hours": -1}})},
            )
    finally:
        await engine.dispose()
    done = await asyncio.to_thread(upgrade_database, v14_url)
    assert any(line.startswith("disable job report.hourly:") for line in done)
    [row] = await _read(
        v14_url,
        "SELECT is_enabled, last_error, next_run_at FROM scheduler_job WHERE id = 'report.hourly'",
    )
    assert not row["is_enabled"]
    assert "not converted from taskiq-beat 1.4" in row["last_error"]
    assert "hours" in row["last_error"]


async def test_a_v14_database_is_converted_to_head_only(v14_url: str) -> None:
    with pytest.raises(ValueError, match="'head' only"):
        await asyncio.to_thread(upgrade_database, v14_url, "0001")
    assert await _on(v14_url, is_v14_database)


@pytest.mark.parametrize(
    ("v14", "cron"),
    [
        pytest.param("0-4", "1-5", id="monday_to_friday"),
        pytest.param("6", "0", id="sunday"),
        pytest.param("5,6", "0,6", id="weekend"),
        pytest.param("*/2", "0-1,3,5", id="every_other_day_from_monday"),
        pytest.param("0-6", "*", id="whole_week_written_out"),
        pytest.param("*", "*", id="any_day"),
    ],
)
def test_days_of_the_week_move_from_monday_zero_to_sunday_zero(v14: str, cron: str) -> None:
    assert v14_day_of_week(v14) == cron


def test_cron_fields_keep_their_meaning() -> None:
    payload = {
        "strategy": "crontab",
        "crontab": {
            "second": "*/90",  # 1.4: {0}
            "minute": "0-59",  # the whole range, written out
            "hour": "1-31/10",
            "day_of_month": "1-31",
            "month_of_year": "*",
            "day_of_week": "*",
            "timezone": "UTC",
        },
    }
    with pytest.raises(ValueError, match="0-23"):
        convert_trigger("crontab", payload)  # 1.4 refuses an hour of 31 too
    payload["crontab"]["hour"] = "1-21/10"  # type: ignore[index]
    trigger = convert_trigger("crontab", payload)
    assert trigger_from_json(trigger_to_json(trigger)) == trigger
    after = datetime(2027, 3, 1, 0, 0, 30, tzinfo=timezone.utc)
    fires = []
    for _ in range(4):
        next_fire = trigger.get_next_run_at(after)
        assert next_fire is not None
        fires.append(next_fire)
        after = next_fire
    assert [fire.strftime("%H:%M:%S") for fire in fires] == [
        "01:00:00",
        "01:01:00",
        "01:02:00",
        "01:03:00",
    ]


def test_a_bad_payload_names_what_is_wrong() -> None:
    with pytest.raises(InvalidTriggerError):
        convert_trigger("interval", {"interval": {"minutes": 0}})
    with pytest.raises(ValueError, match="run_at"):
        convert_trigger("one_off", {"run_at": "2026-01-01T00:00:00"})
    with pytest.raises(ValueError, match="unknown strategy"):
        convert_trigger("hourly", {})


async def test_a_conversion_that_fails_half_way_leaves_the_v14_database_as_it_was(
    v14_url: str,
) -> None:
    """A table in the way of the migrations (created after the renames and our first tables):
    everything done before it is rolled back, on SQLite as on PostgreSQL."""
    engine = create_async_engine(v14_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text("CREATE TABLE scheduler_worker (id INTEGER)"))
    finally:
        await engine.dispose()
    before = await _read(v14_url, "SELECT * FROM scheduler_job ORDER BY id")
    with pytest.raises(sa.exc.DatabaseError):
        await asyncio.to_thread(upgrade_database, v14_url)
    assert await _on(v14_url, is_v14_database)
    tables = await _on(v14_url, lambda c: set(sa.inspect(c).get_table_names()))
    assert tables == {"scheduler_job", "scheduler_run", "scheduler_worker"}
    assert await _read(v14_url, "SELECT * FROM scheduler_job ORDER BY id") == before
    indexes = await _on(v14_url, lambda c: sa.inspect(c).get_indexes("scheduler_job"))
    assert indexes  # 1.4's own indexes are back too


async def test_plain_alembic_refuses_a_v14_database_and_says_what_to_run(v14_url: str) -> None:
    from alembic import command

    from tests.test_migrations import _config

    with pytest.raises(RuntimeError, match="taskiq-beat db upgrade"):
        await asyncio.to_thread(command.upgrade, _config(v14_url), "head")
    assert await _on(v14_url, is_v14_database)


async def test_dry_run_of_an_ordinary_database_lists_the_pending_migrations(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'plain.sqlite3'}"
    lines = await asyncio.to_thread(describe_upgrade, url)
    assert lines[0] == "current revision: none (empty database)"
    assert lines[-1] == f"apply migration {HEAD}"
    await asyncio.to_thread(upgrade_database, url, "0002")
    lines = await asyncio.to_thread(describe_upgrade, url)
    assert lines[0] == "current revision: 0002"
    assert lines[-1] == f"apply migration {HEAD}"
    assert not {"apply migration 0001", "apply migration 0002"} & set(lines)
