"""All SQL of taskiq-beat, behind :class:`SchedulerStore`.

Two kinds of operations live here:

- management operations run in the caller's ``AsyncSession`` (the one passed to
  ``.schedule()``, ``pause()``...), one short transaction each, committed here;
- engine operations open their own session from the session factory, one short transaction
  per call, and work on plain values (:class:`JobRecord`, :class:`Claims`, :class:`Fire`).

The exactly-once contract:

- :meth:`SchedulerStore.claim` advances each job's ``next_run_at`` by compare-and-set on the
  values the engine loaded (``next_run_at``, ``revision``, ``is_enabled``) and inserts the fire's
  ``scheduler_run`` row (unique on ``(job_id, scheduled_for)``) in the same transaction. Only
  fires returned by it may be sent. A job changed, paused, deleted or claimed by another
  scheduler since it was loaded is not returned. The fires carry the task and payload the
  engine loaded with that revision: every change of a job through the API increments
  ``revision``, so a successful compare-and-set means they are still the stored ones.
- A claimed run carries a lease (``next_attempt_at``). Until it expires no other scheduler
  touches the fire; after it expires :meth:`SchedulerStore.claim_retries` hands the fire to
  whoever asks first, under a new lease, with the same task id.
- :meth:`SchedulerStore.record` closes the fires that were sent, and gives failed or released
  fires a time at which they are retried.

The values the engine exchanges with the store for every job and fire (:class:`JobRecord`,
:class:`Fire`) are named tuples: immutable like frozen dataclasses, and several times
cheaper to make (a frozen dataclass sets each field through ``object.__setattr__``; ~1.5 us
each). A batch's claims go as columns (:class:`Claims`), and what happened to its sends as
a list of mostly shared :class:`SendOutcome` constants: no object per fire that lives from
claim to record, for the cyclic garbage collector to scan again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    NamedTuple,
    ParamSpec,
    TypeVar,
    Union,
    cast,
    overload,
)

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm.util import identity_key

from taskiq_beat._gc import gc_paused
from taskiq_beat.enums import JobKind, RunStatus
from taskiq_beat.models import (
    SchedulerJob,
    SchedulerRun,
    UTCDateTime,
    sqlite_datetime,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

__all__ = [
    "CHANGES_CHANNEL",
    "RELEASED",
    "SENT",
    "ChangeListener",
    "Claims",
    "Fire",
    "JobRecord",
    "ScheduleState",
    "SchedulerStore",
    "SendOutcome",
]

_Executor = Union["AsyncSession", AsyncConnection]  # what the engine's statements run on
_CHUNK = 2000  # rows per statement in bulk operations (SQLite allows 32766 parameters)
_job = cast("sa.Table", SchedulerJob.__table__)
_run = cast("sa.Table", SchedulerRun.__table__)


class JobRecord(NamedTuple):
    """What the engine needs of a job row to schedule and send it. The JSON columns
    (``trigger``, ``args``, ``kwargs``, ``metadata``) come as their stored text: the engine
    parses the trigger of jobs it does not hold already, and the payload is decoded when a
    fire is sent (see :func:`~taskiq_beat.models.decode_json`).
    """

    id: str
    kind: JobKind | str
    """A ``JobKind``, or the stored text when no kind has that value (a hand-edited row)."""
    trigger: str
    next_run_at: datetime | None
    revision: int
    is_enabled: bool
    task_name: str
    args: str
    kwargs: str
    metadata: str


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduleState:
    """What an upsert needs to know of an existing job."""

    trigger: Any
    task_name: str
    kind: JobKind
    is_enabled: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_error: str | None
    revision: int
    created_at: datetime


@dataclasses.dataclass(eq=False)
class Claims:
    """The claims of one batch, column by column: claim ``i`` asks for the fire of
    ``job_ids[i]`` at ``scheduled_for[i]``.

    It succeeds only if the job still has ``expected_next_run_at[i]`` and
    ``expected_revisions[i]`` and is enabled; its ``next_run_at`` then becomes
    ``new_next_run_at[i]``. ``task_names[i]`` and the stored JSON texts ``args[i]``,
    ``kwargs[i]`` and ``metadata[i]`` are those loaded with that revision: the fire sends
    them. (Columns rather than an object per claim: PostgreSQL takes them as they are, and a
    batch being claimed holds no object per fire for the cyclic garbage collector to scan.)
    """

    job_ids: list[str] = dataclasses.field(default_factory=list)
    expected_next_run_at: list[datetime] = dataclasses.field(default_factory=list)
    expected_revisions: list[int] = dataclasses.field(default_factory=list)
    scheduled_for: list[datetime] = dataclasses.field(default_factory=list)
    new_next_run_at: list[datetime | None] = dataclasses.field(default_factory=list)
    task_ids: list[str] = dataclasses.field(default_factory=list)
    task_names: list[str] = dataclasses.field(default_factory=list)
    args: list[str] = dataclasses.field(default_factory=list)
    kwargs: list[str] = dataclasses.field(default_factory=list)
    metadata: list[str] = dataclasses.field(default_factory=list)

    def add(
        self,
        job_id: str,
        expected_next_run_at: datetime,
        expected_revision: int,
        scheduled_for: datetime,
        new_next_run_at: datetime | None,
        task_id: str,
        task_name: str,
        args: str,
        kwargs: str,
        metadata: str,
    ) -> None:
        """Add the claim of one fire."""
        self.job_ids.append(job_id)
        self.expected_next_run_at.append(expected_next_run_at)
        self.expected_revisions.append(expected_revision)
        self.scheduled_for.append(scheduled_for)
        self.new_next_run_at.append(new_next_run_at)
        self.task_ids.append(task_id)
        self.task_names.append(task_name)
        self.args.append(args)
        self.kwargs.append(kwargs)
        self.metadata.append(metadata)

    def __len__(self) -> int:
        return len(self.job_ids)

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """Each claim as the arguments :meth:`add` took for it."""
        return zip(*_columns(self), strict=True)


def _columns(batch: Claims | ClaimedFires) -> tuple[list[Any], ...]:
    """The columns of a batch, in the order of its fields (those of a row)."""
    return tuple(getattr(batch, field.name) for field in dataclasses.fields(batch))


class Fire(NamedTuple):
    """A claimed fire, ready to be sent to the broker.

    ``args``, ``kwargs`` and ``metadata`` are the job's stored JSON texts, decoded only when
    the fire is sent: a fire's decoded payload lives for one ``kiq``, not for the whole
    claim-send-record pipeline (long-lived containers cost the cyclic garbage collector).
    """

    run_id: int
    job_id: str
    scheduled_for: datetime
    task_id: str
    task_name: str
    args: str
    kwargs: str
    metadata: str


@dataclasses.dataclass(slots=True)
class ClaimedFires(Sequence[Fire]):
    """The fires of one claimed batch, kept column by column (``run_ids[i]`` is the run of
    the fire of ``job_ids[i]``...); each :class:`Fire` is made when it is read, and is gone
    once its ``kiq`` is.

    Its fields are :class:`Fire`'s, in the same order, a list each of strings, numbers and
    times. A batch lives from its claim until its outcomes are recorded, a second or more
    for thousands of fires: long enough for a tuple per fire (a named tuple is never
    untracked) to reach the garbage collector's oldest generation, which the collector then
    scans whole, every object of the process, each time it grows by a quarter.
    """

    run_ids: list[int] = dataclasses.field(default_factory=list)
    job_ids: list[str] = dataclasses.field(default_factory=list)
    scheduled_for: list[datetime] = dataclasses.field(default_factory=list)
    task_ids: list[str] = dataclasses.field(default_factory=list)
    task_names: list[str] = dataclasses.field(default_factory=list)
    args: list[str] = dataclasses.field(default_factory=list)
    kwargs: list[str] = dataclasses.field(default_factory=list)
    metadata: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, claims: Claims, run_ids: dict[str, int]) -> ClaimedFires:
        """The fires of ``claims`` whose job has a run in ``run_ids`` (by job id), in order."""
        if len(run_ids) == len(claims):  # every claim: its columns as they are
            picked = claims
        else:
            picked = Claims()
            add = picked.add
            for claim in claims.rows():
                if claim[0] in run_ids:
                    add(*claim)
        return cls(
            [run_ids[job_id] for job_id in picked.job_ids],
            picked.job_ids,
            picked.scheduled_for,
            picked.task_ids,
            picked.task_names,
            picked.args,
            picked.kwargs,
            picked.metadata,
        )

    def __len__(self) -> int:
        return len(self.run_ids)

    @overload
    def __getitem__(self, index: int) -> Fire: ...

    @overload
    def __getitem__(self, index: slice) -> list[Fire]: ...

    def __getitem__(self, index: int | slice) -> Fire | list[Fire]:
        if isinstance(index, slice):
            return [self[at] for at in range(*index.indices(len(self)))]
        return Fire(*(column[index] for column in _columns(self)))

    def __iter__(self) -> Iterator[Fire]:
        return itertools.starmap(Fire, zip(*_columns(self), strict=True))


class SendOutcome(NamedTuple):
    """What happened to one fire of a batch: sent (:data:`SENT`), failed (``error``), or
    never started (:data:`RELEASED`). Outcomes come in a list beside the batch's fires; the
    common ones are shared constants (no object per fire)."""

    error: str | None = None
    released: bool = False
    final: bool = False
    """With ``error``: retrying cannot help (e.g. the task does not exist)."""


SENT = SendOutcome()
RELEASED = SendOutcome(released=True)


def _insert_for(dialect_name: str) -> Any:
    if dialect_name == "postgresql":
        return postgresql.insert
    if dialect_name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"taskiq-beat supports SQLite and PostgreSQL, not {dialect_name!r}")


_T = TypeVar("_T")
_P = ParamSpec("_P")


def _time_limited(
    method: Callable[Concatenate[SchedulerStore, _P], Awaitable[_T]],
) -> Callable[Concatenate[SchedulerStore, _P], Awaitable[_T]]:
    """Bound an engine operation by the store's timeout (see ``SchedulerStore._bounded``)."""

    @functools.wraps(method)
    async def bounded(store: SchedulerStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await store._bounded(method(store, *args, **kwargs))

    return bounded


class SchedulerStore:
    """The scheduler's database operations. See the module docstring for the contract.

    ``timeout`` bounds each engine operation (seconds; ``None``: unbounded).
    """

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], *, timeout: float | None = None
    ) -> None:
        self._session_factory = session_factory
        self._timeout = timeout
        self._abandoned: set[asyncio.Future[Any]] = set()
        bind = session_factory.kw.get("bind")
        # The engine's operations use the factory's engine directly where it has one: a
        # Core connection costs a fraction of an ORM session per transaction.
        self._engine = bind if isinstance(bind, AsyncEngine) else None
        serial = self._engine is not None and self._engine.dialect.name == "sqlite"
        self._turns: asyncio.Lock | None = asyncio.Lock() if serial else None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Executor]:
        """A connection (or session) in a transaction, committed at the end of the block.

        On SQLite the engine's transactions in this process take turns: SQLite lets one
        writer in at a time, and a second one would wait in SQLite's busy handler, which
        sleeps 1, 2, 5, 10... ms between tries instead of starting when the first commits.
        """
        async with contextlib.AsyncExitStack() as stack:
            if self._turns is not None:
                await stack.enter_async_context(self._turns)
            if self._engine is not None:
                yield await stack.enter_async_context(self._engine.begin())
            else:
                session = await stack.enter_async_context(self._session_factory())
                await stack.enter_async_context(session.begin())
                yield session

    @contextlib.asynccontextmanager
    async def _one_statement(self) -> AsyncIterator[_Executor]:
        """Where the claim is one statement (PostgreSQL, with an engine): a connection in
        autocommit mode, so the statement is its own transaction, in one round trip instead
        of four (``BEGIN``, two statements, ``COMMIT``). Otherwise :meth:`_transaction`."""
        if self._engine is None or not _BATCH_SQL[self._engine.dialect.name].claims_at_once:
            async with self._transaction() as executor:
                yield executor
            return
        async with self._engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    async def _bounded(self, operation: Awaitable[_T]) -> _T:
        """Await ``operation``, giving up after ``timeout`` seconds with ``TimeoutError``.

        A connection that hangs (a network partition drops packets without a reset) would
        otherwise stop the scheduler silently until TCP gives up, which takes minutes. The
        operation runs in a task of its own: on timeout it is cancelled and left to unwind
        on its own (its cleanup may wait on the same dead connection), and the caller moves
        on. Every engine operation is safe to abandon: a claim that still commits later is
        covered by its lease, a record by being written again.
        """
        if self._timeout is None:
            return await operation
        task = asyncio.ensure_future(operation)
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout)
        except BaseException:
            self._abandon(task)
            raise
        if done:
            return task.result()
        self._abandon(task)
        raise TimeoutError(f"the database did not answer within {self._timeout:g} s")

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        task.cancel()
        self._abandoned.add(task)  # keep a reference until it has unwound
        task.add_done_callback(_forget(self._abandoned))

    @staticmethod
    def unavailable(exc: BaseException) -> str | None:
        """Describe ``exc`` in one line if it says the database cannot be used right now and
        trying again later may succeed: a refused, lost or timed-out connection, an exhausted
        pool, SQLite's "database is locked". ``None`` for anything else (a bug, bad data).
        """
        if isinstance(exc, sa.exc.DBAPIError):
            if exc.connection_invalidated or isinstance(
                exc, (sa.exc.OperationalError, sa.exc.InterfaceError)
            ):
                return f"{type(exc.orig).__name__}: {exc.orig}".strip()
            return None
        if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, sa.exc.TimeoutError)):
            return f"{type(exc).__name__}: {exc}".strip()
        return None

    # ------------------------------------------------------- management (caller's session)

    @staticmethod
    async def add_job(session: AsyncSession, job: SchedulerJob) -> SchedulerJob:
        """Insert ``job`` and commit.

        :raises IntegrityError: if a job with the same id exists.
        """
        _make_room(session, job)
        session.add(job)
        try:
            await _announce_change(session)
            await _commit(session)
        except IntegrityError:
            await session.rollback()
            raise
        return job

    @staticmethod
    async def get_job(
        session: AsyncSession, job_id: str, *, for_update: bool = False
    ) -> SchedulerJob | None:
        """Return the job ``job_id`` (fresh from the database) or ``None``."""
        statement = sa.select(SchedulerJob).where(SchedulerJob.id == job_id)
        if for_update:
            statement = statement.with_for_update()
        statement = statement.execution_options(populate_existing=True)
        result = await session.execute(statement)
        return result.scalar_one_or_none()

    @staticmethod
    async def find_job(session: AsyncSession, job_id: str) -> SchedulerJob | None:
        """Return the job ``job_id`` or ``None``, ending the read transaction."""
        job = await SchedulerStore.get_job(session, job_id)
        await _commit(session)
        return job

    @staticmethod
    async def save(session: AsyncSession, job: SchedulerJob) -> SchedulerJob:
        """Commit the changes made to ``job`` (loaded in ``session``)."""
        await _announce_change(session)
        await _commit(session)
        return job

    @staticmethod
    async def rollback(session: AsyncSession) -> None:
        await session.rollback()

    @staticmethod
    async def delete_job(session: AsyncSession, job_id: str) -> bool:
        """Delete the job and its runs; return whether it existed."""
        await session.execute(sa.delete(SchedulerRun).where(SchedulerRun.job_id == job_id))
        result = await session.execute(sa.delete(SchedulerJob).where(SchedulerJob.id == job_id))
        await _announce_change(session)
        await _commit(session)
        return bool(getattr(result, "rowcount", 0))

    @staticmethod
    async def list_jobs(
        session: AsyncSession,
        *,
        is_enabled: bool | None = None,
        task_name: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[SchedulerJob]:
        """Jobs ordered by id, optionally filtered."""
        statement = sa.select(SchedulerJob).order_by(SchedulerJob.id)
        if is_enabled is not None:
            statement = statement.where(SchedulerJob.is_enabled.is_(is_enabled))
        if task_name is not None:
            statement = statement.where(SchedulerJob.task_name == task_name)
        statement = statement.offset(offset)
        if limit is not None:
            statement = statement.limit(limit)
        result = await session.execute(statement.execution_options(populate_existing=True))
        jobs = list(result.scalars())
        await _commit(session)
        return jobs

    @staticmethod
    async def list_runs(
        session: AsyncSession,
        *,
        job_id: str | None = None,
        status: RunStatus | None = None,
        limit: int | None = 100,
    ) -> list[SchedulerRun]:
        """Runs, the most recently scheduled first."""
        statement = sa.select(SchedulerRun).order_by(
            SchedulerRun.scheduled_for.desc(), SchedulerRun.id.desc()
        )
        if job_id is not None:
            statement = statement.where(SchedulerRun.job_id == job_id)
        if status is not None:
            statement = statement.where(SchedulerRun.status == status)
        if limit is not None:
            statement = statement.limit(limit)
        result = await session.execute(statement.execution_options(populate_existing=True))
        runs = list(result.scalars())
        await _commit(session)
        return runs

    @staticmethod
    async def load_schedule_state(
        session: AsyncSession, job_ids: Sequence[str]
    ) -> dict[str, ScheduleState]:
        """The schedule-relevant state of the existing jobs among ``job_ids``."""
        columns = [
            _job.c.trigger,
            _job.c.task_name,
            _job.c.kind,
            _job.c.is_enabled,
            _job.c.next_run_at,
            _job.c.last_run_at,
            _job.c.last_error,
            _job.c.revision,
            _job.c.created_at,
        ]
        found: dict[str, ScheduleState] = {}
        if _dialect_name(session) == "postgresql":
            # A join on an array: primary-key lookups, whatever the planner knows of the table
            # (an IN list of parameters on a freshly filled table gets a sequential scan that
            # compares every row with every parameter).
            ids = sa.func.unnest(sa.bindparam("ids", type_=postgresql.ARRAY(sa.String())))
            wanted = ids.table_valued("id").render_derived(name="wanted")
            statement = sa.select(_job.c.id, *columns).join(wanted, wanted.c.id == _job.c.id)
            chunks = [{"ids": list(job_ids)}]
        else:
            statement = sa.select(_job.c.id, *columns).where(
                _job.c.id.in_(sa.bindparam("ids", expanding=True))
            )
            chunks = [
                {"ids": list(job_ids[start : start + _CHUNK])}
                for start in range(0, len(job_ids), _CHUNK)
            ]
        for params in chunks:
            for job_id, *values in await session.execute(statement, params):
                found[job_id] = ScheduleState(*values)
        return found

    @staticmethod
    async def write_jobs(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or overwrite whole jobs (by id; values by attribute name) and commit."""
        rows = [_column_names(row) for row in rows]
        insert = _insert_for(_dialect_name(session))(_job)
        statement = insert.on_conflict_do_update(
            index_elements=[_job.c.id],
            set_={c.name: insert.excluded[c.name] for c in _job.c if c.name != "id"},
        )
        for start in range(0, len(rows), _CHUNK):
            await session.execute(statement, list(rows[start : start + _CHUNK]))
        await _announce_change(session)
        await _commit(session)

    @staticmethod
    async def get_run(session: AsyncSession, run_id: int) -> SchedulerRun | None:
        """Return the run ``run_id`` or ``None``, ending the read transaction."""
        result = await session.execute(
            sa.select(SchedulerRun)
            .where(SchedulerRun.id == run_id)
            .execution_options(populate_existing=True)
        )
        run = result.scalar_one_or_none()
        await _commit(session)
        return run

    @staticmethod
    async def add_claimed_run(
        session: AsyncSession,
        *,
        job: SchedulerJob | None,
        job_id: str,
        scheduled_for: datetime,
        task_id: str,
        owner: str,
        now: datetime,
        lease_until: datetime,
    ) -> int | None:
        """Insert ``job`` (if given) and a claimed run for an immediate send; commit.

        Returns the run id, or ``None`` when that fire exists already.
        """
        if job is not None:
            _make_room(session, job)
            session.add(job)
            await session.flush()
        insert = _insert_for(_dialect_name(session))
        statement = (
            insert(_run)
            .values(
                job_id=job_id,
                scheduled_for=scheduled_for,
                status=RunStatus.CLAIMED,
                task_id=task_id,
                attempt=1,
                claimed_by=owner,
                next_attempt_at=lease_until,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
            .returning(_run.c.id)
        )
        run_id = (await session.execute(statement)).scalar_one_or_none()
        await session.execute(
            sa.update(_job).where(_job.c.id == job_id).values(last_run_at=scheduled_for)
        )
        await _commit(session)
        return run_id

    # ------------------------------------------------------------------ engine (own sessions)

    @_time_limited
    async def listen(self, on_change: Callable[[], None]) -> ChangeListener | None:
        """Start hearing other processes' job changes; ``None`` where the database cannot
        announce them (SQLite: changes are seen at the next sync)."""
        if self._engine is None or self._engine.dialect.name != "postgresql":
            return None
        connection = await self._engine.connect()
        listener = ChangeListener(connection, on_change)
        try:
            await listener.start()
        except BaseException:
            await listener.close()
            raise
        return listener

    @_time_limited
    async def load_due(self, horizon: datetime, *, limit: int | None = None) -> list[JobRecord]:
        """Enabled jobs whose ``next_run_at`` is at or before ``horizon`` (uses the due index).

        With ``limit``, only the ``limit`` due first (read in the index's order, so no more
        rows than that are read whatever the number due)."""
        statement = _select_records().where(
            _job.c.is_enabled.is_(True),
            _job.c.next_run_at.is_not(None),
            _job.c.next_run_at <= horizon,
        )
        if limit is not None:
            statement = statement.order_by(_job.c.next_run_at).limit(limit)
        return await self._fetch(statement)

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

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[_Executor]:
        """Where the engine's reads run: a Core connection where the factory has an engine
        (a fraction of an ORM session's cost), else a session."""
        if self._engine is not None:
            async with self._engine.connect() as connection:
                yield connection
            return
        async with self._session_factory() as session:
            yield session

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
        that fire was claimed before and is not sent again.
        """
        if not claims:
            return ClaimedFires(), set()
        async with self._one_statement() as executor:
            won, inserted = await _batch_sql(executor).claim(
                executor, claims, owner=owner, lease_until=lease_until, now=now
            )
        lost = {job_id for job_id in claims.job_ids if job_id not in won}
        return ClaimedFires.of(claims, inserted), lost

    @_time_limited
    async def claim_retries(
        self, *, now: datetime, lease_until: datetime, owner: str, limit: int
    ) -> list[Fire]:
        """Claim fires that still have to be sent and whose lease or retry time has passed."""
        async with self._transaction() as session:
            due = (
                sa.select(_run.c.id)
                .where(_run.c.next_attempt_at.is_not(None), _run.c.next_attempt_at <= now)
                .order_by(_run.c.next_attempt_at)
                .limit(limit)
            )
            if _dialect_name(session) == "postgresql":
                due = due.with_for_update(skip_locked=True)
            ids = list((await session.execute(due)).scalars())
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
                .returning(_run.c.id, _run.c.job_id, _run.c.scheduled_for, _run.c.task_id)
            )
            runs = list(await session.execute(claimed))
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
        sent: list[int] = []
        released: list[int] = []
        failed: list[tuple[Fire, SendOutcome]] = []
        for fire, outcome in zip(fires, outcomes, strict=True):
            if outcome.released:
                released.append(fire.run_id)
            elif outcome.error is not None:
                failed.append((fire, outcome))
            else:
                sent.append(fire.run_id)
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
                    .where(_run.c.id == sa.bindparam("run"))
                    .values(
                        status=RunStatus.FAILED,
                        error=sa.bindparam("message"),
                        next_attempt_at=sa.bindparam("retry"),
                        updated_at=now,
                    ),
                    [
                        {
                            "run": f.run_id,
                            "message": o.error,
                            "retry": None if o.final else retry_at,
                        }
                        for f, o in failed
                    ],
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


async def _announce_change(session: AsyncSession) -> None:
    """Wake listening schedulers when this transaction commits (PostgreSQL ``NOTIFY``)."""
    if _dialect_name(session) == "postgresql":
        await session.execute(sa.select(sa.func.pg_notify(CHANGES_CHANNEL, "")))


class ChangeListener:
    """One connection that hears the changes other processes commit (PostgreSQL ``LISTEN``).

    ``on_change`` is called (on the event loop) once per committed change, and once more when
    the connection is lost: ``alive`` is then false and a new listener must be opened.
    """

    def __init__(self, connection: AsyncConnection, on_change: Callable[[], None]) -> None:
        self._connection = connection
        self._on_change = on_change
        self.alive = True

    async def start(self) -> None:
        raw = await self._connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None, "an open connection has a driver connection"
        driver.add_termination_listener(self._lost)
        await driver.add_listener(CHANGES_CHANNEL, self._heard)

    def _heard(self, *_: Any) -> None:
        self._on_change()

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


# ----------------------------------------------------------------------------------------------
# Batch statements. Their text does not depend on the batch size, so each is compiled (and on
# PostgreSQL prepared) once: the rows travel as array parameters (PostgreSQL, ``unnest``) or
# as one JSON parameter (SQLite, ``json_each``).
# ----------------------------------------------------------------------------------------------

_JOB, _RUN = _job.name, _run.name
_RUN_INSERT = (
    f"INSERT INTO {_RUN} (job_id, scheduled_for, status, task_id, attempt, claimed_by,"
    " next_attempt_at, created_at, updated_at)"
)
_STATUS, _DISPATCHED = RunStatus.CLAIMED.value, RunStatus.DISPATCHED.value


def _times(*names: str) -> list[sa.BindParameter[Any]]:
    return [sa.bindparam(name, type_=UTCDateTime()) for name in names]


def _run_updates(where_ids: str) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
    """Close, release and delete run rows chosen by ``where_ids`` (the dialect's id list)."""
    close = sa.text(
        f"UPDATE {_RUN} SET status = :status, next_attempt_at = NULL, dispatched_at = :now,"
        f" updated_at = :now, error = NULL{where_ids}"
    ).bindparams(*_times("now"))
    release = sa.text(
        f"UPDATE {_RUN} SET next_attempt_at = :now, claimed_by = NULL, updated_at = :now{where_ids}"
    ).bindparams(*_times("now"))
    return close, release, sa.text(f"DELETE FROM {_RUN}{where_ids}")


class _BatchSql:
    """The engine's hot statements for one dialect."""

    close: sa.TextClause
    release: sa.TextClause
    delete: sa.TextClause
    claims_at_once = False
    """Whether :meth:`claim` is one statement (and needs no transaction around it)."""

    async def claim(
        self,
        session: _Executor,
        claims: Claims,
        *,
        owner: str,
        lease_until: datetime,
        now: datetime,
    ) -> tuple[set[str], dict[str, int]]:
        """Advance the jobs by compare-and-set and insert the runs of those advanced (unless
        they exist). Returns the ids of the jobs advanced, and the run id of each inserted run
        by job id. Run in one transaction."""
        raise NotImplementedError

    def id_params(self, ids: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    async def execute(
        self, session: _Executor, statement: sa.TextClause, params: dict[str, Any]
    ) -> None:
        """Run one of these statements (no rows) in ``session``'s transaction."""
        await session.execute(statement, params)

    async def close_runs(self, session: _Executor, ids: Sequence[int], *, now: datetime) -> None:
        params = {"now": now, "status": _DISPATCHED, **self.id_params(ids)}
        await self.execute(session, self.close, params)

    async def release_runs(self, session: _Executor, ids: Sequence[int], *, now: datetime) -> None:
        await self.execute(session, self.release, {"now": now, **self.id_params(ids)})

    async def delete_runs(self, session: _Executor, ids: Sequence[int]) -> None:
        await self.execute(session, self.delete, self.id_params(ids))


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


class _EachTimeOnce(dict[datetime, _T]):
    """``convert`` of each distinct time once (a batch's fires share a few times):
    ``times[value]``, a plain dictionary lookup once a time is known."""

    def __init__(self, convert: Callable[[datetime], _T]) -> None:
        super().__init__()
        self._convert = convert

    def __missing__(self, value: datetime) -> _T:
        converted = self[value] = self._convert(value)
        return converted


class _PostgresBatchSql(_BatchSql):
    _ids = " WHERE id = ANY(CAST(:ids AS BIGINT[]))"
    close, release, delete = _run_updates(_ids)
    # advance + insert in one statement: data-modifying CTEs run in one snapshot, and the
    # statement is atomic on its own. The claims travel as columns: the job and task ids as
    # JSON texts, the times as whole microseconds (asyncpg encodes a timestamptz array at
    # ~1.5 us an element, a bigint one at ~0.4, a text at once; 5.4 -> 1.7 us of client
    # CPU per claim, the server's work unchanged), a fire's time left out (an empty array)
    # when each is the job's expected one. It answers in one row of JSON texts: the jobs
    # advanced, and the job and id of each run inserted (a fire that had its run already
    # has none); no row per fire. (No join of the two CTEs: the planner, which cannot
    # estimate them, nests loops over them.) The jobs are also looked up by id: joined to
    # the claims alone, the planner reads every job (a sequential scan and a hash of the
    # whole table, per batch: 75 of 170 ms for 2,048 claims among 100k jobs); with the id
    # list it uses the primary key once the table has statistics (10 ms).
    claim_all = sa.text(
        "WITH claim AS (SELECT c.job_id, c.revision, c.task_id,"
        f" {_from_micros('c.expected')} AS expected, {_from_micros('c.new_next')} AS new_next,"
        f" {_from_micros('COALESCE(c.scheduled_for, c.expected)')} AS scheduled_for"
        " FROM ROWS FROM (json_array_elements_text(CAST(:job_ids AS JSON)),"
        " unnest(CAST(:expected AS BIGINT[])), unnest(CAST(:revisions AS INTEGER[])),"
        " unnest(CAST(:new_next AS BIGINT[])), unnest(CAST(:scheduled_for AS BIGINT[])),"
        " json_array_elements_text(CAST(:task_ids AS JSON)))"
        " AS c(job_id, expected, revision, new_next, scheduled_for, task_id)),"
        f" won AS (UPDATE {_JOB} AS job"
        " SET next_run_at = claim.new_next, last_run_at = claim.scheduled_for"
        " FROM claim WHERE job.id = claim.job_id AND job.next_run_at = claim.expected"
        " AND job.revision = claim.revision AND job.is_enabled"
        " AND job.id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:job_ids AS JSON))))"
        " RETURNING job.id, claim.scheduled_for, claim.task_id),"
        f" run AS ({_RUN_INSERT} SELECT won.id, won.scheduled_for, :status, won.task_id, 1,"
        " :owner, :lease_until, :now, :now FROM won"
        " ON CONFLICT DO NOTHING RETURNING id, job_id)"
        " SELECT CAST((SELECT json_agg(won.id) FROM won) AS TEXT),"
        " CAST(runs.job_ids AS TEXT), CAST(runs.run_ids AS TEXT)"
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
    ) -> tuple[set[str], dict[str, int]]:
        params = self.claim_params(claims)
        params.update(
            owner=owner,
            lease_until=lease_until,
            now=now,
            status=_STATUS,
        )
        won, run_jobs, run_ids = (await session.execute(self.claim_all, params)).one()
        advanced: set[str] = set() if won is None else set(json.loads(won))
        if run_jobs is None:  # no run inserted (json_agg of no rows is NULL)
            return advanced, {}
        return advanced, dict(zip(json.loads(run_jobs), json.loads(run_ids), strict=True))

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
    ) -> tuple[set[str], dict[str, int]]:
        params = self.claim_params(claims)
        await self.execute(
            session,
            self.insert,
            {**params, "owner": owner, "lease_until": lease_until, "now": now, "status": _STATUS},
        )
        [(won_text, run_jobs, run_ids)] = await self._rows(session, self.outcome, params)
        won: set[str] = set(json.loads(won_text))
        if not won:
            return won, {}
        await self.execute(session, self.advance, params)
        return won, dict(zip(json.loads(run_jobs), json.loads(run_ids), strict=True))

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


_BATCH_SQL: dict[str, _BatchSql] = {
    "postgresql": _PostgresBatchSql(),
    "sqlite": _SqliteBatchSql(),
}


def _batch_sql(session: _Executor) -> _BatchSql:
    name = _dialect_name(session)
    try:
        return _BATCH_SQL[name]
    except KeyError:
        raise NotImplementedError(
            f"taskiq-beat supports SQLite and PostgreSQL, not {name!r}"
        ) from None
