"""``SchedulerApp``: the facade that wires store, dispatcher and engine, and manages jobs."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from taskiq_beat.chain import register_chain_orchestrator
from taskiq_beat.chain_runner import ChainRunner
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import Declarations
from taskiq_beat.declaring import DeclaringJobs
from taskiq_beat.dispatch import Dispatcher
from taskiq_beat.engine import SchedulerEngine
from taskiq_beat.events import EventHooks, EventKind, EventListener
from taskiq_beat.exceptions import InvalidJobError
from taskiq_beat.health import SchedulerHealthSnapshot, read_health
from taskiq_beat.housekeeping import Housekeeper
from taskiq_beat.management import JobManagement
from taskiq_beat.store import SchedulerStore
from taskiq_beat.worker import RunLifecycleMiddleware

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from taskiq import AsyncBroker

__all__ = ["SchedulerApp"]

logger = logging.getLogger(__name__)


class SchedulerApp(DeclaringJobs, JobManagement):
    """A database-backed scheduler for one Taskiq broker.

    ``session_factory`` makes the sessions the engine uses; management calls use the session
    you pass them, and commit it. Rows returned stay readable after that commit (attributes
    are not expired, whatever the session's ``expire_on_commit``).
    """

    def __init__(
        self,
        *,
        broker: AsyncBroker,
        session_factory: async_sessionmaker[AsyncSession],
        config: SchedulerConfig | None = None,
        clock: Clock | None = None,
        schedule_version: int = 0,
    ) -> None:
        if (
            isinstance(schedule_version, bool)
            or not isinstance(schedule_version, int)
            or schedule_version < 0
        ):
            raise InvalidJobError("schedule_version", schedule_version, "expected an integer >= 0")
        self.schedule_version = schedule_version
        """The version of the schedules declared in code on this app (see
        :mod:`taskiq_beat.declared`): raise it when they change; an apply never overwrites
        declarations of a higher version."""
        self.declarations = Declarations()
        self.broker = broker
        self.session_factory = session_factory
        self.config = config or SchedulerConfig()
        self._clock: Clock = clock or SystemClock()
        self.events = EventHooks()
        self._store = SchedulerStore(session_factory, timeout=self.config.database_timeout_seconds)
        self._engine = SchedulerEngine(
            store=self._store,
            dispatcher=Dispatcher(
                broker,
                concurrency=self.config.dispatch_concurrency,
                timeout=self.config.dispatch_timeout_seconds,
            ),
            config=self.config,
            clock=self._clock,
            events=self.events,
        )
        self._now_dispatcher = Dispatcher(
            broker, concurrency=1, timeout=self.config.dispatch_timeout_seconds
        )
        register_chain_orchestrator(broker)
        _enforce_sqlite_foreign_keys(session_factory)
        self.lifecycle = self._report_lifecycle(broker)
        self._housekeeper = Housekeeper(
            store=self._store,
            config=self.config,
            clock=self._clock,
            events=self.events,
            chains=ChainRunner(
                store=self._store, broker=broker, clock=self._clock, config=self.config
            ),
        )

    def _report_lifecycle(self, broker: AsyncBroker) -> RunLifecycleMiddleware | None:
        """The broker's lifecycle middleware (see :mod:`taskiq_beat.worker`): added here, so
        that a worker that imports this app reports outcomes; one per broker."""
        for middleware in broker.middlewares:
            if isinstance(middleware, RunLifecycleMiddleware):
                return middleware
        if not (self.config.record_runs and self.config.record_lifecycle):
            return None
        middleware = RunLifecycleMiddleware(
            store=self._store, config=self.config, clock=self._clock, events=self.events
        )
        broker.add_middlewares(middleware)
        return middleware

    def on_event(self, kind: EventKind | str, callback: EventListener) -> None:
        """Call ``callback(event)`` (a function or a coroutine function) on each event of
        ``kind`` (see :mod:`taskiq_beat.events`): fires sent and missed and jobs disabled in
        the scheduler's process, runs succeeded and failed where they ran.

        :raises InvalidJobError: for an unknown kind or a callback that is not callable.
        """
        self.events.register(kind, callback)

    async def get_health_snapshot(
        self, *, max_lag_seconds: float | None = None, window_seconds: float = 3600.0
    ) -> SchedulerHealthSnapshot:
        """This process's scheduler loop and the database's view of the schedule.

        ``max_lag_seconds`` (default: ``misfire_grace_seconds``, at least 5 s) is how late a
        job may be before the schedule counts as behind; ``window_seconds`` is the span of
        recent runs the success rate covers.

        :raises sqlalchemy.exc.SQLAlchemyError: or ``TimeoutError`` when the database does not
            answer (the scheduler is then unhealthy too).
        """
        return await read_health(
            self._engine,
            self._store,
            self.config,
            self._clock.now(),
            max_lag_seconds=max_lag_seconds,
            window_seconds=window_seconds,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def housekeeper(self) -> Housekeeper:
        """The housekeeping beside the loop (for tests and tools: ``watch_chains()``...)."""
        return self._housekeeper

    @property
    def engine(self) -> SchedulerEngine:
        """The scheduling loop (for tests and tools: ``await app.engine.tick()``)."""
        return self._engine

    @property
    def is_running(self) -> bool:
        return self._engine.running

    async def start(self) -> None:
        """Apply the schedules declared in code (if any were), load the due jobs and start
        the scheduling loop in the background."""
        if self.declarations.used:
            await self.apply_declarations()
        await self._engine.start()
        self._housekeeper.start()
        logger.info("scheduler started (instance %s)", self._engine.owner)

    async def stop(self) -> None:
        """Stop the loop; fires claimed but not sent are released for the next scheduler."""
        await self._engine.stop()
        await self._housekeeper.stop()
        logger.info("scheduler stopped (instance %s)", self._engine.owner)

    async def __aenter__(self) -> SchedulerApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


_FOREIGN_KEYS_ON = "taskiq_beat.sqlite_foreign_keys_on"


def _enforce_sqlite_foreign_keys(session_factory: async_sessionmaker[AsyncSession]) -> None:
    """Turn on SQLite foreign keys on every connection the factory's engine hands out.

    On checkout rather than on connect, so that connections pooled before the app was built
    get it too (SQLite ignores the pragma inside a transaction; none is open at checkout);
    once per connection: each statement is a round trip to aiosqlite's thread.
    """
    bind = session_factory.kw.get("bind")
    sync_engine = getattr(bind, "sync_engine", None)
    if sync_engine is None or sync_engine.dialect.name != "sqlite":
        return
    if not event.contains(sync_engine, "checkout", _sqlite_foreign_keys_on):
        event.listen(sync_engine, "checkout", _sqlite_foreign_keys_on)


def _sqlite_foreign_keys_on(
    dbapi_connection: Any, connection_record: Any, connection_proxy: Any
) -> None:
    # ``info`` lives as long as the DBAPI connection (a reconnect starts it empty).
    if connection_record.info.get(_FOREIGN_KEYS_ON):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    connection_record.info[_FOREIGN_KEYS_ON] = True
