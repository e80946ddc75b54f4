"""Result backends: a result-store actor that owns the results and wakes watchers.

:class:`ResultBackend` is the facade a broker holds; behind it runs an actor
(``backend.ref``) that speaks the result messages of :mod:`bus.protocol`
(``StoreResult``, ``GetResult``, ``ForgetResult``, ``Watch``, ``Unwatch``,
``SetProgress``, ``GetProgress``). The in-memory store keeps its table in
:class:`ResultTable`, plain synchronous state; readers in this process may read a
stored result through a read-only :class:`ResultView` of it, and a miss registers a
watch by message, woken the moment the result is stored.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from bus._codec import Codec, JSONCodec
from bus._errors import ResultNotFound, ResultTimeout
from bus._frozen import value_faithful
from bus._ids import TaskID
from bus._make import maker
from bus._message import RemoteError, TaskResult, TaskStatus
from bus._protocol import (
    ForgetResult,
    GetProgress,
    GetResult,
    SetProgress,
    StoreResult,
    Unwatch,
    Watch,
    Watcher,
)
from bus._supervision import BUG_BACKOFF, BUG_RESTARTS

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "DEFAULT_MAX_STORED_RESULTS",
    "InMemoryResultBackend",
    "InmemoryResultBackend",
    "ResultBackend",
    "ResultStoreActor",
    "ResultTable",
    "ResultView",
    "encode_result_checked",
    "through_codec",
]

_CODEC_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)
_make_store = maker(StoreResult)  # StoreResult(...), cheaper (see bus._make)


def encode_result_checked(codec: Codec, task_id: TaskID, result: TaskResult[Any]) -> bytes:
    """The stored bytes of ``result``; a value the codec cannot encode becomes a
    FAILURE result (``bus.UnencodableResult``) instead, on every backend alike."""
    try:
        return codec.encode_result(result)
    except _CODEC_ERRORS as exc:
        return codec.encode_result(_unencodable(task_id, result, exc))


def _unencodable(task_id: TaskID, result: TaskResult[Any], exc: BaseException) -> TaskResult[Any]:
    err = RemoteError(
        "bus.UnencodableResult",
        f"the task's return value cannot be encoded by the result codec: {exc}",
    )
    return TaskResult(task_id, TaskStatus.FAILURE, None, err, result.execution_time, result.labels)


def through_codec(codec: Codec, task_id: TaskID, result: TaskResult[Any]) -> TaskResult[Any]:
    """``result`` as a reader elsewhere would get it: passed through ``codec`` (so a
    task returning a ``set`` fails in memory exactly as it does on Redis). A result
    whose value a round trip cannot change (None, numbers, strings, tuples of them)
    is returned as it is, without encoding."""
    if result.error is None and value_faithful(result.return_value):
        return result
    try:
        return codec.decode_result(codec.encode_result(result))
    except _CODEC_ERRORS as exc:
        return codec.decode_result(codec.encode_result(_unencodable(task_id, result, exc)))


class ResultBackend(abc.ABC):
    """Stores results keyed by :class:`TaskID` and wakes whoever waits for one.

    A broker starts its backend inside ``async with broker`` (:meth:`startup`, which
    spawns the backend's actor in the broker's actor system) and stops it on the way
    out (:meth:`shutdown`). Waiting is push-based in every implementation:
    :meth:`wait_result` sleeps until :meth:`set_result` (in any process, for a shared
    backend) stores the result.
    """

    @property
    def ref(self) -> actors.ActorRef:
        """The result-store actor (while the broker runs): it takes the result
        messages of :mod:`bus.protocol`."""
        raise NotImplementedError(f"{type(self).__name__} has no result-store actor")

    async def startup(self, system: actors.ActorSystem) -> None:  # noqa: B027
        """Start whatever the backend needs (its actor, connections) in ``system``."""

    async def shutdown(self) -> None:  # noqa: B027
        """Stop it; waiters still waiting get :class:`ResultNotFound`."""

    @abc.abstractmethod
    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store ``result`` and wake its waiters. Once it returns, every later read
        sees the result."""

    def set_result_nowait(self, task_id: TaskID, result: TaskResult[Any]) -> bool:
        """Store ``result`` now, without waiting, when this backend can (the in-memory
        one: its store is an actor of this process); False when it cannot, and nothing
        was done (use :meth:`set_result`)."""
        return False

    def set_result_soon(
        self,
        task_id: TaskID,
        result: TaskResult[Any],
        stored: Callable[[BaseException | None], None],
    ) -> bool:
        """Start storing ``result`` and return at once, when this backend can: True,
        and ``stored(None)`` is called once it is stored, or ``stored(exc)`` with what
        :meth:`set_result` would have raised. ``stored`` is called from a task of the
        backend's own: it must neither block nor raise. If the backend stops first,
        ``stored`` gets :class:`actors.ActorStopped`. False when it cannot, and
        nothing was done (use :meth:`set_result`). Not a checkpoint.

        A worker stores a result this way, then acknowledges its task in ``stored``:
        its runner takes the next task meanwhile."""
        return False

    async def set_result_if_absent(self, task_id: TaskID, result: TaskResult[Any]) -> bool:
        """Store ``result`` unless a result is stored already (a cancellation racing
        the task's own result); True if it was stored. Backends that can do it
        atomically (Redis: ``SET NX``) override this check-then-set."""
        if await self.is_ready(task_id):
            return False
        await self.set_result(task_id, result)
        return True

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


# ----------------------------------------------------------------- the table


#: How many results an in-memory store keeps by default: the newest 10,000 (a
#: long-running program that never reads its results does not grow without bound).
DEFAULT_MAX_STORED_RESULTS = 10_000


class ResultTable:
    """The in-memory result store as plain synchronous state (no I/O, easy to test).

    Results are kept in store order; ``max_stored`` evicts the oldest, ``ttl`` expires
    them (measured on the Trio clock, passed in as ``now``). Ids whose result was
    evicted, expired or forgotten are remembered (a bounded set) so a later watcher is
    told at once instead of hanging.
    """

    def __init__(self, max_stored: int | None = None, ttl: float | None = None) -> None:
        if max_stored is not None and (
            isinstance(max_stored, bool) or not isinstance(max_stored, int) or max_stored < 1
        ):
            raise ValueError(f"max_stored_results must be at least 1, not {max_stored!r}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.max_stored = max_stored
        self.ttl = ttl
        # A plain dict keeps store order too (and is faster than an OrderedDict).
        self.results: dict[TaskID, TaskResult[Any]] = {}
        # When each was stored, in the same order (kept only with a ttl: without one,
        # a result costs no more than its entry).
        self.stored_at: dict[TaskID, float] = {}
        self.progress: dict[TaskID, Any] = {}
        self.watchers: dict[TaskID, list[Watcher]] = {}
        self.gone: collections.OrderedDict[TaskID, str] = collections.OrderedDict()
        self._gone_max = max(max_stored or 0, 10_000)
        self.evicted = 0
        self.closed = ""

    def store(self, task_id: TaskID, result: TaskResult[Any], now: float) -> None:
        results = self.results
        if task_id in results:
            del results[task_id]  # re-stored: it moves to the end
        results[task_id] = result
        if self.ttl is not None:
            stored_at = self.stored_at
            stored_at.pop(task_id, None)
            stored_at[task_id] = now
        if self.progress:
            self.progress.pop(task_id, None)
        if self.gone:
            self.gone.pop(task_id, None)
        if self.watchers:
            watchers = self.watchers.pop(task_id, None)
            if watchers:
                for w in watchers:
                    w.resolve(result)
        if self.max_stored is not None:
            while len(results) > self.max_stored:
                old = next(iter(results))
                del results[old]
                self.stored_at.pop(old, None)
                self.evicted += 1
                self._forget(old, "result was evicted (max_stored_results)")
        if self.ttl is not None:
            self.expire(now)

    def expire(self, now: float) -> None:
        if self.ttl is None:
            return
        stored_at = self.stored_at
        limit = now - self.ttl
        while stored_at:
            tid, at = next(iter(stored_at.items()))
            if at > limit:
                break
            del stored_at[tid]
            del self.results[tid]
            self._forget(tid, "result expired (ttl)")

    def get(self, task_id: TaskID, now: float) -> TaskResult[Any] | None:
        if self.ttl is not None:
            self.expire(now)
        return self.results.get(task_id)

    def watch(self, task_id: TaskID, watcher: Watcher, now: float) -> None:
        """Resolve ``watcher`` now if the result is stored or gone, else keep it."""
        found = self.get(task_id, now)
        if found is not None:
            watcher.resolve(found)
            return
        why = self.gone.get(task_id) or self.closed
        if why:
            watcher.fail(why)
            return
        self.watchers.setdefault(task_id, []).append(watcher)

    def unwatch(self, task_id: TaskID, watcher: Watcher) -> None:
        ws = self.watchers.get(task_id)
        if ws is not None:
            if watcher in ws:
                ws.remove(watcher)
            if not ws:
                del self.watchers[task_id]

    def forget(self, task_id: TaskID) -> None:
        self.progress.pop(task_id, None)
        self.stored_at.pop(task_id, None)
        if self.results.pop(task_id, None) is not None:
            self._forget(task_id, "result was forgotten")

    def _forget(self, task_id: TaskID, why: str) -> None:
        self.progress.pop(task_id, None)
        self.gone[task_id] = why
        if len(self.gone) > self._gone_max:
            self.gone.popitem(last=False)

    def close(self, why: str) -> None:
        """Fail every watcher with ``why``; later watchers fail at once."""
        self.closed = why
        watchers, self.watchers = self.watchers, {}
        for ws in watchers.values():
            for w in ws:
                w.fail(why)


@attrs.frozen
class ResultView:
    """A read-only view of a :class:`ResultTable`, for readers in the same process.

    It never changes the table: an expired result reads as missing here, and the
    store's own actor removes it.
    """

    _table: ResultTable

    def get(self, task_id: TaskID, now: float | None = None) -> TaskResult[Any] | None:
        table = self._table
        found = table.results.get(task_id)
        ttl = table.ttl
        if (
            found is not None
            and ttl is not None
            and table.stored_at[task_id] <= (trio.current_time() if now is None else now) - ttl
        ):
            return None
        return found

    def gone_reason(self, task_id: TaskID) -> str | None:
        return self._table.gone.get(task_id)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and self.get(TaskID(task_id)) is not None

    def __iter__(self) -> Iterator[TaskID]:
        return iter(list(self._table.results))

    def __len__(self) -> int:
        return len(self._table.results)

    @property
    def evicted(self) -> int:
        """How many results were evicted by ``max_stored_results``."""
        return self._table.evicted


# ----------------------------------------------------------------- the actor


@attrs.frozen
class CloseStore:
    """Told to a result store on shutdown: fail every watcher with ``why``."""

    why: str = "the result backend shut down"


class ResultStoreActor(actors.Actor):
    """The one writer of an in-memory result table; answers the result messages.

    It is handed its table when it is spawned (and owns it from then on: nobody else
    writes it); readers in the same process may hold a :class:`ResultView` of it.
    """

    def __init__(self, table: ResultTable | None = None) -> None:
        self.table = table if table is not None else ResultTable()
        self.view = ResultView(self.table)
        self._timed = self.table.ttl is not None

    def _now(self) -> float:
        return trio.current_time() if self._timed else 0.0

    @actors.handles(StoreResult, inline=True)
    def store(self, msg: StoreResult) -> None:
        self.table.store(msg.task_id, msg.result, trio.current_time() if self._timed else 0.0)

    @actors.handles(GetResult)
    def get(self, msg: GetResult) -> TaskResult[Any] | None:
        return self.table.get(msg.task_id, self._now())

    @actors.handles(ForgetResult, inline=True)
    def forget(self, msg: ForgetResult) -> None:
        self.table.forget(msg.task_id)

    @actors.handles(Watch, inline=True)
    def watch(self, msg: Watch) -> None:
        self.table.watch(msg.task_id, msg.watcher, self._now())

    @actors.handles(Unwatch, inline=True)
    def unwatch(self, msg: Unwatch) -> None:
        self.table.unwatch(msg.task_id, msg.watcher)

    @actors.handles(SetProgress, inline=True)
    def set_progress(self, msg: SetProgress) -> None:
        self.table.progress[msg.task_id] = msg.progress

    @actors.handles(GetProgress)
    def get_progress(self, msg: GetProgress) -> Any:
        return self.table.progress.get(msg.task_id)

    @actors.handles(CloseStore)
    def close(self, msg: CloseStore) -> None:
        self.table.close(msg.why)

    async def on_start(self) -> None:
        self.table.closed = ""

    async def on_stop(self) -> None:
        self.table.close("the result backend shut down")


# ------------------------------------------------------------- the facade


class InMemoryResultBackend(ResultBackend):
    """Results kept in this process, for the in-memory broker and for tests.

    A result-store actor (``backend.ref``) owns the results. Storing tells it a
    ``StoreResult`` without waiting; reading a stored result reads a read-only view of
    its table (no message, no scheduler pass); a miss asks the actor, and
    :meth:`wait_result` registers a ``Watch`` that the actor resolves the moment the
    result is stored (no polling). ``max_stored_results`` bounds memory by evicting the
    oldest results (default :data:`DEFAULT_MAX_STORED_RESULTS`, 10,000; ``None``:
    unlimited); ``ttl`` (seconds) expires them. A waiter on
    an evicted, expired or forgotten result gets :class:`ResultNotFound`, never a hang.

    Results pass through ``codec`` (JSON by default) as they would on a shared backend,
    so a value that Redis could not store fails here too.
    """

    def __init__(
        self,
        *,
        max_stored_results: int | None = DEFAULT_MAX_STORED_RESULTS,
        ttl: float | None = None,
        codec: Codec | None = None,
    ) -> None:
        # The table outlives each run of the broker: results stay readable (read-only)
        # after `async with broker`, and a broker entered again keeps them. While the
        # broker runs, only the store actor writes it.
        self._table = ResultTable(max_stored_results, ttl)
        self.max_stored_results = max_stored_results
        self.ttl = ttl
        self.codec: Codec = codec or JSONCodec()
        self._ref: actors.ActorRef | None = None
        self._view = ResultView(self._table)
        self._plain_store = type(self).set_result is InMemoryResultBackend.set_result

    @property
    def ref(self) -> actors.ActorRef:
        if self._ref is None:
            raise RuntimeError("the result backend is not running (enter `async with broker`)")
        return self._ref

    @property
    def view(self) -> ResultView:
        """A read-only view of the stored results (also after the broker stopped)."""
        return self._view

    async def startup(self, system: actors.ActorSystem) -> None:
        table = self._table

        def make() -> ResultStoreActor:
            return ResultStoreActor(table)

        # Unbounded: StoreResults are bounded by the workers' runners, watches by
        # the waiters; a bounded mailbox would only make storing a result wait.
        # The table outlives an instance of the store: a bug in a handler restarts it
        # with every result and waiter kept.
        self._ref = await system.spawn(
            make,
            name="results",
            mailbox_size=math.inf,
            on_failure=actors.RESTART,
            max_restarts=BUG_RESTARTS,  # then it escalates: the process ends
            backoff=BUG_BACKOFF,
        )

    async def shutdown(self) -> None:
        ref, self._ref = self._ref, None
        if ref is not None and ref.is_alive:
            await ref.stop()

    def _tell(self, msg: object) -> None:
        ref = self._ref
        if ref is None:
            # No store actor runs (outside `async with broker`, e.g. a task called
            # directly in a test): nobody else writes the table, so write it here.
            _apply_offline(self._table, msg)
            return
        ref.tell_nowait(msg)  # unbounded mailbox: never full

    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store ``result`` (passed through the codec). Does not wait and does not yield
        to the scheduler: every later read, from any task, sees the result."""
        self._store(task_id, result)

    def set_result_nowait(self, task_id: TaskID, result: TaskResult[Any]) -> bool:
        """As :meth:`set_result`, without a coroutine (the worker's hot path): True;
        False (nothing done) when a subclass changed :meth:`set_result`."""
        if self._plain_store:
            self._store(task_id, result)
            return True
        return False

    def _store(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        value = result.return_value
        if result.error is not None or (value is not None and not value_faithful(value)):
            result = through_codec(self.codec, task_id, result)
        ref = self._ref
        if ref is None:
            _apply_offline(self._table, StoreResult(task_id, result))
        else:
            ref.tell_nowait(_make_store(task_id, result))  # unbounded mailbox: never full

    def get_result_nowait(self, task_id: TaskID) -> TaskResult[Any]:
        """The stored result, read from the view; :class:`ResultNotFound` otherwise
        (a result stored by a message not yet handled may be missed: :meth:`get_result`
        asks the store in that case)."""
        view = self.view
        r = view.get(task_id)
        if r is None:
            raise ResultNotFound(task_id, view.gone_reason(task_id) or "no result yet")
        return r

    async def _ask_store(self, task_id: TaskID) -> TaskResult[Any] | None:
        ref = self._ref
        if ref is None:  # stopped: the view is all there is
            await trio.lowlevel.checkpoint()
            return self._view.get(task_id)
        found: TaskResult[Any] | None = await ref.ask(GetResult(task_id))
        return found

    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        r = self._view.get(task_id)
        if r is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return r
        found = await self._ask_store(task_id)
        if found is None:
            raise ResultNotFound(task_id, self.view.gone_reason(task_id) or "no result yet")
        return found

    async def is_ready(self, task_id: TaskID) -> bool:
        if self._view.get(task_id) is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return True
        return await self._ask_store(task_id) is not None

    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        r = self._view.get(task_id)
        if r is not None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return r
        if self._ref is None:
            why = self._view.gone_reason(task_id) or "the result backend is not running"
            raise ResultNotFound(task_id, why)
        watcher = Watcher()
        try:
            self._tell(Watch(task_id, watcher))
        except actors.ActorStopped:
            raise ResultNotFound(task_id, "the result backend is stopping") from None
        try:
            await watcher.wait(timeout)
        finally:
            if not watcher.event.is_set() and self._ref is not None:
                # A store that stops meanwhile forgets its watchers anyway; never
                # let that hide the exception (Cancelled) that ended the wait.
                with contextlib.suppress(actors.ActorStopped):
                    self._ref.tell_nowait(Unwatch(task_id, watcher))
        if watcher.result is not None:
            return watcher.result
        if watcher.gone:
            raise ResultNotFound(task_id, watcher.gone)
        raise ResultTimeout(task_id, math.inf if timeout is None else timeout)

    async def forget(self, task_id: TaskID) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._tell(ForgetResult(task_id))

    async def set_progress(self, task_id: TaskID, progress: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._tell(SetProgress(task_id, progress))

    async def get_progress(self, task_id: TaskID) -> Any | None:
        ref = self._ref
        if ref is None:
            await trio.lowlevel.checkpoint()
            return self._table.progress.get(task_id)
        return await ref.ask(GetProgress(task_id))


def _apply_offline(table: ResultTable, msg: object) -> None:
    now = trio.current_time() if table.ttl is not None else 0.0
    if isinstance(msg, StoreResult):
        table.store(msg.task_id, msg.result, now)
    elif isinstance(msg, SetProgress):
        table.progress[msg.task_id] = msg.progress
    elif isinstance(msg, ForgetResult):
        table.forget(msg.task_id)
    # Watch / Unwatch need a running store; wait_result refuses before sending one.


InmemoryResultBackend = InMemoryResultBackend
