"""The scheduler's health: what its loop did, and what the database says of the schedule."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from taskiq_beat.config import SchedulerConfig
    from taskiq_beat.engine import SchedulerEngine
    from taskiq_beat.store import SchedulerStore

__all__ = ["SchedulerHealthSnapshot", "read_health"]


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
    fires_missed: int
    """Fires this scheduler skipped for being later than the misfire grace (a stretch of
    one job's fires counts once)."""
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


async def read_health(
    engine: SchedulerEngine,
    store: SchedulerStore,
    config: SchedulerConfig,
    now: datetime,
    *,
    max_lag_seconds: float | None,
    window_seconds: float,
) -> SchedulerHealthSnapshot:
    """The snapshot of ``SchedulerApp.get_health_snapshot()``: ``engine``'s own counters and
    three index range scans of the database."""
    lag = max(config.misfire_grace_seconds, 5.0) if max_lag_seconds is None else max_lag_seconds
    counts = await store.health_counts(
        seen_since=now - timedelta(seconds=config.worker_timeout_seconds),
        runs_since=now - timedelta(seconds=window_seconds),
        overdue_before=now - timedelta(seconds=lag),
    )
    stats = engine.stats
    p50, p99 = stats.lateness_percentiles()
    finished = counts.runs_succeeded + counts.runs_failed
    stalled = (
        engine.running
        and stats.last_pass_at is not None
        and (now - stats.last_pass_at).total_seconds() > lag
    )
    return SchedulerHealthSnapshot(
        checked_at=now,
        running=engine.running,
        instance=engine.owner,
        jobs_loaded=engine.loaded_jobs,
        next_due_at=engine.next_due_at,
        fires_sent=stats.fires_sent,
        fires_failed=stats.fires_failed,
        fires_missed=stats.fires_missed,
        lateness_p50_seconds=p50,
        lateness_p99_seconds=p99,
        last_sync_at=stats.last_sync_at,
        last_pass_at=stats.last_pass_at,
        last_error=stats.last_error,
        last_error_at=stats.last_error_at,
        workers_alive=counts.workers_alive,
        runs_succeeded=counts.runs_succeeded,
        runs_failed=counts.runs_failed,
        success_rate=counts.runs_succeeded / finished if finished else None,
        overdue_jobs=counts.overdue_jobs,
        oldest_overdue_at=counts.oldest_overdue_at,
        max_lag_seconds=lag,
        window_seconds=window_seconds,
        behind=counts.overdue_jobs > 0 or stalled,
    )
