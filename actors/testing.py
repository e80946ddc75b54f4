"""Helpers for unit-testing actors under pytest-trio (``autojump_clock`` friendly).

- ``spawn_probe(system, name=...)`` spawns a :class:`Probe`: a real actor whose
  ref records everything sent to it, can ``expect`` a message type within a
  deadline, and answers ``ask`` with a reply function you choose.
- ``run_actor(factory)`` runs one actor in a fresh system and yields its ref.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from ._actor import DEFAULT_MAILBOX_SIZE, Actor, handles
from ._errors import ActorStopped
from ._runtime import ActorRef
from ._supervision import STOP, Policy
from ._system import ActorSystem, open_system

__all__ = ["Probe", "ReplyFn", "run_actor", "spawn_probe"]

M = TypeVar("M")

#: Computes the reply to an ``ask`` sent to a probe (may be sync or async).
ReplyFn = Callable[[Any], Any]


class _ProbeState:
    __slots__ = ("changed", "expected", "messages", "reply")

    def __init__(self, reply: ReplyFn | None) -> None:
        self.messages: list[object] = []
        self.expected: set[int] = set()
        self.changed = trio.Event()
        self.reply = reply

    def record(self, msg: object) -> None:
        self.messages.append(msg)
        self.changed.set()
        self.changed = trio.Event()


class _ProbeAsk:
    __slots__ = ("msg",)

    def __init__(self, msg: object) -> None:
        self.msg = msg


class _ProbeActor(Actor):
    def __init__(self, state: _ProbeState) -> None:
        self._state = state

    @handles(_ProbeAsk)
    async def _answer(self, envelope: _ProbeAsk) -> Any:
        reply = self._state.reply
        if reply is None:
            return None
        value = reply(envelope.msg)
        if inspect.isawaitable(value):
            value = await value
        return value

    @handles(object)
    async def _ignore(self, msg: object) -> None:
        pass  # already recorded by the Probe ref when it was sent


class Probe(ActorRef):
    """A ref to a recording actor: usable wherever an ``ActorRef`` is.

    Every message sent through it (``tell``, ``tell_nowait``, ``ask``) is
    recorded in ``messages`` at the moment it is accepted into the mailbox.
    ``ask`` is answered by the reply function (``reply_with``); without one the
    reply is ``None``. Make one with :func:`spawn_probe`.
    """

    __slots__ = ("_state",)

    def __init__(self, ref: ActorRef, state: _ProbeState) -> None:
        super().__init__(ref._cell)
        self._state = state

    @property
    def messages(self) -> list[object]:
        """Everything sent to the probe, in order."""
        return self._state.messages

    def reply_with(self, fn: ReplyFn | None) -> None:
        """Answer each later ``ask`` with ``fn(msg)`` (awaited if it returns an awaitable).

        An exception raised by ``fn`` is raised in the asker (and, the probe's
        policy being ``STOP``, stops the probe).
        """
        self._state.reply = fn

    async def tell(self, msg: object) -> None:
        await super().tell(msg)
        self._state.record(msg)

    def tell_nowait(self, msg: object) -> None:
        super().tell_nowait(msg)
        self._state.record(msg)

    async def ask(self, msg: object, timeout: float | None = None) -> Any:
        # Record first: the reply may come back before ``ask`` regains control.
        if not self.is_alive:
            raise ActorStopped(f"actor {self.name!r} is stopped")
        self._state.record(msg)
        return await super().ask(_ProbeAsk(msg), timeout)

    def _take(self, message_type: type[M]) -> M | None:
        state = self._state
        for index, msg in enumerate(state.messages):
            if index not in state.expected and isinstance(msg, message_type):
                state.expected.add(index)
                return msg
        return None

    def _describe(self, message_type: type, within: float | None) -> str:
        state = self._state
        when = "" if within is None else f" within {within}s"
        lines = [f"probe {self.name!r} received no {message_type.__qualname__}{when}"]
        if not state.messages:
            lines.append("it received nothing")
        else:
            lines.append(f"it received {len(state.messages)} message(s):")
            for index, msg in enumerate(state.messages):
                mark = " (already expected)" if index in state.expected else ""
                lines.append(f"  [{index}] {msg!r}{mark}")
        return "\n".join(lines)

    def expect_nowait(self, message_type: type[M]) -> M:
        """Return the first not-yet-expected message of ``message_type`` (or a subclass).

        Raises ``AssertionError`` listing what was received if there is none.
        """
        found = self._take(message_type)
        if found is None:
            raise AssertionError(self._describe(message_type, None))
        return found

    async def expect(self, message_type: type[M], *, within: float = 1.0) -> M:
        """Wait up to ``within`` seconds for a not-yet-expected ``message_type`` message.

        Returns it, or raises ``AssertionError`` listing what was received.
        Under ``autojump_clock`` the wait costs no real time.

        Cancellation: nothing is consumed; a later ``expect`` finds the message.
        """
        with trio.move_on_after(within):
            while True:
                found = self._take(message_type)
                if found is not None:
                    return found
                await self._state.changed.wait()
        raise AssertionError(self._describe(message_type, within))

    def clear(self) -> None:
        """Forget every recorded message."""
        self._state.messages.clear()
        self._state.expected.clear()


async def spawn_probe(
    system: ActorSystem,
    *,
    name: str = "probe",
    reply: ReplyFn | None = None,
    mailbox_size: int | float = math.inf,
) -> Probe:
    """Spawn a recording actor in ``system`` and return its :class:`Probe`.

    The probe lives until it is stopped (``await probe.stop()``) or the system
    closes. ``reply`` is the initial reply function (see ``Probe.reply_with``).
    The mailbox is unbounded by default so senders never wait on a probe.

    Cancellation: as ``ActorSystem.spawn``.
    """
    state = _ProbeState(reply)
    ref = await system.spawn(lambda: _ProbeActor(state), name=name, mailbox_size=mailbox_size)
    return Probe(ref, state)


@asynccontextmanager
async def run_actor(
    factory: Callable[[], Actor],
    *,
    name: str = "actor-under-test",
    mailbox_size: int | float = DEFAULT_MAILBOX_SIZE,
    on_failure: Policy = STOP,
    max_restarts: int | None = 3,
    restart_window: float = 60.0,
) -> AsyncIterator[ActorRef]:
    """Run one actor in a fresh system: ``async with run_actor(F) as ref: ...``.

    At the end of the block the actor is stopped (it drains its mailbox and runs
    ``on_stop``), then the system closes. Failures follow ``on_failure``
    (``STOP`` by default, as ``spawn``). When the test needs more than one actor
    (e.g. a probe), open a system yourself.

    Cancellation: as ``open_system``: everything is cancelled.
    """
    async with open_system() as system:
        ref = await system.spawn(
            factory,
            name=name,
            mailbox_size=mailbox_size,
            on_failure=on_failure,
            max_restarts=max_restarts,
            restart_window=restart_window,
        )
        yield ref
        await ref.stop()
