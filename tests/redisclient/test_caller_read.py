"""Caller-read mode: a caller alone in flight reads its own reply, the reader steps aside.

Each test enters the mode (``caller_reads``), checks that it was used
(``stats.own_reads``), then forces one of the things the reader task still guarantees:
a connection dropped while idle ends ``run`` at once, a caller cancelled half-way
through its reply leaves no half-read reply behind, callers arriving meanwhile get
their own replies, timeouts fire.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import hiredis
import pytest
import trio
import trio.testing

from bus.redis._client import (
    Connection,
    ConnectionLost,
    RedisTimeout,
    ReplyTooLarge,
    open_connection,
)
from tests.redis.server import RedisServer
from tests.redisclient.conftest import all_parked, caller_reads, one_peer, wait_blocked

pytestmark = pytest.mark.redis

_MORE = object()


class Supervised:
    """``conn.run`` in a nursery, recording how it ended (a supervisor in miniature)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ended = trio.Event()
        self.lost: ConnectionLost | None = None

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            await self.conn.run(task_status=task_status)
        except ConnectionLost as exc:
            self.lost = exc
        finally:
            self.ended.set()


# ---------------------------------------------------------------- dropped while idle


@pytest.mark.parametrize("how", ["client-kill", "server-killed"])
async def test_a_drop_while_idle_after_caller_reads_ends_run_without_a_command(
    own_server: RedisServer, how: str
) -> None:
    with trio.fail_after(10):
        conn = await Connection.connect(own_server.url)
        watcher = Supervised(conn)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            my_id = await conn.execute("CLIENT", "ID")
            mark = await caller_reads(conn)
            for i in range(20):
                assert await conn.execute("ECHO", i) == str(i).encode()
            assert conn.stats.own_reads == mark + 20  # every one read by its caller
            if how == "client-kill":
                async with open_connection(own_server.url) as other:
                    assert await other.execute("CLIENT", "KILL", "ID", my_id) == 1
            else:
                own_server.stop(signal.SIGKILL)
            await watcher.ended.wait()  # no command is sent on conn: the reader saw it
        assert isinstance(watcher.lost, ConnectionLost)
        assert "closed the connection" in str(watcher.lost) or "lost" in str(watcher.lost)
        with pytest.raises(ConnectionLost):
            await conn.execute("PING")


async def _scripted_peer(
    script: Callable[[trio.SocketStream, Callable[[], Awaitable[list[bytes]]]], Awaitable[None]],
    task_status: trio.TaskStatus[int],
) -> None:
    """A one-connection RESP peer: ``script(stream, next_command)`` answers as told;
    ``next_command`` answers PINGs itself and returns the next other command."""
    parser = hiredis.Reader(notEnoughData=_MORE)

    async def scripted(stream: trio.SocketStream) -> None:
        async def next_command() -> list[bytes]:
            while True:
                while (command := parser.gets()) is _MORE:
                    data = await stream.receive_some(65536)
                    assert data, "the client closed the connection"
                    parser.feed(data)
                assert isinstance(command, list)
                if command != [b"PING"]:
                    return command
                await stream.send_all(b"+PONG\r\n")

        await script(stream, next_command)

    await one_peer(scripted, task_status)


async def test_a_caller_that_yields_between_commands_stays_in_caller_read_mode(
    url: str,
) -> None:
    """A loop that reads a reply, yields a pass or two (handing work to other tasks,
    as a stream reader does) and sends its next command: the reader waits those
    passes before watching the socket, so each reply is still read by its caller,
    never handed over by the reader task."""
    with trio.fail_after(10):
        async with open_connection(url) as conn:
            mark = await caller_reads(conn)
            for i in range(50):
                assert await conn.execute("ECHO", i) == str(i).encode()
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
            assert conn.stats.own_reads == mark + 50


async def test_a_caller_that_stops_sending_leaves_the_socket_watched(
    own_server: RedisServer,
) -> None:
    """A caller that read its own reply and sends nothing more: the reader watches
    the socket again after a few passes (a drop is still noticed while idle)."""
    with trio.fail_after(10):
        conn = await Connection.connect(own_server.url)
        watcher = Supervised(conn)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await caller_reads(conn)
            await trio.testing.wait_all_tasks_blocked()
            assert conn._watching
            own_server.stop(signal.SIGKILL)
            await watcher.ended.wait()
        assert isinstance(watcher.lost, ConnectionLost)


async def test_eof_right_behind_a_reply_the_caller_read_ends_run() -> None:
    """The server answers and closes at once: the EOF can sit behind the reply the
    caller read itself. The reader comes back and sees it, no command needed."""

    async def answer_then_close(
        stream: trio.SocketStream, next_command: Callable[[], Awaitable[list[bytes]]]
    ) -> None:
        assert await next_command() == [b"ECHO", b"last"]
        await stream.send_all(b"$4\r\nlast\r\n")  # and the connection closes behind it

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_scripted_peer, answer_then_close)
            conn = await Connection.connect(f"redis://127.0.0.1:{port}")
            watcher = Supervised(conn)
            await nursery.start(watcher.run)
            mark = await caller_reads(conn)
            assert await conn.execute("ECHO", "last") == b"last"
            assert conn.stats.own_reads == mark + 1
            await watcher.ended.wait()
        assert watcher.lost is not None and "closed the connection" in str(watcher.lost)


# ---------------------------------------------------------------- cancelled half-way


async def test_a_caller_cancelled_between_parts_of_its_reply_leaves_no_half_reply() -> None:
    """The reply to a GET arrives in two parts; its caller, reading it itself, is
    cancelled after the first. The next commands get their own replies."""
    rest = trio.Event()

    async def split_reply(
        stream: trio.SocketStream, next_command: Callable[[], Awaitable[list[bytes]]]
    ) -> None:
        assert await next_command() == [b"GET", b"k"]
        await stream.send_all(b"$10\r\nhello")
        await rest.wait()
        await stream.send_all(b"world\r\n")
        assert await next_command() == [b"ECHO", b"next"]
        await stream.send_all(b"$4\r\nnext\r\n")
        assert await next_command() == [b"ECHO", b"alone"]
        await stream.send_all(b"$5\r\nalone\r\n")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_scripted_peer, split_reply)
            async with open_connection(f"redis://127.0.0.1:{port}") as conn:
                outcome: list[object] = []
                getter = trio.CancelScope()
                marks: list[int] = []

                async def get() -> None:
                    marks.append(await caller_reads(conn))
                    with getter:
                        outcome.append(await conn.execute("GET", "k"))
                    outcome.append("cancelled")

                nursery.start_soon(get)
                await all_parked()  # the caller read "hello" and waits for the rest
                assert conn.stats.own_reads == marks[0] + 1
                owner = conn._owner  # the GET, read by its caller: "hello" and no more
                assert owner is not None and not owner.done
                getter.cancel()
                await all_parked()
                assert outcome == ["cancelled"]

                async def echo_next() -> None:
                    outcome.append(await conn.execute("ECHO", "next"))

                nursery.start_soon(echo_next)  # queued behind the cancelled GET
                await all_parked()
                rest.set()  # the rest of the GET's reply, then ECHO's
                await all_parked()
                assert outcome == ["cancelled", b"next"]
                mark = await caller_reads(conn)
                assert await conn.execute("ECHO", "alone") == b"alone"
                assert conn.stats.own_reads == mark + 1  # alone again: read by its caller
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _slow_proxy(
    target_port: int, hold_after: int
) -> AsyncIterator[tuple[int, trio.Event, trio.Event]]:
    """A TCP proxy to ``target_port`` that passes the first ``hold_after`` bytes from
    the server, sets ``held``, then holds the rest until ``release`` is set."""
    release = trio.Event()
    held = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, hold: bool) -> None:
        passed = 0
        while data := await src.receive_some(65536):
            if hold and passed + len(data) > hold_after and not release.is_set():
                cut = max(0, hold_after - passed)
                await dst.send_all(data[:cut])
                passed += cut
                held.set()
                await release.wait()
                data = data[cut:]
            await dst.send_all(data)
            passed += len(data)

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        async with listeners[0]:
            task_status.started()
            client = await listeners[0].accept()
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
            async with client, server, trio.open_nursery() as pumps:
                pumps.start_soon(pump, client, server, False)
                pumps.start_soon(pump, server, client, True)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        yield listeners[0].socket.getsockname()[1], held, release
        nursery.cancel_scope.cancel()


async def test_a_big_get_cancelled_while_its_caller_reads_it(
    redis_server: RedisServer, other: Connection, key: str
) -> None:
    """A real server and a 4 MB value behind a proxy that delays the second half: the
    caller, reading its own reply, is cancelled in the middle of it."""
    value = os.urandom(4 * 1024 * 1024)
    with trio.fail_after(20):
        await other.execute("SET", key, value)
        proxy = _slow_proxy(redis_server.port, hold_after=len(value) // 2)
        async with (
            proxy as (port, held, release),
            open_connection(f"redis://127.0.0.1:{port}") as conn,
        ):
            getter = trio.CancelScope()
            outcome: list[object] = []
            marks: list[int] = []

            async def get() -> None:
                marks.append(await caller_reads(conn))
                with getter:
                    outcome.append(await conn.execute("GET", key))
                outcome.append("cancelled")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get)
                await held.wait()  # half the value sent to our socket, the rest held
                await all_parked()  # and read by its caller
                assert conn.stats.own_reads == marks[0] + 1
                owner = conn._owner  # the GET, half read by its caller
                assert owner is not None and not owner.done
                getter.cancel()
            await all_parked()
            assert outcome == ["cancelled"]
            release.set()
            assert await conn.execute("ECHO", "after") == b"after"
            mark = await caller_reads(conn)
            assert await conn.execute("STRLEN", key) == len(value)
            assert await conn.execute("GET", key) == value
            assert conn.stats.own_reads == mark + 2  # alone again: read by their caller


# ---------------------------------------------------------------- a mix, and timeouts


async def test_callers_arriving_while_one_reads_its_own_reply(
    conn: Connection, other: Connection, key: str
) -> None:
    replies: dict[str, object] = {}
    marks: list[int] = []

    async def call(name: str, *args: object) -> None:
        replies[name] = await conn.execute(*args, timeout=float("inf"))  # type: ignore[arg-type]

    async def pop_reading_itself() -> None:
        marks.append(await caller_reads(conn))
        replies["pop"] = await conn.execute("BLPOP", key, 0, timeout=float("inf"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pop_reading_itself)
            await wait_blocked(other)  # the server holds it; its caller reads its reply
            assert conn.stats.own_reads == marks[0] + 1
            for word in ("b", "c", "d"):
                nursery.start_soon(call, word, "ECHO", word)
            await all_parked()  # b, c, d queued behind the BLPOP, parked
            assert replies == {}
            await other.execute("RPUSH", key, "x")
        assert replies == {"pop": [key.encode(), b"x"], "b": b"b", "c": b"c", "d": b"d"}
        assert conn.stats.own_reads == marks[0] + 1  # the others were handed theirs
        mark = await caller_reads(conn)
        assert await conn.execute("ECHO", "alone") == b"alone"
        assert conn.stats.own_reads == mark + 1

        # The caller reading its own reply is cancelled; the one behind it still gets
        # its reply (from the reader).
        async with trio.open_nursery() as nursery:
            popper = trio.CancelScope()

            async def cancelled_pop() -> None:
                marks.append(await caller_reads(conn))
                with popper:
                    await conn.execute("BLPOP", key, 0, timeout=float("inf"))

            nursery.start_soon(cancelled_pop)
            await wait_blocked(other)
            assert conn.stats.own_reads == marks[1] + 1
            nursery.start_soon(call, "e", "ECHO", "e")
            await all_parked()
            popper.cancel()
            await all_parked()
            await other.execute("RPUSH", key, "y")
        assert replies["e"] == b"e"
        assert await conn.execute("LLEN", key) == 0  # the cancelled BLPOP did pop it


async def test_a_caller_reading_its_own_reply_times_out(url: str, key: str) -> None:
    with trio.fail_after(10):
        conn = await Connection.connect(url + "?command_timeout=0.3")
        watcher = Supervised(conn)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            mark = await caller_reads(conn)
            with pytest.raises(RedisTimeout):
                await conn.execute("BLPOP", key, 5)  # the server answers after 5 s
            assert conn.stats.own_reads == mark + 1
            await watcher.ended.wait()
        assert watcher.lost is not None and "timeout" in str(watcher.lost)
        with pytest.raises(ConnectionLost):
            await conn.execute("PING")


async def test_a_timeout_while_one_reads_its_own_reply_fails_those_behind(
    url: str, other: Connection, key: str
) -> None:
    outcomes: dict[str, str] = {}
    marks: list[int] = []

    async def call(name: str, timeout: float | None, *args: object) -> None:
        try:
            if name == "pop":
                marks.append(await caller_reads(conn))
            await conn.execute(*args, timeout=timeout)  # type: ignore[arg-type]
            outcomes[name] = "ok"
        except RedisTimeout:
            outcomes[name] = "timeout"
        except ConnectionLost:
            outcomes[name] = "lost"

    with trio.fail_after(10):
        async with open_connection(url) as conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "pop", 0.3, "BLPOP", key, 0)
                await wait_blocked(other)
                assert conn.stats.own_reads == marks[0] + 1
                nursery.start_soon(call, "behind", None, "ECHO", "b")
            assert outcomes == {"pop": "timeout", "behind": "lost"}
            assert conn.is_closed


async def test_a_reply_past_max_reply_bytes_read_by_its_caller(
    url: str, other: Connection, key: str
) -> None:
    with trio.fail_after(10):
        await other.execute("SET", key, b"x" * 100_000)
        conn = await Connection.connect(url + "?max_reply_bytes=4096")
        watcher = Supervised(conn)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            mark = await caller_reads(conn)
            with pytest.raises(ReplyTooLarge, match="max_reply_bytes=4096"):
                await conn.execute("GET", key)
            assert conn.stats.own_reads == mark + 1
            await watcher.ended.wait()
        assert isinstance(watcher.lost, ReplyTooLarge)
