"""The worker side of ``scripts/bench_chains.py``: imported by ``taskiq worker``.

    taskiq worker scripts.bench_support.chain_worker:broker --workers 1

Built at import from the environment the benchmark sets (:data:`DATABASE_URL_ENV`,
:data:`REDIS_URL_ENV`, :data:`STREAM_ENV`): a ``RedisStreamBroker`` on the stream, the step
task :data:`TASK_NAME`, and a ``SchedulerApp`` on the database (its construction adds the
lifecycle middleware, which runs the durable chains). Each execution of a step adds one to
the field ``<run id>:<step>`` of the Redis hash :func:`executions_key`: a field above 1 is a
step executed twice.
"""

from __future__ import annotations

import os
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import Context, TaskiqDepends
from taskiq_redis import RedisStreamBroker

from taskiq_beat import SchedulerApp, SchedulerConfig
from taskiq_beat.chain import CHAIN_RUN_ID_LABEL, CHAIN_STEP_LABEL

DATABASE_URL_ENV = "BENCH_CHAINS_DATABASE_URL"
REDIS_URL_ENV = "BENCH_CHAINS_REDIS_URL"
STREAM_ENV = "BENCH_CHAINS_STREAM"
TASK_NAME = "bench.chain_step"


def executions_key(stream: str) -> str:
    return f"{stream}:step_executions"


def make_broker(redis_url: str, stream: str) -> RedisStreamBroker:
    """The stream broker of both sides (taskiq-redis defaults otherwise)."""
    return RedisStreamBroker(
        redis_url,
        queue_name=stream,
        consumer_group_name=f"{stream}:workers",
        xread_block=200,
    )


CONFIG = SchedulerConfig()
"""The package's defaults, on both sides."""

if os.environ.get(DATABASE_URL_ENV):  # in the worker processes the benchmark starts
    STREAM = os.environ[STREAM_ENV]
    REDIS_URL = os.environ[REDIS_URL_ENV]
    broker = make_broker(REDIS_URL, STREAM)
    _engine = create_async_engine(os.environ[DATABASE_URL_ENV])
    scheduler_app = SchedulerApp(
        broker=broker,
        session_factory=async_sessionmaker(_engine, expire_on_commit=False),
        config=CONFIG,
    )
    _clients: dict[str, Redis] = {}
    _CONTEXT: Any = TaskiqDepends()

    @broker.task(task_name=TASK_NAME)
    async def chain_step(chain: int, context: Context = _CONTEXT) -> int:
        client = _clients.get("redis")
        if client is None:
            client = _clients["redis"] = Redis.from_url(REDIS_URL)
        labels = context.message.labels
        field = f"{labels[CHAIN_RUN_ID_LABEL]}:{labels[CHAIN_STEP_LABEL]}"
        await client.hincrby(executions_key(STREAM), field, 1)
        return chain
