"""The registry of running schedulers, by which several share the due jobs.

Each scheduler renews its row of ``scheduler_instance`` (see
:class:`~taskiq_beat.models.SchedulerInstance`) and reads the ids of those seen recently, in
one short transaction. Joining and leaving are announced on the job change channel
(PostgreSQL ``NOTIFY``, payload :data:`~taskiq_beat.store._common.SHARE_CHANGED`), so the
others share anew at once instead of at their next renewal.
"""

from __future__ import annotations

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
)

__all__ = ["InstanceOperations"]

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
        registers again)."""
        async with self._transaction() as executor:
            # An update, then an insert where there was no row: the same on every database
            # (no other process writes this scheduler's row).
            renewed = await executor.execute(
                sa.update(_instance).where(_instance.c.id == instance_id).values(last_seen_at=now)
            )
            if not getattr(renewed, "rowcount", 0):
                await executor.execute(
                    sa.insert(_instance).values(id=instance_id, started_at=now, last_seen_at=now)
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
