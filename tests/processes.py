"""Helpers for tests that run real processes: start, watch, signal and always clean up.

- :class:`ManagedProcess` runs a command in its own process group (session), reads its stdout
  and stderr continuously into memory (and optionally a log file) so that pipes never fill,
  and lets a test wait for output, send signals, terminate or kill it, with every wait
  bounded. Used as an async context manager, it kills whatever is left of the process tree
  on exit.
- :func:`run_process` runs a short command to completion (a CLI call) with a deadline.
- :func:`wait_until` polls a condition (sync or async) until a deadline.
- :func:`redis_url_or_skip` and :func:`free_port` help with services.

Every failure raises ``AssertionError`` with the output of the processes involved, so that a
CI log says what the processes were doing.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar, overload

import pytest

from tests.utils import IN_CI

__all__ = [
    "PYTHON",
    "REDIS_URL_ENV",
    "ManagedProcess",
    "ProcessResult",
    "describe",
    "free_port",
    "redis_url_or_skip",
    "run_process",
    "wait_until",
]

PYTHON = sys.executable
"""The interpreter running the tests (the virtualenv's): start Python processes with it."""

REDIS_URL_ENV = "TASKIQ_BEAT_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_POLL_SECONDS = 0.02
_KILL_WAIT_SECONDS = 10.0
_READER_DRAIN_SECONDS = 5.0
_DESCRIBE_TAIL_CHARS = 30_000

T = TypeVar("T")


class _Capture:
    """Reads one pipe until EOF, appending to the process's buffers as data arrives."""

    def __init__(self, owner: ManagedProcess, stream: asyncio.StreamReader, label: str) -> None:
        self._owner = owner
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.task = asyncio.create_task(self._read(), name=f"capture {owner.name} {label}")

    async def _read(self) -> None:
        while True:
            chunk = await self._stream.read(65536)
            text = self._decoder.decode(chunk, final=not chunk)
            if text:
                self.text += text
                self._owner._append(text)
            if not chunk:
                return


class ManagedProcess:
    """A subprocess whose output is captured continuously and whose lifetime is bounded.

    ``args`` is the full command (``[PYTHON, "-m", ...]``). ``env`` is added to this process's
    environment (``PYTHONUNBUFFERED=1`` is set too, so Python children show output at once).
    With ``log_dir``, the output is also written to ``log_dir/<name>.log`` (``<name>-2.log``
    for a second process of the same name, and so on).

    The process starts in a new session, so :meth:`kill` and the cleanup reach the processes
    it started too (a ``taskiq worker`` forks its workers). ``output`` holds stdout and stderr
    interleaved as they arrived; ``stdout`` and ``stderr`` hold each stream alone.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not args:
            raise ValueError("args must not be empty")
        self.args = [str(arg) for arg in args]
        self.name = name or Path(self.args[0]).name
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_path: Path | None = None
        self._log: IO[str] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._captures: list[_Capture] = []
        self._output = ""
        self._changed = asyncio.Event()
        self.started_at: float | None = None
        self.killed = False
        """Whether the process was SIGKILLed while running (by :meth:`kill`, by
        :meth:`terminate` after its timeout, or by the cleanup)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> ManagedProcess:
        """Start the process and its output readers (once)."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} was started already")
        self._open_log()
        self._process = await asyncio.create_subprocess_exec(
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        self._captures = [
            _Capture(self, self._process.stdout, "stdout"),
            _Capture(self, self._process.stderr, "stderr"),
        ]
        return self

    async def __aenter__(self) -> ManagedProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.cleanup()

    async def cleanup(self) -> None:
        """Kill what is left of the process tree, drain the pipes, close the log (idempotent)."""
        try:
            if self._process is not None:
                if self.returncode is None:
                    await self.kill()
                else:
                    self._signal_group(signal.SIGKILL)  # children left behind, if any
                await self.drain()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), ``None`` while it runs."""
        return None if self._process is None else self._process.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def output(self) -> str:
        """Everything the process wrote so far, stdout and stderr interleaved."""
        return self._output

    @property
    def stdout(self) -> str:
        return self._captures[0].text if self._captures else ""

    @property
    def stderr(self) -> str:
        return self._captures[1].text if self._captures else ""

    def mark(self) -> int:
        """The current length of :attr:`output`: pass it as ``since`` to see only new output."""
        return len(self._output)

    def describe(self, tail: int = _DESCRIBE_TAIL_CHARS) -> str:
        """A block for assertion messages: the command, its state and its last output."""
        if self._process is None:
            state = "not started"
        elif self.returncode is None:
            state = f"pid {self.pid}, running"
        else:
            state = f"pid {self.pid}, exit code {self.returncode}"
        text = self._output
        if len(text) > tail:
            text = f"[... {len(text) - tail} characters cut ...]\n" + text[-tail:]
        log = f", log {self.log_path}" if self.log_path else ""
        return (
            f"----- {self.name} ({state}{log}): {' '.join(self.args)}\n"
            f"{text.rstrip()}\n----- end of {self.name}"
        )

    # ------------------------------------------------------------------ waiting

    async def wait_for_output(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        *,
        since: int = 0,
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regular expression) matches the output after ``since``.

        :raises AssertionError: on timeout, or when the process closed its output without a
            match; the message holds the output.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._changed.clear()
            match = regex.search(self._output, since)
            if match is not None:
                return match
            if self._process is not None and self.returncode is not None and self._eof():
                raise AssertionError(
                    f"{self.name} exited (code {self.returncode}) without printing "
                    f"{regex.pattern!r}\n{self.describe()}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.name} did not print {regex.pattern!r} within {timeout} s\n"
                    f"{self.describe()}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                # Wake on new output, and at least every half second to notice an exit.
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; return its exit code.

        :raises AssertionError: if it still runs after ``timeout`` seconds (it is left
            running: the caller decides, and the cleanup kills it).
        """
        code = await self._wait_exit(timeout)
        if code is None:
            raise AssertionError(f"{self.name} did not exit within {timeout} s\n{self.describe()}")
        return code

    async def drain(self, timeout: float = _READER_DRAIN_SECONDS) -> None:
        """After the exit, wait (at most ``timeout`` seconds) until all output is read.

        The exit code can be known before the last output arrives. Pipes still held open
        after ``timeout`` (by a process that left the group) are closed.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is still running: drain() comes after its exit")
        tasks = [capture.task for capture in self._captures]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pending and self._process is not None:
            # Something outside the process group still holds a pipe: close our ends, or the
            # transport would be left open (a ResourceWarning, an error under this suite).
            transport = getattr(self._process, "_transport", None)
            if transport is not None:
                transport.close()
        if self._process is not None and self._process.returncode is not None:
            # Let the transport finish (it waits for both the exit and the pipes).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout)

    # ------------------------------------------------------------------ signals

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the process (or its whole process group); no-op once it exited."""
        process = self._started()
        if process.returncode is not None:
            return
        if group:
            self._signal_group(sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def terminate(self, timeout: float = 10.0, *, group: bool = False) -> int:
        """SIGTERM, then SIGKILL to the whole group if it has not exited after ``timeout``.

        Returns the exit code: ``-signal.SIGKILL`` tells that it had to be killed (and
        :attr:`killed` is set).
        """
        self.send_signal(signal.SIGTERM, group=group)
        code = await self._wait_exit(timeout)
        if code is None:
            return await self.kill()
        return code

    async def kill(self, *, group: bool = True) -> int:
        """SIGKILL the process (by default with everything in its process group); return the
        exit code once it is reaped.

        :raises AssertionError: if it is still not reaped after a few seconds.
        """
        process = self._started()
        if process.returncode is None:
            self.killed = True
            if group:
                self._signal_group(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        return await self.wait(_KILL_WAIT_SECONDS)

    # ------------------------------------------------------------------ internals

    def _started(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._process

    def _signal_group(self, sig: int) -> None:
        # The process leads its own session, so its group id is its pid. While it is unreaped
        # that id cannot be reused; after that, only processes it started can still hold it.
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)

    async def _wait_exit(self, timeout: float) -> int | None:
        # Poll the return code: ``Process.wait()`` also waits for the pipes to close, which
        # never happens while a grandchild holds them.
        process = self._started()
        deadline = time.monotonic() + timeout
        while process.returncode is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
        return process.returncode

    def _eof(self) -> bool:
        return all(capture.task.done() for capture in self._captures)

    def _append(self, text: str) -> None:
        self._output += text
        if self._log is not None:
            self._log.write(text)
            self._log.flush()
        self._changed.set()

    def _open_log(self) -> None:
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{self.name}.log"
        number = 1
        while path.exists():
            number += 1
            path = self.log_dir / f"{self.name}-{number}.log"
        self.log_path = path
        self._log = path.open("w", encoding="utf-8")


def describe(*processes: ManagedProcess, tail: int = _DESCRIBE_TAIL_CHARS) -> str:
    """The :meth:`ManagedProcess.describe` blocks of several processes, for a message."""
    return "\n".join(process.describe(tail) for process in processes)


@dataclass(frozen=True)
class ProcessResult:
    """A finished short command."""

    returncode: int
    stdout: str
    stderr: str
    output: str
    description: str
    """The :meth:`ManagedProcess.describe` block, for assertion messages."""


async def run_process(
    args: Sequence[str],
    *,
    timeout: float,
    name: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> ProcessResult:
    """Run a command to completion within ``timeout`` seconds.

    :raises AssertionError: if it does not finish in time (it is killed), or with ``check``
        if it exits with a non-zero code; the message holds its output.
    """
    async with ManagedProcess(args, name=name, cwd=cwd, env=env, log_dir=log_dir) as process:
        code = await process.wait(timeout)
        await process.drain()
        result = ProcessResult(
            code, process.stdout, process.stderr, process.output, process.describe()
        )
    if check and code != 0:
        raise AssertionError(f"{process.name} failed with exit code {code}\n{result.description}")
    return result


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    *,
    interval: float = ...,
    message: str = ...,
    details: Callable[[], str] | None = ...,
    watch: Sequence[ManagedProcess] = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = ...,
    message: str = ...,
    details: Callable[[], str] | None = ...,
    watch: Sequence[ManagedProcess] = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str = "condition not met",
    details: Callable[[], str] | None = None,
    watch: Sequence[ManagedProcess] = (),
) -> Any:
    """Call ``predicate`` (sync or async) every ``interval`` seconds until it returns a truthy
    value, and return that value.

    :param details: called on failure; its text is added to the message (process output,
        the state that was polled...).
    :param watch: processes that must keep running meanwhile: if one exits, fail at once.
    :raises AssertionError: after ``timeout`` seconds, with ``message`` and the details.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        dead = [process for process in watch if not process.running]
        if dead:
            names = ", ".join(f"{p.name} (exit code {p.returncode})" for p in dead)
            raise AssertionError(f"{message}: {names} exited meanwhile\n{_details(details)}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout} s)\n{_details(details)}")
        await asyncio.sleep(interval)


def _details(details: Callable[[], str] | None) -> str:
    if details is None:
        return ""
    try:
        return details()
    except Exception as exc:  # the failure to report matters more than this one
        return f"(details unavailable: {type(exc).__name__}: {exc})"


def redis_url_or_skip(timeout: float = 2.0) -> str:
    """The Redis URL to test against (``$TASKIQ_BEAT_REDIS_URL``, default local Redis).

    Outside CI the test is skipped when Redis does not answer a PING; under CI (``CI=true``)
    it fails, since CI must provide Redis. Usable from a sync fixture.
    """
    import redis

    url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        reason = f"Redis not reachable at {url}: {type(exc).__name__}: {exc}"
        if IN_CI:
            pytest.fail(f"Redis is required under CI but unreachable: {reason}")
        pytest.skip(reason)
    finally:
        client.close()
    return url


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may take it before you do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
