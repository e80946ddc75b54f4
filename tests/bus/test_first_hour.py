"""A newcomer's first hour (issue 21, section 4): what the library itself does."""

from __future__ import annotations

import pytest
import trio

import bus
from bus._results import DEFAULT_MAX_STORED_RESULTS


def test_the_in_memory_result_store_is_bounded_by_default() -> None:
    broker = bus.InMemoryBroker()
    assert isinstance(broker.result_backend, bus.InMemoryResultBackend)
    assert broker.result_backend.max_stored_results == DEFAULT_MAX_STORED_RESULTS == 10_000
    assert bus.InMemoryResultBackend().max_stored_results == 10_000
    unbounded = bus.InMemoryBroker(max_stored_results=None).result_backend
    assert isinstance(unbounded, bus.InMemoryResultBackend)
    assert unbounded.max_stored_results is None


async def test_kiq_names_the_missing_parameter_and_sends_nothing() -> None:
    broker = bus.InMemoryBroker(start_worker=False)

    @broker.task(name="jobs.add")
    async def add(a: int, b: int, ctx: bus.Context = bus.CONTEXT) -> int:
        return a + b

    with trio.fail_after(5):
        async with broker:
            missing = r"jobs\.add\(a, b\): missing a required argument: 'b'"
            with pytest.raises(TypeError, match=missing):
                await add.kiq(1)  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="'b'"):
                add.kiq_nowait(1)  # type: ignore[call-arg]
            assert (await broker.inspect())["queued"] == 0


def test_store_result_is_a_bool() -> None:
    broker = bus.InMemoryBroker()
    with pytest.raises(TypeError, match="store_result"):

        @broker.task(store_result="no")
        async def bad() -> None:
            pass

    @broker.task
    async def good() -> None:
        pass

    with pytest.raises(TypeError, match="store_result"):
        good.kicker().with_store_result("no")  # type: ignore[arg-type]
