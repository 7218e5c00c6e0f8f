"""All SQL of taskiq-beat, behind :class:`SchedulerStore`, one module per concern.

- :mod:`~taskiq_beat.store.jobs` and :mod:`~taskiq_beat.store.runs`: management operations,
  run in the caller's ``AsyncSession`` (the one passed to ``.schedule()``, ``pause()``...),
  one short transaction each, committed there;
- :mod:`~taskiq_beat.store.claims`: the engine's operations, each in a session of its own
  from the session factory, one short transaction per call, on plain values
  (:class:`JobRecord`, :class:`Claims`, :class:`Fire`);
- :mod:`~taskiq_beat.store.lifecycle`: what the workers write of the runs they execute, and
  what the scheduler's housekeeping does with it (lost runs, retention);
- :mod:`~taskiq_beat.store.chains`: durable chains, step attempt by step attempt (its own
  contract in its docstring);
- :mod:`~taskiq_beat.store.declared`: applying the schedules declared in code;
- :mod:`~taskiq_beat.store.instances`: the running schedulers, by which they share the jobs;
- :mod:`~taskiq_beat.store.dialects`: the hot batch statements, one module per SQL dialect.

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
  fires a time at which they are retried. It only touches runs still ``claimed``: a worker
  that started the run already owns its status.
"""

from __future__ import annotations

from taskiq_beat.store._common import CHANGES_CHANNEL, ChangeListener
from taskiq_beat.store.chains import (
    Advance,
    ChainEnd,
    ChainOperations,
    ChainState,
    StepDraft,
    StepMessage,
    StepOutcome,
)
from taskiq_beat.store.claims import ClaimOperations
from taskiq_beat.store.declared import DeclaredOperations, DeclaredRow
from taskiq_beat.store.instances import InstanceOperations
from taskiq_beat.store.jobs import JobOperations
from taskiq_beat.store.lifecycle import Finish, LifecycleOperations, RunStart
from taskiq_beat.store.runs import RunOperations
from taskiq_beat.store.values import (
    RELEASED,
    SENT,
    ClaimedFires,
    Claims,
    Fire,
    FirePolicies,
    JobRecord,
    PolicyOutcome,
    ScheduleState,
    SendOutcome,
)

__all__ = [
    "CHANGES_CHANNEL",
    "RELEASED",
    "SENT",
    "Advance",
    "ChainEnd",
    "ChainState",
    "ChangeListener",
    "ClaimedFires",
    "Claims",
    "DeclaredRow",
    "Finish",
    "Fire",
    "FirePolicies",
    "JobRecord",
    "PolicyOutcome",
    "RunStart",
    "ScheduleState",
    "SchedulerStore",
    "SendOutcome",
    "StepDraft",
    "StepMessage",
    "StepOutcome",
]


class SchedulerStore(
    JobOperations,
    RunOperations,
    ClaimOperations,
    LifecycleOperations,
    DeclaredOperations,
    ChainOperations,
    InstanceOperations,
):
    """The scheduler's database operations. See the module docstring for the contract.

    ``timeout`` bounds each engine operation (seconds; ``None``: unbounded).
    """
