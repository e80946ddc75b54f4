"""The taskiq side of the interop tests: a taskiq-redis stream broker and its JSON
result backend, as a taskiq user writes them. ``taskiq worker
tests.interop.taskiq_app:broker`` runs it; ``python -m tests.interop.taskiq_app``
is a taskiq producer that sends the cases and prints what taskiq's ``wait_result``
read, as JSON.

Its worker dead-letters what it cannot run (``dead_letter_unknown_tasks``).

Environment: BUS_TEST_URL, TASKIQ_TEST_QUEUE (the stream), BUS_TEST_PREFIX.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq.kicker import AsyncKicker
from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bus.interop.taskiq import dead_letter_unknown_tasks

CONTEXT = TaskiqDepends()  # taskiq's dependency marker for a task's Context
URL = os.environ["BUS_TEST_URL"]
QUEUE = os.environ["TASKIQ_TEST_QUEUE"]

broker = dead_letter_unknown_tasks(
    RedisStreamBroker(URL, queue_name=QUEUE, xread_block=200)
    .with_result_backend(RedisAsyncResultBackend(URL, serializer=JSONSerializer()))
    .with_middlewares(SimpleRetryMiddleware(default_retry_count=3)),
    prefix=os.environ.get("BUS_TEST_PREFIX", "bus"),
)


@broker.task(task_name="interop:add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(task_name="interop:labels")
async def labels(context: Context = CONTEXT) -> dict[str, Any]:
    return context.message.labels


@broker.task(task_name="interop:flaky")
async def flaky(context: Context = CONTEXT) -> int:
    done = int(context.message.labels.get("_retries", 0))
    if done < 2:
        raise RuntimeError(f"attempt {done + 1} fails")
    return done + 1


@broker.task(task_name="interop:boom")
async def boom() -> None:
    raise ValueError("boom 42")


@broker.task(task_name="interop:slow")
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


async def produce() -> dict[str, Any]:
    """Send every case as a taskiq producer does and wait for each result."""

    async def run(name: str, *args: Any, **labels: Any) -> dict[str, Any]:
        task = await AsyncKicker(task_name=name, broker=broker, labels=labels).kiq(*args)
        r = await task.wait_result(check_interval=0.05, timeout=60)
        return {
            "task_id": task.task_id,
            "is_err": r.is_err,
            "value": r.return_value,
            "error": None if r.error is None else type(r.error).__name__,
            "error_is_builtin": r.error is not None and type(r.error).__module__ == "builtins",
            "error_args": None if r.error is None else [str(a) for a in r.error.args],
            "labels": r.labels,
        }

    await broker.startup()
    try:
        out = {
            "add": await run("interop:add", 1, 2),
            "labels": await run("interop:labels", custom="x", n=5, ratio=0.5, flag=True),
            "flaky": await run(
                "interop:flaky", retry_on_error=True, max_retries=3, retry_backoff=0.05
            ),
            "boom": await run("interop:boom"),
            "timeout": await run("interop:slow", 30, timeout=0.2),
        }
        nobody = await AsyncKicker(task_name="interop:nobody", broker=broker, labels={}).kiq(7)
        out["nobody"] = nobody.task_id
        return out
    finally:
        await broker.shutdown()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(produce())))
