"""One fire sent as Taskiq's ``kiq`` sends it, with what every fire of a job shares worked
out once instead of per fire.

``task.kicker().with_task_id(task_id).with_labels(**labels).kiq(*args, **kwargs)`` makes
a kicker, copies the task's labels into it, turns each label into its text and type
(``prepare_label``), validates a ``TaskiqMessage``, runs the broker's ``pre_send``
middlewares, ``broker.kick(broker.formatter.dumps(message))`` and the ``post_send``
middlewares, and returns a task handle the scheduler does not use. For 10,000 fires a
second that is a third of the scheduler's work, and most of it is the same for every fire
of a job: only the task id, the arguments and the three labels the scheduler sets per fire
(:data:`~taskiq_beat.dispatch.JOB_ID_LABEL`, ``..._SCHEDULED_FOR``, ``..._RUN_ID``) differ.

So the labels of a job's fires come from a :class:`_Template`, made once per task and
stored metadata text by Taskiq's own kicker (its ``_prepare_message``, so each label is
turned into text as this version of Taskiq does it), and each fire's message is the
template's labels with the three set, validated as ``TaskiqMessage`` like any other.
Middlewares and the formatter see each message as ``kiq`` would hand it to them (a test
compares both, message by message). Where Taskiq's kicker is not the one this module was
written against (a task class with a kicker of its own, a patched ``AsyncKicker``), each
fire goes through ``kiq`` itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from taskiq import AsyncTaskiqDecoratedTask, TaskiqMessage, TaskiqMiddleware
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.kicker import logger as _TASKIQ_LOGGER  # where kiq writes its debug line
from taskiq.utils import maybe_awaitable

from taskiq_beat.models import decode_json

if TYPE_CHECKING:
    from taskiq import AsyncBroker

__all__ = ["JOB_ID_LABEL", "RUN_ID_LABEL", "SCHEDULED_FOR_LABEL", "Batch", "Sending", "stock"]

JOB_ID_LABEL = "taskiq_beat_job_id"
"""Label carrying the scheduler job id on every message the scheduler sends."""
SCHEDULED_FOR_LABEL = "taskiq_beat_scheduled_for"
"""Label carrying the fire's scheduled time (ISO 8601, UTC) on every message."""
RUN_ID_LABEL = "taskiq_beat_run_id"
"""Label carrying the id of the fire's ``scheduler_run`` row: the worker writes onto it."""

_TEMPLATES_KEPT = 1024  # distinct (task, metadata) pairs; beyond, the cache starts afresh

# What the templates stand for: the kicker of taskiq's decorated tasks, and its kiq.
_STOCK_KICKER = AsyncTaskiqDecoratedTask.kicker
_STOCK_KIQ = AsyncKicker.kiq
_STOCK_PREPARE = AsyncKicker._prepare_message


def stock(task: AsyncTaskiqDecoratedTask[Any, Any]) -> bool:
    """Whether ``task.kicker().kiq()`` is the one the templates stand for."""
    return (
        type(task).kicker is _STOCK_KICKER
        and AsyncKicker.kiq is _STOCK_KIQ
        and AsyncKicker._prepare_message is _STOCK_PREPARE
    )


class _Template:
    """What every fire of one task with one stored metadata text shares: the labels as
    Taskiq turns them into a message's (with placeholders for the three set per fire)."""

    __slots__ = ("labels", "run_id_as_text", "task", "task_name", "types")

    def __init__(self, task: AsyncTaskiqDecoratedTask[Any, Any], metadata: dict[str, Any]):
        labels = dict(metadata)
        labels[JOB_ID_LABEL] = ""
        labels[SCHEDULED_FOR_LABEL] = ""
        labels[RUN_ID_LABEL] = 0
        message = task.kicker().with_labels(**labels)._prepare_message()
        self.task = task
        self.task_name = message.task_name
        self.labels = message.labels
        self.types = message.labels_types
        # Taskiq sends label values as text (0.11 and later); kept as it comes, whatever
        # this version does with an integer.
        self.run_id_as_text = isinstance(message.labels.get(RUN_ID_LABEL), str)


class Sending:
    """The templates of the fires sent so far (see the module's docstring)."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, str], _Template] = {}

    def template(self, task: AsyncTaskiqDecoratedTask[Any, Any], metadata: str) -> _Template | None:
        """The template of ``task``'s fires with this stored metadata text (``None`` where
        the task's kicker is not Taskiq's own: send with ``kiq``); ``ValueError`` if the text
        is not a JSON object."""
        if not stock(task):
            return None
        key = (task.task_name, metadata)
        template = self._templates.get(key)
        if template is not None and template.task is task:
            return template
        decoded = decode_json(metadata)
        if not isinstance(decoded, dict):
            raise ValueError(f"stored metadata is not a JSON object: {decoded!r:.200}")
        if len(self._templates) >= _TEMPLATES_KEPT:
            self._templates.clear()
        template = self._templates[key] = _Template(task, decoded)
        return template

    def batch(self) -> Batch:
        """What the sends of one batch share: the brokers' middlewares as they are now."""
        return Batch()


class Batch:
    """The sends of one batch: each broker's ``pre_send`` and ``post_send`` middlewares, in
    the order ``kiq`` calls them, looked up once per batch instead of once per fire."""

    __slots__ = ("_middlewares",)

    def __init__(self) -> None:
        self._middlewares: dict[int, tuple[list[TaskiqMiddleware], list[TaskiqMiddleware]]] = {}

    def _of(self, broker: AsyncBroker) -> tuple[list[TaskiqMiddleware], list[TaskiqMiddleware]]:
        found = self._middlewares.get(id(broker))
        if found is None:
            middlewares = broker.middlewares
            pre = [m for m in middlewares if m.__class__.pre_send != TaskiqMiddleware.pre_send]
            post = [
                m
                for m in reversed(middlewares)
                if m.__class__.post_send != TaskiqMiddleware.post_send
            ]
            found = self._middlewares[id(broker)] = (pre, post)
        return found

    async def kiq(
        self,
        template: _Template,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        job_id: str,
        scheduled_for: str,
        run_id: int,
    ) -> None:
        """Send one fire: the message ``kiq`` would make, through the middlewares and the
        formatter as ``kiq`` passes it; a failed ``kick`` raises ``SendTaskError`` from its
        error, as ``kiq`` does."""
        task = template.task
        if _TASKIQ_LOGGER.isEnabledFor(logging.DEBUG):
            _TASKIQ_LOGGER.debug(
                "Kicking %s with args=%s and kwargs=%s.", template.task_name, args, kwargs
            )
        labels = template.labels.copy()
        labels[JOB_ID_LABEL] = job_id
        labels[SCHEDULED_FOR_LABEL] = scheduled_for
        labels[RUN_ID_LABEL] = str(run_id) if template.run_id_as_text else run_id
        types = template.types
        message = TaskiqMessage(
            task_id=task_id,
            task_name=template.task_name,
            labels=labels,
            labels_types=None if types is None else types.copy(),
            args=args,
            kwargs=kwargs,
        )
        broker = task.broker
        pre, post = self._of(broker)
        for middleware in pre:
            message = await maybe_awaitable(middleware.pre_send(message))
        try:
            await broker.kick(broker.formatter.dumps(message))
        except Exception as exc:
            raise SendTaskError from exc
        for middleware in post:
            await maybe_awaitable(middleware.post_send(message))
