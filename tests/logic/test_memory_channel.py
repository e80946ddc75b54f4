"""The in-memory broker's ready channel (bus._memory_channel): a memory channel's
semantics, the last runner to wait woken first."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

from bus._ids import TaskID
from bus._memory_channel import ReadyChannel
from bus._protocol import Delivery


def _d() -> Delivery:
    return Delivery(b"", (TaskID.new(), True, None))


async def test_buffered_in_order_then_end_of_channel_once_closed() -> None:
    channel = ReadyChannel()
    end = channel.clone()
    first, second = _d(), _d()
    channel.send_nowait(first)
    channel.send_nowait(second)
    assert len(channel) == 2
    assert end.receive_nowait() is first
    channel.close()
    with pytest.raises(trio.ClosedResourceError):
        channel.send_nowait(_d())
    assert await end.receive() is second  # what is buffered is still taken
    with pytest.raises(trio.EndOfChannel):
        end.receive_nowait()
    with pytest.raises(trio.EndOfChannel):
        await end.receive()
    with pytest.raises(trio.EndOfChannel):
        channel.receive_nowait()


async def test_the_runner_that_waited_last_is_handed_the_delivery() -> None:
    channel = ReadyChannel()
    got: dict[int, Delivery] = {}

    async def runner(i: int) -> None:
        with contextlib.suppress(trio.EndOfChannel):
            got[i] = await channel.clone().receive()

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(runner, i)
            await trio.testing.wait_all_tasks_blocked()
        d = _d()
        channel.send_nowait(d)
        await trio.testing.wait_all_tasks_blocked()
        assert got == {2: d} and len(channel) == 0
        channel.close()  # the others: EndOfChannel
        with pytest.raises(trio.EndOfChannel):
            channel.receive_nowait()
    assert list(got) == [2]


async def test_closing_an_end_fails_its_waiters_only_and_a_cancelled_wait_takes_nothing() -> None:
    channel = ReadyChannel()
    mine, other = channel.clone(), channel.clone()
    errors: list[Any] = []

    async def wait(end: Any) -> None:
        try:
            await end.receive()
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, mine)
        nursery.start_soon(wait, other)
        await trio.testing.wait_all_tasks_blocked()
        mine.close()
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 1
        with pytest.raises(trio.ClosedResourceError):
            mine.receive_nowait()
        d = _d()
        channel.send_nowait(d)  # to the one still waiting
    assert len(channel) == 0
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await other.receive()
    with trio.move_on_after(0.01):
        await other.receive()  # waits, is cancelled: nothing taken, nothing parked
    channel.send_nowait(d)
    assert other.receive_nowait() is d
