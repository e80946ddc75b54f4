"""The app the queue, priority and limit tests run in worker processes:
``python -m bus worker tests.redis.queues_app:broker --queue a``.

Environment: BUS_TEST_URL (the test server), BUS_TEST_PREFIX (keys of this test).
Each task writes what it saw to Redis, so the test reads every process's record.
"""

from __future__ import annotations

import json
import os
import time
from typing import cast

import trio

import bus
from bus.redis import RedisBroker
from bus.redis._ops import Client
from tests.redis.support import make_redis_broker


def build(url: str, prefix: str) -> RedisBroker:
    broker = make_redis_broker(url, prefix=prefix, block=0.2)

    def client(ctx: bus.Context) -> Client:
        return cast(RedisBroker, ctx.broker).client

    async def ran(ctx: bus.Context, kind: str) -> None:
        record = {"kind": kind, "queue": ctx.message.queue, "pid": os.getpid()}
        await client(ctx).execute("RPUSH", f"{prefix}:ran", json.dumps(record))

    @broker.task(name="in_a", queue="a")
    async def in_a(ctx: bus.Context = bus.CONTEXT) -> int:
        await ran(ctx, "in_a")
        return os.getpid()

    @broker.task(name="in_b", queue="b")
    async def in_b(ctx: bus.Context = bus.CONTEXT) -> int:
        await ran(ctx, "in_b")
        return os.getpid()

    @broker.task(name="limited", rate_limit="20/s")
    async def limited(ctx: bus.Context = bus.CONTEXT) -> None:
        started = time.time()  # the first thing it does
        await client(ctx).execute("RPUSH", f"{prefix}:starts", repr(started))

    @broker.task(name="free")
    async def free(sent: float) -> dict[str, float]:
        return {"latency": time.time() - sent, "pid": os.getpid()}

    @broker.task(name="capped", max_running=5)
    async def capped(ctx: bus.Context = bus.CONTEXT) -> None:
        c = client(ctx)
        now = await c.execute("INCR", f"{prefix}:running")
        await c.execute("RPUSH", f"{prefix}:seen", str(now))
        await trio.sleep(0.1)
        await c.execute("DECR", f"{prefix}:running")

    return broker


broker = build(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    os.environ.get("BUS_TEST_PREFIX", "queues"),
)
