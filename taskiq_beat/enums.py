"""The enumerations stored in the scheduler tables."""

from __future__ import annotations

import enum

__all__ = ["JobKind", "JobSource", "JobStrategy", "RunStatus", "StepStatus"]


class JobKind(str, enum.Enum):
    """What a job sends when it fires."""

    SINGLE = "single"
    """One Taskiq task."""
    CHAIN = "chain"
    """The chain orchestrator, which runs the job's steps in order on a worker."""


class JobSource(str, enum.Enum):
    """Who owns a job: the API (management calls, builders) or the schedules declared in code."""

    API = "api"
    """Created or changed through the API; declarations in code never touch it."""
    CODE = "code"
    """Declared in code (``@scheduler_app.periodic``, ``scheduler_app.define``) and applied
    when a scheduler starts (or by ``taskiq-beat jobs apply``)."""


class JobStrategy(str, enum.Enum):
    """Which kind of trigger drives a job."""

    IMMEDIATE = "immediate"
    ONE_OFF = "one_off"
    INTERVAL = "interval"
    CRONTAB = "crontab"
    CALENDAR = "calendar"
    """A union of cron rules (``PeriodicSchedule(calendar=...)``)."""


class RunStatus(str, enum.Enum):
    """Where one fire of a job stands.

    The scheduler writes the first three: ``CLAIMED``: a scheduler owns the fire and is about
    to send it; if that scheduler dies, the fire is sent again (with the same task id) once
    ``next_attempt_at`` passes. ``DISPATCHED``: ``kiq`` succeeded. ``FAILED`` without
    ``finished_at``: ``kiq`` failed; when ``next_attempt_at`` is set the fire is retried then,
    otherwise the failure is final.

    A worker that executes the fire writes the rest (see :mod:`taskiq_beat.worker`):
    ``RUNNING`` (``started_at``, ``worker_id``), then ``SUCCEEDED`` or ``FAILED`` (with
    ``finished_at``, ``duration_seconds``, ``error_type`` and ``error``). ``LOST``: the worker
    running it stopped renewing its heartbeat; a redelivered message may run it once more.

    A job's policy (see :mod:`taskiq_beat.policy`) writes these three, each a fire that was
    not sent: ``MISSED`` (a stretch of fires missed for longer than the grace, from
    ``scheduled_for``; ``error`` says how far), ``SKIPPED`` (other runs of the job were still
    going), ``WAITING`` (buffered until a run of the job ends; then ``CLAIMED`` and sent).

    A chain's run stays ``RUNNING`` while its steps run (see :mod:`taskiq_beat.chain`), and
    ends ``SUCCEEDED`` or ``ABORTED``: a step used all its attempts and the chain gave up.
    """

    CLAIMED = "claimed"
    DISPATCHED = "dispatched"
    FAILED = "failed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    LOST = "lost"
    MISSED = "missed"
    SKIPPED = "skipped"
    WAITING = "waiting"
    ABORTED = "aborted"


class StepStatus(str, enum.Enum):
    """Where one attempt of one chain step stands (a ``scheduler_chain_step`` row).

    ``PENDING``: recorded and to be sent at ``due_at`` (``dispatched_at`` set once it was), or
    waiting in the broker. ``RUNNING``: a worker executes it. Then ``SUCCEEDED``, ``FAILED``
    (the task raised), or ``TIMED_OUT`` (no outcome within the step's ``timeout_seconds``: a
    late outcome of it is ignored, and a retry is a new attempt with a new task id).
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
