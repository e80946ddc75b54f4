"""Named queues, priorities and limits on the in-memory broker (virtual time where the
tasks are async)."""

from __future__ import annotations

import bisect
import functools

import pytest
import trio
import trio.testing

import bus
from bus.protocol import Inspect


def most_in_a_window(times: list[float], width: float = 1.0) -> int:
    """The largest number of ``times`` inside any half-open window of ``width``."""
    ts = sorted(times)
    return max((bisect.bisect_left(ts, t + width) - i for i, t in enumerate(ts)), default=0)


# ---------------------------------------------------------------- named queues


async def test_a_task_goes_to_its_queue_and_the_embedded_worker_runs_every_queue() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(queue="reports")
    async def report(ctx: bus.Context = bus.CONTEXT) -> str | None:
        return ctx.message.queue

    @broker.task
    async def plain(ctx: bus.Context = bus.CONTEXT) -> str | None:
        return ctx.message.queue

    with trio.fail_after(5):
        async with broker:
            assert (await (await report.kiq()).wait_result()).return_value == "reports"
            assert (await (await plain.kiq()).wait_result()).return_value is None
            moved = await plain.kicker().with_queue("emails").kiq()
            assert (await moved.wait_result()).return_value == "emails"
            info = await broker.inspect()
    assert set(info["queues"]) >= {"default", "reports"}


async def test_a_worker_runs_only_the_queues_it_consumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(start_worker=False)
    ran: list[str] = []

    @broker.task(queue="reports")
    async def report() -> None:
        ran.append("report")

    @broker.task
    async def plain() -> None:
        ran.append("plain")

    with trio.fail_after(5):
        async with broker, trio.open_nursery() as nursery:
            reports = await nursery.start(
                functools.partial(broker.run_worker, 1, queues=["reports"])
            )
            waiting = await plain.kiq()
            await (await report.kiq()).wait_result()
            assert ran == ["report"]
            with pytest.raises(bus.ResultTimeout):
                await waiting.wait_result(timeout=0.2)
            info = await broker.ref.ask(Inspect())
            assert info["queues"]["default"]["queued"] == 1
            assert info["queues"]["reports"]["queued"] == 0
            default = await nursery.start(broker.run_worker, 1)  # the default queue
            await waiting.wait_result(timeout=2)
            assert ran == ["report", "plain"]
            reports.stop()
            default.stop()


def test_queue_names_and_priorities_are_checked_where_they_are_given() -> None:
    broker = bus.InMemoryBroker()

    @broker.task
    async def t() -> None:
        pass

    for bad in ["", "a b", "{x}", "*", "x" * 201]:
        with pytest.raises(ValueError, match="queue name"):
            t.kicker().with_queue(bad)
        with pytest.raises(ValueError, match="queue name"):
            broker.task(queue=bad)
    with pytest.raises(TypeError):
        t.kicker().with_queue(3)  # type: ignore[arg-type]
    for level in [-1, 10]:
        with pytest.raises(ValueError, match="priority"):
            t.kicker().with_priority(level)
    for wrong in [1.5, True, "9"]:
        with pytest.raises(TypeError):
            t.kicker().with_priority(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        broker.task(priority=12)
    with pytest.raises(ValueError, match="bad rate"):
        broker.task(rate_limit="fast")
    with pytest.raises(ValueError, match="max_running"):
        broker.task(max_running=0)
    with pytest.raises(TypeError, match="unknown task option"):
        broker.task(queues=["a"])


async def test_a_hand_made_message_with_a_bad_priority_is_refused() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(name="t")
    async def t() -> None:
        pass

    with trio.fail_after(5):
        async with broker:
            bad = bus.TaskMessage(
                task_id=bus.TaskID.new(), task_name="t", args=(), kwargs={}, labels={}, priority=11
            )
            with pytest.raises(bus.SendError, match="priority"):
                await broker.kick(bad)


def test_the_codec_writes_queue_and_priority_only_when_set() -> None:
    codec = bus.JSONCodec()
    plain = bus.TaskMessage(task_id=bus.TaskID.new(), task_name="t", args=(), kwargs={}, labels={})
    data = codec.encode_message(plain)
    assert b"queue" not in data and b"priority" not in data
    assert codec.decode_message(data) == plain
    placed = bus.TaskMessage(
        task_id=bus.TaskID.new(),
        task_name="t",
        args=(1,),
        kwargs={},
        labels={},
        queue="reports",
        priority=7,
    )
    back = codec.decode_message(codec.encode_message(placed))
    assert (back.queue, back.priority) == ("reports", 7)
    assert back == placed
    # A message written before the fields existed still reads, with the defaults.
    old = b'{"id":"%s","name":"t","args":[],"kwargs":{},"labels":{},"attempt":1,"eta":null}'
    msg = codec.decode_message(old % str(plain.task_id).encode())
    assert (msg.queue, msg.priority) == (None, 0)
    for bad in [b'"priority":10', b'"priority":"9"', b'"queue":""', b'"queue":3']:
        with pytest.raises(bus.DecodeError):
            codec.decode_message(data[:-1] + b"," + bad + b"}")


async def test_a_retry_keeps_its_queue_and_priority(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker()
    seen: list[tuple[int, str | None, int]] = []

    @broker.task(retries=2, retry_backoff=1, queue="flaky")
    async def flaky(ctx: bus.Context = bus.CONTEXT) -> None:
        seen.append((ctx.attempt, ctx.message.queue, ctx.message.priority))
        if ctx.attempt < 3:
            raise RuntimeError("again")

    with trio.fail_after(60):
        async with broker:
            await (await flaky.kicker().with_priority(4).kiq()).wait_result()
    assert seen == [(1, "flaky", 4), (2, "flaky", 4), (3, "flaky", 4)]


# ------------------------------------------------------------------ priorities


async def test_urgent_tasks_overtake_a_backlog(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(concurrency=1, max_queue=2000)
    busy, gate = trio.Event(), trio.Event()
    started: list[str] = []

    @broker.task
    async def block() -> None:
        busy.set()
        await gate.wait()

    @broker.task
    async def job(kind: str) -> None:
        started.append(kind)
        await trio.sleep(0.001)

    with trio.fail_after(60):
        async with broker:
            await block.kiq()
            await busy.wait()  # the worker is busy
            handles = [await job.kiq("low") for _ in range(1000)]
            handles += [await job.kicker().with_priority(9).kiq("high") for _ in range(10)]
            gate.set()
            await bus.gather(*handles)
    first_high = started.index("high")
    last_high = len(started) - 1 - started[::-1].index("high")
    lows_between = started[first_high:last_high].count("low")
    print(f"\nin memory: the 10 high started at positions {first_high}..{last_high} of 1010")
    assert last_high < 30 and lows_between < 20  # before the next 20 low


async def test_a_steady_stream_of_urgent_tasks_leaves_low_ones_their_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1, max_queue=5000)
    busy, gate = trio.Event(), trio.Event()
    started: list[str] = []

    @broker.task
    async def block() -> None:
        busy.set()
        await gate.wait()

    @broker.task
    async def job(kind: str) -> None:
        started.append(kind)
        await trio.sleep(0.001)

    with trio.fail_after(60):
        async with broker:
            await block.kiq()
            await busy.wait()
            lows = [await job.kiq("low") for _ in range(200)]
            highs = [await job.kicker().with_priority(9).kiq("high") for _ in range(2000)]
            gate.set()
            await bus.gather(*highs)
            await bus.gather(*lows)
    last_high = [i for i, kind in enumerate(started) if kind == "high"][-1]
    share = started[: last_high + 1].count("low")
    print(
        f"\nin memory: with level 9 always busy, level 0 got {share} of the first "
        f"{last_high + 1} starts ({share / (last_high + 1):.1%})"
    )
    assert 190 <= share <= 201  # one pick in eleven: 2,000 high, 200 low


async def test_moving_to_the_dispatch_keeps_what_was_queued_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=1)
    busy, gate = trio.Event(), trio.Event()
    started: list[int] = []

    @broker.task
    async def block() -> None:
        busy.set()
        await gate.wait()

    @broker.task
    async def job(i: int) -> None:
        started.append(i)

    with trio.fail_after(60):
        async with broker:
            await block.kiq()
            await busy.wait()
            handles = [await job.kiq(i) for i in range(5)]  # the plain channel
            assert broker._ref is not None
            handles.append(await job.kicker().with_priority(1).kiq(99))  # moves
            handles += [await job.kiq(i) for i in range(5, 8)]
            gate.set()
            await bus.gather(*handles)
    assert started == [99, 0, 1, 2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------ rate limits


async def test_a_rate_limit_spreads_starts_and_never_holds_a_runner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=2, max_queue=1000)
    starts: list[float] = []

    @broker.task(rate_limit="20/s")
    async def limited() -> None:
        starts.append(trio.current_time())

    @broker.task
    async def free() -> float:
        return trio.current_time()

    with trio.fail_after(60):
        async with broker:
            t0 = trio.current_time()
            handles = [await limited.kiq() for _ in range(200)]
            await trio.sleep(0.5)
            sent = trio.current_time()
            free_at = (await (await free.kiq()).wait_result()).unwrap()
            waiting = (await broker.inspect())["waiting_for_limits"]
            results = await bus.gather(*handles)
    assert all(r.status is bus.TaskStatus.SUCCESS for r in results)
    assert free_at - sent < 0.01 and waiting > 100  # ran at once beside ~190 waiting
    assert most_in_a_window(starts) <= 20 + 1  # the rate plus one bucket's burst
    assert max(starts) - t0 == pytest.approx(199 / 20, abs=0.01)


async def test_a_limit_is_shared_by_key(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker()
    api = bus.limit("api.example", "10/s", burst=5)
    starts: list[float] = []

    @broker.task(rate_limit=api)
    async def fetch() -> None:
        starts.append(trio.current_time())

    @broker.task(rate_limit=api)
    async def post() -> None:
        starts.append(trio.current_time())

    with trio.fail_after(60):
        async with broker:
            handles = [await fetch.kiq() for _ in range(30)]
            handles += [await post.kiq() for _ in range(30)]
            await bus.gather(*handles)
    assert most_in_a_window(starts) <= 10 + 5
    assert max(starts) - min(starts) == pytest.approx(55 / 10, abs=0.01)  # 5 at once, then 10/s


async def test_a_task_waiting_for_its_limit_can_be_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    ran: list[int] = []

    @broker.task(rate_limit="1/m")
    async def slow(i: int) -> None:
        ran.append(i)

    with trio.fail_after(600):
        async with broker:
            first, second, third = [await slow.kiq(i) for i in range(3)]
            await first.wait_result()
            await second.cancel()
            assert (await second.wait_result()).status is bus.TaskStatus.CANCELLED
            await third.wait_result()
    assert ran == [0, 2]


async def test_tasks_waiting_for_a_limit_are_cancelled_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(shutdown_timeout=5)

    @broker.task(rate_limit="1/h")
    async def hourly() -> None:
        pass

    with trio.fail_after(600):
        async with broker:
            handles = [await hourly.kiq() for _ in range(3)]
            await handles[0].wait_result()
        assert broker.queued == 0
        results = [await h.get_result() for h in handles]
    assert [r.status for r in results] == [bus.TaskStatus.SUCCESS] + 2 * [bus.TaskStatus.CANCELLED]


# --------------------------------------------------------------- max_running


async def test_max_running_is_a_limit_across_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=20, max_queue=1000)
    now = peak = 0

    @broker.task(max_running=5)
    async def capped() -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await trio.sleep(0.1)
        now -= 1

    @broker.task
    async def free() -> float:
        return trio.current_time()

    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            other = await nursery.start(broker.run_worker, 20)  # a second worker
            t0 = trio.current_time()
            handles = [await capped.kiq() for _ in range(100)]
            free_at = (await (await free.kiq()).wait_result()).unwrap()
            await bus.gather(*handles)
            other.stop()
    assert peak == 5
    assert free_at - t0 < 0.01
    assert trio.current_time() - t0 == pytest.approx(100 / 5 * 0.1, abs=0.05)


async def test_a_slot_comes_back_when_its_task_fails_or_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker()
    go = trio.Event()

    @broker.task(max_running=1)
    async def one(kind: str) -> str:
        if kind == "fail":
            raise RuntimeError("boom")
        if kind == "hang":
            await go.wait()
        return kind

    with trio.fail_after(60):
        async with broker:
            assert (await (await one.kiq("fail")).wait_result()).is_err
            hung = await one.kiq("hang")
            after = await one.kiq("ok")
            with pytest.raises(bus.ResultTimeout):
                await after.wait_result(timeout=1)
            await hung.cancel()
            assert (await after.wait_result(timeout=1)).return_value == "ok"


async def test_inspect_counts_by_queue_and_level(autojump_clock: trio.testing.MockClock) -> None:
    broker = bus.InMemoryBroker(start_worker=False)

    @broker.task(queue="reports")
    async def report() -> None:
        pass

    @broker.task(rate_limit="1/h")
    async def hourly() -> None:
        pass

    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            await report.kicker().with_priority(9).kiq()
            await report.kiq()
            await report.kiq()
            for _ in range(3):
                await hourly.kiq()
            worker = await nursery.start(broker.run_worker, 4)
            await trio.sleep(1)
            info = await broker.inspect()
            worker.stop()
    reports = info.queues["reports"]
    assert (reports.queued, reports.waiting_for_limits) == (3, 0)
    assert dict(reports.by_priority) == {"9": 1, "0": 2}
    assert info["queues"]["reports"]["by_priority"] == {"9": 1, "0": 2}
    assert info["queues"]["default"]["waiting_for_limits"] == 2
    assert info["waiting_for_limits"] == 2


async def test_run_worker_checks_its_queues() -> None:
    broker = bus.InMemoryBroker(start_worker=False)
    with trio.fail_after(5):
        async with broker:
            with pytest.raises(TypeError, match="list of queue names"):
                await broker.run_worker(queues="reports")
            with pytest.raises(ValueError, match="queue name"):
                await broker.run_worker(queues=["a b"])


async def test_idle_runners_carry_on_after_the_move_to_the_dispatch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = bus.InMemoryBroker(concurrency=2)

    @broker.task
    async def job(i: int) -> int:
        return i

    with trio.fail_after(60):
        async with broker:
            assert (await (await job.kiq(1)).wait_result()).return_value == 1
            await trio.sleep(1)  # both runners wait on the channel
            urgent = job.kicker().with_priority(3)
            assert (await (await urgent.kiq(2)).wait_result()).return_value == 2
            assert (await (await job.kiq(3)).wait_result()).return_value == 3

            @broker.task(max_running=1)  # registered while running: its limit holds
            async def late() -> float:
                await trio.sleep(1)
                return trio.current_time()

            t0 = trio.current_time()
            ends = [(await h.wait_result()).unwrap() for h in [await late.kiq() for _ in range(3)]]
    assert [round(e - t0) for e in ends] == [1, 2, 3]


async def test_a_worker_stopped_before_the_move_is_not_carried_over() -> None:
    broker = bus.InMemoryBroker(start_worker=False)

    @broker.task
    async def job(i: int) -> int:
        return i

    with trio.fail_after(5):
        async with broker, trio.open_nursery() as nursery:
            gone = await nursery.start(broker.run_worker, 1)
            await gone.drain()
            gone.stop()
            kept = await nursery.start(broker.run_worker, 1)
            handle = await job.kicker().with_priority(2).kiq(7)  # moves to the dispatch
            assert (await handle.wait_result()).return_value == 7
            actor = broker.ref._cell.instance  # type: ignore[attr-defined]
            assert actor.fancy is not None and len(actor.fancy.leases) == 1
            kept.stop()
