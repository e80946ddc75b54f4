"""Stops are bounded with sync tasks too (in memory, on Trio's virtual clock).

A ``def`` task runs in a worker thread, which Trio cannot interrupt. At the shutdown
deadline the worker abandons the thread (it runs on in the background, its outcome
discarded) and records the task CANCELLED at once; a task whose function had
returned when the stop came is recorded as it finished, never as interrupted.

Each blocked function waits on a ``threading.Event`` that the test sets at the end;
its real-time guard only keeps a failing run (one that waits for the thread) from
hanging for ever. A thread works in real time, so the virtual clock jumps only after
a second of real idleness (``clock``) until the thread is parked on its event.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

import bus
from bus._protocol import CancelRunning
from bus._worker import WorkerActor

GUARD = 10.0  # real seconds: how long a blocked function waits at most


class Blocker:
    """A sync task's function that blocks until released; it tells Trio when it has
    started and counts the runs that returned."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.returned = 0
        self.started = trio.Event()

    def __call__(self, x: int) -> int:
        trio.from_thread.run_sync(self.started.set)
        self.release.wait(GUARD)
        self.returned += 1
        return x * 2


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """The virtual clock, jumping only after a second of real idleness: a thread that
    starts or returns takes real time, and no deadline may pass meanwhile."""
    autojump_clock.autojump_threshold = 1.0
    return autojump_clock


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


@pytest.fixture
async def blocker() -> AsyncIterator[Blocker]:
    b = Blocker()
    yield b
    b.release.set()  # the abandoned thread ends


def _blocked(broker: bus.Broker, blocker: Blocker) -> bus.SyncTask[[int], int]:
    @broker.task
    def blocked(x: int) -> int:
        return blocker(x)

    return blocked


async def test_a_sync_task_running_at_the_shutdown_deadline_is_abandoned(
    clock: trio.testing.MockClock, blocker: Blocker
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, shutdown_timeout=1)
    blocked = _blocked(broker, blocker)

    with trio.fail_after(5):
        async with broker:
            handle = await blocked.kiq(21)
            await blocker.started.wait()
            clock.autojump_threshold = 0  # the thread is parked: time may jump
            t0 = trio.current_time()
        # Left at the deadline, not when the thread returns (it has not).
        assert trio.current_time() - t0 == pytest.approx(1, abs=0.05)
        assert blocker.returned == 0
        result = await handle.get_result()
    assert result.status is bus.TaskStatus.CANCELLED
    assert broker.stats.cancelled == 1 and broker.stats.succeeded == 0


async def test_cancelling_the_broker_abandons_a_running_sync_task(
    clock: trio.testing.MockClock, blocker: Blocker
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, shutdown_timeout=30)
    blocked = _blocked(broker, blocker)

    with trio.fail_after(5):
        t0 = trio.current_time()
        with trio.move_on_after(1):
            async with broker:
                handle = await blocked.kiq(21)
                await blocker.started.wait()
                clock.autojump_threshold = 0  # the thread is parked: time may jump
                await trio.sleep_forever()
        assert trio.current_time() - t0 == pytest.approx(1, abs=0.05)
        assert blocker.returned == 0
        with pytest.raises(bus.ResultNotFound):
            await handle.get_result()  # cancelled by Trio: nothing is recorded


def _stop_just_after_it_returned(
    monkeypatch: pytest.MonkeyPatch, workers: list[WorkerActor], told_trio: bool
) -> None:
    """Make the drain's deadline land when the sync task's function has returned but
    before the runner recorded it: ``told_trio`` after Trio handed the runner the
    thread's result, else before (the thread's result not yet delivered: Trio's
    ``abandon_on_cancel`` wait raises Cancelled)."""
    real = trio.to_thread.run_sync

    async def run_sync(fn: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        value = await real(fn, *args, **kwargs)  # the function has returned
        (worker,) = workers
        for tid in list(worker.running):
            worker.cancel_running(CancelRunning(tid, "shutdown"))
        if not told_trio:
            await trio.lowlevel.checkpoint()  # raises Cancelled
        return value

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@pytest.mark.parametrize("told_trio", [True, False], ids=["result-delivered", "result-in-flight"])
async def test_a_sync_task_that_finished_as_the_stop_came_is_recorded(
    clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    workers: list[WorkerActor],
    told_trio: bool,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1)

    @broker.task
    def double(x: int) -> int:
        return x * 2

    _stop_just_after_it_returned(monkeypatch, workers, told_trio)
    with trio.fail_after(5):
        async with broker:
            result = await (await double.kiq(21)).wait_result(timeout=2)
    assert result.status is bus.TaskStatus.SUCCESS
    assert result.return_value == 42
    assert broker.stats.succeeded == 1 and broker.stats.cancelled == 0


async def test_an_async_task_that_returns_when_the_stop_cancels_it_is_recorded(
    clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, shutdown_timeout=1)
    started = trio.Event()

    @broker.task
    async def stubborn() -> str:
        started.set()
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            return "finished anyway"  # swallows the stop's cancellation
        return "in time"

    with trio.fail_after(5):
        async with broker:
            handle = await stubborn.kiq()
            await started.wait()
        result = await handle.get_result()
    assert result.status is bus.TaskStatus.SUCCESS
    assert result.return_value == "finished anyway"


async def test_a_sync_task_cancelled_by_request_stays_cancelled_at_the_deadline(
    clock: trio.testing.MockClock, blocker: Blocker
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, shutdown_timeout=1)
    blocked = _blocked(broker, blocker)

    with trio.fail_after(5):
        async with broker:
            handle = await blocked.kiq(21)
            await blocker.started.wait()
            clock.autojump_threshold = 0  # the thread is parked: time may jump
            await handle.cancel()  # waits for the thread: it cannot be interrupted
            await trio.sleep(0.5)
            with pytest.raises(bus.ResultNotFound):
                await handle.get_result()
        result = await handle.get_result()
    assert result.status is bus.TaskStatus.CANCELLED
