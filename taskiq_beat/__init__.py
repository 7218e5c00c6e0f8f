"""taskiq-beat: a database-backed scheduler for Taskiq."""

from taskiq_beat.app import SchedulerApp
from taskiq_beat.builders import ChainJobBuilder, JobDefinition, SingleJobBuilder
from taskiq_beat.chain import CHAIN_TASK_NAME, ChainStep, register_chain_orchestrator
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.config import SchedulerConfig
from taskiq_beat.declared import DeclarationPlan
from taskiq_beat.discovery import TaskDiscovery, discover_task_modules
from taskiq_beat.dispatch import JOB_ID_LABEL, RUN_ID_LABEL, SCHEDULED_FOR_LABEL, fire_task_id
from taskiq_beat.enums import JobKind, JobSource, JobStrategy, RunStatus
from taskiq_beat.events import EventKind, SchedulerEvent
from taskiq_beat.exceptions import (
    ChainAbortedError,
    CorruptJobError,
    InvalidJobError,
    InvalidTriggerError,
    JobExistsError,
    JobNotFoundError,
    TaskiqBeatError,
    UnknownTaskError,
)
from taskiq_beat.health import SchedulerHealthSnapshot
from taskiq_beat.models import SchedulerBase, SchedulerJob, SchedulerRun, SchedulerWorker
from taskiq_beat.policy import JobPolicy
from taskiq_beat.triggers import (
    CrontabTrigger,
    ImmediateDispatch,
    IntervalTrigger,
    OneOffSchedule,
    PeriodicSchedule,
    Trigger,
)
from taskiq_beat.worker import RunLifecycleMiddleware

__all__ = [
    "CHAIN_TASK_NAME",
    "JOB_ID_LABEL",
    "RUN_ID_LABEL",
    "SCHEDULED_FOR_LABEL",
    "ChainAbortedError",
    "ChainJobBuilder",
    "ChainStep",
    "Clock",
    "CorruptJobError",
    "CrontabTrigger",
    "DeclarationPlan",
    "EventKind",
    "ImmediateDispatch",
    "IntervalTrigger",
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
    "SchedulerConfig",
    "SchedulerEvent",
    "SchedulerHealthSnapshot",
    "SchedulerJob",
    "SchedulerRun",
    "SchedulerWorker",
    "SingleJobBuilder",
    "SystemClock",
    "TaskDiscovery",
    "TaskiqBeatError",
    "Trigger",
    "UnknownTaskError",
    "discover_task_modules",
    "fire_task_id",
    "register_chain_orchestrator",
]
