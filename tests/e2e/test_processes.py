"""The process helpers of :mod:`tests.processes`, on small Python child processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.processes import PYTHON, ManagedProcess, free_port, run_process, wait_until


def python(code: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(code)]


SLEEPER = python(
    """
    import sys, time
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    print("ready", flush=True)
    time.sleep(60)
    """
)


async def test_captures_both_streams_and_writes_a_log(tmp_path: Path) -> None:
    async with ManagedProcess(SLEEPER, name="sleeper", log_dir=tmp_path) as process:
        await process.wait_for_output("ready", 10)
        assert "to stdout" in process.stdout
        assert "to stderr" in process.stderr
        assert "to stderr" not in process.stdout
        assert process.running
        code = await process.terminate(5)
    assert code == -signal.SIGTERM
    assert not process.killed
    assert process.log_path == tmp_path / "sleeper.log"
    assert "to stdout" in process.log_path.read_text()
    async with ManagedProcess(python("print('again')"), name="sleeper", log_dir=tmp_path) as again:
        await again.wait(10)
    assert again.log_path == tmp_path / "sleeper-2.log"


async def test_wait_for_output_since_a_mark() -> None:
    code = """
        import time
        print("tick 1", flush=True)
        time.sleep(0.3)
        print("tick 2", flush=True)
        time.sleep(60)
    """
    async with ManagedProcess(python(code), name="ticker") as process:
        await process.wait_for_output(r"tick 1\n", 10)
        mark = process.mark()
        match = await process.wait_for_output(r"tick \d", 10, since=mark)
        assert match.group() == "tick 2"


async def test_large_output_never_blocks_the_child() -> None:
    code = """
        import sys
        sys.stdout.write("x" * 4_000_000)
        sys.stderr.write("y" * 4_000_000)
        print("done", flush=True)
    """
    async with ManagedProcess(python(code), name="chatty") as process:
        await process.wait_for_output("done", 20)
        assert await process.wait(10) == 0
    assert len(process.stdout) == 4_000_000 + len("done\n")
    assert len(process.stderr) == 4_000_000


async def test_wait_for_output_fails_with_the_output() -> None:
    async with ManagedProcess(python("print('something else')"), name="quitter") as process:
        with pytest.raises(AssertionError, match="exited") as failure:
            await process.wait_for_output("never printed", 10)
    assert "something else" in str(failure.value)

    async with ManagedProcess(SLEEPER, name="sleeper") as process:
        await process.wait_for_output("ready", 10)
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"within 0\.3 s") as failure:
            await process.wait_for_output("never printed", 0.3)
        assert time.monotonic() - started < 2
        assert "ready" in str(failure.value)


async def test_terminate_kills_what_ignores_sigterm() -> None:
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """
    async with ManagedProcess(python(code), name="stubborn") as process:
        await process.wait_for_output("ready", 10)
        started = time.monotonic()
        assert await process.terminate(0.3) == -signal.SIGKILL
        assert process.killed
        assert time.monotonic() - started < 5


def _is_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_cleanup_kills_the_processes_it_started() -> None:
    code = f"""
        import subprocess, sys, time
        child = subprocess.Popen([{PYTHON!r}, "-c", "import time; time.sleep(60)"])
        print("child", child.pid, flush=True)
        time.sleep(60)
    """
    async with ManagedProcess(python(code), name="parent") as process:
        match = await process.wait_for_output(r"child (\d+)", 10)
        child = int(match.group(1))
        assert not _is_gone(child)
    assert process.killed
    # -SIGKILL, or 255 when asyncio's child watcher finds the pid already reaped ("Unknown
    # child process pid ..., will report returncode 255"), seen once under the full suite.
    assert process.returncode in (-signal.SIGKILL, 255)
    await wait_until(lambda: _is_gone(child), 5, message=f"grandchild {child} survived")


async def test_run_process() -> None:
    result = await run_process(
        python("import sys; print('out'); print('err', file=sys.stderr)"), timeout=10
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    with pytest.raises(AssertionError, match="exit code 3") as failure:
        await run_process(python("print('why'); raise SystemExit(3)"), timeout=10)
    assert "why" in str(failure.value)
    unchecked = await run_process(python("raise SystemExit(3)"), timeout=10, check=False)
    assert unchecked.returncode == 3
    with pytest.raises(AssertionError, match="did not exit within"):
        await run_process(python("import time; time.sleep(60)"), timeout=0.3)


async def test_wait_until() -> None:
    calls: list[int] = []

    def sync_predicate() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await wait_until(sync_predicate, 5, interval=0.01) == 3

    async def async_predicate() -> str:
        await asyncio.sleep(0)
        return "yes"

    assert await wait_until(async_predicate, 5) == "yes"

    with pytest.raises(AssertionError, match=r"never \(waited 0\.1 s\)\nthe details"):
        await wait_until(lambda: False, 0.1, message="never", details=lambda: "the details")

    async with ManagedProcess(python("print('bye')"), name="short") as process:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"short \(exit code 0\) exited meanwhile"):
            await wait_until(lambda: False, 30, message="waiting", watch=[process])
        assert time.monotonic() - started < 10


def test_free_port() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
