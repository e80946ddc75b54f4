"""Edge cases found while documenting: sync tasks past their deadline, misbehaving
middlewares, option labels checked at send time."""

from __future__ import annotations

import time
from typing import Any

import pytest
import structlog
import trio

import bus


async def test_sync_task_past_its_deadline_is_a_timeout_and_frees_its_slot() -> None:
    broker = bus.InMemoryBroker(concurrency=1)

    @broker.task(timeout=0.05)
    def blocking() -> str:
        time.sleep(0.2)  # a thread cannot be interrupted
        return "done"

    @broker.task
    async def quick() -> int:
        return 1

    with trio.fail_after(10):
        async with broker:
            result = await (await blocking.kiq()).wait_result(timeout=5)
            assert result.status is bus.TaskStatus.TIMEOUT
            assert result.return_value is None
            # The only slot is free again.
            assert (await (await quick.kiq()).wait_result(timeout=5)).return_value == 1
            await broker.wait_all()


async def test_cancelling_a_running_sync_task_records_cancelled() -> None:
    broker = bus.InMemoryBroker(concurrency=1)
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    @broker.task
    def blocking() -> str:
        trio.from_thread.run_sync(started.set, trio_token=token)
        time.sleep(0.1)
        return "done"

    with trio.fail_after(10):
        async with broker:
            handle = await blocking.kiq()
            await started.wait()
            await handle.cancel()
            result = await handle.wait_result(timeout=5)
            assert result.status is bus.TaskStatus.CANCELLED
            await broker.wait_all()


async def test_pre_execute_errors_fail_the_task_not_the_broker() -> None:
    class Bad(bus.Middleware):
        def pre_execute(self, message: bus.TaskMessage) -> bus.TaskMessage:
            return None  # type: ignore[return-value]

    broker = bus.InMemoryBroker(middlewares=(Bad(),))

    @broker.task
    async def noop() -> None:
        pass

    with trio.fail_after(10):
        async with broker:
            result = await (await noop.kiq()).wait_result(timeout=5)
    assert result.status is bus.TaskStatus.FAILURE
    assert result.error is not None and "must return a TaskMessage" in result.error.message


async def test_post_hooks_errors_are_logged_and_the_chain_goes_on() -> None:
    seen: list[str] = []

    class Raises(bus.Middleware):
        def post_send(self, message: bus.TaskMessage) -> None:
            raise RuntimeError("post_send broke")

        def post_execute(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
            raise RuntimeError("post_execute broke")

    class Records(bus.Middleware):
        def post_send(self, message: bus.TaskMessage) -> None:
            seen.append("post_send")

        def post_execute(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
            seen.append("post_execute")

    # Reverse order for post hooks: Records runs after Raises only if the chain goes on.
    broker = bus.InMemoryBroker(middlewares=(Records(), Raises()))

    @broker.task
    async def noop() -> int:
        return 5

    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        async with broker:
            handle = await noop.kiq()  # sent: a post_send error must not raise here
            assert (await handle.wait_result(timeout=5)).return_value == 5
            await broker.wait_all()
    assert broker.stats.sent == 1
    assert seen == ["post_send", "post_execute"]
    failed = [e["hook"] for e in logs if e["event"] == "middleware.failed"]
    assert failed == ["post_send", "post_execute"]


async def test_kiq_nowait_runs_sync_send_hooks_and_refuses_async_ones() -> None:
    seen: list[str] = []

    class Sync(bus.Middleware):
        def pre_send(self, message: bus.TaskMessage) -> bus.TaskMessage:
            seen.append("pre_send")
            return message

    class Async(bus.Middleware):
        async def pre_send(self, message: bus.TaskMessage) -> bus.TaskMessage:
            return message

    ok = bus.InMemoryBroker(middlewares=(Sync(),))
    refused = bus.InMemoryBroker(middlewares=(Async(),))

    @ok.task(name="n")
    async def n1() -> None:
        pass

    @refused.task(name="n")
    async def n2() -> None:
        pass

    with trio.fail_after(10):
        async with ok:
            await n1.kiq_nowait().wait_result(timeout=5)
        async with refused:
            with pytest.raises(bus.SendError, match="async pre_send"):
                n2.kiq_nowait()
    assert seen == ["pre_send"]


async def test_invalid_option_labels_fail_at_kiq() -> None:
    broker = bus.InMemoryBroker()

    @broker.task
    async def noop() -> None:
        pass

    async with broker:
        with pytest.raises(bus.SendError, match="retries"):
            await noop.kicker().with_labels(retries=-1).kiq()
        with pytest.raises(bus.SendError, match="timeout"):
            await noop.kicker().with_labels(timeout="soon").kiq()


async def test_waiting_on_a_stopped_result_store_is_result_not_found() -> None:
    broker = bus.InMemoryBroker(start_worker=False)

    @broker.task
    async def never() -> None:
        pass

    with trio.fail_after(10):
        async with broker:
            handle = await never.kiq()
            ref = broker.result_backend.ref
            assert ref is not None
            await ref.stop()
            with pytest.raises(bus.ResultNotFound, match="stopping"):
                await handle.wait_result(timeout=1)
