"""Configuration from the environment: ``SchedulerConfig.from_env()`` and the command line's
``TASKIQ_BEAT_DATABASE_URL``; and the names taskiq-beat 1.4 exported."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

import taskiq_beat
from taskiq_beat import (
    InvalidConfigError,
    SchedulerApp,
    SchedulerConfig,
    calendar,
    daily,
)
from taskiq_beat.triggers import trigger_from_json
from tests.test_cli import beat, json_of, write_app

UTC = timezone.utc
README = Path(__file__).resolve().parents[1] / "README.md"
FIELDS = list(SchedulerConfig.model_fields)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``TASKIQ_BEAT_<FIELD>`` of the machine running the tests leaks in."""
    for field in FIELDS:
        monkeypatch.delenv(f"TASKIQ_BEAT_{field.upper()}", raising=False)


def other_value(field: str) -> tuple[str, Any]:
    """A valid value of ``field`` other than its default: as written in the environment,
    and as read."""
    info = SchedulerConfig.model_fields[field]
    default = info.default
    if info.annotation is str:
        return "Europe/Berlin", "Europe/Berlin"
    if info.annotation is bool:
        return ("false", False) if default else ("true", True)
    if info.annotation is int:
        return str(default * 2), default * 2
    if default is None:
        return "7.5", 7.5
    if not default:  # a number whose default is 0 (off)
        return "0.5", 0.5
    return str(float(default) * 2), float(default) * 2


def test_without_variables_from_env_is_the_default() -> None:
    assert SchedulerConfig.from_env() == SchedulerConfig()


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    written, read = other_value(field)
    monkeypatch.setenv(f"TASKIQ_BEAT_{field.upper()}", written)
    config = SchedulerConfig.from_env()
    assert getattr(config, field) == read
    # Keyword construction is unchanged: it never reads the environment.
    assert getattr(SchedulerConfig(), field) != read


def test_keywords_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKIQ_BEAT_SYNC_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("TASKIQ_BEAT_DISPATCH_BATCH_SIZE", "64")
    config = SchedulerConfig.from_env(sync_interval_seconds=0.5)
    assert config.sync_interval_seconds == 0.5
    assert config.dispatch_batch_size == 64


def test_values_are_checked_together_after_merging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The lease must exceed the send timeout: valid once the keyword is merged in.
    monkeypatch.setenv("TASKIQ_BEAT_DISPATCH_TIMEOUT_SECONDS", "40")
    config = SchedulerConfig.from_env(claim_lease_seconds=60)
    assert (config.dispatch_timeout_seconds, config.claim_lease_seconds) == (40, 60)
    with pytest.raises(InvalidConfigError) as raised:
        SchedulerConfig.from_env()
    assert "claim_lease_seconds=30.0 must be longer than dispatch_timeout_seconds=40.0" in str(
        raised.value
    )


def test_none_and_empty_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKIQ_BEAT_RUN_HISTORY_RETENTION_DAYS", "none")
    monkeypatch.setenv("TASKIQ_BEAT_SYNC_INTERVAL_SECONDS", "")
    config = SchedulerConfig.from_env()
    assert config.run_history_retention_days is None
    assert config.sync_interval_seconds == 1.0


def test_other_variables_of_the_prefix_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKIQ_BEAT_DATABASE_URL", "postgresql+asyncpg://x@y/z")
    monkeypatch.setenv("TASKIQ_BEAT_SOMETHING_ELSE", "1")
    assert SchedulerConfig.from_env() == SchedulerConfig()


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("TASKIQ_BEAT_SYNC_INTERVAL_SECONDS", "abc", "valid number"),
        ("TASKIQ_BEAT_SYNC_INTERVAL_SECONDS", "-1", "greater than 0"),
        ("TASKIQ_BEAT_SYNC_INTERVAL_SECONDS", "nan", "finite number"),
        ("TASKIQ_BEAT_DISPATCH_BATCH_SIZE", "2.5", "valid integer"),
        ("TASKIQ_BEAT_RECORD_RUNS", "maybe", "valid boolean"),
        ("TASKIQ_BEAT_DEFAULT_TIMEZONE", "Mars/Olympus_Mons", "unknown IANA timezone"),
    ],
    ids=["not_a_number", "negative", "nan", "fraction_for_int", "not_a_bool", "timezone"],
)
def test_bad_variables_name_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidConfigError) as raised:
        SchedulerConfig.from_env()
    assert raised.value.field == variable
    assert raised.value.value == value
    assert f"{variable}={value!r}" in str(raised.value)
    assert reason in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_bad_keywords_name_the_keyword() -> None:
    with pytest.raises(InvalidConfigError) as raised:
        SchedulerConfig.from_env(sync_interval_seconds=0)
    assert raised.value.field == "sync_interval_seconds"
    with pytest.raises(InvalidConfigError) as raised:
        SchedulerConfig.from_env(no_such_setting=1)
    assert raised.value.field == "no_such_setting"


def test_keyword_construction_keeps_its_validation() -> None:
    with pytest.raises(ValidationError):
        SchedulerConfig(sync_interval_seconds=0)


def test_the_readme_table_names_every_field_and_variable() -> None:
    text = README.read_text()
    for field in FIELDS:
        row = re.search(rf"^\| `{field}` \| `TASKIQ_BEAT_{field.upper()}` \|", text, re.MULTILINE)
        assert row, f"README lacks a row for {field}"


# ------------------------------------------------------------------------ command line


async def test_the_command_line_takes_the_database_url_from_the_environment(
    app: SchedulerApp,
    session: AsyncSession,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    union = calendar("0 9 * * mon-fri", daily(at="12:00", tz="Europe/Berlin"))
    await app.single(task="tests.record").upsert(session, trigger=union, job_id="cal")
    expected = trigger_from_json((await app.get_job(session, "cal")).trigger)

    monkeypatch.setenv("TASKIQ_BEAT_DATABASE_URL", database_url)
    shown = json_of(await beat("jobs", "show", "cal", "--json", cwd=tmp_path))
    assert shown["strategy"] == "calendar"
    assert trigger_from_json(shown["trigger"]) == expected
    assert datetime.fromisoformat(shown["next_run_at"]) > datetime(2026, 1, 1, tzinfo=UTC)
    table = await beat("jobs", "list", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "calendar" in table.stdout

    # --db wins over the variable.
    monkeypatch.setenv("TASKIQ_BEAT_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/no/such.db")
    shown = json_of(await beat("jobs", "show", "cal", "--json", "--db", database_url, cwd=tmp_path))
    assert shown["id"] == "cal"


# ---------------------------------------------------------------------- taskiq-beat 1.4 names


def test_the_names_of_taskiq_beat_1_4_are_importable() -> None:
    from taskiq_beat.builders import ChainJobBuilder, SingleJobBuilder
    from taskiq_beat.chain import CHAIN_TASK_NAME, ChainSpec
    from taskiq_beat.exceptions import ChainAbortedError
    from taskiq_beat.health import SchedulerHealthSnapshot
    from taskiq_beat.scheduler_runner import (
        ImportPathResolver,
        SchedulerRunner,
        SchedulerRunnerCli,
        import_object,
    )

    assert taskiq_beat.SingleScheduleBuilder is SingleJobBuilder
    assert taskiq_beat.ChainScheduleBuilder is ChainJobBuilder
    assert taskiq_beat.TaskChain is ChainSpec
    assert taskiq_beat.ChainStepFailedError is ChainAbortedError
    assert taskiq_beat.CHAIN_ORCHESTRATOR_TASK_NAME == CHAIN_TASK_NAME
    assert CHAIN_TASK_NAME == "taskiq_beat.chain_orchestrator"
    assert taskiq_beat.DEFAULT_TIMEZONE == "UTC" == SchedulerConfig().default_timezone
    assert taskiq_beat.SchedulerHealthSnapshot is SchedulerHealthSnapshot
    assert taskiq_beat.SchedulerRunner is SchedulerRunner
    assert taskiq_beat.SchedulerRunnerCli is SchedulerRunnerCli
    assert taskiq_beat.ImportPathResolver is ImportPathResolver
    assert ImportPathResolver.load("taskiq_beat:daily") is import_object("taskiq_beat:daily")
    for name in (
        "SchedulerRunner",
        "SchedulerRunnerCli",
        "SingleScheduleBuilder",
        "ChainScheduleBuilder",
        "TaskChain",
        "ChainStepFailedError",
        "DEFAULT_TIMEZONE",
        "ImportPathResolver",
        "SchedulerHealthSnapshot",
        "CHAIN_ORCHESTRATOR_TASK_NAME",
        "__version__",
    ):
        assert name in taskiq_beat.__all__


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert taskiq_beat.__version__ == version("taskiq-beat")
    assert re.match(r"\d+\.\d+", taskiq_beat.__version__)


def test_the_1_4_command_line_class_builds_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskiq_beat import SchedulerRunner, SchedulerRunnerCli

    name = write_app(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'cli.sqlite3'}")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = SchedulerRunnerCli.build_runner([f"{name}:scheduler_app", "--skip-broker-lifespan"])
    assert isinstance(runner, SchedulerRunner)
    assert isinstance(runner.scheduler_app, SchedulerApp)
    assert runner.manage_broker is False
    assert runner.startup_hooks == ()


async def test_the_runner_starts_and_stops_as_in_1_4(app: SchedulerApp) -> None:
    from taskiq_beat import SchedulerRunner

    called: list[SchedulerApp] = []

    async def hook(scheduler_app: SchedulerApp) -> None:
        called.append(scheduler_app)

    runner = SchedulerRunner(app, startup_hooks=[hook], manage_broker=False)
    await runner.start()
    try:
        assert app.is_running
        assert called == [app]
    finally:
        await runner.stop()
    assert not app.is_running
