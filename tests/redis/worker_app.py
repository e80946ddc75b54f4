"""A worker process for the fault tests: ``python -m tests.redis.worker_app``.

Environment: BUS_TEST_URL, BUS_TEST_PREFIX, BUS_TEST_VT (visibility timeout, seconds),
BUS_TEST_CONCURRENCY.
"""

from __future__ import annotations

import os
from typing import cast

import trio

import bus
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker


def build(url: str, prefix: str, vt: float) -> RedisBroker:
    broker = make_redis_broker(url, prefix=prefix, visibility_timeout=vt)

    @broker.task(name="fault.sleepy", retries=10, retry_backoff=0.1)
    async def sleepy(i: int, ctx: bus.Context = bus.CONTEXT) -> int:
        b = cast(RedisBroker, ctx.broker)
        await b.client.execute("INCR", f"{prefix}:runs:{i}")
        await trio.sleep(0.005)
        return i

    @broker.task(name="fault.add")
    async def add(a: int, b: int) -> int:
        return a + b

    return broker


def main() -> None:
    broker = build(
        os.environ["BUS_TEST_URL"],
        os.environ["BUS_TEST_PREFIX"],
        float(os.environ.get("BUS_TEST_VT", "2")),
    )
    trio.run(broker.run_worker, int(os.environ.get("BUS_TEST_CONCURRENCY", "50")))


if __name__ == "__main__":
    main()
