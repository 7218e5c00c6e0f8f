"""Exceptions raised by taskiq-beat.

The hierarchy::

    TaskiqBeatError
    ├── JobNotFoundError (LookupError)        no job with the given id
    ├── InvalidJobError (ValueError)          bad input to a builder or a management call
    │   ├── InvalidTriggerError               a trigger that cannot be built or can never fire
    │   ├── UnknownTaskError                  a task name the broker does not know
    │   └── JobExistsError                    the job id (or that fire) is taken already
    ├── CorruptJobError (ValueError)          a stored row the scheduler cannot read back
    ├── InvalidConfigError (ValueError)       a bad setting in the environment or keywords
    └── ChainAbortedError (RuntimeError)      a chain gave up after its retry budget

Every message names the offending field or id and its value.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChainAbortedError",
    "ChainStepFailedError",
    "CorruptJobError",
    "InvalidConfigError",
    "InvalidJobError",
    "InvalidTriggerError",
    "JobExistsError",
    "JobNotFoundError",
    "TaskiqBeatError",
    "UnknownTaskError",
]

_MAX_VALUE_REPR = 200


def describe_value(value: Any) -> str:
    """Return a short ``repr`` of ``value`` for an error message."""
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


class TaskiqBeatError(Exception):
    """Base class of every exception taskiq-beat raises on purpose."""


class JobNotFoundError(TaskiqBeatError, LookupError):
    """No scheduler job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"scheduler job not found: job_id={job_id!r}")
        self.job_id = job_id


class InvalidJobError(TaskiqBeatError, ValueError):
    """A builder or management call got a value it cannot store.

    ``field`` names the argument and ``value`` holds what was given.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        super().__init__(f"invalid {field}={describe_value(value)}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class InvalidTriggerError(InvalidJobError):
    """A trigger was given an impossible or malformed specification."""


class UnknownTaskError(InvalidJobError):
    """The broker has no task registered under the given name."""

    def __init__(self, task_name: str, field: str = "task") -> None:
        super().__init__(field, task_name, "no task with this name is registered on the broker")
        self.task_name = task_name


class JobExistsError(InvalidJobError):
    """A new job or fire would take an id that exists (``.schedule()`` with a used ``job_id``)."""


class CorruptJobError(TaskiqBeatError, ValueError):
    """A stored job row cannot be read back (hand-edited or from an unknown version)."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"scheduler job {job_id!r} cannot be loaded: {reason}")
        self.job_id = job_id
        self.reason = reason


class ChainAbortedError(TaskiqBeatError, RuntimeError):
    """A chain stopped because a step failed after all its attempts.

    ``step`` (its position, from 0), ``task_name`` and ``error`` (the step's last error) say
    which step and why, where known; ``run_id`` is the chain's run (durable chains).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        task_name: str | None = None,
        error: str | None = None,
        run_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.task_name = task_name
        self.error = error
        self.run_id = run_id

    def __reduce__(self) -> Any:
        # Result backends pickle it: keep the details (BaseException keeps ``args`` only).
        return (
            _chain_aborted,
            (str(self), self.step, self.task_name, self.error, self.run_id),
        )


def _chain_aborted(
    message: str, step: int | None, task_name: str | None, error: str | None, run_id: int | None
) -> ChainAbortedError:
    return ChainAbortedError(message, step=step, task_name=task_name, error=error, run_id=run_id)


class InvalidConfigError(TaskiqBeatError, ValueError):
    """``SchedulerConfig.from_env()`` got a value it cannot use.

    ``field`` names the environment variable (``TASKIQ_BEAT_SYNC_INTERVAL_SECONDS``) or the
    keyword it came from, and ``value`` holds what was given.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        super().__init__(f"invalid {field}={describe_value(value)}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


ChainStepFailedError = ChainAbortedError
"""taskiq-beat 1.4's error for a chain step that used all its attempts. Here a failed step
ends (or restarts) its chain and the orchestrator raises :class:`ChainAbortedError`, whose
message names the step; ``except ChainStepFailedError`` catches it."""
