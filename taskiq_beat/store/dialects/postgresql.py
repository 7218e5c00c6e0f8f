"""PostgreSQL's batch statements (asyncpg)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import (
    Any,
)

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from taskiq_beat.enums import RunStatus
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
    _times,
    counted,
)
from taskiq_beat.store.values import Claims


def _from_micros(value: str) -> str:
    """SQL: a timestamptz from whole microseconds since the Unix epoch, exactly (seconds and
    microseconds apart: one product in ``double precision`` is exact only to 2**53 µs)."""
    return (
        f"(TIMESTAMPTZ 'epoch' + ({value} / 1000000) * INTERVAL '1 second'"
        f" + ({value} % 1000000) * INTERVAL '1 microsecond')"
    )


_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _micros(value: datetime) -> int:
    """Whole microseconds since the Unix epoch."""
    return (value - _UNIX_EPOCH) // _MICROSECOND


class _PostgresBatchSql(_BatchSql):
    _ids = " WHERE id = ANY(CAST(:ids AS BIGINT[]))"
    close, release, delete = _run_updates(_ids)
    # advance + insert in one statement: data-modifying CTEs run in one snapshot, and the
    # statement is atomic on its own. The claims travel as columns: the job and task ids as
    # JSON texts, the times as whole microseconds (asyncpg encodes a timestamptz array at
    # ~1.5 us an element, a bigint one at ~0.4, a text at once; 5.4 -> 1.7 us of client
    # CPU per claim, the server's work unchanged), a fire's time left out (an empty array)
    # when each is the job's expected one. It answers in one row of JSON texts: the jobs
    # advanced, the job and id of each run inserted (a fire that had its run already has
    # none), and the jobs skipped; no row per fire. (No join of the two CTEs: the planner,
    # which cannot estimate them, nests loops over them.) The jobs are looked up by id:
    # joined to the claims alone, the planner reads every job (a sequential scan and a hash
    # of the whole table, per batch: 75 of 170 ms for 2,048 claims among 100k jobs); with
    # the id list it uses the primary key once the table has statistics (10 ms).
    # ``locked`` takes the batch's job rows FOR NO KEY UPDATE SKIP LOCKED (the lock the UPDATE takes
    # anyway: it changes no key), and only those are advanced: a row that another transaction holds
    # (another scheduler claiming the same job, an edit under way) is skipped at once instead of
    # waited for, and reported as such. Without it two schedulers holding the same due jobs queued
    # on each other's row locks, batch after batch, for as long as the other's statement ran. (FOR
    # UPDATE would also skip rows a worker holds FOR KEY SHARE while it inserts a row referring to
    # the job: its counters, see store.lifecycle.)
    claim_all = sa.text(
        "WITH claim AS (SELECT c.job_id, c.revision, c.task_id,"
        f" {_from_micros('c.expected')} AS expected, {_from_micros('c.new_next')} AS new_next,"
        f" {_from_micros('COALESCE(c.scheduled_for, c.expected)')} AS scheduled_for"
        " FROM ROWS FROM (json_array_elements_text(CAST(:job_ids AS JSON)),"
        " unnest(CAST(:expected AS BIGINT[])), unnest(CAST(:revisions AS INTEGER[])),"
        " unnest(CAST(:new_next AS BIGINT[])), unnest(CAST(:scheduled_for AS BIGINT[])),"
        " json_array_elements_text(CAST(:task_ids AS JSON)))"
        " AS c(job_id, expected, revision, new_next, scheduled_for, task_id)),"
        f" locked AS (SELECT job.id FROM {_JOB} AS job"
        " WHERE job.id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:job_ids AS JSON))))"
        " FOR NO KEY UPDATE SKIP LOCKED),"
        f" won AS (UPDATE {_JOB} AS job"
        " SET next_run_at = claim.new_next, last_run_at = claim.scheduled_for"
        " FROM claim WHERE job.id = claim.job_id AND job.next_run_at = claim.expected"
        " AND job.revision = claim.revision AND job.is_enabled"
        " AND job.id = ANY(ARRAY(SELECT locked.id FROM locked))"
        " RETURNING job.id, claim.scheduled_for, claim.task_id),"
        f" run AS ({_RUN_INSERT} SELECT won.id, won.scheduled_for, :status, won.task_id, 1,"
        " :owner, :lease_until, :now, :now FROM won"
        " ON CONFLICT DO NOTHING RETURNING id, job_id)"
        " SELECT CAST((SELECT json_agg(won.id) FROM won) AS TEXT),"
        " CAST(runs.job_ids AS TEXT), CAST(runs.run_ids AS TEXT),"
        " CAST((SELECT json_agg(skipped.id) FROM"
        " (SELECT json_array_elements_text(CAST(:job_ids AS JSON)) AS id"
        " EXCEPT SELECT locked.id FROM locked) AS skipped) AS TEXT)"
        " FROM (SELECT json_agg(job_id) AS job_ids, json_agg(id) AS run_ids FROM run) AS runs"
    ).bindparams(*_times("lease_until", "now"))
    claims_at_once = True

    async def claim(
        self,
        session: _Executor,
        claims: Claims,
        *,
        owner: str,
        lease_until: datetime,
        now: datetime,
    ) -> tuple[set[str], dict[str, int], set[str]]:
        params = self.claim_params(claims)
        params.update(
            owner=owner,
            lease_until=lease_until,
            now=now,
            status=_STATUS,
        )
        row = (await session.execute(self.claim_all, params)).one()
        won, run_jobs, run_ids, skipped = row
        # json_agg of no rows is NULL: no job advanced, no run inserted, none skipped
        advanced: set[str] = set() if won is None else set(json.loads(won))
        passed: set[str] = set() if skipped is None else set(json.loads(skipped))
        if run_jobs is None:
            return advanced, {}, passed
        runs = dict(zip(json.loads(run_jobs), json.loads(run_ids), strict=True))
        return advanced, runs, passed

    def claim_params(self, claims: Claims) -> dict[str, Any]:
        micros = _EachTimeOnce(_micros)
        expected = [micros[value] for value in claims.expected_next_run_at]
        scheduled_for = [micros[value] for value in claims.scheduled_for]
        return {
            "job_ids": json.dumps(claims.job_ids),
            "expected": expected,
            "revisions": claims.expected_revisions,
            "new_next": [
                None if value is None else micros[value] for value in claims.new_next_run_at
            ],
            "scheduled_for": [] if scheduled_for == expected else scheduled_for,
            "task_ids": json.dumps(claims.task_ids),
        }

    def id_params(self, ids: Sequence[int]) -> dict[str, Any]:
        return {"ids": list(ids)}

    starts = sa.text(
        f"UPDATE {_RUN} SET {STARTED}"
        " FROM json_to_recordset(CAST(:rows AS JSON)) AS v(id BIGINT, job_id TEXT)"
        f" WHERE {_RUN}.id = v.id AND {_RUN}.job_id = v.job_id AND {STARTABLE}"
        f" RETURNING {_RUN}.id, {_RUN}.executions"
    ).bindparams(*_times("now"))
    counts = sa.text(
        f"{STATS_INSERT} SELECT v.job_id, v.runs, v.ok, v.bad, v.ok_at, v.bad_at, v.duration"
        " FROM json_to_recordset(CAST(:rows AS JSON)) AS v(job_id TEXT, runs INTEGER,"
        " ok INTEGER, bad INTEGER, ok_at TIMESTAMPTZ, bad_at TIMESTAMPTZ,"
        f" duration DOUBLE PRECISION) JOIN {_JOB} AS job ON job.id = v.job_id"
        f" ORDER BY v.job_id ON CONFLICT (job_id) DO UPDATE SET {counted('EXCLUDED')}"
    )

    async def start_runs(
        self,
        session: _Executor,
        starts: Sequence[tuple[int, str]],
        *,
        worker_id: str,
        now: datetime,
    ) -> list[tuple[int, int]]:
        rows = json.dumps([{"id": run_id, "job_id": job_id} for run_id, job_id in starts])
        result = await session.execute(self.starts, {"rows": rows, "worker": worker_id, "now": now})
        return [(run_id, executions) for run_id, executions in result]

    async def count_outcomes(self, session: _Executor, rows: Sequence[tuple[Any, ...]]) -> None:
        keys = ("job_id", "runs", "ok", "bad", "ok_at", "bad_at", "duration")
        values = [
            {
                key: value.isoformat() if isinstance(value, datetime) else value
                for key, value in zip(keys, row, strict=True)
            }
            for row in rows
        ]
        await session.execute(self.counts, {"rows": json.dumps(values)})

    outcomes = sa.text(
        f"UPDATE {_RUN} AS run SET status = v.status, finished_at = v.finished_at,"
        " updated_at = v.finished_at, duration_seconds = v.duration,"
        " error_type = v.error_type, error = v.error"
        " FROM json_to_recordset(CAST(:rows AS JSON)) AS v(id BIGINT, executions INTEGER,"
        " retries INTEGER, status TEXT, finished_at TIMESTAMPTZ, duration DOUBLE PRECISION,"
        " error_type TEXT, error TEXT)"
        " WHERE run.id = v.id AND run.executions = v.executions AND run.retries = v.retries"
        f" AND run.status = '{RunStatus.RUNNING.value}'"
        " RETURNING run.id, run.job_id"
    )

    async def write_outcomes(
        self, session: _Executor, outcomes: Sequence[tuple[Any, ...]]
    ) -> list[tuple[int, str]]:
        keys = ("id", "executions", "retries", "status", "finished_at", "duration")
        rows = [
            {
                **dict(zip(keys, outcome[:6], strict=True)),
                "finished_at": outcome[4].isoformat(),
                "error_type": outcome[6],
                "error": outcome[7],
            }
            for outcome in outcomes
        ]
        result = await session.execute(self.outcomes, {"rows": json.dumps(rows)})
        return [(run_id, job_id) for run_id, job_id in result]

    def slot_of_job(self, job_id: sa.ColumnElement[str], count: int) -> sa.ColumnElement[int]:
        hexed = sa.literal("x", sa.String()) + sa.func.substr(sa.func.md5(job_id), 1, 7)
        return sa.cast(sa.cast(hexed, postgresql.BIT(28)), sa.Integer()) % count


POSTGRESQL = _PostgresBatchSql()
