"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
served by the real ``taskiq-beat dashboard`` command, with a real ``taskiq worker`` on a
Redis stream executing what it sends.

Screenshots of every page go to ``artifacts/dashboard/`` (git-ignored). Outside CI the tests
skip when Chromium, Playwright or Redis is missing; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from taskiq_beat import (
    CrontabTrigger,
    IntervalTrigger,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.models import sqlite_datetime
from tests.e2e.lifecycle import app as worker_app
from tests.e2e.test_lifecycle_workers import deployment
from tests.processes import PYTHON, ManagedProcess, free_port, redis_url_or_skip
from tests.utils import IN_CI

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "dashboard"
CHROMIUM = os.environ.get("TASKIQ_BEAT_CHROMIUM", "/usr/bin/chromium")
TOKEN = "e2e-token-7f3a"
LIVE_TIMEOUT_MS = 30_000
PAGE_BUDGET_SECONDS = 1.0
BIG = 100_000
TRIES = 3


def _browser_or_skip() -> Any:
    """Playwright's async API, once Chromium and Playwright are known to be here."""
    reason = None
    try:
        from playwright import async_api
    except ImportError as exc:
        reason = f"the playwright package is missing ({exc})"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"the browser tests must run under CI: {reason}")
        pytest.skip(reason)
    return async_api


@contextlib.asynccontextmanager
async def chromium(**context_options: Any) -> AsyncIterator[Any]:
    """A browser context of a headless Chromium (the Debian binary, never a download)."""
    async_api = _browser_or_skip()
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = await browser.new_context(
                timezone_id="Europe/Berlin",
                viewport={"width": 1280, "height": 900},
                **context_options,
            )
            yield context
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def dashboard_server(
    args: list[str], env: dict[str, str], log_dir: Path
) -> AsyncIterator[str]:
    """``taskiq-beat dashboard`` in a process of its own; yields its base URL."""
    port = free_port()
    process = ManagedProcess(
        [PYTHON, "-m", "taskiq_beat.cli", "dashboard", "--port", str(port), *args],
        name="dashboard",
        cwd=ROOT,
        env=env,
        log_dir=log_dir,
    )
    async with process:
        await process.wait_for_output(r"dashboard on http", 30.0)
        # Listening once uvicorn answers: the line above comes just before it binds.
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    await client.get(f"{base}/static/dashboard.css")
                    break
                except httpx.TransportError:
                    await _pause(0.1)
        yield base


async def _pause(seconds: float) -> None:
    await asyncio.sleep(seconds)  # waiting for a server socket, not for time logic


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _job(app: SchedulerApp, job_id: str) -> SchedulerJob:
    async with app.session_factory() as session:
        return await app.get_job(session, job_id)


async def _runs(app: SchedulerApp, job_id: str) -> list[SchedulerRun]:
    async with app.session_factory() as session:
        return await app.list_runs(session, job_id)


async def test_dashboard_pages_and_actions_with_a_real_worker(tmp_path: Path) -> None:
    _browser_or_skip()
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'dashboard.sqlite3'}"
    redis_url = redis_url_or_skip()
    async with deployment(database_url, tmp_path) as (app, _engine, _redis, _workers, start):
        async with app.session_factory() as session:
            hourly = PeriodicSchedule(interval=IntervalTrigger(hours=1))
            await app.single("lifecycle.ok", kwargs={"n": 1}).upsert(
                session, trigger=hourly, job_id="e2e.ok", name="Works every time"
            )
            await app.single("lifecycle.fail", kwargs={"n": 7}).upsert(
                session, trigger=hourly, job_id="e2e.fail", name="Always fails"
            )
            await app.single("lifecycle.ok", kwargs={"n": 2}).upsert(
                session,
                trigger=PeriodicSchedule(
                    crontab=CrontabTrigger(
                        minute="0", hour="9", day_of_week="mon-fri", timezone="Europe/Berlin"
                    )
                ),
                job_id="e2e.weekday",
                name="Weekday report",
            )
        await start()
        env = {
            worker_app.DATABASE_URL_ENV: database_url,
            worker_app.REDIS_URL_ENV: redis_url,
            worker_app.STREAM_ENV: app.broker.queue_name,  # type: ignore[attr-defined]
        }
        serve = ["--app", "tests.e2e.lifecycle.app:scheduler_app", "--token", TOKEN]
        async with (
            dashboard_server([*serve, "--poll", "0.5"], env, tmp_path) as base,
            chromium() as context,
        ):
            from playwright.async_api import expect

            page = await context.new_page()

            # Auth: nothing without the token; a wrong one is refused; the right one admits.
            refused = await page.goto(f"{base}/jobs")
            assert refused is not None
            assert refused.status == 401
            await expect(page.get_by_label("Access token")).to_be_visible()
            await screenshot(page, "login")
            await page.get_by_label("Access token").fill("not the token")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_text("That token is not right.")).to_be_visible()
            await page.get_by_label("Access token").fill(TOKEN)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
            rows = page.locator("table.data tbody tr")
            await expect(rows).to_have_count(3)
            await screenshot(page, "jobs")

            # A job: its trigger in words, its next ten fires in the viewer's zone.
            await page.get_by_role("link", name="e2e.weekday").click()
            await expect(page.get_by_text("every weekday at 09:00 Europe/Berlin")).to_be_visible()
            await expect(page.locator("ol.fires li")).to_have_count(10)
            first_fire = page.locator("ol.fires li time").first
            await expect(first_fire).to_contain_text("09:00:00")  # Berlin, the viewer's zone
            await expect(first_fire).to_contain_text("08:00:00 UTC")
            await screenshot(page, "job-cron")

            # Pause and resume, through the page's forms.
            await page.goto(f"{base}/job?id=e2e.ok")
            await page.get_by_role("button", name="Pause").click()
            await expect(page.get_by_role("status").first).to_contain_text("Paused")
            assert not (await _job(app, "e2e.ok")).is_enabled
            await page.get_by_role("button", name="Resume").click()
            await expect(page.get_by_role("status").first).to_contain_text("Resumed")
            assert (await _job(app, "e2e.ok")).is_enabled

            # Live: a change made elsewhere reaches an open page without a reload.
            await page.goto(f"{base}/jobs")
            await page.evaluate("window.stillTheSamePage = true")
            async with app.session_factory() as session:
                await app.pause(session, "e2e.fail")
            row = page.locator("tbody tr", has=page.get_by_role("link", name="e2e.fail"))
            await expect(row).to_contain_text("paused", timeout=LIVE_TIMEOUT_MS)
            assert await page.evaluate("window.stillTheSamePage === true")
            async with app.session_factory() as session:
                await app.resume(session, "e2e.fail")
            await expect(row).to_contain_text("enabled", timeout=LIVE_TIMEOUT_MS)

            await page.goto(f"{base}/job?id=e2e.ok")
            # Run now: the run appears, and its outcome arrives from the worker without a
            # reload (the page polls its fragment).
            await page.get_by_role("button", name="Run now").click()
            history = page.locator("#job-runs")
            await expect(history).to_contain_text("succeeded", timeout=LIVE_TIMEOUT_MS)
            [run] = await _runs(app, "e2e.ok")
            assert run.status is RunStatus.SUCCEEDED
            assert run.worker_id is not None
            await expect(history).to_contain_text(run.worker_id)
            await expect(page.locator("svg.chart rect.bar.bar-succeeded")).to_have_count(1)
            await screenshot(page, "job")

            # A failing task: its error on the job's page and on the runs page.
            await page.goto(f"{base}/job?id=e2e.fail")
            await page.get_by_role("button", name="Run now").click()
            failed = page.locator("#job-runs")
            await expect(failed).to_contain_text("bad input 7", timeout=LIVE_TIMEOUT_MS)
            await expect(failed).to_contain_text("failed")
            [run] = await _runs(app, "e2e.fail")
            assert run.status is RunStatus.FAILED
            assert run.error is not None
            assert "bad input 7" in run.error
            await page.goto(f"{base}/runs")
            await page.get_by_label("Status").select_option("failed")
            await page.get_by_role("button", name="Apply").click()
            await expect(page.locator("#runs tbody tr")).to_have_count(1)
            await expect(page.locator("#runs")).to_contain_text("bad input 7")
            await page.goto(f"{base}/runs")
            await expect(page.locator("#runs tbody tr")).to_have_count(2)
            await screenshot(page, "runs")

            await page.goto(f"{base}/workers")
            await expect(page.locator("#workers tbody tr")).to_have_count(1)
            await expect(page.locator("#workers")).to_contain_text("alive")
            await screenshot(page, "workers")
            await page.goto(f"{base}/health")
            await expect(page.get_by_text("runs succeeded")).to_be_visible()
            await screenshot(page, "health")

            # CSRF: a post without the form's token is refused, whatever the cookies.
            forged = await context.request.post(
                f"{base}/job/pause", form={"id": "e2e.ok"}, max_redirects=0
            )
            assert forged.status == 403
            wrong = await context.request.post(
                f"{base}/job/pause",
                form={"id": "e2e.ok", "csrf_token": "x" * 43},
                max_redirects=0,
            )
            assert wrong.status == 403
            assert (await _job(app, "e2e.ok")).is_enabled
            got = await context.request.get(f"{base}/job/pause?id=e2e.ok", max_redirects=0)
            assert got.status == 405  # no action is reachable with GET

            # Delete, after a confirmation page.
            await page.goto(f"{base}/job?id=e2e.weekday")
            await page.get_by_role("link", name="Delete…").click()
            await expect(
                page.get_by_role("heading", name="Delete job e2e.weekday?")
            ).to_be_visible()
            await screenshot(page, "confirm-delete")
            await page.get_by_role("button", name="Delete for good").click()
            await expect(page.get_by_role("status").first).to_contain_text("deleted")
            await expect(page.locator("table.data tbody tr")).to_have_count(2)
            async with app.session_factory() as session:
                assert [job.id for job in await app.list_jobs(session)] == ["e2e.fail", "e2e.ok"]

            # Phone width.
            phone = await context.new_page()
            await phone.set_viewport_size({"width": 390, "height": 844})
            await phone.goto(f"{base}/job?id=e2e.ok")
            await expect(phone.locator("#job-runs")).to_contain_text("succeeded")
            width = await phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, "the page scrolls sideways at phone width"
            await screenshot(phone, "job-phone")
            await phone.goto(f"{base}/jobs")
            await screenshot(phone, "jobs-phone")

        # Auth for a client without the login: refused.
        async with (
            dashboard_server([*serve, "--read-only"], env, tmp_path) as base,
            chromium() as context,
        ):
            outsider = await context.request.get(f"{base}/jobs", max_redirects=0)
            assert outsider.status == 401
            bearer = await context.request.get(
                f"{base}/jobs", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert bearer.status == 200
            page = await context.new_page()
            await page.set_extra_http_headers({"Authorization": f"Bearer {TOKEN}"})
            await page.goto(f"{base}/job?id=e2e.ok")
            await expect(page.get_by_text("read-only")).to_be_visible()
            assert await page.get_by_role("button", name="Pause").count() == 0


_FILL = {
    # One statement each, rows generated by the database: 100k jobs in about a second.
    "postgresql": """
        INSERT INTO scheduler_job (id, name, description, task_name, kind, strategy, trigger,
            args, kwargs, metadata, is_enabled, next_run_at, last_run_at, last_error,
            revision, created_at, updated_at)
        SELECT 'job-' || lpad(n::text, 6, '0'), 'tenant ' || (n % 997) || ' heartbeat', NULL,
            'app.task' || (n % 7), 'single', 'interval', CAST(:trigger AS json),
            CAST('[]' AS json), CAST('{"n": ' || n || '}' AS json), CAST('{}' AS json),
            n % 10 <> 0, CAST(:now AS timestamptz) + make_interval(secs => (n * 7919) % 86400),
            NULL, NULL, 1, CAST(:now AS timestamptz), CAST(:now AS timestamptz)
        FROM generate_series(0, :count - 1) AS n
    """,
    "sqlite": """
        WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < :count - 1)
        INSERT INTO scheduler_job (id, name, description, task_name, kind, strategy, trigger,
            args, kwargs, metadata, is_enabled, next_run_at, last_run_at, last_error,
            revision, created_at, updated_at)
        SELECT printf('job-%06d', n), 'tenant ' || (n % 997) || ' heartbeat', NULL,
            'app.task' || (n % 7), 'single', 'interval', :trigger, '[]',
            '{"n": ' || n || '}', '{}', n % 10 <> 0,
            strftime('%Y-%m-%d %H:%M:%f', :now, '+' || ((n * 7919) % 86400) || ' seconds')
                || '000',
            NULL, NULL, 1, :now, :now
        FROM seq
    """,
}


async def _fill(database_url: str, count: int) -> None:
    """``count`` jobs as the API would store them, written by one statement."""
    engine = create_async_engine(database_url)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    trigger = {"version": 1, "type": "periodic", "interval": {"seconds": 3600.0}}
    try:
        async with engine.begin() as connection:
            await connection.run_sync(SchedulerBase.metadata.drop_all)
            await connection.run_sync(SchedulerBase.metadata.create_all)
            dialect = engine.dialect.name
            stamp = sqlite_datetime(now) if dialect == "sqlite" else now
            await connection.execute(
                sa.text(_FILL[dialect]),
                {"count": count, "now": stamp, "trigger": json.dumps(trigger)},
            )
            if dialect == "postgresql":
                await connection.execute(sa.text("ANALYZE scheduler_job"))
    finally:
        await engine.dispose()
    async with async_sessionmaker(engine)() as session:  # what the dashboard reads back
        [job] = (
            await session.execute(sa.select(SchedulerJob).where(SchedulerJob.id == "job-000001"))
        ).scalars()
        assert job.kwargs == {"n": 1}
        assert job.next_run_at == now + timedelta(seconds=7919)
        assert job.is_enabled
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def big_database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", f"sqlite+aiosqlite:///{tmp_path / 'big.sqlite3'}"
    return "postgresql", str(request.getfixturevalue("postgres_url"))


async def test_100k_jobs_page_in_under_a_second(
    big_database: tuple[str, str], tmp_path: Path
) -> None:
    _browser_or_skip()
    backend, database_url = big_database
    started = time.perf_counter()
    await _fill(database_url, BIG)
    filled = time.perf_counter() - started
    timings: dict[str, float] = {}
    queries: dict[str, float] = {}
    async with (
        dashboard_server(["--db", database_url, "--poll", "0"], {}, tmp_path) as base,
        chromium() as context,
    ):
        from playwright.async_api import expect

        page = await context.new_page()
        await page.goto(f"{base}/jobs")  # warm: the server's first request loads its templates

        async def timed(name: str, url: str) -> None:
            """Load ``url`` as a person would (until the load event), three times: the
            median counts (other processes share this machine's two cores)."""
            loads, reads = [], []
            for _ in range(TRIES):
                begin = time.perf_counter()
                response = await page.goto(url)
                loads.append(time.perf_counter() - begin)
                assert response is not None
                assert response.status == 200, name
                read = await page.locator("[data-query-ms]").get_attribute("data-query-ms")
                reads.append(float(read or "nan"))
            timings[name] = statistics.median(loads)
            queries[name] = statistics.median(reads)

        async def link(name: str) -> str:
            href = await page.get_by_role("link", name=name).get_attribute("href")
            assert href is not None
            return base + href

        rows = page.locator("table.data tbody tr")
        await timed("first page", f"{base}/jobs")
        await expect(rows).to_have_count(50)
        await timed("next page", await link("Next →"))
        await expect(rows.first).to_contain_text("job-000050")
        await timed("last page (id desc)", f"{base}/jobs?sort=id&dir=desc")
        await expect(rows.first).to_contain_text("job-099999")
        await timed("next page (id desc)", await link("Next →"))
        await expect(rows.first).to_contain_text("job-099949")
        await timed("back", await link("← Previous"))
        await expect(rows.first).to_contain_text("job-099999")
        await timed("sorted by next run", f"{base}/jobs?sort=next_run_at&state=enabled")
        await timed("paused of a task", f"{base}/jobs?state=paused&task=app.task3")
        await expect(rows).to_have_count(50)
        await timed("search", f"{base}/jobs?q=tenant+996+heart")
        await expect(rows.first).to_contain_text("job-000996")
        await screenshot(page, f"jobs-100k-{backend}")
    report = {name: round(seconds * 1000, 1) for name, seconds in timings.items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"timings-100k-{backend}.json").write_text(
        json.dumps(
            {"fill_seconds": round(filled, 2), "page_ms": report, "query_ms": queries},
            indent=2,
        )
    )
    slow = {name: ms for name, ms in report.items() if ms > PAGE_BUDGET_SECONDS * 1000}
    assert not slow, f"pages slower than {PAGE_BUDGET_SECONDS} s with {BIG} jobs: {report}"
