"""The app of the stop tests: ``bus worker tests.cli.stop_app:broker``.

``python -m tests.cli.stop_app N SECONDS OFFSET`` sends N tasks ``job(OFFSET + i,
SECONDS)``. Each run counts itself in Redis: ``{prefix}:run:{i}`` and
``{prefix}:started``. Environment: BUS_TEST_URL, BUS_TEST_PREFIX.
"""

from __future__ import annotations

import os
import sys
from typing import cast

import trio

import bus
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker

PREFIX = os.environ.get("BUS_TEST_PREFIX", "stop")
broker = make_redis_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"), prefix=PREFIX, block=0.2
)


@broker.task(name="job")
async def job(i: int, seconds: float, ctx: bus.Context = bus.CONTEXT) -> int:
    client = cast(RedisBroker, ctx.broker).client
    await client.pipeline([("INCR", f"{PREFIX}:run:{i}"), ("INCR", f"{PREFIX}:started")])
    await trio.sleep(seconds)
    return i


async def _send(n: int, seconds: float, offset: int) -> None:
    async with broker:
        handles = await job.kiq_many((offset + i, seconds) for i in range(n))
        # Which task id each number got: a failure's report looks its result up.
        await broker.client.pipeline(
            [("SET", f"{PREFIX}:tid:{offset + i}", str(h.task_id)) for i, h in enumerate(handles)]
        )


if __name__ == "__main__":
    trio.run(_send, int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
