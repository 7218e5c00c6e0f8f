"""A real deployment, end to end: PostgreSQL, Redis, a Taskiq worker and a scheduler process.

Nothing is faked. The test creates a fresh PostgreSQL database and migrates it with
``taskiq-beat db upgrade``; it runs ``taskiq worker`` and ``taskiq-beat run`` on the app in
:mod:`tests.e2e.deployment.app` (a Redis list queue unique to this run), creates jobs from a
third process through the public API, pauses, resumes and runs jobs through the CLI, and then
checks what the worker executed against the run rows the scheduler wrote. Finally both
processes must stop cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from taskiq_redis import RedisAsyncResultBackend

from taskiq_beat import CHAIN_TASK_NAME, RunStatus, SchedulerJob, fire_task_id
from tests.e2e.deployment import names
from tests.processes import (
    PYTHON,
    ManagedProcess,
    describe,
    redis_url_or_skip,
    run_process,
    wait_until,
)
from tests.reliability.harness import Run, read_runs
from tests.utils import temporary_postgres_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.e2e.deployment.app"
SECOND = timedelta(seconds=1)

STARTUP_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0
OUTCOME_TIMEOUT = 25.0
STOP_TIMEOUT = 10.0
PAUSE_SECONDS = 3.0


@dataclass(frozen=True)
class Execution:
    """One task execution, as the worker recorded it in Redis."""

    task: str
    task_id: str
    job_id: str | None
    scheduled_for: datetime | None
    kwargs: dict[str, Any]
    executed_at: datetime

    @classmethod
    def parse(cls, raw: bytes | str) -> Execution:
        data = json.loads(raw)
        label = data["scheduled_for"]
        return cls(
            task=data["task"],
            task_id=data["task_id"],
            job_id=data["job_id"],
            scheduled_for=None if label is None else datetime.fromisoformat(label),
            kwargs=data["kwargs"],
            executed_at=datetime.fromisoformat(data["executed_at"]),
        )

    @property
    def fire(self) -> tuple[str, datetime]:
        assert self.job_id is not None, self
        assert self.scheduled_for is not None, self
        return self.job_id, self.scheduled_for


@dataclass
class Deployment:
    """The services and processes of one test run, and how to look at them."""

    env: dict[str, str]
    log_dir: Path
    redis: Redis
    results: RedisAsyncResultBackend[Any]
    db: AsyncEngine
    executed_key: str
    processes: list[ManagedProcess] = field(default_factory=list)

    def process(self, name: str, *args: str) -> ManagedProcess:
        process = ManagedProcess(
            [PYTHON, *args], name=name, cwd=ROOT, env=self.env, log_dir=self.log_dir
        )
        self.processes.append(process)
        return process

    async def executions(self) -> list[Execution]:
        """Every execution so far, in the order the tasks finished."""
        raw: list[bytes | str] = await self.redis.lrange(self.executed_key, 0, -1)
        return [Execution.parse(item) for item in raw]

    async def runs(self) -> list[Run]:
        return await read_runs(self.db)

    async def jobs(self) -> dict[str, dict[str, Any]]:
        async with self.db.connect() as connection:
            rows = await connection.execute(
                sa.select(
                    SchedulerJob.id,
                    SchedulerJob.is_enabled,
                    SchedulerJob.next_run_at,
                    SchedulerJob.last_error,
                )
            )
            return {row.id: dict(row._mapping) for row in rows}

    async def cli(self, *args: str) -> Any:
        """Run ``taskiq-beat ARGS --app APP --json`` as a process; return its JSON output."""
        result = await run_process(
            [PYTHON, "-m", "taskiq_beat.cli", *args, "--app", f"{APP}:scheduler_app", "--json"],
            name=f"cli-{args[0]}-{args[1]}" if len(args) > 1 else "cli",
            timeout=CLI_TIMEOUT,
            cwd=ROOT,
            env=self.env,
            log_dir=self.log_dir,
        )
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"not JSON\n{result.description}") from None

    def details(self, *extra: object) -> str:
        return "\n".join([*(str(item) for item in extra), describe(*self.processes)])


@pytest.fixture
def redis_url() -> str:
    return redis_url_or_skip()


@contextlib.asynccontextmanager
async def deployment(tmp_path: Path, redis_url: str) -> AsyncIterator[Deployment]:
    """A fresh database, this run's Redis keys (deleted after), and the environment."""
    run_prefix = f"taskiq_beat_e2e:{uuid.uuid4().hex[:12]}"
    results_prefix = f"{run_prefix}:results"
    redis = Redis.from_url(redis_url)
    results: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        redis_url, prefix_str=results_prefix
    )
    try:
        async with temporary_postgres_database("taskiq_beat_e2e") as database_url:
            env = {
                names.DATABASE_URL_ENV: database_url,
                names.REDIS_URL_ENV: redis_url,
                names.QUEUE_ENV: f"{run_prefix}:queue",
                names.RESULTS_PREFIX_ENV: results_prefix,
            }
            db = create_async_engine(database_url)
            try:
                yield Deployment(
                    env=env,
                    log_dir=tmp_path / "logs",
                    redis=redis,
                    results=results,
                    db=db,
                    executed_key=names.executed_key(results_prefix),
                )
            finally:
                await db.dispose()
    finally:
        try:
            keys = [key async for key in redis.scan_iter(match=f"{run_prefix}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
        finally:
            await results.shutdown()
            await redis.aclose()


def of_job(executions: Iterable[Execution], job_id: str) -> list[Execution]:
    return [e for e in executions if e.job_id == job_id]


def of_task(executions: Iterable[Execution], task: str) -> list[Execution]:
    return [e for e in executions if e.task == task]


async def test_deployment_runs_jobs_end_to_end(tmp_path: Path, redis_url: str) -> None:
    async with deployment(tmp_path, redis_url) as d, contextlib.AsyncExitStack() as stack:
        # -- the schema, through the CLI, as an operator would create it
        database_url = d.env[names.DATABASE_URL_ENV]
        await run_process(
            [PYTHON, "-m", "taskiq_beat.cli", "db", "upgrade", "--db", database_url],
            name="db-upgrade",
            timeout=CLI_TIMEOUT,
            cwd=ROOT,
            env=d.env,
            log_dir=d.log_dir,
        )

        # -- the worker and the scheduler; meanwhile a client process creates jobs through
        # the public API (the scheduler picks them up at its next sync)
        worker = await stack.enter_async_context(
            d.process(
                "worker",
                *("-m", "taskiq", "worker", f"{APP}:broker", "--workers", "1"),
                *("--log-level", "INFO", "--shutdown-timeout", "5", "--wait-tasks-timeout", "5"),
            )
        )
        scheduler = await stack.enter_async_context(
            d.process(
                "scheduler",
                *("-m", "taskiq_beat.cli", "run", f"{APP}:scheduler_app"),
                *("--startup", f"{APP}:seed", "--log-level", "INFO"),
            )
        )
        services = [worker, scheduler]
        _, _, created = await asyncio.gather(
            worker.wait_for_output(r"Listening started", STARTUP_TIMEOUT),
            scheduler.wait_for_output(r"scheduler started", STARTUP_TIMEOUT),
            run_process(
                [PYTHON, "-m", "tests.e2e.deployment.create_jobs"],
                name="create-jobs",
                timeout=CLI_TIMEOUT,
                cwd=ROOT,
                env=d.env,
                log_dir=d.log_dir,
            ),
        )
        jobs = json.loads(created.stdout)
        one_off_at = datetime.fromisoformat(jobs[names.ONE_OFF_JOB]["next_run_at"])
        chain_at = datetime.fromisoformat(jobs[names.CHAIN_JOB]["next_run_at"])

        async def interval_ran_three_times() -> bool:
            return len(of_job(await d.executions(), names.INTERVAL_JOB)) >= 3

        # The CLI lists the jobs (the seeded one too) while the interval job runs.
        listed, _ = await asyncio.gather(
            d.cli("jobs", "list"),
            wait_until(
                interval_ran_three_times,
                OUTCOME_TIMEOUT,
                message="the interval job did not run 3 times",
                details=d.details,
                watch=services,
            ),
        )
        assert sorted(job["id"] for job in listed) == sorted([names.SYSTEM_JOB, *jobs]), listed

        # -- pause the interval job through the CLI, run the system job now meanwhile, resume
        paused = await d.cli("jobs", "pause", names.INTERVAL_JOB)
        assert paused["is_enabled"] is False, paused
        paused_at = datetime.fromisoformat(paused["updated_at"])
        ran_now, _ = await asyncio.gather(
            d.cli("jobs", "run-now", names.SYSTEM_JOB), asyncio.sleep(PAUSE_SECONDS)
        )
        # Recorded after the kiq: the worker may have started (or finished) it already.
        assert ran_now["status"] in {"dispatched", "running", "succeeded"}, ran_now
        resumed = await d.cli("jobs", "resume", names.INTERVAL_JOB)
        assert resumed["is_enabled"] is True, resumed
        resumed_first = datetime.fromisoformat(resumed["next_run_at"])

        # -- wait for every kind of job to have run
        async def outcomes() -> dict[str, int]:
            executions = await d.executions()
            return {
                "interval after resume": sum(
                    1
                    for e in of_job(executions, names.INTERVAL_JOB)
                    if e.scheduled_for is not None and e.scheduled_for >= resumed_first
                ),
                "cron": len(of_job(executions, names.CRON_JOB)),
                "one-off": len(of_job(executions, names.ONE_OFF_JOB)),
                "chain steps": sum(len(of_task(executions, t)) for t in names.STEP_TASKS),
                "run-now": len(of_job(executions, names.SYSTEM_JOB)),
            }

        wanted = {
            "interval after resume": 2,
            "cron": 3,
            "one-off": 1,
            "chain steps": 3,
            "run-now": 1,
        }
        last: dict[str, int] = {}

        async def all_ran() -> bool:
            last.update(await outcomes())
            return all(last[key] >= count for key, count in wanted.items())

        await wait_until(
            all_ran,
            OUTCOME_TIMEOUT,
            message="not every job ran",
            details=lambda: d.details(f"wanted {wanted}, got {last}"),
            watch=services,
        )

        # -- stop the scheduler; the worker then drains what was sent, and stops too
        code = await scheduler.terminate(STOP_TIMEOUT)
        assert code == 0, d.details(f"the scheduler exited with {code} on SIGTERM")
        assert not scheduler.killed  # it stopped within STOP_TIMEOUT
        assert "stop requested; shutting down" in scheduler.output, d.details()

        chain_result: dict[str, Any] = {}

        async def drained() -> bool:
            executed = {e.fire for e in await d.executions() if e.job_id is not None}
            for run in await d.runs():
                if run.status in (RunStatus.DISPATCHED, RunStatus.RUNNING):
                    return False  # the worker has not reported its outcome yet
                if run.status != RunStatus.SUCCEEDED:
                    continue
                if run.job_id == names.CHAIN_JOB:
                    if not await d.results.is_result_ready(run.task_id):
                        return False
                    result = await d.results.get_result(run.task_id)
                    chain_result.update(error=result.is_err, value=result.return_value)
                elif run.fire not in executed:
                    return False
            return True

        await wait_until(
            drained,
            OUTCOME_TIMEOUT,
            message="the worker did not execute every dispatched fire",
            details=d.details,
            watch=[worker],
        )
        code = await worker.terminate(STOP_TIMEOUT)
        assert code == 0, d.details(f"the worker exited with {code} on SIGTERM")
        assert not worker.killed  # it stopped within STOP_TIMEOUT

        executions = await d.executions()
        runs = await d.runs()
        final_jobs = await d.jobs()
        report = d.details(
            "executions:",
            *executions,
            "runs:",
            *runs,
            f"paused at {paused_at}, resumed with first fire at {resumed_first}",
        )

        # -- a healthy deployment: nothing crashed, retried or complained on the way
        for process in (worker, scheduler):
            for trouble in ("Traceback", "WARNING", "ERROR", "CRITICAL", "is dead"):
                assert trouble not in process.output, f"{trouble!r} in {process.name}\n{report}"

        # -- every execution is one fire, sent once, with the task id of its run row
        labelled = [e for e in executions if e.job_id is not None]
        twice = [fire for fire, n in Counter(e.fire for e in labelled).items() if n > 1]
        assert not twice, f"fires executed more than once: {twice}\n{report}"
        by_fire = {run.fire: run for run in runs}
        assert len(by_fire) == len(runs), report  # the table is unique on (job, scheduled_for)
        for execution in labelled:
            run = by_fire.get(execution.fire)
            assert run is not None, f"no run row for {execution}\n{report}"
            # The worker reported it: executed once, with its outcome and how long it took.
            assert run.status == RunStatus.SUCCEEDED, f"{run} for {execution}\n{report}"
            assert run.executions == 1, f"{run}\n{report}"
            assert run.worker_id is not None, f"{run}\n{report}"
            assert run.duration_seconds is not None, f"{run}\n{report}"
            assert execution.task_id == run.task_id, f"{execution} vs {run}\n{report}"
            assert run.task_id == fire_task_id(*execution.fire), f"{run}\n{report}"
        # ...and every fire sent was executed (the chain's, by the orchestrator).
        executed_fires = {e.fire for e in labelled}
        for run in runs:
            if run.status == RunStatus.SUCCEEDED:
                assert run.attempt == 1, f"sent more than once: {run}\n{report}"
                assert run.error is None, f"{run}\n{report}"
                if run.job_id != names.CHAIN_JOB:
                    assert run.fire in executed_fires, f"succeeded, not executed: {run}\n{report}"
            if run.status != RunStatus.SUCCEEDED:
                # Only a fire claimed as the scheduler stopped may be left, released unsent.
                assert run.status == RunStatus.CLAIMED, f"{run}\n{report}"
                assert run.claimed_by is None, f"{run}\n{report}"
                assert run.fire not in executed_fires, f"{run}\n{report}"
            assert run.scheduled_for <= run.created_at, f"claimed before due: {run}\n{report}"
        assert all(job["last_error"] is None for job in final_jobs.values()), final_jobs

        # -- the interval job: every second, never claimed while paused
        interval_runs = sorted(
            (r for r in runs if r.job_id == names.INTERVAL_JOB), key=lambda r: r.scheduled_for
        )
        before = [r for r in interval_runs if r.scheduled_for < resumed_first]
        after = [r for r in interval_runs if r.scheduled_for >= resumed_first]
        # A claim and the pause both lock the job row, and a claim needs the job enabled: a
        # fire claimed before the pause committed has a run row created (at the claim's
        # "now", >= its scheduled time) no later than the pause's timestamp, and may still
        # be sent and executed after the pause. After the resume, fires restart one period
        # after the resume. So no run row of the job was created while it was paused:
        for run in before:
            assert run.created_at <= paused_at, f"claimed while paused: {run}\n{report}"
        assert len(before) >= 3, report
        assert len(after) >= 2, report
        for earlier, later in itertools.pairwise(before):
            gap = later.scheduled_for - earlier.scheduled_for
            assert gap >= SECOND, f"{earlier}, {later}\n{report}"
            assert gap % SECOND == timedelta(0), f"off the 1 s grid: {earlier}, {later}\n{report}"
        for run in after:
            assert (run.scheduled_for - resumed_first) % SECOND == timedelta(0), report
        # The fires the pause skipped: the last one claimed before it was due by the pause's
        # timestamp, the first after it one period after the resume, which came at least
        # PAUSE_SECONDS later.
        skipped = after[0].scheduled_for - before[-1].scheduled_for
        assert skipped >= (PAUSE_SECONDS + 1) * SECOND, report
        assert len(of_job(executions, names.INTERVAL_JOB)) >= 5, report

        # -- the cron job: on even seconds only
        cron = of_job(executions, names.CRON_JOB)
        assert len(cron) >= 3, report
        for execution in cron:
            assert execution.scheduled_for is not None
            assert execution.scheduled_for.second % 2 == 0, f"{execution}\n{report}"
            assert execution.scheduled_for.microsecond == 0, f"{execution}\n{report}"

        # -- the one-off job: once, at its time; then it has no next run
        [one_off] = of_job(executions, names.ONE_OFF_JOB)
        assert one_off.scheduled_for == one_off_at, report
        assert [r.fire for r in runs if r.job_id == names.ONE_OFF_JOB] == [one_off.fire], report
        assert final_jobs[names.ONE_OFF_JOB]["next_run_at"] is None, final_jobs

        # -- the chain: one fire, run by the orchestrator, steps a, b, c in that order
        [chain_run] = [r for r in runs if r.job_id == names.CHAIN_JOB]
        assert chain_run.scheduled_for == chain_at, report
        assert chain_run.status == RunStatus.SUCCEEDED, report
        assert chain_result == {"error": False, "value": {"steps": 3, "chain_attempts": 1}}, (
            f"orchestrator result {chain_result}\n{report}"
        )
        steps = [e for e in executions if e.task in names.STEP_TASKS]
        assert [e.task for e in steps] == list(names.STEP_TASKS), report
        assert [e.kwargs["position"] for e in steps] == [1, 2, 3], report
        assert len({e.task_id for e in steps}) == 3, report
        assert all(chain_at <= e.executed_at for e in steps), report
        assert steps[0].executed_at <= steps[1].executed_at <= steps[2].executed_at, report
        assert CHAIN_TASK_NAME not in {e.task for e in executions}, report

        # -- the seeded system job (hourly) ran once: the CLI's run-now
        [system] = of_job(executions, names.SYSTEM_JOB)
        assert system.task_id == ran_now["task_id"], f"{ran_now}\n{report}"
        assert system.scheduled_for == datetime.fromisoformat(ran_now["scheduled_for"]), report
        assert final_jobs[names.SYSTEM_JOB]["next_run_at"] is not None, final_jobs
