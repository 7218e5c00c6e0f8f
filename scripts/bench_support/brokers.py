"""The brokers of the benchmark: a no-op broker that notes each send, and InMemoryBroker."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from taskiq import AsyncBroker, InMemoryBroker
from taskiq.message import BrokerMessage

from bench_support.common import TASK_NAME, Goal

NOTED_LABELS = ("taskiq_beat_job_id", "taskiq_beat_scheduled_for", "schedule_id", "bench_tick")
"""The labels the scenarios read back from a send: ours, and those of the TaskiqScheduler runs."""


class NoopBroker(AsyncBroker):
    """A broker whose ``kick`` only notes the send time and the message's labels (those the
    scenarios read: :data:`NOTED_LABELS`).

    With ``keep_messages`` it also keeps the serialized message (to read its kwargs later).
    Nothing is executed: this is the "no-op broker" of the benchmark.
    """

    def __init__(self, *, keep_messages: bool = False) -> None:
        super().__init__()
        self.goal = Goal()
        # (send time, the value of each of NOTED_LABELS): one tuple of strings and numbers,
        # which the cyclic garbage collector stops tracking, where the message's labels dict
        # would be tracked for the whole run (a real broker keeps nothing of what it sent)
        self._kicks: list[tuple[Any, ...]] = []
        self.messages: list[tuple[float, bytes]] = []
        self.keep_messages = keep_messages

    async def kick(self, message: BrokerMessage) -> None:
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

    def forget_kicks(self) -> None:
        self._kicks.clear()

    def sent_kwargs(self) -> list[tuple[float, dict[str, Any]]]:
        """``(send time, kwargs)`` of every kept message."""
        return [(at, self.formatter.loads(raw).kwargs) for at, raw in self.messages]


def make_broker(kind: str, goal: Goal | None = None, *, keep_messages: bool = False) -> Any:
    """A broker with the no-op task ``bench.noop`` registered.

    ``kind`` is ``noop`` (:class:`NoopBroker`) or ``inmemory`` (taskiq's ``InMemoryBroker``,
    which executes the task in this process; each execution counts on ``goal``).
    """
    broker: AsyncBroker
    if kind == "noop":
        broker = NoopBroker(keep_messages=keep_messages)
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
