"""The plain values the engine and the store exchange: jobs to schedule, claims, fires and
what happened to their sends.

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

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import (
    Any,
    NamedTuple,
    overload,
)

from taskiq_beat.enums import JobKind

__all__ = [
    "JOB_SORT_COLUMNS",
    "RELEASED",
    "SENT",
    "ClaimedFires",
    "Claims",
    "Fire",
    "FirePolicies",
    "JobRecord",
    "JobSummary",
    "PolicyOutcome",
    "ScheduleState",
    "SendOutcome",
    "WorkerSummary",
]


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
    policy: str | None = None
    """The stored JSON text of the job's policy (``None`` or ``"null"``: none)."""


@dataclasses.dataclass(eq=False)
class FirePolicies:
    """What the policies of a batch's jobs ask of its claim, beside sending (see
    :mod:`taskiq_beat.policy`); only jobs with something to do are in it.

    ``unsent``: jobs whose claimed fire is not sent but recorded ``missed``, with the reason;
    ``missed``: stretches of missed fires before the fire sent, one row each
    ``(job_id, first missed fire, its task id, reason)``; ``limits``: jobs with an overlap
    policy, ``(most runs going at once, whether one more may wait)``; ``jitter``: jobs whose
    fire is sent later, ``(by this many seconds, at this time)``: the retries path sends it.
    """

    unsent: dict[str, str] = dataclasses.field(default_factory=dict)
    missed: list[tuple[str, datetime, str, str]] = dataclasses.field(default_factory=list)
    limits: dict[str, tuple[int, bool]] = dataclasses.field(default_factory=dict)
    jitter: dict[str, tuple[float, datetime]] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.unsent or self.missed or self.limits or self.jitter)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """What the policies did with a claimed batch: the jobs whose fire is not sent now
    (missed, skipped, waiting or delayed), and the times the delayed fires are due."""

    held_back: frozenset[str] = frozenset()
    delayed_until: tuple[datetime, ...] = ()


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

    @classmethod
    def joined(cls, batches: Sequence[ClaimedFires]) -> ClaimedFires:
        """The fires of ``batches``, one after the other, as one batch."""
        if len(batches) == 1:
            return batches[0]
        columns = zip(*map(_columns, batches), strict=True)  # each field, of every batch
        return cls(*(list(itertools.chain(*field)) for field in columns))

    def pick(self, indexes: Sequence[int]) -> ClaimedFires:
        """The fires at ``indexes``, in that order, as a batch of their own."""
        return ClaimedFires(*([column[at] for at in indexes] for column in _columns(self)))

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


JOB_SORT_COLUMNS = ("id", "name", "task_name", "next_run_at", "last_run_at")
"""The columns a job listing (:meth:`~taskiq_beat.store.SchedulerStore.page_jobs`) sorts by;
the job id breaks ties, so that every row has one place in the order."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobSummary:
    """One row of a job listing: the job's columns a table shows, with its counters."""

    id: str
    name: str | None
    task_name: str
    kind: str
    strategy: str
    is_enabled: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_error: str | None
    run_count: int
    success_count: int
    failure_count: int
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_duration_seconds: float | None

    @property
    def success_rate(self) -> float | None:
        """Succeeded runs over finished runs; ``None`` before the first finished run."""
        return self.success_count / self.run_count if self.run_count else None

    @property
    def last_outcome(self) -> str | None:
        """``"succeeded"`` or ``"failed"``: the later of the last success and failure."""
        if self.last_success_at is None and self.last_failure_at is None:
            return None
        if self.last_failure_at is None:
            return "succeeded"
        if self.last_success_at is None or self.last_failure_at >= self.last_success_at:
            return "failed"
        return "succeeded"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSummary:
    """A worker of ``scheduler_worker`` with the number of runs it executes now."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    running: int
