"""A Redis worker process: runs the tasks that ``redis_producer.py`` sends.

Start Redis 7+, then in one shell ``python examples/redis_worker.py`` and in another
``python examples/redis_producer.py``. Settings come from the environment:
``BUS_REDIS_URL`` (default ``redis://127.0.0.1:6379``) and ``BUS_REDIS_QUEUE``.

Ctrl-C (or SIGTERM) drains: running tasks get the shutdown timeout to finish, what
still runs then goes back to the queue, and the process exits 0. A second one ends
it at once. ``bus worker redis_worker:broker`` runs the same worker.
Needs the extra ``trio-bus[redis]``.
"""

from __future__ import annotations

import os
import sys

import trio

import bus
from bus.redis import RedisBroker, RedisResultBackend

URL = os.environ.get("BUS_REDIS_URL", "redis://127.0.0.1:6379")
QUEUE = os.environ.get("BUS_REDIS_QUEUE", "examples")

broker = RedisBroker(URL, queue=QUEUE, visibility_timeout=30).with_result_backend(
    RedisResultBackend(URL, ttl=3600)
)


@broker.task(name="examples.add")
async def add(a: int, b: int) -> int:
    await trio.sleep(0.01)  # pretend to do some I/O
    return a + b


@broker.task(name="examples.report", retries=2, retry_backoff=0.1)
async def report(day: str, ctx: bus.Context = bus.CONTEXT) -> str:
    await ctx.set_progress({"step": "writing"})
    return f"report for {day} (attempt {ctx.attempt})"


@broker.task(name="examples.pause")
async def pause(seconds: float, ctx: bus.Context = bus.CONTEXT) -> float:
    await ctx.set_progress({"step": "pausing"})
    await trio.sleep(seconds)  # pretend to wait for a slow service
    return seconds


def main() -> int:
    # Until SIGINT or SIGTERM; the first drains, a second ends at once.
    return bus.run_worker_process(broker, 16)


if __name__ == "__main__":
    sys.exit(main())
