"""``ActorSystem`` and ``open_system``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from ._actor import DEFAULT_MAILBOX_SIZE, Actor
from ._errors import ActorError
from ._runtime import ActorRef, Cell, failures_in, run_cell, spawn_cell
from ._supervision import STOP, Backoff, Policy

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
        max_restarts: int | None = 3,
        restart_window: float = 60.0,
        backoff: Backoff | None = None,
    ) -> ActorRef:
        """Start a top-level actor and return its ref.

        ``factory`` is a zero-argument callable returning an ``Actor`` (a class,
        a ``functools.partial``, a lambda); it is called once now and again on
        each restart. ``name`` must be unique among running siblings
        (``ValueError`` otherwise). ``mailbox_size`` bounds the mailbox
        (``math.inf`` for unbounded). ``on_failure`` is ``STOP`` (the default:
        a failure is logged and the actor stops), ``RESTART`` (at most
        ``max_restarts`` restarts within ``restart_window`` seconds, then
        ``ESCALATE``; ``max_restarts=None`` never gives up) or ``ESCALATE`` (the
        system fails with ``ActorFailed``). ``backoff`` (an :class:`actors.Backoff`)
        makes a restarting actor wait, longer each time, before its next instance
        starts: reconnect-with-backoff is this, not a loop of your own.

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
                backoff=backoff,
            )
        except RuntimeError as exc:  # the nursery closed under us
            if self._nursery is None or nursery is not self._nursery:
                raise ActorError("the actor system is closed") from None
            raise exc from None

    async def run(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        mailbox_size: int | float = DEFAULT_MAILBOX_SIZE,
        on_failure: Policy = STOP,
        max_restarts: int | None = 3,
        restart_window: float = 60.0,
        backoff: Backoff | None = None,
        task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a top-level actor in the calling task, until it stops.

        The actor belongs to this system (it is listed in :attr:`actors` and
        :meth:`tree`, and the system stops it when it closes) but its lifetime is
        also the caller's: use it with ``await nursery.start(system.run, F,
        name=...)``, which returns the actor's ref once its ``on_start`` has
        returned (it is ready). Arguments as :meth:`spawn`.

        Cancellation: cancelling the caller cancels the actor (its children, its
        nursery and the handler it is in); ``on_stop`` does not run.
        """
        if self._nursery is None:
            raise ActorError("the actor system is not open")
        await run_cell(
            system=self,
            registry=self._cells,
            factory=factory,
            name=name,
            mailbox_size=mailbox_size,
            on_failure=on_failure,
            max_restarts=max_restarts,
            restart_window=restart_window,
            backoff=backoff,
            task_status=task_status,
        )

    def tree(self) -> str:
        """The running actors as an indented tree, one line each: name, type, and
        mailbox use (``used/size``). For logs, debugging and tests."""
        lines = ["actors"]

        def walk(cells: list[Cell], prefix: str) -> None:
            for i, cell in enumerate(cells):
                last = i == len(cells) - 1
                stats = cell.mailbox.statistics()
                size, used = stats.max_buffer_size, stats.current_buffer_used
                cap = "inf" if size == float("inf") else str(size)
                lines.append(
                    f"{prefix}{'└── ' if last else '├── '}{cell.name} "
                    f"({type(cell.instance).__qualname__}, mailbox {used}/{cap})"
                )
                walk(list(cell.children.values()), prefix + ("    " if last else "│   "))

        walk(list(self._cells.values()), "")
        return "\n".join(lines)

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
