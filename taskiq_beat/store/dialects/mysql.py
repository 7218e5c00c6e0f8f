"""MySQL's and MariaDB's batch statements (asyncmy).

Neither server returns rows from an ``UPDATE`` (MySQL has no ``RETURNING`` at all), so each
batch first takes its rows with a locking read (``FOR UPDATE``: the newest committed rows,
locked until the transaction ends), decides in Python or in that read what it may change,
and then changes exactly those rows, which nobody else can touch meanwhile. The rows of a
batch travel as one JSON parameter, read with ``JSON_TABLE`` (MySQL 8.0.4+, MariaDB 10.6+);
its text columns are compared in the tables' collation (``utf8mb4_bin``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from taskiq_beat.enums import RunStatus
from taskiq_beat.models import JOB_ID_MAX_LENGTH, sqlite_datetime
from taskiq_beat.store._common import _Executor
from taskiq_beat.store.dialects import (
    _JOB,
    _RUN,
    _RUN_INSERT,
    _STATUS,
    RESTARTABLE,
    RESTARTED,
    STARTABLE,
    STARTED,
    STATS_INSERT,
    STILL_CLAIMED,
    _BatchSql,
    _EachTimeOnce,
    _times,
    counted,
)
from taskiq_beat.store.values import Claims

_TEXT_ID = f"VARCHAR({JOB_ID_MAX_LENGTH}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
_TIME = "DATETIME(6)"


def _table(parameter: str, *columns: tuple[str, str]) -> str:
    """SQL: the JSON array of arrays ``:parameter`` as a table of ``columns`` (name, type),
    element ``i`` of each array being column ``i``."""
    defined = ", ".join(
        f"{name} {kind} PATH '$[{index}]'" for index, (name, kind) in enumerate(columns)
    )
    return f"JSON_TABLE(:{parameter}, '$[*]' COLUMNS ({defined}))"


def _text(value: datetime) -> str:
    """A time as ``DATETIME(6)`` reads it from JSON: naive UTC to the microsecond."""
    return sqlite_datetime(value)


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(tzinfo=None)


_IDS = _table("ids", ("v_id", "BIGINT"))
_BY_FIRE = f"FORCE INDEX (uq_{_RUN}_job_id_scheduled_for)"
_BY_ID = f"{_IDS} AS v STRAIGHT_JOIN {_RUN} FORCE INDEX (PRIMARY) ON {_RUN}.id = v.v_id"


class _MysqlBatchSql(_BatchSql):
    # The claim, in one transaction on the job rows it locks:
    # 1. ``lock``: the batch's job rows, FOR UPDATE SKIP LOCKED. A row another transaction
    #    holds (another scheduler claiming it, an edit under way) is skipped at once, never
    #    waited for, as on PostgreSQL. The compare-and-set is decided on what it returns.
    # 2. ``existing``: the fires among those won that have their run row already. This
    #    transaction's first plain read, so its snapshot is taken with the job rows locked:
    #    a run inserted for one of them is committed already (and seen), or waits for this
    #    transaction (inserting a run takes a shared lock on its job's row, for the foreign
    #    key), or held that lock when the job was skipped.
    # 3. ``insert`` the others' runs, read their ids back (``inserted``), ``advance`` the jobs.
    # Every join starts from the JSON_TABLE (STRAIGHT_JOIN) and reaches the table by a key
    # (FORCE INDEX): the optimizer would otherwise scan a small table whole, locking every row
    # it reads, and wait on those another transaction holds.
    lock = sa.text(
        f"SELECT {_JOB}.id, {_JOB}.next_run_at, {_JOB}.revision, {_JOB}.is_enabled"
        f" FROM {_table('job_ids', ('v_id', _TEXT_ID))} AS v"
        f" STRAIGHT_JOIN {_JOB} FORCE INDEX (PRIMARY) ON {_JOB}.id = v.v_id FOR UPDATE SKIP LOCKED"
    )
    _claims = _table(
        "claims",
        ("c_job", _TEXT_ID),
        ("c_scheduled_for", _TIME),
        ("c_new_next", _TIME),
        ("c_task_id", "VARCHAR(64)"),
    )
    existing = sa.text(
        f"SELECT {_RUN}.job_id FROM {_claims} AS c STRAIGHT_JOIN {_RUN} {_BY_FIRE}"
        f" ON {_RUN}.job_id = c.c_job AND {_RUN}.scheduled_for = c.c_scheduled_for"
    )
    insert = sa.text(
        f"{_RUN_INSERT} SELECT c.c_job, c.c_scheduled_for, :status, c.c_task_id, 1,"
        f" :owner, :lease_until, :now, :now FROM {_claims} AS c"
    ).bindparams(*_times("lease_until", "now"))
    inserted = sa.text(
        f"SELECT {_RUN}.job_id, {_RUN}.id FROM {_claims} AS c STRAIGHT_JOIN {_RUN} {_BY_FIRE}"
        f" ON {_RUN}.job_id = c.c_job AND {_RUN}.scheduled_for = c.c_scheduled_for"
    )
    advance = sa.text(
        f"UPDATE {_claims} AS c STRAIGHT_JOIN {_JOB} FORCE INDEX (PRIMARY) ON {_JOB}.id = c.c_job"
        f" SET {_JOB}.next_run_at = c.c_new_next, {_JOB}.last_run_at = c.c_scheduled_for"
    )

    close = sa.text(
        f"UPDATE {_BY_ID} SET status = :status, next_attempt_at = NULL,"
        f" dispatched_at = :now, updated_at = :now, error = NULL WHERE true{STILL_CLAIMED}"
    ).bindparams(*_times("now"))
    release = sa.text(
        f"UPDATE {_BY_ID} SET next_attempt_at = :now, claimed_by = NULL,"
        f" updated_at = :now WHERE true{STILL_CLAIMED}"
    ).bindparams(*_times("now"))
    delete = sa.text(f"DELETE {_RUN} FROM {_BY_ID}")

    async def claim(
        self,
        session: _Executor,
        claims: Claims,
        *,
        owner: str,
        lease_until: datetime,
        now: datetime,
    ) -> tuple[set[str], dict[str, int], set[str]]:
        locked = {
            job_id: (next_run_at, revision, bool(is_enabled))
            for job_id, next_run_at, revision, is_enabled in await session.execute(
                self.lock, {"job_ids": json.dumps([[job_id] for job_id in claims.job_ids])}
            )
        }
        skipped = set(claims.job_ids) - locked.keys()
        naive = _EachTimeOnce(_naive_utc)
        text = _EachTimeOnce(_text)
        won: list[list[Any]] = []
        for job_id, expected, revision, scheduled_for, new_next, task_id in zip(
            claims.job_ids,
            claims.expected_next_run_at,
            claims.expected_revisions,
            claims.scheduled_for,
            claims.new_next_run_at,
            claims.task_ids,
            strict=True,
        ):
            row = locked.get(job_id)
            if row is None or row != (naive[expected], revision, True):
                continue
            won.append(
                [
                    job_id,
                    text[scheduled_for],
                    None if new_next is None else text[new_next],
                    task_id,
                ]
            )
        if not won:
            return set(), {}, skipped
        existing = {
            job_id
            for (job_id,) in await session.execute(self.existing, {"claims": json.dumps(won)})
        }
        new = [claim for claim in won if claim[0] not in existing]
        runs: dict[str, int] = {}
        if new:
            params = {"claims": json.dumps(new)}
            await session.execute(
                self.insert,
                {
                    **params,
                    "status": _STATUS,
                    "owner": owner,
                    "lease_until": lease_until,
                    "now": now,
                },
            )
            runs = {
                job_id: run_id for job_id, run_id in await session.execute(self.inserted, params)
            }
        await session.execute(self.advance, {"claims": json.dumps(won)})
        return {claim[0] for claim in won}, runs, skipped

    def id_params(self, ids: Sequence[int]) -> dict[str, Any]:
        return {"ids": json.dumps([[run_id] for run_id in ids])}

    _starts = _table("rows", ("v_id", "BIGINT"), ("v_job", _TEXT_ID))
    startable = sa.text(
        f"SELECT {_RUN}.id, {_RUN}.executions FROM {_starts} AS v STRAIGHT_JOIN {_RUN}"
        f" ON {_RUN}.id = v.v_id AND {_RUN}.job_id = v.v_job WHERE {STARTABLE}"
        f" ORDER BY {_RUN}.id FOR UPDATE"
    )
    starts = sa.text(f"UPDATE {_BY_ID} SET {STARTED}").bindparams(*_times("now"))
    restartable = sa.text(f"SELECT id, executions FROM {_RUN} WHERE {RESTARTABLE} FOR UPDATE")
    restart = sa.text(f"UPDATE {_RUN} SET {RESTARTED} WHERE id = :id").bindparams(*_times("now"))

    async def start_runs(
        self,
        session: _Executor,
        starts: Sequence[tuple[int, str]],
        *,
        worker_id: str,
        now: datetime,
    ) -> list[tuple[int, int]]:
        rows = list(await session.execute(self.startable, {"rows": json.dumps(list(starts))}))
        if not rows:
            return []
        params = {"worker": worker_id, "now": now, **self.id_params([row[0] for row in rows])}
        await session.execute(self.starts, params)
        return [(run_id, executions + 1) for run_id, executions in rows]

    async def restart_run(
        self,
        session: _Executor,
        run_id: int,
        job_id: str,
        *,
        retries: int,
        worker_id: str,
        now: datetime,
    ) -> tuple[int, int] | None:
        params = {"id": run_id, "job_id": job_id, "retries": retries}
        row = (await session.execute(self.restartable, params)).first()
        if row is None:
            return None
        await session.execute(self.restart, {**params, "worker": worker_id, "now": now})
        return (row[0], max(row[1], 1))

    # In ``INSERT ... SELECT ... ON DUPLICATE KEY UPDATE`` the row proposed is read from the
    # SELECT's own columns (``v.v_runs``...), which MySQL and MariaDB both allow, not with
    # ``VALUES(column)``: MySQL 8.0.20+ deprecates it (a warning, which asyncmy fetches and
    # logs, on every statement), and its replacement, a row alias, is not allowed after a
    # SELECT, nor known to MariaDB.
    _proposed = {
        "run_count": "v.v_runs",
        "success_count": "v.v_ok",
        "failure_count": "v.v_bad",
        "last_success_at": "v.v_ok_at",
        "last_failure_at": "v.v_bad_at",
        "last_duration_seconds": "v.v_duration",
    }
    counts = sa.text(
        f"{STATS_INSERT} SELECT v.v_job, v.v_runs, v.v_ok, v.v_bad, v.v_ok_at, v.v_bad_at,"
        " v.v_duration FROM "
        + _table(
            "rows",
            ("v_job", _TEXT_ID),
            ("v_runs", "INTEGER"),
            ("v_ok", "INTEGER"),
            ("v_bad", "INTEGER"),
            ("v_ok_at", _TIME),
            ("v_bad_at", _TIME),
            ("v_duration", "DOUBLE"),
        )
        + f" AS v STRAIGHT_JOIN {_JOB} FORCE INDEX (PRIMARY) ON {_JOB}.id = v.v_job"
        " ORDER BY v.v_job"
        f" ON DUPLICATE KEY UPDATE {counted(lambda column: f'VALUES({column})')}"
    )

    async def count_outcomes(self, session: _Executor, rows: Sequence[tuple[Any, ...]]) -> None:
        values = [
            [_text(value) if isinstance(value, datetime) else value for value in row]
            for row in rows
        ]
        await session.execute(self.counts, {"rows": json.dumps(values)})

    _outcomes = _table(
        "rows",
        ("v_id", "BIGINT"),
        ("v_executions", "INTEGER"),
        ("v_retries", "INTEGER"),
        ("v_status", "VARCHAR(32)"),
        ("v_finished_at", _TIME),
        ("v_duration", "DOUBLE"),
        ("v_error_type", "VARCHAR(255)"),
        ("v_error", "LONGTEXT"),
    )
    _outcome_rows = (
        f"{_outcomes} AS v STRAIGHT_JOIN {_RUN} FORCE INDEX (PRIMARY)"
        f" ON {_RUN}.id = v.v_id AND {_RUN}.executions = v.v_executions"
        f" AND {_RUN}.retries = v.v_retries AND {_RUN}.status = '{RunStatus.RUNNING.value}'"
    )
    writable = sa.text(
        f"SELECT {_RUN}.id, {_RUN}.job_id FROM {_outcome_rows} ORDER BY {_RUN}.id FOR UPDATE"
    )
    outcomes = sa.text(
        f"UPDATE {_outcome_rows} SET status = v.v_status,"
        " finished_at = v.v_finished_at, updated_at = v.v_finished_at,"
        " duration_seconds = v.v_duration, error_type = v.v_error_type, error = v.v_error"
    )

    async def write_outcomes(
        self, session: _Executor, outcomes: Sequence[tuple[Any, ...]]
    ) -> list[tuple[int, str]]:
        rows = json.dumps(
            [
                (run_id, executions, retries, status, _text(at), took, kind, error)
                for run_id, executions, retries, status, at, took, kind, error in outcomes
            ]
        )
        written = [
            (run_id, job_id)
            for run_id, job_id in await session.execute(self.writable, {"rows": rows})
        ]
        if written:
            await session.execute(self.outcomes, {"rows": rows})
        return written

    def slot_of_job(self, job_id: sa.ColumnElement[str], count: int) -> sa.ColumnElement[int]:
        prefix = sa.func.substr(sa.func.md5(job_id), 1, 7)
        return sa.cast(sa.func.conv(prefix, 16, 10), sa.Integer()) % count


MYSQL = _MysqlBatchSql()
