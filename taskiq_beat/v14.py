"""Reading the rows of a taskiq-beat 1.4 database as this package's jobs and runs.

taskiq-beat 1.4 kept the same two table names with columns of its own (``trigger_payload``,
``task_args``, ``task_kwargs``, ``metadata_payload``, claims on the job row, string run ids).
These functions convert its values; :mod:`taskiq_beat.migrate` reads and writes the tables.

What changes in meaning, and how the conversion keeps the schedule the same:

- 1.4 numbers ``day_of_week`` from Monday = 0 (Python's ``weekday()``); cron, and this
  package, from Sunday = 0. The days are rewritten (1.4's ``"0-4"``, Monday to Friday,
  becomes ``"1-5"``). A field that 1.4 reads as the whole range (``"0-6"``, ``"1-31"``) is
  written ``*``, since cron treats a written-out range as a restriction.
- A 1.4 interval has exactly one unit; it becomes the same ``IntervalTrigger``.
- A 1.4 chain job (task ``taskiq_beat.chain_orchestrator``) carries its steps with the
  chain's defaults beside them; the steps are resolved with those defaults, as
  ``scheduler_app.chain()`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from taskiq_beat.chain import CHAIN_TASK_NAME, ChainSpec, ResolvedStep
from taskiq_beat.dispatch import fire_task_id
from taskiq_beat.enums import JobKind, RunStatus
from taskiq_beat.triggers import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    Trigger,
    trigger_to_json,
)

__all__ = [
    "V14_JOB_COLUMNS",
    "convert_job",
    "convert_runs",
    "convert_trigger",
    "v14_day_of_week",
]

V14_JOB_COLUMNS = frozenset({"trigger_payload", "task_args", "task_kwargs", "metadata_payload"})
"""Columns of ``scheduler_job`` that only taskiq-beat 1.4 has: how a 1.4 database is told."""

_CRON_RANGES = {
    "second": (0, 59),
    "minute": (0, 59),
    "hour": (0, 23),
    "day_of_month": (1, 31),
    "month_of_year": (1, 12),
    "day_of_week": (0, 6),
}


def _v14_values(expression: str, low: int, high: int) -> set[int]:
    """The values a 1.4 cron field matches (its own grammar: ``*``, ``n``, ``a-b``,
    ``*/s``, ``a-b/s`` and lists of them).

    :raises ValueError: for anything 1.4 itself would refuse.
    """
    values: set[int] = set()
    for part in expression.strip().split(","):
        part = part.strip()
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
            if step <= 0:
                raise ValueError(f"cron step must be positive: {expression!r}")
            if part != "*" and "-" not in part:
                raise ValueError(f"cron step base must be '*' or a range: {expression!r}")
        if part == "*":
            start, end = low, high
        elif "-" in part:
            start_text, end_text = part.split("-", 1)
            start, end = int(start_text), int(end_text)
        else:
            start = end = int(part)
        if start > end:
            raise ValueError(f"cron range start after its end: {expression!r}")
        values.update(range(start, end + 1, step))
    if not values or min(values) < low or max(values) > high:
        raise ValueError(f"cron values outside {low}-{high}: {expression!r}")
    return values


def _compact(values: Iterable[int]) -> str:
    """``{1, 2, 3, 5}`` as ``"1-3,5"``."""
    ordered = sorted(values)
    parts: list[str] = []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ",".join(parts)


def v14_day_of_week(expression: str) -> str:
    """A 1.4 ``day_of_week`` (Monday = 0) in cron's numbering (Sunday = 0)."""
    days = _v14_values(expression, 0, 6)
    if days == set(range(7)):
        return "*"
    return _compact((day + 1) % 7 for day in days)


def _crontab(payload: Mapping[str, Any]) -> CrontabTrigger:
    fields: dict[str, str] = {}
    for name, (low, high) in _CRON_RANGES.items():
        text = str(payload.get(name, "0" if name == "second" else "*")).strip()
        values = _v14_values(text, low, high)
        if name == "day_of_week":
            fields[name] = v14_day_of_week(text)
        elif values == set(range(low, high + 1)):
            fields[name] = "*"
        else:
            fields[name] = text
    timezone_name = str(payload.get("timezone") or "UTC")
    try:
        return CrontabTrigger(**fields, timezone=timezone_name)
    except ValueError:
        # A step 1.4 accepts and croniter does not (a step longer than the range): the values.
        explicit = {
            name: fields[name]
            if name == "day_of_week" or fields[name] == "*"
            else _compact(_v14_values(fields[name], *_CRON_RANGES[name]))
            for name in _CRON_RANGES
        }
        return CrontabTrigger(**explicit, timezone=timezone_name)


def _instant(value: Any, field: str) -> datetime | None:
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"{field} is not timezone-aware: {value!r}")
    return moment.astimezone(timezone.utc)


def convert_trigger(strategy: str, payload: Any) -> Trigger:
    """The trigger of a 1.4 job from its ``strategy`` and ``trigger_payload``.

    :raises ValueError: (or :class:`~taskiq_beat.exceptions.InvalidTriggerError`) for a
        payload that is not one 1.4 writes.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"trigger_payload is not an object: {payload!r}")
    if strategy == "immediate":
        return ImmediateDispatch()
    if strategy == "one_off":
        run_at = _instant(payload.get("run_at"), "run_at")
        if run_at is None:
            raise ValueError("a one-off trigger_payload without run_at")
        return OneOffSchedule(run_at=run_at)
    start_at = _instant(payload.get("start_at"), "start_at")
    end_at = _instant(payload.get("end_at"), "end_at")
    if strategy == "interval":
        interval = payload.get("interval") or {}
        units = {unit: interval.get(unit) for unit in ("seconds", "minutes", "hours", "days")}
        given = {unit: value for unit, value in units.items() if value is not None}
        return PeriodicSchedule(interval=IntervalTrigger(**given), start_at=start_at, end_at=end_at)
    if strategy == "crontab":
        crontab = _crontab(payload.get("crontab") or {})
        return PeriodicSchedule(crontab=crontab, start_at=start_at, end_at=end_at)
    raise ValueError(f"unknown strategy {strategy!r}")


def _chain_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """1.4's orchestrator kwargs as this package's ``{"chain": ChainSpec}``."""

    def default(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    steps = [
        ResolvedStep(
            task_name=step["task_name"],
            args=list(step.get("args") or []),
            kwargs=dict(step.get("kwargs") or {}),
            max_attempts=default(
                step.get("max_attempts"), kwargs.get("default_step_max_attempts", 1)
            ),
            retry_delay_seconds=default(
                step.get("retry_delay_seconds"),
                kwargs.get("default_step_retry_delay_seconds", 0.0),
            ),
            timeout_seconds=default(
                step.get("timeout_seconds"), kwargs.get("default_step_timeout_seconds")
            ),
            post_delay_ms=default(step.get("post_delay_ms"), 0),
        )
        for step in kwargs["steps"]
    ]
    spec = ChainSpec(
        steps=steps,
        on_failure=kwargs.get("on_failure", "stop"),
        max_chain_attempts=kwargs.get("max_chain_attempts", 1),
        wait_poll_interval_seconds=kwargs.get("wait_poll_interval_seconds", 0.5),
    )
    return {"chain": spec.model_dump(mode="json")}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _utc(value: Any) -> datetime | None:
    """A stored 1.4 datetime: naive on SQLite (it wrote UTC), aware on PostgreSQL."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def convert_job(row: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A 1.4 ``scheduler_job`` row as the values of a ``SchedulerJob`` (attribute names),
    and why its trigger or payload could not be converted (``None`` when it could).

    A job that cannot be converted keeps its id, payload and next run, but is disabled with
    that reason in ``last_error`` and 1.4's trigger payload kept as it was.
    """
    kind = JobKind.CHAIN if row["task_name"] == CHAIN_TASK_NAME else JobKind.SINGLE
    payload = _json(row["trigger_payload"])
    args, kwargs = _json(row["task_args"]), _json(row["task_kwargs"])
    problem = None
    try:
        stored: dict[str, Any] = trigger_to_json(convert_trigger(row["strategy"], payload))
        if kind is JobKind.CHAIN:
            kwargs = _chain_kwargs(kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"not converted from taskiq-beat 1.4: {exc}"
        stored = {"taskiq_beat_1_4": payload}
    values = {
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "task_name": row["task_name"],
        "kind": kind,
        "strategy": row["strategy"],
        "trigger": stored,
        "args": args,
        "kwargs": kwargs,
        "job_metadata": _json(row["metadata_payload"]),
        "is_enabled": bool(row["is_enabled"]) and problem is None,
        "next_run_at": _utc(row["next_run_at"]),
        "last_run_at": _utc(row["last_run_at"]),
        "last_error": problem or row["last_error"],
        "revision": 1,
        "created_at": _utc(row["created_at"]),
        "updated_at": _utc(row["updated_at"]),
    }
    return values, problem


_STATUSES = {"dispatched": RunStatus.DISPATCHED, "failed": RunStatus.FAILED}


def convert_runs(rows: Iterable[Mapping[str, Any]], job_ids: set[str]) -> list[dict[str, Any]]:
    """1.4 ``scheduler_run`` rows as ``SchedulerRun`` values: one run per fire.

    1.4 wrote a row per attempt (failed sends, then the one that went out): the fire's run
    is the row that dispatched it, else its latest; ``attempt`` counts the rows. Runs of jobs
    that no longer exist (1.4 left them behind on SQLite) are not copied. A fire still
    ``queued`` is recorded as failed.
    """
    fires: dict[tuple[str, datetime], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["job_id"] not in job_ids:
            continue
        scheduled_for = _utc(row["scheduled_for"])
        assert scheduled_for is not None
        fires.setdefault((row["job_id"], scheduled_for), []).append(row)
    runs = []
    for (job_id, scheduled_for), attempts in fires.items():
        attempts.sort(key=lambda row: (row["status"] == "dispatched", _utc(row["updated_at"])))
        chosen = attempts[-1]
        status = _STATUSES.get(chosen["status"], RunStatus.FAILED)
        error = chosen["error"]
        if chosen["status"] not in _STATUSES:
            error = f"{chosen['status']} in taskiq-beat 1.4 when converted"
        task_id = chosen["broker_task_id"] or fire_task_id(job_id, scheduled_for)
        runs.append(
            {
                "job_id": job_id,
                "scheduled_for": scheduled_for,
                "status": status,
                "task_id": task_id[:64],
                "attempt": len(attempts),
                "error": error,
                "claimed_by": None,
                "next_attempt_at": None,
                "created_at": _utc(attempts[0]["created_at"]),
                "updated_at": _utc(chosen["updated_at"]),
                "dispatched_at": _utc(chosen["dispatched_at"]),
                "finished_at": None,
                "executions": 0,
                "retries": 0,
            }
        )
    return runs
