"""Result backends: where results are stored and how waiters learn of them."""

from __future__ import annotations

import abc
import collections
import contextlib
import math
from typing import TYPE_CHECKING, Any

import trio

from bus._errors import ResultNotFound, ResultTimeout
from bus._ids import TaskID
from bus._message import TaskResult

if TYPE_CHECKING:
    import actors

__all__ = ["InMemoryResultBackend", "InmemoryResultBackend", "ResultBackend"]


class ResultBackend(abc.ABC):
    """Stores results keyed by :class:`TaskID` and wakes whoever waits for one.

    A broker starts its backend inside ``async with broker`` (:meth:`startup`) and stops
    it on the way out (:meth:`shutdown`). Waiting is push-based in every implementation:
    :meth:`wait_result` sleeps until :meth:`set_result` (in any process, for a shared
    backend) stores the result.
    """

    async def startup(self, system: actors.ActorSystem) -> None:  # noqa: B027
        """Start whatever the backend needs (actors, connections) in ``system``."""

    async def shutdown(self) -> None:  # noqa: B027
        """Stop it; waiters still waiting get :class:`ResultNotFound`."""

    @abc.abstractmethod
    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store ``result`` and wake its waiters. Returns once it is stored."""

    @abc.abstractmethod
    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        """The stored result; raises :class:`ResultNotFound` when there is none."""

    @abc.abstractmethod
    async def is_ready(self, task_id: TaskID) -> bool:
        """Whether a result is stored."""

    @abc.abstractmethod
    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        """Wait until the result is stored and return it.

        Raises :class:`ResultTimeout` after ``timeout`` seconds, and
        :class:`ResultNotFound` if the result is known to be gone (evicted, expired,
        forgotten) or the backend shuts down. Cancellation: the wait is abandoned; the
        result, when it comes, is stored as usual.
        """

    @abc.abstractmethod
    async def forget(self, task_id: TaskID) -> None:
        """Drop the result (and progress) of ``task_id``, if any."""

    @abc.abstractmethod
    async def set_progress(self, task_id: TaskID, progress: Any) -> None:
        """Store the latest progress report of a running task."""

    @abc.abstractmethod
    async def get_progress(self, task_id: TaskID) -> Any | None:
        """The latest progress report, or ``None``."""


class _Waiter:
    __slots__ = ("event", "gone", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: TaskResult[Any] | None = None
        self.gone = ""


class ResultTable:
    """The in-memory result store as plain synchronous state (no I/O, easy to test).

    Results are kept in store order; ``max_stored`` evicts the oldest, ``ttl`` expires
    them (measured on the Trio clock). Ids whose result was evicted, expired or
    forgotten are remembered (a bounded set) so a later waiter is told at once instead
    of hanging.
    """

    def __init__(self, max_stored: int | None = None, ttl: float | None = None) -> None:
        if max_stored is not None and max_stored < 1:
            raise ValueError(f"max_stored_results must be at least 1, not {max_stored}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
        self.max_stored = max_stored
        self.ttl = ttl
        self.results: collections.OrderedDict[TaskID, tuple[float, TaskResult[Any]]] = (
            collections.OrderedDict()
        )
        self.progress: dict[TaskID, Any] = {}
        self.waiters: dict[TaskID, list[_Waiter]] = {}
        self._gone: collections.OrderedDict[TaskID, str] = collections.OrderedDict()
        self._gone_max = max(max_stored or 0, 10_000)
        self.evicted = 0

    def store(self, task_id: TaskID, result: TaskResult[Any], now: float) -> None:
        results = self.results
        if task_id in results:
            del results[task_id]
        results[task_id] = (now, result)
        self.progress.pop(task_id, None)
        self._gone.pop(task_id, None)
        waiters = self.waiters.pop(task_id, None)
        if waiters:
            for w in waiters:
                w.result = result
                w.event.set()
        if self.max_stored is not None:
            while len(results) > self.max_stored:
                old, _ = results.popitem(last=False)
                self.evicted += 1
                self._forget(old, "result was evicted (max_stored_results)")
        if self.ttl is not None:
            self.expire(now)

    def expire(self, now: float) -> None:
        if self.ttl is None:
            return
        results = self.results
        limit = now - self.ttl
        while results:
            tid, (stored_at, _) = next(iter(results.items()))
            if stored_at > limit:
                break
            del results[tid]
            self._forget(tid, "result expired (ttl)")

    def get(self, task_id: TaskID, now: float) -> TaskResult[Any] | None:
        if self.ttl is not None:
            self.expire(now)
        entry = self.results.get(task_id)
        return None if entry is None else entry[1]

    def gone_reason(self, task_id: TaskID) -> str | None:
        return self._gone.get(task_id)

    def add_waiter(self, task_id: TaskID) -> _Waiter:
        w = _Waiter()
        self.waiters.setdefault(task_id, []).append(w)
        return w

    def remove_waiter(self, task_id: TaskID, waiter: _Waiter) -> None:
        ws = self.waiters.get(task_id)
        if ws is not None:
            with contextlib.suppress(ValueError):
                ws.remove(waiter)
            if not ws:
                del self.waiters[task_id]

    def forget(self, task_id: TaskID) -> None:
        self.progress.pop(task_id, None)
        if self.results.pop(task_id, None) is not None:
            self._forget(task_id, "result was forgotten")

    def _forget(self, task_id: TaskID, why: str) -> None:
        self.progress.pop(task_id, None)
        self._gone[task_id] = why
        if len(self._gone) > self._gone_max:
            self._gone.popitem(last=False)

    def close(self, why: str) -> None:
        waiters, self.waiters = self.waiters, {}
        for ws in waiters.values():
            for w in ws:
                w.gone = why
                w.event.set()


class InMemoryResultBackend(ResultBackend):
    """Results kept in this process, for the in-memory broker and for tests.

    Every call completes without waiting except :meth:`wait_result`, which sleeps until
    the result is stored (no polling). Calls that need not wait do not yield to the
    scheduler either (they still raise ``Cancelled`` in a cancelled scope).
    ``max_stored_results`` bounds memory by evicting the oldest results (default:
    unlimited); ``ttl`` (seconds) expires them. A waiter on
    an evicted, expired or forgotten result gets :class:`ResultNotFound`, never a hang.

    Design note: the store is a plain table owned by the Trio thread, not an actor of
    its own: a mailbox hop would cost a scheduler pass (about 10 microseconds here) on
    every store and every read, for no gain in safety, since Trio runs one task at a time.
    """

    def __init__(self, *, max_stored_results: int | None = None, ttl: float | None = None) -> None:
        self.table = ResultTable(max_stored_results, ttl)
        self._closed = False

    async def startup(self, system: actors.ActorSystem) -> None:
        self._closed = False

    async def shutdown(self) -> None:
        self._closed = True
        self.table.close("the result backend shut down")

    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        self.table.store(task_id, result, trio.current_time())
        await trio.lowlevel.checkpoint_if_cancelled()

    def get_result_nowait(self, task_id: TaskID) -> TaskResult[Any]:
        """The stored result, or :class:`ResultNotFound`."""
        r = self.table.get(task_id, trio.current_time())
        if r is None:
            raise ResultNotFound(task_id, self.table.gone_reason(task_id) or "no result yet")
        return r

    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.get_result_nowait(task_id)

    async def is_ready(self, task_id: TaskID) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.table.get(task_id, trio.current_time()) is not None

    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        table = self.table
        r = table.get(task_id, trio.current_time())
        if r is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return r
        why = table.gone_reason(task_id)
        if why is not None:
            raise ResultNotFound(task_id, why)
        if self._closed:
            raise ResultNotFound(task_id, "the result backend is not running")
        w = table.add_waiter(task_id)
        try:
            if timeout is None:
                await w.event.wait()
            else:
                with trio.move_on_after(timeout):
                    await w.event.wait()
        finally:
            if w.result is None:
                table.remove_waiter(task_id, w)
        if w.result is not None:
            return w.result
        if w.gone:
            raise ResultNotFound(task_id, w.gone)
        raise ResultTimeout(task_id, math.inf if timeout is None else timeout)

    async def forget(self, task_id: TaskID) -> None:
        self.table.forget(task_id)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def set_progress(self, task_id: TaskID, progress: Any) -> None:
        self.table.progress[task_id] = progress
        await trio.lowlevel.checkpoint_if_cancelled()

    async def get_progress(self, task_id: TaskID) -> Any | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.table.progress.get(task_id)


InmemoryResultBackend = InMemoryResultBackend
