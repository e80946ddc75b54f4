"""Lost connections: killed servers, CLIENT KILL, CLIENT PAUSE, restarts, bad peers."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import pytest
import trio

from bus.redis._client import (
    Connection,
    ConnectionLost,
    RedisTimeout,
    open_connection,
)
from tests.redis.server import RedisServer
from tests.redisclient.conftest import all_parked, one_peer, wait_blocked

pytestmark = pytest.mark.redis


async def _run_expecting_loss(conn: Connection, task_status: trio.TaskStatus[None]) -> None:
    """An owner's supervision in miniature: run() must end with ConnectionLost."""
    with pytest.raises(ConnectionLost):
        await conn.run(task_status=task_status)


async def test_server_killed_with_commands_in_flight(own_server: RedisServer) -> None:
    with trio.fail_after(15):
        conn = await Connection.connect(own_server.url)
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_expecting_loss, conn)
            blocked = conn.submit([("BLPOP", "k", 0)], timeout=float("inf"))
            sleeping = conn.submit([("DEBUG", "SLEEP", 10)], timeout=float("inf"))
            await conn.flush()
            own_server.stop(signal.SIGKILL)
            for pending in (blocked, sleeping):
                with pytest.raises(ConnectionLost, match=r"closed the connection|lost"):
                    await pending.wait()
        with pytest.raises(ConnectionLost):
            await conn.execute("PING")  # a broken connection is never reused


async def test_server_killed_during_debug_sleep(own_server: RedisServer) -> None:
    with trio.fail_after(15):
        async with open_connection(own_server.url) as conn:
            async with trio.open_nursery() as nursery:

                async def sleep_on_server() -> None:
                    with pytest.raises(ConnectionLost):
                        await conn.execute("DEBUG", "SLEEP", 10, timeout=float("inf"))

                nursery.start_soon(sleep_on_server)
                await all_parked()
                # The command is written (the caller is parked on its reply): kill now.
                own_server.stop(signal.SIGKILL)
            assert conn.is_closed


async def test_client_kill_of_our_connection(url: str, other: Connection) -> None:
    with trio.fail_after(10):
        conn = await Connection.connect(url, name="to-be-killed")
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_expecting_loss, conn)
            my_id = await conn.execute("CLIENT", "ID")

            async def blocked() -> None:
                with pytest.raises(ConnectionLost):
                    await conn.execute("BLPOP", f"nobody-pushes-{my_id}", 0, timeout=float("inf"))

            nursery.start_soon(blocked)
            await wait_blocked(other)
            assert await other.execute("CLIENT", "KILL", "ID", my_id) == 1
        with pytest.raises(ConnectionLost):
            await conn.execute("PING")


async def test_client_pause_delays_then_completes(url: str, other: Connection, key: str) -> None:
    with trio.fail_after(10):
        async with open_connection(url) as conn:
            await other.execute("CLIENT", "PAUSE", 300, "WRITE")
            try:
                assert await conn.execute("SET", key, "after-pause") == b"OK"
            finally:
                await other.execute("CLIENT", "UNPAUSE")
            assert await conn.execute("GET", key) == b"after-pause"


async def test_client_pause_beyond_command_timeout(url: str, other: Connection, key: str) -> None:
    with trio.fail_after(10):
        async with open_connection(url + "?command_timeout=0.2") as conn:
            await other.execute("CLIENT", "PAUSE", 5000, "WRITE")
            try:
                async with trio.open_nursery() as nursery:

                    async def behind() -> None:
                        with pytest.raises(ConnectionLost, match=r"timed out|timeout"):
                            await conn.execute("GET", key)

                    pending = conn.submit([("SET", key, "x")])
                    nursery.start_soon(behind)
                    with pytest.raises(RedisTimeout):
                        await pending.wait()
                assert conn.is_closed
                with pytest.raises(ConnectionLost):
                    await conn.execute("PING")
            finally:
                await other.execute("CLIENT", "UNPAUSE")


async def test_server_restart_then_a_new_connection_works(own_server: RedisServer) -> None:
    with trio.fail_after(20):
        conn = await Connection.connect(own_server.url)
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_expecting_loss, conn)
            assert await conn.execute("SET", "k", "v") == b"OK"
            await trio.to_thread.run_sync(own_server.restart)
            with pytest.raises(ConnectionLost):
                await conn.execute("PING")
        async with open_connection(own_server.url) as fresh:
            assert await fresh.execute("PING") == b"PONG"


async def test_connect_refused() -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(ConnectionLost, match="could not connect"):
            await Connection.connect(f"redis://127.0.0.1:{port}")


async def _fake_server(
    behaviour: Callable[[trio.SocketStream], Awaitable[None]],
    task_status: trio.TaskStatus[int],
) -> None:
    """A one-connection TCP peer that misbehaves as told once it got a command."""

    async def after_a_command(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await behaviour(stream)

    await one_peer(after_a_command, task_status)


@pytest.mark.parametrize(
    ("reply", "complaint"),
    [
        (b"$100\r\nonly part of the value", "closed the connection"),  # dies mid-reply
        (b"*3\r\n:1\r\n", "closed the connection"),
        (b"%%% not resp\r\n", "protocol error"),
        (b"+OK\r\n+EXTRA\r\n", "no command waits"),
    ],
)
async def test_broken_peers(reply: bytes, complaint: str) -> None:
    async def misbehave(stream: trio.SocketStream) -> None:
        await stream.send_all(reply)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_fake_server, misbehave)
            conn = await Connection.connect(f"redis://127.0.0.1:{port}")
            await nursery.start(_run_expecting_loss, conn)
            pending = conn.submit([("GET", "x")])
            if reply.startswith(b"+OK"):
                assert await pending.wait() == [b"OK"]  # then a reply nobody asked for
                await all_parked()
            else:
                with pytest.raises(ConnectionLost):
                    await pending.wait()
            assert conn.is_closed
            with pytest.raises(ConnectionLost, match=complaint):
                await conn.execute("PING")


async def test_connect_timeout_on_a_silent_server() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_fake_server, silent)
            with pytest.raises(RedisTimeout, match=r"within 0\.2 s"):
                await Connection.connect(
                    f"redis://127.0.0.1:{port}?connect_timeout=0.2", name="handshake"
                )
            nursery.cancel_scope.cancel()


async def test_a_write_that_cannot_finish_drops_the_connection(own_server: RedisServer) -> None:
    """A stopped server reads nothing: a 64 MB write fills the socket buffers and
    blocks. Cancelling its caller does not cut it short (never half a command on a
    shared connection); the write's own deadline (command_timeout) drops the
    connection, and every command in flight gets ConnectionLost."""
    assert own_server.process is not None
    pid = own_server.process.pid
    with trio.fail_after(15):
        async with open_connection(own_server.url + "?command_timeout=0.5") as conn:
            assert await conn.execute("PING") == b"PONG"
            os.kill(pid, signal.SIGSTOP)
            try:
                outcomes: dict[str, str] = {}
                writer = trio.CancelScope()

                async def big() -> None:
                    try:
                        with writer:
                            await conn.execute("SET", "big", b"x" * (64 * 1024 * 1024))
                            outcomes["big"] = "ok"
                    except ConnectionLost:
                        outcomes["big"] = "lost"

                async def small() -> None:
                    try:
                        await conn.execute("PING")
                    except ConnectionLost:
                        outcomes["small"] = "lost"

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(big)
                    await all_parked()  # big is blocked in its shielded write
                    nursery.start_soon(small)
                    await all_parked()  # small queued behind it
                    writer.cancel()  # the write goes on, until its deadline
                assert conn.is_closed
                assert outcomes.get("small") == "lost"
                assert outcomes.get("big") != "ok"
            finally:
                os.kill(pid, signal.SIGCONT)
        async with open_connection(own_server.url) as fresh:
            assert await fresh.execute("PING") == b"PONG"
            assert await fresh.execute("EXISTS", "big") == 0
