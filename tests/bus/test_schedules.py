"""Periodic tasks and unique jobs on the in-memory broker, on Trio's fake clock.

The shared contract (``bus.testing.check_broker``) runs the same behaviours on every
broker on a real clock; these tests add what only a fake clock can show in no time:
hours of ticks, a broker that was down, ttls running out.
"""

from __future__ import annotations

import itertools
import math

import pytest
import trio
from trio.testing import MockClock

import bus
from bus._schedule import tick_task_id


async def test_a_declared_schedule_fires_each_tick_with_the_tick_s_task_id(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    send, receive = trio.open_memory_channel[tuple[float, str, str, float]](math.inf)

    @broker.task(schedule=bus.every(10))
    async def beat(ctx: bus.Context = bus.CONTEXT) -> None:
        send.send_nowait(
            (ctx.labels["tick"], ctx.labels["schedule"], str(ctx.task_id), trio.current_time())
        )

    with trio.fail_after(1000):
        async with broker:
            seen = [await receive.receive() for _ in range(6)]
    ticks = [t for t, _, _, _ in seen]
    assert all(t % 10 == 0 for t in ticks)
    assert {b - a for a, b in itertools.pairwise(ticks)} == {10.0}
    # On time: each tick ran 10 s (of Trio's clock) after the one before.
    assert {round(b - a, 3) for a, b in itertools.pairwise(at for *_, at in seen)} == {10.0}
    assert {name for _, name, _, _ in seen} == {beat.name}
    assert [tid for _, _, tid, _ in seen] == [str(tick_task_id(beat.name, t)) for t in ticks]


async def test_a_cron_schedule_follows_its_time_zone(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker()
    ticks: list[float] = []

    @broker.task(schedule=bus.cron("*/15 * * * *", tz="Asia/Kolkata"))
    async def quarter(ctx: bus.Context = bus.CONTEXT) -> None:
        ticks.append(ctx.labels["tick"])

    with trio.fail_after(10_000):
        async with broker:
            await trio.sleep(3600)
    # Kolkata is UTC+05:30: a quarter hour there is a quarter hour in UTC too.
    assert len(ticks) == 4
    assert all(t % 900 == 0 for t in ticks)


async def test_a_tick_missed_while_the_broker_was_down_fires_once_late(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    send, receive = trio.open_memory_channel[float](math.inf)

    @broker.task(schedule=bus.every(10), name="late")
    async def late(ctx: bus.Context = bus.CONTEXT) -> None:
        send.send_nowait(ctx.labels["tick"])

    with trio.fail_after(1000):
        async with broker:
            ticks = [await receive.receive() for _ in range(2)]
        await trio.sleep(100)  # nothing schedules: ten ticks pass unseen
        async with broker:
            ticks.append(await receive.receive())
            [info] = await broker.schedules()
    # The latest of the ten (due just now, well within the 60 s grace) fires once, the
    # nine others are counted as missed: no burst of stale runs.
    assert ticks[2] - ticks[1] == 100
    assert info.state.fires == 3
    assert info.state.misses == 9
    assert info.state.last_fire == ticks[2]
    assert info.next_fire == ticks[2] + 10
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


async def test_a_tick_later_than_its_grace_is_skipped_and_counted(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    ticks: list[float] = []

    @broker.task
    async def job(ctx: bus.Context = bus.CONTEXT) -> None:
        ticks.append(ctx.labels["tick"])

    with trio.fail_after(10_000):
        async with broker:
            await broker.schedule(job, bus.every(600), name="rare", misfire_grace=5)
            await trio.sleep(700)
        fired = len(ticks)
        assert fired >= 1
        await trio.sleep(1300)  # two ticks pass while the broker is down...
        async with broker:
            await trio.sleep(1)
            [info] = await broker.schedules()
    # ...and more than 5 s have passed since the later one when it is back.
    assert len(ticks) == fired
    assert info.state.misses >= 2
    assert info.source == "runtime"


async def test_run_time_schedules_are_added_replaced_listed_and_removed(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    send, receive = trio.open_memory_channel[tuple[str, float]](math.inf)

    @broker.task
    async def greet(who: str, ctx: bus.Context = bus.CONTEXT) -> None:
        send.send_nowait((who, ctx.labels["tick"]))

    with trio.fail_after(1000):
        async with broker:
            spec = await broker.schedule(greet, bus.every(5), args=["ada"], name="hello")
            assert spec.name == "hello"
            assert spec.task_name == greet.name
            calls = [await receive.receive() for _ in range(2)]
            assert [who for who, _ in calls] == ["ada", "ada"]
            # The same name replaces the schedule; its ticks go on where they were.
            await broker.schedule(greet, bus.every(5), kwargs={"who": "bob"}, name="hello")
            who, tick = await receive.receive()
            assert (who, tick) == ("bob", calls[-1][1] + 5)
            [info] = await broker.schedules()
            assert info.spec.kwargs == {"who": "bob"}
            assert info.state.fires == 3
            assert await broker.unschedule("hello")
            assert not await broker.unschedule("hello")
            await trio.sleep(30)
            with pytest.raises(trio.WouldBlock):
                receive.receive_nowait()
            assert await broker.schedules() == []


async def test_a_worker_without_a_scheduler_fires_nothing(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker(start_worker=False)
    ticks: list[float] = []

    @broker.task(schedule=bus.every(1))
    async def beat(ctx: bus.Context = bus.CONTEXT) -> None:
        ticks.append(ctx.labels["tick"])

    with trio.fail_after(100):
        async with broker, trio.open_nursery() as nursery:
            nursery.start_soon(lambda: broker.run_worker(2, scheduler=False))
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert ticks == []


async def test_bad_schedules_are_refused_with_the_reason(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker()

    @broker.task(schedule=bus.every(60))
    async def declared() -> None:
        pass

    @broker.task
    async def plain(x: object = None) -> None:
        pass

    with pytest.raises(ValueError, match="5 fields"):
        bus.cron("*/5 * * * * *")
    with pytest.raises(ValueError, match="Mars/Olympus"):
        bus.cron("0 9 * * *", tz="Mars/Olympus")
    with pytest.raises(ValueError, match="positive"):
        bus.every(0)
    with pytest.raises(ValueError, match="finite"):
        bus.every(math.nan)
    async with broker:
        with pytest.raises(bus.UnknownTaskError):
            await broker.schedule("nope", bus.every(1))
        with pytest.raises(ValueError, match="declared on its task"):
            await broker.schedule(plain, bus.every(1), name=declared.name)
        with pytest.raises(bus.SendError, match="JSON"):
            await broker.schedule(plain, bus.every(1), args=[object()])
        with pytest.raises(ValueError, match="misfire_grace"):
            await broker.schedule(plain, bus.every(1), misfire_grace=0)
        with pytest.raises(TypeError, match=r"bus\.cron"):
            await broker.schedule(plain, "*/5 * * * *")  # type: ignore[arg-type]
        assert [i.spec.name for i in await broker.schedules()] == [declared.name]


# --------------------------------------------------------------------- unique jobs


async def test_a_unique_key_held_by_a_task_that_never_ends_frees_after_its_ttl(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    runs: list[int] = []

    @broker.task
    async def stuck(n: int) -> None:
        runs.append(n)
        await trio.sleep_forever()

    with trio.fail_after(1000):
        async with broker:
            kicker = stuck.kicker().with_unique(key="the-one", ttl=30)
            first = await kicker.kiq(1)
            await trio.sleep(29)
            assert (await kicker.kiq(2)).task_id == first.task_id  # still held
            await trio.sleep(2)
            second = await kicker.kiq(3)  # the ttl ran out: a new job
            assert second.task_id != first.task_id
            await trio.sleep(1)
            assert runs == [1, 3]
            await first.cancel()
            await second.cancel()


async def test_a_failed_unique_job_frees_its_key(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker()
    runs = 0

    @broker.task(unique=True)
    async def fails() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    with trio.fail_after(100):
        async with broker:
            first = await fails.kiq()
            assert (await first.wait_result()).status is bus.TaskStatus.FAILURE
            second = await fails.kiq()
            assert second.task_id != first.task_id
            assert (await second.wait_result()).status is bus.TaskStatus.FAILURE
    assert runs == 2


async def test_a_unique_job_is_refused_without_waiting_and_with_bad_options(
    autojump_clock: MockClock,
) -> None:
    broker = bus.InMemoryBroker()

    @broker.task(unique=True)
    async def once() -> None:
        pass

    @broker.task
    async def plain() -> None:
        pass

    with pytest.raises(ValueError, match="unique_ttl"):
        plain.kicker().with_unique(ttl=0)
    with pytest.raises(ValueError, match="non-empty"):
        plain.kicker().with_unique(key="")
    async with broker:
        with pytest.raises(bus.SendError, match="unique"):
            once.kiq_nowait()
        await (await once.kiq()).wait_result(timeout=5)


async def test_every_sender_of_a_unique_job_gets_its_result(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker()
    gate = trio.Event()
    runs = 0

    @broker.task(unique=True)
    async def build(target: str) -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return f"built {target}"

    values: list[str] = []

    async def sender() -> None:
        handle = await build.kiq("docs")
        values.append((await handle.wait_result(timeout=60)).unwrap())

    with trio.fail_after(100):
        async with broker, trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(sender)
            await trio.sleep(1)
            gate.set()
    assert runs == 1
    assert values == ["built docs"] * 50


async def test_a_scheduled_task_goes_to_its_own_queue(autojump_clock: MockClock) -> None:
    broker = bus.InMemoryBroker(start_worker=False)
    send, receive = trio.open_memory_channel[tuple[str, float]](math.inf)

    @broker.task(queue="reports", priority=3, schedule=bus.every(10))
    async def report(ctx: bus.Context = bus.CONTEXT) -> None:
        send.send_nowait((ctx.message.queue or "", ctx.labels["tick"]))

    with trio.fail_after(100):
        async with broker, trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: broker.run_worker(
                2, queues=["reports"], task_status=task_status))  # fmt: skip
            got = [await receive.receive() for _ in range(2)]
            nursery.cancel_scope.cancel()
    assert [q for q, _ in got] == ["reports", "reports"]
