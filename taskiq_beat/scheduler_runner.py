"""Running a ``SchedulerApp`` as a process.

``taskiq-beat run module:scheduler_app`` (also ``taskiq-beat-scheduler``,
``python -m taskiq_beat.scheduler_runner`` and ``taskiq beat``) imports the app, starts its
broker, runs the startup hooks, runs the scheduler until SIGINT or SIGTERM, then shuts down
in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from taskiq_beat.app import SchedulerApp

__all__ = [
    "ImportPathResolver",
    "SchedulerRunner",
    "SchedulerRunnerCli",
    "add_run_arguments",
    "import_object",
    "main",
    "run_command",
]

logger = logging.getLogger(__name__)

StartupHook = Callable[..., Any]


def import_object(path: str) -> Any:
    """Import ``module.path:attribute`` (the attribute may be dotted).

    The current directory is put on ``sys.path`` first, as ``taskiq worker`` does.

    :raises ValueError: if ``path`` has no ``:`` or the attribute does not exist.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    return target


class ImportPathResolver:
    """taskiq-beat 1.4's importer of ``module:attribute`` paths; :func:`import_object`."""

    @staticmethod
    def load(path: str) -> Any:
        """Import the object at ``path`` (see :func:`import_object`)."""
        return import_object(path)


def load_scheduler_app(path: str) -> SchedulerApp:
    """Import the ``SchedulerApp`` at ``path``; a callable returning one is accepted too."""
    target = import_object(path)
    if not isinstance(target, SchedulerApp) and callable(target):
        target = target()
    if not isinstance(target, SchedulerApp):
        raise ValueError(f"{path!r} is a {type(target).__name__}, not a SchedulerApp")
    return target


async def call_hook(hook: StartupHook, scheduler_app: SchedulerApp) -> None:
    """Call a startup hook with no argument, or with the app if it takes one."""
    parameters = inspect.signature(hook).parameters
    result = hook(scheduler_app) if parameters else hook()
    if inspect.isawaitable(result):
        await result


class SchedulerRunner:
    """Owns the lifespan of a scheduler process."""

    def __init__(
        self,
        scheduler_app: SchedulerApp,
        *,
        startup_hooks: Sequence[StartupHook] = (),
        manage_broker: bool = True,
    ) -> None:
        self.scheduler_app = scheduler_app
        self.startup_hooks = tuple(startup_hooks)
        self.manage_broker = manage_broker

    async def start(self) -> None:
        """Start the broker (when managed), run the startup hooks, start the scheduler."""
        app = self.scheduler_app
        if self.manage_broker:
            app.broker.is_scheduler_process = True
            await app.broker.startup()
        for hook in self.startup_hooks:
            await call_hook(hook, app)
        await app.start()

    async def stop(self) -> None:
        """Stop the scheduler, then the broker (when managed)."""
        try:
            await self.scheduler_app.stop()
        finally:
            if self.manage_broker:
                await self.scheduler_app.broker.shutdown()

    async def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM (taskiq-beat 1.4's name of :meth:`run`)."""
        await self.run()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or until SIGINT/SIGTERM when no event is given."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(stop_signal, stop.set)
                handled.append(stop_signal)
        app = self.scheduler_app
        try:
            if self.manage_broker:
                app.broker.is_scheduler_process = True
                await app.broker.startup()
            try:
                for hook in self.startup_hooks:
                    await call_hook(hook, app)
                await app.start()
                try:
                    await stop.wait()
                    logger.info("stop requested; shutting down")
                finally:
                    await app.stop()
            finally:
                if self.manage_broker:
                    await app.broker.shutdown()
        finally:
            for stop_signal in handled:
                loop.remove_signal_handler(stop_signal)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``taskiq-beat run`` (shared by its aliases)."""
    parser.add_argument(
        "scheduler_app", help="import path of the SchedulerApp, e.g. myapp.scheduler:scheduler_app"
    )
    parser.add_argument(
        "--startup",
        action="append",
        default=[],
        metavar="MODULE:HOOK",
        help="callable run after the broker starts, before the scheduler (repeatable); "
        "it may take the SchedulerApp as its only argument and may be async",
    )
    parser.add_argument(
        "--skip-broker-lifespan",
        action="store_true",
        help="do not call broker.startup()/shutdown()",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (default: INFO)", type=str.upper
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port (needs the 'metrics' extra)",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the scheduler process described by parsed ``run`` arguments."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    scheduler_app = load_scheduler_app(args.scheduler_app)
    hooks = [import_object(path) for path in args.startup]
    server = None
    if getattr(args, "metrics_port", None) is not None:
        from taskiq_beat.metrics import serve_metrics

        server = serve_metrics(scheduler_app, args.metrics_port)
        logger.info("serving Prometheus metrics on port %d", args.metrics_port)
    runner = SchedulerRunner(
        scheduler_app, startup_hooks=hooks, manage_broker=not args.skip_broker_lifespan
    )
    try:
        asyncio.run(runner.run())
    finally:
        if server is not None:
            server.shutdown()
    return 0


class SchedulerRunnerCli:
    """taskiq-beat 1.4's command-line entry of the scheduler process (``taskiq-beat-scheduler``),
    over the same arguments as ``taskiq-beat run``."""

    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        """The parser of ``taskiq-beat-scheduler``."""
        parser = argparse.ArgumentParser(
            prog="taskiq-beat-scheduler", description="Run a taskiq-beat scheduler process."
        )
        add_run_arguments(parser)
        return parser

    @classmethod
    def build_runner(cls, argv: Sequence[str] | None = None) -> SchedulerRunner:
        """Parse ``argv`` and import the app and its hooks (``--metrics-port`` is served by
        :meth:`main` only)."""
        args = cls.build_parser().parse_args(argv)
        return SchedulerRunner(
            load_scheduler_app(args.scheduler_app),
            startup_hooks=[import_object(path) for path in args.startup],
            manage_broker=not args.skip_broker_lifespan,
        )

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> int:
        """Run the scheduler process described by ``argv``."""
        return run_command(cls.build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``taskiq-beat-scheduler`` and ``python -m taskiq_beat.scheduler_runner``."""
    return SchedulerRunnerCli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
