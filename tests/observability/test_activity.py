"""ActivityMiddleware: what runs now and what failed, in memory and on Redis."""

from __future__ import annotations

import pytest
import trio

import bus
from bus.activity import ActivityMiddleware, read_activity
from tests.observability.redis_app import make_broker
from tests.observability.support import eventually
from tests.redis.server import RedisServer


async def test_in_memory_activity_is_read_from_the_middleware() -> None:
    broker = bus.InMemoryBroker().with_middlewares(ActivityMiddleware())
    gate, started = trio.Event(), trio.Event()

    @broker.task(name="hold")
    async def hold() -> None:
        started.set()
        await gate.wait()

    @broker.task(name="boom", retries=1, retry_backoff=0)
    async def boom() -> None:
        raise KeyError("no such key")

    with trio.fail_after(5):
        async with broker:
            assert await read_activity(broker) == bus.activity.Activity([], [])
            handle = await hold.kiq()
            await started.wait()
            activity = await read_activity(broker)
            assert activity is not None
            (worker,) = activity.workers
            assert [r["task_id"] for r in worker["running"]] == [str(handle.task_id)]
            assert worker["running"][0]["task_name"] == "hold"
            await (await boom.kiq()).wait_result()
            gate.set()
            await broker.wait_all()
            activity = await read_activity(broker, failures=10)
    assert activity is not None
    assert activity.workers[0]["running"] == []
    assert activity.workers[0]["stats"]["failed"] == 2
    assert [(f["attempt"], f["retrying"], f["status"]) for f in activity.failures] == [
        (2, False, "failure"),
        (1, True, "failure"),
    ]  # newest first
    assert activity.failures[0]["error_type"] == "KeyError"
    assert "no such key" in activity.failures[0]["error"]
    assert 'raise KeyError("no such key")' in activity.failures[0]["traceback"]
    assert await read_activity(bus.InMemoryBroker()) is None  # no middleware: nothing


@pytest.mark.redis
async def test_redis_workers_publish_records_and_failures(redis_server: RedisServer) -> None:
    prefix = f"a{bus.TaskID.new()[-12:]}"
    worker_broker = make_broker(redis_server.url, prefix)
    producer = make_broker(redis_server.url, prefix)
    with trio.fail_after(20):
        async with producer, trio.open_nursery() as nursery:
            worker = await nursery.start(worker_broker.run_worker, 4)
            holding = await producer.tasks["hold"].kiq(1)
            await producer.tasks["fail"].kiq(7)

            async def seen() -> bus.activity.Activity | None:
                a = await read_activity(producer)
                assert a is not None and a.failures and a.workers
                assert a.workers[0]["running_count"] == 1
                return a

            activity = await eventually(seen)
            (record,) = activity.workers
            assert record["worker"] == worker_broker.settings.consumer
            assert record["running"][0]["task_id"] == str(holding.task_id)
            assert record["running"][0]["queue"] == "q"
            (failure,) = activity.failures
            assert failure["task_name"] == "fail" and failure["error"] == "fail #7"
            assert failure["worker"] == worker_broker.settings.consumer
            await holding.cancel()
            worker.stop()
        # A worker that stopped cleanly takes its record away; failures stay.
        async with producer:
            activity = await read_activity(producer)
    assert activity is not None
    assert activity.workers == [] and len(activity.failures) == 1
