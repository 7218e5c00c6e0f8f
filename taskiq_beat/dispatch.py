"""Sending claimed fires to the broker with ``kiq``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import uuid
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from taskiq_beat.models import decode_json
from taskiq_beat.sending import JOB_ID_LABEL, RUN_ID_LABEL, SCHEDULED_FOR_LABEL, Batch, Sending
from taskiq_beat.store import RELEASED, SENT, Fire, SendOutcome

if TYPE_CHECKING:
    from taskiq import AsyncBroker

__all__ = ["JOB_ID_LABEL", "RUN_ID_LABEL", "SCHEDULED_FOR_LABEL", "Dispatcher", "fire_task_id"]

logger = logging.getLogger(__name__)

_LOOP_TURN_EVERY = 0.005  # seconds a batch's senders send before they let the event loop run
_TASK_ID_NAMESPACE = uuid.UUID("6f1c3b7e-2a44-4d0e-9a55-3c1f0e8b7d21")


def fire_task_id(job_id: str, scheduled_for: datetime) -> str:
    """The Taskiq task id of one fire: the same for every attempt to send that fire."""
    return task_id_of(job_id, scheduled_for.isoformat())


_NAMESPACE_BYTES = _TASK_ID_NAMESPACE.bytes


def task_id_of(job_id: str, scheduled_for_iso: str) -> str:
    """:func:`fire_task_id` given the fire time's ``isoformat()`` (computed once per batch).

    The same value as ``uuid.uuid5(namespace, f"{job_id}\\x00{iso}").hex``, without building
    ``UUID`` objects: SHA-1 of namespace and name, with the version and variant bits set.
    """
    name = f"{job_id}\x00{scheduled_for_iso}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


class Dispatcher:
    """Sends fires with ``kiq``, ``concurrency`` at a time, each bounded by ``timeout`` seconds."""

    def __init__(self, broker: AsyncBroker, *, concurrency: int, timeout: float) -> None:
        self._broker = broker
        self._concurrency = concurrency
        self._timeout = timeout
        timed_out = f"kiq timed out after {timeout:g} s"
        self._timed_out = SendOutcome(error=timed_out)
        self._stalled = SendOutcome(error=f"not sent: {timed_out} (another send of the batch)")
        self._halted = False
        self._sending = Sending()

    def halt(self) -> None:
        """Start no new sends: fires not yet started come back as ``released``."""
        self._halted = True

    def resume(self) -> None:
        """Send again after :meth:`halt` (a scheduler started anew)."""
        self._halted = False

    async def send(self, fires: Sequence[Fire]) -> list[SendOutcome]:
        """Send ``fires``; return one outcome per fire, in order (:data:`SENT` for each fire
        sent: no object per fire).

        A fixed pool of ``concurrency`` senders takes fires from one queue: no task, lock or
        timer is created per fire beyond the ``kiq`` itself (each sender bounds its sends with
        one re-armed timer, see :class:`_Deadline`).

        Once a ``kiq`` of the batch times out, the fires not started yet fail at once with
        the same error instead of waiting out a timeout each: a broker that hangs holds the
        batch for one timeout, not one per ``concurrency`` fires. (Failures other than
        timeouts do not stop the batch: they may belong to one message alone.)
        """
        outcomes: list[SendOutcome | None] = [None] * len(fires)
        queue = iter(enumerate(fires))
        times: dict[datetime, str] = {}  # ISO text of each scheduled time, once per batch
        stalled = False

        loop = asyncio.get_running_loop()
        turn = _SharedTurn(loop)
        batch = self._sending.batch()

        async def sender() -> None:
            nonlocal stalled
            deadline = _Deadline(self._timeout) if _LAZY_DEADLINES else None
            try:
                for index, fire in queue:
                    if stalled:
                        outcomes[index] = self._stalled
                        continue
                    outcomes[index] = outcome = await self._send_one(fire, deadline, times, batch)
                    if outcome is self._timed_out:
                        stalled = True
                    if loop.time() >= turn.ends_at:
                        await turn.pause()
            finally:
                if deadline is not None:
                    deadline.close()

        senders = min(self._concurrency, len(fires))
        if senders == 1:
            await sender()
        elif senders > 1:
            await asyncio.gather(*(sender() for _ in range(senders)))
        return [RELEASED if outcome is None else outcome for outcome in outcomes]

    async def _send_one(
        self, fire: Fire, deadline: _Deadline | None, times: dict[datetime, str], batch: Batch
    ) -> SendOutcome:
        if self._halted:
            return RELEASED
        task = self._broker.find_task(fire.task_name)
        if task is None:
            return SendOutcome(
                error=f"task {fire.task_name!r} is not registered on the broker",
                final=True,
            )
        try:
            args, kwargs = _arguments(fire)
            template = self._sending.template(task, fire.metadata)
            labels = None if template is not None else _labels(fire, times)
        except ValueError as exc:
            return SendOutcome(error=str(exc), final=True)
        sending: Coroutine[Any, Any, Any]
        if template is None:
            assert labels is not None
            kicker = task.kicker().with_task_id(fire.task_id).with_labels(**labels)
            sending = kicker.kiq(*args, **kwargs)
        else:
            scheduled_for = times.get(fire.scheduled_for)
            if scheduled_for is None:
                scheduled_for = times[fire.scheduled_for] = fire.scheduled_for.isoformat()
            sending = batch.kiq(
                template, fire.task_id, args, kwargs, fire.job_id, scheduled_for, fire.run_id
            )
        if deadline is None:  # pragma: no cover - Python 3.10
            try:
                await asyncio.wait_for(sending, self._timeout)
            except asyncio.TimeoutError:
                return self._timed_out
            except Exception as exc:
                return self._failed(fire, exc)
            return SENT
        deadline.start()
        try:
            await sending
        except asyncio.CancelledError:
            if deadline.stop():
                return self._timed_out
            raise
        except Exception as exc:
            deadline.stop()
            return self._failed(fire, exc)
        deadline.stop()
        return SENT

    @staticmethod
    def _failed(fire: Fire, exc: Exception) -> SendOutcome:
        logger.debug("kiq of job %s failed", fire.job_id, exc_info=exc)
        return SendOutcome(error=describe_error(exc))


if sys.version_info >= (3, 11):
    _LAZY_DEADLINES = True

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return task.cancelling()

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return task.uncancel()

else:  # pragma: no cover - Python 3.10 has no Task.cancelling()/uncancel(): wait_for per kiq
    _LAZY_DEADLINES = False

    def _cancelling(task: asyncio.Task[Any]) -> int:
        raise NotImplementedError

    _uncancel = _cancelling


class _SharedTurn:
    """The senders of one batch share turns of the event loop ``_LOOP_TURN_EVERY`` long.

    A ``kiq`` that never waits (a broker that only queues in memory) would hold the loop for
    the whole batch, so claims and records under way could not take a step until it ends.
    Once a turn is used up, each sender yields after its current ``kiq``; the turn renews
    when the loop next runs. (A turn per sender would let each of ``concurrency`` senders
    run a whole turn in one pass of the loop: 32 x 5 ms between two steps of a claim.)
    """

    __slots__ = ("_loop", "_renewing", "ends_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._renewing = False
        self.ends_at = loop.time() + _LOOP_TURN_EVERY

    async def pause(self) -> None:
        """Yield to the event loop; the first sender to yield schedules the next turn,
        ahead of its own resumption."""
        if not self._renewing:
            self._renewing = True
            self._loop.call_soon(self._renew)
        await asyncio.sleep(0)

    def _renew(self) -> None:
        self._renewing = False
        self.ends_at = self._loop.time() + _LOOP_TURN_EVERY


class _Deadline:
    """Bounds each ``kiq`` of one sender (one task) to ``timeout`` seconds, as
    ``asyncio.timeout`` would, with one timer for all of them instead of one per ``kiq``.

    The timer is armed at the first send's deadline; when it fires while a later send is in
    flight it re-arms itself at that send's deadline, and only cancels the task when the send
    in flight has reached its own. Sends that end in time cost no timer operation at all.
    """

    __slots__ = (
        "_armed_for",
        "_cancelling",
        "_deadline",
        "_fired",
        "_loop",
        "_task",
        "_timeout",
        "_timer",
    )

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "senders run in a task"
        self._task = task
        self._timeout = timeout
        self._deadline: float | None = None  # of the send in flight
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._cancelling = 0
        self._fired = False

    def start(self) -> None:
        """A send begins: it must end within ``timeout`` seconds."""
        deadline = self._deadline = self._loop.time() + self._timeout
        self._cancelling = _cancelling(self._task)
        if self._timer is None:
            self._armed_for = deadline
            self._timer = self._loop.call_at(deadline, self._check)

    def stop(self) -> bool:
        """The send ended. Return whether its deadline cancelled it (and nothing else did:
        a cancellation from outside must propagate)."""
        self._deadline = None
        if not self._fired:
            return False
        self._fired = False
        return _uncancel(self._task) <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # no send in flight: the next one arms the timer again
        if deadline > self._armed_for:  # a later send: wait until its own deadline
            self._armed_for = deadline
            self._timer = self._loop.call_at(deadline, self._check)
            return
        self._fired = True
        self._task.cancel()


def describe_error(exc: BaseException) -> str:
    """``Type: message``, followed by the cause Taskiq wraps in ``SendTaskError``."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def _arguments(fire: Fire) -> tuple[list[Any], dict[str, Any]]:
    args, kwargs = decode_json(fire.args), decode_json(fire.kwargs)
    if not isinstance(args, list):
        raise ValueError(f"stored args are not a JSON list: {args!r:.200}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"stored kwargs are not a JSON object: {kwargs!r:.200}")
    return args, kwargs


def _labels(fire: Fire, times: dict[datetime, str]) -> dict[str, Any]:
    """The labels of a fire sent with ``kiq`` itself (a task whose kicker is its own)."""
    metadata = decode_json(fire.metadata)
    if not isinstance(metadata, dict):
        raise ValueError(f"stored metadata is not a JSON object: {metadata!r:.200}")
    labels = dict(metadata)
    labels[JOB_ID_LABEL] = fire.job_id
    scheduled_for = times.get(fire.scheduled_for)
    if scheduled_for is None:
        scheduled_for = times[fire.scheduled_for] = fire.scheduled_for.isoformat()
    labels[SCHEDULED_FOR_LABEL] = scheduled_for
    labels[RUN_ID_LABEL] = fire.run_id
    return labels
