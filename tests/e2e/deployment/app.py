"""The application the deployment test deploys: a Redis broker, its tasks, the scheduler.

Configured entirely from the environment the test sets (see :mod:`.names`):

- ``E2E_DATABASE_URL``: the scheduler's PostgreSQL database (postgresql+asyncpg);
- ``E2E_REDIS_URL``: Redis, for the queue, the results and the execution log;
- ``E2E_QUEUE``: the Redis list of this run's messages;
- ``E2E_RESULTS_PREFIX``: the prefix of this run's other Redis keys.

Every task appends a JSON record of its execution to the list :func:`.names.executed_key`:
its task name and id, the scheduler's labels (job id and scheduled time; absent on chain
steps, which carry the chain's own labels instead), its arguments, and when and where it ran.

Run with ``taskiq worker tests.e2e.deployment.app:broker`` and
``taskiq-beat run tests.e2e.deployment.app:scheduler_app --startup
tests.e2e.deployment.app:seed``. Importing this module builds the ``SchedulerApp``, which
registers the chain orchestrator on the broker, so the worker can run chains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator
from datetime import datetime, timezone
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import Context, TaskiqDepends
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from taskiq_beat import (
    JOB_ID_LABEL,
    SCHEDULED_FOR_LABEL,
    IntervalTrigger,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerConfig,
)
from tests.e2e.deployment import names

logger = logging.getLogger(__name__)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: this module is configured by the e2e test")
    return value


DATABASE_URL = _env(names.DATABASE_URL_ENV)
REDIS_URL = _env(names.REDIS_URL_ENV)
QUEUE = _env(names.QUEUE_ENV)
RESULTS_PREFIX = _env(names.RESULTS_PREFIX_ENV)
EXECUTED_KEY = names.executed_key(RESULTS_PREFIX)

result_backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
    REDIS_URL,
    result_ex_time=300,  # results expire even if the test's cleanup does not run
    prefix_str=RESULTS_PREFIX,
)


class PollingListQueueBroker(ListQueueBroker):
    """taskiq-redis's ``ListQueueBroker``, listening with a bounded ``BRPOP``.

    The stock ``listen()`` blocks in ``BRPOP`` forever, which fails two ways:

    - redis-py 8 gives connections a default ``socket_timeout`` of 5 s, so an idle worker's
      ``BRPOP`` raises ``redis.exceptions.TimeoutError`` after 5 s (``listen()`` only catches
      the builtin ``ConnectionError``): the worker process dies and is restarted, every 5 s
      of idleness (and a reply racing the timeout would lose its message);
    - with ``socket_timeout=None`` instead, an idle worker ignores SIGTERM: ``taskiq worker``
      sets its stop event from a ``signal.signal`` handler, which does not wake the event
      loop blocked in ``BRPOP``, so it stops only when the next message arrives.

    A server-side ``BRPOP`` timeout wakes the loop every ``BRPOP_TIMEOUT_SECONDS``, so an idle
    worker stops within that long; errors talking to Redis are logged and retried.
    """

    BRPOP_TIMEOUT_SECONDS = 1
    RETRY_DELAY_SECONDS = 0.5

    async def listen(self) -> AsyncGenerator[bytes, None]:
        while True:
            try:
                async with Redis(connection_pool=self.connection_pool) as redis:
                    popped = await redis.brpop(
                        [self.queue_name], timeout=self.BRPOP_TIMEOUT_SECONDS
                    )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("reading the queue %s failed: %s", self.queue_name, exc)
                await asyncio.sleep(self.RETRY_DELAY_SECONDS)
                continue
            if popped is not None:
                message = popped[1]
                yield message.encode() if isinstance(message, str) else message


broker = PollingListQueueBroker(REDIS_URL, queue_name=QUEUE).with_result_backend(result_backend)

engine = create_async_engine(DATABASE_URL, pool_pre_ping=True)

scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=async_sessionmaker(engine, expire_on_commit=False),
    config=SchedulerConfig(sync_interval_seconds=0.5, idle_sleep_seconds=0.1),
)


async def _record_execution(context: Context) -> None:
    message = context.message
    record = {
        "task": message.task_name,
        "task_id": message.task_id,
        "job_id": message.labels.get(JOB_ID_LABEL),
        "scheduled_for": message.labels.get(SCHEDULED_FOR_LABEL),
        "args": message.args,
        "kwargs": message.kwargs,
        "executed_at": datetime.now(timezone.utc).isoformat(),
        "pid": os.getpid(),
    }
    async with Redis(connection_pool=broker.connection_pool) as redis:
        await redis.rpush(EXECUTED_KEY, json.dumps(record))


@broker.task(task_name=names.RECORD_TASK)
async def record(
    kind: str,
    context: Context = TaskiqDepends(),  # noqa: B008 - Taskiq's dependency injection
) -> str:
    """A scheduled job's task: note that it ran."""
    await _record_execution(context)
    return kind


@broker.task(task_name=names.STEP_TASKS[0])
async def step_a(
    position: int,
    context: Context = TaskiqDepends(),  # noqa: B008
) -> int:
    await _record_execution(context)
    return position


@broker.task(task_name=names.STEP_TASKS[1])
async def step_b(
    position: int,
    context: Context = TaskiqDepends(),  # noqa: B008
) -> int:
    await _record_execution(context)
    return position


@broker.task(task_name=names.STEP_TASKS[2])
async def step_c(
    position: int,
    context: Context = TaskiqDepends(),  # noqa: B008
) -> int:
    await _record_execution(context)
    return position


async def seed(app: SchedulerApp) -> None:
    """Startup hook of the scheduler process: upsert the system job (hourly)."""
    async with app.session_factory() as session:
        await app.single(record, kwargs={"kind": "system"}).upsert(
            session,
            trigger=PeriodicSchedule(
                interval=IntervalTrigger(seconds=names.SYSTEM_INTERVAL_SECONDS)
            ),
            job_id=names.SYSTEM_JOB,
            name="System job (seeded at start-up)",
        )
