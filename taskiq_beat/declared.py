"""Schedules declared in code: ``@scheduler_app.periodic(...)`` and ``scheduler_app.define(...)``.

Declarations are kept on the app, checked when they are made, and applied to the database
when the scheduler starts (or by ``taskiq-beat jobs apply``), in one transaction:

- a declared job that is not in the database is created (``source = 'code'``);
- a declared job whose definition changed since it was applied is rewritten, as
  ``.upsert()`` would (``next_run_at`` kept unless the trigger, the task or the enabled state
  changed); an unchanged one is not written at all, so a job paused through the API stays
  paused until its definition changes;
- a job declared in code earlier and no longer declared is **disabled**, not deleted: its
  row and run history stay, with ``definition_hash = NULL`` (declaring it again enables it);
- a job made through the API is never touched, even if a declaration uses its id (that
  declaration is reported as a conflict and skipped).

Which code wins: every apply carries the app's ``schedule_version`` (an integer the user
raises when the declarations change) and writes it on the rows it writes. An apply whose
version is lower than the highest version stored on a declared job changes nothing (an
older deployment still running, or started late, cannot undo a newer one); applies are
serialized by a lock (PostgreSQL advisory lock, SQLite's write lock), and each row write is
also a compare-and-set on the stored version. With equal versions, the last apply wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from taskiq_beat.builders import JobDefinition
from taskiq_beat.exceptions import InvalidJobError
from taskiq_beat.triggers import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    PeriodicSchedule,
    Trigger,
    validate_trigger,
)

__all__ = ["DeclarationPlan", "Declarations", "coerce_trigger", "definition_hash"]

_HASHED = (
    "task_name",
    "kind",
    "trigger",
    "args",
    "kwargs",
    "job_metadata",
    "name",
    "description",
    "is_enabled",
    "policy",
)


def definition_hash(row: dict[str, Any]) -> str:
    """The SHA-256 of what a declared job stores (task, trigger, payload, name, enabled
    state, policy), over canonical JSON: equal definitions hash alike in every process."""
    values = {key: row.get(key) for key in _HASHED}
    values["kind"] = getattr(values["kind"], "value", values["kind"])
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def coerce_trigger(value: Any, field_name: str = "trigger") -> Trigger:
    """A declared trigger: a trigger object, a ``CrontabTrigger`` or ``IntervalTrigger``
    (made periodic), a ``timedelta`` (an interval), or a cron string of five fields
    (``"*/5 * * * *"``, second 0) or six (seconds first).

    :raises InvalidJobError: naming ``field_name`` for anything else, ``ImmediateDispatch``
        included (a declared job is stored, never sent at once).
    """
    if isinstance(value, CrontabTrigger):
        value = PeriodicSchedule(crontab=value)
    elif isinstance(value, IntervalTrigger):
        value = PeriodicSchedule(interval=value)
    elif isinstance(value, timedelta):
        if value <= timedelta(0):
            raise InvalidJobError(field_name, value, "the interval must be longer than zero")
        value = PeriodicSchedule(interval=IntervalTrigger(seconds=value.total_seconds()))
    elif isinstance(value, str):
        value = PeriodicSchedule(crontab=_cron(value, field_name))
    trigger = validate_trigger(value, field_name)
    if isinstance(trigger, ImmediateDispatch):
        raise InvalidJobError(
            field_name, trigger, "ImmediateDispatch cannot be declared; use .schedule()"
        )
    return trigger


def _cron(text: str, field_name: str) -> CrontabTrigger:
    fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise InvalidJobError(
            field_name, text, "expected a cron expression of 5 fields (or 6, seconds first)"
        )
    second, minute, hour, day_of_month, month_of_year, day_of_week = fields
    # A bad field raises InvalidTriggerError naming it (CrontabTrigger.minute, ...).
    return CrontabTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


class Declarations:
    """The jobs an app declares in code, by id (checked when declared)."""

    def __init__(self) -> None:
        self._definitions: dict[str, JobDefinition] = {}
        self.used = False
        """Whether anything was declared (``define()`` with no argument counts): only then
        does the scheduler apply declarations, and retire the jobs no longer declared."""

    def add(self, definitions: Iterable[JobDefinition]) -> None:
        """Declare ``definitions``; all or none of them.

        :raises InvalidJobError: for a value that is not a ``JobDefinition``, a bad trigger,
            or an id declared twice.
        """
        checked: dict[str, JobDefinition] = {}
        for definition in definitions:
            if not isinstance(definition, JobDefinition):
                raise InvalidJobError(
                    "definitions", definition, "expected builder.definition(...) values"
                )
            definition = dataclasses.replace(definition, trigger=coerce_trigger(definition.trigger))
            job_id = definition.job_id
            if not isinstance(job_id, str) or not job_id:
                raise InvalidJobError("job_id", job_id, "expected a non-empty string")
            if job_id in self._definitions or job_id in checked:
                raise InvalidJobError("job_id", job_id, "declared twice")
            checked[job_id] = definition
        self._definitions.update(checked)
        self.used = True

    def __iter__(self) -> Iterator[JobDefinition]:
        return iter(list(self._definitions.values()))

    def __len__(self) -> int:
        return len(self._definitions)


@dataclass(frozen=True)
class DeclarationPlan:
    """What applying the declarations changes (or changed), by job id, each list sorted.

    ``skipped`` is true when the database holds declarations of a newer
    ``schedule_version`` than this app's: then nothing is (or would be) written.
    """

    schedule_version: int
    stored_version: int | None
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    """Declared ids that belong to jobs made through the API: left alone."""
    skipped: bool = False
    applied: bool = False

    @property
    def has_changes(self) -> bool:
        return not self.skipped and bool(self.added or self.changed or self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule_version": self.schedule_version,
            "stored_version": self.stored_version,
            "skipped": self.skipped,
            "applied": self.applied,
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "conflicts": self.conflicts,
        }
