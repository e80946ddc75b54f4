"""Every public call of the Redis bus through outages: Redis refused and dropped by
the proxy, really stopped and started, blackholed, frozen (SIGSTOP), replies cut
mid-way, a slow network. See tests/faults/matrix.py for what each run checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker
from tests.faults.control import RedisControl
from tests.faults.matrix import Bench, has_command_timeout, summary
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.redis


async def _through(
    bench: Bench,
    cut: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[None]],
    length: float,
    *,
    none_may_fail: bool = False,
) -> None:
    """Run the matrix through one outage, then assert the contract."""
    deadline = length + 3 * max(bench.send_bound, bench.command_bound) + 90
    with trio.fail_after(deadline):
        async with bench.running():
            recovered = await bench.run_outage(cut, restore, length)
            await bench.settle()
            late = await bench.cancel_problems() + await bench.schedule_problems()
    problems = bench.problems(recovered) + bench.run_problems() + late
    if none_may_fail:
        problems += [
            f"failed during a short outage: {c}" for c in bench.calls if c.outcome == "unavailable"
        ]
    figures = ", ".join(f"{op} {t:.2f}s" for op, t in recovered.items())
    print(f"calls:\n{summary(bench.calls)}\nrecovered after: {figures}")
    if not has_command_timeout():
        problems.insert(
            0, "RedisSettings has no command_timeout: ran with its default bound of 10 s"
        )
    assert not problems, (
        f"{len(problems)} problems:\n"
        + "\n".join(problems[:40])
        + f"\n{summary(bench.calls)}\nrecovered after: {figures}"
    )


def test_settings_have_command_timeout() -> None:
    broker = RedisBroker("redis://127.0.0.1:1", command_timeout=3)
    assert broker.settings.command_timeout == 3
    assert RedisBroker("redis://127.0.0.1:1").settings.command_timeout == 10


async def test_half_second_outage(proxy: FaultProxy) -> None:
    """Refused and dropped for 0.5 s: shorter than every bound, so no call fails."""
    bench = Bench(proxy.url)

    async def cut() -> None:
        await proxy.outage()

    async def restore() -> None:
        proxy.heal()

    await _through(bench, cut, restore, 0.5, none_may_fail=True)


@pytest.mark.slow
async def test_15s_outage(proxy: FaultProxy) -> None:
    """Refused and dropped for 15 s, with small bounds (send and command: 2 s)."""
    bench = Bench(proxy.url)

    async def cut() -> None:
        await proxy.outage()

    async def restore() -> None:
        proxy.heal()

    await _through(bench, cut, restore, 15)


@pytest.mark.slow
async def test_15s_stop_with_default_settings(redis_ctl: RedisControl) -> None:
    """redis-server really stopped (SIGTERM) for 15 s and started on the same port,
    with the default bounds (10 s)."""
    bench = Bench(redis_ctl.url, send_timeout=None, command_timeout=None)
    await _through(bench, redis_ctl.stop, redis_ctl.start, 15)


@pytest.mark.slow
async def test_60s_stop(redis_ctl: RedisControl) -> None:
    """redis-server really stopped for 60 s (small bounds; the running task's entry
    must not be reclaimed meanwhile, so visibility_timeout is longer than that)."""
    bench = Bench(redis_ctl.url, visibility_timeout=180)
    await _through(bench, redis_ctl.stop, redis_ctl.start, 60)


@pytest.mark.slow
async def test_15s_blackhole(proxy: FaultProxy) -> None:
    """Connections accepted and held, nothing answered, for 15 s; then the network
    heals and what was held flows again (late replies to abandoned commands too)."""
    bench = Bench(proxy.url)

    async def cut() -> None:
        proxy.mode = "blackhole"

    async def restore() -> None:
        proxy.heal()

    await _through(bench, cut, restore, 15)


@pytest.mark.slow
async def test_5s_sigstop(redis_ctl: RedisControl) -> None:
    """redis-server frozen (SIGSTOP) for 5 s: the kernel accepts, Redis answers nothing."""
    bench = Bench(redis_ctl.url)

    async def cut() -> None:
        redis_ctl.pause()

    async def restore() -> None:
        redis_ctl.resume()

    await _through(bench, cut, restore, 5)


async def test_replies_cut_mid_way(proxy: FaultProxy) -> None:
    """For 1 s every reply is cut in its middle and the connection reset."""
    bench = Bench(proxy.url)

    async def cut() -> None:
        proxy.mode = "reset"

    async def restore() -> None:
        proxy.heal()

    await _through(bench, cut, restore, 1.0)


async def test_slow_network(proxy: FaultProxy) -> None:
    """Every chunk held 0.2 s each way for 2 s: slower, and nothing fails."""
    bench = Bench(proxy.url)

    async def cut() -> None:
        proxy.delay = 0.2
        proxy.mode = "delay"

    async def restore() -> None:
        proxy.heal()

    await _through(bench, cut, restore, 2.0, none_may_fail=True)


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_start_fails_within_connect_timeout(proxy: FaultProxy, mode: str) -> None:
    """``async with broker`` against a Redis that cannot be reached fails within
    ``connect_timeout`` with BrokerUnavailable; the same object starts once it can."""
    proxy.mode = mode  # type: ignore[assignment]
    broker = RedisBroker(proxy.url, prefix=f"f{bus.TaskID.new()[-12:]}", connect_timeout=2)
    t0 = trio.current_time()
    with trio.fail_after(2 + 5):
        with pytest.raises(bus.BrokerUnavailable):
            async with broker:
                pass
    assert trio.current_time() - t0 <= 2 + 1
    proxy.heal()
    with trio.fail_after(5):
        async with broker:
            assert await broker.inspect() is not None


@pytest.mark.parametrize(("how", "length"), [("proxy", 0), ("stop", 0), ("proxy", 3), ("stop", 3)])
async def test_tasks_finished_during_an_outage_run_once(
    proxy: FaultProxy, redis_ctl: RedisControl, how: str, length: float
) -> None:
    """Tasks running when Redis goes away finish during the outage; their results and
    acks are written once it is back, and none of them runs again."""
    runs: dict[int, int] = {}
    started: dict[int, trio.Event] = {i: trio.Event() for i in range(20)}
    finish = trio.Event()
    url = proxy.url if how == "proxy" else redis_ctl.url
    options: dict[str, Any] = {"prefix": f"f{bus.TaskID.new()[-12:]}", "queue": "q"}
    producer, worker = RedisBroker(url, **options), RedisBroker(url, **options)

    async def work(i: int) -> int:
        started[i].set()
        await finish.wait()
        runs[i] = runs.get(i, 0) + 1
        return i

    task = producer.register_task(work, name="f.work")
    worker.register_task(work, name="f.work")
    with trio.fail_after(60):
        async with producer, trio.open_nursery() as nursery:
            w = await nursery.start(worker.run_worker, 32)
            handles = await task.kiq_many((i,) for i in range(20))
            for e in started.values():
                await e.wait()
            if how == "proxy":
                await proxy.outage()
            else:
                await redis_ctl.stop()
            finish.set()
            while len(runs) < 20:  # noqa: ASYNC110 (the tasks end in the worker's runners)
                await trio.sleep(0.01)
            await trio.sleep(length)  # the rest of the outage
            if how == "proxy":
                proxy.heal()
            else:
                await redis_ctl.start()
            results = await bus.gather(*handles, timeout=30)
            assert [r.return_value for r in results] == list(range(20))

            # Give a wrong second run the time it would take (a reader's re-read, a
            # heartbeat): every entry acknowledged, nothing pending, nothing run again.
            async def pending() -> int:
                reply = await producer.client.execute(
                    "XPENDING", producer.keys.stream, producer.group
                )
                return int(reply[0] or 0)

            while await pending():  # noqa: ASYNC110 (watching Redis)
                await trio.sleep(0.05)
            w.stop()
    assert runs == dict.fromkeys(range(20), 1)


async def test_every_connection_dropped(proxy: FaultProxy) -> None:
    """Every connection reset at once, Redis still there: the bus reconnects at once,
    and no call fails."""
    bench = Bench(proxy.url)

    async def noop() -> None:
        pass

    await _through(bench, proxy.drop_all, noop, 0.3, none_may_fail=True)


@pytest.mark.parametrize("state", ["running", "queued"])
async def test_a_cancel_that_failed_in_a_blackhole_still_ends_its_task(
    proxy: FaultProxy, state: str
) -> None:
    """``cancel()`` raises BrokerUnavailable in a blackhole (its command may still
    reach Redis when the network heals); the task ends either way: CANCELLED, or run
    once. Its waiter never waits for ever."""
    gate = trio.Event()
    started = trio.Event()
    runs: list[int] = []
    options: dict[str, Any] = {
        "prefix": f"f{bus.TaskID.new()[-12:]}",
        "queue": "q",
        "send_timeout": 2,
        "command_timeout": 2,
    }
    producer, worker = RedisBroker(proxy.url, **options), RedisBroker(proxy.url, **options)

    async def hold(i: int) -> int:
        if i == 0:
            started.set()
        await gate.wait()
        runs.append(i)
        return i

    task = producer.register_task(hold, name="f.hold")
    worker.register_task(hold, name="f.hold")
    with trio.fail_after(40):
        async with producer, trio.open_nursery() as nursery:
            w = await nursery.start(worker.run_worker, 1)
            first = await task.kiq(0)
            await started.wait()
            target = first if state == "running" else await task.kiq(1)
            proxy.mode = "blackhole"
            with pytest.raises(bus.BrokerUnavailable):
                await target.cancel()
            proxy.heal()
            gate.set()
            result = await target.wait_result(timeout=20)
            other = await (await task.kiq(2)).wait_result(timeout=20)
            assert other.return_value == 2
            w.stop()
    i = 0 if state == "running" else 1
    if result.status is bus.TaskStatus.CANCELLED:
        assert i not in runs
    else:
        assert result.return_value == i and runs.count(i) == 1
