"""The dashboard without a browser: the store's keyset-paged job listing and worker listing
(SQLite and PostgreSQL), the trigger in words, and the HTTP rules (CSRF, logins, read-only,
POST-only actions, mounting) over the ASGI interface."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from taskiq_beat import (
    CrontabTrigger,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerJob,
)
from taskiq_beat.dashboard import create_dashboard, describe_trigger
from taskiq_beat.exceptions import InvalidJobError
from taskiq_beat.models import SchedulerRun, SchedulerWorker
from tests.utils import FakeClock, RecordingBroker

EVERY_MINUTE = PeriodicSchedule(interval=IntervalTrigger(minutes=1))
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)


async def _jobs(app: SchedulerApp, count: int) -> list[str]:
    """``count`` jobs with repeated and empty next runs, names and two tasks."""
    async with app.session_factory() as session:
        await app.upsert_many(
            session,
            [
                app.single("tests.record" if n % 3 else "tests.fail").definition(
                    trigger=EVERY_MINUTE,
                    job_id=f"job-{n:03}",
                    name=None if n % 4 == 0 else f"name {n % 5}",
                    is_enabled=n % 5 != 0,
                )
                for n in range(count)
            ],
        )
        # Ties and empty values in the sort columns (a one-off job that fired has none).
        for n in range(count):
            next_run = None if n % 6 == 0 else T0 + timedelta(minutes=n % 4)
            last_run = None if n % 2 else T0 - timedelta(minutes=n % 3)
            await session.execute(
                sa.update(SchedulerJob)
                .where(SchedulerJob.id == f"job-{n:03}")
                .values(next_run_at=next_run, last_run_at=last_run)
            )
        await session.commit()
    return [f"job-{n:03}" for n in range(count)]


def _expected(jobs: list[SchedulerJob], sort: str, descending: bool) -> list[str]:
    """The display order: by ``sort`` (empty values last), ties by id, both one way."""
    present = [job for job in jobs if getattr(job, sort) is not None]
    empty = [job for job in jobs if getattr(job, sort) is None]
    present.sort(key=lambda job: (getattr(job, sort), job.id), reverse=descending)
    empty.sort(key=lambda job: job.id, reverse=descending)
    return [job.id for job in present + empty]


@pytest.mark.parametrize("sort", ["id", "name", "task_name", "next_run_at", "last_run_at"])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
async def test_page_jobs_walks_every_job_once_forwards_and_backwards(
    app: SchedulerApp, sort: str, descending: bool
) -> None:
    await _jobs(app, 23)
    async with app.session_factory() as session:
        everything = await app.list_jobs(session)
        expected = _expected(everything, sort, descending)
        pages: list[list[str]] = []
        cursor = None
        while True:
            rows = await app.page_jobs(
                session, sort=sort, descending=descending, after=cursor, limit=5
            )
            if not rows:
                break
            pages.append([row.id for row in rows])
            cursor = (getattr(rows[-1], sort), rows[-1].id)
        assert [job for page in pages for job in page] == expected
        # Back from the last page, each page is the one before, in display order.
        last = pages[-1][0]
        first_of_last = next(job for job in everything if job.id == last)
        cursor = (getattr(first_of_last, sort), last)
        for page in reversed(pages[:-1]):
            rows = await app.page_jobs(
                session, sort=sort, descending=descending, before=cursor, limit=5
            )
            assert [row.id for row in rows] == page
            cursor = (getattr(rows[0], sort), rows[0].id)


async def test_page_jobs_filters_and_searches(app: SchedulerApp) -> None:
    ids = await _jobs(app, 23)
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(
            session, trigger=EVERY_MINUTE, job_id="odd_%id", name="Weekly REPORT"
        )
        paused = await app.page_jobs(session, is_enabled=False, limit=100)
        assert [row.id for row in paused] == [i for n, i in enumerate(ids) if n % 5 == 0]
        failing = await app.page_jobs(session, task_name="tests.fail", limit=100)
        assert {row.id for row in failing} == {i for n, i in enumerate(ids) if n % 3 == 0}
        # Case-insensitive, anywhere in id or name; % and _ are plain characters.
        assert [row.id for row in await app.page_jobs(session, search="report")] == ["odd_%id"]
        assert [row.id for row in await app.page_jobs(session, search="_%")] == ["odd_%id"]
        named = await app.page_jobs(session, search="NAME 3", limit=100)
        assert [row.id for row in named] == [
            i for n, i in enumerate(ids) if n % 5 == 3 and n % 4 != 0
        ]
        assert await app.page_jobs(session, search="nothing like it") == []
        with pytest.raises(InvalidJobError, match="sort"):
            await app.page_jobs(session, sort="kwargs")
        with pytest.raises(InvalidJobError, match="limit"):
            await app.page_jobs(session, limit=0)
        assert await app.task_names(session) == ["tests.fail", "tests.record"]


async def test_page_jobs_carries_the_counters(app: SchedulerApp) -> None:
    await _jobs(app, 3)
    async with app.session_factory() as session:
        await session.execute(
            sa.text(
                "INSERT INTO scheduler_job_stats (job_id, run_count, success_count, "
                "failure_count, last_success_at, last_failure_at, last_duration_seconds) "
                "VALUES ('job-001', 4, 3, 1, :ok, :bad, 0.25)"
            ),
            {"ok": T0, "bad": T0 + timedelta(seconds=1)},
        )
        await session.commit()
        rows = {row.id: row for row in await app.page_jobs(session)}
    assert (rows["job-001"].run_count, rows["job-001"].success_rate) == (4, 0.75)
    assert rows["job-001"].last_outcome == "failed"
    assert rows["job-001"].last_duration_seconds == 0.25
    assert (rows["job-000"].run_count, rows["job-000"].success_rate) == (0, None)
    assert rows["job-000"].last_outcome is None


async def test_list_workers_counts_running_runs(app: SchedulerApp, clock: FakeClock) -> None:
    await _jobs(app, 2)
    now = clock.now()
    async with app.session_factory() as session:
        session.add_all(
            [
                SchedulerWorker(
                    id="w-alive", hostname="h", pid=1, started_at=now, last_seen_at=now
                ),
                SchedulerWorker(
                    id="w-stopped",
                    hostname="h",
                    pid=2,
                    started_at=now,
                    last_seen_at=now,
                    stopped_at=now,
                ),
            ]
        )
        await session.flush()
        for n, status in enumerate([RunStatus.RUNNING, RunStatus.RUNNING, RunStatus.SUCCEEDED]):
            session.add(
                SchedulerRun(
                    job_id="job-000",
                    scheduled_for=now - timedelta(minutes=n),
                    status=status,
                    task_id=f"t{n}",
                    attempt=1,
                    created_at=now,
                    updated_at=now,
                    worker_id="w-alive",
                )
            )
        await session.commit()
        workers = await app.list_workers(session)
    assert [(w.id, w.running, w.stopped_at is None) for w in workers] == [
        ("w-alive", 2, True),
        ("w-stopped", 0, False),
    ]


@pytest.mark.parametrize(
    ("trigger", "words"),
    [
        pytest.param(
            PeriodicSchedule(
                crontab=CrontabTrigger(
                    minute="0", hour="9", day_of_week="mon-fri", timezone="Europe/Berlin"
                )
            ),
            "every weekday at 09:00 Europe/Berlin",
            id="weekdays",
        ),
        pytest.param(
            PeriodicSchedule(crontab=CrontabTrigger(minute="30", hour="7,19")),
            "every day at 07:00 and 19:30 UTC".replace("07:00", "07:30"),
            id="two-times",
        ),
        pytest.param(
            PeriodicSchedule(crontab=CrontabTrigger(minute="*/15", timezone="UTC")),
            "every 15 minutes",
            id="step",
        ),
        pytest.param(
            PeriodicSchedule(crontab=CrontabTrigger(minute="0", hour="6", day_of_month="L")),
            "on the last day of the month at 06:00 UTC",
            id="last-day",
        ),
        pytest.param(
            PeriodicSchedule(crontab=CrontabTrigger(minute="5", day_of_week="sun")),
            "every Sunday, every hour at minute 5 UTC",
            id="hourly-sunday",
        ),
        pytest.param(
            PeriodicSchedule(crontab=CrontabTrigger(minute="1-5", hour="*/2")),
            "cron 0 1-5 */2 * * * (UTC)",
            id="raw",
        ),
        pytest.param(
            PeriodicSchedule(interval=IntervalTrigger(hours=1, minutes=30)),
            "every 1 hour 30 minutes",
            id="interval",
        ),
        pytest.param(PeriodicSchedule(interval=IntervalTrigger(days=1)), "every day", id="day"),
        pytest.param(OneOffSchedule(run_at=T0), "once, at 2026-03-02 08:00:00 UTC", id="one-off"),
    ],
)
def test_trigger_in_words(trigger: Any, words: str) -> None:
    assert describe_trigger(trigger) == words


# ------------------------------------------------------------------------------- over HTTP

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
async def client(app: SchedulerApp) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(create_dashboard(app)) as client:
        yield client


def _client(asgi: Any, base: str = "http://dashboard") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=base)


async def _token(client: httpx.AsyncClient, path: str = "/job?id=j") -> str:
    page = await client.get(path)
    match = CSRF.search(page.text)
    assert match is not None, page.text
    return match.group(1)


async def _enabled(app: SchedulerApp, job_id: str) -> bool:
    async with app.session_factory() as session:
        return (await app.get_job(session, job_id)).is_enabled


async def test_pages_render_with_their_data(app: SchedulerApp, client: httpx.AsyncClient) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(
            session,
            trigger=PeriodicSchedule(
                crontab=CrontabTrigger(
                    minute="0", hour="9", day_of_week="mon-fri", timezone="Europe/Berlin"
                )
            ),
            job_id="reports/daily",
            name="Daily <report>",
        )
    jobs = await client.get("/jobs")
    assert jobs.status_code == 200
    assert "reports/daily" in jobs.text
    assert "Daily &lt;report&gt;" in jobs.text
    job = await client.get("/job", params={"id": "reports/daily"})
    assert "every weekday at 09:00 Europe/Berlin" in job.text
    assert job.text.count("<li><time") == 10  # the next ten fires
    for path in ("/runs", "/workers", "/health", "/runs?status=failed&window=24h"):
        response = await client.get(path)
        assert response.status_code == 200, path
    assert "No runs yet" in (await client.get("/runs")).text
    assert "No worker has reported yet" in (await client.get("/workers")).text
    assert "No job matches" in (await client.get("/jobs?q=zzz")).text
    missing = await client.get("/job", params={"id": "nope"})
    assert missing.status_code == 404
    assert "There is no job" in missing.text
    fragment = await client.get("/jobs", params={"partial": "1"})
    assert "<html" not in fragment.text
    assert "reports/daily" in fragment.text
    static = await client.get("/static/dashboard.js")
    assert static.status_code == 200
    assert "data-live" in static.text


async def test_actions_need_post_and_the_csrf_token(
    app: SchedulerApp, client: httpx.AsyncClient
) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
    token = await _token(client)
    assert (await client.get("/job/pause", params={"id": "j"})).status_code == 405
    no_token = await client.post("/job/pause", data={"id": "j"})
    assert no_token.status_code == 403
    assert "CSRF" in no_token.text
    wrong = await client.post("/job/pause", data={"id": "j", "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    assert await _enabled(app, "j")
    # A page of another site can post the form, but without the cookie the token is useless.
    async with _client(create_dashboard(app)) as stranger:
        forged = await stranger.post("/job/pause", data={"id": "j", "csrf_token": token})
    assert forged.status_code == 403
    # Nor does a cookie planted by someone else (a sibling subdomain can) with its own value
    # as the token: the token is a keyed hash of the cookie.
    planted = "p" * 43
    async with _client(create_dashboard(app)) as stranger:
        stranger.cookies.set("taskiq_beat_csrf", planted)
        tossed = await stranger.post("/job/pause", data={"id": "j", "csrf_token": planted})
    assert tossed.status_code == 403
    assert await _enabled(app, "j")

    paused = await client.post("/job/pause", data={"id": "j", "csrf_token": token})
    assert paused.status_code == 303
    assert paused.headers["location"] == "/job?id=j&done=paused"
    assert not await _enabled(app, "j")
    resumed = await client.post("/job/resume", data={"id": "j", "csrf_token": token})
    assert resumed.status_code == 303
    assert await _enabled(app, "j")
    sent = await client.post("/job/run-now", data={"id": "j", "csrf_token": token})
    assert sent.status_code == 303
    async with app.session_factory() as session:
        assert len(await app.list_runs(session, "j")) == 1
    unknown = await client.post("/job/pause", data={"id": "nope", "csrf_token": token})
    assert unknown.status_code == 404
    confirm = await client.get("/job/delete", params={"id": "j"})
    assert "Delete job j?" in confirm.text
    deleted = await client.post("/job/delete", data={"id": "j", "csrf_token": token})
    assert deleted.status_code == 303
    assert deleted.headers["location"].startswith("/jobs?")
    async with app.session_factory() as session:
        assert await app.list_jobs(session) == []


async def test_read_only_shows_no_action_and_refuses_them(app: SchedulerApp) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
    async with _client(create_dashboard(app, read_only=True)) as client:
        page = await client.get("/job", params={"id": "j"})
        assert "read-only" in page.text
        assert "/job/pause" not in page.text
        token = CSRF.findall(page.text)
        refused = await client.post(
            "/job/pause", data={"id": "j", "csrf_token": token[0] if token else ""}
        )
        assert refused.status_code == 403
        assert "read-only" in refused.text
        assert (await client.get("/job/delete", params={"id": "j"})).status_code == 403
    assert await _enabled(app, "j")


async def test_token_login(app: SchedulerApp) -> None:
    async with _client(create_dashboard(app, token="s3cret")) as client:
        refused = await client.get("/jobs")
        assert refused.status_code == 401
        assert "Access token" in refused.text
        token = CSRF.search(refused.text)
        assert token is not None
        wrong = await client.post(
            "/login", data={"token": "guess", "csrf_token": token.group(1), "next": "/runs"}
        )
        assert wrong.status_code == 401
        assert "not right" in wrong.text
        assert (await client.get("/jobs")).status_code == 401
        right = await client.post(
            "/login", data={"token": "s3cret", "csrf_token": token.group(1), "next": "/runs"}
        )
        assert right.status_code == 303
        assert right.headers["location"] == "/runs"
        assert "s3cret" not in right.headers["set-cookie"]
        assert (await client.get("/jobs")).status_code == 200
        # Only a path of the dashboard is a place to go after the login.
        away = await client.post(
            "/login",
            data={"token": "s3cret", "csrf_token": token.group(1), "next": "//evil.test/x"},
        )
        assert away.headers["location"] == "/evil.test/x"  # a path here (404), not a site
    async with _client(create_dashboard(app, token="s3cret")) as client:
        bearer = await client.get("/jobs", headers={"Authorization": "Bearer s3cret"})
        assert bearer.status_code == 200
        assert (
            await client.get("/jobs", headers={"Authorization": "Bearer no"})
        ).status_code == 401


async def test_basic_auth_and_a_host_dependency(app: SchedulerApp) -> None:
    async with _client(create_dashboard(app, basic_auth=("admin", "pw"))) as client:
        refused = await client.get("/jobs")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        assert (await client.get("/jobs", auth=("admin", "nope"))).status_code == 401
        assert (await client.get("/jobs", auth=("admin", "pw"))).status_code == 200

    async def only_admins() -> None:
        raise HTTPException(status_code=403, detail="Admins only.")

    async with _client(create_dashboard(app, dependencies=[Depends(only_admins)])) as client:
        refused = await client.get("/jobs")
        assert refused.status_code == 403
        assert "Admins only." in refused.text
        assert (await client.post("/job/pause", data={"id": "j"})).status_code == 403


async def test_mounted_under_a_prefix(app: SchedulerApp) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
    host = FastAPI()
    host.mount("/admin/scheduler", create_dashboard(app))
    async with _client(host) as client:
        listing = await client.get("/admin/scheduler/jobs")
        assert 'href="/admin/scheduler/job?id=j"' in listing.text
        assert "Path=/admin/scheduler/" in listing.headers["set-cookie"]
        page = await client.get("/admin/scheduler/job", params={"id": "j"})
        assert page.status_code == 200
        assert 'href="/admin/scheduler/jobs"' in page.text
        assert 'href="/admin/scheduler/static/dashboard.css"' in page.text
        token = CSRF.search(page.text)
        assert token is not None
        paused = await client.post(
            "/admin/scheduler/job/pause", data={"id": "j", "csrf_token": token.group(1)}
        )
        assert paused.headers["location"] == "/admin/scheduler/job?id=j&done=paused"
        assert (await client.get("/admin/scheduler/static/dashboard.css")).status_code == 200
    assert not await _enabled(app, "j")


async def test_an_unreachable_database_gets_a_designed_page(
    tmp_path: Any, broker: RecordingBroker
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'db.sqlite3'}")
    app = SchedulerApp(broker=broker, session_factory=async_sessionmaker(engine))
    try:
        async with _client(create_dashboard(app)) as client:
            page = await client.get("/jobs")
            assert page.status_code == 503
            assert "did not answer" in page.text
            fragment = await client.get("/jobs", params={"partial": "1"})
            assert fragment.status_code == 503
            assert "<html" not in fragment.text
    finally:
        await engine.dispose()


async def test_a_damaged_page_link_is_a_clear_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs", params={"after": "not-a-cursor", "sort": "next_run_at"})
    assert response.status_code == 400
    assert "damaged" in response.text


async def test_run_now_is_refused_without_a_broker_to_send_through(app: SchedulerApp) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
    async with _client(create_dashboard(app, can_run_now=False)) as client:
        page = await client.get("/job", params={"id": "j"})
        assert "/job/run-now" not in page.text
        assert "/job/pause" in page.text
        token = await _token(client)
        refused = await client.post("/job/run-now", data={"id": "j", "csrf_token": token})
        assert refused.status_code == 403
    async with app.session_factory() as session:
        assert await app.list_runs(session, "j") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--host", "0.0.0.0"], "reachable from other machines", id="open"),
        pytest.param(["--basic-auth", "admin"], "USER:PASSWORD", id="basic-auth"),
        pytest.param(["--port", "0"], "--port", id="port"),
        pytest.param(["--poll", "-1"], "--poll", id="poll"),
    ],
)
def test_dashboard_command_refuses_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from taskiq_beat.cli import EXIT_USAGE, main

    database = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    assert main(["dashboard", "--db", database, *args]) == EXIT_USAGE
    assert message in capsys.readouterr().err


async def test_runs_page_filters_by_status_job_and_time(
    app: SchedulerApp, clock: FakeClock
) -> None:
    async with app.session_factory() as session:
        for job_id in ("a", "b"):
            await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id=job_id)
        early = clock.now()
        await app.run_now(session, "a")
        clock.advance(hours=2)
        await app.run_now(session, "a")
        await app.run_now(session, "b")
        await session.execute(
            sa.update(SchedulerRun)
            .where(SchedulerRun.job_id == "b")
            .values(status=RunStatus.FAILED, error="boom (test)")
        )
        await session.commit()
    dashboard = create_dashboard(app, clock=clock)
    async with _client(dashboard) as client:

        async def shown(**query: str) -> list[str]:
            page = await client.get("/runs", params=query)
            assert page.status_code == 200
            return re.findall(
                r'<tr data-run-id="\d+">\s*<td data-label="Job"><a [^>]+>([^<]+)<', page.text
            )

        assert await shown() == ["b", "a", "a"]
        assert await shown(status="failed") == ["b"]
        assert "boom (test)" in (await client.get("/runs", params={"status": "failed"})).text
        assert await shown(job="a") == ["a", "a"]
        assert await shown(window="1h") == ["b", "a"]
        since = (early + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
        assert await shown(since=since) == ["b", "a"]
        assert await shown(until=since) == ["a"]
        assert "No run matches" in (await client.get("/runs", params={"status": "lost"})).text
        bad = await client.get("/runs", params={"since": "yesterday"})
        assert bad.status_code == 400
        assert "since" in bad.text


async def test_a_job_whose_trigger_cannot_be_read_still_has_its_page(
    app: SchedulerApp, client: httpx.AsyncClient
) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(session, trigger=EVERY_MINUTE, job_id="j")
        await session.execute(
            sa.update(SchedulerJob).where(SchedulerJob.id == "j").values(trigger={"version": 99})
        )
        await session.commit()
    page = await client.get("/job", params={"id": "j"})
    assert page.status_code == 200
    assert "The stored trigger cannot be read" in page.text
    assert "unknown trigger format version 99" in page.text
    assert "j" in (await client.get("/jobs")).text


async def test_backfill_queues_the_fires_of_a_past_range_once(
    app: SchedulerApp, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    async with app.session_factory() as session:
        await app.single("tests.record").upsert(
            session,
            trigger=PeriodicSchedule(interval=IntervalTrigger(minutes=10), start_at=T0),
            job_id="j",
        )
    clock.set(T0 + timedelta(days=1))
    token = await _token(client)
    form = {"id": "j", "csrf_token": token, "start": "2026-03-02T08:00", "end": "2026-03-02T09:00"}
    done = await client.post("/job/backfill", data=form)
    assert done.status_code == 303
    assert done.headers["location"] == "/job?id=j&done=backfilled&count=7"
    page = await client.get(done.headers["location"])
    assert "Backfill queued 7 fires" in page.text
    again = await client.post("/job/backfill", data=form)
    assert again.headers["location"].endswith("count=0")
    async with app.session_factory() as session:
        assert len(await app.list_runs(session, "j")) == 7
    future = {**form, "end": "2026-03-09T09:00"}
    refused = await client.post("/job/backfill", data=future)
    assert refused.status_code == 422
    assert "must not be later than now" in refused.text
    missing = await client.post("/job/backfill", data={"id": "j", "csrf_token": token})
    assert missing.status_code == 422
    no_token = await client.post("/job/backfill", data={**form, "csrf_token": ""})
    assert no_token.status_code == 403
