"""The app of the schedule and unique-job tests, run by ``bus worker`` processes.

``python -m tests.cli.sched_app schedule NAME SECONDS``: add a run-time schedule of
``record`` every SECONDS. ``python -m tests.cli.sched_app unique N``: send the
unique task ``build`` N times at once, count them in ``sent``, and print each handle's
task id and result (``build`` returns once the key ``go`` is set).
Environment: BUS_TEST_URL, BUS_TEST_PREFIX.
"""

from __future__ import annotations

import json
import os
import sys
from typing import cast

import trio

import bus
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker

PREFIX = os.environ.get("BUS_TEST_PREFIX", "sched")
broker = make_redis_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"), prefix=PREFIX, block=0.2
)


@broker.task(name="beat", schedule=bus.every(1))
async def beat(ctx: bus.Context = bus.CONTEXT) -> None:
    tick = ctx.labels["tick"]
    client = cast(RedisBroker, ctx.broker).client
    await client.pipeline([("RPUSH", f"{PREFIX}:beats", repr(tick))])


@broker.task(name="record")
async def record(what: str, ctx: bus.Context = bus.CONTEXT) -> None:
    client = cast(RedisBroker, ctx.broker).client
    await client.execute("RPUSH", f"{PREFIX}:records", f"{what}@{ctx.labels['tick']!r}")


@broker.task(name="build", unique=True)
async def build(version: str, ctx: bus.Context = bus.CONTEXT) -> str:
    client = cast(RedisBroker, ctx.broker).client
    await client.execute("INCR", f"{PREFIX}:builds")
    # It runs until the test says every sender has sent (the key `go`, taken here).
    while not await client.execute("GETDEL", f"{PREFIX}:go"):  # noqa: ASYNC110 (another process)
        await trio.sleep(0.02)
    return f"built {version}"


async def _schedule(name: str, seconds: float) -> None:
    async with broker:
        await broker.schedule(record, bus.every(seconds), args=[name], name=name)


async def _unique(n: int) -> None:
    async with broker:
        handles: list[bus.TaskHandle[str]] = []

        async def send() -> None:
            handles.append(await build.kiq("1.0"))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(send)
        await broker.client.execute("INCRBY", f"{PREFIX}:sent", n)
        results = await bus.gather(*handles, timeout=60)
        print(
            json.dumps(
                [[str(h.task_id), r.return_value] for h, r in zip(handles, results, strict=True)]
            )
        )


if __name__ == "__main__":
    if sys.argv[1] == "schedule":
        trio.run(_schedule, sys.argv[2], float(sys.argv[3]))
    else:
        trio.run(_unique, int(sys.argv[2]))
