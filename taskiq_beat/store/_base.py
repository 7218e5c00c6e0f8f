"""The store's plumbing: transactions, time limits, and which errors mean an outage."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    ParamSpec,
    TypeVar,
)

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from taskiq_beat.store._common import _Executor, _forget
from taskiq_beat.store.dialects import claims_at_once

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

__all__ = ["StatementTimeout", "StoreCore"]

# PostgreSQL's codes of a statement that waited on others or was cut short, while the
# server itself answered: lock_not_available (lock_timeout, NOWAIT), query_canceled
# (statement_timeout), deadlock_detected, serialization_failure.
_CONTENTION_SQLSTATES = frozenset({"55P03", "57014", "40P01", "40001"})
# MySQL's and MariaDB's error numbers of the same kind: lock wait timeout, deadlock,
# NOWAIT lock not available, query interrupted (max_statement_time / KILL QUERY).
_CONTENTION_MYSQL_ERRORS = frozenset({1205, 1213, 3572, 1317, 1969, 3024})
# Of those, the ones that ended the transaction at once, which may simply run again:
# deadlock_detected, serialization_failure; MySQL's deadlock.
_RERUN_SQLSTATES = frozenset({"40P01", "40001"})
_RERUN_MYSQL_ERRORS = frozenset({1213})


def _server_error_in(
    exc: BaseException, sqlstates: frozenset[str], mysql_errors: frozenset[int]
) -> bool:
    """Whether ``exc`` is a server's answer (the connection still good) with one of these
    PostgreSQL SQLSTATEs or MySQL error numbers (a number, no SQLSTATE, on MySQL drivers'
    exceptions)."""
    if not isinstance(exc, sa.exc.DBAPIError) or exc.connection_invalidated:
        return False
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    number = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    return code in sqlstates or (type(number) is int and number in mysql_errors)


class StatementTimeout(TimeoutError):
    """An engine operation that did not finish within the store's timeout: a statement that
    runs long (or waits on a lock), or a server that does not answer; which of the two is
    not known here."""


_T = TypeVar("_T")
_P = ParamSpec("_P")
_S = TypeVar("_S", bound="StoreCore")


def _time_limited(
    method: Callable[Concatenate[_S, _P], Awaitable[_T]],
) -> Callable[Concatenate[_S, _P], Awaitable[_T]]:
    """Bound an engine operation by the store's timeout (see ``StoreCore._bounded``)."""

    @functools.wraps(method)
    async def bounded(store: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await store._bounded(method(store, *args, **kwargs))

    return bounded


class StoreCore:
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
        if self._engine is None or not claims_at_once(self._engine.dialect.name):
            async with self._transaction() as executor:
                yield executor
            return
        async with self._engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")

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
        raise StatementTimeout(f"no answer from the database within {self._timeout:g} s")

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        task.cancel()
        self._abandoned.add(task)  # keep a reference until it has unwound
        task.add_done_callback(_forget(self._abandoned))

    @staticmethod
    def contended(exc: BaseException) -> str | None:
        """Describe ``exc`` in one line if a statement waited too long or lost to another
        transaction while the server answered (PostgreSQL's lock, cancel, deadlock and
        serialization errors, MySQL's lock wait, deadlock and interrupt ones), or took
        longer than the store's timeout (:class:`StatementTimeout`): trying again may
        succeed, and it is not evidence that the database is down. ``None`` for anything else."""
        if isinstance(exc, StatementTimeout):
            return str(exc)
        if _server_error_in(exc, _CONTENTION_SQLSTATES, _CONTENTION_MYSQL_ERRORS):
            assert isinstance(exc, sa.exc.DBAPIError)
            return f"{type(exc.orig).__name__}: {exc.orig}".strip()
        return None

    @staticmethod
    def deadlocked(exc: BaseException) -> bool:
        """Whether ``exc`` is a deadlock or serialization failure: the server ended the
        transaction at once, and running it again is what it asks for."""
        return _server_error_in(exc, _RERUN_SQLSTATES, _RERUN_MYSQL_ERRORS)

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
