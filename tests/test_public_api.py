"""The public surface: what ``taskiq_beat`` exports, and that the library never prints."""

from __future__ import annotations

import ast
import pathlib

import taskiq_beat

PACKAGE = pathlib.Path(taskiq_beat.__file__).parent

# Every name the original taskiq-beat README imports from ``taskiq_beat``.
REFERENCE_NAMES = {
    "ChainStep",
    "CrontabTrigger",
    "ImmediateDispatch",
    "IntervalTrigger",
    "OneOffSchedule",
    "PeriodicSchedule",
    "SchedulerApp",
    "SchedulerBase",
    "SchedulerConfig",
}

# The other names taskiq-beat 1.4 exported: the same objects here, or documented aliases.
V1_4_NAMES = {
    "CHAIN_ORCHESTRATOR_TASK_NAME",
    "ChainScheduleBuilder",
    "ChainStepFailedError",
    "DEFAULT_TIMEZONE",
    "ImportPathResolver",
    "SchedulerHealthSnapshot",
    "SchedulerRunner",
    "SchedulerRunnerCli",
    "SingleScheduleBuilder",
    "TaskChain",
    "TaskDiscovery",
    "__version__",
    "discover_task_modules",
}


def test_all_is_sorted_and_complete() -> None:
    exported = taskiq_beat.__all__
    # isort style, as ruff keeps it: CONSTANTS, then Classes, then functions, each alphabetical.
    assert list(exported) == sorted(
        exported, key=lambda name: (not name.isupper(), not name[0].isupper(), name)
    )
    for name in exported:
        assert hasattr(taskiq_beat, name), name
    required = (
        REFERENCE_NAMES
        | V1_4_NAMES
        | {
            "SchedulerJob",
            "SchedulerRun",
            "ChainAbortedError",
            "JobNotFoundError",
            "InvalidJobError",
            "TaskiqBeatError",
        }
    )
    assert required <= set(exported)


def test_exceptions_share_one_base() -> None:
    for name in (
        "ChainAbortedError",
        "JobNotFoundError",
        "InvalidJobError",
        "UnknownTaskError",
        "InvalidTriggerError",
        "CorruptJobError",
    ):
        assert issubclass(getattr(taskiq_beat, name), taskiq_beat.TaskiqBeatError)
    assert issubclass(taskiq_beat.JobNotFoundError, LookupError)
    assert issubclass(taskiq_beat.InvalidJobError, ValueError)


def test_package_is_typed() -> None:
    assert (PACKAGE / "py.typed").exists()


def test_library_code_never_prints() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"print() in {path.name}:{node.lineno}")


def test_modules_log_under_the_package_name() -> None:
    for path in PACKAGE.glob("*.py"):
        source = path.read_text()
        if "logging.getLogger(" in source:
            assert "logging.getLogger(__name__)" in source, path.name


def test_engine_does_not_know_the_facade() -> None:
    source = (PACKAGE / "engine.py").read_text()
    assert "taskiq_beat.app" not in source
    assert "import sqlalchemy" not in source
