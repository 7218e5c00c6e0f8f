"""What the scheduling loop counts as it goes: for the health snapshot, the metrics and its
once-a-minute log summary. Counted per batch, with a few lateness samples per batch."""

from __future__ import annotations

import collections
import dataclasses
import time
from datetime import datetime
from typing import Any

__all__ = ["SUMMARY_EVERY", "EngineStats"]

_LATENESS_WINDOW = 60.0  # seconds of lateness samples the health snapshot reads
SUMMARY_EVERY = 60.0  # seconds between two INFO summaries of the fires sent


@dataclasses.dataclass
class EngineStats:
    """What the loop did, for the health snapshot and the metrics (counted per batch: no
    work per fire but a few samples of lateness)."""

    fires_sent: int = 0
    fires_failed: int = 0
    """Sends that failed (each is retried, or its job disabled when it can never be sent)."""
    fires_missed: int = 0
    """Fires the misfire policy skipped because they were later than the misfire grace
    (a stretch of skipped fires of one job counts once: it is one ``missed`` run)."""
    last_sync_at: datetime | None = None
    last_pass_at: datetime | None = None
    """When the loop last completed a pass without an error."""
    last_error: str | None = None
    last_error_at: datetime | None = None
    lateness: collections.deque[tuple[float, float]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )
    """(monotonic time, seconds late) of sampled fires sent."""

    def summary(
        self,
        seconds: float,
        counts: tuple[int, int, int],
        behind: list[datetime],
        now: datetime,
    ) -> tuple[Any, ...]:
        """The once-a-minute INFO line (format and arguments) on the fires sent, failed and
        missed (``counts``) over the last ``seconds``, and the jobs whose fires, due at
        ``behind``, wait here unclaimed: under more load than it can send, the line says
        how far behind the scheduler is, and what the misfire policy dropped."""
        sent, failed, missed = counts
        p50, p99 = self.lateness_percentiles(window=SUMMARY_EVERY)
        text = (
            "sent %d fires in the last %.0f s (%d sends failed); lateness p50 %.0f ms,"
            " p99 %.0f ms; %d jobs due and waiting (the oldest fire %.1f s late); %d missed"
            " (later than the misfire grace)"
        )
        oldest = (now - min(behind)).total_seconds() if behind else 0.0
        return (text, sent, seconds, failed, p50 * 1000, p99 * 1000, len(behind), oldest, missed)

    def lateness_percentiles(self, *, window: float = _LATENESS_WINDOW) -> tuple[float, float]:
        """p50 and p99 lateness (seconds) of the fires sampled within the last ``window`` s;
        ``(0.0, 0.0)`` when none was sent."""
        since = time.monotonic() - window
        values = sorted(late for at, late in self.lateness if at >= since)
        if not values:
            return 0.0, 0.0
        return values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]
