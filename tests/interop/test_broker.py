"""TaskiqRedisBroker and TaskiqRedisResultBackend on a real redis-server, in process:
every entry the bus writes to taskiq's stream (a send, a delayed send, a retry, a unique
job) holds its message in taskiq's field, ``data``; the Redis broker's reclaiming and
cancel work on it; results go where taskiq-redis reads them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import trio

import bus
from bus.interop.taskiq import (
    TaskiqCodec,
    TaskiqKeys,
    TaskiqRedisBroker,
    TaskiqRedisResultBackend,
)
from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis


def make(url: str, **options: Any) -> TaskiqRedisBroker:
    n = time.monotonic_ns()
    backend = TaskiqRedisResultBackend(url, prefix_str=f"r{n}", result_ex_time=600)
    options.setdefault("prefix", f"p{n}")
    return TaskiqRedisBroker(url, queue_name=f"tq{n}", result_backend=backend, **options)


async def fields_of(broker: TaskiqRedisBroker) -> list[list[bytes]]:
    entries = await broker.client.execute("XRANGE", broker.queue_name, "-", "+")
    return [e[1][0::2] for e in entries]


async def entries_once(broker: TaskiqRedisBroker, n: int) -> list[list[bytes]]:
    """The stream's entries' fields once it holds ``n`` (the caller's deadline bounds it)."""
    while True:
        fields = await fields_of(broker)
        if len(fields) >= n:
            return fields
        await trio.sleep(0.05)


async def test_every_entry_written_holds_data(redis_server: RedisServer) -> None:
    broker = make(redis_server.url, delay_poll_interval=0.05)
    seen: list[list[list[bytes]]] = []

    @broker.task(name="t:flaky", retries=1, retry_backoff=0)
    async def flaky(ctx: bus.Context = bus.CONTEXT) -> int:
        assert isinstance(ctx.broker, TaskiqRedisBroker)
        seen.append(await fields_of(ctx.broker))  # the entry running now is there
        if ctx.attempt == 1:
            raise RuntimeError("once")
        return ctx.attempt

    @broker.task(name="t:echo")
    async def echo(x: int) -> int:
        return x

    with trio.fail_after(30):
        async with broker:
            # Sent, delayed (the mover adds it when due) and unique: each is XADDed with
            # the field taskiq reads. No worker yet: the entries wait in the stream.
            await echo.kiq(1)
            await echo.kicker().with_delay(0.2).kiq(2)
            await echo.kicker().with_unique("k").kiq(3)
            assert await entries_once(broker, 3) == [[b"data"]] * 3
            codec = TaskiqCodec()
            entries = await broker.client.execute("XRANGE", broker.queue_name, "-", "+")
            assert sorted(codec.decode_message(e[1][1]).args[0] for e in entries) == [1, 2, 3]

            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 4)
                h = await flaky.kiq()
                assert (await h.wait_result(timeout=10)).unwrap() == 2
                worker.stop()
            # The retry (written by the Lua requeue) holds data too.
            written = [f for fs in seen for f in fs]
            assert written and written == [[b"data"]] * len(written)


async def test_an_abandoned_entry_is_reclaimed(redis_server: RedisServer) -> None:
    """An entry a taskiq consumer read and never acknowledged (it died) is run by a bus
    worker after visibility_timeout."""
    broker = make(redis_server.url, visibility_timeout=0.5, reap_interval=0.1)

    @broker.task(name="t:add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker:
            q = broker.queue_name
            await broker.client.execute("XGROUP", "CREATE", q, "taskiq", "0", "MKSTREAM")
            h = await add.kiq(2, 3)
            taken = await broker.client.execute(
                "XREADGROUP", "GROUP", "taskiq", "a-taskiq-worker", "COUNT", 1, "STREAMS", q, ">"
            )
            assert taken and taken[0][1]
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                assert (await h.wait_result(timeout=10)).unwrap() == 5
                worker.stop()


async def test_cancel_a_running_task(redis_server: RedisServer) -> None:
    broker = make(redis_server.url)
    started = trio.Event()

    @broker.task(name="t:forever")
    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 2)
            h = await forever.kiq()
            await started.wait()
            await h.cancel()
            r = await h.wait_result(timeout=10)
            assert r.status is bus.TaskStatus.CANCELLED
            worker.stop()


async def test_results_where_taskiq_reads_them(redis_server: RedisServer) -> None:
    broker = make(redis_server.url)
    backend = broker.result_backend
    assert isinstance(backend, TaskiqRedisResultBackend)

    @broker.task(name="t:add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 2)
            h = await add.kiq(1, 2)
            assert (await h.wait_result(timeout=10)).unwrap() == 3
            key = f"{backend.prefix_str}:{h.task_id}"
            raw = await broker.client.execute("GET", key)
            assert TaskiqCodec().decode_result(raw, task_id=h.task_id).return_value == 3
            assert 0 < await broker.client.execute("TTL", key) <= 600
            # A result taskiq wrote (no announcement, no task id of its own) is read,
            # by a waiter too (it polls), under a uuid4-hex id.
            tid = "0123456789ab4def8123456789abcdef"
            waiting, done = trio.Event(), trio.Event()
            got: list[bus.TaskResult[Any]] = []

            async def wait() -> None:
                waiting.set()
                got.append(await backend.wait_result(tid, timeout=10))
                done.set()

            nursery.start_soon(wait)
            await waiting.wait()
            value = b'{"is_err":false,"return_value":[1,"a"],"execution_time":0.1,"labels":{}}'
            await broker.client.execute("SET", f"{backend.prefix_str}:{tid}", value)
            await done.wait()
            assert got[0].task_id == tid and got[0].return_value == [1, "a"]
            assert (await backend.get_result(tid)).return_value == [1, "a"]
            assert await backend.is_ready(tid)
            worker.stop()


async def subscribed(broker: TaskiqRedisBroker, channel: bytes) -> None:
    """Once this process's subscription to ``channel`` is made (the caller's deadline
    bounds it)."""
    while True:
        if (await broker.client.execute("PUBSUB", "NUMSUB", channel))[1]:
            return
        await trio.sleep(0.01)


async def test_an_announced_result_wakes_its_waiter_whatever_its_id(
    redis_server: RedisServer,
) -> None:
    """The backend's own announcement format (the id, a newline, taskiq's value) wakes
    a waiter by itself (no polling, no key written): for a bus id and a uuid4-hex one,
    beside the announcements of tasks nobody waits for."""
    n = time.monotonic_ns()
    backend = TaskiqRedisResultBackend(redis_server.url, prefix_str=f"r{n}", poll_interval=None)
    broker = TaskiqRedisBroker(
        redis_server.url, queue_name=f"tq{n}", result_backend=backend, prefix=f"p{n}"
    )
    ids = [bus.TaskID.new(), bus.TaskID.parse(uuid.uuid4().hex, any_uuid=True)]
    got: dict[str, Any] = {}
    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:

            async def wait(tid: bus.TaskID) -> None:
                got[tid] = (await backend.wait_result(tid)).return_value

            for tid in ids:
                nursery.start_soon(wait, tid)
            await subscribed(broker, backend.channel)
            for i, tid in enumerate([bus.TaskID.new(), *ids]):
                value = b'{"is_err":false,"return_value":%d,"execution_time":0.1,"labels":{}}' % i
                announcement = backend.announcement(tid, value)
                await broker.client.execute("PUBLISH", backend.channel, announcement)
    assert got == {ids[0]: 1, ids[1]: 2}


def test_settings_that_taskiq_cannot_share() -> None:
    with pytest.raises(ValueError, match="signs no message"):
        TaskiqRedisBroker(secret="x" * 32)
    with pytest.raises(TypeError, match="queue_name"):
        TaskiqRedisBroker(queue="q")
    with pytest.raises(ValueError, match="not both"):
        TaskiqRedisResultBackend(result_ex_time=1, result_px_time=1000)
    with pytest.raises(ValueError, match="cannot be used with a secret"):
        bus.redis.RedisBroker(result_backend=TaskiqRedisResultBackend(), secret="x" * 32)
    keys = TaskiqKeys("bus", "taskiq")
    assert keys.stream == b"taskiq" and keys.streams == (b"taskiq",)
    assert keys.dead == b"{taskiq}:bus:dead" and keys.of("other").stream == b"other"


async def test_inspect_lists_its_stream(redis_server: RedisServer) -> None:
    plain = bus.redis.RedisBroker(redis_server.url, queue=f"plain{time.monotonic_ns()}")
    broker = make(redis_server.url, prefix=plain.settings.prefix)

    @plain.task(name="t:x")
    async def x() -> None: ...

    @broker.task(name="t:y")
    async def y() -> None: ...

    with trio.fail_after(30):
        async with plain:
            await x.kiq()
        async with broker:
            await y.kiq()
            info = await broker.inspect()
    assert list(info.queues) == [broker.queue_name]  # not the other broker's queue
    assert info.queued == 1 and info.details["stream"] == broker.queue_name
