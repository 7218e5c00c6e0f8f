"""The scheduler tables: ``scheduler_job`` and ``scheduler_run`` on ``SchedulerBase.metadata``.

Include ``SchedulerBase.metadata`` in your Alembic ``target_metadata`` (or run this package's
own migrations) to create them. Every datetime column holds timezone-aware UTC values on
every backend; SQLite stores them as UTC text, MySQL and MariaDB as ``DATETIME(6)`` in UTC,
and they are read back aware.

On MySQL and MariaDB the tables are InnoDB in ``utf8mb4`` with the binary collation
(``MYSQL_TABLE_OPTIONS``): ids compare as on the other databases, case and accents
included, and a ``VARCHAR(255)`` key (1,020 bytes) stays within InnoDB's 3,072-byte limit.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from datetime import datetime, timezone
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from taskiq_beat.enums import JobKind, JobSource, JobStrategy, RunStatus, StepStatus

__all__ = [
    "ACTIVE_STATUSES",
    "ERROR_MAX_LENGTH",
    "ERROR_TYPE_MAX_LENGTH",
    "JOB_ID_MAX_LENGTH",
    "MYSQL_DIALECTS",
    "MYSQL_TABLE_OPTIONS",
    "NAME_MAX_LENGTH",
    "RESULT_MAX_LENGTH",
    "TASK_NAME_MAX_LENGTH",
    "WORKER_ID_MAX_LENGTH",
    "JSONValue",
    "SchedulerBase",
    "SchedulerChain",
    "SchedulerChainStep",
    "SchedulerJob",
    "SchedulerJobStats",
    "SchedulerRun",
    "SchedulerWorker",
    "UTCDateTime",
    "Unreadable",
    "decode_json",
    "double_float",
    "encode_json",
    "is_mysql",
    "long_text",
    "sqlite_datetime",
]

ERROR_MAX_LENGTH = 4000
"""Longest error message kept on a run; a longer one is truncated (never refused)."""
ERROR_TYPE_MAX_LENGTH = 255
RESULT_MAX_LENGTH = 65536
"""Longest result (its JSON text) kept on a chain step; a longer one is not kept."""
WORKER_ID_MAX_LENGTH = 64
JOB_ID_MAX_LENGTH = 255
NAME_MAX_LENGTH = 255
TASK_NAME_MAX_LENGTH = 255

MYSQL_DIALECTS = ("mysql", "mariadb")
"""SQLAlchemy's names of the MySQL family (``mysql+asyncmy://`` to MariaDB is ``mysql``)."""

MYSQL_TABLE_OPTIONS: dict[str, str] = {
    f"{prefix}_{option}": value
    for prefix in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}
"""Table options of every scheduler table on MySQL and MariaDB (``mysql_...`` and, for
``mariadb://`` URLs, ``mariadb_...``; ignored elsewhere): InnoDB for row locks and
``SKIP LOCKED``, all of Unicode, and ids compared byte for byte."""


def is_mysql(dialect_name: str) -> bool:
    """Whether ``dialect_name`` is MySQL or MariaDB."""
    return dialect_name in MYSQL_DIALECTS


def double_float() -> sa.types.TypeEngine[float]:
    """A float column: ``DOUBLE`` on MySQL and MariaDB (their ``FLOAT`` has 24 bits), the
    plain ``Float`` (a double already) elsewhere."""
    return sa.Float().with_variant(mysql.DOUBLE(asdecimal=False), *MYSQL_DIALECTS)


def long_text() -> sa.types.TypeEngine[str]:
    """A text column of any length: ``LONGTEXT`` on MySQL and MariaDB (their ``TEXT`` holds
    64 KiB), ``Text`` elsewhere."""
    return sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS)


ACTIVE_STATUSES = (
    RunStatus.CLAIMED,
    RunStatus.DISPATCHED,
    RunStatus.RUNNING,
    RunStatus.WAITING,
)
"""Runs that hold a place under an overlap policy: going, or waiting to go."""
ACTIVE_RUNS_SQL = "status IN ({})".format(", ".join(f"'{s.value}'" for s in ACTIVE_STATUSES))

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


SQLITE_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy stores datetimes as SQLite text (UTC here): text order is time order."""


def sqlite_datetime(value: datetime) -> str:
    """``value`` (aware) as the SQLite text stored in a ``UTCDateTime`` column
    (``SQLITE_DATETIME_FORMAT``, with a four-digit year as SQLAlchemy writes it)."""
    if value.tzinfo is not timezone.utc:
        value = value.astimezone(timezone.utc)
    return value.isoformat(" ", "microseconds")[:26]


class UTCDateTime(TypeDecorator[datetime]):
    """A ``TIMESTAMP WITH TIME ZONE`` that only accepts and only returns aware UTC datetimes.

    MySQL and MariaDB have no such type: there it is ``DATETIME(6)`` holding UTC (to the
    microsecond, as elsewhere; never ``TIMESTAMP``, which the session's time zone shifts).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if is_mysql(dialect.name):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored; use an aware one")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite" or is_mysql(dialect.name):
            # SQLite keeps text, MySQL a DATETIME: naive UTC (text order is time order).
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored JSON value that does not parse (a row edited by hand, say).

    It stands in for the value, so that reading such a row never fails the query it comes
    with: the scheduler disables that job alone, and listings still show it.
    """

    text: str

    def __str__(self) -> str:
        return f"unreadable JSON {self.text[:80]!r}"

    __repr__ = __str__


def _json_ready(value: Any) -> Any:
    """A stored JSON value for ``to_dict()``: unreadable text as ``{"unreadable_json": text}``."""
    return {"unreadable_json": value.text} if isinstance(value, Unreadable) else value


def encode_json(value: Any) -> str:
    """``value`` as the text a ``JSONValue`` column stores (SQLAlchemy's default serializer)."""
    return json.dumps(value)


_DECODER = json.JSONDecoder()


def decode_json(text: str | None) -> Any:
    """The value of a ``JSONValue`` column read as text; :class:`Unreadable` if it does not
    parse (as the column type would return it)."""
    if text is None:
        return None
    # The empty object and list are most kwargs and metadata: no parser for them.
    if text == "{}":
        return {}
    if text == "[]":
        return []
    # raw_decode() skips json.loads()'s checks and whitespace scans (most of its cost for
    # short texts); a text it does not consume whole goes through json.loads() after all.
    try:
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    except ValueError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return Unreadable(text)


class JSONValue(TypeDecorator[Any]):
    """``JSON`` that reads a value it cannot parse as :class:`Unreadable` instead of raising.

    (PostgreSQL refuses invalid JSON on write; SQLite stores any text.)
    """

    impl = sa.JSON
    cache_ok = True

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        decode = self.impl_instance.result_processor(dialect, coltype)
        if decode is None:
            return None

        def process(value: Any) -> Any:
            try:
                return decode(value)
            except ValueError:
                return Unreadable(value)

        return process


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _enum(cls: type[enum.Enum], name: str) -> sa.Enum:
    """A portable enum column: VARCHAR holding the member values (new members need no DDL)."""
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class SchedulerBase(DeclarativeBase):
    """Declarative base of the scheduler tables; its ``metadata`` is what Alembic should see."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class SchedulerJobStats(SchedulerBase):
    """The counters of one job, kept current by the workers (one row per job that ran).

    Apart from ``scheduler_job``: a worker adding an outcome locks this row, never the job's,
    which schedulers claim with ``SKIP LOCKED``. Deleted with its job.
    """

    __tablename__ = "scheduler_job_stats"
    __table_args__ = MYSQL_TABLE_OPTIONS

    job_id: Mapped[str] = mapped_column(
        sa.String(JOB_ID_MAX_LENGTH),
        sa.ForeignKey("scheduler_job.id", ondelete="CASCADE"),
        primary_key=True,
    )
    run_count: Mapped[int] = mapped_column(sa.Integer)
    success_count: Mapped[int] = mapped_column(sa.Integer)
    failure_count: Mapped[int] = mapped_column(sa.Integer)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_duration_seconds: Mapped[float | None] = mapped_column(double_float())


def _stat(name: str, default: Any = None) -> Any:
    """A job's counter, read with the job (a scalar subquery by primary key); ``default``
    when the job has not run. Set in Python on new rows (it is never written)."""
    stats = cast("sa.Table", SchedulerJobStats.__table__)
    value: Any = (
        sa.select(stats.c[name])
        .where(stats.c.job_id == sa.literal_column("scheduler_job.id"))
        .scalar_subquery()
    )
    if default is not None:
        value = sa.func.coalesce(value, default)
    return column_property(value, expire_on_flush=False)


class SchedulerJob(SchedulerBase):
    """A scheduled job: what to send (task, args, kwargs) and when (trigger, ``next_run_at``).

    ``revision`` grows with every change made through the API; the engine claims a fire only
    if ``next_run_at``, ``revision`` and ``is_enabled`` still hold the values it loaded.
    """

    __tablename__ = "scheduler_job"

    id: Mapped[str] = mapped_column(sa.String(JOB_ID_MAX_LENGTH), primary_key=True)
    name: Mapped[str | None] = mapped_column(sa.String(NAME_MAX_LENGTH))
    description: Mapped[str | None] = mapped_column(long_text())
    task_name: Mapped[str] = mapped_column(sa.String(TASK_NAME_MAX_LENGTH), index=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    strategy: Mapped[JobStrategy] = mapped_column(_enum(JobStrategy, "job_strategy"))
    trigger: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    args: Mapped[list[Any]] = mapped_column(JSONValue)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    job_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONValue)
    is_enabled: Mapped[bool] = mapped_column(sa.Boolean)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(long_text())
    revision: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSONValue, nullable=True)
    """The job's policy (see :mod:`taskiq_beat.policy`): the fields set, ``None`` for none."""
    # Schedules declared in code (see taskiq_beat.declared): who owns the row, the hash of
    # the definition last applied (``None``: no longer declared, disabled), and the
    # ``schedule_version`` of the process that applied it.
    source: Mapped[JobSource] = mapped_column(
        _enum(JobSource, "job_source"), default=JobSource.API, server_default="api", index=True
    )
    definition_hash: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    schedule_version: Mapped[int | None] = mapped_column(sa.Integer, default=None)
    # What the workers report, read from ``scheduler_job_stats`` with the row (see
    # SchedulerJobStats: a table of its own, so that workers counting never lock a job's
    # row while a scheduler claims it). Read-only here.
    run_count: Mapped[int] = _stat("run_count", 0)
    """Runs finished on a worker (succeeded, failed or lost)."""
    success_count: Mapped[int] = _stat("success_count", 0)
    failure_count: Mapped[int] = _stat("failure_count", 0)
    """Runs that failed on a worker or were lost."""
    last_success_at: Mapped[datetime | None] = _stat("last_success_at")
    last_failure_at: Mapped[datetime | None] = _stat("last_failure_at")
    last_duration_seconds: Mapped[float | None] = _stat("last_duration_seconds")

    __table_args__ = (
        # The engine's only scan: enabled jobs due before a horizon.
        sa.Index("ix_scheduler_job_due", "is_enabled", "next_run_at"),
        MYSQL_TABLE_OPTIONS,
    )

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values (datetimes in ISO 8601, UTC)."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "task_name": self.task_name,
            "kind": self.kind.value,
            "strategy": self.strategy.value,
            "trigger": _json_ready(self.trigger),
            "args": _json_ready(self.args),
            "kwargs": _json_ready(self.kwargs),
            "metadata": _json_ready(self.job_metadata),
            "is_enabled": self.is_enabled,
            "next_run_at": _iso(self.next_run_at),
            "last_run_at": _iso(self.last_run_at),
            "last_error": self.last_error,
            "revision": self.revision,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "policy": _json_ready(self.policy),
            "source": self.source.value if self.source is not None else JobSource.API.value,
            "definition_hash": self.definition_hash,
            "schedule_version": self.schedule_version,
            "run_count": self.run_count,
            "success_count": self.success_count,
            "failure_count": self.failure_count,
            "last_success_at": _iso(self.last_success_at),
            "last_failure_at": _iso(self.last_failure_at),
            "last_duration_seconds": self.last_duration_seconds,
        }

    def __repr__(self) -> str:
        return (
            f"SchedulerJob(id={self.id!r}, task_name={self.task_name!r}, "
            f"strategy={self.strategy.value if self.strategy else None!r}, "
            f"next_run_at={self.next_run_at!r}, is_enabled={self.is_enabled!r})"
        )


class SchedulerRun(SchedulerBase):
    """One fire of a job: at most one row per ``(job_id, scheduled_for)``.

    ``next_attempt_at`` is set while the fire still has to reach the broker: for a
    ``claimed`` run it is the end of the claim's lease, for a ``failed`` run the time of the
    retry. It is ``NULL`` once the run is done (dispatched, or failed for good).
    """

    __tablename__ = "scheduler_run"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(
        sa.String(JOB_ID_MAX_LENGTH), sa.ForeignKey(SchedulerJob.id, ondelete="CASCADE")
    )
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"))
    task_id: Mapped[str] = mapped_column(sa.String(64))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(long_text())
    claimed_by: Mapped[str | None] = mapped_column(sa.String(64))
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Written by the worker that executes the fire (see taskiq_beat.worker).
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_seconds: Mapped[float | None] = mapped_column(double_float())
    worker_id: Mapped[str | None] = mapped_column(sa.String(WORKER_ID_MAX_LENGTH), index=True)
    executions: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    """How many times a worker started this fire: 1, or 2 after a lost run ran again."""
    retries: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    """Taskiq retries of the fire (its retry middleware's ``_retries`` label)."""
    error_type: Mapped[str | None] = mapped_column(sa.String(ERROR_TYPE_MAX_LENGTH))
    jitter_seconds: Mapped[float | None] = mapped_column(double_float())
    """The random delay the job's policy gave this fire (sent that much after
    ``scheduled_for``)."""
    steps: Mapped[list[SchedulerChainStep]] = relationship(
        "SchedulerChainStep",
        order_by="SchedulerChainStep.id",
        lazy="selectin",
        viewonly=True,
    )
    """A chain's step attempts, in the order they were recorded (empty for a single task);
    loaded with the run, so they stay readable after its session closed."""

    __table_args__ = (
        sa.UniqueConstraint("job_id", "scheduled_for"),
        # History across jobs, newest first (list_runs, the CLI), and the retention's scan.
        sa.Index("ix_scheduler_run_scheduled_for", "scheduled_for"),
        # The runs of a job still going (or waiting), which an overlap policy counts before
        # it sends a fire. Partial: a run leaves it when it ends, so it stays as small as
        # the work in flight, however long the history.
        sa.Index(
            "ix_scheduler_run_active",
            "job_id",
            postgresql_where=sa.text(ACTIVE_RUNS_SQL),
            sqlite_where=sa.text(ACTIVE_RUNS_SQL),
        ),
        MYSQL_TABLE_OPTIONS,
    )

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready values (datetimes in ISO 8601, UTC)."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "scheduled_for": _iso(self.scheduled_for),
            "status": self.status.value,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "error": self.error,
            "claimed_by": self.claimed_by,
            "next_attempt_at": _iso(self.next_attempt_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "dispatched_at": _iso(self.dispatched_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_seconds": self.duration_seconds,
            "worker_id": self.worker_id,
            "executions": self.executions,
            "retries": self.retries,
            "error_type": self.error_type,
            "jitter_seconds": self.jitter_seconds,
            "steps": [step.to_dict() for step in self.steps],
        }

    def __repr__(self) -> str:
        return (
            f"SchedulerRun(job_id={self.job_id!r}, scheduled_for={self.scheduled_for!r}, "
            f"status={self.status.value if self.status else None!r}, task_id={self.task_id!r})"
        )


class SchedulerWorker(SchedulerBase):
    """A Taskiq worker process that reports the runs it executes.

    It renews ``last_seen_at`` every few seconds; the scheduler marks the ``running`` runs of
    a worker not seen for longer than ``SchedulerConfig.worker_timeout_seconds`` as ``lost``
    and then sets ``stopped_at``. A worker that shuts down cleanly sets it itself.
    """

    __tablename__ = "scheduler_worker"
    __table_args__ = MYSQL_TABLE_OPTIONS

    id: Mapped[str] = mapped_column(sa.String(WORKER_ID_MAX_LENGTH), primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int] = mapped_column(sa.Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_dict(self) -> dict[str, Any]:
        """The worker as JSON-ready values (datetimes in ISO 8601, UTC)."""
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "started_at": _iso(self.started_at),
            "last_seen_at": _iso(self.last_seen_at),
            "stopped_at": _iso(self.stopped_at),
        }

    def __repr__(self) -> str:
        return f"SchedulerWorker(id={self.id!r}, last_seen_at={self.last_seen_at!r})"


class SchedulerChain(SchedulerBase):
    """A chain's progress beside its run (one row per chain run that started).

    ``spec`` is the chain as its fire sent it (steps with every default applied, failure
    policy), so that a job edited meanwhile does not change a chain under way;
    ``chain_attempt`` counts the runs of the chain (``on_failure="restart"``).
    """

    __tablename__ = "scheduler_chain"
    __table_args__ = MYSQL_TABLE_OPTIONS

    run_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        sa.ForeignKey(SchedulerRun.id, ondelete="CASCADE"),
        primary_key=True,
    )
    spec: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    chain_attempt: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SchedulerChainStep(SchedulerBase):
    """One attempt of one step of a chain run: at most one row per
    ``(run_id, chain_attempt, step, attempt)``, and one per Taskiq task id.

    The row is written before its message is sent (an outbox): ``due_at`` is when it is to be
    sent (a sender pushes it forward while it sends), ``dispatched_at`` when it was. Workers
    move it to ``running`` and to its outcome by compare-and-set, so that a message delivered
    twice runs once and its outcome advances the chain once. ``deadline_at`` is when it times
    out (``None``: never). ``result`` is the JSON text of what the task returned, kept when
    it is at most ``RESULT_MAX_LENGTH`` characters.
    """

    __tablename__ = "scheduler_chain_step"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        sa.ForeignKey(SchedulerRun.id, ondelete="CASCADE"),
    )
    chain_attempt: Mapped[int] = mapped_column(sa.Integer)
    step: Mapped[int] = mapped_column(sa.Integer)
    attempt: Mapped[int] = mapped_column(sa.Integer)
    task_name: Mapped[str] = mapped_column(sa.String(TASK_NAME_MAX_LENGTH))
    task_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    status: Mapped[StepStatus] = mapped_column(_enum(StepStatus, "step_status"))
    args: Mapped[list[Any]] = mapped_column(JSONValue)
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_seconds: Mapped[float | None] = mapped_column(double_float())
    worker_id: Mapped[str | None] = mapped_column(sa.String(WORKER_ID_MAX_LENGTH), index=True)
    executions: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    """How many times a worker started this attempt: 1, or more after its worker was lost."""
    result: Mapped[str | None] = mapped_column(long_text())
    error: Mapped[str | None] = mapped_column(long_text())
    error_type: Mapped[str | None] = mapped_column(sa.String(ERROR_TYPE_MAX_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint("run_id", "chain_attempt", "step", "attempt"),
        # The watchdog's scans: steps to send, steps past their deadline.
        sa.Index("ix_scheduler_chain_step_due", "status", "due_at"),
        sa.Index("ix_scheduler_chain_step_deadline", "status", "deadline_at"),
        MYSQL_TABLE_OPTIONS,
    )

    def to_dict(self) -> dict[str, Any]:
        """The step attempt as JSON-ready values (``result`` decoded)."""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "chain_attempt": self.chain_attempt,
            "step": self.step,
            "attempt": self.attempt,
            "task_name": self.task_name,
            "task_id": self.task_id,
            "status": self.status.value,
            "due_at": _iso(self.due_at),
            "deadline_at": _iso(self.deadline_at),
            "dispatched_at": _iso(self.dispatched_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_seconds": self.duration_seconds,
            "worker_id": self.worker_id,
            "executions": self.executions,
            "result": _json_ready(decode_json(self.result)),
            "error": self.error,
            "error_type": self.error_type,
        }

    def __repr__(self) -> str:
        return (
            f"SchedulerChainStep(run_id={self.run_id!r}, step={self.step!r}, "
            f"attempt={self.attempt!r}, status={self.status.value if self.status else None!r})"
        )


class SchedulerInstance(SchedulerBase):
    """A scheduler process running the scheduling loop, for as long as it renews its row.

    Live schedulers (seen within their ``claim_lease_seconds``) share the due jobs: each
    takes those whose stable hash of the id falls in its slot among the live ids, sorted
    (see :mod:`taskiq_beat.engine`). A scheduler that stops cleanly deletes its row; one
    that dies leaves it to age out. Only a hint for sharing the work: exactly-once rests on
    the claims' compare-and-set, never on this table.
    """

    __tablename__ = "scheduler_instance"
    __table_args__ = MYSQL_TABLE_OPTIONS

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"SchedulerInstance(id={self.id!r}, last_seen_at={self.last_seen_at!r})"
