"""Applying the schedules declared in code: one transaction, serialized between processes.

The caller (``SchedulerApp.apply_declarations``) runs, in one session:
:meth:`DeclaredOperations.lock_declarations`, :meth:`~DeclaredOperations.load_declared`,
then either :meth:`~DeclaredOperations.write_declared` and
:meth:`~DeclaredOperations.retire_declared` followed by
:meth:`~DeclaredOperations.commit_declared`, or a rollback (a diff, or an apply that
found a newer version).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from taskiq_beat.enums import JobSource
from taskiq_beat.models import is_mysql
from taskiq_beat.store._common import (
    _CHUNK,
    _announce_change,
    _column_names,
    _commit,
    _dialect_name,
    _insert_for,
    _job,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

logger = logging.getLogger(__name__)

__all__ = ["MYSQL_LOCKED", "DeclaredOperations", "DeclaredRow", "release_declarations"]

# Any 64-bit number of our own: the PostgreSQL advisory lock that serializes applies.
_ADVISORY_LOCK_KEY = 0x7461736B69715F62  # "taskiq_b"
# MySQL's named lock of the same purpose: one per database (the names are server-wide).
_MYSQL_LOCK = sa.func.concat(
    "taskiq_beat_declared:", sa.func.left(sa.func.sha1(sa.func.database()), 40)
)
_MYSQL_WAIT = 3600
MYSQL_LOCKED = "taskiq_beat_declarations_locked"
"""``session.info`` key: this session holds MySQL's named lock of the declarations."""


@dataclass(frozen=True)
class DeclaredRow:
    """A job declared in code, as stored: its hash (``None``: retired) and version."""

    definition_hash: str | None
    schedule_version: int | None
    is_enabled: bool


class DeclaredOperations:
    """The store's part of applying declarations; every method runs in the caller's session."""

    @staticmethod
    async def lock_declarations(session: AsyncSession) -> None:
        """Open the transaction holding the lock that serializes applies, until it ends.

        PostgreSQL: a transaction-level advisory lock. MySQL and MariaDB: a named lock of the
        database (``GET_LOCK``), released once the apply is committed or rolled back (see
        :func:`release_declarations`). SQLite: a write that changes nothing
        takes the database's write lock (one writer at a time), so the reads that follow see
        no apply of another process in between.
        """
        dialect_name = _dialect_name(session)
        if dialect_name == "postgresql":
            await session.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
        elif is_mysql(dialect_name) and not session.info.get(MYSQL_LOCKED):
            # A named lock of this database. It belongs to the connection, not to the
            # transaction: commit_declared releases it once the apply is committed, and a
            # rollback (JobOperations.rollback) before it rolls back. Taken once a session
            # (MySQL counts a second GET_LOCK of the same name, to be released twice).
            session.info[MYSQL_LOCKED] = True
            got = await session.scalar(sa.select(sa.func.get_lock(_MYSQL_LOCK, _MYSQL_WAIT)))
            if got != 1:
                del session.info[MYSQL_LOCKED]
                raise TimeoutError(
                    f"another apply of declared jobs held the lock for {_MYSQL_WAIT} s"
                )
        elif not is_mysql(dialect_name):
            await session.execute(
                sa.update(_job).where(sa.false()).values(revision=_job.c.revision)
            )

    @staticmethod
    async def load_declared(session: AsyncSession) -> dict[str, DeclaredRow]:
        """Every job declared in code (retired ones included), by id."""
        result = await session.execute(
            sa.select(
                _job.c.id, _job.c.definition_hash, _job.c.schedule_version, _job.c.is_enabled
            ).where(_job.c.source == JobSource.CODE)
        )
        return {
            job_id: DeclaredRow(digest, version, bool(enabled))
            for job_id, digest, version, enabled in result
        }

    @staticmethod
    async def write_declared(
        session: AsyncSession, rows: Sequence[dict[str, Any]], version: int
    ) -> None:
        """Insert or overwrite declared jobs (values by attribute name, ``source``,
        ``definition_hash`` and ``schedule_version`` included), without committing.

        A compare-and-set per row: an existing row is overwritten only if it was declared in
        code, at a ``schedule_version`` not above ``version``.
        """
        rows = [_column_names(row) for row in rows]
        dialect_name = _dialect_name(session)
        insert = _insert_for(dialect_name)(_job)
        ours: Any = sa.and_(
            _job.c.source == JobSource.CODE,
            sa.func.coalesce(_job.c.schedule_version, 0) <= version,
        )
        if is_mysql(dialect_name):
            # No WHERE on ON DUPLICATE KEY UPDATE: each column keeps its value unless the
            # row is ours, and the columns the condition reads are assigned last (MySQL
            # assigns left to right, and a later column would see their new values).
            # (Literals, not parameters: asyncmy's many-row INSERT takes parameters in its
            # VALUES only.)
            ours = sa.text(
                f"{_job.name}.source = '{JobSource.CODE.value}'"
                f" AND COALESCE({_job.name}.schedule_version, 0) <= {int(version)}"
            )
            last = ("source", "schedule_version")
            names = [c.name for c in _job.c if c.name not in ("id", *last)] + list(last)
            statement = insert.on_duplicate_key_update(
                [
                    (name, sa.case((ours, insert.inserted[name]), else_=_job.c[name]))
                    for name in names
                ]
            )
        else:
            statement = insert.on_conflict_do_update(
                index_elements=[_job.c.id],
                set_={c.name: insert.excluded[c.name] for c in _job.c if c.name != "id"},
                where=ours,
            )
        for start in range(0, len(rows), _CHUNK):
            await session.execute(statement, list(rows[start : start + _CHUNK]))

    @staticmethod
    async def retire_declared(
        session: AsyncSession, job_ids: Sequence[str], version: int, now: datetime
    ) -> None:
        """Disable the declared jobs ``job_ids`` (no longer declared), without committing:
        ``definition_hash`` becomes ``NULL`` and ``schedule_version`` this one. Rows of a
        newer version or owned by the API are left as they are."""
        statement = (
            sa.update(_job)
            .where(
                _job.c.id.in_(sa.bindparam("ids", expanding=True)),
                _job.c.source == JobSource.CODE,
                sa.func.coalesce(_job.c.schedule_version, 0) <= version,
            )
            .values(
                is_enabled=False,
                next_run_at=None,
                definition_hash=None,
                schedule_version=version,
                revision=_job.c.revision + 1,
                updated_at=now,
            )
        )
        for start in range(0, len(job_ids), _CHUNK):
            await session.execute(statement, {"ids": list(job_ids[start : start + _CHUNK])})

    @staticmethod
    async def commit_declared(session: AsyncSession) -> None:
        """Commit the apply (announcing the change to listening schedulers)."""
        await _announce_change(session)
        if session.info.pop(MYSQL_LOCKED, False):
            # Commit on the connection that holds the named lock, then release it there:
            # the next apply reads what this one wrote.
            await session.flush()
            await session.execute(sa.text("COMMIT"))
            await session.execute(sa.select(sa.func.release_lock(_MYSQL_LOCK)))
        await _commit(session)


async def release_declarations(session: AsyncSession) -> None:
    """Release MySQL's named lock of the declarations if ``session`` holds it (before a
    rollback: nothing was written). A connection that cannot answer lets it go anyway
    when it closes."""
    if session.info.pop(MYSQL_LOCKED, False):
        try:
            await session.execute(sa.select(sa.func.release_lock(_MYSQL_LOCK)))
        except Exception:  # a broken connection: closing it releases the lock
            logger.debug("could not release the declarations lock", exc_info=True)
