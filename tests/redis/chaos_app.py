"""The app the chaos test runs: ``bus worker tests.redis.chaos_app:broker``.

Environment: BUS_TEST_URL, BUS_TEST_PREFIX, BUS_TEST_VT (visibility timeout),
BUS_TEST_RUNLOG (a folder: each process appends the index of every task it finished
to a file of its own, so a run is counted where it happened, never through Redis).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from tests.redis.support import make_redis_broker

broker = make_redis_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    prefix=os.environ.get("BUS_TEST_PREFIX", "chaos"),
    visibility_timeout=float(os.environ.get("BUS_TEST_VT", "20")),
)
_LOG = Path(os.environ.get("BUS_TEST_RUNLOG", ".")) / f"runs-{os.getpid()}.txt"


@broker.task(name="chaos.work")
async def work(i: int) -> int:
    await trio.sleep(0.002 * (i % 10))
    # Counted when the task function is done: a re-run is a second line somewhere.
    with _LOG.open("a") as f:
        f.write(f"{i}\n")
    return i * 2
