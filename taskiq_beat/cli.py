"""The ``taskiq-beat`` command: run a scheduler, manage jobs, read runs, migrate the database.

Exit codes: 0 success, 1 unexpected failure, 2 bad input (usage, invalid values),
3 job not found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from taskiq.abc.cmd import TaskiqCMD

from taskiq_beat.exceptions import InvalidJobError, JobNotFoundError
from taskiq_beat.scheduler_runner import add_run_arguments, load_scheduler_app, run_command

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from taskiq_beat.app import SchedulerApp

__all__ = ["EXIT_FAILURE", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "BeatCMD", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3

DATABASE_URL_ENV = "TASKIQ_BEAT_DATABASE_URL"


class UsageError(Exception):
    """A command that cannot run as given (exit code 2)."""


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskiq-beat",
        description="taskiq-beat: run the scheduler, manage jobs, read run history.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad input, 3 job not found.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the scheduler process until SIGINT/SIGTERM")
    add_run_arguments(run)
    run.set_defaults(handler=run_command)

    target = argparse.ArgumentParser(add_help=False)
    source = target.add_mutually_exclusive_group()
    source.add_argument("--app", metavar="MODULE:APP", help="import path of the SchedulerApp")
    source.add_argument(
        "--db",
        metavar="URL",
        help=f"SQLAlchemy async database URL (default: ${DATABASE_URL_ENV})",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")

    jobs = commands.add_parser("jobs", help="list and manage jobs")
    job_commands = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = job_commands.add_parser("list", parents=[target, output], help="list jobs")
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--enabled", dest="is_enabled", action="store_const", const=True)
    state.add_argument("--disabled", dest="is_enabled", action="store_const", const=False)
    listing.add_argument("--task", dest="task_name", help="only jobs of this task")
    listing.add_argument("--limit", type=int, default=None)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(handler=_handler(_list_jobs))
    for name, help_text, function in (
        ("show", "show one job", _show_job),
        ("pause", "stop firing a job", _pause_job),
        ("resume", "fire a paused job again", _resume_job),
        ("run-now", "send a job's task at once (needs --app)", _run_job_now),
        ("delete", "delete a job and its runs", _delete_job),
    ):
        command = job_commands.add_parser(name, parents=[target, output], help=help_text)
        command.add_argument("job_id")
        command.set_defaults(handler=_handler(function))

    backfill = job_commands.add_parser(
        "backfill",
        parents=[target, output],
        help="send each fire of a past range once (a running scheduler sends them)",
    )
    backfill.add_argument("job_id")
    backfill.add_argument("--start", required=True, help="ISO 8601 time with its UTC offset")
    backfill.add_argument("--end", required=True, help="ISO 8601 time with its UTC offset")
    backfill.set_defaults(handler=_handler(_backfill_job))

    _add_declaration_commands(job_commands, target, output)

    runs = commands.add_parser("runs", parents=[target, output], help="show run history")
    runs.add_argument("job_id", nargs="?", help="only runs of this job")
    runs.add_argument(
        "--status",
        help="claimed, dispatched, running, succeeded, failed or lost",
    )
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--offset", type=int, default=0)
    runs.set_defaults(handler=_handler(_list_runs))

    health = commands.add_parser(
        "health",
        parents=[target, output],
        help="exit 0 if the schedule is kept, 1 if jobs are overdue or the database is down",
    )
    health.add_argument(
        "--max-lag",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how late a job may be (default: the app's misfire grace, at least 5 s)",
    )
    health.add_argument(
        "--window",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="recent runs the success rate covers (default: 3600)",
    )
    health.set_defaults(handler=_handler(_health))

    add_dashboard_command(commands, target)

    database = commands.add_parser("db", help="database schema")
    db_commands = database.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[target], help="apply taskiq-beat's Alembic migrations"
    )
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the upgrade would do (a taskiq-beat 1.4 database: its conversion)",
    )
    upgrade.set_defaults(handler=_upgrade)
    return parser


def _add_declaration_commands(
    job_commands: Any, target: argparse.ArgumentParser, output: argparse.ArgumentParser
) -> None:
    """``jobs diff`` and ``jobs apply``: the schedules declared in the app's code."""
    for name, help_text, function in (
        ("diff", "what applying the jobs declared in the app's code would change", _diff_jobs),
        ("apply", "apply the jobs declared in the app's code, without running", _apply_jobs),
    ):
        command = job_commands.add_parser(name, parents=[target, output], help=help_text)
        command.set_defaults(handler=_handler(function))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``taskiq-beat``."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except JobNotFoundError as exc:
        _error(str(exc))
        return EXIT_NOT_FOUND
    except (InvalidJobError, ValueError) as exc:
        _error(_redact(str(exc), args))
        return EXIT_USAGE
    except Exception as exc:  # a database or broker that fails: one line, no traceback
        _error(_redact(_one_line(exc), args))
        return EXIT_FAILURE


class BeatCMD(TaskiqCMD):
    """``taskiq beat module:scheduler_app``: the scheduler as a Taskiq CLI subcommand."""

    short_help = "Run a taskiq-beat scheduler (database-backed schedules)."

    def exec(self, args: Sequence[str]) -> int:
        parser = argparse.ArgumentParser(
            prog="taskiq beat", description="Run a taskiq-beat scheduler process."
        )
        add_run_arguments(parser)
        return run_command(parser.parse_args(args))


def _redact(message: str, args: argparse.Namespace) -> str:
    """Hide the password of the ``--db`` URL (or ``$TASKIQ_BEAT_DATABASE_URL``)."""
    url = getattr(args, "db", None) or os.environ.get(DATABASE_URL_ENV)
    if not url:
        return message
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        password = make_url(url).password
    except ArgumentError:
        return message.replace(url, "<database url>")
    return message.replace(str(password), "***") if password else message


def _one_line(exc: BaseException) -> str:
    """``exc`` in one line: the driver's error itself where SQLAlchemy wraps one (without
    the statement and the link SQLAlchemy adds on lines of their own)."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _error(message: str) -> None:
    sys.stderr.write(f"taskiq-beat: error: {message}\n")


# ---------------------------------------------------------------------------------- wiring


Action = Callable[["SchedulerApp", "AsyncSession", argparse.Namespace], Awaitable[Any]]


def _handler(action: Action) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        return asyncio.run(_with_app(action, args))

    return handle


async def _with_app(action: Action, args: argparse.Namespace) -> int:
    app = _open_app(args)
    bind = app.session_factory.kw.get("bind")
    try:
        async with app.session_factory() as session:
            result = await action(app, session, args)
    finally:
        if bind is not None:
            await bind.dispose()
    _print(result, as_json=args.json, out=sys.stdout)
    if isinstance(result, _HealthReport) and result.get("behind"):
        return EXIT_FAILURE
    return EXIT_OK


def _open_app(args: argparse.Namespace) -> SchedulerApp:
    if args.app:
        return load_scheduler_app(args.app)
    url = args.db or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise UsageError(f"give --app MODULE:APP or --db URL (or set ${DATABASE_URL_ENV})")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from taskiq import InMemoryBroker

    from taskiq_beat.app import SchedulerApp

    engine = create_async_engine(url)
    # Management without the app: no broker is needed, except to send (run-now).
    return SchedulerApp(broker=InMemoryBroker(), session_factory=async_sessionmaker(engine))


# ---------------------------------------------------------------------------------- actions


async def _list_jobs(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    jobs = await app.list_jobs(
        session,
        is_enabled=args.is_enabled,
        task_name=args.task_name,
        limit=args.limit,
        offset=args.offset,
    )
    return _JobTable([job.to_dict() for job in jobs])


async def _show_job(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    return (await app.get_job(session, args.job_id)).to_dict()


async def _pause_job(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    return (await app.pause(session, args.job_id)).to_dict()


async def _resume_job(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    return (await app.resume(session, args.job_id)).to_dict()


async def _run_job_now(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    if not args.app:
        raise UsageError("run-now sends the task through your broker: give --app MODULE:APP")
    await app.broker.startup()
    try:
        run = await app.run_now(session, args.job_id)
    finally:
        await app.broker.shutdown()
    return run.to_dict()


def _aware_time(field: str, text: str) -> datetime:
    """An ISO 8601 time with its UTC offset (``Z`` or ``+02:00``)."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidJobError(field, text, "not an ISO 8601 time") from None
    if value.utcoffset() is None:
        raise InvalidJobError(field, text, "has no UTC offset (add Z or +HH:MM)")
    return value


async def _backfill_job(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    start, end = _aware_time("start", args.start), _aware_time("end", args.end)
    queued = await app.backfill(session, args.job_id, start=start, end=end)
    return {"job_id": args.job_id, "queued": queued}


async def _delete_job(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    await app.delete(session, args.job_id)
    return {"deleted": args.job_id}


async def _list_runs(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    runs = await app.list_runs(
        session, args.job_id, status=args.status, limit=args.limit, offset=args.offset
    )
    return _RunTable([run.to_dict() for run in runs])


class _PlanReport(dict[str, Any]):
    """What applying the declared jobs changes (``DeclarationPlan.to_dict()``)."""


async def _diff_jobs(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    return await _declarations(app, session, args, dry_run=True)


async def _apply_jobs(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    return await _declarations(app, session, args, dry_run=False)


async def _declarations(
    app: SchedulerApp, session: AsyncSession, args: argparse.Namespace, *, dry_run: bool
) -> Any:
    if not args.app:
        raise UsageError(f"jobs {args.action} reads the app's declarations: give --app MODULE:APP")
    plan = await app.apply_declarations(session, dry_run=dry_run)
    return _PlanReport(plan.to_dict())


def _plan_lines(plan: dict[str, Any]) -> list[str]:
    stored = plan["stored_version"]
    lines = [
        f"schedule_version {plan['schedule_version']} "
        f"(database: {'none' if stored is None else stored})"
    ]
    if plan["skipped"]:
        lines.append("not applied: the database holds declarations of a newer schedule_version")
    lines += [f"+ {job_id}  (added)" for job_id in plan["added"]]
    lines += [f"~ {job_id}  (changed)" for job_id in plan["changed"]]
    lines += [f"- {job_id}  (no longer declared: disabled)" for job_id in plan["removed"]]
    lines += [
        f"! {job_id}  (a job made through the API: left alone)" for job_id in plan["conflicts"]
    ]
    changes = len(plan["added"]) + len(plan["changed"]) + len(plan["removed"])
    verb = "applied" if plan["applied"] else "to apply"
    lines.append(f"{changes} changes {verb}, {len(plan['unchanged'])} unchanged")
    return lines


class _HealthReport(dict[str, Any]):
    """A health snapshot: the command exits 1 when it says the schedule is behind."""


async def _health(app: SchedulerApp, session: AsyncSession, args: argparse.Namespace) -> Any:
    if args.max_lag is not None and args.max_lag < 0:
        raise UsageError(f"--max-lag must not be negative, got {args.max_lag}")
    if args.window <= 0:
        raise UsageError(f"--window must be positive, got {args.window}")
    snapshot = await app.get_health_snapshot(
        max_lag_seconds=args.max_lag, window_seconds=args.window
    )
    report = _HealthReport(snapshot.model_dump(mode="json"))
    if args.json:
        return report
    # The loop's own fields describe this process, which runs no scheduler: leave them out.
    shown = (
        "checked_at",
        "behind",
        "overdue_jobs",
        "oldest_overdue_at",
        "max_lag_seconds",
        "workers_alive",
        "runs_succeeded",
        "runs_failed",
        "success_rate",
        "window_seconds",
    )
    return _HealthReport({key: report[key] for key in shown})


def _upgrade(args: argparse.Namespace) -> int:
    from taskiq_beat.migrate import upgrade_database

    if args.app:
        bind = load_scheduler_app(args.app).session_factory.kw.get("bind")
        if bind is None:
            raise UsageError("the app's session factory is not bound to an engine; use --db")
        url = bind.url.render_as_string(hide_password=False)
    else:
        url = args.db or os.environ.get(DATABASE_URL_ENV)
        if not url:
            raise UsageError(f"give --app MODULE:APP or --db URL (or set ${DATABASE_URL_ENV})")
    if args.dry_run:
        from taskiq_beat.migrate import describe_upgrade

        for line in describe_upgrade(url, args.revision):
            sys.stdout.write(f"would {line}\n" if not line.startswith(_FACTS) else f"{line}\n")
        return EXIT_OK
    for line in upgrade_database(url, args.revision):
        sys.stdout.write(f"{line}\n")
    sys.stdout.write(f"database upgraded to {args.revision}\n")
    return EXIT_OK


_FACTS = ("taskiq-beat 1.4 database found", "current revision", "nothing to apply")


# ---------------------------------------------------------------------------------- dashboard

DASHBOARD_TOKEN_ENV = "TASKIQ_BEAT_DASHBOARD_TOKEN"
DASHBOARD_BASIC_AUTH_ENV = "TASKIQ_BEAT_DASHBOARD_BASIC_AUTH"


def add_dashboard_command(commands: Any, target: argparse.ArgumentParser) -> None:
    """``taskiq-beat dashboard``: the web dashboard on its own (needs the dashboard extra)."""
    dashboard = commands.add_parser(
        "dashboard",
        parents=[target],
        help="serve the web dashboard (pip install 'taskiq-beat[dashboard]')",
        description="Serve the web dashboard. With --db it shows and manages jobs but cannot "
        "run them now (that needs the broker of --app).",
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    login = dashboard.add_mutually_exclusive_group()
    login.add_argument(
        "--token",
        default=None,
        help=f"access token asked by a login form or sent as Bearer (or ${DASHBOARD_TOKEN_ENV})",
    )
    login.add_argument(
        "--basic-auth",
        default=None,
        metavar="USER:PASSWORD",
        help=f"HTTP basic auth (or ${DASHBOARD_BASIC_AUTH_ENV})",
    )
    dashboard.add_argument(
        "--read-only", action="store_true", help="show everything, change nothing"
    )
    dashboard.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without a login on an address other than loopback (not recommended)",
    )
    dashboard.add_argument(
        "--poll", type=float, default=5.0, metavar="SECONDS", help="live refresh (default: 5)"
    )
    dashboard.set_defaults(handler=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    import contextlib
    import ipaddress
    import logging
    from collections.abc import AsyncIterator

    try:
        import uvicorn

        from taskiq_beat.dashboard import create_dashboard
    except ImportError as exc:
        raise UsageError(
            f"the dashboard needs its extra: pip install 'taskiq-beat[dashboard]' ({exc})"
        ) from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    if args.poll < 0:
        raise UsageError(f"--poll must not be negative, got {args.poll}")
    token = args.token or (None if args.basic_auth else os.environ.get(DASHBOARD_TOKEN_ENV))
    basic = args.basic_auth or (None if token else os.environ.get(DASHBOARD_BASIC_AUTH_ENV))
    credentials: tuple[str, str] | None = None
    if basic:
        user, _, password = basic.partition(":")
        if not user or not password:
            raise UsageError("--basic-auth must be USER:PASSWORD")
        credentials = (user, password)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not (token or credentials or loopback or args.no_auth):
        raise UsageError(
            f"--host {args.host} is reachable from other machines: give --token or "
            "--basic-auth (or --no-auth to serve it open)"
        )
    app = _open_app(args)
    sends = bool(args.app)
    dashboard = create_dashboard(
        app,
        token=token or None,
        basic_auth=credentials,
        read_only=args.read_only,
        can_run_now=sends,
        poll_seconds=args.poll,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        if sends:
            await app.broker.startup()
        try:
            yield
        finally:
            if sends:
                await app.broker.shutdown()
            bind = app.session_factory.kw.get("bind")
            if bind is not None:
                await bind.dispose()

    dashboard.router.lifespan_context = lifespan
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.stderr.write(
        f"taskiq-beat dashboard on http://{args.host}:{args.port}/"
        f"{' (read-only)' if args.read_only else ''}\n"
    )
    uvicorn.run(dashboard, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


# ---------------------------------------------------------------------------------- output


class _JobTable(list[dict[str, Any]]):
    columns = (
        ("ID", "id"),
        ("NAME", "name"),
        ("TASK", "task_name"),
        ("STRATEGY", "strategy"),
        ("ENABLED", "is_enabled"),
        ("SOURCE", "source"),
        ("NEXT RUN (UTC)", "next_run_at"),
        ("LAST RUN (UTC)", "last_run_at"),
        ("RUNS", "run_count"),
        ("FAILED", "failure_count"),
        ("LAST ERROR", "last_error"),
    )


class _RunTable(list[dict[str, Any]]):
    columns = (
        ("JOB", "job_id"),
        ("SCHEDULED FOR (UTC)", "scheduled_for"),
        ("STATUS", "status"),
        ("ATTEMPT", "attempt"),
        ("DURATION (S)", "duration_seconds"),
        ("WORKER", "worker_id"),
        ("TASK ID", "task_id"),
        ("STEPS", "steps"),
        ("ERROR", "error"),
    )


def _print(result: Any, *, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(result, indent=2, default=str) + "\n")
    elif isinstance(result, _PlanReport):
        out.write("\n".join(_plan_lines(result)) + "\n")
    elif isinstance(result, (_JobTable, _RunTable)):
        out.write(_table(result.columns, result) + "\n")
    else:
        width = max(len(key) for key in result)
        for key, value in result.items():
            out.write(f"{key.ljust(width)}  {_cell(value, limit=None)}\n")


def _steps(steps: list[dict[str, Any]]) -> str | None:
    """A chain run's step attempts in one cell: ``0:succeeded 1:failed 1.2:succeeded``."""
    if not steps:
        return None
    return " ".join(
        f"{s['step']}{'.' + str(s['attempt']) if s['attempt'] > 1 else ''}:{s['status']}"
        for s in steps
    )


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    cells = [[title for title, _ in columns]]
    cells += [
        [_cell(_steps(row[key]) if key == "steps" else row.get(key)) for _, key in columns]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    if not rows:
        lines.append("(none)")
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any, limit: int | None = 40) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, float):
        text = f"{value:.3f}"
    elif isinstance(value, str):
        text = value.replace("\n", " ")
    else:
        text = json.dumps(value, default=str)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


if __name__ == "__main__":
    sys.exit(main())
