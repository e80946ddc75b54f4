"""The per-actor runtime (``Cell``) and ``ActorRef``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ._actor import Actor, Later
from ._errors import (
    ActorError,
    ActorFailed,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    UnhandledMessage,
)
from ._log import get_logger
from ._mailbox import Mailbox
from ._supervision import ESCALATE, RESTART, Backoff, Policy, RestartLimiter

if TYPE_CHECKING:
    from ._system import ActorSystem

__all__ = ["ActorRef", "Cell", "failure_of", "failures_in", "run_cell", "spawn_cell"]

logger = get_logger("actors")

_CLOSED = (trio.ClosedResourceError, trio.BrokenResourceError)


class _Raise:
    """Put in an actor's mailbox when one of its inline handlers raised: the actor's
    own task raises ``error``, so supervision applies as for any handler."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Ask:
    """One pending ``ask``: the message and a one-shot reply slot."""

    __slots__ = ("error", "event", "msg", "value")

    def __init__(self, msg: object) -> None:
        self.msg = msg
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def succeed(self, value: Any) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(_leaves(inner))
        return out
    return [exc]


def failures_in(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc`` that are not Trio cancellation, groups flattened."""
    if isinstance(exc, trio.Cancelled):
        return []
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return [] if rest is None else _leaves(rest)
    return [exc]


def failure_of(exc: BaseException) -> BaseException | None:
    """The exception that counts as a failure in ``exc``; None for pure cancellation.

    Cancellation (``trio.Cancelled`` or groups holding only that) is never a
    failure. Groups are flattened to their first non-cancellation leaf.
    """
    found = failures_in(exc)
    return found[0] if found else None


class ActorRef:
    """A handle to a running actor: the only way to talk to it.

    Refs are cheap, can be shared between tasks, and stay valid across restarts.
    """

    __slots__ = ("_cell", "_send")

    def __init__(self, cell: Cell) -> None:
        self._cell = cell
        self._send = cell.mailbox

    @property
    def name(self) -> str:
        """The actor's name."""
        return self._cell.name

    @property
    def is_alive(self) -> bool:
        """True until the actor has fully stopped (also while it drains its mailbox)."""
        return not self._cell.done

    @property
    def unhandled_count(self) -> int:
        """How many told messages had no handler (each was logged)."""
        return self._cell.unhandled

    @property
    def restart_count(self) -> int:
        """How many times the actor was restarted after a failure."""
        return self._cell.restarts

    @property
    def children(self) -> Mapping[str, ActorRef]:
        """A snapshot of the actor's running children, by name."""
        return {name: cell.ref for name, cell in self._cell.children.items()}

    @property
    def actor_type(self) -> str:
        """The class name of the actor's current instance."""
        return type(self._cell.instance).__qualname__

    @property
    def mailbox_size(self) -> int | float:
        """The mailbox's capacity (``math.inf`` when unbounded)."""
        return self._cell.mailbox.statistics().max_buffer_size

    @property
    def mailbox_used(self) -> int:
        """How many messages wait in the mailbox now."""
        return self._cell.mailbox.statistics().current_buffer_used

    def __repr__(self) -> str:
        state = "alive" if self.is_alive else "stopped"
        return f"<{type(self).__name__} {self._cell.name!r} {state}>"

    async def tell(self, msg: object) -> None:
        """Put ``msg`` in the actor's mailbox; wait while the mailbox is full.

        Raises ``ActorStopped`` if the actor is stopped or stops while we wait.

        Cancellation: if cancelled while waiting for room, the message was not
        delivered.
        """
        cell = self._cell
        fn = cell.inline.get(type(msg)) if cell.inline else None
        if fn is not None and cell.mailbox.receiver_waiting and not cell.inline_busy:
            await trio.lowlevel.checkpoint_if_cancelled()
            if cell.mailbox.receiver_waiting and not cell.inline_busy:
                self.tell_nowait(msg)  # runs the handler inline, here and now
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
        try:
            await self._send.send(msg)
        except _CLOSED:
            raise ActorStopped(f"actor {self._cell.name!r} is stopped") from None

    def tell_nowait(self, msg: object) -> None:
        """Put ``msg`` in the mailbox now, or raise ``MailboxFull`` (or ``ActorStopped``)."""
        cell = self._cell
        inline = cell.inline
        if inline:
            fn = inline.get(type(msg))
            # Idle actor (parked in receive, so its mailbox is empty, and in no inline
            # handler): run the handler here and now (see handles(inline=True)). Every
            # send, store and ack of the bus comes here: no call more than needed.
            if fn is not None and cell.mailbox._receiver is not None and not cell.inline_busy:
                cell.inline_busy = True
                try:
                    fn(cell.instance, msg)
                except Exception as exc:
                    cell.inline_failed(exc, msg)
                finally:
                    cell.inline_busy = False
                return
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            raise MailboxFull(f"mailbox of actor {self._cell.name!r} is full") from None
        except _CLOSED:
            raise ActorStopped(f"actor {self._cell.name!r} is stopped") from None

    async def ask(self, msg: object, timeout: float | None = None) -> Any:
        """Send ``msg`` and return the handler's return value.

        Raises the handler's exception if it raised, ``UnhandledMessage`` if the
        actor has no handler for ``type(msg)``, ``ActorStopped`` if the actor is
        stopped or stops before answering (also when the ask was still queued),
        and ``AskTimeout`` if no answer came within ``timeout`` seconds (the
        timeout covers waiting for mailbox room too).

        Cancellation (and timeout): if the message was already queued it may
        still be handled; its reply is discarded.

        An idle actor answers an ask of an inline handler (``handles(...,
        inline=True)``) at once, in this task: that ask is a cancellation point but
        does not yield to the scheduler.
        """
        cell = self._cell
        if cell.inline:
            fn = cell.inline.get(type(msg))
            if fn is not None and cell.mailbox._receiver is not None and not cell.inline_busy:
                await trio.lowlevel.checkpoint_if_cancelled()
                cell.inline_busy = True
                try:
                    value = fn(cell.instance, msg)
                except Exception as exc:
                    if not isinstance(exc, cell.instance.replied_errors):
                        cell.fail_inline(exc)
                    raise
                finally:
                    cell.inline_busy = False
                if type(value) is Later:
                    return await value.fn(*value.args)
                return value
        req = _Ask(msg)
        if timeout is None:
            await self._ask(req)
        else:
            with trio.move_on_after(timeout) as scope:
                await self._ask(req)
            if scope.cancelled_caught and not req.event.is_set():
                raise AskTimeout(
                    f"actor {self._cell.name!r} did not answer {type(msg).__name__} "
                    f"within {timeout}s"
                )
        if req.error is not None:
            raise req.error
        return req.value

    async def _ask(self, req: _Ask) -> None:
        try:
            await self._send.send(req)
        except _CLOSED:
            raise ActorStopped(f"actor {self._cell.name!r} is stopped") from None
        await req.event.wait()

    async def stop(self) -> None:
        """Stop the actor and wait until it has fully stopped.

        Messages already in the mailbox are handled first; senders still waiting
        for room get ``ActorStopped``. Then its children are stopped, then its
        ``on_stop`` runs. Stopping a stopped actor is a no-op. Called from the
        actor's own handler, it requests the stop and returns at once.

        Cancellation: the stop was requested and goes on; only the waiting ends.
        """
        await self._cell.stop()

    def stop_nowait(self) -> None:
        """Request a stop (as ``stop``) without waiting for it to finish."""
        self._cell.request_stop()

    async def join(self) -> None:
        """Wait until the actor has stopped, for whatever reason (a stop, a failure
        under STOP or ESCALATE, cancellation), without asking it to stop.

        Cancellation: only the waiting ends.
        """
        await self._cell.stopped.wait()


class Cell:
    """Runtime state of one actor across restarts: mailbox, policy, children."""

    __slots__ = (
        "_status",
        "_wake_backoff",
        "backoff",
        "children",
        "children_nursery",
        "done",
        "factory",
        "inline",
        "inline_busy",
        "instance",
        "limiter",
        "log",
        "mailbox",
        "name",
        "parent",
        "policy",
        "ref",
        "registry",
        "restarts",
        "stop_requested",
        "stopped",
        "system",
        "task",
        "unhandled",
    )

    def __init__(
        self,
        *,
        system: ActorSystem,
        parent: Cell | None,
        registry: dict[str, Cell],
        factory: Callable[[], Actor],
        instance: Actor,
        name: str,
        mailbox_size: int | float,
        policy: Policy,
        limiter: RestartLimiter,
        backoff: Backoff | None = None,
    ) -> None:
        self.system = system
        self.parent = parent
        self.registry = registry
        self.factory = factory
        self.instance = instance
        self.name = name
        self.policy = policy
        self.limiter = limiter
        self.backoff = backoff
        self.stop_requested = False
        self.mailbox = Mailbox(mailbox_size)
        # Inline handlers of the running instance (empty while none runs its loop).
        self.inline: dict[type, Callable[[Any, Any], Any]] = {}
        self.inline_busy = False
        self.ref = ActorRef(self)
        self.children: dict[str, Cell] = {}
        self.children_nursery: trio.Nursery | None = None
        self.done = False
        self.stopped = trio.Event()
        self.task: trio.lowlevel.Task | None = None
        self.unhandled = 0
        self._wake_backoff: trio.CancelScope | None = None
        self._status: trio.TaskStatus[ActorRef] | None = None
        self.restarts = 0
        self.log = logger.bind(actor=name)

    # -- control ------------------------------------------------------------

    def inline_failed(self, exc: Exception, msg: object) -> None:
        """An inline handler of a told ``msg`` raised ``exc``: a replied error is logged,
        anything else is a failure of the actor (:meth:`fail_inline`)."""
        if isinstance(exc, self.instance.replied_errors):
            self.log.warning("actor.told_error", error=str(exc), message_type=type(msg).__name__)
        else:
            self.fail_inline(exc)

    def fail_inline(self, exc: Exception) -> None:
        """An inline handler raised: a failure of the actor, which its own task
        raises (so supervision applies as for any handler)."""
        self.mailbox.send_nowait(_Raise(exc))

    def request_stop(self) -> None:
        self.stop_requested = True
        self.mailbox.close()
        wake = self._wake_backoff
        if wake is not None:
            wake.cancel()

    async def stop(self) -> None:
        self.request_stop()
        if self.done or trio.lowlevel.current_task() is self.task:
            return
        await self.stopped.wait()

    async def spawn_child(
        self,
        factory: Callable[[], Actor],
        *,
        name: str,
        mailbox_size: int | float,
        on_failure: Policy,
        max_restarts: int | None,
        restart_window: float,
        backoff: Backoff | None = None,
    ) -> ActorRef:
        nursery = self.children_nursery
        if nursery is None or self.done:
            raise ActorError(f"actor {self.name!r} is not running: cannot spawn {name!r}")
        return await spawn_cell(
            system=self.system,
            parent=self,
            nursery=nursery,
            registry=self.children,
            factory=factory,
            name=name,
            mailbox_size=mailbox_size,
            on_failure=on_failure,
            max_restarts=max_restarts,
            restart_window=restart_window,
            backoff=backoff,
        )

    # -- the actor's task ---------------------------------------------------

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED,
        started_after_start: bool = False,
    ) -> None:
        """The actor's task. ``task_status.started(ref)`` is called at once, or with
        ``started_after_start`` once the first instance's ``on_start`` returned."""
        self.task = trio.lowlevel.current_task()
        if started_after_start:
            self._status = task_status
        else:
            task_status.started(self.ref)
        self.log.debug("actor.started")
        how = "cancelled"
        instance: Actor | None = self.instance
        try:
            while True:
                error: BaseException | None = None
                try:
                    if instance is None:
                        instance = self.factory()
                        if not isinstance(instance, Actor):
                            raise TypeError(
                                f"factory of actor {self.name!r} returned {instance!r}, "
                                "not an Actor"
                            )
                    await self._run_instance(instance)
                except BaseException as exc:
                    error = failure_of(exc)
                    if error is None or not isinstance(error, Exception):
                        raise
                if error is None:
                    how = "stopped"
                    return
                instance = None
                how = "escalated"
                if not self._recover(error):
                    how = "failed"
                    return
                how = "cancelled"
                if not await self._wait_before_restart():
                    how = "stopped"
                    return
        finally:
            self._finish(how)

    async def _wait_before_restart(self) -> bool:
        """Wait out the backoff; False when a stop request makes a restart pointless
        (stop was asked and nothing is left in the mailbox to handle)."""
        if self.backoff is not None and not self.stop_requested:
            delay = self.backoff.delay(self.limiter.recent)
            self.log.info("actor.restart_backoff", delay=round(delay, 3))
            with trio.move_on_after(delay) as scope:
                self._wake_backoff = scope
                await trio.sleep_forever()
            self._wake_backoff = None
        if self.stop_requested:
            return self.mailbox.statistics().current_buffer_used > 0
        return True

    def _recover(self, error: BaseException) -> bool:
        """Apply the policy to ``error``: True to restart, False to stop; may raise."""
        policy = self.policy
        expected = isinstance(error, type(self.instance).expected_failures)
        if expected and policy is RESTART:
            # Part of the actor's life (a lost connection): the actor says what it means
            # for its users itself (a line when the server goes and comes back); the
            # failure and the restart are details, for debug logs.
            self.log.debug("actor.failed", error=str(error), policy=policy.value)
        else:
            self.log.error("actor.failed", error=repr(error), policy=policy.value, exc_info=error)
        if policy is RESTART:
            if self.limiter.allow(trio.current_time()):
                self.restarts += 1
                (self.log.debug if expected else self.log.warning)(
                    "actor.restarted", restarts=self.restarts
                )
                return True
            self.log.error("actor.restart_limit", restarts=self.restarts)
            policy = ESCALATE
        if policy is ESCALATE:
            self.log.error("actor.escalated", error=repr(error))
            raise ActorFailed(f"actor {self.name!r} failed: {error!r}") from error
        return False

    async def _run_instance(self, actor: Actor) -> None:
        self.instance = actor
        actor._actor_cell = self
        try:
            async with trio.open_nursery() as children:
                self.children_nursery = children
                async with trio.open_nursery() as background:
                    actor._actor_nursery = background
                    await actor.on_start()
                    status, self._status = self._status, None
                    if status is not None:
                        status.started(self.ref)
                    await self._loop(actor)
                    await self._stop_children()
                    await actor.on_stop()
                    background.cancel_scope.cancel()
        finally:
            self.children_nursery = None
            actor._actor_nursery = None

    async def _stop_children(self) -> None:
        children = list(self.children.values())
        if not children:
            return
        async with trio.open_nursery() as nursery:
            for child in children:
                nursery.start_soon(child.stop)

    async def _loop(self, actor: Actor) -> None:
        # The hot path: one dict lookup on the exact type and a direct await.
        receive = self.mailbox.receive
        receive_nowait = self.mailbox.receive_nowait
        handlers = actor._actor_handlers
        drained = actor.on_drained if actor._actor_wants_drained else None
        self.inline = actor._actor_inline
        try:
            await self._loop_body(actor, receive, receive_nowait, handlers, drained)
        finally:
            self.inline = {}

    async def _loop_body(
        self,
        actor: Actor,
        receive: Callable[[], Any],
        receive_nowait: Callable[[], Any],
        handlers: dict[type, Any],
        drained: Callable[[], Any] | None,
    ) -> None:
        ask_type = _Ask
        raise_type = _Raise
        msg: Any
        while True:
            try:
                msg = await receive()
            except trio.EndOfChannel:
                return
            while True:
                if type(msg) is ask_type:
                    await self._handle_ask(actor, msg)
                elif type(msg) is raise_type:
                    raise msg.error
                else:
                    handler = handlers.get(type(msg))
                    if handler is None:
                        handler = actor._actor_resolve(type(msg))
                    if handler is None:
                        self._unhandled(msg)
                    else:
                        try:
                            value = await handler(actor, msg)
                        except actor.replied_errors as exc:
                            self.log.warning(
                                "actor.told_error",
                                error=str(exc),
                                message_type=type(msg).__name__,
                            )
                        else:
                            if type(value) is Later:
                                actor.nursery.start_soon(self._answer_later, actor, None, value)
                try:
                    msg = receive_nowait()
                except trio.WouldBlock:
                    if drained is not None:
                        await drained()
                    break
                except trio.EndOfChannel:
                    if drained is not None:
                        await drained()
                    return

    async def _handle_ask(self, actor: Actor, req: _Ask) -> None:
        msg = req.msg
        handler = actor._actor_handlers.get(type(msg)) or actor._actor_resolve(type(msg))
        if handler is None:
            req.fail(
                UnhandledMessage(f"actor {self.name!r} has no handler for {type(msg).__qualname__}")
            )
            return
        try:
            value = await handler(actor, msg)
        except Exception as exc:
            req.fail(exc)
            if isinstance(exc, actor.replied_errors):
                return
            raise
        except BaseException:
            req.fail(self._stopped_error(msg))
            raise
        if type(value) is Later:
            actor.nursery.start_soon(self._answer_later, actor, req, value)
            return
        req.succeed(value)

    async def _answer_later(self, actor: Actor, req: _Ask | None, work: Later) -> None:
        """Run a handler's :class:`Later` in the actor's nursery and answer with it."""
        try:
            value = await work.fn(*work.args)
        except Exception as exc:
            if req is not None:
                req.fail(exc)
            if isinstance(exc, actor.replied_errors):
                if req is None:
                    self.log.warning("actor.told_error", error=str(exc))
                return
            raise
        except BaseException:
            if req is not None:
                req.fail(self._stopped_error(req.msg))
            raise
        if req is not None:
            req.succeed(value)

    def _unhandled(self, msg: object) -> None:
        self.unhandled += 1
        self.log.error(
            "actor.unhandled_message",
            message_type=type(msg).__qualname__,
            unhandled_count=self.unhandled,
        )

    def _stopped_error(self, msg: object) -> ActorStopped:
        return ActorStopped(
            f"actor {self.name!r} stopped before answering {type(msg).__qualname__}"
        )

    def _finish(self, how: str) -> None:
        """Close the mailbox, fail what is still queued, report the actor stopped."""
        self.done = True
        self.mailbox.close()
        dropped = 0
        while True:
            try:
                item = self.mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if type(item) is _Ask:
                item.fail(self._stopped_error(item.msg))
            else:
                dropped += 1
        self.mailbox.close_receiver()
        if self.registry.get(self.name) is self:
            del self.registry[self.name]
        self.stopped.set()
        if dropped:
            # Expected when Trio cancels the actor; a loss worth a warning otherwise.
            (self.log.debug if how == "cancelled" else self.log.warning)(
                "actor.dropped_messages", dropped=dropped
            )
        self.log.debug("actor.stopped", how=how)


def _make_cell(
    *,
    system: ActorSystem,
    parent: Cell | None,
    registry: dict[str, Cell],
    factory: Callable[[], Actor],
    name: str,
    mailbox_size: int | float,
    on_failure: Policy,
    max_restarts: int | None,
    restart_window: float,
    backoff: Backoff | None,
) -> Cell:
    if not isinstance(name, str) or not name:
        raise ValueError(f"actor name must be a non-empty string, got {name!r}")
    if not isinstance(on_failure, Policy):
        raise TypeError(f"on_failure must be an actors.Policy, got {on_failure!r}")
    if backoff is not None and not isinstance(backoff, Backoff):
        raise TypeError(f"backoff must be an actors.Backoff or None, got {backoff!r}")
    if name in registry:
        raise ValueError(f"an actor named {name!r} is already running here")
    limiter = RestartLimiter(max_restarts, restart_window)
    instance = factory()
    if not isinstance(instance, Actor):
        raise TypeError(f"factory of actor {name!r} returned {instance!r}, not an Actor")
    return Cell(
        system=system,
        parent=parent,
        registry=registry,
        factory=factory,
        instance=instance,
        name=name,
        mailbox_size=mailbox_size,
        policy=on_failure,
        limiter=limiter,
        backoff=backoff,
    )


def _discard(cell: Cell) -> None:
    """Undo a cell whose task never ran."""
    if cell.registry.get(cell.name) is cell:
        del cell.registry[cell.name]
    cell.done = True
    cell.mailbox.close_receiver()
    cell.stopped.set()


async def spawn_cell(
    *,
    system: ActorSystem,
    parent: Cell | None,
    nursery: trio.Nursery,
    registry: dict[str, Cell],
    factory: Callable[[], Actor],
    name: str,
    mailbox_size: int | float,
    on_failure: Policy,
    max_restarts: int | None,
    restart_window: float,
    backoff: Backoff | None = None,
) -> ActorRef:
    """Build the first instance, start the actor's task in ``nursery``, return its ref."""
    cell = _make_cell(
        system=system,
        parent=parent,
        registry=registry,
        factory=factory,
        name=name,
        mailbox_size=mailbox_size,
        on_failure=on_failure,
        max_restarts=max_restarts,
        restart_window=restart_window,
        backoff=backoff,
    )
    registry[name] = cell
    try:
        await nursery.start(cell.run)
    except BaseException:
        _discard(cell)
        raise
    return cell.ref


async def run_cell(
    *,
    system: ActorSystem,
    registry: dict[str, Cell],
    factory: Callable[[], Actor],
    name: str,
    mailbox_size: int | float,
    on_failure: Policy,
    max_restarts: int | None,
    restart_window: float,
    backoff: Backoff | None,
    task_status: trio.TaskStatus[ActorRef],
) -> None:
    """Run an actor in the calling task until it stops (see ``ActorSystem.run``)."""
    cell = _make_cell(
        system=system,
        parent=None,
        registry=registry,
        factory=factory,
        name=name,
        mailbox_size=mailbox_size,
        on_failure=on_failure,
        max_restarts=max_restarts,
        restart_window=restart_window,
        backoff=backoff,
    )
    registry[name] = cell
    try:
        await cell.run(task_status=task_status, started_after_start=True)
    finally:
        if not cell.done:  # pragma: no cover - run() always finishes the cell
            _discard(cell)
