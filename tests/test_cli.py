"""The ``taskiq-beat`` command, run as a real subprocess against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from taskiq_beat import RunStatus, SchedulerBase, SchedulerRun
from taskiq_beat.cli import main

APP_MODULE = """
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import IntervalTrigger, PeriodicSchedule, SchedulerApp, SchedulerConfig

engine = create_async_engine({url!r})
broker = InMemoryBroker()


@broker.task(task_name="cli.tick")
async def tick() -> None:
    return None


scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=async_sessionmaker(engine, expire_on_commit=False),
    # The in-memory broker runs each task inside the CLI's own process: the runs stay as the
    # scheduler leaves them ("dispatched"), as with a real broker whose workers run elsewhere.
    config=SchedulerConfig(
        sync_interval_seconds=0.2, idle_sleep_seconds=0.05, record_lifecycle=False
    ),
)


async def seed(app):
    async with app.session_factory() as session:
        await app.single(task=tick).upsert(
            session,
            trigger=PeriodicSchedule(interval=IntervalTrigger(seconds={interval})),
            job_id="sys.tick",
            name="Tick",
        )
"""


def write_app(directory: Path, url: str, interval: float = 3600) -> str:
    """Write an app module (a fresh name each time: modules are cached per process)."""
    name = f"cliapp_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(APP_MODULE.format(url=url, interval=interval))
    return name


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def beat(*args: str, cwd: Path) -> Result:
    """Run ``taskiq-beat`` in this process (in a thread: it runs its own event loop)."""
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            previous = os.getcwd()
            os.chdir(cwd)
            try:
                return main(list(args))
            finally:
                os.chdir(previous)

    code = await asyncio.to_thread(call)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
async def project(
    tmp_path: Path, database_url: str, db_engine: AsyncEngine
) -> AsyncIterator[tuple[Path, str]]:
    name = write_app(tmp_path, database_url)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        await module.seed(module.scheduler_app)
        await module.engine.dispose()  # the CLI runs its own event loop: leave no pooled link
        yield tmp_path, f"{name}:scheduler_app"
    finally:
        sys.path.remove(str(tmp_path))


def json_of(result: Result) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_jobs_list_show_pause_resume_delete(
    project: tuple[Path, str], database_url: str
) -> None:
    cwd, target = project
    app = ("--app", target)
    listed = await beat("jobs", "list", *app, cwd=cwd)
    assert listed.returncode == 0
    assert "sys.tick" in listed.stdout
    assert listed.stdout.splitlines()[0].startswith("ID")

    [job] = json_of(await beat("jobs", "list", "--json", *app, cwd=cwd))
    assert job["id"] == "sys.tick"
    assert job["is_enabled"] is True

    paused = json_of(
        await beat("jobs", "pause", "sys.tick", "--json", "--db", database_url, cwd=cwd)
    )
    assert paused["is_enabled"] is False
    disabled = json_of(await beat("jobs", "list", "--disabled", "--json", *app, cwd=cwd))
    assert [j["id"] for j in disabled] == ["sys.tick"]
    assert json_of(await beat("jobs", "list", "--enabled", "--json", *app, cwd=cwd)) == []

    resumed = json_of(await beat("jobs", "resume", "sys.tick", "--json", *app, cwd=cwd))
    assert resumed["is_enabled"] is True
    shown = json_of(await beat("jobs", "show", "sys.tick", "--json", *app, cwd=cwd))
    assert shown["trigger"]["type"] == "periodic"

    deleted = json_of(await beat("jobs", "delete", "sys.tick", "--json", *app, cwd=cwd))
    assert deleted == {"deleted": "sys.tick"}
    assert json_of(await beat("jobs", "list", "--json", *app, cwd=cwd)) == []


async def test_run_now_and_runs(project: tuple[Path, str], database_url: str) -> None:
    cwd, target = project
    run = json_of(await beat("jobs", "run-now", "sys.tick", "--json", "--app", target, cwd=cwd))
    assert run["status"] == "dispatched"
    runs = json_of(await beat("runs", "sys.tick", "--json", "--db", database_url, cwd=cwd))
    assert [r["task_id"] for r in runs] == [run["task_id"]]
    table = await beat("runs", "--status", "dispatched", "--app", target, cwd=cwd)
    assert table.returncode == 0
    assert run["task_id"] in table.stdout
    failed = await beat("runs", "--status", "failed", "--json", "--app", target, cwd=cwd)
    assert json_of(failed) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(("jobs", "show", "missing"), 3, "missing", id="not_found"),
        pytest.param(("jobs", "pause", "missing"), 3, "missing", id="pause_not_found"),
        pytest.param(("runs", "--status", "exploded"), 2, "exploded", id="bad_status"),
        pytest.param(("jobs", "list", "--limit", "-1"), 2, "limit", id="bad_limit"),
    ],
)
async def test_exit_codes_tell_not_found_from_bad_input(
    project: tuple[Path, str], args: tuple[str, ...], code: int, message: str
) -> None:
    cwd, target = project
    result = await beat(*args, "--app", target, cwd=cwd)
    assert result.returncode == code, result.stderr
    assert message in result.stderr


async def test_run_now_without_app_is_bad_usage(
    project: tuple[Path, str], database_url: str
) -> None:
    cwd, _ = project
    result = await beat("jobs", "run-now", "sys.tick", "--db", database_url, cwd=cwd)
    assert result.returncode == 2
    assert "--app" in result.stderr


async def test_no_database_given_is_bad_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKIQ_BEAT_DATABASE_URL", raising=False)
    result = await beat("jobs", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "--db" in result.stderr


def _closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        pytest.param("mysql+asyncmy://root", "Can't connect to MySQL server", id="mysql"),
        pytest.param("postgresql+asyncpg://postgres", "Connect call failed", id="postgresql"),
    ],
)
@pytest.mark.parametrize(
    "command", [["jobs", "list"], ["db", "upgrade"]], ids=["jobs_list", "db_upgrade"]
)
async def test_a_database_server_that_is_down_is_one_line_and_exit_1(
    tmp_path: Path, scheme: str, message: str, command: list[str]
) -> None:
    url = f"{scheme}:secret@127.0.0.1:{_closed_port()}/scheduler"
    result = await beat(*command, "--db", url, cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("taskiq-beat: error: "), line
    assert message in line, line
    assert "secret" not in line


async def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.sqlite3'}"
    result = await beat("db", "upgrade", "--db", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert set(SchedulerBase.metadata.tables) <= tables
    assert "taskiq_beat_alembic_version" in tables


async def count_dispatched(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        result = await connection.execute(
            sa.select(sa.func.count())
            .select_from(SchedulerRun)
            .where(SchedulerRun.status == RunStatus.DISPATCHED)
        )
        return int(result.scalar_one())


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["-m", "taskiq_beat.cli", "run"], id="taskiq-beat_run"),
        pytest.param(["-m", "taskiq_beat.scheduler_runner"], id="scheduler_runner_alias"),
        pytest.param(["-m", "taskiq", "beat"], id="taskiq_beat_plugin"),
    ],
)
async def test_run_fires_jobs_and_stops_on_sigterm(
    tmp_path: Path, database_url: str, db_engine: AsyncEngine, command: list[str]
) -> None:
    name = write_app(tmp_path, database_url, interval=0.2)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        f"{name}:scheduler_app",
        "--startup",
        f"{name}:seed",
        "--log-level",
        "warning",
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while (  # noqa: ASYNC110 - polling another process's writes, bounded by the deadline
            await count_dispatched(db_engine) < 3
            and time.monotonic() < deadline
            and process.returncode is None
        ):
            await asyncio.sleep(0.1)
        assert process.returncode is None, "the scheduler process died"
        assert await count_dispatched(db_engine) >= 3
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr.decode()
        assert time.monotonic() - stopped_at < 5
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def test_runs_show_duration_worker_and_error(
    project: tuple[Path, str], database_url: str, db_engine: AsyncEngine
) -> None:
    cwd, target = project
    run = json_of(await beat("jobs", "run-now", "sys.tick", "--json", "--app", target, cwd=cwd))
    async with db_engine.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE scheduler_run SET status = 'failed', duration_seconds = 0.25,"
                " worker_id = 'host-1-abcd', error_type = 'ValueError',"
                " error = 'ValueError: bad input' WHERE id = :id"
            ),
            {"id": run["id"]},
        )
    table = await beat("runs", "sys.tick", "--app", target, cwd=cwd)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert "DURATION (S)" in header
    assert "WORKER" in header
    for cell in ("failed", "0.250", "host-1-abcd", "ValueError: bad input"):
        assert cell in row
    [listed] = json_of(await beat("runs", "sys.tick", "--json", "--app", target, cwd=cwd))
    assert (listed["duration_seconds"], listed["error_type"]) == (0.25, "ValueError")
    shown = json_of(await beat("jobs", "show", "sys.tick", "--json", "--app", target, cwd=cwd))
    assert shown["run_count"] == 0  # counters are the workers' (none ran here)


async def test_backfill_queues_a_past_range_once(
    project: tuple[Path, str], database_url: str
) -> None:
    """``jobs backfill`` queues each fire of the range that has no run (a running scheduler
    sends them); a second call queues none. Bad times are refused by argparse (exit 2)."""
    cwd, target = project
    shown = json_of(await beat("jobs", "show", "sys.tick", "--json", "--app", target, cwd=cwd))
    assert shown["policy"] is None
    next_run = datetime.fromisoformat(shown["next_run_at"])
    start = (next_run - timedelta(hours=3)).isoformat()
    end = (next_run - timedelta(hours=1)).isoformat()
    args = ("jobs", "backfill", "sys.tick", "--start", start, "--end", end, "--json")
    first = json_of(await beat(*args, "--db", database_url, cwd=cwd))
    assert first == {"job_id": "sys.tick", "queued": 3}  # hourly: -3 h, -2 h, -1 h
    again = json_of(await beat(*args, "--db", database_url, cwd=cwd))
    assert again == {"job_id": "sys.tick", "queued": 0}
    runs = json_of(await beat("runs", "sys.tick", "--json", "--db", database_url, cwd=cwd))
    assert sorted(r["scheduled_for"] for r in runs) == [
        (next_run - timedelta(hours=h)).isoformat() for h in (3, 2, 1)
    ]
    assert {r["status"] for r in runs} == {"claimed"}  # queued for the scheduler to send

    naive = await beat(
        "jobs",
        "backfill",
        "sys.tick",
        "--start",
        "2026-01-01T00:00:00",
        "--end",
        end,
        "--db",
        database_url,
        cwd=cwd,
    )
    assert naive.returncode == 2
    assert "no UTC offset" in naive.stderr
    future = await beat(
        "jobs",
        "backfill",
        "sys.tick",
        "--start",
        start,
        "--end",
        "2999-01-01T00:00:00Z",
        "--db",
        database_url,
        cwd=cwd,
    )
    assert future.returncode == 2
    assert "end=" in future.stderr
