"""A worker stores a result in the background when its backend can
(``ResultBackend.set_result_soon``): the runner takes its next task at once, and the
task is acked only once the backend says its result is stored. Here a backend of the
test's own holds each store until the test lets it go, on the in-memory broker and
Trio's virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog
import trio
import trio.testing

import bus
from bus import InMemoryResultBackend, TaskID, TaskResult

Stored = Callable[[BaseException | None], None]


class HeldStores(InMemoryResultBackend):
    """Keeps each store until the test calls ``release`` (then stores it, as the
    in-memory backend does, and tells the worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[TaskID, TaskResult[Any], Stored]] = []
        self.changed = trio.Event()

    def set_result_nowait(self, task_id: TaskID, result: TaskResult[Any]) -> bool:
        return False  # so that the worker takes set_result_soon

    def set_result_soon(self, task_id: TaskID, result: TaskResult[Any], stored: Stored) -> bool:
        self.held.append((task_id, result, stored))
        self.changed.set()
        self.changed = trio.Event()
        return True

    async def held_count(self, n: int) -> None:
        while len(self.held) < n:
            await self.changed.wait()

    async def release(self, error: BaseException | None = None) -> None:
        held, self.held = self.held, []
        for task_id, result, stored in held:
            if error is None:
                await self.set_result(task_id, result)
            stored(error)


def _broker(backend: HeldStores, **options: Any) -> bus.InMemoryBroker:
    return bus.InMemoryBroker(result_backend=backend, concurrency=1, **options)


async def test_the_runner_goes_on_while_its_result_is_stored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = HeldStores()
    broker = _broker(backend)
    ran: list[int] = []

    @broker.task
    async def work(n: int) -> int:
        ran.append(n)
        return n

    with trio.fail_after(60):
        async with broker:
            first = await work.kiq(0)
            await backend.held_count(1)
            second = await work.kiq(1)
            # One runner: the second task ran while the first's store was held (and,
            # with ``concurrency`` stores in the background, was stored in the
            # runner: acked).
            assert (await second.wait_result(timeout=5)).return_value == 1
            assert ran == [0, 1]
            # The first is not acked: the broker still counts it as running.
            with trio.move_on_after(5) as waited:
                await broker.wait_all()
            assert waited.cancelled_caught
            await backend.release()
            await broker.wait_all()  # acked once stored
            assert (await first.wait_result(timeout=1)).return_value == 0


async def test_a_store_that_failed_is_logged_and_the_task_is_not_acked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = HeldStores()
    broker = _broker(backend, shutdown_timeout=1)

    @broker.task
    async def work() -> int:
        return 1

    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with broker:
            await work.kiq()
            await backend.held_count(1)
            await backend.release(bus.BrokerUnavailable("gone", url="x", waited=1, cause="c"))
            with trio.move_on_after(5) as waited:
                await broker.wait_all()
            assert waited.cancelled_caught  # never acked
    failed = [e for e in logs if e["event"] == "result.store_failed"]
    assert len(failed) == 1 and failed[0]["task_name"].endswith("work")
    assert isinstance(failed[0]["exc_info"], bus.BrokerUnavailable)


@pytest.mark.parametrize("released", [True, False])
async def test_a_drain_waits_for_the_results_being_stored(
    autojump_clock: trio.testing.MockClock, released: bool
) -> None:
    """A drain waits for stores in the background as for running tasks; if they are
    not confirmed by the drain's deadline, the worker stops anyway, and a store
    confirmed later still acks its task."""
    backend = HeldStores()
    broker = _broker(backend, start_worker=False)

    @broker.task
    async def work() -> int:
        return 1

    drained: list[float] = []
    with trio.fail_after(60):
        async with broker:
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 1)
                await work.kiq()
                await backend.held_count(1)
                start = trio.current_time()

                async def drain() -> None:
                    await worker.drain(10)
                    drained.append(trio.current_time() - start)
                    worker.stop()

                nursery.start_soon(drain)
                await trio.sleep(3)
                assert not drained  # the drain waits for the store
                if released:
                    await backend.release()
            assert drained == [3 if released else 10]
            if not released:
                # Confirmed after the worker stopped: still acked (its broker runs).
                await backend.release()
            await broker.wait_all()
