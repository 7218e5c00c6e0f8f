"""Nothing in the database is trusted: names resolve only on the broker, secrets stay out of
output, and hostile strings are stored and returned unchanged."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from taskiq_beat import (
    IntervalTrigger,
    PeriodicSchedule,
    SchedulerApp,
    SchedulerJob,
)
from tests.test_cli import beat
from tests.utils import FakeClock, RecordingBroker

EVERY_SECOND = PeriodicSchedule(interval=IntervalTrigger(seconds=1))

HOSTILE = [
    "'; DROP TABLE scheduler_job; --",
    "quote \" and ' both",
    "unicode: 日本語 ✓ émoji 🚀",
    "back\\slash and %s %(x)s :param $1 ?",
    "newline\nand\ttab",
]


@pytest.mark.parametrize(
    "task_name",
    ["os:system", "os.system", "builtins.eval", "subprocess.run", "tests.utils:FakeClock"],
)
async def test_task_names_in_the_database_resolve_only_on_the_broker(
    app: SchedulerApp,
    session: AsyncSession,
    broker: RecordingBroker,
    clock: FakeClock,
    task_name: str,
) -> None:
    job = await app.single(task="tests.record").schedule(session, trigger=EVERY_SECOND)
    await session.execute(
        sa.update(SchedulerJob).where(SchedulerJob.id == job.id).values(task_name=task_name)
    )
    await session.commit()
    clock.advance(1)
    await app.engine.sync()
    assert await app.engine.tick() == 0
    assert broker.sent == []
    assert broker.state.executed == []
    stored = await app.get_job(session, job.id)
    assert stored.is_enabled is False
    assert stored.last_error is not None
    assert task_name in stored.last_error


@pytest.mark.parametrize("text", HOSTILE)
async def test_hostile_ids_and_names_round_trip(
    app: SchedulerApp, session: AsyncSession, broker: RecordingBroker, text: str
) -> None:
    job = await app.single(task="tests.record", kwargs={"note": text}, metadata={"k": text}).upsert(
        session, trigger=EVERY_SECOND, job_id=text, name=text, description=text
    )
    assert job.id == text
    session.expunge_all()
    stored = await app.get_job(session, text)
    assert (stored.id, stored.name, stored.description) == (text, text, text)
    assert stored.kwargs == {"note": text}
    run = await app.run_now(session, text)
    [message] = broker.sent
    assert message.labels["taskiq_beat_job_id"] == text
    assert message.kwargs == {"note": text}
    assert [r.task_id for r in await app.list_runs(session, text)] == [run.task_id]
    count = await session.execute(sa.select(sa.func.count()).select_from(SchedulerJob))
    assert count.scalar_one() == 1  # the table is still there, and holds one row
    await app.delete(session, text)


async def test_database_passwords_stay_out_of_command_output(tmp_path: object) -> None:
    url = "postgresql+asyncpg://scheduler:s3cr3t-pa55@127.0.0.1:1/nowhere"
    result = await beat("jobs", "list", "--db", url, cwd=tmp_path)  # type: ignore[arg-type]
    assert result.returncode == 1
    assert "Connect" in result.stderr  # says what failed, in one line
    assert "Traceback" not in result.stderr
    assert "s3cr3t-pa55" not in result.stdout + result.stderr


async def test_management_logs_carry_no_password(
    app: SchedulerApp, session: AsyncSession, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="taskiq_beat"):
        job = await app.single(task="tests.record").schedule(session, trigger=EVERY_SECOND)
        await app.pause(session, job.id)
        await app.start()
        await app.stop()
    bind = app.session_factory.kw["bind"]
    password = bind.url.password
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert str(bind.url.render_as_string(hide_password=False)) not in text
    if password:
        assert password not in text
