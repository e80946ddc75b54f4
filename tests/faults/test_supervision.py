"""In memory: an actor of the bus whose handler raises (a bug) is restarted, keeps
what it owned, and the bus goes on; the caller sees the bug or a bus error, never a
runtime error (``ActorStopped``, ``MailboxFull``, an ExceptionGroup).

The bug is injected by a test hook that lives here, not in the library: it swaps one
entry of the actor class's dispatch table (``_actor_handlers``, built once per class
by ``actors.Actor.__init_subclass__``) for a handler that raises on its first call
and then hands over to the real one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import pytest
import structlog
import trio

import actors
import bus
from bus._inmemory import InMemoryBrokerActor
from bus._results import ResultStoreActor
from bus.protocol import GetProgress, Inspect


class InjectedBug(RuntimeError):
    pass


@contextmanager
def raising_once(
    monkeypatch: pytest.MonkeyPatch, actor_cls: type[actors.Actor], message_type: type
) -> Iterator[list[int]]:
    """The handler of ``message_type`` raises InjectedBug on its first call; yields a
    list that counts the calls."""
    table = actor_cls._actor_handlers
    real = table[message_type]
    calls: list[int] = []

    async def handler(actor: Any, msg: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise InjectedBug(f"injected: {type(msg).__name__}")
        return await real(actor, msg)

    monkeypatch.setitem(table, message_type, handler)
    monkeypatch.delitem(actor_cls._actor_inline, message_type, raising=False)
    yield calls


def _no_runtime_error(exc: BaseException) -> None:
    """What a caller may see from the call that hit the bug: the bug, or a bus error."""
    assert not isinstance(exc, actors.ActorError | BaseExceptionGroup), repr(exc)
    assert isinstance(exc, InjectedBug | bus.BusError), repr(exc)


def _restarted(logs: list[MutableMapping[str, Any]], actor: str) -> bool:
    return any(e["event"] == "actor.restarted" and e.get("actor") == actor for e in logs)


async def test_broker_actor_restarts_and_keeps_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: Counter[int] = Counter()
    gate = trio.Event()
    broker = bus.InMemoryBroker(concurrency=2)

    @broker.task
    async def work(i: int) -> int:
        if i < 2:
            await gate.wait()  # two running through the crash
        runs[i] += 1
        return i

    with trio.fail_after(10):
        async with broker:
            handles = [await work.kiq(i) for i in range(10)]  # 2 running, 8 queued
            with (
                raising_once(monkeypatch, InMemoryBrokerActor, Inspect) as calls,
                structlog.testing.capture_logs() as logs,
            ):
                try:
                    await broker.inspect()
                except Exception as exc:
                    _no_runtime_error(exc)
                else:
                    pytest.fail("the injected bug did not raise")
                info = await broker.inspect()  # restarted, answering again
                assert len(calls) == 2
            assert _restarted(logs, "broker")
            assert info["queued"] + info["running"] >= 1
            assert broker.ref.is_alive
            gate.set()
            results = await bus.gather(*handles, timeout=5)
            assert [r.return_value for r in results] == list(range(10))
            more = await work.kiq(10)
            assert (await more.wait_result(timeout=5)).return_value == 10
            await broker.wait_all()
    assert runs == Counter(range(11)), "each task ran exactly once"


async def test_result_store_restarts_and_keeps_its_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = trio.Event()
    broker = bus.InMemoryBroker()

    @broker.task
    async def echo(x: int) -> int:
        if x:
            await gate.wait()
        return x

    with trio.fail_after(10):
        async with broker:
            done = await echo.kiq(0)
            assert (await done.wait_result(timeout=5)).return_value == 0
            later = await echo.kiq(7)
            async with trio.open_nursery() as nursery:
                waited: list[bus.TaskResult[int]] = []

                async def wait() -> None:
                    waited.append(await later.wait_result(timeout=5))

                nursery.start_soon(wait)
                with (
                    raising_once(monkeypatch, ResultStoreActor, GetProgress) as calls,
                    structlog.testing.capture_logs() as logs,
                ):
                    try:
                        await done.get_progress()
                    except Exception as exc:
                        _no_runtime_error(exc)
                    assert await done.get_progress() is None  # answering again
                    assert len(calls) == 2
                assert _restarted(logs, "results")
                gate.set()  # the waiter registered before the crash is still woken
            assert waited[0].return_value == 7
            assert (await done.get_result()).return_value == 0  # kept through it
            again = await echo.kiq(0)
            assert (await again.wait_result(timeout=5)).return_value == 0
