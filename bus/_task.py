"""Tasks and the kicker that sends them (the handle that tracks one: bus._handle)."""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import trio

from bus._context import Context
from bus._errors import SendError
from bus._frozen import EMPTY, freeze_args, freeze_mapping
from bus._handle import TaskHandle, _handle, gather
from bus._ids import TaskID
from bus._limits import Placement, TaskLimits
from bus._make import maker
from bus._message import TaskMessage
from bus._options import (
    DEFAULT_UNIQUE_TTL,
    TaskOptions,
    check_queue_name,
    check_unique,
    resolve_eta,
)
from bus._priority import check_priority
from bus._unique import canonical_args, unique_key

if TYPE_CHECKING:
    from bus._broker import Broker
    from bus._workflow import Signature

__all__ = ["AsyncTask", "Kicker", "SyncTask", "Task", "TaskHandle", "gather"]

P = ParamSpec("P")
R = TypeVar("R")

#: ``TaskMessage(...)`` with its converters' work done by the caller (see bus._make).
_make_message = maker(TaskMessage, converted=True)


def _context_param(func: Callable[..., Any]) -> str | None:
    """The name of the parameter annotated ``Context``, if any."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    for name, param in sig.parameters.items():
        ann = param.annotation
        if ann is Context:
            return name
        if isinstance(ann, str) and ann.rsplit(".", 1)[-1] == "Context":
            try:
                hints = typing.get_type_hints(func)
            except Exception:
                return name
            if hints.get(name) is Context:
                return name
    return None


class Kicker(Generic[P, R]):
    """Sends a task with per-call settings: ``task.kicker().with_labels(...).kiq(...)``.

    Each ``with_*`` returns a new kicker; a kicker can be reused.
    """

    __slots__ = ("_eta", "_labels", "_priority", "_queue", "_task", "_task_id")

    def __init__(
        self,
        task: Task[P, R],
        labels: dict[str, Any] | None = None,
        task_id: TaskID | None = None,
        eta: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> None:
        self._task = task
        self._labels = labels or {}
        self._task_id = task_id
        self._eta = eta
        self._queue = queue
        self._priority = priority

    def _with(self, **changes: Any) -> Kicker[P, R]:
        k: Kicker[P, R] = Kicker(
            self._task, self._labels, self._task_id, self._eta, self._queue, self._priority
        )
        for name, value in changes.items():
            setattr(k, f"_{name}", value)
        return k

    def with_labels(self, **labels: Any) -> Kicker[P, R]:
        """Add labels (JSON values); ``timeout``/``retries``/``delay``/``eta`` act as options."""
        return self._with(labels={**self._labels, **labels})

    def with_task_id(self, task_id: TaskID | str) -> Kicker[P, R]:
        """Send under this id (validated) instead of a fresh one."""
        return self._with(task_id=TaskID.parse(task_id))

    def with_delay(self, seconds: float) -> Kicker[P, R]:
        """Start no sooner than ``seconds`` from now."""
        resolve_eta({"delay": seconds})
        return self._with(eta={"delay": seconds})

    def with_eta(self, when: Any) -> Kicker[P, R]:
        """Start no sooner than ``when`` (Unix time, or an aware datetime)."""
        resolve_eta({"eta": when})
        return self._with(eta={"eta": when})

    def with_queue(self, name: str) -> Kicker[P, R]:
        """Send to the queue ``name`` instead of the task's own (its ``queue=`` option,
        else the broker's default queue). A bad name raises ``ValueError`` at once."""
        return self._with(queue=check_queue_name(name))

    def with_store_result(self, store: bool) -> Kicker[P, R]:
        """Whether this call's result is stored (the label ``store_result``); see the
        task option ``store_result``."""
        if not isinstance(store, bool):
            raise TypeError(f"store_result must be True or False, not {store!r}")
        return self.with_labels(store_result=store)

    def with_priority(self, n: int) -> Kicker[P, R]:
        """Send with priority ``n``: 0 (the default, least urgent) to 9 (most urgent).
        A worker takes the most urgent task first, with a bounded share for the lower
        levels (see docs/queues.md). Anything else raises at once."""
        return self._with(priority=check_priority(n))

    def with_unique(self, key: str | None = None, ttl: float = DEFAULT_UNIQUE_TTL) -> Kicker[P, R]:
        """Send it as a unique job: while a task with the same unique key is queued or
        running, ``kiq`` returns a handle on that task (the same task id) and sends
        nothing. The key is the task name plus ``key``, or by default plus the encoded
        arguments; it is released when the task's result is stored, or after ``ttl``
        seconds (so a task that never finishes cannot block it for good)."""
        check_unique(key if key is not None else True, ttl)
        return self.with_labels(unique=key if key is not None else True, unique_ttl=ttl)

    def message(self, *args: P.args, **kwargs: P.kwargs) -> TaskMessage:
        """The message :meth:`kiq` would send."""
        return self._task._message(
            args, kwargs, self._labels, self._task_id, self._eta, self._queue, self._priority
        )

    async def kiq(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Send the task; see :meth:`Task.kiq`."""
        self._task.check_call(args, kwargs)
        msg = self._task._message(
            args, kwargs, self._labels, self._task_id, self._eta, self._queue, self._priority
        )
        tid = await self._task.broker.kick(msg)
        stores = self._labels.get("store_result", self._task.options.store_result)
        return TaskHandle(tid, self._task.broker, stores_result=stores is not False)


class Task(Generic[P, R]):
    """A function registered with a broker. Calling it runs the function right here;
    :meth:`kiq` sends it to a worker."""

    def __init__(
        self,
        broker: Broker,
        func: Callable[..., Any],
        name: str,
        options: TaskOptions,
        send_defaults: dict[str, Any],
        placement: Placement | None = None,
    ) -> None:
        self.broker = broker
        self.func = func
        self.name = name
        self.options = options
        self.send_defaults = send_defaults
        placement = placement or Placement()
        #: The task's own queue (the option ``queue=``); ``None``: the broker's default.
        self.queue: str | None = placement.queue
        #: The priority it is sent with unless the kicker says otherwise.
        self.priority: int = placement.priority
        #: Its rate and concurrency limits (``None``: it has none).
        self.limits: TaskLimits | None = placement.limits
        self.is_async = inspect.iscoroutinefunction(func)
        # A broker that can send without a coroutine (the in-memory one) lends kiq its
        # way: called after kiq's cancellation point; ``None`` from it: use ``kick``.
        # Only while the task still belongs to that broker (bus.testing.in_memory
        # points tasks at another for a while).
        self._fast_kick: Callable[[TaskMessage], TaskID | None] | None = getattr(
            broker, "_fast_kick", None
        )
        self._fast_for = broker
        self.context_param = _context_param(func)
        self.__name__ = getattr(func, "__name__", name)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` naming the parameter when ``args`` and ``kwargs`` do not
        fit the function (its ``bus.Context`` parameter aside): what ``kiq`` checks
        before it sends, so a wrong call fails here and not in a worker."""
        # The common call, checked without binding (a bind costs a microsecond a send):
        # positional arguments only, as many as the function takes.
        if not kwargs and self._positional_low <= len(args) <= self._positional_high:
            return
        sig = self._call_signature
        if sig is None:
            return
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            plain = sig.replace(
                parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                return_annotation=sig.empty,
            )
            raise TypeError(f"{self.name}{plain}: {exc}") from None

    @functools.cached_property
    def _positional_arity(self) -> tuple[int, float]:
        """How many positional arguments alone make a valid call (low, high); an empty
        range (1, 0) when a call cannot be judged by its count (a required keyword-only
        parameter, or no readable signature)."""
        sig = self._call_signature
        if sig is None:
            return (1, 0)
        low, high = 0, 0.0
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                high += 1
                if p.default is p.empty:
                    low += 1
            elif p.kind is p.VAR_POSITIONAL:
                high = math.inf
            elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                return (1, 0)
        return (low, high)

    @functools.cached_property
    def _positional_low(self) -> int:
        return self._positional_arity[0]

    @functools.cached_property
    def _positional_high(self) -> float:
        return self._positional_arity[1]

    @functools.cached_property
    def _call_signature(self) -> inspect.Signature | None:
        """The function's signature without its ``bus.Context`` parameter (``None``
        when it has none Python can read, as for some builtins)."""
        try:
            sig = inspect.signature(self.func)
        except (TypeError, ValueError):
            return None
        if self.context_param is None:
            return sig
        return sig.replace(
            parameters=[p for n, p in sig.parameters.items() if n != self.context_param]
        )

    def kicker(self) -> Kicker[P, R]:
        return Kicker(self)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A step of a workflow (``bus.chain``, ``bus.group``, ``bus.chord``, ``|``):
        this task with these arguments, after the previous step's result, which it gets
        as its first positional argument. Checked against the task when the workflow
        is sent."""
        from bus._workflow import Signature

        return Signature(self.name, args, kwargs, task=self)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable step: as :meth:`s`, but it does not get the previous result."""
        from bus._workflow import Signature

        return Signature(self.name, args, kwargs, immutable=True, task=self)

    async def kiq(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Send the task with these arguments and return its handle.

        Raises ``TypeError`` (naming the parameter) when the arguments do not fit the
        function, and :class:`SendError` when they cannot be encoded or the broker is
        not running. Waits while the broker's queue is full (backpressure).
        Cancellation: if cancelled while waiting for room, nothing was sent.
        """
        if kwargs or not (self._positional_low <= len(args) <= self._positional_high):
            self.check_call(args, kwargs)  # (the common call is judged by its count)
        if self.send_defaults:
            msg = self._message(args, kwargs, None, None, None)
        else:  # the common message: no labels, no delay
            msg = _make_message(
                TaskID.new(),
                self.name,
                freeze_args(args),  # the converters' work, done here
                freeze_mapping(kwargs) if kwargs else EMPTY,
                EMPTY,
                1,
                None,
                self.queue,
                self.priority,
            )
        broker = self.broker
        fast = self._fast_kick
        if fast is not None and self._fast_for is broker:
            await trio.lowlevel.checkpoint_if_cancelled()  # the send's, before it is sent
            tid = fast(msg)
            if tid is None:
                tid = await broker.kick(msg)
        else:
            tid = await broker.kick(msg)
        return _handle(tid, broker, self.options.store_result)

    async def kiq_many(
        self, calls: Iterable[tuple[tuple[Any, ...], dict[str, Any]] | tuple[Any, ...]]
    ) -> list[TaskHandle[R]]:
        """Send one task per call, in bulk, and return their handles in order.

        Each call is a tuple of positional arguments, or an ``(args, kwargs)`` pair::

            await add.kiq_many((i, i) for i in range(1000))
            await greet.kiq_many([(("ann",), {"loud": True})])

        Arguments are not type-checked as with :meth:`kiq`. The Redis broker sends
        them in pipelines (one round trip per 500). Raises as :meth:`kiq` does.
        """
        messages = []
        for call in calls:
            if len(call) == 2 and isinstance(call[0], tuple) and isinstance(call[1], dict):
                args, kwargs = call[0], call[1]
            else:
                args, kwargs = tuple(call), {}
            messages.append(self._message(args, kwargs, None, None, None))
        ids = await self.broker.kick_many(messages)
        stores = self.options.store_result
        return [TaskHandle(tid, self.broker, stores_result=stores) for tid in ids]

    def kiq_nowait(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Send without waiting, on brokers that can (the in-memory one); raises
        :class:`QueueFull` instead of waiting for room."""
        self.check_call(args, kwargs)
        msg = self._message(args, kwargs, None, None, None)
        tid = self.broker.kick_nowait(msg)
        return TaskHandle(tid, self.broker, stores_result=self.options.store_result)

    def _message(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        labels: dict[str, Any] | None,
        task_id: TaskID | None,
        eta_spec: dict[str, Any] | None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> TaskMessage:
        eta: float | None = None
        if labels:
            try:
                self.options.with_labels(labels)
            except (TypeError, ValueError) as exc:
                raise SendError(f"{self.name}: invalid option label: {exc}") from None
        if labels and ("delay" in labels or "eta" in labels):
            try:
                eta = resolve_eta(labels)
            except (TypeError, ValueError) as exc:
                raise SendError(f"{self.name}: {exc}") from None
        elif eta_spec is not None:
            eta = resolve_eta(eta_spec)
        elif self.send_defaults:
            eta = resolve_eta(self.send_defaults)
        unique = labels.get("unique") if labels else None
        if unique is None and self.send_defaults:
            unique = self.send_defaults.get("unique")
        if unique:
            labels = self._unique_labels(args, kwargs, labels or {}, unique)
        if queue is None:
            queue = self.queue
        if priority is None:
            priority = self.priority
        return TaskMessage(
            task_id=task_id or TaskID.new(),
            task_name=self.name,
            args=args,
            kwargs=kwargs,
            labels=labels if labels is not None else {},
            eta=eta,
            queue=queue,
            priority=priority,
        )

    def _unique_labels(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], labels: dict[str, Any], unique: Any
    ) -> dict[str, Any]:
        """The labels of a unique job: ``unique_key`` (the task name and the key, or a
        hash of the arguments) and ``unique_ttl`` in place of ``unique``."""
        ttl = labels.get("unique_ttl", self.send_defaults.get("unique_ttl", DEFAULT_UNIQUE_TTL))
        try:
            check_unique(unique, ttl)
            encoded = canonical_args(args, kwargs) if unique is True else b""
        except (TypeError, ValueError) as exc:
            raise SendError(f"{self.name}: unique job: {exc}") from None
        key = unique_key(self.name, encoded, None if unique is True else str(unique))
        out = {k: v for k, v in labels.items() if k != "unique"}
        out["unique_key"] = key
        out["unique_ttl"] = float(ttl)
        return out


class AsyncTask(Task[P, R]):
    """A task whose function is ``async def``."""

    func: Callable[P, Coroutine[Any, Any, R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return self.func(*args, **kwargs)


class SyncTask(Task[P, R]):
    """A task whose function is a plain ``def``: workers run it in a thread."""

    func: Callable[P, R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)
