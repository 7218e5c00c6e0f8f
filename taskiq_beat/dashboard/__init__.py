"""A web dashboard for taskiq-beat: jobs, runs, workers and health, in the browser.

Needs the ``dashboard`` extra: ``pip install "taskiq-beat[dashboard]"`` (Jinja2, FastAPI).
Mount it in your FastAPI or Starlette app, behind your own authentication::

    from fastapi import Depends, FastAPI

    from taskiq_beat.dashboard import create_dashboard

    app = FastAPI()
    app.mount(
        "/scheduler",
        create_dashboard(scheduler_app, dependencies=[Depends(require_admin)]),
    )

or run it on its own: ``taskiq-beat dashboard --app myapp:scheduler_app --port 8000``.
Every page is rendered on the server; a few lines of JavaScript refresh the data and show
times in the viewer's zone. Actions (pause, resume, run now, delete) are POST forms with a
CSRF token, and call the same ``SchedulerApp`` methods as the CLI.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    from fastapi import FastAPI  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'taskiq_beat.dashboard needs Jinja2 and FastAPI: pip install "taskiq-beat[dashboard]"'
    ) from exc

from taskiq_beat.dashboard._app import create_dashboard
from taskiq_beat.dashboard._describe import describe_trigger
from taskiq_beat.dashboard._security import BasicAuth, TokenAuth

__all__ = ["BasicAuth", "TokenAuth", "create_dashboard", "describe_trigger"]
