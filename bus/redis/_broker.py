"""The Redis Streams broker: a consumer group per queue, redelivery, a dead-letter stream."""

from __future__ import annotations

import collections
import contextlib
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import coredis
import structlog
import trio
from coredis import PureToken
from coredis.exceptions import StreamConsumerGroupError, StreamDuplicateConsumerGroupError
from coredis.patterns.pubsub import PubSub
from coredis.response.types import StreamEntry, StreamPending, StreamPendingExt

import actors
from bus._broker import Broker
from bus._codec import Codec, DecodeError
from bus._errors import SendError
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._protocol import Ack, Cancel, Delivery, Nack, Receive, Send
from bus._results import ResultBackend
from bus.redis._conn import FAULTS, Connection
from bus.redis._logic import (
    F_DATA,
    F_SIG,
    Backoff,
    Keys,
    check_entry,
    join_member,
    over_delivered,
    sign,
)
from bus.redis._results import RedisResultBackend

__all__ = ["RedisBroker"]

log = structlog.get_logger("bus.redis")

#: Moves due members of the delayed set into the stream, atomically.
#: KEYS: delayed zset, stream. ARGV: now (ms), batch size, maxlen (0: none).
#: Returns {moved, score of the next member or false}.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local maxlen = tonumber(ARGV[3])
for _, member in ipairs(due) do
  local args = {KEYS[2]}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  local nl = string.find(member, '\\n', 1, true)
  if nl then
    local sig = string.sub(member, 1, nl - 1)
    args[#args + 1] = 'd'; args[#args + 1] = string.sub(member, nl + 1)
    if sig ~= '' then args[#args + 1] = 's'; args[#args + 1] = sig end
  else
    args[#args + 1] = 'd'; args[#args + 1] = member
  end
  redis.call('XADD', unpack(args))
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"""

#: Resets the idle time of the entries this consumer still owns (a heartbeat), or sets
#: it to ARGV[3] ms (a release). KEYS: stream. ARGV: group, consumer, idle ms, ids...
#: Returns the ids it touched.
TOUCH = """
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then args[#args + 1] = ARGV[i] end
end
if #args == 4 then return {} end
args[#args + 1] = 'IDLE'; args[#args + 1] = ARGV[3]; args[#args + 1] = 'JUSTID'
return redis.call('XCLAIM', unpack(args))
"""


@attrs.define
class _Flight:
    """An entry handed to a worker and not yet acked or nacked."""

    task_id: TaskID | None
    since: float


class _Holder(actors.Actor):
    """Keeps the broker's own Redis client open; lives in the actor system so that the
    client outlives the broker's background tasks (acks are flushed on the way out)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def on_start(self) -> None:
        await self.nursery.start(self.conn.hold)


class RedisBroker(Broker):
    """Tasks on a Redis Streams queue, run by worker processes (``run_worker``).

    Delivery is at-least-once: a task whose worker dies is run again by another one,
    so make tasks idempotent. See docs/redis.md for the keys, every setting and how to
    inspect dead letters.
    """

    runs_worker_inside = False
    records_shutdown_cancel = False

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        queue: str = "bus",
        prefix: str = "bus",
        group: str = "workers",
        consumer: str | None = None,
        concurrency: int = 100,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: Iterable[Middleware] = (),
        shutdown_timeout: float = 30.0,
        maxlen: int | None = None,
        block: float = 1.0,
        visibility_timeout: float = 60.0,
        heartbeat_interval: float | None = None,
        reap_interval: float | None = None,
        max_deliveries: int | None = 5,
        delay_poll_interval: float = 0.5,
        max_message_bytes: int = 1_048_576,
        secret: bytes | str | None = None,
        cancel_ttl: float = 86_400.0,
        dead_letter_maxlen: int | None = 100_000,
        send_timeout: float = 10.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("block", block),
            ("visibility_timeout", visibility_timeout),
            ("delay_poll_interval", delay_poll_interval),
            ("cancel_ttl", cancel_ttl),
        ):
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if not send_timeout >= 0:
            raise ValueError(f"send_timeout must be >= 0 seconds, not {send_timeout!r}")
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1 or None, not {max_deliveries!r}")
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, not {max_message_bytes!r}")
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be >= 1 or None, not {maxlen!r}")
        if not queue or not prefix or not group:
            raise ValueError("queue, prefix and group must be non-empty strings")
        if result_backend is None:
            result_backend = RedisResultBackend(
                url, prefix=prefix, codec=codec, client_options=client_options
            )
        super().__init__(
            concurrency=concurrency,
            result_backend=result_backend,
            codec=codec,
            middlewares=middlewares,
            shutdown_timeout=shutdown_timeout,
        )
        self.url = url
        self.queue = queue
        self.keys = Keys(prefix, queue)
        self.group = group.encode()
        self.consumer = (
            consumer or f"{socket.gethostname()}-{os.getpid()}-{TaskID.new()[-8:]}"
        ).encode()
        self.maxlen = maxlen
        self.block = float(block)
        self.visibility_timeout = float(visibility_timeout)
        self.heartbeat_interval = heartbeat_interval or self.visibility_timeout / 3
        self.reap_interval = reap_interval or max(0.1, self.visibility_timeout / 4)
        self.max_deliveries = max_deliveries
        self.delay_poll_interval = float(delay_poll_interval)
        self.max_message_bytes = max_message_bytes
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.cancel_ttl_ms = max(1, int(cancel_ttl * 1000))
        self.dead_letter_maxlen = dead_letter_maxlen
        self.send_timeout = float(send_timeout)
        self.client_options = dict(client_options or {})
        self._log = log.bind(actor=f"redis-broker:{queue}", consumer=self.consumer.decode())
        self._reset()

    def _reset(self) -> None:
        self._conn: Connection | None = None
        self._holder: actors.ActorRef | None = None
        self._bg: trio.Nursery | None = None
        self._worker_lock = trio.Lock()
        self._worker_on = False
        self._hand_send, self._hand_recv = trio.open_memory_channel[Delivery](0)
        self._demand = trio.Event()
        self._mover_wake = trio.Event()
        self._inflight: dict[bytes, _Flight] = {}
        self._cancelled: collections.OrderedDict[TaskID, None] = collections.OrderedDict()
        self._reader_scope: trio.CancelScope | None = None
        self._promote: Any = None
        self._touch: Any = None

    # ----------------------------------------------------------------- plumbing

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client (only while the broker runs)."""
        if self._conn is None:
            raise RuntimeError("the Redis broker is not running")
        return self._conn.client

    async def _start(self, nursery: trio.Nursery) -> None:
        self._reset()
        self._bg = nursery
        rb = self.result_backend
        if (
            isinstance(rb, RedisResultBackend)
            and rb.conn is not None
            and rb.url == self.url
            and rb.client_options == self.client_options
        ):
            await rb.conn_ready.wait()
            self._conn = rb.conn  # one client: result writes and acks share pipelines
        else:
            conn = Connection(
                self.url, name="bus-broker", block_seconds=self.block, **self.client_options
            )
            assert self.system is not None
            self._holder = await self.system.spawn(
                lambda: _Holder(conn), name=f"redis-conn-{TaskID.new()[-12:]}"
            )
            self._conn = conn
        client = self._conn.client
        self._promote = client.register_script(PROMOTE)
        self._touch = client.register_script(TOUCH)

    async def _drain(self) -> None:
        if self.workers:
            async with trio.open_nursery() as nursery:
                for w in list(self.workers):
                    nursery.start_soon(w.drain, self.shutdown_timeout)

    async def _stop(self) -> None:
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        conn = self._conn
        if conn is not None:
            with trio.move_on_after(max(1.0, min(self.shutdown_timeout, 5.0))):
                await self._release(list(self._inflight))
                if self._worker_on:
                    with contextlib.suppress(*FAULTS):
                        await self.client.hdel(self.keys.workers, [self.consumer])
                await conn.batcher.flush()
        holder, self._holder = self._holder, None
        if holder is not None and holder.is_alive:
            await holder.stop()
        self._conn = None

    async def _release(self, ids: list[bytes]) -> None:
        """Hand unfinished entries back: make them look idle for longer than the
        visibility timeout, so the next reaper (any worker's) claims them at once."""
        if not ids or self._touch is None:
            return
        idle = int(self.visibility_timeout * 1000) + 1000
        try:
            for i in range(0, len(ids), 200):
                await self._touch(
                    keys=[self.keys.stream],
                    args=[self.group, self.consumer, idle, *ids[i : i + 200]],
                )
        except FAULTS as exc:
            self._log.warning("redis.release_failed", error=repr(exc), entries=len(ids))
        else:
            self._log.info("redis.released", entries=len(ids))

    # ------------------------------------------------------------------ sending

    def _xadd(self, target: Any, data: bytes, sig: bytes) -> Any:
        fields: dict[bytes, bytes] = {F_DATA: data}
        if sig:
            fields[F_SIG] = sig
        if self.maxlen is None:
            return target.xadd(self.keys.stream, fields)
        return target.xadd(
            self.keys.stream,
            fields,
            trim_strategy=PureToken.MAXLEN,
            threshold=self.maxlen,
            trim_operator=PureToken.APPROXIMATELY,
        )

    def _enqueue_op(self, target: Any, message: TaskMessage, data: bytes) -> Any:
        sig = sign(self.secret, data)
        eta = message.eta
        if eta is not None and eta > time.time():
            self._mover_wake.set()
            return target.zadd(self.keys.delayed, {join_member(sig, data): int(eta * 1000)})
        return self._xadd(target, data, sig)

    async def _retrying(self, what: str, fn: Any) -> Any:
        """Run ``fn()`` (a fresh request each time), retrying connection faults for up
        to ``send_timeout`` seconds. A retried XADD may be stored twice: delivery is
        at-least-once anyway."""
        deadline = trio.current_time() + self.send_timeout
        backoff = Backoff()
        while True:
            try:
                return await fn()
            except FAULTS as exc:
                if trio.current_time() >= deadline:
                    raise SendError(f"{what}: Redis is unreachable: {exc}") from exc
                await trio.sleep(min(backoff.next(), max(0.0, deadline - trio.current_time())))

    async def on_send(self, event: Send) -> None:
        client = self.client
        rb = self.result_backend if isinstance(self.result_backend, RedisResultBackend) else None
        gen = rb.live_generation() if rb is not None else None

        async def send() -> Any:
            return await self._enqueue_op(client, event.message, event.data)

        await self._retrying(f"cannot send {event.message.task_name}", send)
        if rb is not None:
            rb.note_sent(event.message.task_id, gen)

    async def kick_many(self, messages: Sequence[TaskMessage]) -> None:
        """Send many messages in pipelines (one round trip per 500): the fast path for
        bulk producers. Middlewares' ``pre_send``/``post_send`` run for each message.
        On failure some of the messages may have been sent."""
        hooks = self.hooks
        prepared: list[tuple[TaskMessage, bytes]] = []
        for m in messages:
            if "pre_send" in hooks.has:
                m = await hooks.transform("pre_send", m)
            prepared.append((m, self._encode(m)))
        client = self.client
        rb = self.result_backend if isinstance(self.result_backend, RedisResultBackend) else None
        gen = rb.live_generation() if rb is not None else None
        for i in range(0, len(prepared), 500):
            chunk = prepared[i : i + 500]

            async def send(chunk: list[tuple[TaskMessage, bytes]] = chunk) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    for m, data in chunk:
                        self._enqueue_op(pipe, m, data)

            await self._retrying("cannot send a batch", send)
            self.stats.sent += len(chunk)
            if rb is not None and gen is not None:
                for m, _ in chunk:
                    rb.note_sent(m.task_id, gen)
        if "post_send" in hooks.has:
            for m, _ in prepared:
                await hooks.run_all("post_send", m)  # sent: never raise now

    # ---------------------------------------------------------------- receiving

    async def _ensure_worker(self) -> None:
        async with self._worker_lock:
            if self._worker_on:
                return
            assert self._bg is not None
            await self._ensure_group()
            await self._bg.start(self._cancel_listener)
            await self._bg.start(self._reader)
            self._bg.start_soon(self._mover)
            self._bg.start_soon(self._heartbeat)
            self._worker_on = True
            self._log.info("redis.worker_started", stream=self.keys.stream.decode())

    async def _ensure_group(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.client.xgroup_create(self.keys.stream, self.group, "0", mkstream=True)
            except StreamDuplicateConsumerGroupError:
                return
            except FAULTS as exc:
                self._log.warning("redis.unreachable", error=repr(exc))
                await trio.sleep(backoff.next())
            else:
                return

    async def on_receive(self, event: Receive) -> tuple[Delivery, ...]:
        if not self._worker_on:
            await self._ensure_worker()
        self._demand.set()
        return (await self._hand_recv.receive(),)

    async def _reader(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            task_status.started()
            await self._read_loop()

    async def _read_loop(self) -> None:
        keys, group, consumer = self.keys, self.group, self.consumer
        stream = keys.stream
        block_ms = max(1, int(self.block * 1000))
        vt_ms = int(self.visibility_timeout * 1000)
        stats = self._hand_recv.statistics
        own_cursor: bytes | None = b"0"  # first re-read our own pending entries
        reap_cursor = b"0-0"
        next_reap = trio.current_time()
        backoff = Backoff()
        while True:
            demand = stats().tasks_waiting_receive
            if demand == 0:
                self._demand = trio.Event()
                await self._demand.wait()
                continue
            client = self.client
            try:
                entries: Sequence[StreamEntry] = ()
                counted = False
                if own_cursor is not None:
                    reply = await client.xreadgroup(
                        group, consumer, {stream: own_cursor}, count=demand
                    )
                    entries = reply.get(stream, ()) if reply else ()
                    own_cursor = _ident(entries[-1]) if entries else None
                    counted = bool(entries)
                elif trio.current_time() >= next_reap:
                    res = await client.xautoclaim(
                        stream, group, consumer, vt_ms, reap_cursor, count=demand
                    )
                    reap_cursor = res[0]
                    entries = [e for e in res[1] if e is not None]
                    if reap_cursor in (b"0-0", "0-0"):
                        reap_cursor = b"0-0"
                        next_reap = trio.current_time() + self.reap_interval
                    counted = bool(entries)
                    if entries:
                        self._log.warning("redis.reclaimed", entries=len(entries))
                if not entries:
                    reply = await client.xreadgroup(
                        group, consumer, {stream: ">"}, count=demand, block=block_ms
                    )
                    entries = reply.get(stream, ()) if reply else ()
                backoff.reset()
                if entries:
                    await self._dispatch(entries, counted)
            except StreamConsumerGroupError as exc:  # the group is gone (Redis lost it)
                self._log.warning("redis.group_missing", error=str(exc))
                await self._ensure_group()
            except FAULTS as exc:
                self._log.warning("redis.read_failed", error=repr(exc))
                await trio.sleep(backoff.next())

    async def _counts(self, ids: list[bytes]) -> dict[bytes, int]:
        """How often each of ``ids`` (pending for this consumer) was delivered."""
        pend = await self.client.xpending(
            self.keys.stream,
            self.group,
            min(ids),
            max(ids),
            len(ids) + 16,
            consumer=self.consumer,
        )
        if isinstance(pend, StreamPending):
            return {}
        out: dict[bytes, int] = {}
        for p in pend:
            if isinstance(p, StreamPendingExt) and isinstance(p.identifier, bytes):
                out[p.identifier] = p.delivered
        return out

    async def _dispatch(self, entries: Sequence[StreamEntry], counted: bool) -> None:
        counts = await self._counts([_ident(e) for e in entries]) if counted else {}
        codec = self.codec
        secret, max_bytes, max_del = self.secret, self.max_message_bytes, self.max_deliveries
        ready: list[Delivery] = []
        dead: list[tuple[bytes, bytes, str, int, TaskMessage | None]] = []
        for e in entries:
            eid = _ident(e)
            n = counts.get(eid, 1)
            data, reason = check_entry(e.field_values, secret, max_bytes)
            message: TaskMessage | None = None
            if reason is None:
                try:
                    message = codec.decode_message(data)
                except DecodeError:
                    message = None  # the worker rejects it with the reason
                if over_delivered(n, max_del):
                    reason = f"delivered {n} times, more than max_deliveries={max_del}"
            if reason is not None:
                dead.append((eid, data, reason, n, message))
                continue
            ready.append(Delivery(data, tag=eid, message=message, deliveries=n))
        if dead:
            await self._dead_letter_many(dead)
        tids = [d.message.task_id for d in ready if d.message is not None]
        if tids:
            marks = await self.client.mget([self.keys.cancel_marker(t) for t in tids])
            for tid, mark in zip(tids, marks, strict=True):
                if mark is not None:
                    self._remember_cancel(tid)
        send = self._hand_send.send
        inflight = self._inflight
        for d in ready:
            now = trio.current_time()
            inflight[d.tag] = _Flight(d.message.task_id if d.message else None, now)
            try:
                await send(d)
            except BaseException:
                inflight.pop(d.tag, None)
                raise

    # ------------------------------------------------------------- ack / nack

    async def on_ack(self, event: Ack) -> None:
        eid = event.delivery.tag
        self._inflight.pop(eid, None)
        stream, group = self.keys.stream, self.group
        assert self._conn is not None
        self._conn.batcher.submit(lambda p: p.xack(stream, group, [eid]), retry=True)
        await trio.lowlevel.checkpoint()

    async def on_nack(self, event: Nack) -> None:
        d = event.delivery
        eid = d.tag
        self._inflight.pop(eid, None)
        client = self.client
        try:
            if event.requeue is not None:
                msg = event.requeue
                data = self.codec.encode_message(msg)
                if event.delay > 0:
                    msg = attrs.evolve(msg, eta=time.time() + event.delay)
                async with client.pipeline(transaction=True) as pipe:
                    self._enqueue_op(pipe, msg, data)
                    pipe.xack(self.keys.stream, self.group, [eid])
            else:
                message = d.message
                await self._dead_letter_many([(eid, d.data, event.reason, d.deliveries, message)])
        except FAULTS as exc:
            self._log.warning("redis.nack_failed", error=repr(exc), reason=event.reason)

    async def _dead_letter_many(
        self, dead: list[tuple[bytes, bytes, str, int, TaskMessage | None]]
    ) -> None:
        client = self.client
        keys = self.keys
        trim: dict[str, Any] = {}
        if self.dead_letter_maxlen is not None:
            trim = {
                "trim_strategy": PureToken.MAXLEN,
                "threshold": self.dead_letter_maxlen,
                "trim_operator": PureToken.APPROXIMATELY,
            }
        now = str(time.time())
        async with client.pipeline(transaction=True) as pipe:
            for eid, data, reason, n, _ in dead:
                pipe.xadd(
                    keys.dead,
                    {
                        b"reason": reason,
                        b"data": data,
                        b"id": eid,
                        b"queue": self.queue,
                        b"deliveries": n,
                        b"time": now,
                    },
                    **trim,
                )
            pipe.xack(keys.stream, self.group, [d[0] for d in dead])
        for eid, _, reason, _, message in dead:
            self._log.error(
                "task.dead_lettered",
                entry=eid.decode(),
                reason=reason,
                task_id=message.task_id if message else None,
                task_name=message.task_name if message else None,
            )
            if message is not None and "max_deliveries" in reason:
                err = RemoteError("bus.DeadLettered", reason)
                result: TaskResult[Any] = TaskResult(
                    message.task_id, TaskStatus.FAILURE, None, err, 0.0, message.labels
                )
                try:
                    await self.result_backend.set_result(message.task_id, result)
                except Exception:
                    self._log.exception("result.store_failed", task_id=message.task_id)

    # ------------------------------------------------------------ cancellation

    def _remember_cancel(self, tid: TaskID) -> None:
        c = self._cancelled
        c[tid] = None
        c.move_to_end(tid)
        while len(c) > 100_000:
            c.popitem(last=False)

    def is_cancelled(self, task_id: TaskID) -> bool:
        return task_id in self._cancelled

    async def on_cancel(self, event: Cancel) -> None:
        """Mark the task cancelled (a key with ``cancel_ttl``), announce it to every
        worker (which cancels it if it runs there), and store a CANCELLED result unless
        a result is stored already: a queued task then never starts, and its waiters
        wake now."""
        tid = event.task_id
        self._cancel_local(tid)
        keys = self.keys
        client = self.client

        async def mark() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(keys.cancel_marker(tid), b"1", px=self.cancel_ttl_ms)
                pipe.publish(keys.cancel_channel, tid.encode())

        await self._retrying(f"cannot cancel {tid}", mark)
        err = RemoteError("bus.Cancelled", "cancelled before it finished")
        result: TaskResult[Any] = TaskResult(tid, TaskStatus.CANCELLED, None, err, 0.0, {})
        rb = self.result_backend
        if isinstance(rb, RedisResultBackend):
            await rb.set_result_if_absent(tid, result)
        elif not await rb.is_ready(tid):
            await rb.set_result(tid, result)

    async def _cancel_listener(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        channel = self.keys.cancel_channel
        backoff = Backoff()
        started = False
        while True:
            try:
                async with PubSub[bytes](
                    self.client.connection_pool, channels=[channel], unsubscription_timeout=0.005
                ) as ps:
                    while True:
                        msg = await ps.get_message()
                        if msg is None:
                            continue
                        if msg["type"] == "subscribe":
                            backoff.reset()
                            if not started:
                                started = True
                                task_status.started()
                            continue
                        data = msg["data"]
                        if msg["type"] != "message" or not isinstance(data, bytes):
                            continue
                        try:
                            tid = TaskID.parse(data.decode("ascii"))
                        except (UnicodeDecodeError, ValueError):
                            continue
                        self._remember_cancel(tid)
                        if self._cancel_local(tid):
                            self._log.info("task.cancel_requested", task_id=tid)
            except FAULTS as exc:
                self._log.warning("redis.cancel_subscription_lost", error=repr(exc))
                await trio.sleep(backoff.next())

    # ------------------------------------------------------------ background

    async def _mover(self) -> None:
        """Moves due delayed messages into the stream (atomic in Lua, so any number of
        workers may run it at once)."""
        keys = self.keys
        backoff = Backoff()
        while True:
            wait = self.delay_poll_interval
            try:
                moved, nxt = await self._promote(
                    keys=[keys.delayed, keys.stream],
                    args=[int(time.time() * 1000), 200, self.maxlen or 0],
                )
                backoff.reset()
                if moved >= 200:
                    wait = 0.0
                elif nxt is not None:
                    wait = min(wait, max(0.0, float(nxt) / 1000 - time.time()))
            except FAULTS as exc:
                self._log.warning("redis.mover_failed", error=repr(exc))
                wait = backoff.next()
            with trio.move_on_after(wait):
                await self._mover_wake.wait()
            self._mover_wake = trio.Event()

    def _running_ids(self) -> set[TaskID]:
        ids: set[TaskID] = set()
        for w in self.workers:
            ids.update(w.running)
        return ids

    async def _heartbeat(self) -> None:
        """Keeps the entries of running tasks fresh (idle time reset) so that no reaper
        takes them while this worker is alive; only entries still owned are touched."""
        backoff = Backoff()
        while True:
            try:
                # Presence for `bus inspect`, also while idle (a blocked XREADGROUP
                # does not refresh a consumer's idle time on Redis 7.0).
                await self.client.hset(self.keys.workers, {self.consumer: str(time.time())})
            except FAULTS as exc:
                self._log.warning("redis.heartbeat_failed", error=repr(exc))
            await trio.sleep(self.heartbeat_interval)
            running = self._running_ids()
            fresh = trio.current_time() - self.visibility_timeout / 2
            ids = [
                eid
                for eid, f in self._inflight.items()
                if f.since > fresh or (f.task_id is not None and f.task_id in running)
            ]
            try:
                for i in range(0, len(ids), 200):
                    chunk = ids[i : i + 200]
                    touched = await self._touch(
                        keys=[self.keys.stream], args=[self.group, self.consumer, 0, *chunk]
                    )
                    lost = set(chunk) - set(touched or ())
                    for eid in lost:
                        f = self._inflight.pop(eid, None)
                        self._log.warning(
                            "task.ownership_lost",
                            entry=eid.decode(),
                            task_id=f.task_id if f else None,
                        )
                backoff.reset()
            except FAULTS as exc:
                self._log.warning("redis.heartbeat_failed", error=repr(exc))
                await trio.sleep(backoff.next())

    # ------------------------------------------------------------- inspection

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters, as dicts: ``id`` (dead-letter entry id),
        ``reason``, ``task_name`` and ``task_id`` (``None`` when undecodable), ``entry``
        (the original stream id), ``deliveries``, ``time`` (Unix) and ``data`` (bytes)."""
        entries = await self.client.xrange(self.keys.dead, "-", "+", count=limit)
        return [self._dead_dict(e) for e in entries]

    def _dead_dict(self, e: StreamEntry) -> dict[str, Any]:
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in e.field_values.items()}

        def text(key: str) -> str:
            v = f.get(key, b"")
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

        data = f.get("data", b"")
        data = data if isinstance(data, bytes) else str(data).encode()
        try:
            msg: TaskMessage | None = self.codec.decode_message(data)
        except DecodeError:
            msg = None
        return {
            "id": _ident(e).decode(),
            "reason": text("reason"),
            "task_name": msg.task_name if msg else None,
            "task_id": str(msg.task_id) if msg else None,
            "entry": text("id"),
            "deliveries": int(text("deliveries") or 0),
            "time": float(text("time") or 0),
            "data": data,
        }

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Send up to ``limit`` of the oldest dead letters back to the queue, as their
        first delivery, and remove them from the dead-letter stream. Entries that were
        dead-lettered for a bad signature are left where they are (requeueing would
        sign what someone else wrote). Returns how many were requeued."""
        entries = await self.client.xrange(self.keys.dead, "-", "+", count=limit)
        moved = []
        async with self.client.pipeline(transaction=True) as pipe:
            for e in entries:
                d = self._dead_dict(e)
                if "signature" in d["reason"]:
                    continue
                self._xadd(pipe, d["data"], sign(self.secret, d["data"]))
                moved.append(_ident(e))
            if moved:
                pipe.xdel(self.keys.dead, moved)
        self._log.info("dead_letters.requeued", count=len(moved))
        return len(moved)

    async def purge_dead_letters(self) -> int:
        """Delete the dead-letter stream; returns how many entries it held."""
        async with self.client.pipeline(transaction=True) as pipe:
            n = pipe.xlen(self.keys.dead)
            pipe.delete([self.keys.dead])
        count = int(await n)
        self._log.info("dead_letters.purged", count=count)
        return count

    async def inspect(self) -> dict[str, Any]:
        """Numbers for operators: ``queued`` (not yet delivered to any worker),
        ``pending`` (delivered, not acknowledged) in all and per consumer, ``delayed``,
        ``dead_letters``, and ``workers``: each consumer with its pending count, the age
        of its last heartbeat (workers write one every ``heartbeat_interval``, busy or
        idle) and ``live`` (a heartbeat within two intervals)."""
        client, keys = self.client, self.keys
        async with client.pipeline(transaction=False) as pipe:
            length = pipe.xlen(keys.stream)
            delayed = pipe.zcard(keys.delayed)
            dead = pipe.xlen(keys.dead)
            presence = pipe.hgetall(keys.workers)
        groups: Any = ()
        consumers: Any = ()
        try:
            groups = await client.xinfo_groups(keys.stream)
            consumers = await client.xinfo_consumers(keys.stream, self.group)
        except (coredis.exceptions.ResponseError, StreamConsumerGroupError):
            pass  # no stream or no group yet: nothing was delivered
        group = next((g for g in groups if g.get(b"name") == self.group), None)
        queued = int(await length)
        pending = 0
        if group is not None:
            pending = int(group.get(b"pending") or 0)
            lag = group.get(b"lag")
            queued = int(lag) if lag is not None else max(0, queued - pending)
        now = time.time()
        beats = {
            (k if isinstance(k, bytes) else str(k).encode()): float(v)
            for k, v in dict(await presence).items()
        }
        seen: dict[bytes, dict[str, Any]] = {}
        for c in consumers:
            name = c.get(b"name") or b"?"
            seen[name] = {"pending": int(c.get(b"pending") or 0)}
        workers = []
        for name in sorted(set(seen) | set(beats)):
            beat = beats.get(name)
            age = None if beat is None else round(max(0.0, now - beat), 3)
            workers.append(
                {
                    "consumer": name.decode("utf-8", "replace"),
                    "pending": seen.get(name, {}).get("pending", 0),
                    "heartbeat_age_seconds": age,
                    # Heartbeats come every heartbeat_interval: two missed is gone.
                    "live": age is not None and age < 2 * self.heartbeat_interval + 1,
                }
            )
        return {
            "queue": self.queue,
            "stream": keys.stream.decode(),
            "queued": queued,
            "pending": pending,
            "pending_per_consumer": {w["consumer"]: w["pending"] for w in workers},
            "delayed": int(await delayed),
            "dead_letters": int(await dead),
            "workers": workers,
            "live_workers": sum(1 for w in workers if w["live"]),
        }


def _ident(e: StreamEntry) -> bytes:
    i = e.identifier
    return i if isinstance(i, bytes) else i.encode()
