"""The bound on an in-memory broker's waiting messages (``max_queue``)."""

from __future__ import annotations

import trio

__all__ = ["Room"]


class Room:
    """The places of the bounded queue: a producer takes one before it sends, a worker
    taking the delivery gives it back. A counting semaphore with ``trio.Semaphore``'s
    semantics (waiters are served in order; a place given back goes to the longest
    waiter), whose uncontended take and give-back are one call each: every ``kiq``
    does both (``trio.Semaphore`` asks its parking lot for its length in a call of its
    own each time).

    Owned by the broker actor (in its ``Kept`` state) and lent to the facade, which
    takes places, and to the leases, which give them back."""

    __slots__ = ("_lot", "_waiting", "value")

    def __init__(self, places: int) -> None:
        #: Free places. While any is free nobody waits: a place given back while a
        #: producer waits is handed to it instead.
        self.value = places
        self._lot = trio.lowlevel.ParkingLot()
        self._waiting = 0  # parked, or woken and not yet resumed (or cancelled)

    def acquire_nowait(self) -> None:
        """Take a place now, or raise ``trio.WouldBlock``."""
        if self.value:
            self.value -= 1
        else:
            raise trio.WouldBlock

    async def acquire(self) -> None:
        """Take a place, waiting for one. Cancellation: no place was taken."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.value:
            self.value -= 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._waiting += 1
        try:
            await self._lot.park()  # woken by release: the place was handed to us
        finally:
            self._waiting -= 1

    def release(self) -> None:
        """Give a place back: to the longest waiter, else to the free ones."""
        # A waiter cancelled meanwhile has left the lot: then nobody is woken.
        if self._waiting and self._lot.unpark(count=1):
            return
        self.value += 1

    @property
    def tasks_waiting(self) -> int:
        """How many producers wait for a place."""
        return len(self._lot)
