"""The Redis drain deadline: a task still running when a drain's time is up is handed
back to the queue at once (docs/redis.md, docs/cli.md), not left pending until its
visibility timeout lets another worker claim it.

The visibility timeout here is a minute, far beyond the test's deadline: a missing
hand-back is not hidden by redelivery."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import bus
from bus.redis import RedisBroker

pytestmark = pytest.mark.redis

VISIBILITY_TIMEOUT = 60.0


async def test_a_task_running_at_the_drain_deadline_is_handed_back_at_once(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    runs: list[str] = []
    started = trio.Event()

    def make(who: str) -> RedisBroker:
        broker = make_broker(prefix=prefix, visibility_timeout=VISIBILITY_TIMEOUT, block=0.2)

        @broker.task(name="drain.long")
        async def long() -> str:
            runs.append(who)
            if who == "first":
                started.set()
                await trio.sleep_forever()  # still running at the deadline
            return who

        return broker

    first, second = make("first"), make("second")
    task = first.find_task("drain.long")
    assert task is not None
    with trio.fail_after(VISIBILITY_TIMEOUT / 3):
        async with first, second, trio.open_nursery() as nursery:
            worker = await nursery.start(first.run_worker, 1)
            handle = await task.kiq()
            await started.wait()
            assert await worker.drain(0.2) == 1  # interrupted at the deadline
            worker.stop()
            # Not a result: the task goes back to the queue, for another worker.
            assert not await handle.is_ready()
            other = await nursery.start(second.run_worker, 1)
            result = await handle.wait_result(timeout=10)  # a sixth of the visibility timeout
            # The result is stored before its entry is acked: then nothing is pending,
            # neither the copy nor the entry the first worker had.
            while await _pending(first):  # noqa: ASYNC110 (Redis)
                await trio.sleep(0.02)
            other.stop()
    assert result.status is bus.TaskStatus.SUCCESS
    assert result.return_value == "second"
    assert runs == ["first", "second"]


async def _pending(broker: RedisBroker) -> int:
    summary = await broker.client.execute("XPENDING", broker.keys.stream, broker.group)
    return int(summary[0] or 0)
