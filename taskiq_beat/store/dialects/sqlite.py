"""SQLite's batch statements (aiosqlite)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import (
    Any,
    cast,
)

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import (
    sqlite_datetime,
)
from taskiq_beat.store._common import (
    _Executor,
)
from taskiq_beat.store.dialects import (
    _JOB,
    _RUN,
    _RUN_INSERT,
    _STATUS,
    STARTABLE,
    STARTED,
    STATS_INSERT,
    _BatchSql,
    _EachTimeOnce,
    _run_updates,
    counted,
)
from taskiq_beat.store.values import Claims


def _each(index: int) -> str:
    return f"json_extract(item.value, '$[{index}]')"


class _SqliteBatchSql(_BatchSql):
    # A claim answers in one row, never a row per fire: aiosqlite fetches every row in its
    # own thread, which must take the GIL back for each, and waits for it while the event
    # loop is busy sending (claims of 4,096 took 0.4 s instead of 0.15 s with the loop
    # busy). So: the runs are inserted for the claims whose compare-and-set holds (the
    # first write: from then on this transaction holds SQLite's write lock, and no job can
    # change until it commits), one row then tells which jobs those are and which runs
    # were inserted (their ids are the last ``changes()`` ones), and the same jobs advance.
    _holds = (
        f"{_JOB}.id = {_each(0)} AND {_JOB}.next_run_at = {_each(1)}"
        f" AND {_JOB}.revision = {_each(2)} AND {_JOB}.is_enabled"
    )
    insert = sa.text(
        f"{_RUN_INSERT} SELECT {_each(0)}, {_each(4)}, :status, {_each(5)}, 1,"
        " :owner, :lease_until, :now, :now"
        f" FROM json_each(:claims) AS item JOIN {_JOB} ON {_holds} WHERE true"
        " ON CONFLICT DO NOTHING"
    )
    outcome = sa.text(
        f"SELECT (SELECT json_group_array({_JOB}.id)"
        f" FROM json_each(:claims) AS item JOIN {_JOB} ON {_holds}), runs.job_ids, runs.ids"
        " FROM (SELECT json_group_array(job_id) AS job_ids, json_group_array(id) AS ids"
        f" FROM {_RUN} WHERE id > last_insert_rowid() - changes() AND id <= last_insert_rowid())"
        " AS runs"
    )
    advance = sa.text(
        f"UPDATE {_JOB} SET next_run_at = {_each(3)}, last_run_at = {_each(4)}"
        f" FROM json_each(:claims) AS item WHERE {_holds}"
    )
    _ids = " WHERE id IN (SELECT value FROM json_each(:ids))"
    close, release, delete = _run_updates(_ids)

    async def claim(
        self,
        session: _Executor,
        claims: Claims,
        *,
        owner: str,
        lease_until: datetime,
        now: datetime,
    ) -> tuple[set[str], dict[str, int], set[str]]:
        # One writer at a time: nothing is skipped, a claim waits for the file's lock.
        params = self.claim_params(claims)
        await self.execute(
            session,
            self.insert,
            {**params, "owner": owner, "lease_until": lease_until, "now": now, "status": _STATUS},
        )
        [(won_text, run_jobs, run_ids)] = await self._rows(session, self.outcome, params)
        won: set[str] = set(json.loads(won_text))
        if not won:
            return won, {}, set()
        await self.execute(session, self.advance, params)
        return won, dict(zip(json.loads(run_jobs), json.loads(run_ids), strict=True)), set()

    async def execute(
        self, session: _Executor, statement: sa.TextClause, params: dict[str, Any]
    ) -> None:
        await self._rows(session, statement, params)

    async def _rows(
        self, session: _Executor, statement: sa.TextClause, params: dict[str, Any]
    ) -> Sequence[Any]:
        """Run the statement on the aiosqlite connection under ``session``, in its
        transaction: one round trip to aiosqlite's thread instead of three or four through
        SQLAlchemy's cursor (create it, execute, fetch, close). Each round trip takes the
        GIL back in that thread, which waits up to the interpreter's switch interval (5 ms)
        while the event loop is busy sending. (``sqlite3`` takes the ``:name`` parameters
        itself; the times are converted here as ``UTCDateTime`` would store them.)"""
        connection = session if isinstance(session, AsyncConnection) else await session.connection()
        driver: Any = (await connection.get_raw_connection()).driver_connection
        values = {
            name: sqlite_datetime(value) if isinstance(value, datetime) else value
            for name, value in params.items()
        }
        try:
            return cast("Sequence[Any]", await driver.execute_fetchall(statement.text, values))
        except sqlite3.Error as exc:  # as SQLAlchemy would raise it (OperationalError, ...)
            raise sa.exc.DBAPIError.instance(
                statement.text, None, exc, sqlite3.Error, hide_parameters=True
            ) from exc

    def claim_params(self, claims: Claims) -> dict[str, Any]:
        # A tuple per claim, not a list: the collector stops tracking a tuple of strings and
        # numbers the first time it sees it, where 8,192 lists would outlive collections
        # while the batch is built and end up in its oldest generation.
        text = _EachTimeOnce(sqlite_datetime)
        rows = [
            (
                job_id,
                text[expected],
                revision,
                None if new_next is None else text[new_next],
                text[scheduled_for],
                task_id,
            )
            for job_id, expected, revision, new_next, scheduled_for, task_id in zip(
                claims.job_ids,
                claims.expected_next_run_at,
                claims.expected_revisions,
                claims.new_next_run_at,
                claims.scheduled_for,
                claims.task_ids,
                strict=True,
            )
        ]
        return {"claims": json.dumps(rows)}

    def id_params(self, ids: Sequence[int]) -> dict[str, Any]:
        return {"ids": json.dumps(list(ids))}

    starts = sa.text(
        f"UPDATE {_RUN} SET {STARTED} FROM json_each(:rows) AS item"
        f" WHERE {_RUN}.id = {_each(0)} AND {_RUN}.job_id = {_each(1)} AND {STARTABLE}"
        f" RETURNING {_RUN}.id, {_RUN}.executions"
    )
    counts = sa.text(
        f"{STATS_INSERT} SELECT {_each(0)}, {_each(1)}, {_each(2)}, {_each(3)}, {_each(4)},"
        f" {_each(5)}, {_each(6)} FROM json_each(:rows) AS item"
        f" JOIN {_JOB} ON {_JOB}.id = {_each(0)} WHERE true"
        f" ON CONFLICT (job_id) DO UPDATE SET {counted('excluded')}"
    )

    async def start_runs(
        self,
        session: _Executor,
        starts: Sequence[tuple[int, str]],
        *,
        worker_id: str,
        now: datetime,
    ) -> list[tuple[int, int]]:
        params = {"rows": json.dumps(list(starts)), "worker": worker_id, "now": now}
        return [
            (run_id, executions)
            for run_id, executions in await self._rows(session, self.starts, params)
        ]

    async def count_outcomes(self, session: _Executor, rows: Sequence[tuple[Any, ...]]) -> None:
        values = [
            [sqlite_datetime(value) if isinstance(value, datetime) else value for value in row]
            for row in rows
        ]
        await self._rows(session, self.counts, {"rows": json.dumps(values)})

    outcomes = sa.text(
        f"UPDATE {_RUN} SET status = {_each(3)}, finished_at = {_each(4)},"
        f" updated_at = {_each(4)}, duration_seconds = {_each(5)},"
        f" error_type = {_each(6)}, error = {_each(7)}"
        " FROM json_each(:rows) AS item"
        f" WHERE {_RUN}.id = {_each(0)} AND {_RUN}.executions = {_each(1)}"
        f" AND {_RUN}.retries = {_each(2)} AND {_RUN}.status = '{RunStatus.RUNNING.value}'"
        f" RETURNING {_RUN}.id, {_RUN}.job_id"
    )

    async def write_outcomes(
        self, session: _Executor, outcomes: Sequence[tuple[Any, ...]]
    ) -> list[tuple[int, str]]:
        rows = [
            (run_id, executions, retries, status, sqlite_datetime(at), took, kind, error)
            for run_id, executions, retries, status, at, took, kind, error in outcomes
        ]
        return [
            (run_id, job_id)
            for run_id, job_id in await self._rows(
                session, self.outcomes, {"rows": json.dumps(rows)}
            )
        ]


SQLITE = _SqliteBatchSql()
