"""The app of the stop tests: ``bus worker tests.cli.stop_app:broker``.

``python -m tests.cli.stop_app N SECONDS OFFSET [TASK]`` sends N tasks ``job(OFFSET +
i, SECONDS)`` (or ``sync_job``). Each run counts itself in Redis: ``{prefix}:run:{i}``
and ``{prefix}:started``; a ``sync_job`` run that returns counts ``{prefix}:done:{i}``.
Environment: BUS_TEST_URL, BUS_TEST_PREFIX.
"""

from __future__ import annotations

import os
import sys
import time
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


async def _count(*keys: str) -> int:
    replies = await broker.client.pipeline([("INCR", key) for key in keys])
    return int(replies[0])


@broker.task(name="sync_job")
def sync_job(i: int, seconds: float) -> int:
    """A sync task that sleeps ``seconds`` in its first run only (a thread Trio cannot
    interrupt), so the run that takes it over after a stop is quick."""
    runs = trio.from_thread.run(_count, f"{PREFIX}:run:{i}", f"{PREFIX}:started")
    if runs == 1:
        time.sleep(seconds)
    trio.from_thread.run(_count, f"{PREFIX}:done:{i}")
    return i


async def _send(n: int, seconds: float, offset: int, task: str = "job") -> None:
    sender = sync_job if task == "sync_job" else job
    async with broker:
        handles = await sender.kiq_many((offset + i, seconds) for i in range(n))
        # Which task id each number got: a failure's report looks its result up.
        await broker.client.pipeline(
            [("SET", f"{PREFIX}:tid:{offset + i}", str(h.task_id)) for i, h in enumerate(handles)]
        )


if __name__ == "__main__":
    trio.run(_send, int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
