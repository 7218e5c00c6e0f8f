"""A FastAPI app with a taskiq-beat scheduler in its lifespan.

Run it from the repository root::

    uvicorn examples.fastapi_app.main:app

``POST /reports`` schedules a report on an interval or a cron expression, ``POST
/reports/now`` sends one at once, and ``/scheduler/...`` (the router of
:mod:`taskiq_beat.contrib.fastapi`) lists, pauses, resumes, runs and deletes jobs.

The database is an SQLite file in the current directory unless ``TASKIQ_BEAT_DATABASE_URL``
names another (``postgresql+asyncpg://user@host/db``). The broker is an ``InMemoryBroker``,
so the tasks run inside this process; with a real broker (taskiq-redis, ...) they would run
on ``taskiq worker`` processes instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import (
    CrontabTrigger,
    IntervalTrigger,
    InvalidJobError,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerBase,
    SchedulerConfig,
)
from taskiq_beat.contrib.fastapi import ErrorOut, JobOut, create_scheduler_router

logger = logging.getLogger("examples.fastapi_app")

DATABASE_URL = os.environ.get(
    "TASKIQ_BEAT_DATABASE_URL", "sqlite+aiosqlite:///taskiq_beat_example.sqlite3"
)

engine = create_async_engine(DATABASE_URL)
# expire_on_commit=False: rows stay readable after the commits the scheduler makes.
session_factory = async_sessionmaker(engine, expire_on_commit=False)
broker = InMemoryBroker()


@broker.task(task_name="example.build_report")
async def build_report(report: str, recipient: str) -> str:
    logger.info("building report %r for %s", report, recipient)
    return f"{report} sent to {recipient}"


@broker.task(task_name="example.purge_old_reports")
async def purge_old_reports(keep_days: int) -> None:
    logger.info("purging reports older than %d days", keep_days)


scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=session_factory,
    config=SchedulerConfig(sync_interval_seconds=1.0),
)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Creating the tables here keeps the demo self-contained. In production apply the
    # migrations instead (`taskiq-beat db upgrade`, or your own Alembic history).
    async with engine.begin() as connection:
        await connection.run_sync(SchedulerBase.metadata.create_all)
    await broker.startup()
    try:
        # A job the application itself defines: upsert it at every start, never duplicated.
        async with session_factory() as session:
            await scheduler_app.single(purge_old_reports, kwargs={"keep_days": 30}).upsert(
                session,
                trigger=PeriodicSchedule(interval=IntervalTrigger(minutes=10)),
                job_id="example.purge_old_reports",
                name="purge old reports",
            )
        await scheduler_app.start()
        try:
            yield
        finally:
            await scheduler_app.stop()
    finally:
        await broker.shutdown()
        await engine.dispose()


app = FastAPI(title="taskiq-beat FastAPI example", lifespan=lifespan)
app.include_router(create_scheduler_router(scheduler_app, prefix="/scheduler"))


class ReportRequest(BaseModel):
    """What to build and for whom."""

    report: str = Field(min_length=1, max_length=100, examples=["sales"])
    recipient: str = Field(min_length=1, max_length=200, examples=["ops@example.com"])


class ReportSchedule(ReportRequest):
    """A report sent on a schedule: ``every_seconds`` or ``cron``, exactly one."""

    every_seconds: float | None = Field(default=None, gt=0, examples=[60])
    cron: str | None = Field(
        default=None,
        description="Five cron fields: minute hour day-of-month month day-of-week.",
        examples=["30 7 * * mon-fri"],
    )
    timezone: str = Field(default="UTC", description="IANA timezone of the cron expression.")
    job_id: str | None = Field(default=None, description="Defaults to a new UUID.")
    name: str | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> ReportSchedule:
        if (self.every_seconds is None) == (self.cron is None):
            raise ValueError("give exactly one of every_seconds and cron")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError("cron needs five fields: minute hour day-of-month month day-of-week")
        return self

    def trigger(self) -> PeriodicSchedule:
        if self.cron is None:
            assert self.every_seconds is not None
            return PeriodicSchedule(interval=IntervalTrigger(seconds=self.every_seconds))
        minute, hour, day_of_month, month_of_year, day_of_week = self.cron.split()
        crontab = CrontabTrigger(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
            timezone=self.timezone,
        )
        return PeriodicSchedule(crontab=crontab)


REFUSED: dict[int | str, dict[str, object]] = {422: {"model": ErrorOut}}


@app.post("/reports", status_code=201, response_model=JobOut, responses=REFUSED)
async def schedule_report(body: ReportSchedule) -> JobOut:
    """Create a job that builds the report on an interval or a cron schedule."""
    try:
        # A bad cron field, an unknown timezone or a taken job id raise InvalidJobError.
        trigger = body.trigger()
        builder = scheduler_app.single(
            build_report, kwargs={"report": body.report, "recipient": body.recipient}
        )
        async with session_factory() as session:
            job = await builder.schedule(session, trigger, job_id=body.job_id, name=body.name)
    except InvalidJobError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return JobOut.from_job(job)


@app.post("/reports/now", status_code=201, response_model=JobOut)
async def send_report_now(body: ReportRequest) -> JobOut:
    """Send the report at once (an immediate job: one run, no schedule)."""
    builder = scheduler_app.single(
        build_report, kwargs={"report": body.report, "recipient": body.recipient}
    )
    async with session_factory() as session:
        job = await builder.schedule(session)
    return JobOut.from_job(job)
