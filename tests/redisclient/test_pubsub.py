"""PubSub: confirmed subscribe, delivery, fast unsubscribe, lost connections."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from bus.redis._client import Connection, ConnectionLost, PubSub, open_pubsub

pytestmark = pytest.mark.redis


@attrs.define(eq=False)
class IOWaits(trio.abc.Instrument):
    """Counts the scheduler's I/O waits, and the timeouts it waited with."""

    timeouts: list[float] = attrs.Factory(list)

    def before_io_wait(self, timeout: float) -> None:
        self.timeouts.append(timeout)


async def test_subscribe_receive_unsubscribe(url: str, conn: Connection, key: str) -> None:
    one, two = key + "one", key + "two"
    with trio.fail_after(10):
        async with open_pubsub(url, name="client-test-ps") as ps:
            await ps.subscribe(one, two)
            # Returned only once Redis confirmed: a publish now reaches us.
            assert ps.channels == {one.encode(), two.encode()}
            assert await conn.execute("PUBLISH", one, "hello") == 1
            assert await conn.execute("PUBLISH", two, b"\x00bin") == 1
            received = []
            async for message in ps:
                received.append(message)
                if len(received) == 2:
                    break
            assert received == [(one.encode(), b"hello"), (two.encode(), b"\x00bin")]

            waits = IOWaits()
            trio.lowlevel.add_instrument(waits)
            try:
                await ps.unsubscribe(one)
            finally:
                trio.lowlevel.remove_instrument(waits)
            # One round trip: a couple of I/O waits, none of them on a short timer
            # (a close timeout would show up as the scheduler's next deadline).
            assert len(waits.timeouts) <= 4, waits.timeouts
            assert all(t == 0 or t > 1 for t in waits.timeouts), waits.timeouts
            assert ps.channels == {two.encode()}
            assert await conn.execute("PUBLISH", one, "nobody") == 0
            await ps.unsubscribe()  # every remaining channel
            assert ps.channels == set()
            assert await conn.execute("PUBLISH", two, "nobody") == 0
            await ps.unsubscribe()  # nothing left: returns at once


async def test_patterns_and_ping(url: str, conn: Connection, key: str) -> None:
    with trio.fail_after(10):
        async with open_pubsub(url) as ps:
            await ps.ping()  # not subscribed: a plain PONG
            await ps.psubscribe(key + "*")
            assert ps.patterns == {(key + "*").encode()}
            await ps.ping()  # subscribed: a ["pong", ""] push
            assert await conn.execute("PUBLISH", key + "x", "p") == 1
            assert await ps.__anext__() == ((key + "x").encode(), b"p")
            await ps.punsubscribe()
            assert ps.patterns == set()


async def test_many_subscribe_round_trips_are_quick_to_confirm(
    url: str, conn: Connection, key: str
) -> None:
    """The per-wait_result pattern that costs coredis 100 ms each time."""
    with trio.fail_after(10):
        async with open_pubsub(url) as ps:
            for i in range(50):
                await ps.subscribe(f"{key}{i}")
                await ps.unsubscribe(f"{key}{i}")
            assert ps.channels == set()


async def test_lost_connection_ends_iteration_with_connection_lost(
    url: str, conn: Connection, key: str
) -> None:
    with trio.fail_after(10):
        ps = await PubSub.connect(url, name=f"victim-{key}")
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with pytest.raises(ConnectionLost):
                    await ps.run(task_status=task_status)

            await nursery.start(run)
            await ps.subscribe(key)
            assert await conn.execute("PUBLISH", key, "before") == 1
            clients = (await conn.execute("CLIENT", "LIST")).decode().splitlines()
            [victim] = [c for c in clients if f"name=victim-{key}" in c]
            victim_id = victim.split()[0].removeprefix("id=")
            assert await conn.execute("CLIENT", "KILL", "ID", victim_id) == 1
            assert await ps.__anext__() == (key.encode(), b"before")  # received ones first
            with pytest.raises(ConnectionLost):
                await ps.__anext__()
            with pytest.raises(ConnectionLost):
                await ps.subscribe(key)


async def test_aclose_ends_iteration(url: str, key: str) -> None:
    with trio.fail_after(10):
        async with open_pubsub(url) as ps:
            await ps.subscribe(key)
            async with trio.open_nursery() as nursery:

                async def consume() -> None:
                    async for _ in ps:
                        raise AssertionError("no message was sent")

                nursery.start_soon(consume)
                await trio.testing.wait_all_tasks_blocked()
                await ps.aclose()


async def test_on_message_is_called_in_the_readers_step(
    url: str, conn: Connection, key: str
) -> None:
    """Each message reaches the function in the reader's own step, in order (no task
    between the socket and it); a function that raises fails the connection."""
    got: list[tuple[bytes, bytes, trio.lowlevel.Task]] = []
    two = trio.Event()

    def record(channel: bytes, data: bytes) -> None:
        got.append((channel, data, trio.lowlevel.current_task()))
        if len(got) == 2:
            two.set()

    with trio.fail_after(10):
        ps = await PubSub.connect(url, name=f"callback-{key}")
        ps.on_message(record)
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with pytest.raises(ValueError, match="boom"):
                    await ps.run(task_status=task_status)

            await nursery.start(run)
            await ps.subscribe(key)
            reader = next(t for t in nursery.child_tasks if "run" in t.name)
            await conn.pipeline([("PUBLISH", key, "one"), ("PUBLISH", key, "two")])
            await two.wait()
            assert got == [(key.encode(), b"one", reader), (key.encode(), b"two", reader)]

            def boom(channel: bytes, data: bytes) -> None:
                raise ValueError("boom")

            ps.on_message(boom)
            await conn.execute("PUBLISH", key, "three")
        assert ps.is_closed
