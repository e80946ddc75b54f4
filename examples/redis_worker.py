"""A Redis worker process: runs the tasks that ``redis_producer.py`` sends.

Start Redis 7+, then in one shell ``python examples/redis_worker.py`` and in another
``python examples/redis_producer.py``. Settings come from the environment:
``BUS_REDIS_URL`` (default ``redis://127.0.0.1:6379``) and ``BUS_REDIS_QUEUE``.
"""

from __future__ import annotations

import os

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


def main() -> None:
    trio.run(broker.run_worker, 16)  # until Ctrl+C


if __name__ == "__main__":
    main()
