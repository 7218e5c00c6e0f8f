"""A fault-injecting TCP proxy for reliability tests: cut a database or Redis away on demand.

:class:`FaultProxy` listens on a local port and forwards every connection to one upstream
server (PostgreSQL, Redis...). It runs in the test's event loop; the clients are usually
other processes (schedulers) given :meth:`FaultProxy.rewrite_url` of their database URL.
A test then cuts the link in one of two ways:

- ``"refuse"``: the proxy stops listening, so new connects fail with ``ECONNREFUSED``, and
  every open connection is aborted (RST) on both sides: clients notice at once.
- ``"blackhole"``: the proxy keeps accepting, but forwards nothing in either direction, on
  new and open connections alike: clients hang until their own timeouts fire.

:meth:`FaultProxy.restore` forwards again on the same port (blackholed connections are
aborted then), and :meth:`FaultProxy.outage` does cut, wait, restore as one block.
:attr:`FaultProxy.stats` counts connections and bytes and records when each outage began
and ended: put :meth:`ProxyStats.describe` in assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["CutMode", "FaultProxy", "ProxyStats"]

CutMode = Literal["refuse", "blackhole"]

_CHUNK = 65536


@dataclass
class ProxyStats:
    """What a proxy did, for assertions and failure messages."""

    accepted: int = 0
    """Client connections accepted (forwarded or blackholed)."""
    forwarded: int = 0
    """Accepted connections that reached the upstream server."""
    upstream_failures: int = 0
    """Accepted connections dropped because the upstream server could not be reached."""
    aborted: int = 0
    """Open connections aborted by a cut, a restore (blackholed ones) or :meth:`close`."""
    blackholed: int = 0
    """Connections that a blackhole held: accepted during one, or open when it began."""
    bytes_up: int = 0
    """Bytes forwarded from clients to the upstream server."""
    bytes_down: int = 0
    """Bytes forwarded from the upstream server to clients."""
    events: list[tuple[float, str]] = field(default_factory=list)
    """``(time.monotonic(), event)``: ``"cut refuse"``, ``"cut blackhole"``, ``"restore"``..."""

    def describe(self) -> str:
        start = self.events[0][0] if self.events else 0.0
        timeline = ", ".join(f"{event} at +{at - start:.3f}s" for at, event in self.events)
        return (
            f"accepted {self.accepted}, forwarded {self.forwarded}, upstream failures "
            f"{self.upstream_failures}, aborted {self.aborted}, blackholed {self.blackholed}, "
            f"bytes up {self.bytes_up}, down {self.bytes_down}; events: {timeline or 'none'}"
        )


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped = False  # set by a cut: forwarding must not (re)start
        self.blackholed = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def abort(self) -> None:
        for writer in self.writers():
            writer.transport.abort()

    async def wait_closed(self) -> None:
        for writer in self.writers():
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class FaultProxy:
    """Forwards TCP connections to ``upstream_host:upstream_port`` until told to fail.

    Use it as an async context manager (start, then close), or call :meth:`start` and
    :meth:`close`. ``port=0`` picks a free port at the first start; it is kept across outages.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "proxy",
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.name = name
        self.connect_timeout = connect_timeout
        self.stats = ProxyStats()
        self.mode: Literal["forward", "refuse", "blackhole", "closed"] = "forward"
        self._port = port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._started = False

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.name} {self.host}:{self._port} -> "
            f"{self.upstream_host}:{self.upstream_port} ({self.mode})>"
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen and forward (once)."""
        if self._started:
            raise RuntimeError(f"{self!r} was started already")
        self._started = True
        await self._listen()
        self._event("start")

    async def close(self) -> None:
        """Stop listening and abort every connection (idempotent)."""
        if self.mode == "closed":
            return
        self.mode = "closed"
        self._stop_listening()
        await self._drop_links(list(self._links))
        self._event("close")

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{self!r} is not started: no port yet")
        return self._port

    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ------------------------------------------------------------------ faults

    async def cut(self, mode: CutMode = "refuse") -> None:
        """Stop forwarding, as ``mode`` says (see the module docstring); any mode may follow
        any other (a blackhole then a refuse, for instance)."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"unknown cut mode {mode!r}: 'refuse' or 'blackhole'")
        self._check_open()
        self.mode = mode
        self._event(f"cut {mode}")
        links = list(self._links)
        if mode == "refuse":
            self._stop_listening()
            await self._drop_links(links)
            return
        await self._listen()  # after a refuse
        await self._stop_forwarding(links)
        for link in links:
            if not link.blackholed:
                link.blackholed = True
                self.stats.blackholed += 1

    async def restore(self) -> None:
        """Forward again, on the same port; connections held by a blackhole are aborted."""
        self._check_open()
        self.mode = "forward"
        self._event("restore")
        await self._drop_links([link for link in self._links if link.blackholed])
        await self._listen()

    @contextlib.asynccontextmanager
    async def outage(self, seconds: float, mode: CutMode = "refuse") -> AsyncIterator[None]:
        """Cut for the block, and for at least ``seconds`` in all; restore after it, on error
        too (without waiting out the rest then)."""
        began = time.monotonic()
        await self.cut(mode)
        try:
            yield
            remaining = seconds - (time.monotonic() - began)
            if remaining > 0:
                await asyncio.sleep(remaining)
        finally:
            await self.restore()

    def rewrite_url(self, url: str) -> str:
        """``url`` (a SQLAlchemy database URL, a Redis URL...) pointed at this proxy: only its
        host and port change.

        :raises ValueError: if the URL names a port other than the upstream port (a URL of
            another server).
        """
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in URL {url!r}")
        if parts.port is not None and parts.port != self.upstream_port:
            raise ValueError(
                f"URL {url!r} is for port {parts.port}, not this proxy's upstream "
                f"{self.upstream_host}:{self.upstream_port}"
            )
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{self.port}"))

    # ------------------------------------------------------------------ internals

    def _event(self, event: str) -> None:
        self.stats.events.append((time.monotonic(), event))

    def _check_open(self) -> None:
        if not self._started or self.mode == "closed":
            raise RuntimeError(f"{self!r} is not running")

    async def _listen(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self._port, reuse_address=True
            )
        except OSError as exc:
            raise AssertionError(
                f"{self!r} cannot listen on {self.host}:{self._port}: {exc}"
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])

    def _stop_listening(self) -> None:
        # Closing the server closes the listening socket at once: the port refuses connects.
        # Connections it accepted are ours to handle.
        if self._server is not None:
            self._server.close()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        self.stats.accepted += 1
        if self.mode == "blackhole":
            link.blackholed = True  # never read: the client's bytes stay in buffers
            self.stats.blackholed += 1
        elif self.mode == "forward":
            link.task = asyncio.create_task(
                self._forward(link, reader), name=f"{self.name} link {self.stats.accepted}"
            )
        else:  # accepted just before the listening socket closed
            link.abort()
            self._links.discard(link)

    async def _forward(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError):
            self.stats.upstream_failures += 1
            link.abort()
            self._links.discard(link)
            return
        link.upstream = upstream
        if link.stopped:  # cut while connecting (wait_for may have swallowed the cancel)
            return
        self.stats.forwarded += 1
        await asyncio.gather(
            self._pump(link, client_reader, upstream, "up"),
            self._pump(link, upstream_reader, link.client, "down"),
        )
        for writer in link.writers():
            writer.close()
        self._links.discard(link)
        await link.wait_closed()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        """Copy one direction until EOF, then pass the EOF on (a half-close); on an error of
        either side, abort both so that both peers see it."""
        try:
            while data := await reader.read(_CHUNK):
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except OSError:  # a reset, a write after the peer closed...
            link.abort()

    async def _stop_forwarding(self, links: list[_Link]) -> None:
        """Cancel the forwarding tasks of ``links`` and wait for them; sockets stay open."""
        tasks = []
        for link in links:
            link.stopped = True
            if link.task is not None and not link.task.done():
                link.task.cancel()
                tasks.append(link.task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drop_links(self, links: list[_Link]) -> None:
        await self._stop_forwarding(links)
        links = [link for link in links if link in self._links]  # not finished meanwhile
        for link in links:
            self._links.discard(link)
            if not link.client.transport.is_closing():
                self.stats.aborted += 1
            link.abort()
        for link in links:
            await link.wait_closed()
