"""The scheduler's housekeeping beside its loop: lost runs, and old history.

Runs as a task of its own next to the engine's loop (never inside it), in small batches:

- every ``housekeeping_interval_seconds``: the ``running`` runs of workers that stopped
  renewing their heartbeat for ``worker_timeout_seconds`` become ``lost``; and the durable
  chains' watchdog (:meth:`ChainRunner.watch <taskiq_beat.chain_runner.ChainRunner.watch>`):
  step attempts past their timeout become ``timed_out`` and are retried with a new task id,
  steps of lost workers and steps recorded but not sent are sent;
- about once a minute, when ``run_history_retention_days`` is set: finished runs older than
  that, and one-off jobs that fired for the last time before it, are deleted, 1,000 at a
  time with a pause between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from taskiq_beat.events import EventHooks, EventKind, SchedulerEvent

if TYPE_CHECKING:
    from taskiq_beat.chain_runner import ChainRunner
    from taskiq_beat.clock import Clock
    from taskiq_beat.config import SchedulerConfig
    from taskiq_beat.store import SchedulerStore

__all__ = ["Housekeeper"]

logger = logging.getLogger(__name__)

_PURGE_BATCH = 1000
_PURGE_EVERY = 60.0  # seconds between retention passes
_PURGE_PAUSE = 0.05  # between two batches of one pass: other transactions get their turn


class Housekeeper:
    """Marks lost runs and applies the history retention; knows the store and the clock."""

    def __init__(
        self,
        *,
        store: SchedulerStore,
        config: SchedulerConfig,
        clock: Clock,
        events: EventHooks | None = None,
        chains: ChainRunner | None = None,
    ) -> None:
        self._store = store
        self._chains = chains
        self._events = events or EventHooks()
        self._config = config
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._next_purge_at = 0.0
        self._failing = False
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="taskiq-beat-housekeeping")

    async def stop(self) -> None:
        """Stop after the operation under way (a cancelled one would leave its connection to
        unwind on its own); cancel it if it outlasts ``shutdown_timeout_seconds``."""
        task, self._task = self._task, None
        if self._chains is not None:
            await self._chains.close()
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._config.shutdown_timeout_seconds)
        except asyncio.TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Not at once: a scheduler starting up has its first pass to make.
        while not await self._pause(self._config.housekeeping_interval_seconds):
            try:
                await self.find_lost_runs()
                await self.watch_chains()
                if (
                    self._config.run_history_retention_days is not None
                    and loop.time() >= self._next_purge_at
                ):
                    self._next_purge_at = loop.time() + _PURGE_EVERY
                    await self.purge_history()
                if self._failing:
                    self._failing = False
                    logger.info("housekeeping running again")
            except Exception as exc:
                if not self._failing:
                    self._failing = True
                    logger.warning(
                        "housekeeping failed (%s: %s); retrying", type(exc).__name__, exc
                    )

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; ``True`` if stopped meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def find_lost_runs(self) -> int:
        """Mark the running runs of silent workers ``lost``; return how many."""
        now = self._clock.now()
        silent_since = now - timedelta(seconds=self._config.worker_timeout_seconds)
        lost = await self._store.lose_runs_of_silent_workers(now=now, silent_since=silent_since)
        for worker_id, runs in lost.items():
            logger.warning(
                "worker %s stopped renewing its heartbeat: %d running runs marked lost",
                worker_id,
                len(runs),
            )
            if self._events.wants(EventKind.RUN_FAILED):
                for run_id, job_id, reason in runs:
                    self._events.emit(
                        SchedulerEvent(EventKind.RUN_FAILED, job_id, run_id=run_id, error=reason)
                    )
        return sum(len(runs) for runs in lost.values())

    async def watch_chains(self) -> tuple[int, int, int]:
        """One pass of the chains' watchdog: ``(resent, timed out, sent)`` step attempts."""
        if self._chains is None:
            return 0, 0, 0
        return await self._chains.watch()

    async def purge_history(self) -> tuple[int, int]:
        """Delete history older than the retention, batch by batch; return ``(runs, jobs)``."""
        days = self._config.run_history_retention_days
        if days is None:
            return 0, 0
        before = self._clock.now() - timedelta(days=days)
        runs = jobs = 0
        while True:
            deleted_runs, deleted_jobs = await self._store.purge_history(
                before=before, limit=_PURGE_BATCH
            )
            runs, jobs = runs + deleted_runs, jobs + deleted_jobs
            if deleted_runs < _PURGE_BATCH and deleted_jobs < _PURGE_BATCH:
                break
            if await self._pause(_PURGE_PAUSE):
                break
        if runs or jobs:
            logger.info(
                "history older than %g days: deleted %d runs, %d one-off jobs", days, runs, jobs
            )
        return runs, jobs
