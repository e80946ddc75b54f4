"""The app of tests/cli/test_first_hour.py: a Redis broker whose task logs through the
standard library. Environment: BUS_TEST_URL, BUS_TEST_PREFIX; FIRST_HOUR_CRASH=1 makes
every worker process that a supervisor starts exit 3 at import."""

from __future__ import annotations

import logging
import os

import bus
from tests.redis.support import make_redis_broker

if os.environ.get("FIRST_HOUR_CRASH") and os.environ.get("BUS_WORKER_SLOT") is not None:
    raise SystemExit(3)

broker = make_redis_broker(
    os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379"),
    prefix=os.environ.get("BUS_TEST_PREFIX", "first"),
    visibility_timeout=5,
    block=0.2,
)


@broker.task(name="chatty")
async def chatty(n: int) -> int:
    logging.getLogger("jobs").info("hello from info %d", n)
    logging.warning("careful %d", n)
    return n


@broker.task(name="labelled")
async def labelled(ctx: bus.Context = bus.CONTEXT) -> dict[str, object]:
    return {k: v for k, v in ctx.labels.items() if k in ("team", "n")}


@broker.task(name="fragile", retries=1, retry_backoff=0)
async def fragile() -> None:
    raise RuntimeError("the service is down")
