"""The app the observability tests run in real worker processes:
``bus worker tests.observability.redis_app:broker``.

Environment: BUS_TEST_URL (the test server) and BUS_TEST_PREFIX (keys of this test).
The test process builds its own copy with :func:`make_broker` (same names, same keys).
"""

from __future__ import annotations

import os

import trio

import bus
from bus.activity import ActivityMiddleware
from bus.metrics import PrometheusMiddleware
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker


def make_broker(url: str, prefix: str) -> RedisBroker:
    broker = make_redis_broker(
        url,
        prefix=prefix,
        block=0.2,
        heartbeat_interval=0.5,
        dead_letter_failures=True,
        middlewares=[PrometheusMiddleware(inspect_interval=0.2), ActivityMiddleware(interval=0.2)],
    )

    @broker.task(name="ok")
    async def ok(n: int) -> int:
        return n

    @broker.task(name="fail")
    async def fail(n: int) -> None:
        raise ValueError(f"fail #{n}")

    @broker.task(name="flaky", retries=1, retry_backoff=0)
    async def flaky(n: int, ctx: bus.Context = bus.CONTEXT) -> int:
        if ctx.attempt == 1:
            raise ConnectionError(f"flaky #{n} fails once")
        return n

    @broker.task(name="hold")
    async def hold(n: int, ctx: bus.Context = bus.CONTEXT) -> None:
        await ctx.set_progress({"step": "holding", "n": n})
        await trio.sleep_forever()

    @broker.task(name="once")
    async def once(key: str, ctx: bus.Context = bus.CONTEXT) -> str:
        """Fails the first time it runs for ``key`` (a dead letter to requeue), then works."""
        assert isinstance(ctx.broker, RedisBroker)
        if await ctx.broker.client.execute("INCR", f"{prefix}:once:{key}") == 1:
            raise RuntimeError(f"first run of {key} fails")
        return key

    return broker


broker = make_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    os.environ.get("BUS_TEST_PREFIX", "obs"),
)
