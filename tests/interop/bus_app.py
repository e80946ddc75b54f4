"""The bus side of the interop tests: ``bus worker tests.interop.bus_app:broker``.

Environment: BUS_TEST_URL, TASKIQ_TEST_QUEUE (the stream), BUS_TEST_PREFIX.
"""

from __future__ import annotations

import os
from typing import Any

import trio

import bus
from bus.interop.taskiq import TaskiqRedisBroker

broker = TaskiqRedisBroker(
    os.environ["BUS_TEST_URL"],
    queue_name=os.environ["TASKIQ_TEST_QUEUE"],
    prefix=os.environ.get("BUS_TEST_PREFIX", "bus"),
)


@broker.task(name="interop:add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(name="interop:labels")
async def labels(ctx: bus.Context = bus.CONTEXT) -> dict[str, Any]:
    return dict(ctx.labels)


@broker.task(name="interop:flaky")
async def flaky(ctx: bus.Context = bus.CONTEXT) -> int:
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


@broker.task(name="interop:boom")
async def boom() -> None:
    raise ValueError("boom 42")


@broker.task(name="interop:slow")
async def slow(seconds: float) -> str:
    await trio.sleep(seconds)
    return "done"
