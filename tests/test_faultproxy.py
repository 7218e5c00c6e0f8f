"""The fault-injecting proxy of :mod:`tests.faultproxy`: on a small echo server, then between
real clients (SQLAlchemy with asyncpg, redis-py) and real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.faultproxy import FaultProxy
from tests.processes import free_port, redis_url_or_skip, wait_until
from tests.utils import PG_HOST, PG_PORT, PG_USER, postgres_unavailable

# Bounds for things that happen at once on the loopback interface, and the wait that shows
# that something does not happen (a blackhole).
PROMPT = 2.0
SILENCE = 0.2
TRAILER = b"<eof>"
POSTGRES_URL = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"


class EchoServer:
    """Echoes every byte; on the client's EOF, writes :data:`TRAILER` and closes."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            writer.write(TRAILER)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port, name="echo proxy") as proxy:
        yield proxy


class Client:
    """A client connection to the proxy, closed by :func:`connect`'s block."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def roundtrip(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), PROMPT)

    async def assert_silent(self, proxy: FaultProxy) -> None:
        """Data sent gets no answer within :data:`SILENCE` (the link is held, not closed)."""
        self.writer.write(b"anyone?")
        await self.writer.drain()
        try:
            data = await asyncio.wait_for(self.reader.read(100), SILENCE)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"expected silence, read {data!r}; {proxy.stats.describe()}")

    async def assert_dropped(self, proxy: FaultProxy) -> None:
        """The connection ends at once: EOF or a reset."""
        try:
            data = await asyncio.wait_for(self.reader.read(100), PROMPT)
        except ConnectionError:
            return
        except asyncio.TimeoutError:
            raise AssertionError(
                f"connection still open after {PROMPT} s; {proxy.stats.describe()}"
            ) from None
        assert data == b"", f"expected EOF, read {data!r}; {proxy.stats.describe()}"


@contextlib.asynccontextmanager
async def connect(proxy: FaultProxy) -> AsyncIterator[Client]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*proxy.address()), PROMPT)
    try:
        yield Client(reader, writer)
    finally:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def assert_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ConnectionRefusedError):
        async with connect(proxy):
            pass


# ---------------------------------------------------------------------- basic behaviours


async def test_forwards_both_ways_and_counts(proxy: FaultProxy, echo: EchoServer) -> None:
    async with connect(proxy) as client:
        assert await client.roundtrip(b"hello") == b"hello"
        assert await client.roundtrip(b"again") == b"again"
    assert (proxy.stats.accepted, proxy.stats.forwarded) == (1, 1), proxy.stats.describe()
    assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (10, 10), proxy.stats.describe()
    assert echo.received == 10


async def test_large_payload_both_ways(proxy: FaultProxy) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    async with connect(proxy) as client:

        async def send() -> None:
            client.writer.write(payload)
            await client.writer.drain()

        _, echoed = await asyncio.wait_for(
            asyncio.gather(send(), client.reader.readexactly(len(payload))), 10
        )
    assert echoed == payload
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)


async def test_half_close_passes_eof_and_keeps_the_other_direction(proxy: FaultProxy) -> None:
    async with connect(proxy) as client:
        client.writer.write(b"last words")
        client.writer.write_eof()
        # The echo server only writes the trailer after it saw our EOF through the proxy.
        reply = await asyncio.wait_for(client.reader.read(), PROMPT)
    assert reply == b"last words" + TRAILER


async def test_refuse_drops_open_connections_and_refuses_new(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    port = proxy.port
    async with connect(proxy) as client:
        assert await client.roundtrip(b"ping") == b"ping"
        await proxy.cut("refuse")
        await client.assert_dropped(proxy)
        await assert_refused(proxy)
    # The upstream side was aborted too.
    await wait_until(lambda: echo.open_connections == 0, PROMPT, message="upstream still open")
    assert proxy.stats.aborted == 1, proxy.stats.describe()

    await proxy.restore()
    assert proxy.port == port
    async with connect(proxy) as client:
        assert await client.roundtrip(b"back") == b"back"


async def test_blackhole_holds_connections_until_restore(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy) as old:
        assert await old.roundtrip(b"ping") == b"ping"
        await proxy.cut("blackhole")
        await old.assert_silent(proxy)
        async with connect(proxy) as new:  # accepted...
            await new.assert_silent(proxy)  # ...but never forwarded
            assert echo.connections == 1
            assert echo.open_connections == 1  # the old link's upstream side stays open
            assert proxy.stats.blackholed == 2, proxy.stats.describe()

            await proxy.restore()
            await old.assert_dropped(proxy)
            await new.assert_dropped(proxy)
    assert echo.received == len(b"ping")
    async with connect(proxy) as client:
        assert await client.roundtrip(b"back") == b"back"


async def test_cut_modes_can_follow_each_other(proxy: FaultProxy) -> None:
    async with connect(proxy) as client:
        await proxy.cut("blackhole")
        await client.assert_silent(proxy)
        await proxy.cut("refuse")
        await client.assert_dropped(proxy)
    await assert_refused(proxy)
    await proxy.cut("blackhole")
    async with connect(proxy) as client:
        await client.assert_silent(proxy)
    await proxy.restore()
    async with connect(proxy) as client:
        assert await client.roundtrip(b"back") == b"back"


async def test_outage_lasts_its_duration_then_restores(proxy: FaultProxy) -> None:
    began = time.monotonic()
    async with proxy.outage(0.3):
        await assert_refused(proxy)
    elapsed = time.monotonic() - began
    assert 0.3 <= elapsed < 0.3 + PROMPT, elapsed
    async with connect(proxy) as client:
        assert await client.roundtrip(b"back") == b"back"
    events = [event for _, event in proxy.stats.events]
    assert events == ["start", "cut refuse", "restore"], proxy.stats.describe()


async def test_outage_restores_at_once_on_error(proxy: FaultProxy) -> None:
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="body failed"):
        async with proxy.outage(30, mode="blackhole"):
            raise RuntimeError("body failed")
    assert time.monotonic() - began < PROMPT
    async with connect(proxy) as client:
        assert await client.roundtrip(b"back") == b"back"


async def test_unreachable_upstream_drops_the_client() -> None:
    async with FaultProxy("127.0.0.1", free_port(), name="nowhere") as proxy:
        async with connect(proxy) as client:
            await client.assert_dropped(proxy)
        await wait_until(lambda: proxy.stats.upstream_failures == 1, PROMPT)
        assert proxy.stats.forwarded == 0


async def test_close_aborts_everything_and_leaves_no_task(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy) as forwarding:
        assert await forwarding.roundtrip(b"ping") == b"ping"
        await proxy.cut("blackhole")
        async with connect(proxy) as held:
            await proxy.close()
            await forwarding.assert_dropped(proxy)
            await held.assert_dropped(proxy)
    await proxy.close()  # idempotent
    await wait_until(lambda: echo.open_connections == 0, PROMPT, message="upstream still open")
    await wait_until(
        lambda: asyncio.all_tasks() == {asyncio.current_task()},
        PROMPT,
        message="tasks left running",
        details=lambda: repr(asyncio.all_tasks()),
    )
    await assert_refused(proxy)


@pytest.mark.parametrize(
    ("upstream_port", "url", "expected"),
    [
        pytest.param(
            5432,
            "postgresql+asyncpg://postgres@127.0.0.1:5432/db",
            "postgresql+asyncpg://postgres@127.0.0.1:15432/db",
            id="sqlalchemy",
        ),
        pytest.param(
            5432,
            "postgresql://user:p%40ss@localhost:5432/db?sslmode=disable",
            "postgresql://user:p%40ss@127.0.0.1:15432/db?sslmode=disable",
            id="password_and_query",
        ),
        pytest.param(6379, "redis://127.0.0.1:6379/0", "redis://127.0.0.1:15432/0", id="redis"),
        pytest.param(6379, "redis://cache.internal/0", "redis://127.0.0.1:15432/0", id="no_port"),
    ],
)
def test_rewrite_url(upstream_port: int, url: str, expected: str) -> None:
    proxy = FaultProxy("127.0.0.1", upstream_port, port=15432)  # a given port: no start needed
    assert proxy.rewrite_url(url) == expected


def test_rewrite_url_refuses_another_servers_url() -> None:
    proxy = FaultProxy("127.0.0.1", 5432, port=15432)
    with pytest.raises(ValueError, match="port 6379"):
        proxy.rewrite_url("redis://127.0.0.1:6379/0")


# ---------------------------------------------------------------------- real servers


async def test_postgres_through_the_proxy() -> None:
    direct = create_async_engine(POSTGRES_URL, connect_args={"timeout": PROMPT})
    try:
        async with direct.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (DBAPIError, OSError, asyncio.TimeoutError) as exc:
        postgres_unavailable(exc)
    finally:
        await direct.dispose()

    async with FaultProxy(PG_HOST, PG_PORT, name="pg proxy") as proxy:
        url = proxy.rewrite_url(POSTGRES_URL)
        engine = create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": PROMPT})
        try:

            async def select_one() -> object:
                async with engine.connect() as conn:
                    return (await conn.execute(text("SELECT 1"))).scalar_one()

            assert await select_one() == 1
            await proxy.cut("refuse")
            with pytest.raises((DBAPIError, OSError)):
                await asyncio.wait_for(select_one(), PROMPT)
            await proxy.restore()
            assert await asyncio.wait_for(select_one(), PROMPT) == 1, proxy.stats.describe()
            assert proxy.stats.aborted == 1, proxy.stats.describe()
        finally:
            await engine.dispose()


async def test_redis_through_the_proxy() -> None:
    url = redis_url_or_skip()
    upstream = urlsplit(url)
    assert upstream.hostname is not None
    async with FaultProxy(upstream.hostname, upstream.port or 6379, name="redis proxy") as proxy:
        client = redis.asyncio.Redis.from_url(
            proxy.rewrite_url(url),
            socket_connect_timeout=PROMPT,
            socket_timeout=SILENCE,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            assert await client.ping()
            await proxy.cut("refuse")
            with pytest.raises((RedisError, OSError)):
                await client.ping()
            await proxy.restore()
            assert await client.ping(), proxy.stats.describe()

            await proxy.cut("blackhole")
            with pytest.raises(RedisError, match="Timeout"):
                await client.ping()
            await proxy.restore()
            assert await client.ping(), proxy.stats.describe()
        finally:
            await client.aclose()
