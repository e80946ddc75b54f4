"""The pytest plugin's fixtures, used as a user would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

import bus
import bus.testing
from bus.redis import RedisBroker
from tests.plugin import app


async def test_bus_broker_is_running(bus_broker: bus.InMemoryBroker) -> None:
    @bus_broker.task
    async def double(x: int) -> int:
        return 2 * x

    # Registered after the broker started: the worker still finds it by name.
    with trio.fail_after(5):
        assert (await (await double.kiq(21)).wait_result()).return_value == 42


async def test_bus_in_memory_runs_a_redis_apps_tasks_without_redis(
    bus_in_memory: Callable[..., Any],
) -> None:
    with trio.fail_after(5):
        async with bus_in_memory(app.broker) as mem:
            assert isinstance(mem, bus.InMemoryBroker)
            result = await (await app.greet.kiq("ada")).wait_result()
            assert result.return_value == "hello ada"
            retried = await (await app.greet.kiq("flaky")).wait_result()
            assert retried.return_value == "hello flaky"  # options kept: retries=1
    assert app.greet.broker is app.broker  # restored
    assert app.seen[-3:] == ["ada", "flaky", "flaky"]


async def test_bus_redis_url_is_a_private_server(bus_redis_url: str) -> None:
    broker = RedisBroker(bus_redis_url, queue=f"plugin-{bus.TaskID.new()[-8:]}")

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(10):
        async with bus.testing.run_broker(broker):
            assert (await (await add.kiq(1, 2)).wait_result()).return_value == 3
