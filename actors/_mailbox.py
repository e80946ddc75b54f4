"""An actor's mailbox: a bounded FIFO with one receiver (the actor) and many senders.

It behaves like a Trio memory channel whose receive end has a single user, and it is
built the way ``trio.MemoryChannel`` is, on ``trio.lowlevel.wait_task_rescheduled``
and ``reschedule``. It exists because the mailbox is the hottest path of the bus
(every send, store and ack is one ``tell_nowait``): with one receiver there is no
receiver table to keep, no peak statistics to update and no clone bookkeeping, which
makes a ``tell_nowait`` about half the cost of ``MemorySendChannel.send_nowait``
(measured in benchmarks/bench_actors.py). The semantics are the channel's:

- ``send_nowait`` hands the message to a waiting receiver, or buffers it, or raises
  ``trio.WouldBlock`` when the buffer is full; ``send`` waits for room;
- ``close()`` (the actor is asked to stop) fails waiting and later senders with
  ``trio.ClosedResourceError``; the receiver drains what is buffered, then gets
  ``trio.EndOfChannel``;
- ``close_receiver()`` (the actor has stopped) fails every sender with
  ``trio.BrokenResourceError``.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs
import outcome
import trio

__all__ = ["Mailbox", "MailboxStatistics"]


@attrs.frozen
class MailboxStatistics:
    """What ``Mailbox.statistics()`` reports (named as a memory channel's are)."""

    current_buffer_used: int
    max_buffer_size: int | float
    tasks_waiting_send: int
    tasks_waiting_receive: int


class Mailbox:
    """See the module docstring."""

    __slots__ = ("_closed", "_data", "_max", "_receiver", "_receiver_closed", "_senders")

    def __init__(self, max_size: int | float) -> None:
        if max_size != math.inf and (not isinstance(max_size, int) or max_size < 0):
            raise TypeError(f"mailbox_size must be an int >= 0 or math.inf, not {max_size!r}")
        self._max = max_size
        self._data: collections.deque[Any] = collections.deque()
        self._receiver: trio.lowlevel.Task | None = None
        # Waiting senders, in arrival order: task -> the message it wants to send.
        self._senders: dict[trio.lowlevel.Task, Any] = {}
        self._closed = False
        self._receiver_closed = False

    # ------------------------------------------------------------------ senders

    def send_nowait(self, msg: Any) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if self._receiver_closed:
            raise trio.BrokenResourceError
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            trio.lowlevel.reschedule(receiver, outcome.Value(msg))
        elif len(self._data) < self._max:
            self._data.append(msg)
        else:
            raise trio.WouldBlock

    async def send(self, msg: Any) -> None:
        """Put ``msg`` in the mailbox, waiting while it is full.

        Cancellation: if cancelled while waiting, the message was not put in."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.send_nowait(msg)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        task = trio.lowlevel.current_task()
        self._senders[task] = msg

        def abort(_: object) -> trio.lowlevel.Abort:
            self._senders.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """No more sends; the receiver drains the buffer, then gets ``EndOfChannel``."""
        if self._closed:
            return
        self._closed = True
        senders, self._senders = self._senders, {}
        for task in senders:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        receiver = self._receiver
        if receiver is not None and not self._data:
            self._receiver = None
            trio.lowlevel.reschedule(receiver, outcome.Error(trio.EndOfChannel()))

    # ----------------------------------------------------------------- receiver

    def receive_nowait(self) -> Any:
        if self._receiver_closed:
            raise trio.ClosedResourceError
        data = self._data
        if data:
            msg = data.popleft()
            if self._senders:
                self._admit_one()
            return msg
        if self._senders:  # a zero-size mailbox: take straight from a sender
            task, msg = next(iter(self._senders.items()))
            del self._senders[task]
            trio.lowlevel.reschedule(task)
            return msg
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def _admit_one(self) -> None:
        task, msg = next(iter(self._senders.items()))
        del self._senders[task]
        self._data.append(msg)
        trio.lowlevel.reschedule(task)

    async def receive(self) -> Any:
        """The next message, waiting for one. Cancellation: nothing was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            msg = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return msg
        if self._receiver is not None:
            raise trio.BusyResourceError("a mailbox has one receiver: its actor")
        self._receiver = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close_receiver(self) -> None:
        """The actor is gone: every sender, waiting or later, gets
        ``BrokenResourceError``. What is still buffered is dropped (drain it first)."""
        self._receiver_closed = True
        self._closed = True
        senders, self._senders = self._senders, {}
        for task in senders:
            trio.lowlevel.reschedule(task, outcome.Error(trio.BrokenResourceError()))
        self._data.clear()

    # ----------------------------------------------------------------- queries

    @property
    def receiver_waiting(self) -> bool:
        """The receiver is parked in ``receive`` (so the buffer is empty)."""
        return self._receiver is not None

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            current_buffer_used=len(self._data),
            max_buffer_size=self._max,
            tasks_waiting_send=len(self._senders),
            tasks_waiting_receive=0 if self._receiver is None else 1,
        )
