"""Test helpers shared by the suite: a controllable clock and a recording broker."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

from taskiq import InMemoryBroker
from taskiq.message import BrokerMessage, TaskiqMessage

UTC = timezone.utc


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        self.current += timedelta(seconds=seconds, **delta)
        return self.current

    def set(self, when: datetime) -> None:
        self.current = when


class RecordingBroker(InMemoryBroker):
    """Taskiq's in-memory broker that also keeps every message it was asked to send.

    ``fail_sends`` makes ``kick`` raise, as a broker that is down would.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[TaskiqMessage] = []
        self.fail_sends = False
        self._sent_changed = asyncio.Event()

    async def kick(self, message: BrokerMessage) -> None:
        if self.fail_sends:
            raise ConnectionError("broker unreachable (test)")
        self.sent.append(self.formatter.loads(message.message))
        self._sent_changed.set()
        await super().kick(message)

    async def wait_sent(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` messages were sent (at most ``timeout`` seconds)."""

        async def enough() -> None:
            while len(self.sent) < count:
                self._sent_changed.clear()
                await self._sent_changed.wait()

        await asyncio.wait_for(enough(), timeout)

    def sent_for(self, job_id: str) -> list[TaskiqMessage]:
        return [m for m in self.sent if m.labels.get("taskiq_beat_job_id") == job_id]
