"""The enumerations stored in the scheduler tables."""

from __future__ import annotations

import enum

__all__ = ["JobKind", "JobStrategy", "RunStatus"]


class JobKind(str, enum.Enum):
    """What a job sends when it fires."""

    SINGLE = "single"
    """One Taskiq task."""
    CHAIN = "chain"
    """The chain orchestrator, which runs the job's steps in order on a worker."""


class JobStrategy(str, enum.Enum):
    """Which kind of trigger drives a job."""

    IMMEDIATE = "immediate"
    ONE_OFF = "one_off"
    INTERVAL = "interval"
    CRONTAB = "crontab"


class RunStatus(str, enum.Enum):
    """Where one fire of a job stands.

    ``CLAIMED``: a scheduler owns the fire and is about to send it; if that scheduler dies,
    the fire is sent again (with the same task id) once ``next_attempt_at`` passes.
    ``DISPATCHED``: ``kiq`` succeeded. ``FAILED``: ``kiq`` failed; when ``next_attempt_at``
    is set the fire is retried then, otherwise the failure is final.
    """

    CLAIMED = "claimed"
    DISPATCHED = "dispatched"
    FAILED = "failed"
