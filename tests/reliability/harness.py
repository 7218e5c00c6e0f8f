"""What the reliability tests share: a cluster of scheduler processes, and the ledger that
checks what they sent.

:func:`cluster` makes a fresh database (a PostgreSQL or MariaDB database of its own, or an
SQLite file), a Redis list unique to the test, and starts ``taskiq-beat run`` processes on
:mod:`tests.reliability.app` on demand. Nothing consumes the list, so it holds every message
the broker received. :class:`Ledger` puts those messages beside the ``scheduler_run`` rows and
checks the promise of the scheduler: every due fire sent, none twice, except a fire whose
scheduler died between its send and its record, which is sent again with the same task id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from taskiq import InMemoryBroker

from taskiq_beat import (
    JOB_ID_LABEL,
    SCHEDULED_FOR_LABEL,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerJob,
    SchedulerRun,
    fire_task_id,
)
from tests.processes import PYTHON, ManagedProcess, describe, wait_until
from tests.reliability import names
from tests.utils import temporary_mysql_database, temporary_postgres_database

__all__ = [
    "BACKENDS",
    "Backend",
    "Cluster",
    "Fire",
    "Ledger",
    "Message",
    "Run",
    "cluster",
    "read_runs",
    "utcnow",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
UTC = timezone.utc

Fire = tuple[str, datetime]
"""One fire: a job id and its scheduled time."""

Backend = Literal["sqlite", "postgresql", "mariadb"]
"""The databases a cluster runs on."""
BACKENDS: tuple[Backend, ...] = ("postgresql", "mariadb", "sqlite")
"""Every backend, in the order the tests run them (``pytest.mark.parametrize``)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Message:
    """One message the broker received (read back from the Redis list)."""

    task_id: str
    fire: Fire

    @classmethod
    def parse(cls, raw: bytes | str) -> Message:
        data = json.loads(raw)
        labels = data["labels"]
        scheduled_for = datetime.fromisoformat(labels[SCHEDULED_FOR_LABEL])
        return cls(task_id=data["task_id"], fire=(labels[JOB_ID_LABEL], scheduled_for))


@dataclass(frozen=True)
class Run:
    """One ``scheduler_run`` row."""

    job_id: str
    scheduled_for: datetime
    status: RunStatus
    task_id: str
    attempt: int
    claimed_by: str | None
    created_at: datetime
    dispatched_at: datetime | None
    error: str | None
    executions: int = 0
    worker_id: str | None = None
    duration_seconds: float | None = None

    @property
    def fire(self) -> Fire:
        return self.job_id, self.scheduled_for


@dataclass
class Cluster:
    """The database, the Redis list and the scheduler processes of one test."""

    backend: Backend
    database_url: str
    """The database as the test reaches it (directly)."""
    redis_url: str
    queue: str
    log_dir: Path
    db: AsyncEngine
    redis: Redis
    processes: list[ManagedProcess] = field(default_factory=list)

    # ------------------------------------------------------------------ processes

    def env(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        send_delay: float = 0.0,
    ) -> dict[str, str]:
        return {
            names.DATABASE_URL_ENV: database_url or self.database_url,
            names.REDIS_URL_ENV: redis_url or self.redis_url,
            names.QUEUE_ENV: self.queue,
            names.CONFIG_ENV: json.dumps(dict(config or {})),
            names.SEND_DELAY_ENV: str(send_delay),
        }

    async def start_scheduler(
        self,
        name: str,
        *,
        log_level: str = "INFO",
        wait: bool = True,
        **env: Any,
    ) -> ManagedProcess:
        """Start ``taskiq-beat run`` on the reliability app; wait until its loop runs."""
        process = ManagedProcess(
            [PYTHON, "-m", "taskiq_beat.cli", "run", names.APP, "--log-level", log_level],
            name=name,
            cwd=ROOT,
            env=self.env(**env),
            log_dir=self.log_dir,
        )
        self.processes.append(process)
        await process.start()
        if wait:
            await process.wait_for_output(r"scheduler started", STARTUP_TIMEOUT)
        return process

    async def execute_all(self, *, timeout: float) -> list[str]:
        """Start a ``taskiq worker`` on the queue, with the lifecycle of the reliability app
        (it builds the ``SchedulerApp``), wait until it has taken every message and every run
        it could start has finished, stop it, and return the task ids it executed (one per
        execution)."""
        worker = ManagedProcess(
            [
                PYTHON,
                "-m",
                "taskiq",
                "worker",
                names.BROKER,
                "--workers",
                "1",
                "--max-async-tasks",
                "200",
            ],
            name="worker",
            cwd=ROOT,
            env=self.env(),
            log_dir=self.log_dir,
        )
        self.processes.append(worker)
        await worker.start()
        await worker.wait_for_output(r"Listening started", STARTUP_TIMEOUT)

        async def drained() -> bool:
            if await self.redis.llen(self.queue):
                return False
            async with self.db.connect() as connection:
                unfinished = await connection.execute(
                    sa.select(sa.func.count()).where(
                        SchedulerRun.status.in_([RunStatus.DISPATCHED, RunStatus.RUNNING])
                    )
                )
                return unfinished.scalar_one() == 0

        await wait_until(
            drained,
            timeout=timeout,
            interval=0.5,
            message="the worker did not execute every message",
            details=self.details,
            watch=[worker],
        )
        assert await worker.terminate(15) == 0, self.details()
        raw = await self.redis.lrange(names.executed_key(self.queue), 0, -1)
        return [item.decode() for item in raw]

    def details(self, *extra: object) -> str:
        return "\n".join([*(str(item) for item in extra), describe(*self.processes)])

    # ------------------------------------------------------------------ jobs

    async def add_interval_jobs(
        self, count: int, *, start_at: datetime, end_at: datetime, seconds: float = 1
    ) -> list[str]:
        """``count`` jobs firing every ``seconds`` from ``start_at`` to ``end_at`` (inclusive)."""
        trigger = PeriodicSchedule(
            interval=IntervalTrigger(seconds=seconds), start_at=start_at, end_at=end_at
        )
        return await self._add(count, trigger, "every")

    async def add_one_off_jobs(self, count: int, *, run_at: datetime) -> list[str]:
        return await self._add(count, OneOffSchedule(run_at=run_at), "once")

    async def _add(self, count: int, trigger: Any, prefix: str) -> list[str]:
        broker = InMemoryBroker()
        task = broker.register_task(_never_run, task_name=names.TASK)
        app = SchedulerApp(broker=broker, session_factory=async_sessionmaker(self.db))
        ids = [f"{prefix}-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
        definitions = [
            app.single(task, args=[i]).definition(trigger=trigger, job_id=job_id)
            for i, job_id in enumerate(ids)
        ]
        async with app.session_factory() as session:
            await app.upsert_many(session, definitions)
            await session.commit()
        return ids

    # ------------------------------------------------------------------ what happened

    async def messages(self) -> list[Message]:
        raw: list[bytes] = await self.redis.lrange(self.queue, 0, -1)
        return [Message.parse(item) for item in reversed(raw)]  # LPUSH: oldest last

    async def runs(self) -> list[Run]:
        return await read_runs(self.db)

    async def ledger(self) -> Ledger:
        return Ledger(await self.messages(), await self.runs())

    async def settle(
        self, at_least: int = 0, *, timeout: float, watch: Sequence[ManagedProcess] = ()
    ) -> Ledger:
        """Wait until at least ``at_least`` fires have run rows, every one is dispatched, the
        broker received each of them, and nothing changed for half a second; return the
        ledger then."""
        last: list[Ledger] = []

        async def settled() -> bool:
            ledger = await self.ledger()
            previous = last[0] if last else None
            last[:] = [ledger]
            return (
                len(ledger.runs) >= at_least
                and not ledger.undispatched
                and not ledger.runs_without_message
                and previous is not None
                and (len(previous.runs), len(previous.messages))
                == (len(ledger.runs), len(ledger.messages))
            )

        await wait_until(
            settled,
            timeout=timeout,
            interval=0.5,
            message=f"the fires did not settle ({at_least} expected)",
            details=lambda: self.details(last[0].summary() if last else "no ledger yet"),
            watch=watch,
        )
        return last[0]

    async def disable_all(self) -> None:
        """Disable every job at once, as an operator's ``UPDATE`` would (schedulers notice by
        their compare-and-set claims failing, or at their next sync)."""
        async with self.db.begin() as connection:
            await connection.execute(
                sa.update(SchedulerJob).values(is_enabled=False, revision=SchedulerJob.revision + 1)
            )


@dataclass
class Ledger:
    """Messages the broker received beside the run rows, and what they say."""

    messages: list[Message]
    runs: list[Run]

    def __post_init__(self) -> None:
        # A "missed" row records a stretch of fires that were not sent (the misfire rule):
        # history, not a send. It is checked apart (see check()).
        self.missed_runs = [run for run in self.runs if run.status is RunStatus.MISSED]
        self.runs = [run for run in self.runs if run.status is not RunStatus.MISSED]
        self.by_fire: dict[Fire, Run] = {}
        self.duplicate_runs: list[Run] = []
        for run in self.runs:
            if run.fire in self.by_fire:
                self.duplicate_runs.append(run)  # impossible: (job_id, scheduled_for) is unique
            self.by_fire[run.fire] = run
        self.by_task_id = {run.task_id: run for run in self.runs}
        self.received = Counter(message.task_id for message in self.messages)
        self.fires_received = {message.fire for message in self.messages}

    @property
    def undispatched(self) -> list[Run]:
        return [run for run in self.runs if run.status is not RunStatus.DISPATCHED]

    @property
    def runs_without_message(self) -> list[Run]:
        return [run for run in self.runs if run.task_id not in self.received]

    @property
    def messages_without_run(self) -> list[Message]:
        return [m for m in self.messages if m.fire not in self.by_fire]

    @property
    def wrong_task_ids(self) -> list[Message]:
        return [m for m in self.messages if m.task_id != fire_task_id(*m.fire)]

    @property
    def resent(self) -> dict[str, int]:
        """Task ids the broker received more than once, with how often."""
        return {task_id: n for task_id, n in self.received.items() if n > 1}

    def check(
        self,
        expected: Iterable[Fire],
        *,
        may_coalesce: Sequence[tuple[datetime, datetime]] = (),
        until: datetime | None = None,
    ) -> Report:
        """Assert the promise; return the counts.

        - every message carries the task id of its fire and has a run row, every run row is
          dispatched and its message arrived, and no fire is outside ``expected``;
        - a fire of ``expected`` may be missing only when it fell in one of ``may_coalesce``
          (times when no scheduler ran: missed fires are coalesced into the latest one);
        - a task id may arrive twice only for a fire sent again (``attempt`` > 1);
        - a ``missed`` row (a stretch of fires not sent) starts within one of
          ``may_coalesce``, and no fire was sent for its time.

        Fires scheduled after ``until`` are left out of every count (the jobs were stopped
        then, and what was due around it is not part of the test).
        """
        expected = set(expected)
        sent = {fire for fire in self.by_fire if until is None or fire[1] <= until}
        missing = sorted(expected - sent, key=lambda fire: (fire[1], fire[0]))
        lost = [
            fire
            for fire in missing
            if not any(start <= fire[1] <= end for start, end in may_coalesce)
        ]
        resent_first_attempt = [
            task_id
            for task_id in self.resent
            if (run := self.by_task_id.get(task_id)) is None or run.attempt < 2
        ]
        report = Report(
            expected=len(expected),
            sent=len(sent & expected),
            coalesced=len(missing) - len(lost),
            messages=len(self.messages),
            resent=sum(n - 1 for n in self.resent.values()),
        )
        problems = {
            "duplicate run rows": self.duplicate_runs,
            "messages with a wrong task id": self.wrong_task_ids,
            "messages without a run row": self.messages_without_run,
            "run rows whose message never arrived": self.runs_without_message,
            "run rows not dispatched": self.undispatched,
            "fires sent that were not due": sorted(sent - expected, key=lambda f: f[1]),
            "fires lost": lost,
            "task ids received twice on a first attempt": resent_first_attempt,
            "missed rows outside the times no scheduler ran": [
                run
                for run in self.missed_runs
                if not any(start <= run.scheduled_for <= end for start, end in may_coalesce)
            ],
            "missed rows of fires that were sent": [
                run for run in self.missed_runs if run.fire in self.by_fire
            ],
        }
        found = {name: items for name, items in problems.items() if items}
        assert not found, "\n".join(
            [
                str(report),
                *(f"{name} ({len(items)}): {items[:10]}" for name, items in found.items()),
            ]
        )
        return report

    def summary(self) -> str:
        return (
            f"{len(self.runs)} run rows ({len(self.undispatched)} not dispatched), "
            f"{len(self.messages)} messages, {len(self.runs_without_message)} runs without "
            f"a message, resent {self.resent}"
        )


@dataclass(frozen=True)
class Report:
    expected: int
    sent: int
    coalesced: int
    messages: int
    resent: int

    def __str__(self) -> str:
        return (
            f"fires due {self.expected}, sent {self.sent}, coalesced {self.coalesced}, "
            f"messages received {self.messages}, of them resends {self.resent}"
        )


async def read_runs(db: AsyncEngine) -> list[Run]:
    """Every ``scheduler_run`` row, in the order they were inserted."""
    run = SchedulerRun
    statement = sa.select(
        run.job_id,
        run.scheduled_for,
        run.status,
        run.task_id,
        run.attempt,
        run.claimed_by,
        run.created_at,
        run.dispatched_at,
        run.error,
        run.executions,
        run.worker_id,
        run.duration_seconds,
    ).order_by(run.id)
    async with db.connect() as connection:
        return [Run(*row) for row in await connection.execute(statement)]


def grid(start_at: datetime, end_at: datetime, seconds: float = 1) -> list[datetime]:
    """The fire times of an interval job from ``start_at`` to ``end_at`` inclusive."""
    times, step, current = [], timedelta(seconds=seconds), start_at
    while current <= end_at:
        times.append(current)
        current += step
    return times


def whole_second(after: float) -> datetime:
    """The first whole UTC second at least ``after`` seconds from now."""
    moment = utcnow() + timedelta(seconds=after)
    return moment.replace(microsecond=0) + timedelta(seconds=1)


def monotonic_to_utc(moment: float) -> datetime:
    """A ``time.monotonic()`` reading as a UTC datetime (of the test process's clock)."""
    return utcnow() - timedelta(seconds=time.monotonic() - moment)


async def _never_run(*args: Any) -> None:  # pragma: no cover - never executed
    raise AssertionError("the reliability task runs nowhere")


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, backend: Backend, redis_url: str) -> AsyncIterator[Cluster]:
    """A fresh database with the tables, a Redis list of this test's own, cleaned up after;
    every scheduler process started is killed on the way out."""
    queue = f"taskiq_beat_reliability:{uuid.uuid4().hex[:12]}"
    redis = Redis.from_url(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(redis.aclose)
        stack.push_async_callback(redis.delete, queue)
        if backend == "postgresql":
            url = await stack.enter_async_context(
                temporary_postgres_database("taskiq_beat_reliability")
            )
        elif backend == "mariadb":
            url = await stack.enter_async_context(
                temporary_mysql_database("taskiq_beat_reliability")
            )
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'beat.sqlite3'}"
        db = create_async_engine(url)
        stack.push_async_callback(db.dispose)
        async with db.begin() as connection:
            await connection.run_sync(SchedulerBase.metadata.create_all)
        the_cluster = Cluster(
            backend=backend,
            database_url=url,
            redis_url=redis_url,
            queue=queue,
            log_dir=tmp_path / "logs",
            db=db,
            redis=redis,
        )
        try:
            yield the_cluster
        finally:
            for process in the_cluster.processes:
                await process.cleanup()
