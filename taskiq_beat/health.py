"""The scheduler's health: what its loop did, and what the database says of the schedule."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

__all__ = ["SchedulerHealthSnapshot"]


class SchedulerHealthSnapshot(BaseModel):
    """One look at a scheduler and its database (``SchedulerApp.get_health_snapshot()``).

    The loop's own fields (``running`` to ``last_error_at``) describe this process's
    scheduler; they are empty in a process that does not run one (the CLI). The others come
    from the database and hold for every scheduler on it.
    """

    model_config = ConfigDict(frozen=True)

    checked_at: datetime
    running: bool
    """Whether this process's scheduler loop is running."""
    instance: str
    jobs_loaded: int
    """Jobs held in memory (due within the look-ahead window)."""
    next_due_at: datetime | None
    fires_sent: int
    fires_failed: int
    lateness_p50_seconds: float
    lateness_p99_seconds: float
    """Of the fires sent over the last minute (sampled)."""
    last_sync_at: datetime | None
    last_pass_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    workers_alive: int
    """Workers that renewed their heartbeat within ``worker_timeout_seconds``."""
    runs_succeeded: int
    runs_failed: int
    """Runs scheduled within ``window_seconds`` that failed on a worker or were lost."""
    success_rate: float | None
    """``runs_succeeded / (runs_succeeded + runs_failed)``; ``None`` without finished runs."""
    overdue_jobs: int
    """Enabled jobs whose next fire is older than ``max_lag_seconds``: no scheduler sends them."""
    oldest_overdue_at: datetime | None
    max_lag_seconds: float
    window_seconds: float
    behind: bool
    """Jobs are overdue, or this process's loop is running but has not completed a pass
    within ``max_lag_seconds``."""
