"""taskiq-beat: a database-backed scheduler for Taskiq."""

from importlib.metadata import PackageNotFoundError, version

from taskiq_beat.app import SchedulerApp
from taskiq_beat.builders import (
    ChainJobBuilder,
    ChainScheduleBuilder,
    JobDefinition,
    SingleJobBuilder,
    SingleScheduleBuilder,
)
from taskiq_beat.chain import (
    CHAIN_ORCHESTRATOR_TASK_NAME,
    CHAIN_TASK_NAME,
    ChainHandle,
    ChainOutcome,
    ChainStep,
    TaskChain,
    register_chain_orchestrator,
)
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.config import DEFAULT_TIMEZONE, SchedulerConfig
from taskiq_beat.declared import DeclarationPlan
from taskiq_beat.discovery import TaskDiscovery, discover_task_modules
from taskiq_beat.dispatch import JOB_ID_LABEL, RUN_ID_LABEL, SCHEDULED_FOR_LABEL, fire_task_id
from taskiq_beat.enums import JobKind, JobSource, JobStrategy, RunStatus, StepStatus
from taskiq_beat.events import EventKind, SchedulerEvent
from taskiq_beat.exceptions import (
    ChainAbortedError,
    ChainStepFailedError,
    CorruptJobError,
    InvalidConfigError,
    InvalidJobError,
    InvalidTriggerError,
    JobExistsError,
    JobNotFoundError,
    TaskiqBeatError,
    UnknownTaskError,
)
from taskiq_beat.health import SchedulerHealthSnapshot
from taskiq_beat.models import (
    SchedulerBase,
    SchedulerChainStep,
    SchedulerJob,
    SchedulerRun,
    SchedulerWorker,
)
from taskiq_beat.policy import JobPolicy
from taskiq_beat.scheduler_runner import ImportPathResolver, SchedulerRunner, SchedulerRunnerCli
from taskiq_beat.shortcuts import calendar, cron, daily, every, hourly, weekly
from taskiq_beat.triggers import (
    CalendarTrigger,
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    Trigger,
    TriggerInput,
    format_interval,
    parse_interval,
)
from taskiq_beat.worker import RunLifecycleMiddleware

try:
    __version__ = version("taskiq-beat")
    """The installed version of taskiq-beat (from the package metadata)."""
except PackageNotFoundError:  # pragma: no cover - imported from a source tree never installed
    __version__ = "0+unknown"

__all__ = [
    "CHAIN_ORCHESTRATOR_TASK_NAME",
    "CHAIN_TASK_NAME",
    "DEFAULT_TIMEZONE",
    "JOB_ID_LABEL",
    "RUN_ID_LABEL",
    "SCHEDULED_FOR_LABEL",
    "CalendarTrigger",
    "ChainAbortedError",
    "ChainHandle",
    "ChainJobBuilder",
    "ChainOutcome",
    "ChainScheduleBuilder",
    "ChainStep",
    "ChainStepFailedError",
    "Clock",
    "CorruptJobError",
    "CrontabTrigger",
    "DeclarationPlan",
    "EventKind",
    "ImmediateDispatch",
    "ImportPathResolver",
    "IntervalTrigger",
    "InvalidConfigError",
    "InvalidJobError",
    "InvalidTriggerError",
    "JobDefinition",
    "JobExistsError",
    "JobKind",
    "JobNotFoundError",
    "JobPolicy",
    "JobSource",
    "JobStrategy",
    "OneOffSchedule",
    "PeriodicSchedule",
    "RunLifecycleMiddleware",
    "RunStatus",
    "SchedulerApp",
    "SchedulerBase",
    "SchedulerChainStep",
    "SchedulerConfig",
    "SchedulerEvent",
    "SchedulerHealthSnapshot",
    "SchedulerJob",
    "SchedulerRun",
    "SchedulerRunner",
    "SchedulerRunnerCli",
    "SchedulerWorker",
    "SingleJobBuilder",
    "SingleScheduleBuilder",
    "StepStatus",
    "SystemClock",
    "TaskChain",
    "TaskDiscovery",
    "TaskiqBeatError",
    "Trigger",
    "TriggerInput",
    "UnknownTaskError",
    "__version__",
    "calendar",
    "cron",
    "daily",
    "discover_task_modules",
    "every",
    "fire_task_id",
    "format_interval",
    "hourly",
    "parse_interval",
    "register_chain_orchestrator",
    "weekly",
]
