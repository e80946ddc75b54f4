"""Stops are bounded with sync tasks too, on Redis (real time: the broker does I/O).

A ``def`` task still running at the drain's deadline is abandoned in its thread and
handed back at the deadline, so another worker runs it; one whose function had
returned when the stop came is stored and acked, never handed back.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

import bus
from bus._protocol import CancelRunning
from bus._worker import WorkerActor
from bus.redis import RedisBroker
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


class Blocker:
    """A sync task's function that blocks until released (at most ``guard`` real
    seconds, so that a failing run ends) and tells Trio when it has started."""

    def __init__(self, guard: float = 20.0) -> None:
        self.guard = guard
        self.release = threading.Event()
        self.started = trio.Event()
        self.runs = 0

    def __call__(self, x: int) -> int:
        self.runs += 1
        trio.from_thread.run_sync(self.started.set)
        self.release.wait(self.guard)
        return x * 2


@pytest.fixture
async def blocker() -> AsyncIterator[Blocker]:
    b = Blocker()
    yield b
    b.release.set()  # the abandoned thread ends


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> list[WorkerActor]:
    """The worker actors started during the test."""
    started: list[WorkerActor] = []
    on_start = WorkerActor.on_start

    async def record(self: WorkerActor) -> None:
        started.append(self)
        await on_start(self)

    monkeypatch.setattr(WorkerActor, "on_start", record)
    return started


async def _stream(broker: RedisBroker) -> tuple[int, int]:
    """(entries in the stream, entries pending) of the broker's queue."""
    client = broker.client
    length = await client.execute("XLEN", broker.keys.stream)
    pending = await client.execute("XPENDING", broker.keys.stream, broker.group)
    return int(length), int(pending[0] or 0)


async def test_a_sync_task_running_at_the_deadline_is_handed_back_at_the_deadline(
    redis_url: str, blocker: Blocker
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    first = make_redis_broker(redis_url, prefix=prefix, shutdown_timeout=30)
    second = make_redis_broker(redis_url, prefix=prefix)
    blocked = first.task(name="blocked")(_blocking(blocker))
    second.task(name="blocked")(_blocking(blocker))
    with trio.fail_after(15):
        async with first, trio.open_nursery() as nursery:
            worker = await nursery.start(first.run_worker, 1)
            handle = await blocked.kiq(21)
            await blocker.started.wait()
            t0 = trio.current_time()
            interrupted = await worker.drain(0.5)
            elapsed = trio.current_time() - t0
            assert interrupted == 1
            assert 0.5 <= elapsed < 1.5, elapsed  # the deadline, not the thread's end
            assert await _stream(first) == (1, 0)  # handed back, nothing pending
            with pytest.raises(bus.ResultNotFound):
                await handle.get_result()
            worker.stop()
        blocker.release.set()
        async with second, trio.open_nursery() as nursery:  # another worker runs it
            await nursery.start(second.run_worker, 1)
            result = await second.result_backend.wait_result(handle.task_id, 10)
            assert result.status is bus.TaskStatus.SUCCESS and result.return_value == 42
            nursery.cancel_scope.cancel()
    assert blocker.runs == 2


@pytest.mark.parametrize("told_trio", [True, False], ids=["result-delivered", "result-in-flight"])
async def test_a_sync_task_that_finished_as_the_stop_came_is_acked_not_handed_back(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    workers: list[WorkerActor],
    told_trio: bool,
) -> None:
    broker = make_redis_broker(redis_url)
    runs: list[int] = []

    @broker.task
    def double(x: int) -> int:
        runs.append(x)
        return x * 2

    real = trio.to_thread.run_sync

    async def run_sync(fn: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        # The function has returned; the drain's deadline lands before the runner
        # records it (after Trio delivered the thread's result, or before).
        value = await real(fn, *args, **kwargs)
        (worker,) = workers
        for tid in list(worker.running):
            worker.cancel_running(CancelRunning(tid, "shutdown"))
        if not told_trio:
            await trio.lowlevel.checkpoint()  # raises Cancelled
        return value

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    with trio.fail_after(15):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 1)
            handle = await double.kiq(21)
            result = await handle.wait_result(timeout=10)
            assert result.status is bus.TaskStatus.SUCCESS and result.return_value == 42
            await worker.drain(1)
            worker.stop()
        # Its last acks written, the broker is gone: look at the queue afresh.
        check = make_redis_broker(redis_url, prefix=broker.keys.prefix)
        async with check:
            assert await _stream(check) == (0, 0)  # acked and deleted, not handed back
    assert runs == [21]


def _blocking(blocker: Blocker) -> Callable[[int], int]:
    def blocked(x: int) -> int:
        return blocker(x)

    return blocked
