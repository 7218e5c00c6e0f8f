"""Make docs/dashboard.png: the dashboard's page of a job with a month of history.

Seeds an SQLite file in a temporary directory (jobs, runs as workers would report them, two
workers), serves the dashboard in this process and photographs it with Debian's Chromium::

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--page job]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
import uvicorn
from playwright.async_api import async_playwright
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import (
    CrontabTrigger,
    IntervalTrigger,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerJob,
)
from taskiq_beat.dashboard import create_dashboard
from taskiq_beat.models import SchedulerJobStats, SchedulerRun, SchedulerWorker

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"job": "/job?id=reports.daily", "jobs": "/jobs", "runs": "/runs", "health": "/health"}


async def seed(app: SchedulerApp, now: datetime) -> None:
    broker = app.broker
    for name in ("reports.daily", "app.heartbeat", "billing.sync", "cache.warm"):
        broker.register_task(_noop, task_name=name)
    weekdays = PeriodicSchedule(
        crontab=CrontabTrigger(
            minute="0", hour="9", day_of_week="mon-fri", timezone="Europe/Berlin"
        )
    )
    async with app.session_factory() as session:
        await app.single("reports.daily", kwargs={"fmt": "pdf"}).upsert(
            session, trigger=weekdays, job_id="reports.daily", name="Daily report"
        )
        for n in range(6):
            await app.single("app.heartbeat", kwargs={"tenant": n}).upsert(
                session,
                trigger=PeriodicSchedule(interval=IntervalTrigger(minutes=5)),
                job_id=f"tenant.{n}.heartbeat",
                is_enabled=n != 3,
            )
        await app.single("billing.sync").upsert(
            session,
            trigger=PeriodicSchedule(crontab=CrontabTrigger(minute="*/15")),
            job_id="billing.sync",
            name="Billing sync",
        )
        session.add_all(
            [
                SchedulerWorker(
                    id=f"web-{n}-4f2a9c",
                    hostname=f"web-{n}",
                    pid=4100 + n,
                    started_at=now - timedelta(hours=3),
                    last_seen_at=now - timedelta(seconds=n + 1),
                )
                for n in range(2)
            ]
        )
        await session.flush()
        succeeded = failed = 0
        for day in range(30, 0, -1):
            scheduled = (now - timedelta(days=day)).replace(
                hour=8, minute=0, second=0, microsecond=0
            )
            fails = day in (4, 11, 23)
            duration = 41.0 + (day * 37 % 23) + (25.0 if day % 7 == 0 else 0.0)
            succeeded += not fails
            failed += fails
            session.add(
                SchedulerRun(
                    job_id="reports.daily",
                    scheduled_for=scheduled,
                    status=RunStatus.FAILED if fails else RunStatus.SUCCEEDED,
                    task_id=f"t{day}",
                    attempt=1,
                    created_at=scheduled,
                    updated_at=scheduled,
                    dispatched_at=scheduled,
                    started_at=scheduled,
                    finished_at=scheduled + timedelta(seconds=duration),
                    duration_seconds=duration if not fails else 3.2,
                    worker_id=f"web-{day % 2}-4f2a9c",
                    executions=1,
                    error="ConnectionError: the report store did not answer" if fails else None,
                    error_type="builtins.ConnectionError" if fails else None,
                )
            )
        session.add(
            SchedulerJobStats(
                job_id="reports.daily",
                run_count=30,
                success_count=succeeded,
                failure_count=failed,
                last_success_at=now - timedelta(days=1),
                last_failure_at=now - timedelta(days=4),
                last_duration_seconds=52.0,
            )
        )
        await session.execute(
            sa.update(SchedulerJob)
            .where(SchedulerJob.id == "reports.daily")
            .values(last_run_at=(now - timedelta(days=1)).replace(hour=8, minute=0, second=0))
        )
        await session.commit()


async def _noop(**kwargs: object) -> None:
    return None


async def main(out: Path, page_name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        engine = create_async_engine(f"sqlite+aiosqlite:///{folder}/dashboard.sqlite3")
        async with engine.begin() as connection:
            await connection.run_sync(SchedulerBase.metadata.create_all)
        app = SchedulerApp(
            broker=InMemoryBroker(),
            session_factory=async_sessionmaker(engine, expire_on_commit=False),
        )
        await seed(app, datetime.now(timezone.utc))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_dashboard(app, poll_seconds=0), port=port, log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        for _ in range(200):  # up to 10 s for the socket
            if server.started:
                break
            await asyncio.sleep(0.05)
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium")
                context = await browser.new_context(
                    viewport={"width": 1200, "height": 1050},
                    timezone_id="Europe/Berlin",
                    color_scheme="light",
                )
                page = await context.new_page()
                await page.goto(f"http://127.0.0.1:{port}{PAGES[page_name]}")
                out.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(out), full_page=page_name != "job")
                await browser.close()
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await engine.dispose()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--page", choices=sorted(PAGES), default="job")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.out, arguments.page))
