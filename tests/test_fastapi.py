"""The FastAPI router and the example app, over real HTTP against a running uvicorn server.

Each test serves an app in-process (``uvicorn.Server`` as a task on the test's event loop, on a
socket bound to a free port of 127.0.0.1) and talks to it with ``httpx.AsyncClient``; the
example app runs as a ``uvicorn`` subprocess. Database tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from taskiq_beat import (
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.contrib.fastapi import JobOut, RunOut, create_scheduler_router
from tests.utils import FakeClock, RecordingBroker

REPO_ROOT = Path(__file__).resolve().parents[1]
EVERY_MINUTE = PeriodicSchedule(interval=IntervalTrigger(minutes=1))
JOB_DATETIMES = {
    "next_run_at",
    "last_run_at",
    "created_at",
    "updated_at",
    "last_success_at",
    "last_failure_at",
}
RUN_DATETIMES = {
    "scheduled_for",
    "next_attempt_at",
    "created_at",
    "updated_at",
    "dispatched_at",
    "started_at",
    "finished_at",
}
STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0


# ---------------------------------------------------------------------------- helpers


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serve(asgi_app: FastAPI) -> AsyncIterator[str]:
    """Run ``asgi_app`` under uvicorn on this event loop; yield its base URL, then stop it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, known before the server starts
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        asgi_app, lifespan="off", log_config=None, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), STARTUP_TIMEOUT, "uvicorn")
        if task.done():
            task.result()  # raises what made the server stop
            pytest.fail("uvicorn stopped during startup")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, SHUTDOWN_TIMEOUT)
        sock.close()


def local_client(base_url: str) -> httpx.AsyncClient:
    # trust_env=False: a proxy configured in the environment must not see 127.0.0.1 traffic.
    return httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False)


def path_of(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


def parse_utc(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.utcoffset() == timedelta(0), text
    return value


def assert_matches(body: dict[str, Any], expected: dict[str, Any], datetimes: set[str]) -> None:
    """``body`` (from HTTP) holds the values of ``expected`` (from ``to_dict()``)."""
    assert set(body) == set(expected)
    for key, value in expected.items():
        if key in datetimes and value is not None:
            assert parse_utc(body[key]) == datetime.fromisoformat(value), key
        else:
            assert body[key] == value, key


async def add_job(
    app: SchedulerApp,
    session: AsyncSession,
    job_id: str,
    *,
    task: str = "tests.record",
    is_enabled: bool = True,
) -> SchedulerJob:
    return await app.single(task, kwargs={"job": job_id}).upsert(
        session, trigger=EVERY_MINUTE, job_id=job_id, is_enabled=is_enabled
    )


async def stored_job(
    session_factory: async_sessionmaker[AsyncSession], job_id: str
) -> SchedulerJob | None:
    """The job row as the database has it, read in a session of its own."""
    async with session_factory() as session:
        return await session.get(SchedulerJob, job_id)


async def stored_runs(
    session_factory: async_sessionmaker[AsyncSession], job_id: str
) -> list[SchedulerRun]:
    async with session_factory() as session:
        result = await session.execute(
            sa.select(SchedulerRun).where(SchedulerRun.job_id == job_id).order_by(SchedulerRun.id)
        )
        return list(result.scalars())


def ids(response: httpx.Response) -> list[Any]:
    """The ``id`` of every item of a 200 JSON list (job ids, or run ids)."""
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()]


@pytest.fixture
async def client(app: SchedulerApp) -> AsyncIterator[httpx.AsyncClient]:
    api = FastAPI()
    api.include_router(create_scheduler_router(app))
    async with serve(api) as base_url, local_client(base_url) as client:
        yield client


# ---------------------------------------------------------------------------- jobs


async def test_list_jobs_filters_and_pages(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession
) -> None:
    jobs = {
        "a-1": await add_job(app, session, "a-1"),
        "a-2": await add_job(app, session, "a-2"),
        "b-1": await add_job(app, session, "b-1", task="tests.fail"),
        "b-2": await add_job(app, session, "b-2", is_enabled=False),
        "c-1": await add_job(app, session, "c-1"),
    }

    response = await client.get("/jobs")
    assert ids(response) == ["a-1", "a-2", "b-1", "b-2", "c-1"]
    for item in response.json():
        assert_matches(item, jobs[item["id"]].to_dict(), JOB_DATETIMES)

    assert ids(await client.get("/jobs", params={"is_enabled": "false"})) == ["b-2"]
    assert ids(await client.get("/jobs", params={"is_enabled": "true"})) == [
        "a-1",
        "a-2",
        "b-1",
        "c-1",
    ]
    assert ids(await client.get("/jobs", params={"task_name": "tests.fail"})) == ["b-1"]
    assert ids(await client.get("/jobs", params={"task_name": "tests.unknown"})) == []
    assert ids(await client.get("/jobs", params={"limit": 2})) == ["a-1", "a-2"]
    assert ids(await client.get("/jobs", params={"limit": 2, "offset": 2})) == ["b-1", "b-2"]
    assert ids(await client.get("/jobs", params={"offset": 4})) == ["c-1"]
    assert ids(await client.get("/jobs", params={"offset": 5})) == []
    combined: dict[str, str | int] = {
        "is_enabled": "true",
        "task_name": "tests.record",
        "limit": 1,
        "offset": 1,
    }
    assert ids(await client.get("/jobs", params=combined)) == ["a-2"]


async def test_get_job_returns_its_to_dict_values(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await add_job(app, session, "report.daily")

    response = await client.get("/jobs/report.daily")

    assert response.status_code == 200
    body = response.json()
    assert_matches(body, job.to_dict(), JOB_DATETIMES)
    assert body["kind"] == "single"
    assert body["strategy"] == "interval"
    assert body["kwargs"] == {"job": "report.daily"}
    assert parse_utc(body["next_run_at"]) == clock.now() + timedelta(minutes=1)
    assert body["last_run_at"] is None


async def test_a_hand_edited_row_is_still_listed_and_shown(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
    backend: str,
) -> None:
    await add_job(app, session, "edited")
    await add_job(app, session, "intact")
    # SQLite keeps any text; PostgreSQL's json type only valid JSON, so there: a wrong shape.
    stored = "{not json" if backend == "sqlite" else '"a string, not a list"'
    shown: Any = {"unreadable_json": "{not json"} if backend == "sqlite" else "a string, not a list"
    async with session_factory() as other:
        await other.execute(
            sa.text("UPDATE scheduler_job SET args = :args WHERE id = 'edited'"), {"args": stored}
        )
        await other.commit()

    response = await client.get("/jobs/edited")
    assert response.status_code == 200, response.text
    assert response.json()["args"] == shown
    assert response.json()["kwargs"] == {"job": "edited"}
    assert ids(await client.get("/jobs")) == ["edited", "intact"]


async def test_pause_and_resume_change_the_database(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
    clock: FakeClock,
) -> None:
    await add_job(app, session, "toggle")

    paused = await client.post("/jobs/toggle/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["is_enabled"] is False
    assert paused.json()["revision"] == 2
    row = await stored_job(session_factory, "toggle")
    assert row is not None
    assert row.is_enabled is False
    assert row.revision == 2

    again = await client.post("/jobs/toggle/pause")  # pausing a paused job changes nothing
    assert again.status_code == 200
    assert again.json()["revision"] == 2

    clock.advance(minutes=5)
    resumed = await client.post("/jobs/toggle/resume")
    assert resumed.status_code == 200, resumed.text
    body = resumed.json()
    assert body["is_enabled"] is True
    assert body["revision"] == 3
    assert parse_utc(body["next_run_at"]) == clock.now() + timedelta(minutes=1)
    row = await stored_job(session_factory, "toggle")
    assert row is not None
    assert row.is_enabled is True
    assert row.next_run_at == clock.now() + timedelta(minutes=1)


async def test_run_now_sends_the_task_and_records_the_run(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
    broker: RecordingBroker,
    clock: FakeClock,
) -> None:
    await add_job(app, session, "send-me", is_enabled=False)  # paused jobs run too

    response = await client.post("/jobs/send-me/run-now")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == "send-me"
    assert body["status"] == "dispatched"
    assert parse_utc(body["scheduled_for"]) == clock.now()
    [message] = broker.sent_for("send-me")
    assert message.task_name == "tests.record"
    assert message.kwargs == {"job": "send-me"}
    assert message.task_id == body["task_id"]
    [run] = await stored_runs(session_factory, "send-me")
    assert run.id == body["id"]
    assert run.status is RunStatus.DISPATCHED
    assert_matches(body, run.to_dict(), RUN_DATETIMES)
    job = await stored_job(session_factory, "send-me")
    assert job is not None
    assert job.is_enabled is False  # the schedule is not touched

    # A second fire at the same instant is refused by the scheduler: 409 naming the field.
    refused = await client.post("/jobs/send-me/run-now")
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith("invalid job_id='send-me': ")
    assert len(broker.sent_for("send-me")) == 1

    clock.advance(seconds=1)
    assert (await client.post("/jobs/send-me/run-now")).status_code == 200
    assert len(broker.sent_for("send-me")) == 2
    assert len(await stored_runs(session_factory, "send-me")) == 2


async def test_delete_answers_204_then_404(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    await add_job(app, session, "doomed")
    await add_job(app, session, "kept")
    assert (await client.post("/jobs/doomed/run-now")).status_code == 200

    deleted = await client.delete("/jobs/doomed")

    assert deleted.status_code == 204
    assert deleted.content == b""
    assert await stored_job(session_factory, "doomed") is None
    assert await stored_runs(session_factory, "doomed") == []
    assert (await client.get("/jobs/doomed")).status_code == 404
    assert (await client.delete("/jobs/doomed")).status_code == 404
    assert ids(await client.get("/jobs")) == ["kept"]


# ---------------------------------------------------------------------------- runs


async def test_runs_are_listed_newest_first_and_filtered_by_status(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
) -> None:
    await add_job(app, session, "x")
    await add_job(app, session, "y")
    sent = await client.post("/jobs/x/run-now")
    clock.advance(seconds=10)
    broker.fail_sends = True
    failed = await client.post("/jobs/x/run-now")
    broker.fail_sends = False
    clock.advance(seconds=10)
    other = await client.post("/jobs/y/run-now")
    assert sent.json()["status"] == "dispatched"
    assert failed.json()["status"] == "failed"
    assert "broker unreachable" in failed.json()["error"]
    assert failed.json()["next_attempt_at"] is not None
    run_ids = {"x-sent": sent.json()["id"], "x-failed": failed.json()["id"]}
    run_ids["y-sent"] = other.json()["id"]

    assert ids(await client.get("/jobs/x/runs")) == [run_ids["x-failed"], run_ids["x-sent"]]
    assert ids(await client.get("/jobs/x/runs", params={"status": "failed"})) == [
        run_ids["x-failed"]
    ]
    assert ids(await client.get("/jobs/x/runs", params={"status": "dispatched"})) == [
        run_ids["x-sent"]
    ]
    assert ids(await client.get("/jobs/x/runs", params={"status": "claimed"})) == []
    assert ids(await client.get("/jobs/x/runs", params={"limit": 1})) == [run_ids["x-failed"]]

    all_runs = await client.get("/runs")
    assert ids(all_runs) == [run_ids["y-sent"], run_ids["x-failed"], run_ids["x-sent"]]
    for item in all_runs.json():
        assert set(item) == set(RunOut.model_fields)
    assert ids(await client.get("/runs", params={"status": "failed"})) == [run_ids["x-failed"]]
    assert ids(await client.get("/runs", params={"status": "dispatched", "limit": 1})) == [
        run_ids["y-sent"]
    ]
    assert ids(await client.get("/runs", params={"job_id": "y"})) == [run_ids["y-sent"]]

    missing = await client.get("/jobs/nobody/runs")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["detail"]

    # A time range (scheduled_for: sent at t, failed at t+10, other at t+20) and paging.
    start = clock.now() - timedelta(seconds=20)
    window = {"since": (start + timedelta(seconds=5)).isoformat(), "until": clock.now().isoformat()}
    assert ids(await client.get("/runs", params=window)) == [run_ids["x-failed"]]
    assert ids(await client.get("/jobs/x/runs", params={"offset": 1})) == [run_ids["x-sent"]]
    naive = await client.get("/runs", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422
    assert "since" in naive.json()["detail"]


async def test_health_answers_503_when_the_schedule_is_behind(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    healthy = await client.get("/health")
    assert healthy.status_code == 200
    assert healthy.json()["behind"] is False
    await app.single(task="tests.record").schedule(
        session, trigger=OneOffSchedule(run_at=clock.now() - timedelta(minutes=5))
    )
    behind = await client.get("/health")
    assert behind.status_code == 503
    assert (behind.json()["behind"], behind.json()["overdue_jobs"]) == (True, 1)


# ---------------------------------------------------------------------------- errors


async def test_unknown_job_id_is_404_with_the_id_in_the_detail(
    client: httpx.AsyncClient,
) -> None:
    for method, suffix in [
        ("GET", ""),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("POST", "/run-now"),
        ("DELETE", ""),
        ("GET", "/runs"),
    ]:
        response = await client.request(method, f"/jobs/no-such-job{suffix}")
        assert response.status_code == 404, (method, suffix, response.text)
        assert response.json() == {"detail": "scheduler job not found: job_id='no-such-job'"}


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/jobs?limit=0", "limit"),
        ("/jobs?limit=1001", "limit"),
        ("/jobs?limit=ten", "limit"),
        ("/jobs?offset=-1", "offset"),
        ("/jobs?is_enabled=maybe", "is_enabled"),
        ("/runs?status=bogus", "status"),
        ("/runs?limit=0", "limit"),
        ("/jobs/some-job/runs?status=bogus", "status"),
        ("/jobs/some-job/runs?limit=5000", "limit"),
    ],
)
async def test_bad_query_values_are_422_naming_the_parameter(
    client: httpx.AsyncClient, url: str, field: str
) -> None:
    response = await client.get(url)

    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["query", field] in locations


async def test_limit_bounds_are_accepted(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession
) -> None:
    await add_job(app, session, "only")
    assert ids(await client.get("/jobs", params={"limit": 1})) == ["only"]
    assert ids(await client.get("/jobs", params={"limit": 1000})) == ["only"]
    assert ids(await client.get("/runs", params={"limit": 1000})) == []


# ---------------------------------------------------------------------------- job ids


ODD_IDS = [
    "with space",
    'double"quote',
    "single'quote",
    "ünïcødé 日本語 🚀",
    "100%",
    "%41 not a letter",
    "what?no#fragment",
    "a+b&c=d",
    "semi;colon,comma",
    "back\\slash",
]


async def test_ids_with_spaces_quotes_and_unicode_round_trip(
    client: httpx.AsyncClient,
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
    broker: RecordingBroker,
) -> None:
    for job_id in ODD_IDS:
        await add_job(app, session, job_id)
    assert sorted(ids(await client.get("/jobs"))) == sorted(ODD_IDS)

    for job_id in ODD_IDS:
        path = path_of(job_id)
        got = await client.get(path)
        assert got.status_code == 200, (job_id, got.text)
        assert got.json()["id"] == job_id

        assert (await client.post(f"{path}/pause")).json()["is_enabled"] is False
        row = await stored_job(session_factory, job_id)
        assert row is not None
        assert row.is_enabled is False
        assert (await client.post(f"{path}/resume")).json()["is_enabled"] is True

        run = await client.post(f"{path}/run-now")
        assert run.status_code == 200, (job_id, run.text)
        assert run.json()["job_id"] == job_id
        assert len(broker.sent_for(job_id)) == 1
        assert ids(await client.get(f"{path}/runs")) == [run.json()["id"]]
        assert ids(await client.get("/runs", params={"job_id": job_id})) == [run.json()["id"]]

        assert (await client.delete(path)).status_code == 204
        assert await stored_job(session_factory, job_id) is None
        missing = await client.get(path)
        assert missing.status_code == 404
        assert missing.json()["detail"] == f"scheduler job not found: job_id={job_id!r}"


async def test_ids_with_a_slash_are_not_addressable_but_their_runs_are_listed(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession
) -> None:
    """Documented limitation: the server decodes %2F before routing."""
    await add_job(app, session, "tenant/1")

    response = await client.get(path_of("tenant/1"))
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}  # no route, not a job lookup

    run = await app.run_now(session, "tenant/1")
    assert ids(await client.get("/runs", params={"job_id": "tenant/1"})) == [run.id]


# ---------------------------------------------------------------------------- router options


async def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
    if x_api_key is None:
        raise HTTPException(status_code=401, detail="missing X-API-Key header")
    if not secrets.compare_digest(x_api_key, "s3cret"):
        raise HTTPException(status_code=403, detail="wrong API key")


async def test_router_dependencies_guard_every_route(
    app: SchedulerApp,
    session: AsyncSession,
    session_factory: async_sessionmaker[AsyncSession],
    broker: RecordingBroker,
) -> None:
    await add_job(app, session, "guarded")
    api = FastAPI()
    api.include_router(
        create_scheduler_router(
            app, prefix="/scheduler", tags=["ops"], dependencies=[Depends(require_api_key)]
        )
    )
    requests = [
        ("GET", "/scheduler/jobs"),
        ("GET", "/scheduler/jobs/guarded"),
        ("POST", "/scheduler/jobs/guarded/pause"),
        ("POST", "/scheduler/jobs/guarded/run-now"),
        ("GET", "/scheduler/jobs/guarded/runs"),
        ("GET", "/scheduler/runs"),
        ("GET", "/scheduler/health"),
        ("DELETE", "/scheduler/jobs/guarded"),
    ]
    async with serve(api) as base_url, local_client(base_url) as client:
        for method, url in requests:
            anonymous = await client.request(method, url)
            assert anonymous.status_code == 401, (method, url)
            assert anonymous.json() == {"detail": "missing X-API-Key header"}
            wrong = await client.request(method, url, headers={"X-API-Key": "guess"})
            assert wrong.status_code == 403, (method, url)
        row = await stored_job(session_factory, "guarded")
        assert row is not None
        assert row.is_enabled is True  # nothing was paused, sent or deleted
        assert broker.sent == []

        key = {"X-API-Key": "s3cret"}
        assert ids(await client.get("/scheduler/jobs", headers=key)) == ["guarded"]
        paused = await client.post("/scheduler/jobs/guarded/pause", headers=key)
        assert paused.json()["is_enabled"] is False
        assert (await client.delete("/scheduler/jobs/guarded", headers=key)).status_code == 204
        assert (await client.get("/jobs", headers=key)).status_code == 404  # prefix applies

        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/scheduler/jobs/{job_id}/pause"]["post"]
    assert operation["tags"] == ["ops"]
    assert {p["name"] for p in operation["parameters"]} == {"job_id", "x-api-key"}


async def test_openapi_schema_describes_jobs_and_runs(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession
) -> None:
    job = await add_job(app, session, "schema")
    run = await app.run_now(session, "schema")

    schema = (await client.get("/openapi.json")).json()

    assert set(schema["paths"]) == {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/pause",
        "/jobs/{job_id}/resume",
        "/jobs/{job_id}/run-now",
        "/jobs/{job_id}/backfill",
        "/jobs/{job_id}/runs",
        "/runs",
        "/health",
    }
    components = schema["components"]["schemas"]
    assert set(components["JobOut"]["properties"]) == set(job.to_dict())
    assert set(components["RunOut"]["properties"]) == set(run.to_dict())
    assert set(JobOut.model_fields) == set(job.to_dict())
    assert set(RunOut.model_fields) == set(run.to_dict())
    assert components["JobOut"]["properties"]["created_at"]["format"] == "date-time"
    assert set(components["RunStatus"]["enum"]) == {status.value for status in RunStatus}
    get_job = schema["paths"]["/jobs/{job_id}"]["get"]["responses"]
    assert get_job["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"
    }
    delete = schema["paths"]["/jobs/{job_id}"]["delete"]["responses"]
    assert "204" in delete


def test_import_without_fastapi_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` fail
    monkeypatch.delitem(sys.modules, "taskiq_beat.contrib.fastapi")

    with pytest.raises(ImportError, match=re.escape('pip install "taskiq-beat[fastapi]"')):
        importlib.import_module("taskiq_beat.contrib.fastapi")


# ---------------------------------------------------------------------------- example app


class UvicornProcess:
    """``python -m uvicorn APP --port 0`` in a subprocess; finds its port in the log."""

    RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            match = self.RUNNING.search(line)
            if match and not self.port.done():
                self.port.set_result(int(match.group(1)))
        if not self.port.done():
            self.port.set_exception(RuntimeError("uvicorn exited:\n" + self.text))

    @property
    def text(self) -> str:
        return "\n".join(self.log)

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.process.wait(), SHUTDOWN_TIMEOUT)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self.reader
        if not self.port.done():
            self.port.cancel()
        returncode = self.process.returncode
        assert returncode is not None
        return returncode


async def test_example_app_runs_under_uvicorn(tmp_path: Path) -> None:
    database = tmp_path / "example.sqlite3"
    env = {**os.environ, "TASKIQ_BEAT_DATABASE_URL": f"sqlite+aiosqlite:///{database}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi_app.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    server = UvicornProcess(process)
    try:
        port = await asyncio.wait_for(asyncio.shield(server.port), STARTUP_TIMEOUT)
        async with local_client(f"http://127.0.0.1:{port}") as client:
            created = await client.post(
                "/reports",
                json={
                    "report": "sales",
                    "recipient": "ops@example.com",
                    "cron": "30 7 * * mon-fri",
                    "timezone": "Europe/Berlin",
                    "job_id": "sales weekday",
                },
            )
            assert created.status_code == 201, created.text
            assert created.json()["strategy"] == "crontab"

            listed = await client.get("/scheduler/jobs")
            assert ids(listed) == ["example.purge_old_reports", "sales weekday"]
            assert (await client.get(f"/scheduler{path_of('sales weekday')}")).status_code == 200

            now = await client.post("/reports/now", json={"report": "sales", "recipient": "me"})
            assert now.status_code == 201, now.text
            # The in-memory broker runs the task in the app: its outcome reaches the run.
            runs_path = f"/scheduler/jobs/{now.json()['id']}/runs"
            for _ in range(100):
                runs = (await client.get(runs_path)).json()
                if runs[0]["status"] == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert [run["status"] for run in runs] == ["succeeded"]
            assert runs[0]["duration_seconds"] >= 0
            assert runs[0]["worker_id"]

            both = {"report": "r", "recipient": "me", "every_seconds": 5, "cron": "* * * * *"}
            assert (await client.post("/reports", json=both)).status_code == 422
            bad_cron = {"report": "r", "recipient": "me", "cron": "99 * * * *"}
            refused = await client.post("/reports", json=bad_cron)
            assert refused.status_code == 422
            assert "minute" in refused.json()["detail"]
    finally:
        returncode = await server.stop()
    assert returncode == 0, server.text
    assert "Application shutdown complete" in server.text
    assert database.exists()


async def test_backfill_queues_a_range_once_and_refuses_bad_input(
    client: httpx.AsyncClient, app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    await add_job(app, session, "minutely")
    now = clock.now()
    body = {
        "start": (now - timedelta(minutes=3)).isoformat(),
        "end": (now - timedelta(minutes=1)).isoformat(),
    }
    response = await client.post("/jobs/minutely/backfill", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": "minutely", "queued": 3}
    again = await client.post("/jobs/minutely/backfill", json=body)
    assert again.json() == {"job_id": "minutely", "queued": 0}

    future = await client.post(
        "/jobs/minutely/backfill",
        json={**body, "end": (now + timedelta(minutes=1)).isoformat()},
    )
    assert future.status_code == 422
    assert "end=" in future.json()["detail"]
    missing = await client.post("/jobs/nope/backfill", json=body)
    assert missing.status_code == 404
    assert (await client.get("/jobs/minutely/backfill")).status_code == 405  # never by GET
    runs = await client.get("/runs", params={"job_id": "minutely"})
    assert len(runs.json()) == 3
