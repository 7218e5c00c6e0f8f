"""Sending claimed fires to the broker with ``kiq``."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from taskiq_beat.store import Fire, SendOutcome

if TYPE_CHECKING:
    from taskiq import AsyncBroker

__all__ = ["JOB_ID_LABEL", "SCHEDULED_FOR_LABEL", "Dispatcher", "fire_task_id"]

logger = logging.getLogger(__name__)

_TASK_ID_NAMESPACE = uuid.UUID("6f1c3b7e-2a44-4d0e-9a55-3c1f0e8b7d21")
JOB_ID_LABEL = "taskiq_beat_job_id"
"""Label carrying the scheduler job id on every message the scheduler sends."""
SCHEDULED_FOR_LABEL = "taskiq_beat_scheduled_for"
"""Label carrying the fire's scheduled time (ISO 8601, UTC) on every message."""


def fire_task_id(job_id: str, scheduled_for: datetime) -> str:
    """The Taskiq task id of one fire: the same for every attempt to send that fire."""
    return uuid.uuid5(_TASK_ID_NAMESPACE, f"{job_id}\x00{scheduled_for.isoformat()}").hex


class Dispatcher:
    """Sends fires with ``kiq``, ``concurrency`` at a time, each bounded by ``timeout`` seconds."""

    def __init__(self, broker: AsyncBroker, *, concurrency: int, timeout: float) -> None:
        self._broker = broker
        self._concurrency = concurrency
        self._timeout = timeout
        self._timed_out = f"kiq timed out after {timeout:g} s"
        self._halted = False

    def halt(self) -> None:
        """Start no new sends: fires not yet started come back as ``released``."""
        self._halted = True

    def resume(self) -> None:
        """Send again after :meth:`halt` (a scheduler started anew)."""
        self._halted = False

    async def send(self, fires: Sequence[Fire]) -> list[SendOutcome]:
        """Send ``fires``; return one outcome per fire, in order.

        A fixed pool of ``concurrency`` senders takes fires from one queue: no task, lock or
        timer is created per fire beyond the ``kiq`` itself.

        Once a ``kiq`` of the batch times out, the fires not started yet fail at once with
        the same error instead of waiting out a timeout each: a broker that hangs holds the
        batch for one timeout, not one per ``concurrency`` fires. (Failures other than
        timeouts do not stop the batch: they may belong to one message alone.)
        """
        outcomes: list[SendOutcome] = [SendOutcome(fire, released=True) for fire in fires]
        queue = iter(enumerate(fires))
        stalled: list[str] = []

        async def sender() -> None:
            for index, fire in queue:
                if stalled:
                    outcomes[index] = SendOutcome(fire, error=f"not sent: {stalled[0]}")
                    continue
                outcomes[index] = outcome = await self._send_one(fire)
                if outcome.error == self._timed_out:
                    stalled.append(f"{outcome.error} (another send of the batch)")

        senders = min(self._concurrency, len(fires))
        if senders == 1:
            await sender()
        elif senders > 1:
            await asyncio.gather(*(sender() for _ in range(senders)))
        return outcomes

    async def _send_one(self, fire: Fire) -> SendOutcome:
        if self._halted:
            return SendOutcome(fire, released=True)
        task = self._broker.find_task(fire.task_name)
        if task is None:
            return SendOutcome(
                fire,
                error=f"task {fire.task_name!r} is not registered on the broker",
                final=True,
            )
        try:
            args, kwargs, labels = _payload(fire)
        except ValueError as exc:
            return SendOutcome(fire, error=str(exc), final=True)
        kicker = task.kicker().with_task_id(fire.task_id).with_labels(**labels)
        try:
            await _within(self._timeout, kicker.kiq(*args, **kwargs))
        except asyncio.TimeoutError:
            return SendOutcome(fire, error=self._timed_out)
        except Exception as exc:
            logger.debug("kiq of job %s failed", fire.job_id, exc_info=True)
            return SendOutcome(fire, error=describe_error(exc))
        return SendOutcome(fire)


if sys.version_info >= (3, 11):

    async def _within(seconds: float, awaitable: Awaitable[Any]) -> None:
        async with asyncio.timeout(seconds):
            await awaitable

else:  # pragma: no cover - Python 3.10

    async def _within(seconds: float, awaitable: Awaitable[Any]) -> None:
        await asyncio.wait_for(awaitable, seconds)


def describe_error(exc: BaseException) -> str:
    """``Type: message``, followed by the cause Taskiq wraps in ``SendTaskError``."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def _payload(fire: Fire) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    args, kwargs, metadata = fire.args, fire.kwargs, fire.metadata
    if not isinstance(args, list):
        raise ValueError(f"stored args are not a JSON list: {args!r:.200}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"stored kwargs are not a JSON object: {kwargs!r:.200}")
    if not isinstance(metadata, dict):
        raise ValueError(f"stored metadata is not a JSON object: {metadata!r:.200}")
    labels = dict(metadata)
    labels[JOB_ID_LABEL] = fire.job_id
    labels[SCHEDULED_FOR_LABEL] = fire.scheduled_for.isoformat()
    return args, kwargs, labels
