"""What every part of the store shares: the tables, the executor type, dialect helpers,
the change channel and commits that keep rows readable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import (
    TYPE_CHECKING,
    Any,
    Union,
    cast,
)

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm.util import identity_key

from taskiq_beat._gc import gc_paused
from taskiq_beat.enums import JobKind
from taskiq_beat.models import (
    SchedulerJob,
    SchedulerRun,
    UTCDateTime,
    is_mysql,
)
from taskiq_beat.store.values import JobRecord

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

_Executor = Union["AsyncSession", AsyncConnection]  # what the engine's statements run on
_CHUNK = 2000  # rows per statement in bulk operations (SQLite allows 32766 parameters)
_job = cast("sa.Table", SchedulerJob.__table__)
_run = cast("sa.Table", SchedulerRun.__table__)


def _insert_for(dialect_name: str) -> Any:
    if dialect_name == "postgresql":
        return postgresql.insert
    if dialect_name == "sqlite":
        return sqlite.insert
    if is_mysql(dialect_name):
        return mysql.insert
    raise NotImplementedError(
        f"taskiq-beat supports SQLite, PostgreSQL, MySQL and MariaDB, not {dialect_name!r}"
    )


def _upsert(
    dialect_name: str,
    table: sa.Table,
    update: Callable[[Any], dict[str, Any]],
    values: dict[str, Any] | None = None,
) -> Any:
    """``INSERT`` into ``table`` that updates the row whose primary key it meets instead:
    ``update(new)`` is the ``SET``, ``new`` the columns of the row proposed (``EXCLUDED`` on
    PostgreSQL and SQLite; on MySQL and MariaDB ``ON DUPLICATE KEY UPDATE``'s ``VALUES()``,
    or the row alias SQLAlchemy writes instead for MySQL 8.0.20+, and there only the primary
    key may be unique: any unique key would count)."""
    insert = _insert_for(dialect_name)(table)
    if values is not None:
        insert = insert.values(**values)
    if is_mysql(dialect_name):
        return insert.on_duplicate_key_update(update(insert.inserted))
    return insert.on_conflict_do_update(
        index_elements=list(table.primary_key.columns), set_=update(insert.excluded)
    )


def _insert_unless_there(dialect_name: str, table: sa.Table, index_elements: list[Any]) -> Any:
    """``INSERT`` into ``table`` that leaves out a row whose unique key ``index_elements``
    is taken (``ON CONFLICT DO NOTHING``; on MySQL an ``ON DUPLICATE KEY UPDATE`` that
    changes nothing, never ``INSERT IGNORE``, which would drop other errors too)."""
    insert = _insert_for(dialect_name)(table)
    if is_mysql(dialect_name):
        key = next(iter(table.primary_key.columns))
        return insert.on_duplicate_key_update({key.name: key})
    return insert.on_conflict_do_nothing(index_elements=index_elements)


def _returns_rows(dialect_name: str) -> bool:
    """Whether ``UPDATE ... RETURNING`` works (not on MySQL; MariaDB only from 11.x)."""
    return not is_mysql(dialect_name)


def _column_names(values: dict[str, Any]) -> dict[str, Any]:
    """Attribute names to column names: only ``job_metadata`` is stored as ``metadata``."""
    row = dict(values)
    row["metadata"] = row.pop("job_metadata")
    return row


def _text_of(column: sa.Column[Any]) -> sa.ColumnElement[str]:
    """The stored JSON as text, undecoded (asyncpg would decode a json column itself)."""
    return sa.cast(column, sa.Text()).label(column.name)


def _select_payloads() -> sa.Select[Any]:
    """A job's task and its payload as stored JSON texts (what a :class:`Fire` holds)."""
    return sa.select(
        _job.c.id,
        _job.c.task_name,
        _text_of(_job.c.args),
        _text_of(_job.c.kwargs),
        _text_of(_job.c["metadata"]),
    )


def _select_records() -> sa.Select[Any]:
    """The job columns the engine loads, as the driver returns them: no SQLAlchemy type
    processing (:func:`_records` converts them, several times faster for 100k rows)."""

    def raw(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
        return sa.type_coerce(column, sa.String()).label(column.name)

    return sa.select(
        _job.c.id,
        raw(_job.c.kind),
        _text_of(_job.c.trigger),
        raw(_job.c.next_run_at),
        _job.c.revision,
        raw(_job.c.is_enabled),
        _job.c.task_name,
        _text_of(_job.c.args),
        _text_of(_job.c.kwargs),
        _text_of(_job.c["metadata"]),
        _text_of(_job.c.policy),
    )


_KINDS: dict[str, JobKind] = {kind.value: kind for kind in JobKind}


def _records(rows: Iterable[Any], dialect: sa.Dialect) -> list[JobRecord]:
    """Rows of :func:`_select_records` as records: kinds as ``JobKind`` (a value of none
    kept as text), ``next_run_at`` an aware UTC datetime, ``is_enabled`` a bool."""
    kinds = _KINDS
    times = _StoredTimes(dialect)
    with gc_paused():  # up to every due job at once; rows are fetched already: no await
        return [
            JobRecord(
                job_id,
                kinds.get(kind, kind),
                trigger,
                times(next_run_at),
                revision,
                bool(is_enabled),
                task_name,
                args,
                kwargs,
                metadata,
                policy,
            )
            for (
                job_id,
                kind,
                trigger,
                next_run_at,
                revision,
                is_enabled,
                task_name,
                args,
                kwargs,
                metadata,
                policy,
            ) in rows
        ]


class _StoredTimes(dict[Any, "datetime | None"]):
    """A stored ``next_run_at`` as the driver returns it (text on SQLite, an aware datetime
    on PostgreSQL) to an aware UTC datetime, as :class:`UTCDateTime` reads it; each distinct
    value once (the due jobs of a burst share a few times)."""

    def __init__(self, dialect: sa.Dialect) -> None:
        super().__init__()
        self[None] = None
        self._dialect = dialect
        self._type = UTCDateTime()

    def __call__(self, value: Any) -> datetime | None:
        if type(value) is datetime and value.tzinfo is timezone.utc:
            return value
        try:
            return self[value]
        except KeyError:
            converted = self[value] = self._convert(value)
            return converted

    def _convert(self, value: Any) -> datetime | None:
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:  # another spelling SQLAlchemy reads: let it
                processor = self._type.result_processor(self._dialect, None)
                return processor(value) if processor is not None else None
        if isinstance(value, datetime):
            return self._type.process_result_value(value, self._dialect)
        raise TypeError(f"next_run_at read as {type(value).__name__}: {value!r}")


def _dialect(session: _Executor) -> sa.Dialect:
    if isinstance(session, AsyncConnection):
        return session.dialect
    return session.get_bind().dialect


def _dialect_name(session: _Executor) -> str:
    return _dialect(session).name


CHANGES_CHANNEL = "taskiq_beat_jobs"
"""PostgreSQL channel on which every committed job change is announced (once per commit)."""
SHARE_CHANGED = "schedulers:"
"""How the payload of an announcement on :data:`CHANGES_CHANNEL` that a scheduler joined or
left begins, followed by that scheduler's id (see :mod:`taskiq_beat.store.instances`): no job
changed, the share of each did."""
PROBE = "probe:"
"""How the payload of a scheduler's test notification on :data:`CHANGES_CHANNEL` begins
(see ``SchedulerStore.hears``): no job changed."""


async def _announce_change(session: AsyncSession) -> None:
    """Wake listening schedulers when this transaction commits (PostgreSQL ``NOTIFY``)."""
    if _dialect_name(session) == "postgresql":
        await session.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, "")))


class ChangeListener:
    """One connection that hears the changes other processes commit (PostgreSQL ``LISTEN``).

    ``on_change`` is called (on the event loop) once per committed change, and once more when
    the connection is lost: ``alive`` is then false and a new listener must be opened.
    ``on_share_change``, where given, is called instead when a scheduler joined or left,
    with its id.
    """

    def __init__(
        self,
        connection: AsyncConnection,
        on_change: Callable[[], None],
        on_share_change: Callable[[str], None] | None = None,
    ) -> None:
        self._connection = connection
        self._on_change = on_change
        self._on_share_change = on_share_change
        self.alive = True
        self._probes: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        raw = await self._connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None, "an open connection has a driver connection"
        driver.add_termination_listener(self._lost)
        await driver.add_listener(CHANGES_CHANNEL, self._heard)

    def _heard(self, *args: Any) -> None:
        payload = args[-1] if args else None  # (connection, pid, channel, payload)
        if isinstance(payload, str) and payload.startswith(SHARE_CHANGED):
            if self._on_share_change is not None:
                self._on_share_change(payload[len(SHARE_CHANGED) :])
            return
        if isinstance(payload, str) and payload.startswith(PROBE):
            waiter = self._probes.get(payload)  # another scheduler's: nothing to do
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        self._on_change()

    def expect(self, payload: str) -> asyncio.Future[None]:
        """A future done when a notification with ``payload`` is heard."""
        waiter = self._probes[payload] = asyncio.get_running_loop().create_future()
        return waiter

    def unexpect(self, payload: str) -> None:
        self._probes.pop(payload, None)

    def _lost(self, *_: Any) -> None:
        self.alive = False
        self._on_change()  # wake the owner: it must listen again and catch up

    async def close(self) -> None:
        """Drop the connection, not back into the pool: it listens (or is dead)."""
        self.alive = False
        with contextlib.suppress(Exception):
            await self._connection.invalidate()
        with contextlib.suppress(Exception):
            await self._connection.close()


def _forget(tasks: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(task: asyncio.Future[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned operation's failure is no news

    return done


def _make_room(session: AsyncSession, job: SchedulerJob) -> None:
    """Detach a row with ``job``'s id loaded earlier in ``session``: the database decides
    whether the id is taken (the insert then fails on the primary key), not a cached object."""
    loaded = session.sync_session.identity_map.get(identity_key(SchedulerJob, job.id))
    if loaded is not None:
        session.expunge(loaded)


async def _commit(session: AsyncSession) -> None:
    """Commit without expiring loaded objects, so rows we return stay readable afterwards.

    Every attribute of the rows we write is set in Python, so nothing is left for a refresh
    to load; without this, a session made with ``expire_on_commit=True`` would hand back rows
    whose attributes need I/O (which async sessions cannot do implicitly).
    """
    sync_session = session.sync_session
    expire = sync_session.expire_on_commit
    sync_session.expire_on_commit = False
    try:
        await session.commit()
    finally:
        sync_session.expire_on_commit = expire
