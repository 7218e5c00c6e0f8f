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
- everywhere, the jobs' newest ``updated_at``, read before each batch is claimed (at most
  half a second before) and again before it is sent: when it moved, the batch is checked
  against the jobs' rows. On PostgreSQL too: a listener can be deaf without knowing it (a
  pooler in transaction mode takes ``LISTEN`` and delivers nothing), and edits and pauses
  move ``updated_at``; deletions do not, and only a notification tells of them.

A job with a fire waiting is not claimed ahead again until that fire is sent.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
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
    lease_until: datetime
    """The claim's lease: past it (less the time a send may take) the fires are left to
    the retries path, which any scheduler may take them by."""


class EarlyFires:
    """The fires claimed ahead and not sent yet: batches, each in the order of its fires'
    times (claims overlap in time: a sync brings jobs due earlier than the end of a batch
    held already, so batches are not in order among themselves).

    ``send_time`` is the longest a send may take: a fire is sent only while its lease has
    at least that long to run, so that it is never sent both here and by the retries path
    of a scheduler that took it once its lease ran out."""

    def __init__(self, owner: str, send_time: timedelta = timedelta(0)) -> None:
        self.owner = owner
        self._send_time = send_time
        self._batches: list[EarlyBatch] = []
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
        return min((batch.fires.scheduled_for[0] for batch in self._batches), default=None)

    @property
    def has_cancelled(self) -> bool:
        """Claims to take back first: of jobs changed in this process, or owed (an undo
        that failed). No claim ahead starts before they are done."""
        return bool(self._cancelled or self._to_undo)

    def note(self, job_id: str, revision: int, after: datetime | None) -> None:
        """A fire of ``job_id`` is being claimed ahead at ``revision``; its claim sets the
        job's next fire time to ``after``."""
        self._held[job_id] = (revision, after)

    def forget(self, job_ids: Iterable[str]) -> None:
        """These jobs' fires were not claimed, or are sent: nothing of them waits."""
        held = self._held
        cancelled = self._cancelled
        for job_id in job_ids:
            held.pop(job_id, None)
            cancelled.discard(job_id)

    def hold(
        self,
        fires: ClaimedFires,
        now: datetime,
        *,
        heard: int,
        mark: Any,
        lease_until: datetime,
    ) -> ClaimedFires:
        """Keep the fires of a claimed batch that are not due at ``now`` (or whose job
        changed in this process while it was claimed); return the others, to send now."""
        times = fires.scheduled_for
        cancelled = self._cancelled
        due = [
            at
            for at, (when, job_id) in enumerate(zip(times, fires.job_ids, strict=True))
            if when <= now and job_id not in cancelled
        ]
        if len(due) == len(times):
            self.forget(fires.job_ids)
            return fires
        chosen = set(due)
        later = [at for at in range(len(times)) if at not in chosen]
        waiting = fires.pick(sorted(later, key=times.__getitem__))
        self._batches.append(EarlyBatch(waiting, heard, mark, lease_until))
        now_due = fires.pick(due)
        self.forget(now_due.job_ids)
        return now_due

    def take_due(self, now: datetime) -> tuple[list[EarlyBatch], int]:
        """The waiting fires due at ``now``, taken off (their jobs still held until they
        are sent or given back), and how many were dropped instead: their lease ends
        within ``send_time`` (the database was out while they waited), and they are left
        to the retries path."""
        taken: list[EarlyBatch] = []
        kept: list[EarlyBatch] = []
        dropped = 0
        for batch in self._batches:
            times = batch.fires.scheduled_for
            if times[0] > now:
                kept.append(batch)
                continue
            if now + self._send_time >= batch.lease_until:
                dropped += len(batch.fires)
                self.forget(batch.fires.job_ids)
                continue
            cut = bisect.bisect_right(times, now)
            fires = batch.fires
            if cut == len(times):
                taken.append(batch)
                continue
            taken.append(dataclasses.replace(batch, fires=fires.pick(range(cut))))
            kept.append(dataclasses.replace(batch, fires=fires.pick(range(cut, len(fires)))))
        self._batches = kept
        return taken, dropped

    def cancel(self, job_id: str) -> None:
        """``job_id`` changed in this process: its waiting fire, if any, is not sent."""
        if job_id in self._held:
            self._cancelled.add(job_id)

    def cancelled_in(self, batch: EarlyBatch) -> set[str]:
        """The jobs of ``batch`` (taken off already) changed in this process meanwhile
        (still marked: see :meth:`uncancel`)."""
        if not self._cancelled:
            return set()
        return self._cancelled.intersection(batch.fires.job_ids)

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
        return dataclasses.replace(batch, fires=fires.pick(keep)), self._undo(fires, undo)

    def drop_cancelled(self) -> tuple[list[Unclaim], set[str]]:
        """Take the fires of the jobs changed in this process off the batches waiting: the
        claims to undo, and those jobs. A job whose claim is still under way stays marked
        (its fire is kept waiting when the claim returns, then dropped here)."""
        cancelled = self._cancelled
        undo: list[Unclaim] = []
        kept: list[EarlyBatch] = []
        for batch in self._batches:
            if any(job_id in cancelled for job_id in batch.fires.job_ids):
                batch, undone = self.without(batch, cancelled)
                undo += undone
            if batch.fires:
                kept.append(batch)
        self._batches = kept
        found = {job_id for _, job_id, _, _ in undo}
        self._cancelled -= found
        return undo, found

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
        self, store: SchedulerStore, now: datetime, *, heard: int
    ) -> tuple[list[ClaimedFires], set[str], Any]:
        """Undo the claims of fires whose job changed in this process, then take the fires
        due at ``now`` and check them (see :meth:`checked`): those to send, as one batch
        (they were claimed in batches of the base size, nothing being due then, and each
        batch sent would wait for the last one's record); the jobs whose claim was undone,
        to reload; and the newest ``updated_at`` read to check them (``None`` if none was
        read)."""
        changed: set[str] = set()
        if self._cancelled:
            undo, _ = self.drop_cancelled()
            self._to_undo += undo
        if self._to_undo:
            undo, self._to_undo = self._to_undo, []
            try:
                await self._unclaim(store, undo)
            except BaseException:
                self._to_undo = undo + self._to_undo
                raise
            changed |= {job_id for _, job_id, _, _ in undo}  # to reload, once undone
        taken, dropped = self.take_due(now)
        if dropped:
            logger.warning(
                "%d fires claimed ahead waited past their lease; the retries path sends them",
                dropped,
            )
        if not taken:
            return [], changed, None
        checked: list[EarlyBatch] = []
        try:
            mark = await store.last_change()  # once for all of them
            for batch in taken:
                kept, undone = await self.checked(store, batch, heard=heard, mark=mark)
                changed |= undone
                checked.append(kept)
        except BaseException:
            # Not sent: waiting again, checked again at the next pass.
            self._batches += [batch for batch in checked + taken[len(checked) :] if batch.fires]
            raise
        ready: list[ClaimedFires] = []
        for kept in checked:
            self.forget(kept.fires.job_ids)
            if kept.fires:
                ready.append(kept.fires)
        return ([ClaimedFires.joined(ready)] if ready else []), changed, mark

    async def checked(
        self, store: SchedulerStore, batch: EarlyBatch, *, heard: int, mark: Any
    ) -> tuple[EarlyBatch, set[str]]:
        """``batch`` less the fires whose job changed since it was claimed, and those
        jobs: changed in this process, or, if another process changed any job since (the
        count of changes ``heard`` moved, or the newest ``updated_at``, ``mark``, read
        now), changed as its row now says. Their claims are undone."""
        changed = self.cancelled_in(batch)
        check = batch.heard != heard or mark != batch.mark
        if check:
            changed |= self.stale(batch, await store.load_jobs(batch.fires.job_ids))
        if not changed:
            return batch, changed
        kept, undo = self.without(batch, changed)
        await self._unclaim(store, undo)  # on failure: the batch waits whole, and marked
        self._cancelled -= changed
        return kept, changed

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
            await store.unclaim(undo, owner=self.owner)
            self.forget(job_id for _, job_id, _, _ in undo)
            logger.debug("%d fires claimed ahead not sent: their jobs changed", len(undo))
