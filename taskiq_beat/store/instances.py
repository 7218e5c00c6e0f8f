"""The registry of running schedulers, by which several share the due jobs.

Each scheduler renews its row of ``scheduler_instance`` (see
:class:`~taskiq_beat.models.SchedulerInstance`) and reads the ids of those seen recently, in
one short transaction. Joining and leaving are announced on the job change channel
(PostgreSQL ``NOTIFY``, payload :data:`~taskiq_beat.store._common.SHARE_CHANGED`), so the
others share anew at once instead of at their next renewal.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import cast

import sqlalchemy as sa

from taskiq_beat.models import SchedulerInstance
from taskiq_beat.store._base import StoreCore, _time_limited
from taskiq_beat.store._common import (
    CHANGES_CHANNEL,
    SHARE_CHANGED,
    _dialect_name,
    _Executor,
    _upsert,
)

__all__ = ["InstanceOperations"]

logger = logging.getLogger("taskiq_beat.sharing")  # the registry is the sharing's

_RENEWAL_RUNS = 3

_instance = cast("sa.Table", SchedulerInstance.__table__)


async def _announce(executor: _Executor, instance_id: str) -> None:
    if _dialect_name(executor) == "postgresql":
        payload = SHARE_CHANGED + instance_id
        await executor.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, payload)))


class InstanceOperations(StoreCore):
    """Heartbeats of the schedulers themselves (workers have theirs in ``scheduler_worker``)."""

    @_time_limited
    async def renew_instance(
        self, instance_id: str, *, now: datetime, silent_since: datetime, joining: bool = False
    ) -> list[str]:
        """Renew this scheduler's row (create it if missing) and return the ids of the
        schedulers seen at or after ``silent_since``, this one included, sorted. ``joining``
        announces it to the others. Rows of schedulers silent since before then are deleted,
        and that is announced too (they died, or lost their database; one that comes back
        registers again).

        A deadlock with another scheduler's renewal (MySQL and MariaDB lock the gaps
        between rows) runs the transaction again, up to ``_RENEWAL_RUNS`` times in all."""
        runs = 1
        while True:
            try:
                return await self._renew_instance(instance_id, now, silent_since, joining)
            except sa.exc.DBAPIError as exc:
                if runs == _RENEWAL_RUNS or not self.deadlocked(exc):
                    raise
            logger.debug("the renewal of this scheduler's row deadlocked; running it again")
            runs += 1

    async def _renew_instance(
        self, instance_id: str, now: datetime, silent_since: datetime, joining: bool
    ) -> list[str]:
        async with self._transaction() as executor:
            if joining:
                # One insert (or the update of a row this id left behind). Not an update
                # first: on MySQL and MariaDB an update that finds no row locks the gap where
                # the row would go, and schedulers starting together, each then inserting
                # into that gap, deadlocked.
                await executor.execute(
                    _upsert(
                        _dialect_name(executor),
                        _instance,
                        lambda new: {
                            "started_at": new.started_at,
                            "last_seen_at": new.last_seen_at,
                        },
                        {"id": instance_id, "started_at": now, "last_seen_at": now},
                    )
                )
            else:
                # The row is there (no other process writes it): an update of it alone. It
                # may have been deleted meanwhile, this scheduler taken for silent: then an
                # insert.
                renewed = await executor.execute(
                    sa.update(_instance)
                    .where(_instance.c.id == instance_id)
                    .values(last_seen_at=now)
                )
                if not getattr(renewed, "rowcount", 0):
                    await executor.execute(
                        sa.insert(_instance).values(
                            id=instance_id, started_at=now, last_seen_at=now
                        )
                    )
            rows = await executor.execute(
                sa.select(_instance.c.id, _instance.c.last_seen_at).order_by(_instance.c.id)
            )
            live: list[str] = []
            silent: list[str] = []
            for row_id, seen in rows:
                (live if seen >= silent_since else silent).append(row_id)
            if silent:
                await executor.execute(
                    sa.delete(_instance).where(
                        _instance.c.id.in_(silent), _instance.c.last_seen_at < silent_since
                    )
                )
            if joining or silent:
                await _announce(executor, instance_id)
            return live

    @_time_limited
    async def remove_instance(self, instance_id: str) -> None:
        """Delete this scheduler's row (it stops): the others take its share at once."""
        async with self._transaction() as executor:
            removed = await executor.execute(
                sa.delete(_instance).where(_instance.c.id == instance_id)
            )
            if getattr(removed, "rowcount", 0):
                await _announce(executor, instance_id)
