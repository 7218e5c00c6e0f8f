"""Event callbacks, for users who alert from code, and the counters behind the health snapshot.

Register with :meth:`SchedulerApp.on_event <taskiq_beat.app.SchedulerApp.on_event>`::

    def alert(event: SchedulerEvent) -> None:
        if event.kind is EventKind.RUN_FAILED:
            page_someone(event.job_id, event.error)

    scheduler_app.on_event(EventKind.RUN_FAILED, alert)

A callback may be a function or a coroutine function; it runs on the event loop of the
process where the event happens: fires sent, missed and jobs disabled in the scheduler's,
runs succeeded and failed in the worker's that ran them (it must build the same app, or
register on its own :class:`RunLifecycleMiddleware`'s ``events``). An exception in a callback
is logged and never reaches the scheduler or the task. Nothing is spent on a kind of event
nobody registered for.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from taskiq_beat.exceptions import InvalidJobError

__all__ = ["EventHooks", "EventKind", "EventListener", "SchedulerEvent"]

logger = logging.getLogger(__name__)


class EventKind(str, enum.Enum):
    """What happened."""

    FIRE_SENT = "fire_sent"
    """The scheduler sent a fire to the broker."""
    FIRE_MISSED = "fire_missed"
    """Fires of a job were skipped by the misfire rule (``detail`` says from when)."""
    RUN_SUCCEEDED = "run_succeeded"
    RUN_FAILED = "run_failed"
    """A worker's execution raised (``error``), or its worker was lost."""
    JOB_DISABLED = "job_disabled"
    """The scheduler disabled a job that can never fire (``error`` says why)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerEvent:
    """One event; fields that do not apply to its kind are ``None``."""

    kind: EventKind
    job_id: str
    scheduled_for: datetime | None = None
    task_id: str | None = None
    run_id: int | None = None
    error: str | None = None
    detail: str | None = None


EventListener = Callable[[SchedulerEvent], Awaitable[None] | None]


class EventHooks:
    """The callbacks registered per kind; :meth:`emit` calls them."""

    def __init__(self) -> None:
        self._listeners: dict[EventKind, list[EventListener]] = collections.defaultdict(list)
        self._pending: set[asyncio.Task[None]] = set()

    def register(self, kind: EventKind | str, listener: EventListener) -> None:
        try:
            kind = EventKind(kind)
        except ValueError:
            raise InvalidJobError("kind", kind, "unknown event kind") from None
        if not callable(listener):
            raise InvalidJobError("listener", listener, "expected a callable")
        self._listeners[kind].append(listener)

    def wants(self, kind: EventKind) -> bool:
        """Whether anyone listens to ``kind`` (so that events nobody wants cost nothing)."""
        return bool(self._listeners.get(kind))

    def emit(self, event: SchedulerEvent) -> None:
        for listener in self._listeners.get(event.kind, ()):
            try:
                result: Any = listener(event)
            except Exception:
                logger.exception("event callback %r failed on %s", listener, event.kind.value)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(_guarded(result, listener, event))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)


async def _guarded(result: Awaitable[Any], listener: EventListener, event: SchedulerEvent) -> None:
    try:
        await result
    except Exception:
        logger.exception("event callback %r failed on %s", listener, event.kind.value)
