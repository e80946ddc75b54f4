"""PrometheusMiddleware in one process (the in-memory broker), and serve_metrics."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

import bus
from bus.metrics import SENT_AT, PrometheusMiddleware, serve_metrics
from bus.protocol import Send


def value(mw: PrometheusMiddleware, name: str, **labels: str) -> float:
    got = mw.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def make() -> tuple[
    bus.InMemoryBroker, PrometheusMiddleware, dict[str, bus.Task[..., object]], list[trio.Event]
]:
    mw = PrometheusMiddleware(inspect_interval=1.0)
    broker = bus.InMemoryBroker(concurrency=4).with_middlewares(mw)
    gate = trio.Event()
    started: list[trio.Event] = [trio.Event() for _ in range(10)]

    @broker.task(name="ok")
    async def ok() -> int:
        return 1

    @broker.task(name="bad")
    async def bad() -> None:
        raise ValueError("bad")

    @broker.task(name="flaky", retries=1, retry_backoff=0)
    async def flaky(ctx: bus.Context = bus.CONTEXT) -> str:
        if ctx.attempt == 1:
            raise ConnectionError("again")
        return "ok"

    @broker.task(name="slow", timeout=1)
    async def slow() -> None:
        await trio.sleep(10)

    @broker.task(name="wait")
    async def wait() -> None:
        next(e for e in started if not e.is_set()).set()  # the n-th start sets started[n]
        await gate.wait()

    tasks = {"ok": ok, "bad": bad, "flaky": flaky, "slow": slow, "wait": wait}
    return broker, mw, tasks, started


async def test_every_outcome_is_counted_by_task_and_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker, mw, tasks, started = make()
    with trio.fail_after(60):
        async with broker:
            handles = [await tasks["ok"].kiq() for _ in range(3)]
            handles += [await tasks[name].kiq() for name in ("bad", "flaky", "slow")]
            blocked = await tasks["wait"].kiq()
            await started[0].wait()
            assert value(mw, "bus_tasks_running", task_name="wait", queue="default") == 1
            await blocked.cancel()
            await bus.gather(*handles, blocked)
            broker.ref.tell_nowait(Send(tasks["ok"].kicker().message(), b"\x00"))  # garbage
            # Arguments that do not fit, sent past the sender's check: rejected.
            tid = await broker.kick(tasks["ok"].kicker().message(1))  # type: ignore[call-arg]
            await bus.TaskHandle(tid, broker).wait_result()
            await broker.wait_all()
            assert SENT_AT not in (await handles[0].wait_result()).labels  # its id's time
            # An id made earlier than the send: the send time travels in a label.
            ms = f"{int((time.time() - 10) * 1000):012x}"
            old_id = bus.TaskID.parse(f"{ms[:8]}-{ms[8:]}-7000-8000-000000000001")
            early = tasks["ok"].kicker().with_task_id(old_id)
            stamped = await (await early.kiq()).wait_result()
            assert stamped.labels[SENT_AT] >= old_id.timestamp + 10

    def count(metric: str, task: str) -> float:
        return value(mw, f"bus_tasks_{metric}_total", task_name=task, queue="default")

    assert count("sent", "ok") == 5 and count("sent", "wait") == 1
    # Arguments are checked when the function is called: the misfit one started too.
    assert count("started", "ok") == 5 and count("succeeded", "ok") == 4
    assert count("started", "flaky") == 2
    assert (count("retried", "flaky"), count("succeeded", "flaky")) == (1, 1)
    assert (count("failed", "bad"), count("failed", "flaky")) == (1, 0)
    assert count("timed_out", "slow") == 1 and count("cancelled", "wait") == 1
    assert value(
        mw, "bus_tasks_rejected_total", task_name="(unregistered)", queue="default",
        reason="undecodable",
    ) == 1  # fmt: skip
    assert value(
        mw, "bus_tasks_rejected_total", task_name="ok", queue="default", reason="bad_arguments"
    ) == 1  # fmt: skip
    assert value(mw, "bus_tasks_running", task_name="wait", queue="default") == 0
    assert value(mw, "bus_tasks_running", task_name="ok", queue="default") == 0
    assert value(mw, "bus_task_duration_seconds_count", task_name="flaky", queue="default") == 2
    assert value(mw, "bus_task_duration_seconds_count", task_name="slow", queue="default") == 1
    # Queue wait: first attempts only.
    assert value(mw, "bus_task_queue_wait_seconds_count", task_name="flaky", queue="default") == 1


async def test_queue_gauges_come_from_the_sampler(autojump_clock: trio.testing.MockClock) -> None:
    broker, mw, tasks, started = make()
    with trio.fail_after(60):
        async with broker:
            handles = [await tasks["wait"].kiq() for _ in range(6)]  # 4 run, 2 wait
            await started[3].wait()
            await mw.samples.next()  # may have asked before the fourth start
            assert (await mw.samples.next()).info["running"] == 4
            assert value(mw, "bus_queue_depth", queue="default") == 2
            assert value(mw, "bus_dead_letters", queue="default") == 0
            assert 0 <= value(mw, "bus_inspect_age_seconds", queue="default") < 60
            assert value(mw, "bus_worker_restarts", slot="0") == 0
            assert (
                mw.registry.get_sample_value("bus_actor_restarts_total", {"actor": "broker"}) == 0
            )
            for h in handles:
                await h.cancel()
    assert mw._sampler is None  # stopped with the broker


async def test_named_queues_are_counted_and_gauged_by_their_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mw = PrometheusMiddleware(inspect_interval=1.0)
    broker = bus.InMemoryBroker(start_worker=False).with_middlewares(mw)

    @broker.task(name="report", queue="reports")
    async def report() -> None:
        pass

    with trio.fail_after(60):
        async with broker:
            for _ in range(3):
                await report.kiq()
            await report.kicker().with_queue("urgent").kiq()
            # The sample being taken now may have asked before the sends were queued;
            # the one after it asked later, so it sees all four waiting (no worker runs).
            await mw.samples.next()
            await mw.samples.next()
            assert value(mw, "bus_tasks_sent_total", task_name="report", queue="reports") == 3
            assert value(mw, "bus_tasks_sent_total", task_name="report", queue="urgent") == 1
            assert value(mw, "bus_queue_depth", queue="reports") == 3
            assert value(mw, "bus_queue_depth", queue="urgent") == 1
            assert value(mw, "bus_queue_depth", queue="default") == 0


async def test_serve_metrics_answers_get_and_refuses_the_rest() -> None:
    mw = PrometheusMiddleware(inspect_interval=None)
    mw.sent.labels("t", "q").inc(5)

    async def request(port: int, head: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head)
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
        return data

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_metrics, mw.registry, 0)
            ok = await request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b'bus_tasks_sent_total{queue="q",task_name="t"} 5.0' in ok
            assert b"process_cpu_seconds_total" in ok
            missing = await request(port, b"GET /nope HTTP/1.1\r\n\r\n")
            assert missing.startswith(b"HTTP/1.1 404")
            post = await request(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert post.startswith(b"HTTP/1.1 405")
            nursery.cancel_scope.cancel()


def test_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="inspect_interval"):
        PrometheusMiddleware(inspect_interval=0)
