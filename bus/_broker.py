"""The broker contract: the seam every broker implements, and the shared machinery."""

from __future__ import annotations

import abc
import contextlib
import enum
import functools
import inspect
import math
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, overload

import attrs
import trio

import actors
from actors._log import get_logger
from bus._codec import Codec, JSONCodec
from bus._errors import BrokerClosed, SendError, UnknownTaskError
from bus._ids import TaskID
from bus._limits import placement
from bus._message import TaskMessage
from bus._middleware import HookChain, Middleware
from bus._options import TaskOptions, check_queue_name
from bus._protocol import BrokerInfo, Cancel, Drain, Inspect, Send
from bus._results import InMemoryResultBackend, ResultBackend
from bus._schedule import Cron, Every, ScheduleSpec, Trigger
from bus._scheduler import (
    ScheduleBackend,
    ScheduleInfo,
    SchedulerActor,
    TickState,
    WakeScheduler,
    make_spec,
)
from bus._task import AsyncTask, SyncTask, Task

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from bus._worker import Worker
    from bus._workflow import WorkflowBackend

__all__ = ["Broker", "BrokerState", "BrokerStats", "BusEvent"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
log = get_logger("bus")


class BusEvent(enum.Enum):
    """Lifecycle moments a handler can be attached to with :meth:`Broker.on_event`."""

    CLIENT_STARTUP = "client_startup"
    CLIENT_SHUTDOWN = "client_shutdown"
    WORKER_STARTUP = "worker_startup"
    WORKER_SHUTDOWN = "worker_shutdown"


class BrokerState:
    """A namespace for your own things (clients, pools) set up in event handlers.

    Any attribute can be set; reading one that was never set raises
    ``AttributeError``. (Typed as ``Any`` so type checkers accept your names.)
    """

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...

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
    """The facade a program holds: a registry of tasks, sending, middlewares, lifecycle.

    Behind it, inside ``async with broker``, runs an actor system: the broker actor
    (``broker.ref``: it takes the events of :mod:`bus.protocol`), the result store
    (``broker.result_backend.ref``) and, where the broker runs them, workers. Producers
    and workers reach those actors only by message and through the channel ends they
    were lent. A broker implementation provides :meth:`_open` (spawn its actor) and may
    hook :meth:`_send`, :meth:`_started`, :meth:`_drain` and :meth:`_close`; the rest
    is shared, so every broker behaves the same (``bus.testing.check_broker``).
    """

    def __init__(
        self,
        *,
        concurrency: int = 100,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: Iterable[Middleware] = (),
        shutdown_timeout: float = 30.0,
    ) -> None:
        _check_concurrency(concurrency)
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, not {shutdown_timeout!r}")
        self.concurrency = concurrency
        self.shutdown_timeout = float(shutdown_timeout)
        self.result_backend: ResultBackend = result_backend or InMemoryResultBackend()
        self.codec: Codec = codec or JSONCodec()
        self.middlewares: list[Middleware] = []
        self.hooks = HookChain(())
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: Schedules declared with ``@broker.task(schedule=...)``, by name.
        self.static_schedules: dict[str, ScheduleSpec] = {}
        self.state = BrokerState()
        self.stats = BrokerStats()
        self.system: actors.ActorSystem | None = None
        self._ref: actors.ActorRef | None = None
        self._handlers: dict[BusEvent, list[Callable[[BrokerState], Any]]] = {
            e: [] for e in BusEvent
        }
        self._running = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        #: Seconds ``async with broker`` waits for its server at start before it fails
        #: (``None``: as long as it takes). In-process brokers have no server.
        self.connect_timeout: float | None = None
        if middlewares:
            self.with_middlewares(*middlewares)

    #: Whether processes other than this one can reach the queue (``bus worker``,
    #: ``bus inspect`` and ``bus dead`` need that). It describes the broker for tools;
    #: the worker behaves the same either way.
    distributed: bool = False

    def describe(self) -> dict[str, str]:
        """Where the queue is, for start-up lines and logs (no password)."""
        return {}

    @property
    def embedded_worker(self) -> bool:
        """Whether ``async with broker`` runs a worker itself (the in-memory broker
        does, unless made with ``start_worker=False``)."""
        return False

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
        ``retry_on``, ``delay``, ``eta``; where it goes: ``queue`` (a queue name),
        ``priority`` (0-9); limits on its starts: ``rate_limit`` (``"100/s"``, or
        ``bus.limit(key, rate)`` shared by key), ``max_running`` (at most this many
        at once across every worker). The default name is ``module:function``.
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
            if name.startswith("__main__:") and self.distributed:
                warnings.warn(
                    f"task {name!r} is named after the script that declares it: a worker "
                    "that imports the module under its own name does not know it, and "
                    f"dead-letters it as an unknown task. Name it: "
                    f"@broker.task(name={name.removeprefix('__main__:')!r})",
                    UserWarning,
                    stacklevel=3,
                )
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        if name in self.tasks and self.tasks[name].func is not func:
            raise ValueError(f"a different function is already registered as {name!r}")
        options = dict(options)
        trigger = options.pop("schedule", None)
        run_options, send_defaults = TaskOptions.build(options)
        if trigger is not None:
            self.static_schedules[name] = _static_schedule(name, trigger)
        where = placement(name, options)
        cls = AsyncTask if inspect.iscoroutinefunction(func) else SyncTask
        task: Task[Any, Any] = cls(self, func, name, run_options, send_defaults, where)
        self.tasks[name] = task
        self._task_registered(task)
        return task

    def _task_registered(self, task: Task[Any, Any]) -> None:  # noqa: B027
        """Called for each task registered (a broker that must know about queues or
        limits as they appear may hook it)."""

    def find_task(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name``, or ``None``."""
        return self.tasks.get(name)

    # -------------------------------------------------------------------- schedules

    def _schedule_backend(self) -> ScheduleBackend:
        """Where this broker keeps run-time schedules (brokers that schedule say)."""
        raise NotImplementedError(f"{type(self).__name__} cannot schedule tasks")

    def _scheduler_clock(self) -> Callable[[], float]:
        """The time a scheduler of this broker goes by (Unix seconds)."""
        return time.time

    async def schedule(
        self,
        task: Task[Any, Any] | str,
        trigger: Trigger,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        labels: dict[str, Any] | None = None,
        name: str | None = None,
        misfire_grace: float = 60.0,
    ) -> ScheduleSpec:
        """Add a schedule at run time (inside ``async with broker``): ``task`` (or its
        name) is sent at each tick of ``trigger`` (``bus.cron(...)`` or
        ``bus.every(...)``) with ``args``, ``kwargs`` and ``labels``. ``name`` (default:
        the task's name) keys it: adding a schedule of the same name replaces it. On a
        shared broker it lives in Redis and every worker's scheduler sees it. Returns the
        schedule."""
        task_name = task if isinstance(task, str) else task.name
        if task_name not in self.tasks:
            raise UnknownTaskError(task_name)
        spec = make_spec(
            task_name,
            trigger,
            name=name,
            args=args,
            kwargs=kwargs,
            labels=labels,
            misfire_grace=misfire_grace,
        )
        if spec.name in self.static_schedules:
            raise ValueError(f"schedule {spec.name!r} is declared on its task; pick another name")
        try:
            spec.to_json()
        except (TypeError, ValueError) as exc:
            raise SendError(
                f"schedule {spec.name!r}: arguments must be JSON values: {exc}"
            ) from None
        backend = self._schedule_backend()
        await self._io(f"cannot add schedule {spec.name!r}", lambda: backend.put(spec))
        self._wake_scheduler()
        return spec

    async def _io(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a call that needs the broker's server. Brokers with one bound it and
        turn its failures into :class:`~bus.BrokerUnavailable` (Redis: within
        ``command_timeout``); in memory it is just the call."""
        return await fn()

    async def unschedule(self, name: str) -> bool:
        """Remove a schedule added at run time; True if there was one. (Schedules
        declared with ``schedule=`` live in the code.)"""
        backend = self._schedule_backend()
        found = await self._io(f"cannot remove schedule {name!r}", lambda: backend.drop(name))
        self._wake_scheduler()
        return found

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule (declared and run-time), with its next fire, last fire, fires
        and misses, by name."""
        backend = self._schedule_backend()
        runtime = await self._io("cannot list schedules", backend.runtime)
        specs = {**runtime, **self.static_schedules}
        states = await self._io("cannot list schedules", lambda: backend.state(list(specs)))
        now = self._scheduler_clock()()
        out = []
        for name in sorted(specs):
            spec = specs[name]
            state = states.get(name, TickState())
            after = max(now, state.last_tick or now)
            out.append(
                ScheduleInfo(
                    spec=spec,
                    source="task" if name in self.static_schedules else "runtime",
                    next_fire=spec.trigger.next_after(after),
                    state=state,
                )
            )
        return out

    def _wake_scheduler(self) -> None:
        system = self.system
        if system is not None:
            ref = system.actors.get("scheduler")
            if ref is not None:
                with contextlib.suppress(actors.ActorError):
                    ref.tell_nowait(WakeScheduler())

    # -------------------------------------------------------------------- workflows

    @property
    def workflows(self) -> WorkflowBackend:
        """Where this broker keeps its workflows' state (see docs/workflows.md)."""
        backend: WorkflowBackend | None = self.__dict__.get("_workflows")
        if backend is None:
            backend = self.__dict__["_workflows"] = self._workflow_backend()
        return backend

    def _workflow_backend(self) -> WorkflowBackend:
        """The default: an actor of this process owns the workflows (in-memory brokers);
        a broker shared by processes overrides it."""
        from bus._workflow_actor import MemoryWorkflowBackend

        return MemoryWorkflowBackend(self)

    # ------------------------------------------------------------------ the actors

    @property
    def ref(self) -> actors.ActorRef:
        """The broker actor (inside ``async with broker``): it takes the events of
        :mod:`bus.protocol`. A ``Send`` told to it enqueues exactly as :meth:`kick`
        does after the middlewares."""
        ref = self._ref
        if ref is None:
            raise BrokerClosed("the broker is not running: use it inside `async with broker`")
        return ref

    @abc.abstractmethod
    async def _open(self, system: actors.ActorSystem) -> actors.ActorRef:
        """Spawn the broker actor (and its children) in ``system``; return its ref."""

    async def _started(self) -> None:  # noqa: B027
        """Called once everything is up (the in-memory broker starts its worker here)."""

    async def _drain(self) -> None:
        """Called on a clean exit of ``async with broker``, before anything stops: the
        workers registered with the broker actor (in this process) drain, their tasks
        getting ``shutdown_timeout`` seconds, so their last acks are queued first."""
        from bus._broker_actor import ListWorkers

        ref = self._ref
        if ref is None:
            return
        tickets = []
        for w in await ref.ask(ListWorkers()):
            with contextlib.suppress(actors.ActorStopped):
                tickets.append(await w.ask(Drain(self.shutdown_timeout)))
        for ticket in tickets:
            await ticket.wait()

    async def _close(self) -> None:
        """Stop the broker actor (its children stop first)."""
        ref, self._ref = self._ref, None
        if ref is not None and ref.is_alive:
            await ref.stop()

    # ---------------------------------------------------------------------- sending

    def _check_send(self, message: TaskMessage) -> None:
        if not self._running:
            raise BrokerClosed("the broker is not running: send inside `async with broker`")
        if message.task_name not in self.tasks:
            raise UnknownTaskError(message.task_name)
        if message.queue is not None or message.priority:
            _check_placement(message)
        if message.labels or message.eta is not None:
            _check_options(message)

    def _encode(self, message: TaskMessage) -> bytes:
        """The message encoded by the codec; :class:`SendError` when it cannot be."""
        try:
            return self.codec.encode_message(message)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SendError(
                f"cannot encode the arguments or labels of {message.task_name}: {exc}"
            ) from exc

    async def _send(self, message: TaskMessage) -> TaskID:
        """Encode a checked message and hand it to the broker actor; return the id of
        the task that will run (another one for a unique job already there). The
        default tells it a ``Send`` (waiting while its mailbox is full); brokers may do
        more (take a place in a bounded queue, wait for a server's confirmation)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        event = Send(message, self._encode(message), verified=True)
        ref = self.ref
        try:
            try:
                ref.tell_nowait(event)
            except actors.MailboxFull:
                await ref.tell(event)
        except actors.ActorStopped:
            raise BrokerClosed("the broker is shutting down: nothing was sent") from None
        return message.task_id

    async def kick(self, message: TaskMessage) -> TaskID:
        """Send ``message`` through the middlewares to the queue; return the id of the
        task that will run: the message's own, or, for a unique job (see
        ``Kicker.with_unique``) whose key another queued or running task holds, that
        task's id (and nothing is sent).

        Raises :class:`UnknownTaskError`, :class:`SendError` (unencodable arguments),
        :class:`BrokerClosed`. Waits while the queue is full. Cancellation: if cancelled
        before the broker took the message, it was not sent.
        """
        hooks = self.hooks
        if "pre_send" in hooks.has:
            message = await hooks.transform("pre_send", message)
        self._check_send(message)
        tid = await self._send(message)
        self.stats.sent += 1
        if "post_send" in hooks.has:
            await hooks.run_all("post_send", message)  # sent: never raise now
        return tid

    async def kick_many(self, messages: Sequence[TaskMessage]) -> list[TaskID]:
        """Send many messages; brokers with a faster bulk path (Redis pipelines)
        override it. Each message goes through the middlewares as with :meth:`kick`.
        On failure, the messages before the failing one were sent. Returns the ids of
        the tasks that will run, in order (as :meth:`kick` does)."""
        return [await self.kick(message) for message in messages]

    def kick_nowait(self, message: TaskMessage) -> TaskID:
        """Send without waiting (no async middlewares run); :class:`QueueFull` when full.

        Only brokers whose queue lives in this process support it.
        """
        raise SendError(f"{type(self).__name__} cannot send without waiting; use kiq()")

    async def cancel_task(self, task_id: TaskID | str) -> None:
        """Cancel a task by id; see :meth:`TaskHandle.cancel`. Returns once the broker
        actor took the request."""
        await self._ask(Cancel(TaskID.parse(task_id)))

    # ------------------------------------------------------------ operations (CLI)

    async def inspect(self) -> BrokerInfo:
        """Numbers for operators: the broker actor's answer to ``Inspect``, a
        :class:`bus.protocol.BrokerInfo` (the same shape on every broker: typed fields,
        and read-only mapping access, ``dict(info)`` for JSON)."""
        info: BrokerInfo = await self._ask(Inspect())
        return await self._with_workflows(info)

    async def _with_workflows(self, info: BrokerInfo) -> BrokerInfo:
        """``info`` with ``workflows`` in its details: how many workflows run."""
        running = await self.workflows.running()
        if not isinstance(info, BrokerInfo):  # a broker actor of before BrokerInfo: a dict
            return {**info, "workflows": running}  # type: ignore[unreachable]
        return attrs.evolve(info, details={**info.details, "workflows": running})

    async def _ask(self, msg: object) -> Any:
        """Ask the broker actor; a caller sees bus errors only (a stopped actor is a
        broker that is not running)."""
        try:
            return await self.ref.ask(msg)
        except actors.ActorStopped:
            raise BrokerClosed("the broker is not running or shutting down") from None

    async def dead_letters(
        self, limit: int = 100, *, queue: str | None = None
    ) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters of ``queue`` (default: the broker's default
        queue), each a dict with at least ``id``, ``reason`` and ``task_name``
        (``None`` when the entry could not be decoded)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    async def requeue_dead_letters(
        self,
        limit: int = 100,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        reset_attempts: bool = False,
    ) -> int:
        """Send up to ``limit`` dead letters of ``queue`` back to it; returns how many.
        ``reset_attempts``: a task that failed for good gets its retries again."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    async def requeue_dead(
        self,
        limit: int = 100,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        reset_attempts: bool = False,
    ) -> list[dict[str, Any]]:
        """Requeue dead letters of ``queue`` and report, per letter, ``{"id",
        "task_name", "reason", "outcome"}`` (``"requeued"`` or ``"skipped: <why>"``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    async def purge_dead_letters(self, *, queue: str | None = None) -> int:
        """Delete every dead letter of ``queue``; returns how many there were."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead-letter store")

    # -------------------------------------------------------------------- lifecycle

    @property
    def is_running(self) -> bool:
        return self._running

    async def __aenter__(self) -> Self:
        """Start the broker: actor system, result store, broker actor, middlewares,
        client startup handlers, and (for in-process brokers) the worker."""
        if self._running or self._stack is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            self.system = system = await stack.enter_async_context(actors.open_system())
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            await self.result_backend.startup(system)
            stack.push_async_callback(self._shielded, self.result_backend.shutdown)
            self._ref = await self._open(system)
            stack.push_async_callback(self._shielded, self._close)
            await self.hooks.run("startup")
            stack.push_async_callback(self._shielded, self.hooks.run_all, "shutdown")
            await self._fire(BusEvent.CLIENT_STARTUP)
            stack.push_async_callback(self._shielded, self._fire, BusEvent.CLIENT_SHUTDOWN)
            self._running = True
            await self._started()
        except BaseException as exc:
            self._running = False
            self._stack = None
            try:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseException as inner:
                raise plain_error(inner) from None
            finally:
                self._ref = None
                self.system = None
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        """Stop intake, let running tasks finish within ``shutdown_timeout``, cancel the
        rest, then stop everything that was started, in reverse order: workers, the
        broker actor, the result store."""
        stack, self._stack = self._stack, None
        assert stack is not None, "broker was not entered"
        try:
            if exc_info[0] is None:
                with trio.CancelScope(shield=True) as scope:
                    # A safety net: _drain honours shutdown_timeout itself.
                    scope.deadline = trio.current_time() + self.shutdown_timeout + 10
                    try:
                        await self._drain()
                    except actors.ActorStopped:
                        pass  # the actors were cancelled from outside: nothing to drain
                    except Exception:
                        log.exception("bus.drain_failed")
        finally:
            self._running = False
            if self._nursery is not None:
                # Workers this broker started itself end here (drained already on a
                # clean exit); the shutdown steps below are shielded.
                self._nursery.cancel_scope.cancel()
            try:
                suppress = await stack.__aexit__(*exc_info)
            except BaseException as exc:
                raise plain_error(exc) from None
            finally:
                self._ref = None
                self.system = None
                self._nursery = None
        return suppress

    async def _shielded(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + max(self.shutdown_timeout, 1.0)
            try:
                await fn(*args)
            except Exception:
                log.exception("bus.shutdown_step_failed", step=getattr(fn, "__qualname__", fn))

    # ----------------------------------------------------------------------- workers

    async def run_worker(
        self,
        concurrency: int | None = None,
        *,
        queues: Sequence[str] | None = None,
        scheduler: bool = True,
        task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a worker for this broker until cancelled (``await nursery.start(...)`` gives
        its :class:`Worker` handle). Enters ``async with broker`` itself when needed.

        The worker is an actor of the broker's system (``bus.WorkerActor``): it
        registers with the broker actor and takes deliveries from the lease it lends.
        ``queues`` lists the queues it consumes (default: the broker's default queue),
        the most urgent task of any of them first (see docs/queues.md). With
        ``scheduler`` (the default) a scheduler actor runs beside it and sends the
        periodic tasks (each tick exactly once, however many schedulers run).

        Cancellation: running tasks are cancelled and nothing is recorded for them;
        a broker that redelivers (Redis) runs them again elsewhere.
        """
        if concurrency is not None:
            _check_concurrency(concurrency)
        if isinstance(queues, str):
            raise TypeError(f"queues is a list of queue names, not the string {queues!r}")
        qs = tuple(check_queue_name(q) for q in queues or ())
        n = concurrency or self.concurrency
        if not self._running:
            async with self:
                await self._run_worker(n, qs, None, task_status, scheduler)
            return
        await self._run_worker(n, qs, None, task_status, scheduler)

    async def _run_worker(
        self,
        concurrency: int,
        queues: tuple[str, ...],
        name: str | None,
        task_status: trio.TaskStatus[Worker],
        scheduler: bool = True,
    ) -> None:
        system = self.system
        if system is None:
            raise BrokerClosed("the broker is not running")
        if not scheduler or "scheduler" in system.actors:
            await self._run_worker_only(concurrency, queues, name, task_status)
            return
        try:
            backend = self._schedule_backend()
        except NotImplementedError:
            await self._run_worker_only(concurrency, queues, name, task_status)
            return
        clock = self._scheduler_clock()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    system.run,
                    lambda: SchedulerActor(self, backend, clock),
                    name="scheduler",
                    mailbox_size=math.inf,
                )
            )
            await self._run_worker_only(concurrency, queues, name, task_status)
            nursery.cancel_scope.cancel()

    async def _run_worker_only(
        self,
        concurrency: int,
        queues: tuple[str, ...],
        name: str | None,
        task_status: trio.TaskStatus[Worker],
    ) -> None:
        from bus._worker import Worker, WorkerActor

        system = self.system
        if system is None:
            raise BrokerClosed("the broker is not running")
        wname: str = name or f"worker-{TaskID.new()[-8:]}"
        await self._fire(BusEvent.WORKER_STARTUP)
        try:
            with trio.CancelScope() as scope:

                class Started:
                    def started(self, ref: actors.ActorRef | None = None) -> None:
                        assert ref is not None
                        task_status.started(Worker(ref, concurrency, wname, scope))

                # ESCALATE: a worker that fails makes run_worker raise (a supervisor
                # restarts the process); it never dies quietly.
                await system.run(
                    lambda: WorkerActor(self, concurrency, queues),
                    name=wname,
                    mailbox_size=math.inf,
                    on_failure=actors.ESCALATE,
                    task_status=Started(),
                )
        finally:
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + 10
                await self._fire(BusEvent.WORKER_SHUTDOWN)


def _static_schedule(task_name: str, trigger: Any) -> ScheduleSpec:
    if not isinstance(trigger, Cron | Every):
        raise TypeError(f"schedule= takes bus.cron(...) or bus.every(...), not {trigger!r}")
    return make_spec(
        task_name, trigger, name=None, args=(), kwargs=None, labels=None, misfire_grace=60.0
    )


def _check_placement(message: TaskMessage) -> None:
    """A message built by hand may name a bad queue or priority: refuse it here."""
    from bus._options import is_queue_name
    from bus._priority import MAX_PRIORITY

    if message.queue is not None and not is_queue_name(message.queue):
        raise SendError(f"{message.task_name}: bad queue name {message.queue!r}")
    p = message.priority
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= MAX_PRIORITY:
        raise SendError(f"{message.task_name}: a priority is 0 to {MAX_PRIORITY}, not {p!r}")


def _check_options(message: TaskMessage) -> None:
    """A message built by hand may carry option labels or an ``eta`` out of their
    bounds (see :mod:`bus._options`): refuse it here, before it is encoded."""
    from bus._options import check_eta, check_labels

    try:
        check_labels(message.labels)
    except (TypeError, ValueError) as exc:
        raise SendError(f"{message.task_name}: invalid option label: {exc}") from None
    eta = message.eta
    if eta is not None:
        try:
            if isinstance(eta, bool) or not isinstance(eta, int | float):
                raise TypeError(f"eta must be a Unix time, not {eta!r}")
            check_eta(eta)
        except (TypeError, ValueError) as exc:
            raise SendError(f"{message.task_name}: {exc}") from None


def _check_concurrency(concurrency: object) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a whole number >= 1, not {concurrency!r}")


class _TaskDecorator:
    def __init__(self, broker: Broker, name: str | None, options: dict[str, Any]) -> None:
        # Fail at decoration time on bad options.
        rest = {k: v for k, v in options.items() if k != "schedule"}
        TaskOptions.build(rest)
        placement(name, rest)
        if "schedule" in options:
            _static_schedule(name or "?", options["schedule"])
        self.broker, self.name, self.options = broker, name, options

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> SyncTask[P, R]: ...

    def __call__(self, func: Callable[..., Any], /) -> Any:
        return self.broker.register_task(func, self.name, **self.options)
