"""The broker contract: the seam every broker implements, and the shared machinery."""

from __future__ import annotations

import abc
import contextlib
import enum
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, overload

import attrs
import structlog
import trio

import actors
from bus._codec import Codec, JSONCodec
from bus._errors import BrokerClosed, SendError, UnknownTaskError
from bus._ids import TaskID
from bus._message import TaskMessage
from bus._middleware import HookChain, Middleware
from bus._options import TaskOptions
from bus._protocol import Ack, Cancel, Delivery, Nack, Receive, Register, Send
from bus._results import InMemoryResultBackend, ResultBackend
from bus._task import AsyncTask, SyncTask, Task

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from bus._worker import Worker

__all__ = ["Broker", "BrokerState", "BrokerStats", "BusEvent"]

P = ParamSpec("P")
R = TypeVar("R")
log = structlog.get_logger("bus")


class BusEvent(enum.Enum):
    """Lifecycle moments a handler can be attached to with :meth:`Broker.on_event`."""

    CLIENT_STARTUP = "client_startup"
    CLIENT_SHUTDOWN = "client_shutdown"
    WORKER_STARTUP = "worker_startup"
    WORKER_SHUTDOWN = "worker_shutdown"


class BrokerState:
    """A namespace for your own things (clients, pools) set up in event handlers."""

    def __repr__(self) -> str:
        return f"BrokerState({vars(self)!r})"


@attrs.define
class BrokerStats:
    """Counters a broker and its workers keep, since the broker object was made."""

    sent: int = 0
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    retried: int = 0
    rejected: int = 0
    """Deliveries refused without running: undecodable, unknown task, bad arguments."""


def plain_error(exc: BaseException) -> BaseException:
    """The lone leaf of an exception group made of one error, else the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Broker(abc.ABC):
    """The abstract broker: a registry of tasks plus the protocol seam.

    Implementations provide the ``on_*`` protocol handlers (one per event of
    :mod:`bus.protocol`) and may hook :meth:`_start` / :meth:`_stop`. The rest
    (tasks, sending, middlewares, the worker, lifecycle events) is shared, so every
    broker behaves the same; the contract test suite checks that they do.
    """

    #: Whether workers run in this process inside ``async with broker``.
    runs_worker_inside: bool = False
    #: Whether tasks interrupted by shutdown are recorded as CANCELLED (True) or left
    #: unacknowledged for another worker (False).
    records_shutdown_cancel: bool = True

    def __init__(
        self,
        *,
        concurrency: int = 100,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: Iterable[Middleware] = (),
        shutdown_timeout: float = 30.0,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number >= 1, not {concurrency!r}")
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, not {shutdown_timeout!r}")
        self.concurrency = concurrency
        self.shutdown_timeout = float(shutdown_timeout)
        self.result_backend: ResultBackend = result_backend or InMemoryResultBackend()
        self.codec: Codec = codec or JSONCodec()
        self.middlewares: list[Middleware] = []
        self.hooks = HookChain(())
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.state = BrokerState()
        self.stats = BrokerStats()
        self.system: actors.ActorSystem | None = None
        self.workers: list[Worker] = []
        self._handlers: dict[BusEvent, list[Callable[[BrokerState], Any]]] = {
            e: [] for e in BusEvent
        }
        self._running = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        if middlewares:
            self.with_middlewares(*middlewares)

    # ---------------------------------------------------------------- configuration

    def with_result_backend(self, result_backend: ResultBackend) -> Self:
        """Use ``result_backend`` for results (before the broker starts). Returns self."""
        self._check_not_running("change the result backend")
        self.result_backend = result_backend
        return self

    def with_middlewares(self, *middlewares: Middleware) -> Self:
        """Append middlewares (before the broker starts). Returns self."""
        self._check_not_running("add middlewares")
        for mw in middlewares:
            if not isinstance(mw, Middleware):
                raise TypeError(f"{mw!r} is not a bus.Middleware")
            mw.broker = self
        self.middlewares.extend(middlewares)
        self.hooks = HookChain(self.middlewares)
        return self

    def on_event(
        self, *events: BusEvent
    ) -> Callable[[Callable[[BrokerState], Any]], Callable[[BrokerState], Any]]:
        """Decorator: run the handler (sync or async, given ``broker.state``) at each of
        ``events``. Client events run inside ``async with broker``; worker events when a
        worker starts and stops."""
        for e in events:
            if not isinstance(e, BusEvent):
                raise TypeError(f"{e!r} is not a bus.BusEvent")

        def decorate(fn: Callable[[BrokerState], Any]) -> Callable[[BrokerState], Any]:
            for e in events:
                self._handlers[e].append(fn)
            return fn

        return decorate

    async def _fire(self, event: BusEvent) -> None:
        for fn in self._handlers[event]:
            out = fn(self.state)
            if inspect.isawaitable(out):
                await out

    def _check_not_running(self, what: str) -> None:
        if self._running:
            raise RuntimeError(f"cannot {what} while the broker is running")

    # ------------------------------------------------------------------------ tasks

    @overload
    def task(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...

    @overload
    def task(self, func: Callable[P, R], /) -> SyncTask[P, R]: ...

    @overload
    def task(self, /, *, name: str | None = None, **options: Any) -> _TaskDecorator: ...

    def task(
        self, func: Callable[..., Any] | None = None, /, *, name: str | None = None, **options: Any
    ) -> Any:
        """Register a task: ``@broker.task`` or ``@broker.task(name=..., timeout=...)``.

        Options: ``timeout``, ``retries``, ``retry_backoff``, ``retry_backoff_max``,
        ``retry_on``, ``delay``, ``eta``. The default name is ``module:function``.
        """
        if func is not None:
            return self.register_task(func, name, **options)
        return _TaskDecorator(self, name, options)

    def register_task(
        self, func: Callable[..., Any], name: str | None = None, **options: Any
    ) -> Task[Any, Any]:
        """Register ``func`` under ``name`` (default ``module:qualname``)."""
        if not callable(func):
            raise TypeError(f"a task must be callable, not {func!r}")
        if name is None:
            name = f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', func)}"
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        if name in self.tasks and self.tasks[name].func is not func:
            raise ValueError(f"a different function is already registered as {name!r}")
        run_options, send_defaults = TaskOptions.build(options)
        cls = AsyncTask if inspect.iscoroutinefunction(func) else SyncTask
        task: Task[Any, Any] = cls(self, func, name, run_options, send_defaults)
        self.tasks[name] = task
        return task

    def find_task(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name``, or ``None``."""
        return self.tasks.get(name)

    # ---------------------------------------------------------------------- sending

    def _encode(self, message: TaskMessage) -> bytes:
        if not self._running:
            raise BrokerClosed("the broker is not running: send inside `async with broker`")
        if message.task_name not in self.tasks:
            raise UnknownTaskError(message.task_name)
        try:
            return self.codec.encode_message(message)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SendError(
                f"cannot encode the arguments or labels of {message.task_name}: {exc}"
            ) from exc

    async def kick(self, message: TaskMessage) -> None:
        """Send ``message`` through the middlewares to the queue.

        Raises :class:`UnknownTaskError`, :class:`SendError` (unencodable arguments),
        :class:`BrokerClosed`. Waits while the queue is full. Cancellation: if cancelled
        before the broker took the message, it was not sent.
        """
        hooks = self.hooks
        if "pre_send" in hooks.has:
            message = await hooks.transform("pre_send", message)
        await self.on_send(Send(message, self._encode(message), verified=True))
        self.stats.sent += 1
        if "post_send" in hooks.has:
            await hooks.run_all("post_send", message)  # sent: never raise now

    async def kick_many(self, messages: Sequence[TaskMessage]) -> None:
        """Send many messages; brokers with a faster bulk path (Redis pipelines)
        override it. Each message goes through the middlewares as with :meth:`kick`.
        On failure, the messages before the failing one were sent."""
        for message in messages:
            await self.kick(message)

    def kick_nowait(self, message: TaskMessage) -> None:
        """Send without waiting (no async middlewares run); :class:`QueueFull` when full.

        Only brokers whose queue lives in this process support it.
        """
        raise SendError(f"{type(self).__name__} cannot send without waiting; use kiq()")

    async def cancel_task(self, task_id: TaskID | str) -> None:
        """Cancel a task by id; see :meth:`TaskHandle.cancel`."""
        await self.on_cancel(Cancel(TaskID.parse(task_id)))

    def _cancel_local(self, task_id: TaskID) -> bool:
        """Cancel ``task_id`` if one of this process's workers runs it."""
        return any(w.cancel_running(task_id, "cancel") for w in self.workers)

    def is_cancelled(self, task_id: TaskID) -> bool:
        """Whether a worker must not start ``task_id`` (a queued task was cancelled)."""
        return False

    # ---------------------------------------------------------- the protocol (seam)

    @abc.abstractmethod
    async def on_send(self, event: Send) -> None:
        """Enqueue ``event.message`` (at its eta). Waits while the queue is full."""

    @abc.abstractmethod
    async def on_receive(self, event: Receive) -> tuple[Delivery, ...]:
        """Wait for and return 1 to ``event.max_messages`` deliveries.

        Cancellation: nothing was taken (or what was taken is redelivered later)."""

    def on_receive_nowait(self, event: Receive) -> tuple[Delivery, ...] | None:
        """Deliveries that can be had without waiting, or ``None`` (the default: the
        worker then calls :meth:`on_receive`). A fast path for in-process queues."""
        return None

    @abc.abstractmethod
    async def on_ack(self, event: Ack) -> None:
        """The delivery is done (its result stored)."""

    @abc.abstractmethod
    async def on_nack(self, event: Nack) -> None:
        """Requeue ``event.requeue`` (after ``event.delay``) or dead-letter the delivery."""

    @abc.abstractmethod
    async def on_cancel(self, event: Cancel) -> None:
        """Make sure the task never starts, or stops where it runs."""

    async def on_register(self, event: Register) -> None:
        """A worker can run ``event.name`` (most brokers need not care)."""
        await trio.lowlevel.checkpoint()

    async def _start(self, nursery: trio.Nursery) -> None:  # noqa: B027
        """Open connections and start background work (in ``nursery``)."""

    async def _stop(self) -> None:  # noqa: B027
        """Undo :meth:`_start`."""

    async def _drain(self) -> None:  # noqa: B027
        """Called on the way out of ``async with broker`` before anything stops."""

    # ------------------------------------------------------------ operations (CLI)

    async def inspect(self) -> dict[str, Any]:
        """Numbers for operators (queue length, pending, delayed, dead letters, workers).

        Brokers shared between processes implement it; ``bus inspect`` prints it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be inspected from outside")

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters, each a dict with at least ``id``,
        ``reason`` and ``task_name`` (``None`` when the entry could not be decoded)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Send up to ``limit`` dead letters back to the queue; returns how many."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    async def purge_dead_letters(self) -> int:
        """Delete every dead letter; returns how many there were."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    # -------------------------------------------------------------------- lifecycle

    @property
    def is_running(self) -> bool:
        return self._running

    async def __aenter__(self) -> Self:
        """Start the broker: actor system, result backend, middlewares, transport, client
        startup handlers, and (for in-process brokers) the worker."""
        if self._running or self._stack is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            self.system = await stack.enter_async_context(actors.open_system())
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            await self.result_backend.startup(self.system)
            stack.push_async_callback(self._shielded, self.result_backend.shutdown)
            await self._start(self._nursery)
            stack.push_async_callback(self._shielded, self._stop)
            await self.hooks.run("startup")
            stack.push_async_callback(self._shielded, self.hooks.run_all, "shutdown")
            await self._fire(BusEvent.CLIENT_STARTUP)
            stack.push_async_callback(self._shielded, self._fire, BusEvent.CLIENT_SHUTDOWN)
            self._running = True
            if self.runs_worker_inside:
                await self._nursery.start(self._serve_worker)
        except BaseException as exc:
            self._running = False
            self._stack = None
            try:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseException as inner:
                raise plain_error(inner) from None
            raise
        return self

    async def _serve_worker(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from bus._worker import Worker

        worker = Worker(self, self.concurrency, name=f"{type(self).__name__}-worker")
        await worker.run(task_status=task_status)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        """Stop intake, let running tasks finish within ``shutdown_timeout``, cancel the
        rest, then stop everything that was started, in reverse order."""
        stack, self._stack = self._stack, None
        assert stack is not None, "broker was not entered"
        try:
            if exc_info[0] is None:
                with trio.CancelScope(shield=True) as scope:
                    # A safety net: _drain honours shutdown_timeout itself.
                    scope.deadline = trio.current_time() + self.shutdown_timeout + 10
                    await self._drain()
        finally:
            self._running = False
            for w in list(self.workers):
                w.stop()
            if self._nursery is not None:
                # Background work of the broker (timers, readers) ends here; the
                # shutdown steps below are shielded.
                self._nursery.cancel_scope.cancel()
        try:
            return await stack.__aexit__(*exc_info)
        except BaseException as exc:
            raise plain_error(exc) from None

    async def _shielded(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + max(self.shutdown_timeout, 1.0)
            try:
                await fn(*args)
            except Exception:
                log.exception("bus.shutdown_step_failed", step=getattr(fn, "__qualname__", fn))

    async def run_worker(
        self,
        concurrency: int | None = None,
        *,
        task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a worker for this broker until cancelled (``await nursery.start(...)`` gives
        the :class:`Worker`). Enters ``async with broker`` itself when needed.

        Cancellation: running tasks are cancelled; the Redis broker leaves them
        unacknowledged so another worker runs them again.
        """
        from bus._worker import Worker

        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ValueError(f"concurrency must be a whole number >= 1, not {concurrency!r}")
        if not self._running:
            async with self:
                worker = Worker(self, concurrency or self.concurrency)
                await worker.run(task_status=task_status)
            return
        worker = Worker(self, concurrency or self.concurrency)
        await worker.run(task_status=task_status)


class _TaskDecorator:
    def __init__(self, broker: Broker, name: str | None, options: dict[str, Any]) -> None:
        TaskOptions.build(options)  # fail at decoration time on bad options
        self.broker, self.name, self.options = broker, name, options

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> SyncTask[P, R]: ...

    def __call__(self, func: Callable[..., Any], /) -> Any:
        return self.broker.register_task(func, self.name, **self.options)
