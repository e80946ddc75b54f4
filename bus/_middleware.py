"""Middlewares: hooks around sending, executing and saving tasks."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from actors._log import get_logger
from bus._message import TaskMessage, TaskResult

if TYPE_CHECKING:
    from bus._broker import Broker
    from bus._ids import TaskID

__all__ = ["Middleware"]

log = get_logger("bus.middleware")

HOOKS = (
    "startup",
    "shutdown",
    "pre_send",
    "post_send",
    "pre_execute",
    "post_execute",
    "on_error",
    "post_save",
    "on_reject",
    "on_workflow",
)
#: Hooks that run in reverse list order (the "way out").
REVERSED = frozenset(
    {"shutdown", "post_send", "post_execute", "on_error", "post_save", "on_reject", "on_workflow"}
)


class Middleware:
    """Subclass and override any hook; each may be a plain or an ``async`` method.

    ``startup`` and the ``pre_*`` hooks run in list order, ``shutdown``, ``post_*`` and
    ``on_error`` in reverse order. ``pre_send`` and ``pre_execute`` return the message
    to use (return it unchanged to only observe). ``self.broker`` is set when the
    middleware is attached with :meth:`Broker.with_middlewares`.

    An exception in ``startup`` fails ``async with broker``; in ``pre_send`` it fails
    the ``kiq`` (nothing was sent); in ``pre_execute`` it fails the task like an
    exception in the task itself. In ``post_send``, ``post_execute``, ``on_error``,
    ``post_save``, ``on_reject`` and ``shutdown`` it is logged and the chain goes on.
    """

    broker: Broker

    def startup(self) -> Any:
        """The broker starts (client or worker)."""

    def shutdown(self) -> Any:
        """The broker stops."""

    def pre_send(self, message: TaskMessage) -> TaskMessage | Awaitable[TaskMessage]:
        """Before a message is encoded and sent; return the message to send."""
        return message

    def post_send(self, message: TaskMessage) -> Any:
        """After the broker accepted the message."""

    def pre_execute(self, message: TaskMessage) -> TaskMessage | Awaitable[TaskMessage]:
        """Before a worker runs the task; return the message to run."""
        return message

    def post_execute(self, message: TaskMessage, result: TaskResult[Any]) -> Any:
        """After the task ran, whatever its outcome."""

    def on_error(self, message: TaskMessage, result: TaskResult[Any], error: BaseException) -> Any:
        """After an attempt failed or timed out (``error`` is a ``TimeoutError`` then).
        Cancellation is not an error: it does not call this hook."""

    def post_save(self, message: TaskMessage, result: TaskResult[Any]) -> Any:
        """After the final result is stored."""

    def on_reject(self, message: TaskMessage | None, reason: str) -> Any:
        """A worker refused a delivery without running it: undecodable (``message`` is
        ``None`` then), an unknown task, invalid option labels, or arguments that do not
        fit the task. Called before the rejection is stored and the delivery nacked."""

    def on_workflow(self, event: str, workflow_id: TaskID) -> Any:
        """A workflow ``started`` (in the process that sent it) or ended
        (``succeeded``, ``failed``, ``cancelled``: in the process whose transition
        ended it)."""


class HookChain:
    """The overridden hooks of a middleware list, in the order they must run."""

    def __init__(self, middlewares: Sequence[Middleware]) -> None:
        self.chains: dict[str, list[tuple[Callable[..., Any], bool]]] = {}
        for hook in HOOKS:
            base = getattr(Middleware, hook)
            found = []
            for mw in middlewares:
                fn = getattr(type(mw), hook, base)
                if fn is not base:
                    bound = getattr(mw, hook)
                    found.append((bound, inspect.iscoroutinefunction(bound)))
            if hook in REVERSED:
                found.reverse()
            self.chains[hook] = found
        self.has = {hook for hook, chain in self.chains.items() if chain}

    async def run(self, hook: str, *args: Any) -> None:
        """Run every middleware's ``hook``; the first exception propagates."""
        for fn, is_async in self.chains[hook]:
            out = fn(*args)
            if is_async or inspect.isawaitable(out):
                await out

    async def run_all(self, hook: str, *args: Any) -> None:
        """Run every middleware's ``hook``; an exception is logged and the chain goes on."""
        for fn, is_async in self.chains[hook]:
            try:
                out = fn(*args)
                if is_async or inspect.isawaitable(out):
                    await out
            except Exception:
                log.exception("middleware.failed", hook=hook, middleware=fn.__qualname__)

    def is_sync(self, hook: str) -> bool:
        return not any(is_async for _, is_async in self.chains[hook])

    def run_sync(self, hook: str, *args: Any) -> Any:
        """Run sync hooks (``pre_send`` returns the message); for ``kiq_nowait``."""
        out: Any = args[0] if args else None
        for fn, _ in self.chains[hook]:
            res = fn(*args)
            if hook.startswith("pre_"):
                if not isinstance(res, TaskMessage):
                    raise TypeError(f"middleware hook {fn.__qualname__} must return a TaskMessage")
                args = (res, *args[1:])
                out = res
        return out

    async def transform(self, hook: str, message: TaskMessage) -> TaskMessage:
        for fn, is_async in self.chains[hook]:
            out = fn(message)
            if is_async or inspect.isawaitable(out):
                out = await out
            if not isinstance(out, TaskMessage):
                raise TypeError(f"middleware hook {fn.__qualname__} must return a TaskMessage")
            message = out
        return message
