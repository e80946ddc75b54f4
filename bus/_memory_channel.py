"""The in-memory broker's ready channel: deliveries that may start, in order, and the
receive ends the broker actor lends its workers' leases.

It behaves as a Trio memory channel with an unbounded buffer, one sender (the broker
actor, which also reads it when it takes deliveries back) and a receive end per lease,
built as ``trio.MemoryChannel`` is, on ``trio.lowlevel.wait_task_rescheduled`` and
``reschedule``. It exists for the hot path of every task:

- a runner that waits is handed the next delivery directly; the one woken is the runner
  that began to wait *last* (a memory channel wakes the one that waited longest). Which
  runner of a worker runs a delivery is not part of any contract, and the last one to
  wait is the one whose state is still in the processor's caches: with a thousand
  runners, a sequential round trip otherwise wakes a cold one every time;
- a runner that finds nothing waits without an exception raised and caught in between
  (``receive`` of a memory channel tries ``receive_nowait`` first).

The semantics kept: ``send_nowait`` raises ``trio.ClosedResourceError`` once the channel
is closed; ``close()`` lets the ends take what is buffered, then gives them
``trio.EndOfChannel``; an end closed by its lease raises ``trio.ClosedResourceError``,
also in the runners that wait on it. Cancellation: a ``receive`` that is cancelled took
nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, MutableMapping
from typing import Any

import outcome
import trio

from bus._protocol import Delivery

__all__ = ["ReadyChannel", "ReadyEnd", "park"]


def park(table: MutableMapping[trio.lowlevel.Task, Any], value: Any) -> Callable[[Any], Any]:
    """Enter the current task in ``table`` (waiting runners, task -> ``value``) and
    return the abort function to wait with (``trio.lowlevel.wait_task_rescheduled``):
    a cancelled wait leaves the table. Whoever hands the task a value removes it."""
    task = trio.lowlevel.current_task()
    table[task] = value

    def abort(_: Any) -> trio.lowlevel.Abort:
        table.pop(task, None)
        return trio.lowlevel.Abort.SUCCEEDED

    return abort


class ReadyChannel:
    """See the module documentation. Owned by the broker actor (in its kept state)."""

    __slots__ = ("_data", "_parked", "closed")

    def __init__(self) -> None:
        self._data: collections.deque[Delivery] = collections.deque()
        # Runners waiting for a delivery, in the order they began to wait, with the end
        # each waits on (a plain dict: popitem() gives the last one).
        self._parked: dict[trio.lowlevel.Task, ReadyEnd] = {}
        self.closed = False

    def send_nowait(self, d: Delivery) -> None:
        """``d`` may start: to the runner that began to wait last, else buffered."""
        if self.closed:
            raise trio.ClosedResourceError
        parked = self._parked
        if parked:
            task, _ = parked.popitem()
            trio.lowlevel.reschedule(task, outcome.Value(d))
        else:
            self._data.append(d)

    def receive_nowait(self) -> Delivery:
        """The broker's own take (moving what is buffered elsewhere)."""
        data = self._data
        if data:
            return data.popleft()
        if self.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def close(self) -> None:
        """No more sends: the ends take what is buffered, then get ``EndOfChannel``."""
        self.closed = True
        if not self._data:
            parked, self._parked = self._parked, {}
            for task in parked:
                trio.lowlevel.reschedule(task, outcome.Error(trio.EndOfChannel()))

    def clone(self) -> ReadyEnd:
        """A receive end to lend."""
        return ReadyEnd(self)

    def __len__(self) -> int:
        return len(self._data)


class ReadyEnd:
    """A receive end of a :class:`ReadyChannel`, lent to one worker's lease."""

    __slots__ = ("_channel", "_data", "closed")

    def __init__(self, channel: ReadyChannel) -> None:
        self._channel = channel
        self._data = channel._data
        self.closed = False

    def receive_nowait(self) -> Delivery:
        if self.closed:
            raise trio.ClosedResourceError
        data = self._data
        if data:
            return data.popleft()
        if self._channel.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> Delivery:
        """The next delivery, waiting for one. Cancellation: nothing was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed:
            raise trio.ClosedResourceError
        data = self._data
        if data:
            d = data.popleft()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return d
        channel = self._channel
        if channel.closed:
            raise trio.EndOfChannel
        got: Delivery = await trio.lowlevel.wait_task_rescheduled(park(channel._parked, self))
        return got

    def close(self) -> None:
        """This end takes nothing more: its waiting runners get ``ClosedResourceError``."""
        if self.closed:
            return
        self.closed = True
        parked = self._channel._parked
        for task in [t for t, end in parked.items() if end is self]:
            del parked[task]
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
