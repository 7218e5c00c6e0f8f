"""The dashboard's routes: pages rendered on the server, fragments for live updates, and the
actions (POST only, CSRF-checked) that go through the same ``SchedulerApp`` methods as the
CLI and the JSON router."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, params
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskiq_beat.app import SchedulerApp
from taskiq_beat.clock import Clock, SystemClock
from taskiq_beat.dashboard import _describe
from taskiq_beat.dashboard._security import (
    CSRF_FIELD,
    TOKEN_COOKIE,
    BasicAuth,
    LoginRequired,
    TokenAuth,
    check_csrf,
    cookie_path,
    csrf_cookie,
    csrf_form_token,
    set_csrf_cookie,
)
from taskiq_beat.enums import RunStatus
from taskiq_beat.exceptions import InvalidJobError, JobExistsError, JobNotFoundError
from taskiq_beat.models import Unreadable
from taskiq_beat.store.values import JOB_SORT_COLUMNS, JobSummary
from taskiq_beat.triggers import trigger_from_json

__all__ = ["create_dashboard"]

logger = logging.getLogger(__name__)

_DATETIME_SORTS = frozenset({"next_run_at", "last_run_at"})
_RUN_WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}
_TASK_NAMES_TTL = 30.0


def create_dashboard(
    scheduler_app: SchedulerApp,
    *,
    dependencies: Sequence[params.Depends] = (),
    token: str | None = None,
    basic_auth: tuple[str, str] | None = None,
    read_only: bool = False,
    can_run_now: bool = True,
    title: str = "taskiq-beat",
    page_size: int = 50,
    poll_seconds: float = 5.0,
    clock: Clock | None = None,
    secret: str | bytes | None = None,
) -> FastAPI:
    """An ASGI app (a FastAPI app) serving the dashboard of ``scheduler_app``; mount it in
    yours: ``host.mount("/scheduler", create_dashboard(scheduler_app, dependencies=[...]))``.

    ``dependencies`` run before every page and action (your authentication: raise
    ``HTTPException(401)`` or ``403`` to refuse); ``token`` or ``basic_auth`` add a login of
    the dashboard's own (what ``taskiq-beat dashboard`` uses). ``read_only`` hides the actions
    and refuses them (403). ``can_run_now=False`` hides "run now", for a process whose broker
    cannot send. Pages refresh their data every ``poll_seconds`` (``0``: never).

    ``secret`` keys the CSRF tokens of the forms; by default a random one per process, so a
    page loaded before a restart must be reloaded before its form is sent. Give the same
    secret to every replica behind one address.
    """
    if not 1 <= page_size <= 500:
        raise ValueError(f"page_size={page_size!r}: expected 1 to 500")
    if poll_seconds < 0:
        raise ValueError(f"poll_seconds={poll_seconds!r}: must not be negative")
    guards = list(dependencies)
    token_auth = TokenAuth(token) if token is not None else None
    if token_auth is not None:
        guards.append(Depends(token_auth))
    if basic_auth is not None:
        guards.append(Depends(BasicAuth(*basic_auth)))
    dashboard = _Dashboard(
        scheduler_app,
        read_only=read_only,
        can_run_now=can_run_now,
        title=title,
        page_size=page_size,
        poll_seconds=poll_seconds,
        clock=clock or SystemClock(),
        token_auth=token_auth,
        secret=(secret.encode() if isinstance(secret, str) else secret) or secrets.token_bytes(32),
    )
    app = FastAPI(title=f"{title} dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount(
        "/static",
        StaticFiles(packages=[("taskiq_beat.dashboard", "static")]),
        name="static",
    )
    app.include_router(dashboard.public_router())
    app.include_router(dashboard.router(guards))
    app.add_exception_handler(StarletteHTTPException, dashboard.http_error)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, dashboard.database_error)
    app.add_exception_handler(TimeoutError, dashboard.database_error)
    app.add_exception_handler(OSError, dashboard.database_error)
    return app


def _encode_cursor(value: Any, job_id: str) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    raw = json.dumps([value, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(text: str, sort: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value, job_id = json.loads(raw)
        if not isinstance(job_id, str) or not (value is None or isinstance(value, str)):
            raise ValueError("not a [value, id] pair")
        if value is not None and sort in _DATETIME_SORTS:
            value = datetime.fromisoformat(value)
            if value.utcoffset() is None:
                raise ValueError("naive time")
    except (binascii.Error, ValueError, TypeError) as exc:
        raise HTTPException(
            status_code=400, detail=f"This page link is damaged ({exc}); start again."
        ) from None
    return value, job_id


def _cursor_of(job: JobSummary, sort: str) -> str:
    return _encode_cursor(getattr(job, sort), job.id)


def _parse_utc(text: str, field: str) -> datetime | None:
    """A ``datetime-local`` value (or ISO 8601) read as UTC; empty -> None."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(
            status_code=400, detail=f"{field}={text!r} is not a date and time"
        ) from None
    if value.utcoffset() is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


class _Dashboard:
    def __init__(
        self,
        scheduler_app: SchedulerApp,
        *,
        read_only: bool,
        can_run_now: bool,
        title: str,
        page_size: int,
        poll_seconds: float,
        clock: Clock,
        token_auth: TokenAuth | None,
        secret: bytes,
    ) -> None:
        self.app = scheduler_app
        self.read_only = read_only
        self.can_run_now = can_run_now and not read_only
        self.title = title
        self.page_size = page_size
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.token_auth = token_auth
        self.secret = secret
        self._task_names: tuple[float, list[str]] = (-_TASK_NAMES_TTL, [])
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("taskiq_beat.dashboard", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["utc"] = _describe.utc_text
        self.env.filters["duration"] = _describe.duration_text
        self.env.filters["percent"] = _percent_text

    # ------------------------------------------------------------------ rendering

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
    ) -> HTMLResponse:
        """The page, or with ``?partial=1`` only its ``live`` block (what the poller asks)."""
        cookie, new = csrf_cookie(request)
        base = str(request.scope.get("root_path") or "")
        page_url = request.url.path + ("?" + request.url.query if request.url.query else "")

        def url(path: str, **query: Any) -> str:
            pairs = {k: v for k, v in query.items() if v not in (None, "", False)}
            return base + path + ("?" + urlencode(pairs) if pairs else "")

        values = {
            "title": self.title,
            "base": base,
            "url": url,
            "csrf_field": CSRF_FIELD,
            "csrf_token": csrf_form_token(self.secret, cookie),
            "read_only": self.read_only,
            "can_run_now": self.can_run_now,
            "poll_ms": int(self.poll_seconds * 1000),
            "live_url": _with_query(page_url, partial="1"),
            "now": self.clock.now(),
            "logout": self.token_auth is not None,
            **context,
        }
        compiled = self.env.get_template(template)
        if request.query_params.get("partial") and "live" in compiled.blocks:
            body = "".join(compiled.blocks["live"](compiled.new_context(values)))
        else:
            body = compiled.render(values)
        response = HTMLResponse(body, status_code=status_code, headers=headers)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        if new:
            set_csrf_cookie(response, request, cookie)
        return response

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc, LoginRequired) and self.token_auth is not None:
            return self.login_page(request, exc.detail, request.url.path)
        return self.render(
            request,
            "error.html",
            {"status": exc.status_code, "message": exc.detail},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    def login_page(self, request: Request, message: str, next_path: str) -> HTMLResponse:
        base = str(request.scope.get("root_path") or "")
        if next_path in (f"{base}/login", f"{base}/logout"):
            next_path = f"{base}/jobs"
        return self.render(
            request, "login.html", {"message": message, "next": next_path}, status_code=401
        )

    async def database_error(self, request: Request, exc: Exception) -> Response:
        logger.warning("dashboard: %s %s failed: %s", request.method, request.url.path, exc)
        return self.render(
            request,
            "error.html",
            {
                "status": 503,
                "message": "The scheduler's database did not answer: "
                f"{type(exc).__name__}. The page tries again on its own.",
            },
            status_code=503,
        )

    # ------------------------------------------------------------------ routes

    def public_router(self) -> APIRouter:
        router = APIRouter()
        token_auth = self.token_auth
        if token_auth is None:
            return router

        @router.post("/login", include_in_schema=False)
        async def login(request: Request) -> Response:
            form = await _form(request)
            check_csrf(request, form, self.secret)
            if not token_auth.matches(form.get("token", "")):
                logger.info("dashboard: a login with a wrong token was refused")
                return self.login_page(request, "That token is not right.", form.get("next", ""))
            response = RedirectResponse(_local(request, form.get("next", "")), status_code=303)
            response.set_cookie(
                TOKEN_COOKIE,
                token_auth.session_value,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=cookie_path(request),
            )
            return response

        @router.get("/login", include_in_schema=False)
        async def login_form(request: Request) -> Response:
            return RedirectResponse(_local(request, "jobs"), status_code=303)

        @router.post("/logout", include_in_schema=False)
        async def logout(request: Request) -> Response:
            check_csrf(request, await _form(request), self.secret)
            response = RedirectResponse(_local(request, ""), status_code=303)
            response.delete_cookie(TOKEN_COOKIE, path=cookie_path(request))
            return response

        return router

    def router(self, guards: list[params.Depends]) -> APIRouter:
        router = APIRouter(dependencies=guards)
        app = self.app
        sessions = app.session_factory

        @router.get("/", include_in_schema=False)
        async def home(request: Request) -> Response:
            return RedirectResponse(_local(request, "jobs"), status_code=307)

        @router.get("/jobs", include_in_schema=False)
        async def jobs(request: Request) -> Response:
            query = request.query_params
            search = query.get("q", "").strip()[:200]
            state = query.get("state", "")
            task = query.get("task", "").strip()
            sort = query.get("sort", "id")
            if sort not in JOB_SORT_COLUMNS:
                sort = "id"
            descending = query.get("dir") == "desc"
            after = _decode_cursor(query["after"], sort) if query.get("after") else None
            before = _decode_cursor(query["before"], sort) if query.get("before") else None
            if after is not None and before is not None:
                before = None
            started = time.perf_counter()
            async with sessions() as session:
                rows = await app.page_jobs(
                    session,
                    search=search or None,
                    is_enabled={"enabled": True, "paused": False}.get(state),
                    task_name=task or None,
                    sort=sort,
                    descending=descending,
                    after=after,
                    before=before,
                    limit=self.page_size + 1,
                )
                task_names = await self._cached_task_names(session, query)
            elapsed = time.perf_counter() - started
            if before is not None:
                has_prev, rows = len(rows) > self.page_size, rows[-self.page_size :]
                has_next = True
            else:
                has_next, rows = len(rows) > self.page_size, rows[: self.page_size]
                has_prev = after is not None
            filters = {"q": search, "state": state, "task": task, "sort": sort}
            filters["dir"] = "desc" if descending else ""
            return self.render(
                request,
                "jobs.html",
                {
                    "page": "jobs",
                    "jobs": rows,
                    "filters": filters,
                    "filtered": bool(search or state or task),
                    "task_names": task_names,
                    "next_cursor": _cursor_of(rows[-1], sort) if has_next and rows else None,
                    "prev_cursor": _cursor_of(rows[0], sort) if has_prev and rows else None,
                    "query_ms": elapsed * 1000,
                    "notice": _notice(query),
                },
            )

        @router.get("/job", include_in_schema=False)
        async def job(request: Request) -> Response:
            job_id = request.query_params.get("id", "")
            async with sessions() as session:
                with _not_found():
                    found = await app.get_job(session, job_id)
                runs = await app.list_runs(session, job_id, limit=50)
            trigger_text, fires, trigger_error = "", [], None
            raw_trigger = found.trigger
            try:
                if isinstance(raw_trigger, Unreadable):
                    raise ValueError(str(raw_trigger))
                trigger = trigger_from_json(raw_trigger, job_id=found.id)
                trigger_text = _describe.describe_trigger(trigger)
                first = found.next_run_at if found.is_enabled else None
                fires = _describe.next_fires(trigger, first)
            except (InvalidJobError, ValueError) as exc:
                trigger_error = str(exc)
            bars, chart_summary = _describe.run_chart(runs)
            return self.render(
                request,
                "job.html",
                {
                    "page": "jobs",
                    "job": found,
                    "runs": runs,
                    "trigger_text": trigger_text,
                    "trigger_json": json.dumps(_jsonable(raw_trigger), indent=2, default=str),
                    "payload": json.dumps(
                        {
                            "args": _jsonable(found.args),
                            "kwargs": _jsonable(found.kwargs),
                            "metadata": _jsonable(found.job_metadata),
                        },
                        indent=2,
                        default=str,
                    ),
                    "trigger_error": trigger_error,
                    "fires": fires,
                    "bars": bars,
                    "chart_summary": chart_summary,
                    "chart_width": _describe.CHART_WIDTH,
                    "chart_height": _describe.CHART_HEIGHT,
                    "strip_y": _describe.CHART_HEIGHT - _describe.STRIP_HEIGHT,
                    "strip_height": _describe.STRIP_HEIGHT,
                    "notice": _notice(request.query_params),
                },
            )

        @router.get("/job/delete", include_in_schema=False)
        async def confirm_delete(request: Request) -> Response:
            self._refuse_if_read_only()
            job_id = request.query_params.get("id", "")
            async with sessions() as session:
                with _not_found():
                    found = await app.get_job(session, job_id)
            return self.render(request, "confirm_delete.html", {"page": "jobs", "job": found})

        def action(
            name: str, call: Callable[[Any, str], Awaitable[Any]]
        ) -> Callable[[Request], Awaitable[Response]]:
            async def handle(request: Request) -> Response:
                self._refuse_if_read_only()
                form = await _form(request)
                check_csrf(request, form, self.secret)
                job_id = form.get("id", "")
                async with sessions() as session:
                    with _not_found():
                        await call(session, job_id)
                logger.debug("dashboard: %s job %s", name, job_id)
                if name == "deleted":
                    target = "jobs?" + urlencode({"done": name, "job": job_id})
                else:
                    target = "job?" + urlencode({"id": job_id, "done": name})
                return RedirectResponse(_local(request, target), status_code=303)

            return handle

        async def run_now(session: Any, job_id: str) -> None:
            if not self.can_run_now:
                raise HTTPException(
                    status_code=403, detail="This dashboard cannot send tasks (no broker)."
                )
            await app.run_now(session, job_id)

        for path, name, call in (
            ("/job/pause", "paused", app.pause),
            ("/job/resume", "resumed", app.resume),
            ("/job/run-now", "sent", run_now),
            ("/job/delete", "deleted", app.delete),
        ):
            router.add_api_route(
                path, action(name, call), methods=["POST"], include_in_schema=False
            )

        @router.post("/job/backfill", include_in_schema=False)
        async def backfill(request: Request) -> Response:
            self._refuse_if_read_only()
            form = await _form(request)
            check_csrf(request, form, self.secret)
            job_id = form.get("id", "")
            start = _parse_utc(form.get("start", ""), "start")
            end = _parse_utc(form.get("end", ""), "end")
            if start is None or end is None:
                raise HTTPException(status_code=422, detail="A backfill needs a start and an end.")
            async with sessions() as session:
                with _not_found():
                    try:
                        queued = await app.backfill(session, job_id, start=start, end=end)
                    except InvalidJobError as exc:
                        raise HTTPException(status_code=422, detail=str(exc)) from None
            target = "job?" + urlencode({"id": job_id, "done": "backfilled", "count": queued})
            return RedirectResponse(_local(request, target), status_code=303)

        @router.get("/runs", include_in_schema=False)
        async def runs(request: Request) -> Response:
            query = request.query_params
            status = query.get("status", "")
            if status and status not in {member.value for member in RunStatus}:
                raise HTTPException(status_code=400, detail=f"status={status!r} is unknown")
            job_id = query.get("job", "").strip()
            window = query.get("window", "")
            since = _parse_utc(query.get("since", ""), "since")
            until = _parse_utc(query.get("until", ""), "until")
            if window in _RUN_WINDOWS and since is None:
                since = self.clock.now() - _RUN_WINDOWS[window]
            try:
                page = max(1, int(query.get("page", "1")))
            except ValueError:
                page = 1
            async with sessions() as session:
                found = await app.list_runs(
                    session,
                    job_id or None,
                    status=status or None,
                    since=since,
                    until=until,
                    limit=self.page_size + 1,
                    offset=(page - 1) * self.page_size,
                )
            return self.render(
                request,
                "runs.html",
                {
                    "page": "runs",
                    "runs": found[: self.page_size],
                    "has_next": len(found) > self.page_size,
                    "page_number": page,
                    "statuses": [member.value for member in RunStatus],
                    "filters": {
                        "status": status,
                        "job": job_id,
                        "window": window,
                        "since": query.get("since", ""),
                        "until": query.get("until", ""),
                    },
                    "filtered": bool(status or job_id or window or since or until),
                },
            )

        @router.get("/workers", include_in_schema=False)
        async def workers(request: Request) -> Response:
            async with sessions() as session:
                found = await app.list_workers(session)
            now = self.clock.now()
            timeout = timedelta(seconds=app.config.worker_timeout_seconds)
            rows = [
                {
                    "worker": worker,
                    "alive": worker.stopped_at is None and now - worker.last_seen_at <= timeout,
                    "seen_ago": (now - worker.last_seen_at).total_seconds(),
                }
                for worker in found
            ]
            return self.render(
                request,
                "workers.html",
                {
                    "page": "workers",
                    "workers": rows,
                    "alive_count": sum(1 for row in rows if row["alive"]),
                    "timeout": app.config.worker_timeout_seconds,
                },
            )

        @router.get("/health", include_in_schema=False)
        async def health(request: Request) -> Response:
            snapshot = await app.get_health_snapshot()
            return self.render(
                request,
                "health.html",
                {"page": "health", "health": snapshot},
                status_code=200,
            )

        return router

    # ------------------------------------------------------------------ helpers

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise HTTPException(status_code=403, detail="This dashboard is read-only.")

    async def _cached_task_names(self, session: Any, query: Any) -> list[str]:
        """The task filter's choices: read at most every 30 s, and not for live updates."""
        stamp, names = self._task_names
        if query.get("partial") or time.monotonic() - stamp < _TASK_NAMES_TTL:
            return names
        names = await self.app.task_names(session)
        self._task_names = (time.monotonic(), names)
        return names


@contextlib.contextmanager
def _not_found() -> Iterator[None]:
    try:
        yield
    except JobNotFoundError as exc:
        raise HTTPException(status_code=404, detail=f"There is no job {exc.job_id!r}.") from None
    except JobExistsError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None


async def _form(request: Request) -> dict[str, str]:
    """The URL-encoded form of a POST (no multipart: the forms here send none)."""
    body = await request.body()
    if len(body) > 64 * 1024:
        raise HTTPException(status_code=413, detail="That form is too large.")
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        raise HTTPException(status_code=400, detail="That form is not UTF-8.") from None


def _local(request: Request, target: str) -> str:
    """A path inside the dashboard (never another site: ``target`` is relative to it)."""
    base = str(request.scope.get("root_path") or "")
    target = target.lstrip("/")
    if target.startswith(base.lstrip("/") + "/") and base:
        target = target[len(base.lstrip("/")) + 1 :]
    if "//" in target or "\\" in target or ":" in target.split("?", 1)[0]:
        target = "jobs"
    return f"{base}/{target}"


def _with_query(url: str, **extra: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(extra)


_NOTICES = {
    "paused": "Paused: it will not fire until resumed.",
    "resumed": "Resumed: its next fire is computed from now.",
    "sent": "Sent now: its run appears below and updates as the worker reports.",
    "deleted": "Deleted, with its run history.",
    "backfilled": "Backfill queued: the scheduler sends those fires beside the ones due now.",
}


def _notice(query: Any) -> str | None:
    done = query.get("done", "")
    text = _NOTICES.get(done)
    if text and done == "deleted":
        return f"Job {query.get('job', '')!r} deleted, with its run history."
    if text and done == "backfilled":
        count = query.get("count", "0")
        fires = "fire" if count == "1" else "fires"
        return f"Backfill queued {count} {fires} of the range; the scheduler sends them."
    return text


def _jsonable(value: Any) -> Any:
    return {"unreadable_json": value.text} if isinstance(value, Unreadable) else value


def _percent_text(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f} %"
