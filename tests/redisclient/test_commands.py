"""Commands, pipelines, transactions, submit/flush, scripts, cancellation."""

from __future__ import annotations

import os

import attrs
import pytest
import trio
import trio.testing

from bus.redis._client import (
    Connection,
    ConnectionLost,
    ReplyError,
    Script,
    open_connection,
    rerun_noscript,
)
from bus.redis._resp import Head, encode
from tests.redis.server import RedisServer
from tests.redisclient.conftest import all_parked, caller_reads, wait_blocked

pytestmark = pytest.mark.redis


async def test_execute_basics(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        assert await conn.execute("PING") == b"PONG"
        assert await conn.execute("SET", key + "s", "välue") == b"OK"
        assert await conn.execute("GET", key + "s") == "välue".encode()
        assert await conn.execute("GET", key + "missing") is None
        assert await conn.execute(b"INCRBY", key + "n", 41) == 41
        assert await conn.execute("INCRBYFLOAT", key + "f", 0.5) == b"0.5"
        assert await conn.execute("RPUSH", key + "l", b"a", bytearray(b"b"), memoryview(b"c")) == 3
        assert await conn.execute("LRANGE", key + "l", 0, -1) == [b"a", b"b", b"c"]
        assert await conn.execute("LRANGE", key + "nothing", 0, -1) == []
        assert await conn.execute("CLIENT", "GETNAME") == b"client-test"
        with pytest.raises(TypeError, match="bool"):
            await conn.execute("SET", key, True)
        assert await conn.execute("PING") == b"PONG"  # a refused argument left no trace


async def test_error_replies_carry_the_server_message(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        await conn.execute("SET", key, "x")
        with pytest.raises(ReplyError) as info:
            await conn.execute("LPUSH", key, "y")
        assert info.value.code == "WRONGTYPE"
        assert info.value.message.startswith("WRONGTYPE Operation against a key")
        assert str(info.value) == info.value.message
        with pytest.raises(ReplyError) as unknown:
            await conn.execute("NOSUCHCOMMAND", 1)
        assert unknown.value.code == "ERR" and "unknown command" in unknown.value.message
        await conn.execute("XGROUP", "CREATE", key + "st", "g", "0", "MKSTREAM")
        with pytest.raises(ReplyError) as busy:
            await conn.execute("XGROUP", "CREATE", key + "st", "g", "0")
        assert busy.value.code == "BUSYGROUP"
        with pytest.raises(ReplyError) as nogroup:
            await conn.execute("XREADGROUP", "GROUP", "nope", "c", "STREAMS", key + "st", ">")
        assert nogroup.value.code == "NOGROUP"
        assert await conn.execute("GET", key) == b"x"  # the connection is fine


async def test_pipeline_returns_errors_in_place(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        writes = conn.stats.writes
        replies = await conn.pipeline(
            [("SET", key, "1"), ("INCR", key), ("LPUSH", key, "x"), ("GET", key)]
        )
        assert conn.stats.writes == writes + 1
        assert replies[:2] == [b"OK", 2]
        assert isinstance(replies[2], ReplyError) and replies[2].code == "WRONGTYPE"
        assert replies[3] == b"2"
        assert await conn.pipeline([]) == []


async def test_transaction_and_execabort(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        assert await conn.transaction([("SET", key, "a"), ("APPEND", key, "b")]) == [b"OK", 2]
        # A runtime error inside EXEC is returned in place; the rest ran.
        mixed = await conn.transaction([("LPUSH", key, "x"), ("GET", key)])
        assert isinstance(mixed[0], ReplyError) and mixed[0].code == "WRONGTYPE"
        assert mixed[1] == b"ab"
        # A command Redis refuses to queue aborts the whole transaction.
        with pytest.raises(ReplyError) as info:
            await conn.transaction([("SET", key, "never"), ("SET", key)])
        assert info.value.code == "EXECABORT"
        assert isinstance(info.value.__cause__, ReplyError)
        assert "wrong number of arguments" in info.value.__cause__.message
        assert await conn.execute("GET", key) == b"ab"


async def test_five_megabyte_value_round_trip(conn: Connection, key: str) -> None:
    value = os.urandom(5 * 1024 * 1024)
    with trio.fail_after(20):
        assert await conn.execute("SET", key, value) == b"OK"
        assert await conn.execute("GET", key) == value
        replies = await conn.pipeline([("GET", key), ("STRLEN", key), ("ECHO", "after")])
        assert replies == [value, len(value), b"after"]


async def test_automatic_pipelining_of_100_concurrent_callers(conn: Connection) -> None:
    replies: dict[int, bytes] = {}

    async def call(i: int) -> None:
        replies[i] = await conn.execute("ECHO", f"caller-{i}")

    with trio.fail_after(10):
        before = conn.stats.writes, conn.stats.commands
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(call, i)
        assert replies == {i: f"caller-{i}".encode() for i in range(100)}
        writes = conn.stats.writes - before[0]
        assert conn.stats.commands - before[1] == 100
        # The first caller writes at once; the rest of that scheduler pass is gathered.
        assert writes <= 3, writes


async def test_many_tasks_in_a_loop_all_get_their_own_replies(conn: Connection, key: str) -> None:
    async def worker(w: int) -> None:
        for i in range(200):
            assert await conn.execute("ECHO", f"{w}:{i}") == f"{w}:{i}".encode()
            await conn.execute("INCR", key)

    with trio.fail_after(20):
        before = conn.stats.writes, conn.stats.commands
        async with trio.open_nursery() as nursery:
            for w in range(32):
                nursery.start_soon(worker, w)
        assert await conn.execute("GET", key) == b"6400"
        assert conn.stats.writes - before[0] < (conn.stats.commands - before[1]) / 2


async def test_submit_then_flush_is_one_write(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        writes = conn.stats.writes
        first = conn.submit([("SET", key, "1"), ("INCR", key)])
        second = conn.submit([("INCR", key)])
        empty = conn.submit([])
        assert not first.done and not second.done and empty.done
        assert conn.stats.writes == writes  # nothing written yet: submit only queues
        await conn.flush()
        assert conn.stats.writes == writes + 1
        assert await second.wait() == [3]
        assert first.done
        assert await first.wait() == [b"OK", 2]
        assert await empty.wait() == []
        await conn.flush()  # nothing queued: a plain checkpoint


async def test_a_head_packed_once_sends_the_same_commands(conn: Connection, key: str) -> None:
    # A hot command's fixed head is packed once (Head); each command made from it is
    # still the tuple of its arguments, and Redis gets exactly that command.
    head = Head(b"RPUSH", key.encode())
    big = os.urandom(100_000)  # past the size joined without an extra copy
    commands = [head.command1(b"one"), head.command(b"two", b"three"), head.command1(big)]
    assert commands[0] == (b"RPUSH", key.encode(), b"one")
    assert commands[1] == (b"RPUSH", key.encode(), b"two", b"three")
    for command in commands:
        assert encode(command) == encode(tuple(command))
    with trio.fail_after(10):
        assert await conn.submit(commands).wait() == [1, 3, 4]
        assert await conn.execute("LRANGE", key, 0, -1) == [b"one", b"two", b"three", big]


async def test_an_eager_submit_is_written_at_once_only_when_alone(
    conn: Connection, key: str
) -> None:
    with trio.fail_after(10):
        writes = conn.stats.writes
        alone = conn.submit([("INCR", key)], eager=True)
        assert conn.stats.writes == writes + 1  # written before submit returned
        # Another command in flight: an eager submit is a plain one (gathered by the
        # next write, not written on its own).
        second = conn.submit([("INCR", key)], eager=True)
        assert conn.stats.writes == writes + 1
        assert await second.wait() == [2]
        assert await alone.wait() == [1]
        assert conn.stats.writes == writes + 2
        # What the socket does not take at once stays queued, and waiting writes it.
        big = os.urandom(8 << 20)
        pending = conn.submit([("SET", key + "big", big)], eager=True)
        assert await pending.wait() == [b"OK"]
        assert await conn.execute("STRLEN", key + "big") == len(big)


async def test_an_eager_submit_on_a_broken_connection_raises(conn: Connection) -> None:
    await conn.drop("test")
    with pytest.raises(ConnectionLost):
        conn.submit([("PING",)], eager=True)


async def test_waiting_on_a_submit_writes_it(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        pending = conn.submit([("INCR", key), ("LPUSH", key, "x")])
        replies = await pending.wait()
        assert replies[0] == 1 and isinstance(replies[1], ReplyError)


async def test_submit_from_an_actor_like_loop_does_not_block_on_replies(
    conn: Connection, other: Connection, key: str
) -> None:
    """One drain: several submits, one flush, move on; replies are collected later."""
    with trio.fail_after(10):
        blocker = conn.submit([("BLPOP", key + "wake", 0)], timeout=float("inf"))
        drain = [conn.submit([("INCR", key)]) for _ in range(5)]
        await conn.flush()  # returns although no reply can come before the BLPOP's
        assert not any(p.done for p in drain)
        await other.execute("RPUSH", key + "wake", "go")
        assert await blocker.wait() == [[(key + "wake").encode(), b"go"]]
        assert [(await p.wait())[0] for p in drain] == [1, 2, 3, 4, 5]


async def test_script_with_noscript_fallback(own_server: RedisServer) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    with trio.fail_after(10):
        async with open_connection(own_server.url) as conn:
            await conn.execute("SCRIPT", "FLUSH")
            assert await script.run(conn, keys=["k"], args=[5]) == 5  # NOSCRIPT -> EVAL
            assert await conn.execute("SCRIPT", "EXISTS", script.sha) == [1]
            assert await script.run(conn, keys=["k"], args=[1]) == 6  # EVALSHA
            await conn.execute("SCRIPT", "FLUSH")
            commands = [script.command(["k"], [10]), ("GET", "k"), script.command(["k"], [1])]
            replies = await conn.pipeline(commands)
            assert [isinstance(r, ReplyError) and r.code == "NOSCRIPT" for r in replies] == [
                True,
                False,
                True,
            ]
            assert await rerun_noscript(conn, commands, replies) == [16, b"6", 17]
            await script.load(conn)
            assert await conn.pipeline([script.command(["k"], [3])]) == [20]
            broken = Script("return redis.call('LPUSH', KEYS[1], 'x')")
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await broken.run(conn, keys=["k"])


async def test_cancelled_caller_leaves_the_others_correct(
    conn: Connection, other: Connection, key: str
) -> None:
    results: dict[str, bytes] = {}

    async def echo(word: str) -> None:
        results[word] = await conn.execute("ECHO", word)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            waiter = trio.CancelScope()

            async def blocked_pop() -> None:
                with waiter:
                    await conn.execute("BLPOP", key, 0, timeout=float("inf"))
                results["blpop"] = b"cancelled"

            nursery.start_soon(blocked_pop)
            await all_parked()
            nursery.start_soon(echo, "b")
            nursery.start_soon(echo, "c")
            await wait_blocked(other)
            await all_parked()
            waiter.cancel()  # the BLPOP caller leaves; its command is still running
            await all_parked()
            assert results == {"blpop": b"cancelled"}
            await other.execute("RPUSH", key, "for-the-cancelled-one")
        # The BLPOP reply was read and discarded; b and c got their own replies.
        assert results == {"blpop": b"cancelled", "b": b"b", "c": b"c"}
        assert await conn.execute("LLEN", key) == 0  # the BLPOP did pop it
        assert await conn.execute("ECHO", "d") == b"d"


async def test_already_cancelled_caller_sends_nothing(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.execute("INCR", key)
        assert await conn.execute("GET", key) is None


async def test_cancelled_while_waiting_for_the_reply_still_ran(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0):  # cancelled at its first checkpoint: the reply wait
            pending = conn.submit([("INCR", key)])
            await pending.wait()
        assert await conn.execute("GET", key) == b"1"
        assert pending.done and await pending.wait() == [1]


async def test_one_waiter_at_a_time(conn: Connection, other: Connection, key: str) -> None:
    with trio.fail_after(10):
        pending = conn.submit([("BLPOP", key, 0)], timeout=float("inf"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending.wait)
            await all_parked()
            with pytest.raises(RuntimeError, match="already waiting"):
                await pending.wait()
            await other.execute("RPUSH", key, "x")


async def test_lifecycle_connect_run_aclose(url: str) -> None:
    with trio.fail_after(10):
        conn = await Connection.connect(url, name="actor-owned")
        with pytest.raises(RuntimeError, match="not running"):
            await conn.execute("PING")
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            with pytest.raises(RuntimeError, match="already"):
                await conn.run()
            assert await conn.execute("PING") == b"PONG"
            await conn.aclose()  # run() returns: the nursery exits cleanly
        assert conn.is_closed
        with pytest.raises(ConnectionLost, match="closed by aclose"):
            await conn.execute("PING")
        with pytest.raises(ConnectionLost):
            conn.submit([("PING",)])
        await conn.aclose()  # idempotent


async def test_aclose_fails_commands_in_flight(url: str, key: str) -> None:
    with trio.fail_after(10):
        async with open_connection(url) as conn:
            pending = conn.submit([("BLPOP", key, 0)], timeout=float("inf"))
            await conn.flush()
            await conn.aclose()
            with pytest.raises(ConnectionLost, match="closed by aclose"):
                await pending.wait()


async def test_body_errors_come_out_plain(url: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(KeyError):
            async with open_connection(url):
                raise KeyError("plain")


async def test_a_body_error_is_not_lost_when_closing_fails_a_sibling(url: str, key: str) -> None:
    """Closing the connection at the end of the body wakes a sibling's command with
    ConnectionLost, which fails the outer nursery and cancels the close: the body's
    own error still comes out, beside the sibling's."""

    async def body_fails() -> None:
        async with trio.open_nursery() as nursery, open_connection(url) as conn:

            async def blocked() -> None:
                await conn.execute("BLPOP", key, 0, timeout=float("inf"))

            nursery.start_soon(blocked)
            await all_parked()
            raise KeyError("the body's own")

    with trio.fail_after(10):
        with pytest.raises(ExceptionGroup) as info:
            await body_fails()
        assert info.value.subgroup(KeyError) is not None
        assert info.value.subgroup(ConnectionLost) is not None


async def test_per_call_timeout_overrides_command_timeout(url: str, key: str) -> None:
    with trio.fail_after(10):
        async with open_connection(url + "?command_timeout=0.2") as conn:
            assert await conn.execute("BLPOP", key, 0.5, timeout=5) is None
            assert await conn.execute("PING") == b"PONG"


@attrs.define(eq=False)
class Steps(trio.abc.Instrument):
    """Counts scheduler task steps (a cost that does not depend on the machine), those
    of ``watched``, and how often ``watched`` was woken by the run loop itself (the
    socket it waits on), not rescheduled by another task."""

    watched: trio.lowlevel.Task | None = None
    steps: int = 0
    mine: int = 0
    woken_by_io: int = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.mine += task is self.watched

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task is self.watched:
            try:
                trio.lowlevel.current_task()  # another task woke it
            except RuntimeError:
                self.woken_by_io += 1  # the I/O manager did, outside any task


async def test_scheduler_steps_per_command(conn: Connection) -> None:
    with trio.fail_after(10):
        await caller_reads(conn)  # sequential: the next command is read by its caller
        sequential = Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(sequential)
        try:
            for _ in range(200):
                await conn.execute("GET", "x")
        finally:
            trio.lowlevel.remove_instrument(sequential)
        # Caller-read mode: one step of the caller per command (woken by the socket
        # with its reply: it reads it, returns, writes the next command and waits),
        # and one of the reader (woken when the caller had its reply: it finds the
        # next command's caller reading and parks again), while the server works.
        assert sequential.steps <= 2 * 200 + 10, sequential.steps
        assert sequential.mine <= 200 + 5, sequential.mine
        # Woken by the socket, not by the reader: no task between the reply and its
        # caller (before caller-read mode: the reader's step).
        assert sequential.woken_by_io >= 200, sequential.woken_by_io

        async def loop() -> None:
            for _ in range(50):
                await conn.execute("GET", "x")

        pipelined = Steps()
        trio.lowlevel.add_instrument(pipelined)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(loop)
        finally:
            trio.lowlevel.remove_instrument(pipelined)
        # Many replies per read and many commands per write: fewer steps per command.
        assert pipelined.steps < 1.6 * 32 * 50, pipelined.steps


async def test_flush_nowait_writes_what_is_queued_at_once(conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        await conn.execute("PING")
        writes = conn.stats.writes
        assert conn.flush_nowait()  # nothing queued: nothing to write
        assert conn.stats.writes == writes
        first = conn.submit([("SET", key, "1"), ("INCR", key)])
        second = conn.submit([("INCR", key)])
        assert conn.flush_nowait()  # not a checkpoint: written before this task yields
        assert conn.stats.writes == writes + 1
        assert await first.wait() == [b"OK", 2]
        assert await second.wait() == [3]


async def test_flush_nowait_leaves_what_the_socket_did_not_take_for_the_next_write(
    conn: Connection, key: str
) -> None:
    """A command larger than the socket's buffer is written in part; the rest goes out
    with the next write, whole and in order, before what was queued after it."""
    big = os.urandom(64 * 1024 * 1024)
    with trio.fail_after(30):
        first = conn.submit([("SET", key, big)])
        assert not conn.flush_nowait()  # 64 MiB: not taken at once
        second = conn.submit([("STRLEN", key), ("GETRANGE", key, 1000, 1009)])
        conn.flush_nowait()
        assert await first.wait() == [b"OK"]
        assert await second.wait() == [len(big), big[1000:1010]]
        assert await conn.execute("DEL", key) == 1


async def test_wait_without_flush_leaves_the_commands_for_the_next_write(
    conn: Connection, key: str
) -> None:
    """``wait(flush=False)`` does not write: the replies come once another write
    carries the commands; bounded by a deadline, a plain ``wait`` then writes them."""
    with trio.fail_after(10):
        await conn.execute("PING")
        writes = conn.stats.writes
        carried = conn.submit([("SET", key, "1")])
        got: list[object] = []

        async def waiter() -> None:
            got.extend(await carried.wait(flush=False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.stats.writes == writes  # nothing written: it waits
            assert not got
            assert await conn.execute("INCR", key) == 2  # one write carries both
        assert got == [b"OK"]
        assert conn.stats.writes == writes + 1

        lingering = conn.submit([("INCR", key)])
        with trio.move_on_after(0.05) as scope:
            await lingering.wait(flush=False)
        assert scope.cancelled_caught  # no other write came
        assert await lingering.wait() == [3]  # written now
