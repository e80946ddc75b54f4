"""Servers and connections for the client tests.

The session's shared ``redis_server`` serves the ordinary tests (each uses keys of its
own); tests that disturb a server (SCRIPT FLUSH, CLIENT PAUSE, DEBUG SLEEP, SIGKILL,
restart) get a private one, started with ``tests.redis.server.start_server``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from bus.redis._client import Connection, open_connection
from tests.redis.server import RedisServer, start_server


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def key() -> str:
    """A key prefix of this test's own on the shared server."""
    return f"rc:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def conn(url: str) -> AsyncIterator[Connection]:
    async with open_connection(url, name="client-test") as connection:
        yield connection


@pytest.fixture
async def other(url: str) -> AsyncIterator[Connection]:
    """A second connection (to watch or disturb the first)."""
    async with open_connection(url, name="client-test-other") as connection:
        yield connection


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server of this test (DEBUG enabled), stopped at the end."""
    server = start_server(tmp_path, extra_args=("--enable-debug-command", "yes"))
    try:
        yield server
    finally:
        server.stop()


async def wait_blocked(watcher: Connection, count: int = 1) -> None:
    """Wait until the server reports ``count`` clients blocked (BLPOP and the like):
    a condition polled under the test's deadline, not a guess at a duration."""
    while True:
        info = await watcher.execute("INFO", "clients")
        for line in info.decode().splitlines():
            if line.startswith("blocked_clients:") and int(line.split(":")[1]) >= count:
                return
        await trio.sleep(0.005)


async def all_parked() -> None:
    """Every task is blocked (our callers parked, the reader waiting for data)."""
    await trio.testing.wait_all_tasks_blocked()


async def one_peer(
    behaviour: Callable[[trio.SocketStream], Awaitable[None]],
    task_status: trio.TaskStatus[int],
) -> None:
    """A one-connection TCP peer on a free port (started: the port) that talks as
    ``behaviour(stream)`` says: a misbehaving or scripted server."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        task_status.started(listeners[0].socket.getsockname()[1])
        stream = await listeners[0].accept()
        async with stream:
            await behaviour(stream)


async def caller_reads(conn: Connection) -> int:
    """Send PINGs until one is read by its caller (caller-read mode: the reader was
    not watching the socket, which depends on the scheduler's order, one chance in two
    a command). The calling task's next command, sent before it awaits anything else,
    is read by its caller too. Returns ``conn.stats.own_reads`` then."""
    for _ in range(64):
        before = conn.stats.own_reads
        assert await conn.execute("PING") == b"PONG"
        if conn.stats.own_reads > before:
            return conn.stats.own_reads
    raise AssertionError("no command was read by its caller in 64")
