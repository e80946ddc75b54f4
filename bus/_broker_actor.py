"""The base of broker actors: what every broker actor does with workers."""

from __future__ import annotations

import attrs

import actors
from actors._log import get_logger
from bus._protocol import Register, Unclaim, Unregister

__all__ = ["BrokerActor", "ListWorkers"]

log = get_logger("bus.broker")


@attrs.frozen
class ListWorkers:
    """Ask: the refs of the workers registered with a broker actor."""


class BrokerActor(actors.Actor):
    """Subclass it to write a broker actor (see docs/testing.md).

    It keeps the workers that registered (``Register`` with a ref) until they
    ``Unregister``, and :meth:`tell_workers` sends them a message (``CancelRunning``).
    A subclass adds handlers for ``Send``, ``Receive``, ``Ack``, ``Nack``, ``Release``,
    ``Cancel`` and ``Inspect``.
    """

    def __init__(self) -> None:
        self.workers: dict[actors.ActorRef, set[str]] = {}

    @actors.handles(Register, inline=True)
    def register(self, msg: Register) -> None:
        if msg.worker is not None:
            self.workers.setdefault(msg.worker, set()).add(msg.name)

    @actors.handles(Unregister, inline=True)
    def unregister(self, msg: Unregister) -> None:
        self.workers.pop(msg.worker, None)

    @actors.handles(Unclaim, inline=True)
    def unclaim(self, msg: Unclaim) -> object:
        """Brokers without unique jobs have nothing to free."""
        return None

    @actors.handles(ListWorkers, inline=True)
    def list_workers(self, msg: ListWorkers) -> list[actors.ActorRef]:
        return list(self.workers)

    def tell_workers(self, msg: object) -> None:
        """Tell every registered worker ``msg`` (a worker that stopped is forgotten)."""
        for ref in list(self.workers):
            try:
                ref.tell_nowait(msg)
            except actors.ActorStopped:
                self.workers.pop(ref, None)
            except actors.MailboxFull:
                self.nursery.start_soon(self._tell_later, ref, msg)

    async def _tell_later(self, ref: actors.ActorRef, msg: object) -> None:
        try:
            await ref.tell(msg)
        except actors.ActorStopped:
            self.workers.pop(ref, None)
