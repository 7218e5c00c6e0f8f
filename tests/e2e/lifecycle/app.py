"""The worker app of the lifecycle test: a Redis stream broker, its tasks, and the
``SchedulerApp`` whose construction adds the lifecycle middleware to the broker.

Run with ``taskiq worker tests.e2e.lifecycle.app:broker --workers 1``; configured from the
environment the test sets (:data:`DATABASE_URL_ENV`, :data:`REDIS_URL_ENV`,
:data:`STREAM_ENV`). Each task appends ``{"task_id", "task", "pid", "event"}`` to the Redis
list ``<stream>:executed`` when it starts (``start``) and when it ends (``end``) (a chain
step adds its ``name``).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import Context, TaskiqDepends
from taskiq_redis import RedisStreamBroker

from taskiq_beat import SchedulerApp, SchedulerConfig

DATABASE_URL_ENV = "E2E_LIFECYCLE_DATABASE_URL"
REDIS_URL_ENV = "E2E_LIFECYCLE_REDIS_URL"
STREAM_ENV = "E2E_LIFECYCLE_STREAM"
REDELIVER_AFTER_MS = 5000
"""The stream's redelivery of unacknowledged messages: longer than the workers' timeout plus
the scheduler's housekeeping, so a dead worker's run is ``lost`` before it comes back."""

CONFIG = SchedulerConfig(
    worker_heartbeat_seconds=0.5,
    worker_timeout_seconds=2.0,
    housekeeping_interval_seconds=0.5,
    lifecycle_flush_seconds=0.05,
    sync_interval_seconds=0.5,
)


def executed_key(stream: str) -> str:
    return f"{stream}:executed"


def make_broker(redis_url: str, stream: str) -> RedisStreamBroker:
    return RedisStreamBroker(
        redis_url,
        queue_name=stream,
        consumer_group_name=f"{stream}:workers",
        idle_timeout=REDELIVER_AFTER_MS,
        xread_block=200,
    )


if os.environ.get(DATABASE_URL_ENV):  # in the worker processes the test starts
    STREAM = os.environ[STREAM_ENV]
    REDIS_URL = os.environ[REDIS_URL_ENV]
    broker = make_broker(REDIS_URL, STREAM)
    _engine = create_async_engine(os.environ[DATABASE_URL_ENV])
    scheduler_app = SchedulerApp(
        broker=broker,
        session_factory=async_sessionmaker(_engine, expire_on_commit=False),
        config=CONFIG,
    )
    _redis: dict[str, Redis] = {}
    _CONTEXT: Any = TaskiqDepends()

    async def _log(context: Context, event: str, name: str | None = None) -> None:
        client = _redis.get("client")
        if client is None:
            client = _redis["client"] = Redis.from_url(REDIS_URL)
        record = {
            "task_id": context.message.task_id,
            "task": context.message.task_name,
            "pid": os.getpid(),
            "event": event,
        }
        if name is not None:
            record["name"] = name
        await client.rpush(executed_key(STREAM), json.dumps(record))

    @broker.task(task_name="lifecycle.ok")
    async def ok(n: int, context: Context = _CONTEXT) -> int:
        await _log(context, "start")
        await _log(context, "end")
        return n

    @broker.task(task_name="lifecycle.fail")
    async def fail(n: int, context: Context = _CONTEXT) -> None:
        await _log(context, "start")
        raise ValueError(f"bad input {n}")

    @broker.task(task_name="lifecycle.slow")
    async def slow(seconds: float, first_only: bool = False, context: Context = _CONTEXT) -> Any:
        """Sleeps ``seconds``; with ``first_only``, only on its first start of a task id."""
        await _log(context, "start")
        client = _redis["client"]
        first = await client.set(f"{STREAM}:slept:{context.message.task_id}", 1, nx=True)
        if first or not first_only:
            await asyncio.sleep(seconds)
        await _log(context, "end")

    @broker.task(task_name="lifecycle.chain_step")
    async def chain_step(name: str, hang_once: bool = False, context: Context = _CONTEXT) -> str:
        """A chain's step ``name``; with ``hang_once``, its first execution sleeps a minute."""
        await _log(context, "start", name)
        client = _redis["client"]
        if hang_once and await client.set(f"{STREAM}:hung:{name}", 1, nx=True):
            await asyncio.sleep(60)
        await _log(context, "end", name)
        return name
