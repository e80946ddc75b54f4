"""The mover of delayed messages, a child of the Redis broker actor, and the messages
the broker actor is asked with by its facade (:class:`SendNow`, :class:`SendMany`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
import trio
import trio.lowlevel

import actors
from actors._log import get_logger
from bus._message import TaskMessage
from bus.redis._client import (
    ConnectionLost,
    ReplyError,
    rerun_noscript,
)
from bus.redis._logic import (
    Keys,
)
from bus.redis._pool import (
    is_transient,
    lend,
)
from bus.redis._scripts import (
    PROMOTE,
)
from bus.redis._settings import RedisSettings

if TYPE_CHECKING:
    pass


__all__ = ["DelayedMoverActor", "SendMany", "SendNow", "WakeMover"]

log = get_logger("bus.redis")


# ------------------------------------------------------------ private messages


@attrs.frozen
class SendNow:
    """Ask (inline): queue the XADD/ZADD of ``message``; the answer is the Pending of
    its reply. What ``kick`` uses: an idle broker actor answers in the producer's own
    task, and the producer's wait writes the command."""

    message: TaskMessage
    data: bytes
    #: A unique job: the value its key holds that is not one this secret made (a
    #: forgery), to replace rather than obey.
    replace: bytes | None = None


@attrs.frozen
class SendMany:
    """Ask (inline): as :class:`SendNow` for a batch (one write)."""

    messages: tuple[tuple[TaskMessage, bytes], ...]


@attrs.frozen
class WakeMover:
    """Tell: a delayed message was just sent to ``queue`` (``None``: the default one);
    look at its delayed sets now (and from now on)."""

    queue: str | None = None


# ----------------------------------------------------------------- the mover


class DelayedMoverActor(actors.Actor):
    """Moves due delayed messages into their streams (atomic in Lua, so any number of
    workers may run it at once), for every queue this process sends to or reads. It
    sleeps until the next due member (at most the poll interval, as other processes add
    to the sets) or until woken."""

    def __init__(
        self,
        settings: RedisSettings,
        keys: Keys,
        conn_ref: actors.ActorRef,
        queues: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.conn_ref = conn_ref
        self.queues: dict[str, Keys] = {keys.queue: keys}
        for queue in queues:
            self.queues.setdefault(queue, keys.of(queue))
        self._wake = trio.Event()

    async def on_start(self) -> None:
        self.nursery.start_soon(self._move_forever)

    @actors.handles(WakeMover, inline=True)
    def wake(self, msg: WakeMover) -> None:
        if msg.queue is not None and msg.queue not in self.queues:
            self.queues[msg.queue] = self.keys.of(msg.queue)
        self._wake.set()

    async def _move_forever(self) -> None:
        while True:
            wait = self.settings.delay_poll_interval
            lent = await lend(self.conn_ref)
            now_ms = int(time.time() * 1000)
            commands = [
                PROMOTE.command(
                    keys=[*keys.delayeds, *keys.streams],
                    args=[now_ms, 200, self.settings.maxlen or 0, keys.data_field],
                )
                for keys in self.queues.values()
            ]
            try:
                replies = await lent.conn.pipeline(commands)
                await rerun_noscript(lent.conn, commands, replies)
            except ConnectionLost as exc:
                log.debug("redis.mover_failed", error=str(exc), actor=self.name)
                await lent.lost.wait()
                continue
            for reply in replies:
                if isinstance(reply, ReplyError):
                    # "Not now" (LOADING after a restart, BUSY, ...) is retried on the
                    # next pass and expected: debug. Anything else is a real refusal.
                    level = log.debug if is_transient(reply) else log.error
                    level("redis.mover_refused", error=reply.message, actor=self.name)
                    continue
                moved, nxt = reply
                if moved >= 200:
                    wait = 0.0
                elif nxt is not None:
                    wait = min(wait, max(0.0, float(nxt) / 1000 - time.time()))
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._wake = trio.Event()
