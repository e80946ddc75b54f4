"""The ``on_reject`` hook, and what post_execute tells of a retried attempt (metrics rely
on both)."""

from __future__ import annotations

from typing import Any

import trio

import bus
from bus.protocol import Send


class Recorder(bus.Middleware):
    def __init__(self, name: str, calls: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.calls = calls

    def on_reject(self, message: bus.TaskMessage | None, reason: str) -> None:
        self.calls.append((self.name, None if message is None else message.task_name, reason))

    def post_execute(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
        self.calls.append((self.name, "post_execute", result.status, result.error is None))


async def test_on_reject_sees_every_refused_delivery_in_reverse_order() -> None:
    calls: list[tuple[Any, ...]] = []
    broker = bus.InMemoryBroker().with_middlewares(Recorder("a", calls), Recorder("b", calls))

    @broker.task(name="two")
    async def two(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(5):
        async with broker:
            # Bytes no codec can read: the worker has no message to show.
            broker.ref.tell_nowait(Send(two.kicker().message(1, 2), b"\xffgarbage"))
            # Arguments that do not fit the function.
            # (kiq refuses them at the sender: this message is sent as it is.)
            handle = bus.TaskHandle(await broker.kick(two.kicker().message(1)), broker)  # type: ignore[call-arg]
            result = await handle.wait_result()
            await broker.wait_all()
    assert result.error is not None and result.error.type_name == "bus.Rejected"
    rejects = [c for c in calls if c[1] != "post_execute"]
    # Each refused delivery reaches the hooks in reverse order (b, then a); the two
    # deliveries run on two runners, in either order.
    undecodable = [c for c in rejects if c[1] is None]
    unfit = [c for c in rejects if c[1] == "two"]
    assert len(undecodable) + len(unfit) == len(rejects) == 4
    assert [c[0] for c in undecodable] == [c[0] for c in unfit] == ["b", "a"]
    assert all(c[2].startswith("undecodable message") for c in undecodable)
    assert all("signature" in c[2] for c in unfit)
    assert broker.stats.rejected == 2


async def test_a_retried_attempt_has_no_error_and_the_final_one_has() -> None:
    calls: list[tuple[Any, ...]] = []
    broker = bus.InMemoryBroker().with_middlewares(Recorder("m", calls))

    @broker.task(name="flaky", retries=1, retry_backoff=0)
    async def flaky() -> None:
        raise RuntimeError("no")

    with trio.fail_after(5):
        async with broker:
            await (await flaky.kiq()).wait_result()
    assert calls == [
        ("m", "post_execute", bus.TaskStatus.FAILURE, True),
        ("m", "post_execute", bus.TaskStatus.FAILURE, False),
    ]


def test_public_surfaces_are_pinned() -> None:
    import bus.activity
    import bus.dashboard
    import bus.metrics
    import bus.tracing

    assert sorted(bus.metrics.__all__) == ["PrometheusMiddleware", "SENT_AT", "serve_metrics"]
    assert bus.tracing.__all__ == ["OpenTelemetryMiddleware"]
    assert sorted(bus.activity.__all__) == ["Activity", "ActivityMiddleware", "read_activity"]
    assert sorted(bus.dashboard.__all__) == ["Dashboard", "app", "serve"]
    assert "on_reject" in bus._middleware.HOOKS
