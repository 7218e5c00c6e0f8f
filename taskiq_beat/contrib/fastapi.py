"""A FastAPI router that lists, pauses, resumes, runs and deletes scheduler jobs over HTTP.

Needs the ``fastapi`` extra: ``pip install "taskiq-beat[fastapi]"``.

::

    import secrets

    from fastapi import Depends, FastAPI, Header, HTTPException

    from taskiq_beat.contrib.fastapi import create_scheduler_router


    async def require_api_key(x_api_key: str | None = Header(default=None)) -> None:
        if x_api_key is None or not secrets.compare_digest(x_api_key, "change-me"):
            raise HTTPException(status_code=401, detail="missing or wrong X-API-Key header")


    app = FastAPI()
    app.include_router(
        create_scheduler_router(
            scheduler_app,  # your SchedulerApp
            prefix="/scheduler",
            dependencies=[Depends(require_api_key)],  # runs before every route of the router
        )
    )

Routes (relative to ``prefix``):

=========================================  ===========================================
``GET /jobs``                              jobs ordered by id; ``is_enabled``,
                                           ``task_name``, ``limit`` (1-1000, default
                                           100), ``offset``
``GET /jobs/{job_id}``                     one job
``POST /jobs/{job_id}/pause``              stop firing it; returns the job
``POST /jobs/{job_id}/resume``             fire it again (next fire computed from now)
``POST /jobs/{job_id}/run-now``            send its task at once; returns the run
``DELETE /jobs/{job_id}``                  delete it and its runs (204)
``GET /jobs/{job_id}/runs``                its runs, newest first; ``status``, ``since``,
                                           ``until``, ``limit``, ``offset``
``GET /runs``                              runs of all jobs; ``status``, ``job_id``,
                                           ``since``, ``until``, ``limit``, ``offset``
``GET /health``                            the health snapshot; 503 when behind
=========================================  ===========================================

An unknown job id answers 404 with ``{"detail": "scheduler job not found: job_id='...'"}``;
a second ``run-now`` of a job within the same microsecond answers 409; other input the
scheduler refuses answers 422 with ``{"detail": "invalid <field>=<value>: <reason>"}``
(query values of the wrong type or range get FastAPI's usual 422 validation errors).

Each request opens its own session with ``scheduler_app.session_factory()``.

Job ids go in the path percent-encoded (spaces, quotes, ``?``, ``#``, ``%`` and non-ASCII
characters all work). An id containing ``/`` cannot be addressed through these routes: the
server decodes ``%2F`` before routing, so the id would read as more path segments (``GET
/runs?job_id=...`` still lists its runs). Ids ``.`` and ``..`` are likewise normalized away
by most HTTP clients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict

from taskiq_beat.app import SchedulerApp
from taskiq_beat.enums import JobKind, JobSource, JobStrategy, RunStatus, StepStatus
from taskiq_beat.exceptions import InvalidJobError, JobExistsError, JobNotFoundError
from taskiq_beat.health import SchedulerHealthSnapshot
from taskiq_beat.models import SchedulerJob, SchedulerRun

try:
    from fastapi import APIRouter, HTTPException, Path, Query, Response, params
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taskiq_beat.contrib.fastapi needs FastAPI; install it with: "
        'pip install "taskiq-beat[fastapi]"'
    ) from exc

__all__ = ["ErrorOut", "JobOut", "RunOut", "StepOut", "create_scheduler_router"]

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class JobOut(BaseModel):
    """A scheduler job, as :meth:`SchedulerJob.to_dict` gives it (datetimes aware, UTC).

    ``trigger``, ``args``, ``kwargs`` and ``metadata`` are the stored JSON values. The API
    writes them as an object, a list, an object and an object, but a row edited by hand may
    hold any JSON there (or ``{"unreadable_json": text}`` for text that does not parse): such
    a job is still listed, with ``last_error`` saying why it was disabled.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None
    description: str | None
    task_name: str
    kind: JobKind
    strategy: JobStrategy
    trigger: dict[str, Any] | Any
    args: list[Any] | Any
    kwargs: dict[str, Any] | Any
    metadata: dict[str, Any] | Any
    is_enabled: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_error: str | None
    revision: int
    created_at: datetime
    updated_at: datetime
    policy: dict[str, Any] | None
    """The job's policy: the fields that differ from the defaults (see taskiq_beat.policy)."""
    source: JobSource
    """``code`` for a job declared in code, ``api`` for one made through the API."""
    definition_hash: str | None
    schedule_version: int | None
    run_count: int
    """Runs finished on a worker (succeeded, failed or lost)."""
    success_count: int
    failure_count: int
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_duration_seconds: float | None

    @classmethod
    def from_job(cls, job: SchedulerJob) -> JobOut:
        return cls.model_validate(job.to_dict())


class StepOut(BaseModel):
    """One attempt of one step of a chain run, as :meth:`SchedulerChainStep.to_dict` gives it."""

    model_config = ConfigDict(frozen=True)

    id: int
    run_id: int
    chain_attempt: int
    step: int
    attempt: int
    task_name: str
    task_id: str
    status: StepStatus
    due_at: datetime
    deadline_at: datetime | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    worker_id: str | None
    executions: int
    result: Any
    """What the step returned (JSON), when it was kept."""
    error: str | None
    error_type: str | None


class RunOut(BaseModel):
    """One fire of a job, as :meth:`SchedulerRun.to_dict` gives it (datetimes aware, UTC)."""

    model_config = ConfigDict(frozen=True)

    id: int
    job_id: str
    scheduled_for: datetime
    status: RunStatus
    task_id: str
    attempt: int
    error: str | None
    claimed_by: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    worker_id: str | None
    """The worker that executed the run (``scheduler_worker.id``)."""
    executions: int
    retries: int
    error_type: str | None
    """The type of the exception a failed run raised (module and name)."""
    jitter_seconds: float | None
    """The random delay the job's policy gave this fire."""
    steps: list[StepOut] = []
    """A chain run's step attempts, in the order they were recorded."""

    @classmethod
    def from_run(cls, run: SchedulerRun) -> RunOut:
        return cls.model_validate(run.to_dict())


class BackfillIn(BaseModel):
    """A past range of a job's schedule to send (both ends included, timezone-aware)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: datetime
    end: datetime


class BackfillOut(BaseModel):
    """How many fires of the range were queued (those without a run yet)."""

    job_id: str
    queued: int


class ErrorOut(BaseModel):
    """The body of a 404 (unknown job) or of a 422 the scheduler raised."""

    detail: str


# Module-level aliases: with postponed annotations FastAPI resolves these names in this
# module's globals, so they must not live inside create_scheduler_router.
JobIdPath = Annotated[
    str,
    Path(description="The job id, percent-encoded; ids containing '/' are not addressable."),
]
PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE_SIZE, description="Most items returned (1-1000).")
]
PageOffset = Annotated[int, Query(ge=0, description="Items skipped, in id order.")]
EnabledFilter = Annotated[
    bool | None, Query(description="Only enabled (true) or only paused (false) jobs.")
]
TaskNameFilter = Annotated[str | None, Query(description="Only jobs sending this task.")]
StatusFilter = Annotated[RunStatus | None, Query(description="Only runs in this status.")]
RunsJobIdFilter = Annotated[str | None, Query(description="Only runs of this job.")]
SinceFilter = Annotated[
    datetime | None, Query(description="Only runs scheduled at or after this time (aware).")
]
UntilFilter = Annotated[
    datetime | None, Query(description="Only runs scheduled before this time (aware).")
]
RunsOffset = Annotated[int, Query(ge=0, description="Runs skipped, newest first.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No job has this id."}
}
_REFUSED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "A fire of this job at this instant exists."},
    422: {"model": ErrorOut, "description": "The scheduler refused the request."},
}


@contextlib.contextmanager
def _http_errors() -> Iterator[None]:
    """Turn the scheduler's own errors into HTTP answers: 404 unknown job, 409 an id that is
    taken, 422 bad input."""
    try:
        yield
    except JobNotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except JobExistsError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except InvalidJobError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc


def create_scheduler_router(
    scheduler_app: SchedulerApp,
    *,
    prefix: str = "",
    tags: Sequence[str | Enum] = ("scheduler",),
    dependencies: Sequence[params.Depends] = (),
) -> APIRouter:
    """Return an :class:`~fastapi.APIRouter` exposing the jobs and runs of ``scheduler_app``.

    ``prefix`` is prepended to every route (``"/scheduler"``), ``tags`` group them in the
    OpenAPI schema, and ``dependencies`` (``[Depends(require_api_key)]``) run before every
    route, which is where authentication goes. See the module docstring for the routes.
    """
    router = APIRouter(prefix=prefix, tags=list(tags), dependencies=list(dependencies))
    sessions = scheduler_app.session_factory

    @router.get("/jobs", response_model=list[JobOut], summary="List jobs")
    async def list_jobs(
        is_enabled: EnabledFilter = None,
        task_name: TaskNameFilter = None,
        limit: PageLimit = DEFAULT_PAGE_SIZE,
        offset: PageOffset = 0,
    ) -> list[JobOut]:
        """Jobs ordered by id, filtered by enabled state and task name."""
        with _http_errors():
            async with sessions() as session:
                jobs = await scheduler_app.list_jobs(
                    session, is_enabled=is_enabled, task_name=task_name, limit=limit, offset=offset
                )
        return [JobOut.from_job(job) for job in jobs]

    @router.get("/jobs/{job_id}", response_model=JobOut, responses=_NOT_FOUND, summary="Get a job")
    async def get_job(job_id: JobIdPath) -> JobOut:
        with _http_errors():
            async with sessions() as session:
                job = await scheduler_app.get_job(session, job_id)
        return JobOut.from_job(job)

    @router.post(
        "/jobs/{job_id}/pause", response_model=JobOut, responses=_NOT_FOUND, summary="Pause a job"
    )
    async def pause_job(job_id: JobIdPath) -> JobOut:
        """Stop firing the job until it is resumed; fires missed meanwhile are not sent."""
        with _http_errors():
            async with sessions() as session:
                job = await scheduler_app.pause(session, job_id)
        return JobOut.from_job(job)

    @router.post(
        "/jobs/{job_id}/resume",
        response_model=JobOut,
        responses=_NOT_FOUND,
        summary="Resume a job",
    )
    async def resume_job(job_id: JobIdPath) -> JobOut:
        """Fire the job again; its next fire is computed from now."""
        with _http_errors():
            async with sessions() as session:
                job = await scheduler_app.resume(session, job_id)
        return JobOut.from_job(job)

    @router.post(
        "/jobs/{job_id}/run-now",
        response_model=RunOut,
        responses={**_NOT_FOUND, **_REFUSED},
        summary="Run a job now",
    )
    async def run_job_now(job_id: JobIdPath) -> RunOut:
        """Send the job's task at once, paused or not; its schedule is not touched."""
        with _http_errors():
            async with sessions() as session:
                run = await scheduler_app.run_now(session, job_id)
        return RunOut.from_run(run)

    @router.post(
        "/jobs/{job_id}/backfill",
        response_model=BackfillOut,
        responses={**_NOT_FOUND, 422: _REFUSED[422]},
        summary="Backfill a past range",
    )
    async def backfill_job(job_id: JobIdPath, body: BackfillIn) -> BackfillOut:
        """Send each fire of the job's schedule in the range once; calling it again sends
        nothing more. A running scheduler sends them beside the fires due on time."""
        with _http_errors():
            async with sessions() as session:
                queued = await scheduler_app.backfill(
                    session, job_id, start=body.start, end=body.end
                )
        return BackfillOut(job_id=job_id, queued=queued)

    @router.delete(
        "/jobs/{job_id}",
        status_code=204,
        response_class=Response,
        responses=_NOT_FOUND,
        summary="Delete a job",
    )
    async def delete_job(job_id: JobIdPath) -> Response:
        """Delete the job and its run history."""
        with _http_errors():
            async with sessions() as session:
                await scheduler_app.delete(session, job_id)
        return Response(status_code=204)

    @router.get("/runs", response_model=list[RunOut], summary="List runs")
    async def list_runs(
        status: StatusFilter = None,
        job_id: RunsJobIdFilter = None,
        since: SinceFilter = None,
        until: UntilFilter = None,
        limit: PageLimit = DEFAULT_PAGE_SIZE,
        offset: RunsOffset = 0,
    ) -> list[RunOut]:
        """Runs of every job (or of ``job_id``), the most recently scheduled first."""
        with _http_errors():
            async with sessions() as session:
                runs = await scheduler_app.list_runs(
                    session,
                    job_id,
                    status=status,
                    since=since,
                    until=until,
                    limit=limit,
                    offset=offset,
                )
        return [RunOut.from_run(run) for run in runs]

    @router.get(
        "/jobs/{job_id}/runs",
        response_model=list[RunOut],
        responses=_NOT_FOUND,
        summary="List a job's runs",
    )
    async def list_job_runs(
        job_id: JobIdPath,
        status: StatusFilter = None,
        since: SinceFilter = None,
        until: UntilFilter = None,
        limit: PageLimit = DEFAULT_PAGE_SIZE,
        offset: RunsOffset = 0,
    ) -> list[RunOut]:
        """The job's runs, the most recently scheduled first."""
        with _http_errors():
            async with sessions() as session:
                await scheduler_app.get_job(session, job_id)  # 404 for an unknown job
        return await list_runs(status, job_id, since, until, limit, offset)

    @router.get("/health", response_model=SchedulerHealthSnapshot, summary="Scheduler health")
    async def health(response: Response) -> SchedulerHealthSnapshot:
        """The health snapshot; answers 503 when the schedule is behind."""
        snapshot = await scheduler_app.get_health_snapshot()
        if snapshot.behind:
            response.status_code = 503
        return snapshot

    return router
