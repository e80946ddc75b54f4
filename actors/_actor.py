"""The ``Actor`` base class and the ``handles`` decorator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import trio

from ._errors import ActorError
from ._supervision import STOP, Backoff, Policy

if TYPE_CHECKING:
    from ._runtime import ActorRef, Cell
    from ._system import ActorSystem

__all__ = ["DEFAULT_MAILBOX_SIZE", "Actor", "Handler", "Later", "handles", "later"]

#: Mailbox size used when ``spawn`` is not given one.
DEFAULT_MAILBOX_SIZE = 100

_MARK = "__actors_handles__"
_INLINE = "__actors_inline__"

F = TypeVar("F", bound=Callable[..., Any])

#: A handler as stored in the dispatch table: always awaitable.
Handler = Callable[[Any, Any], Awaitable[Any]]


def handles(*message_types: type, inline: bool = False) -> Callable[[F], F]:
    """Mark a method of an ``Actor`` subclass as the handler of ``message_types``.

    The method receives the message and its return value is the reply to ``ask``.
    It may be ``async def`` (usual) or a plain ``def``. A message whose exact type
    has no handler is routed by walking its type's MRO, so ``@handles(Base)``
    also receives subclasses of ``Base``.

    ``inline=True`` (plain ``def`` handlers only) lets the runtime run the handler
    at once, in the sender's task, when the actor is idle: waiting for mail with an
    empty mailbox and not in a handler. The actor still handles one message at a
    time and in order; what is saved is the context switch (a scheduler pass) per
    message. An exception in an inline handler is a failure of the actor, raised in
    the actor's own task (so supervision applies); a teller does not see it, an
    asker gets it raised (as with any ask).
    """
    if not message_types:
        raise TypeError("handles() needs at least one message type")
    for t in message_types:
        if not isinstance(t, type):
            raise TypeError(f"handles() takes types, got {t!r}")

    def mark(func: F) -> F:
        if inline and inspect.iscoroutinefunction(func):
            raise TypeError(f"an inline handler must be a plain def, not async: {func!r}")
        previous: tuple[type, ...] = getattr(func, _MARK, ())
        setattr(func, _MARK, previous + message_types)
        if inline:
            setattr(func, _INLINE, getattr(func, _INLINE, ()) + message_types)
        return func

    return mark


class Later:
    """What a handler returns when its answer needs waiting (I/O): the runtime runs
    ``fn(*args)`` in the actor's nursery and answers the asker with what it returns
    (or raises), while the actor goes on handling its mailbox. Make one with
    :func:`later`.

    The rules of a handler hold for the work: an exception listed in the actor's
    ``replied_errors`` is only the asker's answer; any other is also a failure of the
    actor. If the actor stops or restarts first, the work is cancelled and the asker
    gets ``ActorStopped``. A told message's ``Later`` runs the same way, its result
    dropped. Inline handlers cannot answer later (their ``Later`` is awaited in the
    asker's own task).
    """

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args


def later(fn: Callable[..., Awaitable[Any]], *args: Any) -> Later:
    """Answer the current message later: see :class:`Later`."""
    return Later(fn, args)


def _as_async(func: Callable[..., Any]) -> Handler:
    if inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    async def call_sync(actor: Any, msg: Any) -> Any:
        return func(actor, msg)

    return call_sync


class Actor:
    """Base class of actors.

    Subclass it, give it handlers with ``@actors.handles(...)`` and spawn it with
    ``await system.spawn(Factory, name=...)``. ``__init__`` is yours: the runtime
    never calls it with arguments (the factory does). Once the actor runs, the
    runtime provides ``ref``, ``name``, ``system``, ``nursery`` and ``spawn``.

    Messages are handled one at a time, in the order they arrived.
    """

    #: Dispatch table: message type -> handler (filled per class, cached lookups).
    _actor_handlers: ClassVar[dict[type, Handler]] = {}
    #: Message types known to have no handler.
    _actor_misses: ClassVar[set[type]] = set()

    #: Whether the class overrides :meth:`on_drained` (checked once per class).
    _actor_wants_drained: ClassVar[bool] = False
    #: Failures that are part of this actor's life (say, a lost connection that its
    #: supervisor's restart re-establishes): under RESTART they are logged as one
    #: warning line, without a traceback.
    expected_failures: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Exceptions a handler raises as its *answer*, not as a failure (say, "the server
    #: is unreachable"): the asker gets it raised, a teller's is logged as a warning,
    #: and the actor goes on with its state. Anything else a handler raises is a bug:
    #: a failure of the actor, which its supervision policy handles.
    replied_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Handlers that may run inline (see ``handles(..., inline=True)``), by exact type.
    _actor_inline: ClassVar[dict[type, Callable[[Any, Any], Any]]] = {}

    _actor_cell: Cell | None = None
    _actor_nursery: trio.Nursery | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: dict[type, str] = {}
        inline: set[type] = set()
        for klass in reversed(cls.__mro__):
            for attr_name, value in vars(klass).items():
                for t in getattr(value, _MARK, ()):
                    names[t] = attr_name
                    inline.discard(t)
                inline.update(getattr(value, _INLINE, ()))
        cls._actor_handlers = {t: _as_async(getattr(cls, n)) for t, n in names.items()}
        cls._actor_inline = {t: getattr(cls, names[t]) for t in inline if t in names}
        cls._actor_misses = set()
        cls._actor_wants_drained = cls.on_drained is not Actor.on_drained

    @classmethod
    def _actor_resolve(cls, message_type: type) -> Handler | None:
        """Find the handler for ``message_type`` by walking its MRO; cache the answer."""
        if message_type in cls._actor_misses:
            return None
        table = cls._actor_handlers
        for base in message_type.__mro__:
            handler = table.get(base)
            if handler is not None:
                table[message_type] = handler
                return handler
        cls._actor_misses.add(message_type)
        return None

    # -- runtime-provided -------------------------------------------------

    def _cell(self) -> Cell:
        cell = self._actor_cell
        if cell is None:
            raise ActorError(f"{type(self).__name__} is not running in an actor system")
        return cell

    @property
    def ref(self) -> ActorRef:
        """This actor's ref (the same one across restarts)."""
        return self._cell().ref

    @property
    def name(self) -> str:
        """This actor's name."""
        return self._cell().name

    @property
    def system(self) -> ActorSystem:
        """The system this actor runs in."""
        return self._cell().system

    @property
    def nursery(self) -> trio.Nursery:
        """A nursery for background work.

        It is cancelled when the actor stops or restarts. An exception escaping a
        task started in it is a failure of this actor.
        """
        nursery = self._actor_nursery
        if nursery is None:
            raise ActorError(f"actor {self.name!r} has no nursery: it is not running")
        return nursery

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
        """Spawn a child actor; see ``ActorSystem.spawn`` for the arguments.

        The child is stopped before this actor's ``on_stop`` runs, and is stopped
        (cancelled) when this actor fails. A child whose policy is ``ESCALATE``
        makes this actor fail when it fails.

        Cancellation: if cancelled while waiting for the child's task to start,
        the child is not spawned.
        """
        return await self._cell().spawn_child(
            factory,
            name=name,
            mailbox_size=mailbox_size,
            on_failure=on_failure,
            max_restarts=max_restarts,
            restart_window=restart_window,
            backoff=backoff,
        )

    # -- lifecycle hooks --------------------------------------------------

    async def on_start(self) -> None:
        """Run inside the actor's task before its first message.

        ``self.nursery`` is usable and children may be spawned. An exception here
        is a failure of the actor.
        """

    async def on_drained(self) -> None:
        """Run each time the mailbox is empty after one or more messages were handled
        (the end of a batch), before the actor waits for the next message.

        Override it to act once per batch instead of once per message, e.g. to write
        the commands that the handlers of one batch gathered as one pipeline. It is
        not called at all when a class does not override it. An exception here is a
        failure of the actor.
        """

    async def on_stop(self) -> None:
        """Run on a normal stop: after the mailbox is drained and the children are
        stopped, before the nursery is cancelled.

        Not run when the actor fails, is restarted or is cancelled by Trio.
        """
