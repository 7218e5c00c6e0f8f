"""The scheduler loop: a heap of jobs due soon, fed by a windowed sync from the database.

Each sync loads only the enabled jobs due within the look-ahead window (an indexed range
scan), so the work per loop grows with the jobs that are due or changed, not with the jobs
that exist. Due jobs are popped in batches; each batch is claimed in the database
(compare-and-set), sent with ``kiq``, and recorded. Changes made through the app in this
process reach the heap at once through :meth:`SchedulerEngine.job_changed`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
import uuid
from collections.abc import Collection, Coroutine, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from taskiq_beat._gc import gc_paused
from taskiq_beat.claiming import ClaimPlanner, JobSnapshot, snapshot_of
from taskiq_beat.early import EarlyFires
from taskiq_beat.enums import JobKind
from taskiq_beat.events import EventHooks, EventKind, SchedulerEvent
from taskiq_beat.exceptions import CorruptJobError
from taskiq_beat.models import encode_json
from taskiq_beat.policy import JobPolicy
from taskiq_beat.reporting import SendReport
from taskiq_beat.sharing import HeapEntry, Sharing
from taskiq_beat.stats import EngineStats
from taskiq_beat.store import (
    RELEASED,
    ChangeListener,
    ClaimedFires,
    JobRecord,
    SendOutcome,
)
from taskiq_beat.triggers import Trigger

if TYPE_CHECKING:
    from taskiq_beat.clock import Clock
    from taskiq_beat.config import SchedulerConfig
    from taskiq_beat.dispatch import Dispatcher
    from taskiq_beat.store import Fire, SchedulerStore

__all__ = ["JobSnapshot", "SchedulerEngine"]

logger = logging.getLogger(__name__)

_NEVER = datetime.max.replace(tzinfo=timezone.utc)  # retry time of outcomes that never fail
_ERROR_BACKOFF_BASE = 0.5
_ERROR_BACKOFF_MAX = 5.0  # also the longest a scheduler takes to notice the database is back
_OUTAGE_LINES = 10  # failed passes logged one by one; then one in every _OUTAGE_REPORT_EVERY
_OUTAGE_REPORT_EVERY = 12
# While behind, batches double up to this many times dispatch_batch_size, but grow no larger
# than the largest: a batch's transactions cost about the same whatever its size while the
# loop is busy sending (each step waits for a turn of the loop, and on SQLite for the GIL in
# aiosqlite's thread), so a scheduler far behind spreads them over many fires.
_BATCH_GROWTH = 32
_LARGEST_GROWN_BATCH = 8192
# Batches being claimed while one is sent: with two, a database that answers a claim more
# slowly than the broker takes a batch (PostgreSQL: ~100 ms for 2,048 claims, as long as
# sending them) still has the next claim ready.
_CLAIMS_IN_FLIGHT = 2
_SYNC_SPACING = 10  # the next sync waits at least 10x as long as the last one took
# start() loads the jobs due first, at most this many, and starts sending them while the
# first pass loads the rest of the window: a scheduler that starts behind (100k due) sends
# its first fires within ~0.1 s instead of after reading the whole backlog.
_FIRST_LOAD = 16384
# Where the database cannot announce changes (SQLite has no LISTEN), the newest
# ``updated_at`` of the jobs is read this often: every change made through the API sets it,
# so a new value means a change to load now rather than at the next sync.
_CHANGE_POLL_SECONDS = 0.5
# Batches of the others' overdue jobs (dispatch_batch_size each) a sync reads while this
# scheduler is behind on its own (see _others_to_load).
_OTHERS_WHEN_BEHIND = 2
_PROBE_WAIT = 2.0  # longest wait for the listener's test notification, once at its opening


# The foreign heap is rebuilt without its stale entries once it holds more than this many
# times as many entries as there are jobs held (plus a few), see _compact_foreign.
_FOREIGN_SLACK = 2


class SchedulerEngine:
    """Runs the scheduling loop. Knows the store, the dispatcher and the clock, nothing else."""

    def __init__(
        self,
        *,
        store: SchedulerStore,
        dispatcher: Dispatcher,
        config: SchedulerConfig,
        clock: Clock,
        owner: str | None = None,
        events: EventHooks | None = None,
    ) -> None:
        self._store = store
        self._events = events or EventHooks()
        self.stats = EngineStats()
        self._dispatcher = dispatcher
        self._config = config
        self._clock = clock
        self.owner = owner or uuid.uuid4().hex
        # The jobs held, and the fire time each is held for (the same keys): a job is off
        # both from the moment its batch is popped until its claim is done. Heap entries
        # whose time is not the job's in ``_due`` are stale (the job changed) and skipped.
        self._jobs: dict[str, JobSnapshot] = {}
        self._due: dict[str, datetime] = {}
        self._send_report = SendReport(
            logger, stats=self.stats, events=self._events, clock=clock, due=self._due
        )
        # Entries (fire time, rank, job id). Jobs due at the same time come off the heap in
        # the order of their rank, which differs from one scheduler to the next (salted by
        # its owner id): several schedulers holding the same backlog start on different
        # jobs instead of all claiming the same head of it (see _rank).
        self._heap: list[HeapEntry] = []
        # Sharing with other schedulers (see taskiq_beat.sharing): a job is this scheduler's
        # own when its slot is this one's; the others' jobs wait in ``_foreign`` and are
        # taken here only when this scheduler has nothing of its own due and they are
        # overdue by ``_steal_after`` (their scheduler died, or is behind). Exactly-once
        # never rests on this: every fire is still claimed by compare-and-set.
        self._sharing = Sharing(self.owner, lease_seconds=config.claim_lease_seconds)
        self._foreign: list[HeapEntry] = []
        self._steal_after = timedelta(seconds=config.sync_interval_seconds)
        # A batch of the others' jobs lost to their owners (alive, and at them meanwhile):
        # no more help until the next sync has read what is left of theirs.
        self._help_paused = False
        self._horizon: datetime | None = None
        self._next_sync_at: datetime | None = None
        # The share whose whole window the heap holds (that of the last load of the whole
        # window), None while it holds only its start. When the share changes, only the
        # jobs new to it are read (see _load_gained), not the whole window again.
        self._loaded_share: tuple[int, int] | None = None
        # The sync under way (it runs while the pass sends what is due already), and the
        # jobs the engine has touched since it began: its rows of them may predate the
        # engine's own news (a claim, a change in this process), so they are not merged.
        self._loading: asyncio.Task[None] | None = None
        self._touched: set[str] | None = None
        self._next_retry_at: datetime | None = None
        self._reload: set[str] = set()
        self._disable: dict[str, str] = {}
        # fires sent and their outcomes, with the retry time of those that failed
        self._unrecorded: list[tuple[Sequence[Fire], list[SendOutcome], datetime]] = []
        self._listener: ChangeListener | None = None
        self._can_listen = True
        self._listener_checked = False  # whether a listener heard its test (see _listen)
        self._listen_again_at: datetime | None = None
        self._changed_elsewhere = False
        self._change_mark: object = None  # the newest updated_at when the last sync began
        self._last_mark: object = None  # the newest updated_at as last read (a sync, a poll)
        self._next_poll_at: datetime | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._lease = timedelta(seconds=config.claim_lease_seconds)
        self._planner = ClaimPlanner(config, self.stats, self._events)
        base = config.dispatch_batch_size
        self._batch_size = base
        self._delayed: list[datetime] = []  # due times of delayed fires claimed here (a heap)
        # Claims ahead of time (claim_ahead_seconds; see taskiq_beat.early): the fires
        # waiting for their time, and the changes heard from other processes so far.
        self._ahead = timedelta(seconds=config.claim_ahead_seconds)
        self._early = EarlyFires(
            self.owner, send_time=timedelta(seconds=config.dispatch_timeout_seconds)
        )
        self._changes_heard = 0
        # Jobs whose next fire comes within claim_ahead_seconds of the one before: claimed
        # when due, never ahead (two of their fires would be claimed at once, here or in
        # two schedulers, and undoing the first could no longer put it back).
        self._on_time: set[str] = set()
        self._largest_batch = max(base, min(base * _BATCH_GROWTH, _LARGEST_GROWN_BATCH))

    # ------------------------------------------------------------------ lifecycle

    @property
    def loaded_jobs(self) -> int:
        """How many jobs the engine holds in memory (those due within the window)."""
        return len(self._jobs)

    @property
    def next_due_at(self) -> datetime | None:
        """The earliest fire time held, if any: of a job due, or of a fire claimed ahead
        and waiting for its time."""
        due = min(self._due.values(), default=None)
        early = self._early.next_at
        if due is None or (early is not None and early < due):
            return early
        return due

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Load the due jobs, then run the loop in a background task."""
        if self.running:
            return
        self._stopping = False
        self._dispatcher.resume()
        # Join the registry before opening the listener, and renew once it is open (at the
        # load): schedulers started together then see each other at their first load more
        # often than not, instead of the first to join reading every job as its own. (One
        # that joined after the first renewal and before the listener is seen at the second.
        # Meanwhile the others let go of this one's share: a fire of it due while the
        # listener opens, milliseconds mostly, waits for this first load.)
        await self._renew(self._clock.now())
        await self._listen()
        self._sharing.news = True
        await self._load_window(self._clock.now(), limit=_FIRST_LOAD)
        self._task = asyncio.create_task(self._run(), name="taskiq-beat-engine")

    async def stop(self) -> None:
        """Stop after the batch in flight: sends already started finish and are recorded,
        fires claimed but not started are released at once for the next scheduler."""
        task = self._task
        if task is None:
            # Driven by tick() (tests, tools): give back and leave the registry all the same.
            await self._give_back_early()
            await self._leave()
            return
        self._stopping = True
        self._dispatcher.halt()
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._config.shutdown_timeout_seconds)
        except asyncio.TimeoutError:
            logger.warning(
                "scheduler loop did not stop within %s s; cancelling it",
                self._config.shutdown_timeout_seconds,
            )
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            self._task = None
            await self._cancel_sync()
            if self._listener is not None:
                await self._listener.close()
                self._listener = None
            await self._give_back_early()
            await self._leave()

    async def _give_back_early(self) -> None:
        """Undo the claims of the fires claimed ahead and not sent: another scheduler (or
        this one, started again) claims them when they are due."""
        await self._early.give_back(self._store)

    async def _leave(self) -> None:
        """Leave the registry of schedulers: the others take this one's share at once."""
        await self._sharing.leave(self._store)

    @property
    def share(self) -> tuple[int, int]:
        """This scheduler's slot among the live schedulers, and how many there are."""
        return self._sharing.share

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            # Cleared before the pass, not before the sleep: a wake-up that arrives while
            # the pass runs (a change in this process, a notification) ends the next sleep.
            self._wakeup.clear()
            try:
                await self._listen()
                await self.tick()
            except Exception as exc:
                failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.last_error_at = self._clock.now()
                delay = min(_ERROR_BACKOFF_BASE * 2 ** (failures - 1), _ERROR_BACKOFF_MAX)
                self._report_failure(exc, failures, delay)
                await self._sleep(delay)
                continue
            self.stats.last_pass_at = self._clock.now()
            if failures:
                logger.info("scheduler loop running again after %d failed passes", failures)
                failures = 0
            await self._sleep(self._idle_delay())

    def _report_failure(self, exc: Exception, failures: int, delay: float) -> None:
        """A database outage, or a statement that was slow or lost to another transaction,
        in one line per retry (then one a minute); anything else in full. A slow statement
        is not called an outage: it says so, for the database answered (or may have)."""
        slow = self._store.contended(exc)
        reason = slow or self._store.unavailable(exc)
        if reason is None:
            logger.error("scheduler loop failed; retrying in %.1f s", delay, exc_info=exc)
        elif failures <= _OUTAGE_LINES or failures % _OUTAGE_REPORT_EVERY == 0:
            logger.warning(
                "%s (%s); retrying in %.1f s (failed passes: %d)",
                "database slow or busy" if slow else "database unavailable",
                reason,
                delay,
                failures,
            )

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a wake-up (now or since the pass began) ends it."""
        if seconds <= 0 or self._stopping:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    def _idle_delay(self) -> float:
        now = self._clock.now()
        deadlines = [now + timedelta(seconds=self._config.idle_sleep_seconds)]
        if self._heap:
            deadlines.append(self._claim_time(self._heap[0]))
        early = self._early.next_at
        if early is not None:
            deadlines.append(early)
        if self._foreign and not self._help_paused:
            deadlines.append(self._foreign[0][0] + self._steal_after)
        if self._sharing.next_renew_at is not None:
            deadlines.append(self._sharing.next_renew_at)
        if self._next_sync_at is not None and self._loading is None:
            deadlines.append(self._next_sync_at)
        if self._loading is None and self._share_gained() is not None:
            deadlines.append(now)
        if self._next_poll_at is not None:
            deadlines.append(self._next_poll_at)
        if self._next_retry_at is not None:
            deadlines.append(self._next_retry_at)
        return max(0.0, (min(deadlines) - now).total_seconds())

    # ------------------------------------------------------------------ changes

    async def _listen(self) -> None:
        """Keep a listener for other processes' changes open, where the database has one."""
        if not self._can_listen or (self._listener is not None and self._listener.alive):
            return
        now = self._clock.now()
        if self._listen_again_at is not None and now < self._listen_again_at:
            return
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
            self._changed_elsewhere = True  # changes may have been missed meanwhile
            self._changes_heard += 1  # and fires claimed ahead are checked against them
        try:
            listener = await self._store.listen(self._heard_change, self._heard_share_change)
            # The first one opened: does it hear anything?
            if listener is not None and not self._listener_checked:
                if not await self._hears(listener):
                    return
                self._listener_checked = True
        except Exception as exc:
            pause = max(5 * self._config.sync_interval_seconds, 1.0)
            self._listen_again_at = now + timedelta(seconds=pause)
            logger.warning("cannot listen for job changes (%s); trying again in %.0f s", exc, pause)
            return
        if listener is None:
            self._can_listen = False  # e.g. SQLite: other processes' changes are polled for
        else:
            # Fires claimed ahead while nobody listened are checked against the rows.
            self._changes_heard += 1
        self._listener = listener

    async def _hears(self, listener: ChangeListener) -> bool:
        """Whether ``listener`` hears the scheduler's own test notification; if not (a
        pooler in transaction mode), it is closed and other processes' changes are looked
        for as on SQLite, by the jobs' newest ``updated_at``, from now on."""
        within = min(_PROBE_WAIT, self._config.database_timeout_seconds)
        try:
            if await self._store.hears(listener, within=within):
                return True
            if not listener.alive:  # its connection dropped meanwhile: not deaf, gone
                raise ConnectionError("the listening connection was lost while tested")
        except BaseException:
            await listener.close()
            raise
        await listener.close()
        self._can_listen = False
        self._changed_elsewhere = True
        logger.warning(
            "the listener for job changes did not hear this scheduler's own test notification"
            " within %g s (a connection pooler in transaction mode takes LISTEN and delivers"
            " nothing): other processes' changes are looked for every %g s instead",
            within,
            min(_CHANGE_POLL_SECONDS, self._config.sync_interval_seconds),
        )
        return False

    def _heard_change(self) -> None:
        self._changed_elsewhere = True
        self._changes_heard += 1
        self._wakeup.set()

    def _heard_share_change(self, instance_id: str) -> None:
        if self._sharing.heard(instance_id):
            self._wakeup.set()

    def job_changed(
        self,
        job_id: str,
        *,
        is_enabled: bool,
        next_run_at: datetime | None,
        revision: int,
        kind: JobKind,
        trigger: Trigger,
        task_name: str,
        args: Any,
        kwargs: Any,
        metadata: Any,
        policy: Any = None,
    ) -> None:
        """Tell the engine a job was created, changed or paused in this process
        (with the values just committed; ``policy`` in its stored form)."""
        self._early.cancel(job_id)
        self._drop(job_id)
        if is_enabled and next_run_at is not None and self._within_horizon(next_run_at):
            parsed = JobPolicy.from_json(policy, job_id=job_id)
            snapshot = JobSnapshot(
                job_id,
                kind,
                trigger,
                revision,
                task_name,
                encode_json(args),
                encode_json(kwargs),
                encode_json(metadata),
                None if parsed.is_default else parsed,
            )
            self._put(snapshot, next_run_at)
            self._wakeup.set()

    def retry_at(self, when: datetime) -> None:
        """Tell the engine a fire failed in this process and is due for a resend at ``when``."""
        if self._next_retry_at is None or when < self._next_retry_at:
            self._next_retry_at = when
            self._wakeup.set()

    def job_deleted(self, job_id: str) -> None:
        """Tell the engine a job was deleted in this process."""
        self._early.cancel(job_id)
        self._drop(job_id)

    def _drop(self, job_id: str) -> None:
        """Forget what the engine holds of a job: it changed, went or cannot fire."""
        self._jobs.pop(job_id, None)
        self._due.pop(job_id, None)
        self._on_time.discard(job_id)
        self._touch(job_id)

    def _touch(self, job_id: str) -> None:
        if self._touched is not None:
            self._touched.add(job_id)

    # ------------------------------------------------------------------ the loop's steps

    async def tick(self) -> int:
        """One pass: sync if due, resend due retries, claim and send everything due now.

        The sync reads the database while the pass claims and sends the jobs already due
        in the heap; the pass waits for it once those are done, and then sends what it
        brought. Returns the number of fires sent to the broker.
        """
        try:
            return await self._pass()
        except BaseException:
            await self._cancel_sync()  # the next pass starts afresh
            raise

    async def _pass(self) -> int:
        if self._unrecorded:
            await self._record()
        now = self._clock.now()
        # Where nothing is heard, and wherever fires are claimed ahead (a listener can be
        # deaf without knowing it: a pooler in transaction mode takes LISTEN and delivers
        # nothing), the jobs' newest updated_at is read every half second.
        if (not self._can_listen or self._ahead) and (
            self._next_poll_at is None or now >= self._next_poll_at
        ):
            await self._poll_changes(now)
        if self._loading is None and self._sharing.renew_due(now):
            await self._renew(now)  # first: what this pass claims is this scheduler's share
        if self._loading is None:
            if self._changed_elsewhere or self._next_sync_at is None or now >= self._next_sync_at:
                self._begin_sync(now)
            elif (gained_from := self._share_gained()) is not None:
                self._begin_load(self._load_gained(gained_from))
        sent = 0
        if self._next_retry_at is not None and now >= self._next_retry_at:
            sent += await self._send_retries()
        sent += await self._dispatch_due()
        if self._reload or self._disable:
            await self._apply_pending()
        return sent

    async def sync(self) -> None:
        """Load the jobs due within the look-ahead window into the heap (after the load
        under way, if any)."""
        await self._sync_done()
        self._begin_sync(self._clock.now())
        await self._sync_done()

    async def _poll_changes(self, now: datetime) -> None:
        """Sync now if the newest ``updated_at`` of the jobs moved since the last sync began
        (the sync reads it again)."""
        self._next_poll_at = now + timedelta(
            seconds=min(_CHANGE_POLL_SECONDS, self._config.sync_interval_seconds)
        )
        self._last_mark = await self._store.last_change()
        if not self._can_listen and self._last_mark != self._change_mark:
            self._changed_elsewhere = True  # (a listener tells the engine of changes)

    def _begin_sync(self, now: datetime) -> None:
        """Start a sync in the background; :meth:`_sync_done` waits for it."""
        self._changed_elsewhere = False  # a change heard from now on needs the next sync
        self._next_retry_at = now  # look for fires left to resend at every sync
        self._begin_load(self._load_window(now))

    def _begin_load(self, load: Coroutine[Any, Any, None]) -> None:
        """Run ``load`` in the background, noting the jobs touched meanwhile."""
        self._touched = set()
        self._loading = asyncio.create_task(load, name="taskiq-beat-sync")

    async def _cancel_sync(self) -> None:
        loading, self._loading = self._loading, None
        if loading is not None:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)

    async def _sync_done(self) -> None:
        loading = self._loading
        if loading is None:
            return
        try:
            await loading
        finally:
            if loading.done():
                self._loading = None

    async def _load_window(self, now: datetime, *, limit: int | None = None) -> None:
        """Load the jobs due within the look-ahead window from ``now``, or the first
        ``limit`` of them (the rest then wait for the next pass's sync)."""
        began = time.perf_counter()
        horizon = now + timedelta(seconds=self._config.lookahead)
        help_paused = self._help_paused  # (a pause from now on waits for the next load)
        try:
            if not self._can_listen:  # before the read: a change after it is polled for
                self._change_mark = self._last_mark = await self._store.last_change()
            # Sharing (not on SQLite): this scheduler's jobs, and those of the others it may
            # soon help with (see _others_before), not every job due.
            if self._sharing.renew_due(now):  # start(), or a tool's sync()
                await self._renew(now)
            share = self._sharing.share
            if self._sharing.alone:
                records = await self._store.load_due(horizon, limit=limit)
            else:
                others_before, others_limit = self._others_to_load(now, first=limit is not None)
                records = await self._store.load_due(
                    horizon,
                    limit=limit,
                    share=share,
                    others_before=others_before,
                    others_limit=others_limit,
                )
            self._horizon = horizon
            added = self._merge(records, skip=self._touched)
            if limit is None and self._sharing.share == share:  # (else: another load soon)
                self._forget_gone(records, horizon, self._touched or ())
        finally:
            self._touched = None
        # (>=: sharing, the others' overdue jobs come beside the first `limit` of its own)
        if limit is not None and len(records) >= limit:
            self._next_sync_at = None  # the rest of the window: at the first pass
            self._loaded_share = None
            logger.debug("loaded the first %d due jobs", limit)
            return
        # Counted from the end of the load: a long one (100k jobs at start) is not followed
        # at once by another. And at least _SYNC_SPACING times as long as this one took: a
        # sync reads every job due, also those waiting in the heap, so a scheduler working
        # through a backlog of 100k would otherwise spend a third of its time reading it.
        took = time.perf_counter() - began
        interval = max(self._config.sync_interval_seconds, _SYNC_SPACING * took)
        self.stats.last_sync_at = self._clock.now()
        self._next_sync_at = self.stats.last_sync_at + timedelta(seconds=interval)
        self._loaded_share = share  # (renewed while this load ran: see _share_gained)
        if help_paused:
            self._help_paused = False
        logger.debug("synced %d due jobs (%d new) up to %s", len(records), added, horizon)

    def _share_gained(self) -> tuple[int, int] | None:
        """The share whose whole window the heap holds, if this scheduler's share changed
        since (the jobs new to it are then to be loaded)."""
        loaded = self._loaded_share
        return loaded if loaded is not None and loaded != self._sharing.share else None

    async def _load_gained(self, before: tuple[int, int]) -> None:
        """Load the jobs that joined this scheduler's share since the heap held the whole
        window of the share ``before``: those of the new share that were not of that one,
        due by the end of that window (a scheduler that was alone holds them all). The
        next sync reads the whole window at its time, as it would have."""
        share = self._sharing.share
        records: list[JobRecord] = []
        try:
            if before[1] > 1 and self._horizon is not None:
                records = await self._store.load_due(self._horizon, share=share, gained_from=before)
                self._merge(records, skip=self._touched)
        finally:
            self._touched = None
        if self._loaded_share == before:  # (else: changed again meanwhile, see _renew)
            self._loaded_share = share
        logger.debug("loaded %d due jobs new to this scheduler's share", len(records))

    def _others_to_load(self, now: datetime, *, first: bool) -> tuple[datetime, int | None]:
        """Which of the other schedulers' jobs a load brings beside this one's share: those
        overdue by half of ``_steal_after`` (held when the time comes to help with them, a
        sync interval later at most); only the earliest ``_OTHERS_WHEN_BEHIND`` batches of
        them at the first load and while this scheduler is behind on its own jobs. It helps
        only with nothing of its own due, so reading and parsing the whole of the others'
        backlog would be spent for nothing until then: with a backlog due at once, each of
        K schedulers read all of it at every sync, and lost the claims of the others' jobs
        it tried to help with to their owners. A dead scheduler's jobs still go at that
        many a sync at least."""
        overdue = now - self._steal_after / 2
        heap, due = self._heap, self._due
        while heap and due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale: its job moved or is gone
        if first or self._help_paused or (heap and heap[0][0] <= overdue):
            return overdue, _OTHERS_WHEN_BEHIND * self._config.dispatch_batch_size
        return overdue, None

    def _forget_gone(
        self, records: list[JobRecord], horizon: datetime, touched: Collection[str]
    ) -> None:
        """After a whole window's load: drop the jobs held for a time within it that the
        load did not return (claimed by another scheduler, moved, paused or deleted
        meanwhile), unless this engine touched them since the load began. With several
        schedulers on one backlog, each would otherwise try to claim every job of it, most
        of them taken by the others by then."""
        loaded = {record.id for record in records}
        gone = [
            job_id
            for job_id, when in self._due.items()
            if when <= horizon and job_id not in loaded and job_id not in touched
        ]
        for job_id in gone:
            del self._due[job_id]
            del self._jobs[job_id]
        if gone:
            logger.debug("%d jobs held are no longer due here (taken or changed)", len(gone))
        self._compact_foreign()
        self._sharing.keep_keys(self._due)

    def _compact_foreign(self) -> None:
        """Rebuild the heap of other schedulers' jobs without its stale entries once they
        outnumber the live ones: its jobs move (their scheduler claims them) without this
        one ever popping their old entries while it is busy with its own."""
        foreign = self._foreign
        if len(foreign) <= _FOREIGN_SLACK * len(self._due) + 1024:
            return
        due = self._due
        self._foreign = [entry for entry in foreign if due.get(entry[2]) == entry[0]]
        heapq.heapify(self._foreign)

    def _merge(self, records: list[JobRecord], *, skip: set[str] | None = None) -> int:
        with gc_paused():
            return self._merge_records(records, skip or ())

    def _merge_records(self, records: list[JobRecord], skip: Collection[str]) -> int:
        added: list[tuple[datetime, str]] = []
        broken: dict[str, str] = {}
        jobs = self._jobs
        due = self._due
        for record in records:
            job_id = record.id
            if job_id in skip:  # the engine knows newer of it than this row
                continue
            current = jobs.get(job_id)
            when = record.next_run_at
            if current is not None and when is not None and current.holds(record):
                if due[job_id] != when:  # moved by another scheduler's claim
                    due[job_id] = when
                    added.append((when, job_id))
                continue
            try:
                snapshot = snapshot_of(record)
            except CorruptJobError as exc:
                broken[job_id] = str(exc)
                continue
            if snapshot is None or when is None:
                jobs.pop(job_id, None)
                due.pop(job_id, None)
                continue
            jobs[job_id] = snapshot
            due[job_id] = when
            added.append((when, job_id))
        self._push(added)
        if broken:
            self._disable_later(broken)
        return len(added)

    def _put(self, snapshot: JobSnapshot, when: datetime) -> None:
        """Hold ``snapshot``, due at ``when``."""
        self._jobs[snapshot.id] = snapshot
        self._due[snapshot.id] = when
        own, entry = self._sharing.entry(when, snapshot.id)
        heapq.heappush(self._heap if own else self._foreign, entry)

    def _push(self, added: list[tuple[datetime, str]]) -> None:
        """Put many jobs (already held, at these times) on the heap: a heap that grows by
        more than it holds is rebuilt in linear time instead of pushed to one entry at a
        time."""
        if self._sharing.alone:
            rank = self._sharing.rank
            self._push_to(self._heap, [(when, rank(job_id), job_id) for when, job_id in added])
            return
        own: list[HeapEntry] = []
        foreign: list[HeapEntry] = []
        entry = self._sharing.entry
        for when, job_id in added:
            mine, item = entry(when, job_id)
            (own if mine else foreign).append(item)
        self._push_to(self._heap, own)
        self._push_to(self._foreign, foreign)

    @staticmethod
    def _push_to(heap: list[HeapEntry], entries: list[HeapEntry]) -> None:
        if len(entries) > len(heap):
            heap.extend(entries)
            heapq.heapify(heap)
        else:
            for entry in entries:
                heapq.heappush(heap, entry)

    async def _renew(self, now: datetime) -> None:
        """Renew this scheduler's place among the live ones; a change of its share sorts
        the jobs held anew between its heap and the others', and is loaded at once: where
        a sync reads only this scheduler's share (and little of the others'), the jobs that
        joined it are not held yet. A share changes in its jobs, not only in its size,
        whenever the number of schedulers does (a job's slot is its hash modulo that
        number): one of two that becomes one of three takes about half of its new jobs from
        the other's former share."""
        before = self._sharing.share
        if not await self._sharing.renew(self._store, now):
            return
        if self._loaded_share != before:
            # A second change before the jobs new to the first were loaded (or while they
            # are): the heap no longer holds the window of the share last loaded whole
            # (the first change let go of the jobs that left it), so only a whole load of
            # the window is sure to bring every job of this one.
            self._loaded_share = None
        # The jobs held that are not this scheduler's go, those that left its share with
        # those of the others it held: their owners hold them (and the next sync brings
        # what is left overdue of theirs, as every sync does).
        due, owns = self._due, self._sharing.owns
        gone = [job_id for job_id in due if not owns(job_id)]
        for job_id in gone:
            del due[job_id]
            del self._jobs[job_id]
        self._heap, self._foreign = [], []  # rebuilt without stale entries
        self._push([(when, job_id) for job_id, when in due.items()])
        self._sharing.keep_keys(due)
        if self._loaded_share is None:
            self._next_sync_at = now  # the whole window, of the new share

    def _held_until(self) -> datetime | None:
        """The latest fire time of a job the heap holds: the end of the last sync's window,
        or the look-ahead from now if that is later (None before the first sync).

        The window alone is not enough: it ends one look-ahead after the last sync began,
        syncs come a little more than a sync interval apart, and each job whose next fire
        fell in between dropped out of the heap, to be loaded (its trigger parsed) again."""
        if self._horizon is None:
            return None
        return max(self._horizon, self._clock.now() + timedelta(seconds=self._config.lookahead))

    def _within_horizon(self, when: datetime) -> bool:
        held_until = self._held_until()
        return held_until is not None and when <= held_until

    def _pop_due(self, now: datetime) -> tuple[list[JobSnapshot], list[datetime]]:
        """The next batch of due jobs, and the fire time each was held for. While more are
        due than a batch holds, each batch is twice the last (up to ``_BATCH_GROWTH`` times
        ``dispatch_batch_size``): far behind, the cost of each batch (transactions, round
        trips) is spread over more fires."""
        batch: list[JobSnapshot] = []
        times: list[datetime] = []
        heap = self._heap
        limit = self._batch_size
        self._take(heap, now, limit, batch, times, early_until=now + self._ahead)
        if len(batch) < limit and self._foreign and not self._help_paused:
            # Nothing more of its own is due: help with the others' jobs that their
            # scheduler left overdue (it died, or is behind), a batch of the base size at
            # most (an owner that is only behind claims some of them meanwhile: small
            # claims lose little to each other).
            own = len(batch)
            most = min(limit, max(own, self._config.dispatch_batch_size))
            self._take(self._foreign, now - self._steal_after, most, batch, times)
            if len(batch) > own:
                logger.debug("taking %d overdue jobs of other schedulers", len(batch) - own)
        if len(batch) < limit:
            self._batch_size = self._config.dispatch_batch_size
        elif heap and heap[0][0] <= now:
            self._batch_size = min(limit * 2, self._largest_batch)
        return batch, times

    def _take(
        self,
        heap: list[HeapEntry],
        until: datetime,
        most: int,
        batch: list[JobSnapshot],
        times: list[datetime],
        *,
        early_until: datetime | None = None,
    ) -> None:
        """Move the jobs of ``heap`` due at or before ``until`` into ``batch`` (and their
        fire times into ``times``) until it holds ``most``; stale entries are dropped.

        With ``early_until`` later than ``until`` (claims ahead of time), also those due by
        then that may be claimed ahead (see :meth:`_claim_time`), up to the first that may
        not."""
        jobs = self._jobs
        due = self._due
        last = until if early_until is None else max(until, early_until)
        while heap and heap[0][0] <= last and len(batch) < most:
            entry = heap[0]
            when, _, job_id = entry
            if when > until and due.get(job_id) == when and self._claim_time(entry) > until:
                break  # claimed on time, and those behind it wait for it
            heapq.heappop(heap)
            if due.get(job_id) == when:
                del due[job_id]
                batch.append(jobs.pop(job_id))
                times.append(when)

    def _claim_time(self, entry: HeapEntry) -> datetime:
        """When the fire of a heap entry may be claimed: ``claim_ahead_seconds`` before its
        time if its job has no policy (whose limits and jitter count at the fire's time)
        and no fire waiting already, else at its time."""
        when, _, job_id = entry
        if not self._ahead or job_id in self._early or job_id in self._on_time:
            return when
        snapshot = self._jobs.get(job_id)
        if snapshot is None or snapshot.policy is not None:
            return when
        return when - self._ahead

    async def _dispatch_due(self) -> int:
        """Claim, send and record every due batch, overlapping the database with the broker:
        while batch n is being sent, the next ``_CLAIMS_IN_FLIGHT`` batches are being claimed
        and batch n-1 recorded. (Claims of different batches touch different jobs; a job is
        off the heap from its claim until the claim is done.)"""
        sent = 0
        claims: collections.deque[asyncio.Task[Sequence[Fire]]] = collections.deque()
        recording: asyncio.Task[None] | None = None

        async def send(fires: Sequence[Fire]) -> int:
            nonlocal recording
            outcomes = await self._dispatcher.send(fires)
            retry_at = self._clock.now() + timedelta(seconds=self._config.dispatch_retry_seconds)
            self._unrecorded.append((fires, outcomes, retry_at))
            if any(outcome.error is not None for outcome in outcomes):
                # A slow or failing broker: no more claims in flight than the default.
                self._batch_size = self._config.dispatch_batch_size
            if recording is not None:
                await recording
            recording = asyncio.create_task(self._record())
            return self._report(fires, outcomes, retry_at)

        try:
            if self._ahead:
                for ready in await self._send_early():
                    sent += await send(ready)
            self._claim_ahead(claims)
            while True:
                if not claims:
                    if self._loading is None or self._stopping:
                        break
                    await self._sync_done()  # then send what it brought
                    self._claim_ahead(claims)
                    continue
                fires = await claims.popleft()
                if self._sharing.news and not self._sharing.renewing:
                    # Another scheduler joined or left: take the new share before claiming
                    # more (this pass may go on for long, a sync under way included).
                    await self._renew(self._clock.now())
                if self._ahead:
                    for early in await self._send_early():  # before what is claimed next
                        sent += await send(early)
                if not self._stopping:
                    self._claim_ahead(claims)
                if fires:
                    sent += await send(fires)
        finally:
            # Only after a failure: give back what the claims still in flight took, unsent.
            for claimed in await asyncio.gather(*claims, return_exceptions=True):
                if not isinstance(claimed, BaseException):
                    self._unrecorded.append((claimed, [RELEASED] * len(claimed), _NEVER))
            if recording is not None:
                await recording
        return sent

    def _claim_ahead(self, claims: collections.deque[asyncio.Task[Sequence[Fire]]]) -> None:
        """Start claiming due batches until ``_CLAIMS_IN_FLIGHT`` claims are under way.

        None once a sync (or a renewal, see ``_renew``) is due and no sync is under way: the
        pass then ends with the batches under way, and the next one starts it (with jobs due
        all the time, a pass would otherwise never end, and changes made elsewhere, retries
        and reloads would wait for a gap)."""
        now = self._clock.now()
        if self._loading is None and (
            (self._next_sync_at is not None and now >= self._next_sync_at)
            or self._sharing.renew_due(now)
            or self._share_gained() is not None
        ):
            return
        if self._early.has_cancelled:
            return  # their claims are undone first (_send_early), then they may be claimed
        while len(claims) < _CLAIMS_IN_FLIGHT:
            batch, times = self._pop_due(now)
            if not batch:
                return
            if self._touched is not None:
                self._touched.update(snapshot.id for snapshot in batch)
            claims.append(asyncio.create_task(self._claim(batch, times, now)))

    async def _claim(
        self, batch: list[JobSnapshot], held_for: list[datetime], now: datetime
    ) -> Sequence[Fire]:
        """Claim the fires of ``batch`` (each job held for the time at the same index)."""
        if self._ahead and max(held_for) > now:
            batch, held_for = self._claimable_ahead(batch, held_for, now)
            if not batch:
                return []
        claims, policies, following = self._planner.plan(batch, held_for, now)
        held_back = 0
        # A fire claimed ahead is this scheduler's until a lease after its time.
        latest = max(held_for)
        lease_until = max(now, latest) + self._lease
        early = latest > now
        # What was known of other processes' changes before the claim (see
        # taskiq_beat.early): any change since is looked for before its fires are sent.
        heard, mark = self._changes_heard, self._last_mark
        if early:  # held from now on: a change heard while the claim runs takes them back
            for snapshot, expected, after in zip(batch, held_for, following, strict=True):
                if expected > now:
                    self._early.note(snapshot.id, snapshot.revision, after)
        try:
            if policies:
                fires, lost, outcome = await self._store.claim_with_policies(
                    claims, policies, now=now, lease_until=lease_until, owner=self.owner
                )
                held_back = len(outcome.held_back)
                if outcome.delayed_until:
                    for when in outcome.delayed_until:
                        heapq.heappush(self._delayed, when)
                    self.retry_at(outcome.delayed_until[0])
                if held_back:
                    logger.debug("%d fires held back by their jobs' policies", held_back)
            else:
                fires, lost = await self._store.claim(
                    claims, now=now, lease_until=lease_until, owner=self.owner
                )
        except BaseException:
            # Nothing was claimed: keep the batch due, unless the job changed meanwhile.
            if early:
                self._early.forget(snapshot.id for snapshot in batch)
            for snapshot, expected in zip(batch, held_for, strict=True):
                if snapshot.id not in self._jobs:
                    self._put(snapshot, expected)
            raise
        if self._touched is not None:  # a sync began while this claim was under way
            self._touched.update(snapshot.id for snapshot in batch)
        held_until = self._held_until()  # once per batch
        for snapshot, after in zip(batch, following, strict=True):
            if snapshot.id in lost:
                self._reload.add(snapshot.id)
                continue
            changed_meanwhile = snapshot.id in self._jobs
            if (
                after is not None
                and held_until is not None
                and after <= held_until
                and not changed_meanwhile
            ):
                self._put(snapshot, after)
        missed = len(batch) - len(fires) - held_back
        if missed:
            # Another scheduler works on the same jobs: no larger batches. On PostgreSQL a
            # claim re-checks each row another scheduler changed since the claim began, at
            # a cost that grows with the batch: 8,192 claims among rows taken meanwhile ran
            # for over 10 s, where 256 take milliseconds.
            self._batch_size = self._config.dispatch_batch_size
        if lost or missed:
            logger.debug(
                "%d claims lost to concurrent changes (reloading them), %d taken or held by"
                " another scheduler (or claimed before)",
                len(lost),
                missed - len(lost),
            )
        if 2 * missed > len(batch) and not self._sharing.owns(batch[-1].id):
            # Most of a batch of help (its last jobs are another's) lost to their owner,
            # alive and at them: no more help until the next sync, which reads only a
            # little of what is left of theirs (see _others_to_load). It went on through
            # every job of theirs held, 256 lost claims at a time.
            self._help_paused = True
        elif 2 * missed > len(batch) and self._loading is None:
            # Most of the batch was someone else's: another scheduler works on the same
            # backlog. Sync now (the pass ends with the batches under way): the load drops
            # what the others took meanwhile (see _forget_gone) instead of claiming it here.
            self._next_sync_at = now
        if early:
            return self._hold_early(batch, fires, heard, mark, lease_until)
        return fires

    def _claimable_ahead(
        self, batch: list[JobSnapshot], held_for: list[datetime], now: datetime
    ) -> tuple[list[JobSnapshot], list[datetime]]:
        """``batch`` without the jobs due later than ``now`` whose next fire comes within
        ``claim_ahead_seconds`` of this one: those go back to wait for their time."""
        kept: list[JobSnapshot] = []
        times: list[datetime] = []
        following: dict[tuple[int, datetime], datetime | None] = {}  # once per schedule
        for snapshot, expected in zip(batch, held_for, strict=True):
            if expected > now:
                key = (id(snapshot.trigger), expected)
                if key not in following:
                    following[key] = snapshot.trigger.get_next_run_at(expected)
                after = following[key]
                if after is not None and after - expected <= self._ahead:
                    self._on_time.add(snapshot.id)
                    if snapshot.id not in self._jobs:  # unless it changed meanwhile
                        self._put(snapshot, expected)
                    continue
            kept.append(snapshot)
            times.append(expected)
        return kept, times

    def _hold_early(
        self,
        batch: list[JobSnapshot],
        fires: Sequence[Fire],
        heard: int,
        mark: Any,
        lease_until: datetime,
    ) -> Sequence[Fire]:
        """Keep the fires of a claimed batch that are not due yet (see
        :mod:`taskiq_beat.early`); return those to send now. The jobs noted before the
        claim whose fire was not claimed (lost, taken elsewhere) are no longer held."""
        assert isinstance(fires, ClaimedFires)
        claimed = set(fires.job_ids)
        self._early.forget(snapshot.id for snapshot in batch if snapshot.id not in claimed)
        if not fires:
            return fires
        return self._early.hold(
            fires, self._clock.now(), heard=heard, mark=mark, lease_until=lease_until
        )

    async def _send_early(self) -> list[ClaimedFires]:
        """The fires claimed ahead whose time has come, as one batch, less those whose job
        changed since their claim (their claims undone, the jobs to reload)."""
        early = self._early
        now = self._clock.now()
        if not early.has_cancelled and (early.next_at is None or early.next_at > now):
            return []
        ready, changed, mark = await early.ready(self._store, now, heard=self._changes_heard)
        if mark is not None:
            self._last_mark = mark
        self._reload.update(changed)
        return ready

    async def _send(self, fires: Sequence[Fire]) -> int:
        if not fires:
            return 0
        outcomes = await self._dispatcher.send(fires)
        now = self._clock.now()
        retry_at = now + timedelta(seconds=self._config.dispatch_retry_seconds)
        self._unrecorded.append((fires, outcomes, retry_at))
        await self._record()
        return self._report(fires, outcomes, retry_at)

    async def _record(self) -> None:
        """Write the outcomes of sends; kept in memory and retried while the database fails."""
        while self._unrecorded:
            fires, outcomes, retry_at = self._unrecorded[0]
            await self._store.record(
                fires,
                outcomes,
                now=self._clock.now(),
                retry_at=retry_at,
                keep_runs=self._config.record_runs,
            )
            self._unrecorded.pop(0)

    def _report(
        self, fires: Sequence[Fire], outcomes: list[SendOutcome], retry_at: datetime
    ) -> int:
        """Log and count a batch's outcomes (see :class:`SendReport`); schedule the retry of
        failed sends; disable jobs that can never be sent."""
        sent, failed, final = self._send_report.batch(fires, outcomes, retry_at)
        if failed:
            # Kept with the delayed fires' times: a look for resends before then (at a sync)
            # must not forget when these are due.
            heapq.heappush(self._delayed, retry_at)
            self.retry_at(retry_at)
        if final:
            self._disable_later(final)
        return sent

    async def _send_retries(self) -> int:
        now = self._clock.now()
        self._next_retry_at = None
        limit = self._config.dispatch_batch_size
        fires = await self._store.claim_retries(
            now=now, lease_until=now + self._lease, owner=self.owner, limit=limit
        )
        if fires:
            # Delayed (jittered), buffered and backfilled fires, and failed sends (which
            # were logged as they failed).
            logger.debug("sending %d fires due for a (further) attempt", len(fires))
        if len(fires) == limit:
            # More are due: the next pass sends another batch of them first, then the fires
            # due on time. (No larger batches: an overloaded scheduler's own leases run out
            # before it records its sends, and each resend of those adds to the load.)
            self._next_retry_at = now
        # The next delayed (jittered) fire this engine claimed, to the microsecond; others'
        # and the rest are looked for at every sync.
        delayed = self._delayed
        while delayed and delayed[0] <= now:
            heapq.heappop(delayed)
        if delayed:
            self.retry_at(delayed[0])
        return await self._send(fires)

    def _disable_later(self, errors: dict[str, str]) -> None:
        for job_id, message in errors.items():
            logger.warning("disabling job %s: %s", job_id, message)
            self._drop(job_id)
            if self._events.wants(EventKind.JOB_DISABLED):
                self._events.emit(SchedulerEvent(EventKind.JOB_DISABLED, job_id, error=message))
        self._disable.update(errors)

    async def _apply_pending(self) -> None:
        """Disable jobs that cannot fire and reload jobs whose claim was lost."""
        if self._disable:
            errors, self._disable = self._disable, {}
            await self._store.disable_jobs(errors, now=self._clock.now())
        ids, self._reload = self._reload, set()
        records = await self._store.load_jobs(ids)
        if self._touched is not None:  # fresher than the rows of a sync under way
            self._touched.update(ids)
        self._merge(
            [
                r
                for r in records
                if r.is_enabled
                and r.next_run_at is not None
                and self._within_horizon(r.next_run_at)
            ]
        )
