"""The brokers of the benchmark: a no-op broker that notes each send, and InMemoryBroker."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from taskiq import AsyncBroker, InMemoryBroker
from taskiq.message import BrokerMessage

from bench_support.common import TASK_NAME, Goal, epoch

NOTED_LABELS = ("taskiq_beat_job_id", "taskiq_beat_scheduled_for", "schedule_id", "bench_tick")
"""The labels the scenarios read back from a send: ours, and those of the TaskiqScheduler runs."""


class NoopBroker(AsyncBroker):
    """A broker whose ``kick`` only notes the send time and the message's labels (those the
    scenarios read: :data:`NOTED_LABELS`).

    With ``keep_messages`` it also keeps the serialized message (to read its kwargs later).
    With ``send_cost`` (seconds) each send busy-waits that long: a broker whose client costs
    the scheduler's process CPU. Nothing is executed: this is the "no-op broker" of the
    benchmark.
    """

    def __init__(self, *, keep_messages: bool = False, send_cost: float = 0.0) -> None:
        super().__init__()
        self.goal = Goal()
        self.send_cost = send_cost
        # (send time, the value of each of NOTED_LABELS): one tuple of strings and numbers,
        # which the cyclic garbage collector stops tracking, where the message's labels dict
        # would be tracked for the whole run (a real broker keeps nothing of what it sent)
        self._kicks: list[tuple[Any, ...]] = []
        self.messages: list[tuple[float, bytes]] = []
        self.keep_messages = keep_messages

    async def kick(self, message: BrokerMessage) -> None:
        if self.send_cost:
            until = time.perf_counter() + self.send_cost
            while time.perf_counter() < until:
                pass
        now = self.goal.hit()
        labels = message.labels
        self._kicks.append((now, *[labels.get(name) for name in NOTED_LABELS]))
        if self.keep_messages:
            self.messages.append((now, message.message))

    async def listen(self) -> AsyncGenerator[bytes, None]:
        for _ in ():
            yield b""

    @property
    def kicks(self) -> list[tuple[float, dict[str, Any]]]:
        """``(send time, labels)`` of every send so far."""
        return [
            (
                at,
                {
                    name: value
                    for name, value in zip(NOTED_LABELS, values, strict=True)
                    if value is not None
                },
            )
            for at, *values in self._kicks
        ]

    def write_sends(self, path: str) -> None:
        """Write ``[send time, job id, scheduled time]`` of each of our sends, one JSON line
        each (times in epoch s), for the parent of several schedulers to merge."""
        scheduled: dict[str, float] = {}
        with open(path, "w", encoding="utf-8") as out:
            for at, job, when, *_ in self._kicks:
                if when not in scheduled:
                    scheduled[when] = epoch(when)
                out.write(json.dumps([at, job, scheduled[when]]) + "\n")

    def forget_kicks(self) -> None:
        self._kicks.clear()

    def sent_kwargs(self) -> list[tuple[float, dict[str, Any]]]:
        """``(send time, kwargs)`` of every kept message."""
        return [(at, self.formatter.loads(raw).kwargs) for at, raw in self.messages]


def make_broker(
    kind: str, goal: Goal | None = None, *, keep_messages: bool = False, send_cost: float = 0.0
) -> Any:
    """A broker with the no-op task ``bench.noop`` registered.

    ``kind`` is ``noop`` (:class:`NoopBroker`) or ``inmemory`` (taskiq's ``InMemoryBroker``,
    which executes the task in this process; each execution counts on ``goal``).
    ``send_cost``: see :class:`NoopBroker`.
    """
    broker: AsyncBroker
    if kind == "noop":
        broker = NoopBroker(keep_messages=keep_messages, send_cost=send_cost)
        counter = None
    elif kind == "inmemory":
        broker = InMemoryBroker()
        counter = goal if goal is not None else Goal()
    else:
        raise ValueError(kind)

    @broker.task(task_name=TASK_NAME)
    async def noop(*args: Any, **kwargs: Any) -> None:
        if counter is not None:
            counter.hit()

    return broker
