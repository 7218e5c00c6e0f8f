"""The scheduler app the reliability tests run as real ``taskiq-beat run`` processes.

Configured entirely from the environment :class:`tests.reliability.harness.Cluster` sets:

- ``RELIABILITY_DATABASE_URL``: the scheduler's database (SQLite file or PostgreSQL, possibly
  through a fault proxy);
- ``RELIABILITY_REDIS_URL`` and ``RELIABILITY_QUEUE``: the Redis list the broker pushes every
  message to (possibly through a fault proxy). No worker consumes it while a test runs its
  schedulers: the list *is* the record of what the broker received, which the tests read;
  afterwards a test may start ``taskiq worker tests.reliability.app:broker`` to execute the
  messages and count the executions (``names.executed_key``);
- ``RELIABILITY_CONFIG``: ``SchedulerConfig`` fields as a JSON object;
- ``RELIABILITY_SEND_DELAY``: seconds each send waits before reaching Redis (a broker
  middleware), to make batches slow enough to interrupt.

Run with ``taskiq-beat run tests.reliability.app:scheduler_app``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq import Context, TaskiqDepends, TaskiqMessage, TaskiqMiddleware
from taskiq_redis import ListQueueBroker

from taskiq_beat import SchedulerApp, SchedulerConfig
from tests.reliability import names


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: this module is configured by the tests")
    return value


class SlowSends(TaskiqMiddleware):
    """Delays every message on its way to the broker."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        await asyncio.sleep(self.seconds)
        return message


broker = ListQueueBroker(
    _env(names.REDIS_URL_ENV),
    queue_name=_env(names.QUEUE_ENV),
    socket_timeout=names.REDIS_SOCKET_TIMEOUT,
    socket_connect_timeout=names.REDIS_SOCKET_TIMEOUT,
)
send_delay = float(os.environ.get(names.SEND_DELAY_ENV) or 0)
if send_delay:
    broker.add_middlewares(SlowSends(send_delay))


_redis: list[Redis] = []


@broker.task(task_name=names.TASK)
async def tick(
    *args: Any,
    context: Context = TaskiqDepends(),  # noqa: B008 - Taskiq's dependency injection
    **kwargs: Any,
) -> None:
    """Executed only by the workers a test starts once it has read the messages from the
    queue: appends the task id to the list ``names.executed_key(queue)``."""
    if not _redis:  # up to 200 executions at once share 16 connections
        pool = BlockingConnectionPool.from_url(_env(names.REDIS_URL_ENV), max_connections=16)
        _redis.append(Redis(connection_pool=pool))
    await _redis[0].rpush(names.executed_key(_env(names.QUEUE_ENV)), context.message.task_id)


engine = create_async_engine(_env(names.DATABASE_URL_ENV), pool_pre_ping=True)
scheduler_app = SchedulerApp(
    broker=broker,
    session_factory=async_sessionmaker(engine, expire_on_commit=False),
    config=SchedulerConfig(**json.loads(os.environ.get(names.CONFIG_ENV) or "{}")),
)
