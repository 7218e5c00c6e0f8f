"""What the log, the counters and the event hooks say of the batches the engine sends.

Under load the engine sends a hundred batches a second: each fire is logged at DEBUG only,
a batch's failures in one line (and a broker down for long in a line every few seconds,
see :class:`FailedSends`), and what was sent in one INFO line a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from taskiq_beat.events import EventHooks, EventKind, SchedulerEvent
from taskiq_beat.stats import SUMMARY_EVERY, EngineStats

if TYPE_CHECKING:
    from taskiq_beat.clock import Clock
    from taskiq_beat.store import Fire, SendOutcome

__all__ = ["FailedSends", "ReportedBatch", "SendReport"]

_LATENESS_SAMPLES_PER_BATCH = 32  # fires of a batch whose lateness is kept, evenly spaced


class FailedSends:
    """What a broker that refuses sends looks like in the log: the first few failed
    batches a line each, then one line every ``every`` seconds while it lasts, and one
    when a batch goes through again. (A broker outage fails every batch and every resend
    of them, several a second: a line each would bury the rest of the log.) A broker that
    fails now and then is held to the same pace: a failure within ``every`` of the last
    line waits for the next summary, and only a failure that was logged is followed by the
    line saying sends work again."""

    def __init__(self, logger: logging.Logger, *, lines: int = 3, every: float = 5.0) -> None:
        self._logger = logger
        self._lines = max(1, lines)
        self._every = every
        self._batches = 0  # failed batches since a batch last went through
        self._fires = 0
        self._since: datetime | None = None
        self._budget = 0  # lines of their own left to this run of failures
        self._logged = False  # whether this run of failures was logged
        self._quiet_batches = 0  # failed since the last line, not logged one by one
        self._quiet_fires = 0
        self._line_at: datetime | None = None

    def failed(
        self,
        count: int,
        fire: Fire,
        error: str,
        retry_at: datetime,
        now: datetime,
    ) -> None:
        """``count`` fires of a batch failed (``fire``, the first, with ``error``)."""
        line_at = self._line_at
        if not self._batches:  # a run of failures begins
            self._since = now
            self._logged = False
            # Lines of its own only where no line came within ``every`` and no failure
            # waits for a summary.
            quiet = line_at is not None and (
                (now - line_at).total_seconds() < self._every or self._quiet_batches > 0
            )
            self._budget = 0 if quiet else self._lines
        self._batches += 1
        self._fires += count
        if self._budget:
            self._budget -= 1
            self._line_at = now
            self._logged = True
            self._logger.warning(
                "dispatch of %d fires failed (job %s scheduled for %s: %s); retrying at %s",
                count,
                fire.job_id,
                fire.scheduled_for,
                error,
                retry_at,
            )
            return
        self._quiet_batches += 1
        self._quiet_fires += count
        assert line_at is not None  # a run without lines of its own follows a line
        if (now - line_at).total_seconds() < self._every:
            return
        self._logger.warning(
            "dispatch still failing: %d fires in %d batches since the last line"
            " (the latest: job %s scheduled for %s: %s); retrying at %s",
            self._quiet_fires,
            self._quiet_batches,
            fire.job_id,
            fire.scheduled_for,
            error,
            retry_at,
        )
        self._line_at = now
        self._logged = True
        self._quiet_batches = self._quiet_fires = 0

    def sent(self, now: datetime) -> None:
        """A batch went through: if failures had been logged, say sends work again."""
        if not self._batches:
            return
        assert self._since is not None
        if self._logged:
            self._logger.info(
                "dispatch working again after %d failed batches (%d fires) in %.1f s",
                self._batches,
                self._fires,
                (now - self._since).total_seconds(),
            )
        self._batches = self._fires = 0
        self._since = None
        self._logged = False


class ReportedBatch(NamedTuple):
    """A batch's outcomes: fires sent, whether any send failed (to be retried), and the
    jobs that can never be sent, with the reason (to be disabled)."""

    sent: int
    failed: bool
    final: dict[str, str]


class SendReport:
    """Logs and counts the outcomes of the batches sent (``stats``), samples their
    lateness, tells the event hooks of each fire sent when someone listens, and writes the
    summary line once per ``SUMMARY_EVERY``; ``due`` (the engine's fire time of each job
    held) tells how many jobs wait with fires due."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        stats: EngineStats,
        events: EventHooks,
        clock: Clock,
        due: Mapping[str, datetime],
    ) -> None:
        self._logger = logger
        self._stats = stats
        self._events = events
        self._clock = clock
        self._due = due
        self._failed_sends = FailedSends(logger)
        self._summary_at: datetime | None = None
        self._summary_counts = (0, 0, 0)  # fires sent, failed and missed at the last summary

    def batch(
        self, fires: Sequence[Fire], outcomes: list[SendOutcome], retry_at: datetime
    ) -> ReportedBatch:
        """Log a batch's outcomes: each fire at DEBUG, the batch in one line at most per
        kind (failed sends retried at ``retry_at``)."""
        logger = self._logger
        sent = 0
        final: dict[str, str] = {}
        failed = 0
        first_failed: tuple[Fire, str] | None = None
        debug = logger.isEnabledFor(logging.DEBUG)
        for index, outcome in enumerate(outcomes):  # a fire is read only when it is logged
            if outcome.released:
                continue
            if outcome.error is None:
                sent += 1
                if debug:
                    fire = fires[index]
                    logger.debug(
                        "dispatched job %s (%s) scheduled for %s as task %s",
                        fire.job_id,
                        fire.task_name,
                        fire.scheduled_for,
                        fire.task_id,
                    )
                continue
            fire = fires[index]
            if outcome.final:
                final[fire.job_id] = outcome.error
                continue
            failed += 1
            if first_failed is None:
                first_failed = (fire, outcome.error)
            if debug:
                logger.debug(
                    "dispatch of job %s (%s) scheduled for %s failed: %s",
                    fire.job_id,
                    fire.task_name,
                    fire.scheduled_for,
                    outcome.error,
                )
        if first_failed is not None:
            self._failed_sends.failed(failed, *first_failed, retry_at, self._clock.now())
        elif sent:
            self._failed_sends.sent(self._clock.now())  # says so if sends had been failing
        stats = self._stats
        stats.fires_failed += failed + len(final)
        if sent:
            stats.fires_sent += sent
            self._sample_lateness(fires, outcomes)
            logger.debug("dispatched %d fires", sent)
        self._summarize()
        return ReportedBatch(sent, first_failed is not None, final)

    def _summarize(self) -> None:
        """At most once per ``SUMMARY_EVERY``, one INFO line on what the loop sent since the
        last one (a line per batch would be a hundred a second under load)."""
        now = self._clock.now()
        if self._summary_at is None:
            self._summary_at, self._summary_counts = now, (0, 0, 0)
            return
        if (now - self._summary_at).total_seconds() < SUMMARY_EVERY:
            return
        stats = self._stats
        counts = (stats.fires_sent, stats.fires_failed, stats.fires_missed)
        last = self._summary_counts
        since = (counts[0] - last[0], counts[1] - last[1], counts[2] - last[2])
        if any(since):
            seconds = (now - self._summary_at).total_seconds()
            behind = [when for when in self._due.values() if when <= now]
            self._logger.info(*stats.summary(seconds, since, behind, now))
        self._summary_at = now
        self._summary_counts = counts

    def _sample_lateness(self, fires: Sequence[Fire], outcomes: list[SendOutcome]) -> None:
        """Keep the lateness of a few of a batch's fires sent (all of them, and a
        ``FIRE_SENT`` event each, when someone listens to those)."""
        now = self._clock.now()
        at = time.monotonic()
        every = self._events.wants(EventKind.FIRE_SENT)
        step = 1 if every else max(1, len(fires) // _LATENESS_SAMPLES_PER_BATCH)
        samples = self._stats.lateness
        for index in range(0, len(fires), step):
            if outcomes[index].error is not None or outcomes[index].released:
                continue
            fire = fires[index]
            samples.append((at, (now - fire.scheduled_for).total_seconds()))
            if every:
                self._events.emit(
                    SchedulerEvent(
                        EventKind.FIRE_SENT,
                        fire.job_id,
                        scheduled_for=fire.scheduled_for,
                        task_id=fire.task_id,
                        run_id=fire.run_id,
                    )
                )
