"""The worker side of ``scripts/bench_lifecycle.py``: imported by ``taskiq worker``.

    taskiq worker scripts.bench_support.lifecycle_worker:broker --workers 1 \\
        --max-async-tasks 100

Built at import from the environment the benchmark sets (:data:`DATABASE_URL_ENV`,
:data:`REDIS_URL_ENV`, :data:`STREAM_ENV`, :data:`JOBS_ENV`, :data:`LIFECYCLE_ENV`): a
``RedisStreamBroker`` on the stream, the task :data:`TASK_NAME`, and a ``SchedulerApp`` on
the database whose construction adds ``RunLifecycleMiddleware`` to the broker when
``LIFECYCLE_ENV`` is ``1`` (``SchedulerConfig(record_lifecycle=True)``), and does not when it
is ``0``. Nothing else differs between the two modes.

The task does one Redis ``INCR`` of :func:`counter_key` (the same in both modes); the
execution that makes it ``1`` and the one that makes it ``N`` (the jobs sent) also store
their wall-clock time under :func:`first_key` / :func:`last_key`: two more calls in a run,
so that the benchmark times the worker from its first execution to its last.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from taskiq_redis import RedisStreamBroker

from taskiq_beat import SchedulerApp, SchedulerConfig

DATABASE_URL_ENV = "BENCH_LIFECYCLE_DATABASE_URL"
REDIS_URL_ENV = "BENCH_LIFECYCLE_REDIS_URL"
STREAM_ENV = "BENCH_LIFECYCLE_STREAM"
JOBS_ENV = "BENCH_LIFECYCLE_JOBS"
LIFECYCLE_ENV = "BENCH_LIFECYCLE_RECORD"
COUNT_ENV = "BENCH_LIFECYCLE_COUNT_STATEMENTS"
"""``1``: count the store's ``start_runs`` / ``finish_runs`` calls and their rows in the Redis
hash :func:`calls_key` (four ``HINCRBY`` per call, in a pipeline)."""
TASK_NAME = "bench.lifecycle_noop"


def counter_key(stream: str) -> str:
    return f"{stream}:executed"


def first_key(stream: str) -> str:
    return f"{stream}:first"


def last_key(stream: str) -> str:
    return f"{stream}:last"


def calls_key(stream: str) -> str:
    return f"{stream}:store_calls"


def make_broker(redis_url: str, stream: str) -> RedisStreamBroker:
    """The stream broker of both sides (taskiq-redis defaults otherwise)."""
    return RedisStreamBroker(
        redis_url,
        queue_name=stream,
        consumer_group_name=f"{stream}:workers",
        xread_block=200,
    )


def make_config(record_lifecycle: bool) -> SchedulerConfig:
    """The package's defaults (``lifecycle_flush_seconds=0.1``), lifecycle on or off."""
    return SchedulerConfig(record_runs=True, record_lifecycle=record_lifecycle)


if os.environ.get(DATABASE_URL_ENV):  # in the worker process the benchmark starts
    STREAM = os.environ[STREAM_ENV]
    REDIS_URL = os.environ[REDIS_URL_ENV]
    JOBS = int(os.environ[JOBS_ENV])
    RECORD = os.environ.get(LIFECYCLE_ENV, "1") == "1"
    _clients: dict[str, Redis] = {}

    def _redis() -> Redis:
        client = _clients.get("redis")
        if client is None:
            client = _clients["redis"] = Redis.from_url(REDIS_URL)
        return client

    if os.environ.get(COUNT_ENV) == "1":
        from taskiq_beat.store import SchedulerStore

        def _counted(name: str) -> None:
            original = getattr(SchedulerStore, name)

            async def counted(self: Any, items: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return await original(self, items, *args, **kwargs)
                finally:
                    took = time.perf_counter() - began
                    pipe = _redis().pipeline(transaction=False)
                    pipe.hincrby(calls_key(STREAM), f"{name}:calls", 1)
                    pipe.hincrby(calls_key(STREAM), f"{name}:rows", len(items))
                    pipe.hincrbyfloat(calls_key(STREAM), f"{name}:seconds", took)
                    await pipe.execute()

            setattr(SchedulerStore, name, counted)

        _counted("start_runs")
        _counted("finish_runs")
    broker = make_broker(REDIS_URL, STREAM)
    _engine = create_async_engine(os.environ[DATABASE_URL_ENV])
    scheduler_app = SchedulerApp(
        broker=broker,
        session_factory=async_sessionmaker(_engine, expire_on_commit=False),
        config=make_config(RECORD),
    )

    @broker.task(task_name=TASK_NAME)
    async def noop(index: int) -> None:
        """One ``INCR``; the first and the N-th also note the time."""
        client = _redis()
        count = await client.incr(counter_key(STREAM))
        if count == 1:
            await client.set(first_key(STREAM), repr(time.time()))
        if count == JOBS:
            await client.set(last_key(STREAM), repr(time.time()))
