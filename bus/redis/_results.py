"""The Redis result backend: results in keys with a TTL, announced on one channel."""

from __future__ import annotations

import collections
import json
import math
from typing import TYPE_CHECKING, Any

import structlog
import trio
from coredis import PureToken
from coredis.patterns.pubsub import PubSub

import actors
from bus._codec import Codec, DecodeError, JSONCodec
from bus._errors import ResultNotFound, ResultTimeout
from bus._ids import TaskID
from bus._message import RemoteError, TaskResult, TaskStatus
from bus._results import ResultBackend
from bus.redis._conn import FAULTS, Connection
from bus.redis._logic import Backoff

if TYPE_CHECKING:
    import coredis

__all__ = ["RedisResultBackend"]

log = structlog.get_logger("bus.redis.results")


class _Waiters:
    """Who waits for which task id (plain state; the listener and callers share it)."""

    def __init__(self) -> None:
        self.by_id: dict[TaskID, list[_Wait]] = {}

    def add(self, tid: TaskID) -> _Wait:
        w = _Wait()
        self.by_id.setdefault(tid, []).append(w)
        return w

    def remove(self, tid: TaskID, w: _Wait) -> None:
        ws = self.by_id.get(tid)
        if ws is not None:
            if w in ws:
                ws.remove(w)
            if not ws:
                del self.by_id[tid]

    def wake(self, tid: TaskID, result: TaskResult[Any]) -> None:
        for w in self.by_id.pop(tid, ()):
            w.result = result
            w.event.set()

    def close(self, why: str) -> None:
        by_id, self.by_id = self.by_id, {}
        for ws in by_id.values():
            for w in ws:
                w.gone = why
                w.event.set()


class _Wait:
    __slots__ = ("event", "gone", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: TaskResult[Any] | None = None
        self.gone = ""


class _Listener(actors.Actor):
    """Owns the process's one subscription to the results channel and wakes waiters.

    After a reconnect (coredis re-subscribes and a ``subscribe`` message arrives again)
    it re-reads the keys being waited on, since announcements made while the connection
    was down are lost.
    """

    def __init__(self, backend: RedisResultBackend) -> None:
        self.backend = backend

    async def on_start(self) -> None:
        with trio.fail_after(30):
            await self.nursery.start(self.backend._conn_or_fail().hold, self._listen)
        self.backend.conn_ready.set()

    async def _listen(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backend = self.backend
        with trio.CancelScope() as scope:
            backend._listen_scope = scope
            try:
                task_status.started()  # the client is connected
                # Subscribe only once someone in this process waits for a result: a
                # worker-only process would otherwise receive every announcement.
                await backend._want_subscription.wait()
                await self._listen_loop(_Subscribed(backend._subscribed))
            finally:
                backend._listen_done.set()

    async def _listen_loop(self, task_status: _Subscribed) -> None:
        backend = self.backend
        client = backend._client()
        channel = backend.channel
        waiters = backend.waiters
        backoff = Backoff()
        started = False
        while True:
            try:
                async with PubSub[bytes](
                    client.connection_pool, channels=[channel], unsubscription_timeout=0.005
                ) as ps:
                    while True:
                        msg = await ps.get_message()
                        if msg is None:
                            continue
                        kind = msg["type"]
                        if kind == "subscribe":
                            backoff.reset()
                            backend._generation += 1
                            backend._live = True
                            if started:
                                self.nursery.start_soon(backend._recheck)
                            else:
                                started = True
                                task_status.started()
                            continue
                        if kind != "message":
                            continue
                        data = msg["data"]
                        if not isinstance(data, bytes) or len(data) < 36:
                            continue
                        tid = data[:36].decode("ascii", "replace")
                        if tid not in waiters.by_id:
                            continue
                        result = backend._decode(data[36:])
                        if result is not None:
                            waiters.wake(TaskID.parse(tid), result)
            except FAULTS as exc:
                backend._live = False
                log.warning("results.subscription_lost", error=repr(exc), actor=self.name)
                await trio.sleep(backoff.next())


class _Subscribed:
    """Stands in for a task status: marks the subscription as live."""

    def __init__(self, event: trio.Event) -> None:
        self.event = event

    def started(self) -> None:
        self.event.set()


class RedisResultBackend(ResultBackend):
    """Results in Redis, pushed to waiters through one pub/sub subscription per process.

    - ``url``: a ``redis://`` or ``rediss://`` URL (password and db included); passed
      to coredis as is.
    - ``ttl``: seconds a result (and a progress report) is kept (``SET ... EX``).
    - ``prefix``: first part of every key and of the channel (default ``"bus"``).
    - ``codec``: how results are encoded (JSON by default; nothing is ever unpickled).
    - ``client_options``: extra keyword arguments for ``coredis.Redis.from_url``.

    Keys: ``{prefix}:result:{task_id}``, ``{prefix}:progress:{task_id}``; channel
    ``{prefix}:results`` (payload: the task id followed by the encoded result).
    When a :class:`~bus.redis.RedisBroker` with the same URL uses this backend they
    share one client, and result writes and acks travel in the same pipelines.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        ttl: float = 86_400.0,
        prefix: str = "bus",
        codec: Codec | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if not ttl > 0 or math.isinf(ttl):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.url = url
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.prefix = prefix
        self.codec: Codec = codec or JSONCodec()
        self.client_options = dict(client_options or {})
        self.channel = f"{prefix}:results".encode()
        self.waiters = _Waiters()
        self.conn: Connection | None = None
        self._ref: actors.ActorRef | None = None
        self._running = False
        self.conn_ready = trio.Event()
        self._listen_scope: trio.CancelScope | None = None
        self._listen_done = trio.Event()
        self._want_subscription = trio.Event()
        self._subscribed = trio.Event()
        # Subscription generations: a task sent from this process while the
        # subscription was live, and still live in the same generation when its waiter
        # registers, cannot have been announced unseen, so wait_result skips its GET.
        self._generation = 0
        self._live = False
        self._sent_gen: collections.OrderedDict[TaskID, int] = collections.OrderedDict()

    # ------------------------------------------------------------------ keys

    def result_key(self, task_id: str) -> bytes:
        return f"{self.prefix}:result:{task_id}".encode()

    def progress_key(self, task_id: str) -> bytes:
        return f"{self.prefix}:progress:{task_id}".encode()

    # ------------------------------------------------------------- lifecycle

    async def startup(self, system: actors.ActorSystem) -> None:
        self.conn = Connection(self.url, name="bus-results", block_seconds=0, **self.client_options)
        self.waiters = _Waiters()
        self.conn_ready = trio.Event()
        self._listen_scope = None
        self._listen_done = trio.Event()
        self._want_subscription = trio.Event()
        self._subscribed = trio.Event()
        self._generation = 0
        self._live = False
        self._sent_gen.clear()
        name = f"redis-results-{TaskID.new()[-12:]}"
        self._ref = await system.spawn(lambda: _Listener(self), name=name, mailbox_size=16)
        ref = self._ref

        async def listener_died(scope: trio.CancelScope) -> None:
            await ref.join()
            scope.cancel()

        # Wait for the connection, or for the listener to give up (after 30 s).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener_died, nursery.cancel_scope)
            with trio.move_on_after(35):
                await self.conn_ready.wait()
            nursery.cancel_scope.cancel()
        if not self.conn_ready.is_set():
            raise ConnectionError(f"cannot subscribe to results on {self.url}")
        self._running = True

    async def shutdown(self) -> None:
        self._running = False
        self.waiters.close("the result backend shut down")
        self._subscribed.set()  # release a first waiter still waiting to subscribe
        if self._listen_scope is not None:
            # Leave the subscription before the client closes (a clean UNSUBSCRIBE).
            self._listen_scope.cancel()
            with trio.move_on_after(1):
                await self._listen_done.wait()
            self._listen_scope = None
        ref, self._ref = self._ref, None
        if ref is not None and ref.is_alive:
            await ref.stop()
        self.conn = None

    def live_generation(self) -> int | None:
        """The subscription's generation if it is live now, else ``None``; a sender
        reads it before it sends and passes it to :meth:`note_sent` after."""
        return self._generation if self._live else None

    def note_sent(self, task_id: TaskID, generation: int | None) -> None:
        """Remember that ``task_id`` was sent while the subscription was live."""
        if generation is None:
            return
        sent = self._sent_gen
        sent[task_id] = generation
        if len(sent) > 100_000:
            sent.popitem(last=False)

    def _conn_or_fail(self) -> Connection:
        if self.conn is None:
            raise RuntimeError("the Redis result backend is not running")
        return self.conn

    def _client(self) -> coredis.Redis[bytes]:
        return self._conn_or_fail().client

    # --------------------------------------------------------------- encoding

    def encode(self, task_id: TaskID, result: TaskResult[Any]) -> bytes:
        """The stored bytes; a value the codec cannot encode becomes a FAILURE result."""
        try:
            return self.codec.encode_result(result)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            err = RemoteError(
                "bus.UnencodableResult",
                f"the task's return value cannot be encoded by the result codec: {exc}",
            )
            failed: TaskResult[Any] = TaskResult(
                task_id, TaskStatus.FAILURE, None, err, result.execution_time, result.labels
            )
            try:
                return self.codec.encode_result(failed)
            except (TypeError, ValueError, OverflowError, RecursionError):
                return self.codec.encode_result(
                    TaskResult(task_id, TaskStatus.FAILURE, None, err, result.execution_time, {})
                )

    def _decode(self, data: bytes) -> TaskResult[Any] | None:
        try:
            return self.codec.decode_result(data)
        except DecodeError as exc:
            log.error("results.undecodable", error=str(exc))
            return None

    def store_ops(self, task_id: TaskID, data: bytes, *, only_new: bool = False) -> Any:
        """A pipeline op that stores and announces an encoded result."""
        key = self.result_key(task_id)
        payload = task_id.encode() + data
        ttl_ms, channel, progress = self.ttl_ms, self.channel, self.progress_key(task_id)

        def op(pipe: Any) -> None:
            if only_new:
                pipe.set(key, data, px=ttl_ms, condition=PureToken.NX)
            else:
                pipe.set(key, data, px=ttl_ms)
            pipe.publish(channel, payload)
            pipe.delete([progress])

        return op

    # ------------------------------------------------------------- the ABC

    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        data = self.encode(task_id, result)
        conn = self._conn_or_fail()
        await conn.batcher.submit(self.store_ops(task_id, data)).wait()

    async def set_result_if_absent(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store ``result`` unless a result is stored already (used for cancellations).

        The announcement is sent either way; a waiter re-reads nothing, so it may see
        this result while the stored one differs only in a lost race with completion."""
        data = self.encode(task_id, result)
        client = self._client()
        ok = await client.set(
            self.result_key(task_id), data, px=self.ttl_ms, condition=PureToken.NX
        )
        if ok:
            await client.publish(self.channel, task_id.encode() + data)

    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        raw = await self._client().get(self.result_key(task_id))
        if raw is None:
            raise ResultNotFound(task_id, "no result is stored (not finished, or expired)")
        result = self._decode(raw)
        if result is None:
            raise ResultNotFound(task_id, "the stored result cannot be decoded")
        return result

    async def is_ready(self, task_id: TaskID) -> bool:
        return bool(await self._client().exists([self.result_key(task_id)]))

    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        if not self._running:
            raise ResultNotFound(task_id, "the result backend is not running")
        tid = TaskID.parse(task_id)
        waiters = self.waiters
        w = waiters.add(tid)
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                if not self._subscribed.is_set():
                    # The first waiter of this process: subscribe now (once).
                    self._want_subscription.set()
                    await self._subscribed.wait()
                    if w.gone:
                        raise ResultNotFound(task_id, w.gone)
                sent_in = self._sent_gen.pop(tid, None)
                if sent_in is not None and self._live and sent_in == self._generation:
                    raw = None  # sent after we subscribed: its announcement reaches us
                else:
                    # Registered first, then read: a result stored in between is seen.
                    raw = await self._client().get(self.result_key(tid))
                if raw is not None and w.result is None:
                    found = self._decode(raw)
                    if found is not None:
                        return found
                await w.event.wait()
        finally:
            if w.result is None:
                waiters.remove(tid, w)
        if w.result is not None:
            return w.result
        if w.gone:
            raise ResultNotFound(task_id, w.gone)
        raise ResultTimeout(task_id, math.inf if timeout is None else timeout)

    async def _recheck(self) -> None:
        """After a reconnect: read every key being waited on (one MGET) and wake."""
        ids = list(self.waiters.by_id)
        if not ids:
            return
        try:
            raws = await self._client().mget([self.result_key(t) for t in ids])
        except FAULTS as exc:
            log.warning("results.recheck_failed", error=repr(exc))
            return
        for tid, raw in zip(ids, raws, strict=True):
            if raw is not None:
                result = self._decode(raw)
                if result is not None:
                    self.waiters.wake(tid, result)

    async def forget(self, task_id: TaskID) -> None:
        await self._client().delete([self.result_key(task_id), self.progress_key(task_id)])

    async def set_progress(self, task_id: TaskID, progress: Any) -> None:
        data = json.dumps(progress, separators=(",", ":"), allow_nan=False).encode()
        await self._client().set(self.progress_key(task_id), data, px=self.ttl_ms)

    async def get_progress(self, task_id: TaskID) -> Any | None:
        raw = await self._client().get(self.progress_key(task_id))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None
