"""The engine's operations, each in a session of its own: load due jobs, claim fires by
compare-and-set, claim retries, record what was sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import (
    Any,
)

import sqlalchemy as sa

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import is_mysql
from taskiq_beat.store._base import StoreCore, _time_limited
from taskiq_beat.store._common import (
    CHANGES_CHANNEL,
    PROBE,
    ChangeListener,
    _dialect,
    _dialect_name,
    _job,
    _records,
    _returns_rows,
    _run,
    _select_payloads,
    _select_records,
)
from taskiq_beat.store.dialects import batch_sql as _batch_sql
from taskiq_beat.store.dialects import sql_of_dialect
from taskiq_beat.store.policies import apply_policies, limits_of, release_waiting
from taskiq_beat.store.values import (
    SENT,
    ClaimedFires,
    Claims,
    Fire,
    FirePolicies,
    JobRecord,
    PolicyOutcome,
    SendOutcome,
)

__all__ = ["ClaimOperations"]


class ClaimOperations(StoreCore):
    """What the scheduling loop asks of the database (see the package docstring)."""

    @_time_limited
    async def listen(
        self,
        on_change: Callable[[], None],
        on_share_change: Callable[[str], None] | None = None,
    ) -> ChangeListener | None:
        """Start hearing other processes' job changes (and, with ``on_share_change``,
        schedulers joining and leaving); ``None`` where the database cannot announce them
        (SQLite: changes are seen at the next sync)."""
        if self._engine is None or self._engine.dialect.name != "postgresql":
            return None
        connection = await self._engine.connect()
        listener = ChangeListener(connection, on_change, on_share_change)
        try:
            await listener.start()
        except BaseException:
            await listener.close()
            raise
        return listener

    async def hears(self, listener: ChangeListener, *, within: float) -> bool:
        """Whether ``listener`` hears this scheduler's own test notification within
        ``within`` seconds of its commit. A listener can be open and deaf: a connection
        pooler in transaction mode (PgBouncer's) takes ``LISTEN`` on some server connection
        and never delivers what it hears."""
        payload = f"{PROBE}{uuid.uuid4().hex}"
        heard = listener.expect(payload)
        try:
            await self._notify(payload)  # a failure here is the database's, not deafness
            try:
                await asyncio.wait_for(heard, within)
            except asyncio.TimeoutError:
                return False
        finally:
            listener.unexpect(payload)
        return True

    @_time_limited
    async def _notify(self, payload: str) -> None:
        async with self._transaction() as executor:
            await executor.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, payload)))

    @_time_limited
    async def load_due(
        self,
        horizon: datetime,
        *,
        limit: int | None = None,
        share: tuple[int, int] | None = None,
        others_before: datetime | None = None,
        others_limit: int | None = None,
        gained_from: tuple[int, int] | None = None,
    ) -> list[JobRecord]:
        """Enabled jobs whose ``next_run_at`` is at or before ``horizon`` (uses the due index).

        With ``limit``, only the ``limit`` due first (read in the index's order, so no more
        rows than that are read whatever the number due). With ``share`` (this scheduler's
        slot, and the number of schedulers), on PostgreSQL, MySQL and MariaDB only the jobs
        of that slot, and the others' due at or before ``others_before`` (with
        ``others_limit``, only that many of them, the earliest due); on SQLite every job
        (the engine sorts them out). With ``gained_from`` (the share before, of more than
        one scheduler), only the jobs of ``share`` that were not of that one."""
        statement = _select_records().where(
            _job.c.is_enabled.is_(True),
            _job.c.next_run_at.is_not(None),
            _job.c.next_run_at <= horizon,
        )
        others: sa.Select[Any] | None = None
        dialect = sql_of_dialect(self._engine.dialect.name) if self._engine is not None else None
        if dialect is not None and share is not None and share[1] > 1:
            index, count = share
            slot = dialect.slot_of_job(_job.c.id, count)
            if slot is not None:
                mine = slot == index
                if others_before is not None and others_limit is None:
                    mine = sa.or_(mine, _job.c.next_run_at <= others_before)
                elif others_before is not None:
                    others = (
                        statement.where(slot != index, _job.c.next_run_at <= others_before)
                        .order_by(_job.c.next_run_at)
                        .limit(others_limit)
                    )
                statement = statement.where(mine)
        if dialect is not None and gained_from is not None and gained_from[1] > 1:
            before = dialect.slot_of_job(_job.c.id, gained_from[1])
            if before is not None:
                statement = statement.where(before != gained_from[0])
        if limit is not None:
            statement = statement.order_by(_job.c.next_run_at).limit(limit)
        records = await self._fetch(statement)
        if others is not None:
            records += await self._fetch(others)
        return records

    @_time_limited
    async def last_change(self) -> Any:
        """The newest ``updated_at`` of the jobs, as the driver returns it (compared, never
        interpreted): every change made through the API sets it, a claim does not. One
        lookup in its index."""
        async with self._reading() as executor:
            return await executor.scalar(sa.select(sa.func.max(_job.c.updated_at)))

    @_time_limited
    async def load_jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        """The current state of the given jobs (missing ones are left out)."""
        ids = list(job_ids)
        if not ids:
            return []
        return await self._fetch(_select_records().where(_job.c.id.in_(ids)))

    async def _fetch(self, statement: sa.Select[Any]) -> list[JobRecord]:
        async with self._reading() as executor:
            return _records(await executor.execute(statement), _dialect(executor))

    @_time_limited
    async def claim(
        self,
        claims: Claims,
        *,
        now: datetime,
        lease_until: datetime,
        owner: str,
    ) -> tuple[ClaimedFires, set[str]]:
        """Claim fires by compare-and-set; one transaction, one statement per table.

        Returns the fires to send, and the ids of the jobs whose compare-and-set failed (to be
        reloaded). A job that was advanced but whose fire already had a run row is in neither:
        that fire was claimed before and is not sent again. Nor is a job whose row another
        transaction holds (PostgreSQL: another scheduler claiming it, an edit under way): it
        is skipped at once, never waited for, and left to that transaction; if it is still
        due afterwards, the next sync loads it again.
        """
        if not claims:
            return ClaimedFires(), set()
        async with self._one_statement() as executor:
            won, inserted, skipped = await _batch_sql(executor).claim(
                executor, claims, owner=owner, lease_until=lease_until, now=now
            )
        lost = {job_id for job_id in claims.job_ids if job_id not in won and job_id not in skipped}
        return ClaimedFires.of(claims, inserted), lost

    @_time_limited
    async def claim_with_policies(
        self,
        claims: Claims,
        policies: FirePolicies,
        *,
        now: datetime,
        lease_until: datetime,
        owner: str,
    ) -> tuple[ClaimedFires, set[str], PolicyOutcome]:
        """:meth:`claim`, then what the jobs' policies do with the fires claimed, in the
        same transaction (see :mod:`taskiq_beat.store.policies`). The fires returned are
        those to send now; the outcome says which were held back, and until when the
        earliest delayed one waits."""
        if not claims:
            return ClaimedFires(), set(), PolicyOutcome()
        async with self._transaction() as executor:
            won, inserted, skipped = await _batch_sql(executor).claim(
                executor, claims, owner=owner, lease_until=lease_until, now=now
            )
            outcome = await apply_policies(executor, policies, inserted, now=now)
        lost = {job_id for job_id in claims.job_ids if job_id not in won and job_id not in skipped}
        if outcome.held_back:
            inserted = {k: v for k, v in inserted.items() if k not in outcome.held_back}
        return ClaimedFires.of(claims, inserted), lost, outcome

    @_time_limited
    async def claim_retries(
        self, *, now: datetime, lease_until: datetime, owner: str, limit: int
    ) -> list[Fire]:
        """Claim fires that still have to be sent and whose lease or retry time has passed."""
        async with self._transaction() as session:
            due = (
                sa.select(_run.c.id, _run.c.job_id, _run.c.status)
                .where(_run.c.next_attempt_at.is_not(None), _run.c.next_attempt_at <= now)
                .order_by(_run.c.next_attempt_at)
                .limit(limit)
            )
            dialect_name = _dialect_name(session)
            if dialect_name != "sqlite":
                due = due.with_for_update(skip_locked=True)
            if is_mysql(dialect_name):  # by the index: a scan would lock every run it reads
                due = due.with_hint(
                    _run, "FORCE INDEX (ix_scheduler_run_next_attempt_at)", dialect_name
                )
            ids: list[int] = []
            waiting: list[tuple[int, str]] = []
            for run_id, job_id, status in await session.execute(due):
                if status == RunStatus.WAITING:
                    waiting.append((run_id, job_id))
                else:
                    ids.append(run_id)
            if waiting:
                # Buffered fires (overlap "buffer_one"): sent once their job has room.
                stored = await session.execute(
                    sa.select(_job.c.id, _job.c.policy).where(
                        _job.c.id.in_({job_id for _, job_id in waiting})
                    )
                )
                limits = limits_of({job_id: policy for job_id, policy in stored})
                ids.extend(await release_waiting(session, waiting, limits, now=now))
            if not ids:
                return []
            claimed = (
                sa.update(_run)
                .where(
                    _run.c.id.in_(ids),
                    _run.c.next_attempt_at.is_not(None),
                    _run.c.next_attempt_at <= now,
                )
                .values(
                    status=RunStatus.CLAIMED,
                    attempt=_run.c.attempt + 1,
                    claimed_by=owner,
                    next_attempt_at=lease_until,
                    updated_at=now,
                )
            )
            fired = (_run.c.id, _run.c.job_id, _run.c.scheduled_for, _run.c.task_id)
            if _returns_rows(dialect_name):
                runs = list(await session.execute(claimed.returning(*fired)))
            else:  # locked by the read above: changed as read
                await session.execute(claimed)
                runs = list(await session.execute(sa.select(*fired).where(_run.c.id.in_(ids))))
            jobs = {
                row[0]: row[1:]
                for row in await session.execute(
                    _select_payloads().where(_job.c.id.in_({run[1] for run in runs}))
                )
            }
        return [
            Fire(run_id, job_id, scheduled_for, task_id, *jobs[job_id])
            for run_id, job_id, scheduled_for, task_id in runs
            if job_id in jobs
        ]

    @_time_limited
    async def record(
        self,
        fires: Sequence[Fire],
        outcomes: Sequence[SendOutcome],
        *,
        now: datetime,
        retry_at: datetime,
        keep_runs: bool,
    ) -> None:
        """Close sent fires, schedule failed ones for ``retry_at`` and released ones for now
        (``outcomes[i]`` is what happened to ``fires[i]``)."""
        # A claimed batch's run ids as they are: no Fire made per fire to read them again.
        run_ids = fires.run_ids if isinstance(fires, ClaimedFires) else [f.run_id for f in fires]
        if len(run_ids) != len(outcomes):
            raise ValueError(f"{len(outcomes)} outcomes for {len(run_ids)} fires")
        sent: list[int] = []
        released: list[int] = []
        failed: list[tuple[int, SendOutcome]] = []
        if all(outcome is SENT for outcome in outcomes):  # the common case: all sent
            sent = run_ids
        else:
            for run_id, outcome in zip(run_ids, outcomes, strict=True):
                if outcome.released:
                    released.append(run_id)
                elif outcome.error is not None:
                    failed.append((run_id, outcome))
                else:
                    sent.append(run_id)
        async with self._transaction() as session:
            batch = _batch_sql(session)
            if sent and keep_runs:
                await batch.close_runs(session, sent, now=now)
            elif sent:
                await batch.delete_runs(session, sent)
            if released:
                await batch.release_runs(session, released, now=now)
            if failed:
                await session.execute(
                    sa.update(_run)
                    .where(_run.c.id == sa.bindparam("run"), _run.c.status == RunStatus.CLAIMED)
                    .values(
                        status=RunStatus.FAILED,
                        error=sa.bindparam("message"),
                        next_attempt_at=sa.bindparam("retry"),
                        updated_at=now,
                    ),
                    [
                        {
                            "run": run_id,
                            "message": o.error,
                            "retry": None if o.final else retry_at,
                        }
                        for run_id, o in failed
                    ],
                )

    @_time_limited
    async def unclaim(
        self, fires: Sequence[tuple[int, str, datetime, datetime | None]], *, owner: str
    ) -> None:
        """Undo claims ``owner`` made of fires it never sent: each ``(run id, job id, fire
        time, the next fire time the claim set)``. A run still ``claimed`` by ``owner`` at
        its first attempt is deleted, and then only its job is due at the fire's time again,
        if its ``next_run_at`` is still the one the claim set (a change made since, which
        moved it, is kept). A run another scheduler took meanwhile (its lease ran out) is
        left to it. What is left is what the claim found, ``last_run_at`` aside."""
        if not fires:
            return
        async with self._transaction() as session:
            mine = sa.select(_run.c.id).where(
                _run.c.id.in_([run_id for run_id, *_ in fires]),
                _run.c.status == RunStatus.CLAIMED,
                _run.c.claimed_by == owner,
                _run.c.attempt == 1,
            )
            if _dialect_name(session) != "sqlite":
                mine = mine.with_for_update()
            found = set((await session.execute(mine)).scalars())
            if not found:
                return
            await session.execute(sa.delete(_run).where(_run.c.id.in_(found)))
            undone = [fire for fire in fires if fire[0] in found]
            moved = [
                {"job": job_id, "fire": fire, "set": after}
                for _, job_id, fire, after in undone
                if after is not None
            ]
            time_type = _job.c.next_run_at.type
            if moved:
                await session.execute(
                    sa.update(_job)
                    .where(
                        _job.c.id == sa.bindparam("job"),
                        _job.c.next_run_at == sa.bindparam("set", type_=time_type),
                    )
                    .values(next_run_at=sa.bindparam("fire", type_=time_type)),
                    moved,
                )
            ended = [
                {"job": job_id, "fire": fire} for _, job_id, fire, after in undone if after is None
            ]
            if ended:  # the claim left no next fire (a one-off job)
                await session.execute(
                    sa.update(_job)
                    .where(_job.c.id == sa.bindparam("job"), _job.c.next_run_at.is_(None))
                    .values(next_run_at=sa.bindparam("fire", type_=time_type)),
                    ended,
                )

    @_time_limited
    async def disable_jobs(self, errors: dict[str, str], *, now: datetime) -> None:
        """Disable jobs that cannot fire, keeping the reason in ``last_error``."""
        if not errors:
            return
        async with self._transaction() as session:
            await session.execute(
                sa.update(_job)
                .where(_job.c.id == sa.bindparam("job"))
                .values(
                    is_enabled=False,
                    last_error=sa.bindparam("message"),
                    revision=_job.c.revision + 1,
                    updated_at=now,
                ),
                [{"job": job_id, "message": message} for job_id, message in errors.items()],
            )
