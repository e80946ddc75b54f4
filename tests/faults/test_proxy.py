"""The fault proxy and the redis-server controls do what the fault tests rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from tests.faults.control import RedisControl
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.redis


Connect = Callable[[int], Awaitable[trio.SocketStream]]


# Asked for by name: pytest-trio does not run an async fixture that is only autouse
# (python-trio/pytest-trio#123), and this one's clients were then left open.
@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Connect to a port; every stream made is closed when the test ends."""
    opened: list[trio.SocketStream] = []

    async def connect(port: int) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        opened.append(stream)
        return stream

    yield connect
    for stream in opened:
        await stream.aclose()


async def _raw_connect(port: int) -> None:
    """Connect and close (a plain socket: its error is the kernel's)."""
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))


async def _read(stream: trio.SocketStream, until: bytes) -> bytes:
    data = b""
    while not data.endswith(until):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


async def _ping(stream: trio.SocketStream) -> bytes:
    await stream.send_all(b"PING\r\n")
    return await _read(stream, b"\r\n")


def _set(key: str, value: bytes) -> bytes:
    k = key.encode()
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(value), value)


def _get(key: str) -> bytes:
    k = key.encode()
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)


async def _broken(stream: trio.SocketStream) -> bool:
    """True once the peer closed or reset the stream (reads what is left first)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        return True
    return True


async def test_pass_through_forwards_both_ways(proxy: FaultProxy, connect: Connect) -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(10):
        s = await connect(proxy.port)
        assert await _ping(s) == b"+PONG\r\n"
        await s.send_all(_set("k", value))
        assert await _read(s, b"\r\n") == b"+OK\r\n"
        await s.send_all(_get("k"))
        reply = await _read(s, value + b"\r\n")
        assert reply == b"$%d\r\n" % len(value) + value + b"\r\n"
        assert proxy.accepted == 1 and proxy.open_connections == 1


async def test_refuse_closes_the_door_but_keeps_open_connections(
    proxy: FaultProxy, connect: Connect
) -> None:
    with trio.fail_after(10):
        s = await connect(proxy.port)
        proxy.mode = "refuse"
        await proxy.applied()
        with pytest.raises(ConnectionRefusedError):
            await _raw_connect(proxy.port)
        assert await _ping(s) == b"+PONG\r\n"
        proxy.heal()
        await proxy.applied()
        t = await connect(proxy.port)
        assert await _ping(t) == b"+PONG\r\n"


async def test_drop_all_resets_every_connection(proxy: FaultProxy, connect: Connect) -> None:
    with trio.fail_after(10):
        a, b = await connect(proxy.port), await connect(proxy.port)
        assert await _ping(a) == await _ping(b) == b"+PONG\r\n"
        await proxy.drop_all()
        assert proxy.open_connections == 0 and proxy.resets == 2
        with pytest.raises(trio.BrokenResourceError):
            await a.receive_some(10)
        assert await _broken(b)
        c = await connect(proxy.port)
        assert await _ping(c) == b"+PONG\r\n"


async def test_outage_refuses_and_drops(proxy: FaultProxy, connect: Connect) -> None:
    with trio.fail_after(10):
        a = await connect(proxy.port)
        await proxy.outage()
        assert await _broken(a)
        with pytest.raises(ConnectionRefusedError):
            await _raw_connect(proxy.port)


async def test_blackhole_accepts_and_never_answers_until_healed(
    proxy: FaultProxy, connect: Connect
) -> None:
    with trio.fail_after(10):
        old = await connect(proxy.port)
        assert await _ping(old) == b"+PONG\r\n"
        proxy.mode = "blackhole"
        new = await connect(proxy.port)  # accepted ...
        await old.send_all(b"PING\r\n")
        await new.send_all(b"PING\r\n")
        with trio.move_on_after(0.5) as silent:  # ... and never answered
            await old.receive_some(100)
        assert silent.cancelled_caught
        with trio.move_on_after(0.2) as silent:
            await new.receive_some(100)
        assert silent.cancelled_caught
        assert proxy.open_connections == 2
        proxy.heal()  # the partition heals: what was sent arrives
        assert await _read(old, b"\r\n") == b"+PONG\r\n"
        assert await _read(new, b"\r\n") == b"+PONG\r\n"


async def test_delay_holds_every_chunk(proxy: FaultProxy, connect: Connect) -> None:
    with trio.fail_after(10):
        s = await connect(proxy.port)
        proxy.delay = 0.3
        proxy.mode = "delay"
        t0 = trio.current_time()
        assert await _ping(s) == b"+PONG\r\n"
        assert trio.current_time() - t0 >= 0.55  # there and back
        proxy.heal()
        t0 = trio.current_time()
        assert await _ping(s) == b"+PONG\r\n"
        assert trio.current_time() - t0 < 0.3


async def test_reset_cuts_a_reply_in_the_middle(proxy: FaultProxy, connect: Connect) -> None:
    value = b"x" * 100_000
    with trio.fail_after(10):
        s = await connect(proxy.port)
        await s.send_all(_set("big", value))
        assert await _read(s, b"\r\n") == b"+OK\r\n"
        proxy.mode = "reset"
        await s.send_all(_get("big"))
        got = b""

        async def read_all() -> None:
            nonlocal got
            while chunk := await s.receive_some(65536):
                got += chunk

        with pytest.raises(trio.BrokenResourceError):
            await read_all()
        assert 0 < len(got) < len(value)
        assert proxy.resets >= 1 and proxy.open_connections == 0
        proxy.heal()
        t = await connect(proxy.port)
        await t.send_all(_get("big"))
        assert (await _read(t, value + b"\r\n")).endswith(value + b"\r\n")


async def test_stop_and_start_keep_the_data(
    redis_ctl: RedisControl, proxy: FaultProxy, connect: Connect
) -> None:
    with trio.fail_after(20):
        s = await connect(proxy.port)
        await s.send_all(_set("kept", b"yes"))
        assert await _read(s, b"\r\n") == b"+OK\r\n"
        await redis_ctl.stop()
        assert await _broken(s)
        a = await connect(proxy.port)  # the proxy accepts, Redis is not there: reset
        assert await _broken(a)
        await redis_ctl.start()
        t = await connect(proxy.port)
        await t.send_all(_get("kept"))
        assert await _read(t, b"yes\r\n") == b"$3\r\nyes\r\n"


async def test_sigstop_freezes_and_sigcont_thaws(redis_ctl: RedisControl, connect: Connect) -> None:
    with trio.fail_after(10):
        s = await connect(redis_ctl.port)
        assert await _ping(s) == b"+PONG\r\n"
        redis_ctl.pause()
        t = await connect(redis_ctl.port)  # the kernel accepts
        await s.send_all(b"PING\r\n")
        with trio.move_on_after(0.3) as silent:
            await s.receive_some(100)
        assert silent.cancelled_caught
        redis_ctl.resume()
        assert await _read(s, b"\r\n") == b"+PONG\r\n"
        assert await _ping(t) == b"+PONG\r\n"
