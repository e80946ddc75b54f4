"""The in-memory broker's bound (bus._memory_room.Room): a semaphore's semantics."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bus._memory_room import Room


async def test_places_are_taken_and_given_back() -> None:
    room = Room(2)
    room.acquire_nowait()
    await room.acquire()
    assert room.value == 0
    with pytest.raises(trio.WouldBlock):
        room.acquire_nowait()
    room.release()
    assert room.value == 1 and room.tasks_waiting == 0


async def test_a_place_given_back_goes_to_the_longest_waiter() -> None:
    room = Room(0)
    got: list[int] = []

    async def wait(i: int) -> None:
        await room.acquire()
        got.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(wait, i)
            await trio.testing.wait_all_tasks_blocked()
        assert room.tasks_waiting == 3
        room.release()
        room.release()
        assert room.value == 0  # handed over, not freed
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(got) == [0, 1]  # the two longest waiters (woken in any order)
        assert room.tasks_waiting == 1
        room.release()
    assert sorted(got) == [0, 1, 2] and room.value == 0


async def test_a_cancelled_waiter_takes_nothing_and_loses_nothing() -> None:
    room = Room(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(room.acquire)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
        room.release()  # in the same pass: the waiter has left the lot
    assert room.value == 1 and room.tasks_waiting == 0
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await room.acquire()
    assert room.value == 1
