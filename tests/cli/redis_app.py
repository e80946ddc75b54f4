"""The app the CLI's Redis tests run: ``bus worker tests.cli.redis_app:broker``.

Environment: BUS_TEST_URL (the test server), BUS_TEST_PREFIX (keys of this test),
BUS_TEST_VT (visibility timeout, seconds; default 2).
"""

from __future__ import annotations

import os
from typing import cast

import trio

import bus
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker

PREFIX = os.environ.get("BUS_TEST_PREFIX", "cli")
broker = make_redis_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    prefix=PREFIX,
    visibility_timeout=float(os.environ.get("BUS_TEST_VT", "2")),
    block=0.2,
)


@broker.task(name="add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(name="sleep")
async def sleep(seconds: float, ctx: bus.Context = bus.CONTEXT) -> float:
    client = cast(RedisBroker, ctx.broker).client
    await client.execute("INCR", f"{PREFIX}:started")
    await trio.sleep(seconds)
    await client.execute("INCR", f"{PREFIX}:finished")
    return seconds


@broker.task(name="stubborn")
async def stubborn(seconds: float) -> float:
    """A task that shields itself from cancellation, so neither a drain nor a second
    stop request can end it. (A sync task no longer does: a stop abandons its thread.)"""
    with trio.CancelScope(shield=True):
        await trio.sleep(seconds)
    return seconds


@broker.task(name="flaky")
async def flaky(why: str) -> None:
    raise RuntimeError(why)
