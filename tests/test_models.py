"""Storage rules: aware UTC datetimes on every backend, enforced foreign keys, constraints."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from taskiq_beat import (
    IntervalTrigger,
    PeriodicSchedule,
    RunStatus,
    SchedulerApp,
    SchedulerBase,
    SchedulerJob,
    SchedulerRun,
)
from taskiq_beat.models import Unreadable, UTCDateTime, decode_json, sqlite_datetime
from tests.utils import FakeClock, RecordingBroker

UTC = timezone.utc


async def test_datetimes_come_back_aware_utc(
    app: SchedulerApp, session: AsyncSession, clock: FakeClock
) -> None:
    job = await app.single(task="tests.record").schedule(
        session, trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=30))
    )
    await app.run_now(session, job.id)
    session.expunge_all()
    stored = (await session.execute(sa.select(SchedulerJob))).scalar_one()
    run = (await session.execute(sa.select(SchedulerRun))).scalar_one()
    for value in (
        stored.next_run_at,
        stored.created_at,
        stored.updated_at,
        stored.last_run_at,
        run.scheduled_for,
        run.created_at,
        run.dispatched_at,
    ):
        assert value is not None
        assert value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)
    assert stored.next_run_at == clock.now() + timedelta(seconds=30)


async def test_naive_datetime_cannot_be_written(app: SchedulerApp, session: AsyncSession) -> None:
    job = await app.single(task="tests.record").schedule(
        session, trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=30))
    )
    with pytest.raises(StatementError, match="naive"):
        await session.execute(
            sa.update(SchedulerJob)
            .where(SchedulerJob.id == job.id)
            .values(next_run_at=datetime(2026, 1, 1))
        )
    await session.rollback()


async def test_deleting_a_job_row_cascades_to_its_runs(
    app: SchedulerApp, session: AsyncSession
) -> None:
    job = await app.single(task="tests.record").schedule(session)
    # A plain DELETE, not the API: the database itself must remove the runs.
    await session.execute(sa.delete(SchedulerJob).where(SchedulerJob.id == job.id))
    await session.commit()
    count = await session.execute(sa.select(sa.func.count()).select_from(SchedulerRun))
    assert count.scalar_one() == 0


async def test_a_run_needs_an_existing_job(app: SchedulerApp, session: AsyncSession) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    session.add(
        SchedulerRun(
            job_id="ghost",
            scheduled_for=now,
            status=RunStatus.CLAIMED,
            task_id="t",
            attempt=1,
            created_at=now,
            updated_at=now,
        )
    )
    with pytest.raises(IntegrityError):
        await session.commit()
    await session.rollback()


async def test_sqlite_foreign_keys_are_turned_on_once_per_connection(tmp_path: Any) -> None:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'keys.sqlite3'}", pool_size=1, max_overflow=0
    )
    try:
        async with engine.connect() as connection:  # pooled before the app exists
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
        SchedulerApp(broker=RecordingBroker(), session_factory=async_sessionmaker(engine))
        statements: list[str] = []
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
            await driver.set_trace_callback(statements.append)
        for _ in range(3):
            async with engine.connect() as connection:
                assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        # each statement is a round trip to aiosqlite's thread: once per connection is enough
        assert "PRAGMA foreign_keys=ON" not in statements
        assert statements.count("PRAGMA foreign_keys") == 3
    finally:
        await engine.dispose()


async def test_one_run_per_job_and_scheduled_time(app: SchedulerApp, session: AsyncSession) -> None:
    job = await app.single(task="tests.record").schedule(session)
    [run] = await app.list_runs(session, job.id)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    session.add(
        SchedulerRun(
            job_id=job.id,
            scheduled_for=run.scheduled_for,
            status=RunStatus.CLAIMED,
            task_id="other",
            attempt=1,
            created_at=now,
            updated_at=now,
        )
    )
    with pytest.raises(IntegrityError):
        await session.commit()
    await session.rollback()


def test_metadata_holds_exactly_the_scheduler_tables_with_named_constraints() -> None:
    assert set(SchedulerBase.metadata.tables) == {
        "scheduler_chain",
        "scheduler_chain_step",
        "scheduler_instance",
        "scheduler_job",
        "scheduler_job_stats",
        "scheduler_run",
        "scheduler_worker",
    }
    run = SchedulerBase.metadata.tables["scheduler_run"]
    names = {c.name for c in run.constraints}
    assert "uq_scheduler_run_job_id_scheduled_for" in names
    assert "fk_scheduler_run_job_id_scheduler_job" in names
    job = SchedulerBase.metadata.tables["scheduler_job"]
    assert "ix_scheduler_job_due" in {index.name for index in job.indexes}
    step = SchedulerBase.metadata.tables["scheduler_chain_step"]
    names = {c.name for c in step.constraints}
    assert "uq_scheduler_chain_step_run_id_chain_attempt_step_attempt" in names
    assert "uq_scheduler_chain_step_task_id" in names


@pytest.mark.parametrize("backend", ["sqlite"])  # SQLite alone stores datetimes as text
async def test_sqlite_text_format_matches_what_sqlalchemy_stores(
    app: SchedulerApp, session: AsyncSession, backend: str
) -> None:
    """The batch statements compare stored SQLite text with ``sqlite_datetime`` text."""
    job = await app.single(task="tests.record").schedule(
        session, trigger=PeriodicSchedule(interval=IntervalTrigger(seconds=30))
    )
    raw = await session.execute(
        sa.text("SELECT next_run_at FROM scheduler_job WHERE id = :id"), {"id": job.id}
    )
    assert job.next_run_at is not None
    assert raw.scalar_one() == sqlite_datetime(job.next_run_at)


@settings(max_examples=300, deadline=None)
@given(
    value=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.timezones()
    )
)
def test_sqlite_text_is_sqlalchemy_s_text_of_the_utc_time(value: datetime) -> None:
    store_text = UTCDateTime().process_bind_param(value, sqlite.dialect())
    processor = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert processor is not None
    assert sqlite_datetime(value) == processor(store_text)


def _loads_or_unreadable(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return Unreadable(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=30)
    | JSON_VALUES.map(json.dumps)
    | st.tuples(st.sampled_from(["", " ", "\n"]), JSON_VALUES.map(json.dumps)).map("".join)
)
def test_decoding_stored_json_text_is_json_loads(text: str) -> None:
    assert decode_json(text) == _loads_or_unreadable(text)
