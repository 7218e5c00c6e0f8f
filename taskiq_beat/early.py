"""Fires claimed before their time (``SchedulerConfig.claim_ahead_seconds``), waiting to be
sent on time.

The engine claims the fires of jobs without a policy up to ``claim_ahead_seconds`` before
they are due, so that when thousands fall due on one instant their claims are written
already and they leave as fast as the broker takes them. Until a fire is sent it waits
here, and a change to its job heard meanwhile takes it back: the engine undoes its claim
(:meth:`~taskiq_beat.store.SchedulerStore.unclaim`) and reloads the job, as if the fire had
never been claimed. What is heard:

- a change made in this process (the app tells the engine at once): :meth:`EarlyFires.cancel`;
- on PostgreSQL, another process's change (a notification): every waiting batch claimed
  before it is checked against the jobs' rows before it is sent;
- elsewhere, the jobs' newest ``updated_at``, read before each batch is claimed and again
  before it is sent: when it moved, the batch is checked against the jobs' rows.

A job with a fire waiting is not claimed ahead again until that fire is sent.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from taskiq_beat.store import ClaimedFires, JobRecord

if TYPE_CHECKING:
    from taskiq_beat.store import SchedulerStore

__all__ = ["EarlyBatch", "EarlyFires", "Unclaim"]

logger = logging.getLogger(__name__)

Unclaim = tuple[int, str, datetime, datetime | None]
"""A claim to undo: run id, job id, fire time, the next fire time the claim set."""


@dataclasses.dataclass(slots=True)
class EarlyBatch:
    """Fires of one claim waiting for their time (in the order of their times), and what
    was known of changes when they were claimed: the count of changes heard and, where
    nothing is heard, the jobs' newest ``updated_at``."""

    fires: ClaimedFires
    heard: int
    mark: Any


class EarlyFires:
    """The fires claimed ahead and not sent yet, in the order of their times."""

    def __init__(self) -> None:
        self._batches: collections.deque[EarlyBatch] = collections.deque()
        # Per job with a fire waiting: the revision it was claimed at, and the next fire
        # time its claim set (to put back if the claim is undone).
        self._held: dict[str, tuple[int, datetime | None]] = {}
        self._cancelled: set[str] = set()
        # Claims taken back whose undoing failed (the database was out): undone first at
        # the next pass; their jobs stay held meanwhile (never claimed ahead again).
        self._to_undo: list[Unclaim] = []

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._held

    @property
    def next_at(self) -> datetime | None:
        """The time of the first fire waiting."""
        return self._batches[0].fires.scheduled_for[0] if self._batches else None

    @property
    def has_cancelled(self) -> bool:
        return bool(self._cancelled)

    def note(self, job_id: str, revision: int, after: datetime | None) -> None:
        """A fire of ``job_id`` is being claimed ahead at ``revision``; its claim sets the
        job's next fire time to ``after``."""
        self._held[job_id] = (revision, after)

    def forget(self, job_ids: Iterable[str]) -> None:
        """These jobs' fires were not claimed, or are sent: nothing of them waits."""
        for job_id in job_ids:
            self._held.pop(job_id, None)

    def hold(self, fires: ClaimedFires, now: datetime, *, heard: int, mark: Any) -> ClaimedFires:
        """Keep the fires of a claimed batch that are not due at ``now``; return those that
        are, to be sent now."""
        times = fires.scheduled_for
        due = [at for at, when in enumerate(times) if when <= now]
        if len(due) == len(times):
            self.forget(fires.job_ids)
            return fires
        later = [at for at, when in enumerate(times) if when > now]
        waiting = fires.pick(sorted(later, key=times.__getitem__))
        self._batches.append(EarlyBatch(waiting, heard, mark))
        if len(self._batches) > 1 and self._batches[-2].fires.scheduled_for[-1] > times[later[0]]:
            # Claims end in the order they were popped, so batches come in time order; kept
            # sorted all the same, should one ever not.
            ordered = sorted(self._batches, key=lambda batch: batch.fires.scheduled_for[0])
            self._batches = collections.deque(ordered)
        now_due = fires.pick(due)
        self.forget(now_due.job_ids)
        return now_due

    def take_due(self, now: datetime) -> list[EarlyBatch]:
        """The waiting fires due at ``now``, taken off (their jobs still held: see
        :meth:`sent`)."""
        taken: list[EarlyBatch] = []
        batches = self._batches
        while batches and batches[0].fires.scheduled_for[0] <= now:
            batch = batches[0]
            times = batch.fires.scheduled_for
            if times[-1] <= now:
                taken.append(batches.popleft())
                continue
            cut = next(at for at, when in enumerate(times) if when > now)
            fires = batch.fires
            taken.append(EarlyBatch(fires.pick(range(cut)), batch.heard, batch.mark))
            batch.fires = fires.pick(range(cut, len(fires)))
            break
        return taken

    def cancel(self, job_id: str) -> None:
        """``job_id`` changed in this process: its waiting fire, if any, is not sent."""
        if job_id in self._held:
            self._cancelled.add(job_id)

    def cancelled_in(self, batch: EarlyBatch) -> set[str]:
        """The jobs of ``batch`` (taken off already) changed in this process meanwhile."""
        if not self._cancelled:
            return set()
        found = self._cancelled.intersection(batch.fires.job_ids)
        self._cancelled -= found
        return found

    def stale(self, batch: EarlyBatch, records: list[JobRecord]) -> set[str]:
        """The jobs of ``batch`` whose rows (``records``, read now) are no longer the
        revision claimed, or are gone or paused."""
        current = {
            record.id: record.revision for record in records if record.is_enabled
        }  # a paused job's revision counts as none
        held = self._held
        return {
            job_id
            for job_id in batch.fires.job_ids
            if job_id not in held or current.get(job_id) != held[job_id][0]
        }

    def without(self, batch: EarlyBatch, job_ids: set[str]) -> tuple[EarlyBatch, list[Unclaim]]:
        """``batch`` without the fires of ``job_ids``, and the claims of those to undo."""
        fires = batch.fires
        keep = [at for at, job_id in enumerate(fires.job_ids) if job_id not in job_ids]
        undo = [at for at, job_id in enumerate(fires.job_ids) if job_id in job_ids]
        return EarlyBatch(fires.pick(keep), batch.heard, batch.mark), self._undo(fires, undo)

    def drop_cancelled(self) -> tuple[list[Unclaim], set[str]]:
        """Take the fires of the jobs changed in this process off the batches waiting: the
        claims to undo, and those jobs."""
        cancelled, self._cancelled = self._cancelled, set()
        undo: list[Unclaim] = []
        kept: collections.deque[EarlyBatch] = collections.deque()
        for batch in self._batches:
            if any(job_id in cancelled for job_id in batch.fires.job_ids):
                batch, undone = self.without(batch, cancelled)
                undo += undone
            if batch.fires:
                kept.append(batch)
        self._batches = kept
        return undo, cancelled

    def drain(self) -> list[Unclaim]:
        """Every fire waiting, taken off: the claims to undo (the scheduler stops)."""
        undo: list[Unclaim] = []
        for batch in self._batches:
            undo += self._undo(batch.fires, range(len(batch.fires)))
        self._batches.clear()
        self._cancelled.clear()
        return undo

    def _undo(self, fires: ClaimedFires, indexes: Iterable[int]) -> list[Unclaim]:
        """The claims of the fires at ``indexes`` to undo (their jobs stay held until it is
        done: see :meth:`_unclaim`)."""
        undo: list[Unclaim] = []
        for at in indexes:
            job_id = fires.job_ids[at]
            held = self._held.get(job_id)
            after = None if held is None else held[1]
            undo.append((fires.run_ids[at], job_id, fires.scheduled_for[at], after))
        return undo

    # ------------------------------------------------------------------ with the store

    async def ready(
        self, store: SchedulerStore, now: datetime, *, heard: int, listening: bool
    ) -> tuple[list[ClaimedFires], set[str], Any]:
        """Undo the claims of fires whose job changed in this process, then take the fires
        due at ``now`` and check them (see :meth:`checked`): those to send, as one batch
        (they were claimed in batches of the base size, nothing being due then, and each
        batch sent would wait for the last one's record); the jobs whose claim was undone,
        to reload; and, where changes are not ``heard`` (``listening`` is false), the
        newest ``updated_at`` read to check them (``None`` if none was read)."""
        changed: set[str] = set()
        if self._cancelled:
            undo, cancelled = self.drop_cancelled()
            self._to_undo += undo
            changed |= cancelled
        if self._to_undo:
            undo, self._to_undo = self._to_undo, []
            try:
                await self._unclaim(store, undo)
            except BaseException:
                self._to_undo = undo + self._to_undo
                raise
        taken = self.take_due(now)
        if not taken:
            return [], changed, None
        checked: list[EarlyBatch] = []
        try:
            mark = None if listening else await store.last_change()  # once for all of them
            for batch in taken:
                kept, undone = await self.checked(
                    store, batch, heard=heard, mark=mark, listening=listening
                )
                changed |= undone
                checked.append(kept)
        except BaseException:
            # Not sent: back in front, checked again at the next pass.
            self._batches.extendleft(reversed(checked + taken[len(checked) :]))
            raise
        ready: list[ClaimedFires] = []
        for kept in checked:
            self.forget(kept.fires.job_ids)
            if kept.fires:
                ready.append(kept.fires)
        return ([ClaimedFires.joined(ready)] if ready else []), changed, mark

    async def checked(
        self, store: SchedulerStore, batch: EarlyBatch, *, heard: int, mark: Any, listening: bool
    ) -> tuple[EarlyBatch, set[str]]:
        """``batch`` less the fires whose job changed since it was claimed, and those
        jobs: changed in this process, or, if another process changed any job since (the
        count of changes ``heard`` moved, or the newest ``updated_at``, ``mark``, read now
        where nothing is heard), changed as its row now says. Their claims are undone."""
        changed = self.cancelled_in(batch)
        check = batch.heard != heard or (not listening and mark != batch.mark)
        if check:
            changed |= self.stale(batch, await store.load_jobs(batch.fires.job_ids))
        if not changed:
            return batch, changed
        batch, undo = self.without(batch, changed)
        await self._unclaim(store, undo)
        return batch, changed

    async def give_back(self, store: SchedulerStore) -> None:
        """Undo the claims of every fire waiting (the scheduler stops): the next scheduler
        claims them when due. If the database fails, their leases run out instead."""
        undo = self._to_undo + self.drain()
        self._to_undo = []
        if not undo:
            return
        try:
            await self._unclaim(store, undo)
        except Exception as exc:
            logger.warning(
                "could not give back %d fires claimed ahead (%s: %s); they are sent once"
                " their lease runs out",
                len(undo),
                type(exc).__name__,
                exc,
            )
        finally:
            self._held.clear()

    async def _unclaim(self, store: SchedulerStore, undo: list[Unclaim]) -> None:
        """Undo claims in the database; then their jobs are no longer held."""
        if undo:
            await store.unclaim(undo)
            self.forget(job_id for _, job_id, _, _ in undo)
            logger.debug("%d fires claimed ahead not sent: their jobs changed", len(undo))
