"""Redis that is not there, refuses us, or goes away: every public call returns or
raises ``bus.BrokerUnavailable`` within its bound, and the same objects work again
once Redis is back."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import structlog
import trio

import bus
from bus.redis import RedisBroker
from tests.redis.server import RedisServer, free_port, start_server
from tests.redis.support import make_redis_broker


async def test_start_against_nothing_fails_within_connect_timeout() -> None:
    port = free_port()
    broker = RedisBroker(f"redis://127.0.0.1:{port}/0", connect_timeout=1)
    start = trio.current_time()
    with trio.fail_after(5), pytest.raises(bus.BrokerUnavailable) as info:
        async with broker:
            pass
    assert trio.current_time() - start < 1 + 5  # the bound, with room for a slow machine
    error = info.value
    assert f"127.0.0.1:{port}" in str(error) and error.url.endswith(f":{port}/0")
    assert 0.9 <= error.waited < 1 + 5
    assert isinstance(error, bus.BusError)


async def test_a_wrong_password_fails_at_once_with_its_cause(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra_args=("--requirepass", "right-password"))
    try:
        url = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        broker = RedisBroker(url, connect_timeout=None)  # would wait forever
        with trio.fail_after(5), pytest.raises(bus.BrokerUnavailable) as info:
            async with broker:
                pass
        text = str(info.value)
        assert "WRONGPASS" in text or "invalid" in text.lower()
        assert "wrong-password" not in text  # masked
    finally:
        server.stop()


async def test_a_db_that_does_not_exist_fails_at_once(redis_server: RedisServer) -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{redis_server.port}/99", connect_timeout=None)
    with trio.fail_after(5), pytest.raises(bus.BrokerUnavailable, match="DB index"):
        async with broker:
            pass


async def test_a_server_that_is_not_redis_fails_at_once() -> None:
    async def answer_http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, answer_http, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        broker = RedisBroker(f"redis://127.0.0.1:{port}/0", connect_timeout=None)
        with trio.fail_after(5), pytest.raises(bus.BrokerUnavailable):
            async with broker:
                pass
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_sends_and_commands_are_bounded_and_recover(aof_server: RedisServer) -> None:
    """Redis stopped while a producer calls every kind of method: each raises
    BrokerUnavailable within its bound (never a runtime error); once Redis is back,
    the same broker object sends, inspects, cancels and reads results again."""
    broker = make_redis_broker(aof_server.url, send_timeout=1.5, command_timeout=1.5)

    @broker.task(name="unavailable.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with broker:
            sent = await add.kiq(1, 2)
            aof_server.stop()
            errors: dict[str, BaseException] = {}
            took: dict[str, float] = {}

            async def call(name: str, fn: object) -> None:
                start = trio.current_time()
                try:
                    await fn()  # type: ignore[operator]
                except Exception as exc:
                    errors[name] = exc
                took[name] = trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "kiq", lambda: add.kiq(2, 3))
                nursery.start_soon(call, "kiq_many", lambda: add.kiq_many([(1, 1), (2, 2)]))
                nursery.start_soon(call, "inspect", broker.inspect)
                nursery.start_soon(call, "cancel", sent.cancel)
                nursery.start_soon(call, "get_result", sent.get_result)
                nursery.start_soon(call, "is_ready", sent.is_ready)
                nursery.start_soon(call, "dead_letters", broker.dead_letters)
                nursery.start_soon(call, "requeue", broker.requeue_dead_letters)
            assert set(errors) == set(took), errors
            for name, exc in errors.items():
                assert isinstance(exc, bus.BrokerUnavailable), (name, repr(exc))
                assert took[name] < 1.5 + 5, (name, took[name])  # its bound, and room
            # Back: the same object works at once.
            aof_server.start()
            with trio.fail_after(5):
                handle = await add.kiq(20, 22)
            info = await broker.inspect()
            assert info["queued"] >= 1
            assert not await handle.is_ready()
            await handle.cancel()
            result = await handle.wait_result(timeout=5)
            assert result.status is bus.TaskStatus.CANCELLED
    events = [e["event"] for e in logs]
    assert events.count("redis.unreachable") >= 1
    assert "redis.reachable" in events


async def test_a_loading_redis_is_waited_out(redis_server: RedisServer) -> None:
    """Redis answers LOADING while it reads its data after a restart: a call waits it
    out (within its deadline) instead of failing."""
    import actors
    from bus.redis._client import Connection, ReplyError
    from bus.redis._pool import shared_connection, with_connection
    from bus.redis._url import RedisURL

    calls: list[int] = []

    async def fn(conn: Connection) -> object:
        calls.append(1)
        if len(calls) < 3:
            raise ReplyError("LOADING Redis is loading the dataset in memory")
        return await conn.execute("PING")

    with trio.fail_after(10):
        async with actors.open_system() as system:
            ref = await shared_connection(system, RedisURL.parse(redis_server.url))
            deadline = trio.current_time() + 5
            assert await with_connection(ref, fn, deadline=deadline, what="ping") == b"PONG"
            calls.clear()

            async def refused(conn: Connection) -> object:
                raise ReplyError("WRONGTYPE Operation against a key holding the wrong kind")

            with pytest.raises(ReplyError, match="WRONGTYPE"):  # a real "no" is not waited
                await with_connection(ref, refused, deadline=deadline, what="x")
    assert len(calls) == 0
