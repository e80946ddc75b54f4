"""Redis-specific behaviour beyond the shared contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import bus
import bus.protocol
from bus.redis import RedisBroker

pytestmark = pytest.mark.redis


async def test_cancel_reaches_a_task_running_in_another_broker(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    worker_side, producer = make_broker(prefix=prefix), make_broker(prefix=prefix)
    started = trio.Event()
    for b in (worker_side, producer):

        @b.task(name="x.long")
        async def long() -> None:
            started.set()
            await trio.sleep(30)

    task = producer.find_task("x.long")
    assert task is not None
    with trio.fail_after(10):
        async with worker_side, producer, trio.open_nursery() as nursery:
            w = await nursery.start(worker_side.run_worker, 2)
            h = await task.kiq()
            await started.wait()
            await producer.cancel_task(h.task_id)
            result = await h.wait_result(timeout=5)
            # The cancel arrives through Redis pub/sub; the worker ends the task.
            while (await worker_side.ref.ask(bus.protocol.Inspect()))["running"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
            w.stop()
    assert result.status is bus.TaskStatus.CANCELLED


async def test_kick_many_and_delays_with_several_workers(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    runs: dict[int, int] = {}
    brokers = [make_broker(prefix=prefix, delay_poll_interval=0.05) for _ in range(3)]
    for b in brokers:

        @b.task(name="x.count")
        async def count(i: int) -> int:
            runs[i] = runs.get(i, 0) + 1
            return i

    task = brokers[0].find_task("x.count")
    assert task is not None
    with trio.fail_after(15):
        async with brokers[0], brokers[1], brokers[2], trio.open_nursery() as nursery:
            workers = [await nursery.start(b.run_worker, 4) for b in brokers]
            now = [task.kicker().message(i) for i in range(50)]
            later = [task.kicker().with_delay(0.2).message(i) for i in range(50, 80)]
            await brokers[0].kick_many(now + later)
            results = await bus.gather(
                *(bus.TaskHandle(m.task_id, brokers[0]) for m in now + later), timeout=10
            )
            for w in workers:
                w.stop()
    assert [r.return_value for r in results] == list(range(80))
    assert all(n == 1 for n in runs.values())
    assert len(runs) == 80


async def test_unencodable_return_value_is_a_failure(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()

    @broker.task
    async def weird() -> object:
        return object()

    with trio.fail_after(10):
        async with broker, trio.open_nursery() as nursery:
            w = await nursery.start(broker.run_worker, 1)
            result = await (await weird.kiq()).wait_result(timeout=5)
            w.stop()
    assert result.status is bus.TaskStatus.FAILURE
    assert result.error is not None
    assert result.error.type_name == "bus.UnencodableResult"


async def test_max_deliveries_dead_letters(make_broker: Callable[..., RedisBroker]) -> None:
    broker = make_broker(max_deliveries=1, visibility_timeout=0.2, reap_interval=0.05)

    @broker.task
    async def poison() -> None:
        pass

    with trio.fail_after(10):
        async with broker:
            h = await poison.kiq()
            client = broker.client
            stream, group = broker.keys.stream, broker.group
            await client.execute("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
            # A consumer takes it and dies without acking.
            await client.execute(
                "XREADGROUP", "GROUP", group, "ghost", "COUNT", 1, "STREAMS", stream, ">"
            )
            async with trio.open_nursery() as nursery:
                w = await nursery.start(broker.run_worker, 1)
                result = await h.wait_result(timeout=5)
                w.stop()
            dead = await broker.dead_letters()
    assert result.status is bus.TaskStatus.FAILURE
    assert result.error is not None
    assert "max_deliveries=1" in result.error.message
    assert len(dead) == 1
    assert "max_deliveries" in dead[0]["reason"]
    assert dead[0]["task_id"] == str(h.task_id)


async def test_signed_messages(make_broker: Callable[..., RedisBroker]) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    good = make_broker(prefix=prefix, secret="k1" * 16)
    forger = make_broker(prefix=prefix, secret="k2" * 16)
    for b in (good, forger):

        @b.task(name="x.add")
        async def add(a: int, b: int) -> int:
            return a + b

    ok_task, forged_task = good.find_task("x.add"), forger.find_task("x.add")
    assert ok_task is not None
    assert forged_task is not None
    with trio.fail_after(10):
        async with good, forger, trio.open_nursery() as nursery:
            w = await nursery.start(good.run_worker, 2)
            forged = await forged_task.kiq(1, 1)
            h = await ok_task.kiq(2, 3)
            assert (await h.wait_result(timeout=5)).return_value == 5
            while not await good.dead_letters():  # noqa: ASYNC110 (watching another process)
                await trio.sleep(0.01)
            w.stop()
            dead = await good.dead_letters()
            assert not await good.result_backend.is_ready(forged.task_id)
    assert dead[0]["reason"] == "message signature is wrong"


async def test_the_actor_tree_of_a_running_redis_worker(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()

    @broker.task
    async def noop() -> None:
        pass

    with trio.fail_after(10):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 2)
            await (await noop.kiq()).wait_result(timeout=5)
            assert broker.system is not None
            tree = broker.system.tree()
            print(tree)
            worker.stop()
    lines = tree.splitlines()
    assert lines[0] == "actors"
    for kind in (
        "(ConnectionActor,",
        "(SubscriptionActor,",
        "(RedisResultStoreActor,",
        "(RedisBrokerActor,",
        "(DelayedMoverActor,",
        "(StreamReaderActor,",
        "(WorkerActor,",
    ):
        assert kind in tree, kind
    # The link (the command connection, restarted when it breaks) and the subscription
    # belong to the connection actor; the reader and mover to the broker.
    conn = next(i for i, line in enumerate(lines) if "ConnectionActor" in line)
    assert "(_LinkActor," in lines[conn + 1] and lines[conn + 1].startswith("│   ├── ")
    assert "(SubscriptionActor," in lines[conn + 2] and lines[conn + 2].startswith("│   └── ")
    broker_line = next(i for i, line in enumerate(lines) if "RedisBrokerActor" in line)
    children = [line for line in lines[broker_line + 1 : broker_line + 3]]
    assert any("DelayedMoverActor" in c for c in children)
    assert any("StreamReaderActor" in c for c in children)
