"""``ActorSystem`` and ``open_system``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from ._actor import DEFAULT_MAILBOX_SIZE, Actor
from ._errors import ActorError
from ._runtime import ActorRef, Cell, failures_in, spawn_cell
from ._supervision import STOP, Policy

__all__ = ["ActorSystem", "open_system"]


class ActorSystem:
    """A set of top-level actors living in one nursery. Made by ``open_system()``."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._cells: dict[str, Cell] = {}

    @property
    def actors(self) -> Mapping[str, ActorRef]:
        """A snapshot of the running top-level actors, by name."""
        return {name: cell.ref for name, cell in self._cells.items()}

    async def spawn(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        mailbox_size: int | float = DEFAULT_MAILBOX_SIZE,
        on_failure: Policy = STOP,
        max_restarts: int = 3,
        restart_window: float = 60.0,
    ) -> ActorRef:
        """Start a top-level actor and return its ref.

        ``factory`` is a zero-argument callable returning an ``Actor`` (a class,
        a ``functools.partial``, a lambda); it is called once now and again on
        each restart. ``name`` must be unique among running siblings
        (``ValueError`` otherwise). ``mailbox_size`` bounds the mailbox
        (``math.inf`` for unbounded). ``on_failure`` is ``STOP`` (the default:
        a failure is logged and the actor stops), ``RESTART`` (at most
        ``max_restarts`` restarts within ``restart_window`` seconds, then
        ``ESCALATE``) or ``ESCALATE`` (the system fails with ``ActorFailed``).

        Can be called from any task while the system is open; raises
        ``ActorError`` once it is closed.

        Cancellation: if cancelled before the actor's task has started, the
        actor is not spawned.
        """
        nursery = self._nursery
        if nursery is None:
            raise ActorError("the actor system is not open")
        try:
            return await spawn_cell(
                system=self,
                parent=None,
                nursery=nursery,
                registry=self._cells,
                factory=factory,
                name=name,
                mailbox_size=mailbox_size,
                on_failure=on_failure,
                max_restarts=max_restarts,
                restart_window=restart_window,
            )
        except RuntimeError as exc:  # the nursery closed under us
            if self._nursery is None or nursery is not self._nursery:
                raise ActorError("the actor system is closed") from None
            raise exc from None

    async def _stop_all(self) -> None:
        while self._cells:
            async with trio.open_nursery() as nursery:
                for cell in list(self._cells.values()):
                    nursery.start_soon(cell.stop)


@asynccontextmanager
async def open_system() -> AsyncIterator[ActorSystem]:
    """Open an actor system: ``async with actors.open_system() as system: ...``.

    On normal exit of the block every top-level actor is stopped (each drains
    its mailbox, stops its children, runs ``on_stop``), then the system closes.
    If the block raises, or the enclosing scope is cancelled, every actor is
    cancelled and nothing is left running.

    A failure escalated to the system comes out as a plain ``ActorFailed``
    (``__cause__`` is the actor's exception), never as an ``ExceptionGroup``;
    an exception raised by the block itself comes out as itself.

    Cancellation: while exiting, a cancellation cancels the graceful stop and
    every actor with it.
    """
    system = ActorSystem()
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            system._nursery = nursery
            yield system
            await system._stop_all()
            system._nursery = None
    except BaseExceptionGroup as group:
        found = failures_in(group)
        if not found:
            raise  # pure cancellation: the enclosing cancel scope catches it
        error = found[0]
        for other in found[1:]:
            error.add_note(f"also raised in the actor system: {other!r}")
    finally:
        system._nursery = None
    if error is not None:
        raise error
