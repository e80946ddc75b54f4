"""InMemoryBroker specifics: backpressure, result store bounds, shutdown, wake-up time.

These run on Trio's virtual clock (``autojump_clock``), so they take no real time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import bus


async def test_wait_result_wakes_when_the_result_is_stored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    finished_at: list[float] = []

    @broker.task
    async def slow() -> int:
        await trio.sleep(7.3)
        finished_at.append(trio.current_time())
        return 1

    with trio.fail_after(60):
        async with broker:
            handle = await slow.kiq()
            await handle.wait_result()
            woke_at = trio.current_time()
    # Polling would wake on its own period after the result; a push wakes at once.
    assert woke_at == finished_at[0]


async def test_kiq_waits_while_the_queue_is_full(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(concurrency=1, max_queue=2)
    gate = trio.Event()

    @broker.task
    async def blocked() -> None:
        await gate.wait()

    with trio.fail_after(60):
        async with broker:
            await blocked.kiq()  # taken by the worker
            await trio.testing.wait_all_tasks_blocked()
            await blocked.kiq()
            await blocked.kiq()  # the queue is now full
            assert broker.queued == 2
            with pytest.raises(bus.QueueFull):
                blocked.kiq_nowait()
            with trio.move_on_after(5) as waited:
                await blocked.kiq()
            assert waited.cancelled_caught  # kiq waited for room
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked.kiq)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()  # the worker drains the queue, the waiting kiq gets in
            await broker.wait_all()


async def test_kiq_nowait_sends_without_waiting(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker()

    @broker.task
    async def inc(x: int) -> int:
        return x + 1

    with trio.fail_after(60):
        async with broker:
            handle = inc.kiq_nowait(1)
            assert (await handle.wait_result()).return_value == 2


async def test_evicted_results_never_leave_a_waiter_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(max_stored_results=2, concurrency=1)  # stored in order

    @broker.task
    async def ident(x: int) -> int:
        return x

    with trio.fail_after(60):
        async with broker:
            handles = [await ident.kiq(i) for i in range(5)]
            await broker.wait_all()
            with pytest.raises(bus.ResultNotFound, match="evicted"):
                await handles[0].wait_result()
            with pytest.raises(bus.ResultNotFound):
                await handles[0].get_result()
            assert (await handles[4].wait_result()).return_value == 4


async def test_a_waiter_registered_before_eviction_gets_its_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(max_stored_results=1, concurrency=1)

    @broker.task
    async def ident(x: int) -> int:
        return x

    ids = [bus.TaskID.new(), bus.TaskID.new()]
    results: list[int] = []

    async def wait(tid: bus.TaskID) -> None:
        results.append((await bus.TaskHandle[int](tid, broker).wait_result()).unwrap())

    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            for tid in ids:
                nursery.start_soon(wait, tid)
            await trio.testing.wait_all_tasks_blocked()
            # Both results are stored back to back; the first is evicted at once.
            for i, tid in enumerate(ids):
                await ident.kicker().with_task_id(tid).kiq(i)
    assert sorted(results) == [0, 1]
    assert broker.result_backend.view.evicted == 1  # type: ignore[attr-defined]


async def test_result_ttl_expires(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(result_ttl=10)

    @broker.task
    async def one() -> int:
        return 1

    with trio.fail_after(60):
        async with broker:
            handle = await one.kiq()
            assert (await handle.wait_result()).return_value == 1
            await trio.sleep(11)
            assert not await handle.is_ready()
            with pytest.raises(bus.ResultNotFound, match="expired"):
                await handle.wait_result()


async def test_shutdown_cancels_running_tasks_and_records_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=2, shutdown_timeout=5)
    cleaned_up: list[int] = []

    @broker.task
    async def sleepy(x: int) -> None:
        try:
            await trio.sleep(1000)
        finally:
            cleaned_up.append(x)

    @broker.task
    async def quick() -> str:
        await trio.sleep(1)
        return "done"

    with trio.fail_after(60):
        async with broker:
            running = [await sleepy.kiq(i) for i in range(2)]
            queued = await quick.kiq()  # no free slot: still queued at the deadline
            delayed = await quick.kicker().with_delay(500).kiq()
            await trio.testing.wait_all_tasks_blocked()
            left_at = trio.current_time()
        assert trio.current_time() - left_at == pytest.approx(5)
        assert sorted(cleaned_up) == [0, 1]  # nothing left running
        assert not broker.is_running
        for h in [*running, queued, delayed]:
            result = await h.get_result()
            assert result.status is bus.TaskStatus.CANCELLED, h


async def test_shutdown_lets_running_tasks_finish_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(shutdown_timeout=30)

    @broker.task
    async def work() -> str:
        await trio.sleep(3)
        return "finished"

    with trio.fail_after(60):
        async with broker:
            handles = [await work.kiq() for _ in range(3)]
        for h in handles:
            assert (await h.get_result()).return_value == "finished"


async def test_kiq_outside_the_broker_is_refused() -> None:
    broker = bus.InMemoryBroker()

    @broker.task
    async def noop() -> None:
        pass

    with pytest.raises(bus.BrokerClosed, match="async with broker"):
        await noop.kiq()
    async with broker:
        pass
    with pytest.raises(bus.BrokerClosed):
        await noop.kiq()


async def test_wait_all(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(concurrency=4)
    done = 0

    @broker.task
    async def work(delay: float) -> None:
        nonlocal done
        await trio.sleep(delay)
        done += 1

    with trio.fail_after(60):
        async with broker:
            for i in range(10):
                await work.kiq(i)
            await work.kicker().with_delay(20).kiq(0)
            await broker.wait_all()
            assert done == 11
            assert trio.current_time() >= 19.9


async def test_concurrency_limit_under_load(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(concurrency=5)
    now = peak = 0

    @broker.task
    async def work() -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await trio.sleep(1)
        now -= 1

    with trio.fail_after(60):
        async with broker:
            for _ in range(100):
                await work.kiq()
            await broker.wait_all()
    assert peak == 5


async def test_a_retry_is_delayed_by_the_broker_not_in_a_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1)
    times: list[float] = []

    @broker.task(retries=2, retry_backoff=10)
    async def flaky(ctx: bus.Context = bus.CONTEXT) -> int:
        times.append(trio.current_time())
        if ctx.attempt < 3:
            raise OSError("flaky")
        return ctx.attempt

    @broker.task
    async def other() -> str:
        return "ran"

    with trio.fail_after(600):
        async with broker:
            start = trio.current_time()
            handle = await flaky.kiq()
            await trio.sleep(1)
            # The only slot is free while the retry waits: another task runs meanwhile.
            assert (await (await other.kiq()).wait_result()).return_value == "ran"
            assert trio.current_time() - start < 10
            assert (await handle.wait_result()).return_value == 3
    assert [round(t - times[0]) for t in times] == [0, 10, 30]


async def test_many_tasks_all_complete(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(concurrency=50, max_queue=100)

    @broker.task
    async def square(x: int) -> int:
        await trio.sleep(0.01)
        return x * x

    with trio.fail_after(600):
        async with broker:
            handles = [await square.kiq(i) for i in range(2000)]
            results = await bus.gather(*handles)
    assert [r.return_value for r in results] == [i * i for i in range(2000)]
    assert broker.stats.succeeded == 2000


async def test_a_task_gets_its_own_copy_of_mutable_arguments(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    seen: list[list[int]] = []

    @broker.task
    async def grab(items: list[int], name: str) -> int:
        items.append(99)  # must not reach the producer's list
        seen.append(items)
        return len(items)

    with trio.fail_after(60):
        async with broker:
            mine = [1, 2]
            handle = await grab.kiq(mine, "x")
            mine.append(3)  # must not reach the task
            assert (await handle.wait_result()).return_value == 3
    assert mine == [1, 2, 3]
    assert seen == [[1, 2, 99]]


async def test_a_retry_waiting_at_shutdown_is_recorded_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(shutdown_timeout=5)
    calls = 0

    @broker.task(retries=3, retry_backoff=60)
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(2)
        raise OSError("down")

    with trio.fail_after(600):
        async with broker:
            handle = await flaky.kiq()
            await trio.sleep(1)
            # Leaving now: the attempt fails during the drain, and its retry would
            # wait 60 s, past the shutdown timeout.
        result = await handle.get_result()
    assert calls == 1
    assert result.status is bus.TaskStatus.CANCELLED
    assert broker.queued == 0


async def test_a_cancelled_kiq_does_not_hold_a_queue_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, max_queue=1)
    gate = trio.Event()

    @broker.task
    async def blocked() -> None:
        await gate.wait()

    with trio.fail_after(60):
        async with broker:
            await blocked.kiq()  # taken by the worker
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:
                scope.cancel()
                await blocked.kiq()  # cancelled: nothing sent, no slot kept
            assert broker.queued == 0
            blocked.kiq_nowait()  # the one slot is still free
            gate.set()


async def test_a_task_pointed_at_another_broker_is_sent_there() -> None:
    """kiq's fast path belongs to the broker a task was declared on: while
    ``bus.testing.in_memory`` points the task at another, its sends go there."""
    home = bus.InMemoryBroker(start_worker=False)

    @home.task
    async def job() -> int:
        return 7

    with trio.fail_after(5):
        async with home, bus.testing.in_memory(home) as mem:
            handle = await job.kiq()
            assert (await handle.wait_result()).return_value == 7  # run by mem's worker
            assert handle.broker is mem and home.queued == 0
            assert home.stats.sent == 0 and mem.stats.sent == 1
