"""store_result=False on Redis: the worker writes no result key and publishes nothing
on the results channel for the task (issue 21)."""

from __future__ import annotations

import pytest
import trio

import bus
from bus.redis import RedisResultBackend
from tests.redis.server import RedisServer
from tests.redis.support import commandstats, make_redis_broker

pytestmark = pytest.mark.redis


async def test_no_set_and_no_publish_for_a_task_that_stores_no_result(
    redis_server: RedisServer,
) -> None:
    broker = make_redis_broker(redis_server.url, block=0.2)
    backend = broker.result_backend
    assert isinstance(backend, RedisResultBackend)

    @broker.task(name="quiet", store_result=False)
    async def quiet() -> int:
        return 1

    @broker.task(name="loud")
    async def loud() -> int:
        return 2

    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:
            # Commands that reach Redis from now on, seen by the server itself.
            before = await commandstats(broker)
            w = await nursery.start(broker.run_worker, 1)
            silent = await quiet.kiq()
            heard = await loud.kiq()
            assert (await heard.wait_result(timeout=10)).return_value == 2  # one at a time
            after = await commandstats(broker)
            client = broker.client
            assert await client.execute("EXISTS", backend.result_key(str(silent.task_id))) == 0
            assert await client.execute("EXISTS", backend.result_key(str(heard.task_id))) == 1
            w.stop()
    # Two tasks ran, one result was announced: the loud task's.
    assert after.get("publish", 0) - before.get("publish", 0) == 1


def test_the_option_is_a_task_option() -> None:
    assert bus.TaskOptions(store_result=False).store_result is False
