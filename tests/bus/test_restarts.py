"""A failure inside the in-memory broker's actors is contained: the actor restarts
with its state, and the bus goes on without losing a task or a waiter."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

import actors
import bus
from bus._inmemory import InMemoryBrokerActor
from bus._results import ResultStoreActor
from bus.protocol import GetResult, Inspect


class Boom(Exception):
    """A bug in a handler."""


def _crash_once(monkeypatch: pytest.MonkeyPatch, cls: type[actors.Actor], msg: type) -> None:
    """Make ``cls``'s handler of ``msg`` raise once (the bug), then behave."""
    real = cls._actor_handlers[msg]
    calls = {"n": 0}

    async def handler(actor: Any, message: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom("a bug in a handler")
        return await real(actor, message)

    monkeypatch.setitem(cls._actor_handlers, msg, handler)


async def test_the_broker_actor_restarts_with_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = bus.InMemoryBroker(start_worker=False)
    ran: list[int] = []

    @broker.task
    async def work(n: int) -> int:
        ran.append(n)
        return n * 2

    _crash_once(monkeypatch, InMemoryBrokerActor, Inspect)
    with trio.fail_after(10):
        async with broker:
            handles = [await work.kiq(i) for i in range(20)]
            with pytest.raises(Boom):
                await broker.inspect()  # the asker gets the bug; the actor restarts
            info = await broker.inspect()
            assert info["queued"] == 20  # nothing queued was lost
            assert broker.ref.restart_count == 1
            more = [await work.kiq(i) for i in range(20, 25)]
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run_worker)
                results = await bus.gather(*handles, *more, timeout=5)
                nursery.cancel_scope.cancel()
    assert [r.return_value for r in results] == [i * 2 for i in range(25)]
    assert sorted(ran) == list(range(25))  # each ran once


async def test_the_result_store_restarts_with_its_results_and_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = bus.InMemoryBroker()
    gate = trio.Event()

    @broker.task
    async def slow() -> str:
        await gate.wait()
        return "done"

    @broker.task
    async def quick() -> str:
        return "quick"

    _crash_once(monkeypatch, ResultStoreActor, GetResult)
    with trio.fail_after(10):
        async with broker:
            first = await quick.kiq()
            assert (await first.wait_result(timeout=5)).return_value == "quick"
            waiting = await slow.kiq()
            got: list[bus.TaskResult[str]] = []

            async def wait() -> None:
                got.append(await waiting.wait_result(timeout=5))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(Boom):
                    await broker.result_backend.ref.ask(GetResult(first.task_id))
                await trio.testing.wait_all_tasks_blocked()  # the restart's backoff
                assert broker.result_backend.ref.restart_count == 1
                # The stored result and the waiter outlived the failed instance.
                assert (await first.get_result()).return_value == "quick"
                gate.set()
            assert got[0].return_value == "done"


async def test_no_runtime_error_after_the_broker_stopped() -> None:
    broker = bus.InMemoryBroker()

    @broker.task
    async def noop() -> None:
        return None

    with trio.fail_after(5):
        async with broker:
            handle = await noop.kiq()
            await handle.wait_result(timeout=5)
        for call in (noop.kiq, broker.inspect, handle.cancel):
            with pytest.raises(bus.BusError):
                await call()


async def test_a_bug_that_keeps_coming_back_ends_the_broker(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """An actor that cannot go on is not left alive and idle: after its restarts the
    failure escalates and ``async with broker`` raises (a worker process exits 1)."""

    async def always(actor: Any, message: Any) -> Any:
        raise Boom("a bug every time")

    monkeypatch.setitem(InMemoryBrokerActor._actor_handlers, Inspect, always)
    broker = bus.InMemoryBroker()

    async def run() -> None:
        async with broker:
            while True:
                with contextlib.suppress(Boom, bus.BusError):
                    await broker.inspect()
                await trio.sleep(0.5)

    with trio.fail_after(600), pytest.raises(actors.ActorFailed, match="broker") as info:
        await run()
    assert "a bug every time" in str(info.value)
