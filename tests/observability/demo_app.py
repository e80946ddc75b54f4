"""A made-up service for the dashboard's screenshot (tests/observability/screenshot.py):
a few tasks that take a while, report progress, and sometimes fail.

Environment: BUS_TEST_URL and BUS_TEST_PREFIX, as for the other test apps.
"""

from __future__ import annotations

import os
import random

import trio

import bus
from bus.activity import ActivityMiddleware
from bus.redis import RedisBroker, RedisResultBackend

URL = os.environ.get("BUS_TEST_URL", "redis://127.0.0.1:6379")
PREFIX = os.environ.get("BUS_TEST_PREFIX", "demo")
broker = RedisBroker(
    URL,
    prefix=PREFIX,
    queue="default",
    concurrency=4,
    heartbeat_interval=1.0,
    dead_letter_failures=True,
    result_backend=RedisResultBackend(URL, prefix=PREFIX, ttl=600),
    middlewares=[ActivityMiddleware(interval=1.0)],
)


@broker.task(name="reports.build")
async def build_report(day: str, ctx: bus.Context = bus.CONTEXT) -> str:
    for step in range(1, 21):
        await ctx.set_progress(step / 20)
        await trio.sleep(0.5)
    return f"report for {day}"


@broker.task(name="emails.send", retries=2, retry_backoff=0.5)
async def send_email(to: str) -> str:
    await trio.sleep(random.uniform(0.05, 0.3))
    if random.random() < 0.15:
        raise ConnectionError("SMTP server closed the connection")
    return f"sent to {to}"


@broker.task(name="images.resize")
async def resize(image: str, width: int) -> str:
    await trio.sleep(random.uniform(0.1, 0.4))
    if width > 4000:
        raise ValueError(f"{image}: width {width} is larger than the original")
    return f"{image}@{width}"
