"""How several schedulers on one database share the due jobs (see the README's "Several
schedulers").

Each scheduler renews its row of the registry (``scheduler_instance``, through the store)
and takes its place among the live schedulers' ids, sorted: with K of them, its slot. A job
belongs to the scheduler whose slot is a stable hash of the job id modulo K (:func:`slot_of`,
which PostgreSQL, MySQL and MariaDB compute alike in a sync's query). This module decides
the order in which a scheduler takes the jobs due at one time (:meth:`Sharing.entry`), and
whether a job is its own; the engine keeps the heaps. Exactly-once never rests on the
shares: every fire is still claimed by compare-and-set.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection

    from taskiq_beat.store import SchedulerStore

__all__ = ["HeapEntry", "Sharing", "slot_of"]

logger = logging.getLogger(__name__)

_RENEW_EVERY_MAX = 1.0
"""Seconds between two renewals of a scheduler's row, at most."""
_MASK64 = (1 << 64) - 1
_RANKS = 1 << 64  # ranks are 64-bit (see _mix)

HeapEntry = tuple[datetime, int, str]
"""(fire time, rank, job id): jobs due at one time come off a heap in the order of rank."""


class Sharing:
    """One scheduler's share of the jobs, and the order in which it takes them."""

    def __init__(self, owner: str, *, lease_seconds: float) -> None:
        self.owner = owner
        self.index, self.count = 0, 1
        self.renewing = False
        self._salt = hash(owner)
        self._slot_salts: list[int] = [0]
        # Each job's hash (see _key) once computed, while sharing: an MD5 a job every time
        # the engine puts it on a heap (every fire of a periodic job, every job held at a
        # change of share) was a third of what a scheduler spent on its jobs beside a kiq.
        self._keys: dict[str, int] = {}
        self._silent_after = timedelta(seconds=lease_seconds)
        self._renew_every = timedelta(seconds=min(_RENEW_EVERY_MAX, lease_seconds / 3))
        self.next_renew_at: datetime | None = None
        """When to renew the registry's row next; ``None``: not registered."""
        self.news = False
        """Another scheduler joined or left since the last renewal."""

    @property
    def alone(self) -> bool:
        return self.count == 1

    @property
    def share(self) -> tuple[int, int]:
        """This scheduler's slot, and the number of live schedulers."""
        return self.index, self.count

    def heard(self, instance_id: str) -> bool:
        """A scheduler joined or left (announced by the database): whether that is news
        (its own joining is not)."""
        if instance_id == self.owner:
            return False
        self.news = True
        return True

    def renew_due(self, now: datetime) -> bool:
        """Whether to renew before this pass claims (and not renewing already)."""
        if self.renewing:
            return False
        return self.news or self.next_renew_at is None or now >= self.next_renew_at

    async def renew(self, registry: SchedulerStore, now: datetime) -> bool:
        """Renew this scheduler's row and take its slot among the live schedulers (their
        ids, sorted). Returns whether the share changed (the engine then sorts the jobs it
        holds anew)."""
        joining = self.next_renew_at is None
        self.news = False
        self.renewing = True
        try:
            live = await registry.renew_instance(
                self.owner, now=now, silent_since=now - self._silent_after, joining=joining
            )
        finally:
            self.renewing = False
        self.next_renew_at = now + self._renew_every
        count = max(1, len(live))
        index = live.index(self.owner) if self.owner in live else 0
        if (index, count) == self.share:
            return False
        if count != self.count:
            if count == 1:
                logger.info("this scheduler takes all the jobs (no other is running)")
            else:
                logger.info("%d schedulers share the jobs; this one takes 1/%d", count, count)
        logger.debug("schedulers sharing the jobs: %s (this one: %s)", live, self.owner)
        self.index, self.count = index, count
        self._slot_salts = [_mix((count << 32) | slot) for slot in range(count)]
        if count == 1:
            self._keys = {}  # (alone, a job's rank needs no MD5)
        return True

    def owns(self, job_id: str) -> bool:
        """Whether ``job_id`` is in this scheduler's share."""
        return self.count == 1 or self._key_of(job_id) % self.count == self.index

    def keep_keys(self, held: Collection[str]) -> None:
        """Forget the hashes of jobs no longer held, once they outnumber those held."""
        keys = self._keys
        if len(keys) > 2 * len(held) + 1024:
            self._keys = {job_id: keys[job_id] for job_id in held if job_id in keys}

    def _key_of(self, job_id: str) -> int:
        key = self._keys.get(job_id)
        if key is None:
            key = self._keys[job_id] = _key(job_id)
        return key

    async def leave(self, registry: SchedulerStore) -> None:
        """Leave the registry: the others take this one's share at once (if this fails,
        they do when its row ages out)."""
        if self.next_renew_at is None:
            return
        self.next_renew_at = None
        try:
            await registry.remove_instance(self.owner)
        except Exception as exc:
            logger.warning("could not leave the registry of schedulers (%s)", exc)

    def rank(self, job_id: str) -> int:
        """Where ``job_id`` comes among the jobs due at the same time for a scheduler alone:
        a hash salted with its owner id, so each scheduler takes a backlog in an order of its
        own (two with the same order would claim the same batches at the same time, and
        split each between them row by row; with orders of their own most of their batches
        are disjoint)."""
        return _mix(hash(job_id) ^ self._salt)

    def entry(self, when: datetime, job_id: str) -> tuple[bool, HeapEntry]:
        """Whether ``job_id`` is this scheduler's own, and its heap entry.

        Alone, a scheduler takes the jobs due at one time in an order of its own (see
        :meth:`rank`). Sharing, each takes its own jobs in the order of a hash salted with
        its slot, which every scheduler can compute: another's jobs wait in the engine's
        heap of foreign jobs in the reverse of their owner's order, so a scheduler that
        helps with them starts at the end its owner reaches last, and the two meet once
        instead of claiming the same jobs all along."""
        index, count = self.index, self.count
        if count == 1:
            return True, (when, self.rank(job_id), job_id)
        key = self._key_of(job_id)
        slot = key % count
        rank = _mix(key ^ self._slot_salts[slot])
        if slot == index:
            return True, (when, rank, job_id)
        # Of the K - 1 schedulers that may help the owner, the p-th starts at p/(K - 1) of
        # the way down from the owner's last job: two helpers do not take the same jobs.
        helper = index if index < slot else index - 1
        start = (_RANKS - helper * _RANKS // (count - 1)) % _RANKS
        return False, (when, (start - rank) % _RANKS, job_id)


def _mix(value: int) -> int:
    """SplitMix64's finaliser: every bit of ``value`` moves every bit of the result, so the
    order of ``_mix(h ^ salt)`` for one salt says nothing of the order for another (a
    tuple's hash, or ``h ^ salt`` alone, keep much of one order in the other)."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _key(job_id: str) -> int:
    """A hash of ``job_id`` that every process computes alike (Python's ``hash`` of a string
    differs from one process to the next), and the database too (see the dialects'
    ``slot_of_job``): the first 28 bits of its MD5."""
    return int(hashlib.md5(job_id.encode(), usedforsecurity=False).hexdigest()[:7], 16)


def slot_of(job_id: str, count: int) -> int:
    """Which of ``count`` schedulers' share ``job_id`` is in."""
    return _key(job_id) % count
