"""The app the workflow process tests run: ``bus worker tests.workflows.wf_app:broker``.

Environment: BUS_TEST_URL (the test server), BUS_TEST_PREFIX (keys of this test),
BUS_TEST_VT (visibility timeout, seconds; default 2). Each task counts its runs in
Redis (``<prefix>:runs:<name>:<arg>``), so a test sees what ran where.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

import trio

import bus
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker


class CrashAfterTransition(bus.Middleware):
    """Ends the process (as a SIGKILL would: no cleanup) after the step labelled
    ``crash`` ran its transition and before its ack, the first time only (a key in
    Redis remembers)."""

    async def post_save(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
        if message.labels.get("crash"):
            client = cast(RedisBroker, self.broker).client
            if await client.execute("SET", f"{PREFIX}:crashed", "1", "NX"):
                os._exit(9)


def build(
    url: str, prefix: str, vt: float, *, crash: bool = False, secret: bytes | None = None
) -> RedisBroker:
    broker = make_redis_broker(url, prefix=prefix, visibility_timeout=vt, block=0.2, secret=secret)
    if crash:
        broker.with_middlewares(CrashAfterTransition())

    async def count(ctx: bus.Context, name: str, arg: Any) -> None:
        await cast(RedisBroker, ctx.broker).client.execute("INCR", f"{prefix}:runs:{name}:{arg}")

    @broker.task(name="wf.step")
    async def step(i: int, pause: float = 0.0, ctx: bus.Context = bus.CONTEXT) -> int:
        await count(ctx, "step", i)
        await trio.sleep(pause)
        return i

    @broker.task(name="wf.double")
    async def double(x: int, ctx: bus.Context = bus.CONTEXT) -> int:
        await count(ctx, "double", x)
        return 2 * x

    @broker.task(name="wf.body")
    async def body(xs: list[int], ctx: bus.Context = bus.CONTEXT) -> int:
        client = cast(RedisBroker, ctx.broker).client
        await client.execute("RPUSH", f"{prefix}:bodies", json.dumps(xs))
        return sum(xs)

    @broker.task(name="wf.boom")
    async def boom(x: int, ctx: bus.Context = bus.CONTEXT) -> int:
        await count(ctx, "boom", x)
        raise ValueError(f"boom after {x}")

    @broker.task(name="wf.alert")
    async def alert(failed: bus.TaskResult[Any], ctx: bus.Context = bus.CONTEXT) -> None:
        client = cast(RedisBroker, ctx.broker).client
        assert isinstance(failed, bus.TaskResult)  # on_error gets the failing step's result
        error = {"message": failed.error.message if failed.error else None}
        await client.execute("RPUSH", f"{prefix}:alerts", json.dumps({"error": error}))

    return broker


PREFIX = os.environ.get("BUS_TEST_PREFIX", "wf")
broker = build(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    PREFIX,
    float(os.environ.get("BUS_TEST_VT", "2")),
    crash=os.environ.get("BUS_TEST_CRASH") == "1",
)
