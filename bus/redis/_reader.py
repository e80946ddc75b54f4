"""The stream reader: a child of the Redis broker actor that feeds this process's
workers.

It owns the in-flight entries (read and not yet finished), a blocking connection of
its own for ``XREADGROUP ... BLOCK``, the reclaiming of abandoned entries
(``XAUTOCLAIM``) and the heartbeat that keeps the entries of running tasks fresh and
this worker listed. Deliveries go to the workers through a zero-buffer channel whose
receive ends it lends as leases: it reads only as many entries as runners wait for.
Its state outlives restarts of the actor (a lost connection is a failure, restarted
with backoff), so leases stay valid.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._codec import Codec, DecodeError
from bus._ids import TaskID
from bus._message import TaskMessage
from bus._protocol import ChannelLease, Delivery, Lease
from bus.redis._client import Connection, ConnectionLost, RedisError, ReplyError
from bus.redis._logic import F_COUNT, Keys, check_entry, over_delivered
from bus.redis._pool import Lent, lend
from bus.redis._scripts import DEAD, HANDBACK, TOUCH
from bus.redis._settings import RedisSettings

__all__ = ["Cancelled", "Done", "Lend", "ReaderState", "StreamReaderActor"]

log = get_logger("bus.redis")


@attrs.frozen
class Lend:
    """Ask: a lease on the reader's deliveries for a worker of ``max_messages`` runners."""

    max_messages: int


@attrs.frozen
class Done:
    """Tell (inline): the entry ``eid`` is finished (acked, nacked or handed back)."""

    eid: bytes


@attrs.frozen
class Cancelled:
    """Tell (inline): ``task_id`` was cancelled; do not hand it out."""

    task_id: TaskID


@attrs.frozen
class InFlight:
    """Ask: the task ids of the entries in flight (running here)."""


@attrs.define
class Flight:
    """An entry handed to a worker and not yet finished."""

    task_id: TaskID | None
    since: float


class ReaderState:
    """What survives a restart of the reader: the hand-off channel (leases hold its
    receive clones), the in-flight entries, the cancelled ids, demand."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[Delivery](0)
        self.inflight: dict[bytes, Flight] = {}
        self.cancelled: dict[TaskID, None] = {}
        self.demand = trio.Event()
        self.leases = 0

    def wake(self) -> None:
        self.demand.set()

    def remember_cancel(self, tid: TaskID) -> None:
        c = self.cancelled
        c[tid] = None
        if len(c) > 100_000:
            del c[next(iter(c))]


class _ReaderLease(ChannelLease):
    """A worker's lease: each ``receive`` tells the reader a runner waits."""

    def __init__(self, state: ReaderState, dead_letter_failures: bool) -> None:
        super().__init__(state.recv.clone(), redeliver_interrupted=True)
        self.dead_letter_failures = dead_letter_failures
        self._state = state
        self._open = True
        state.leases += 1

    async def receive(self) -> Delivery:
        self._state.wake()
        return await super().receive()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._state.leases -= 1
            self._state.wake()
        super().close()


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """``(id, fields)`` pairs of an XREADGROUP / XRANGE / XAUTOCLAIM reply section."""
    out: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    for item in reply or ():
        if not isinstance(item, list) or not item:
            continue
        eid = item[0]
        raw = item[1] if len(item) > 1 else None
        fields = None
        if isinstance(raw, list):
            fields = {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
        out.append((eid, fields))
    return out


class StreamReaderActor(actors.Actor):
    """Reads the queue's stream for this process's workers (see the module docstring)."""

    expected_failures = (RedisError, OSError)

    def __init__(
        self,
        settings: RedisSettings,
        keys: Keys,
        codec: Codec,
        conn_ref: actors.ActorRef,
        results: Any,
        state: ReaderState,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.codec = codec
        self.conn_ref = conn_ref
        self.results = results
        self.state = state
        self.group = settings.group.encode()
        self.consumer = settings.consumer.encode()
        self.blocking: Connection | None = None
        self._read_scope: trio.CancelScope | None = None
        self._held: list[Delivery] = []  # read, not yet handed to a runner

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        conn = await Connection.connect(self.settings.url, name="bus-reader")
        self.blocking = conn
        await self.nursery.start(conn.run)
        await self._ensure_group(conn)
        self.nursery.start_soon(self._read_forever)
        self.nursery.start_soon(self._heartbeat)

    async def _ensure_group(self, conn: Connection) -> None:
        try:
            await conn.execute("XGROUP", "CREATE", self.keys.stream, self.group, "0", "MKSTREAM")
        except ReplyError as exc:
            if exc.code != "BUSYGROUP":
                raise

    async def on_stop(self) -> None:
        """Hand back everything this consumer still owns, so a clean stop leaves
        nothing pending: entries read and not handed to a runner, and entries no worker
        finished (a worker cancelled at once). Acks queued before are applied first
        (the same connection, in order), so nothing finished is handed back."""
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self.blocking is not None:
            # Closed first: a blocked XREADGROUP then delivers nothing more to us.
            await self.blocking.aclose()
        state = self.state
        started = set(state.inflight)
        state.inflight.clear()
        self._held = []
        with trio.move_on_after(max(1.0, min(self.settings.send_timeout, 5.0))):
            try:
                lent = await lend(self.conn_ref, timeout=2)
                while True:
                    reply = await lent.conn.execute(
                        "XPENDING", self.keys.stream, self.group, "-", "+", 1000, self.consumer
                    )
                    ids = [p[0] for p in reply or () if isinstance(p, list) and p]
                    if not ids or await self.hand_back([(i, i in started) for i in ids]) == 0:
                        break
                await self._leave()
            except RedisError as exc:
                log.warning("redis.stop_incomplete", error=str(exc), actor=self.name)

    async def _leave(self) -> None:
        """A clean stop: drop this worker from the presence set and, owning nothing
        now, from the consumer group."""
        conn = (await lend(self.conn_ref, timeout=2)).conn
        await conn.execute("ZREM", self.keys.workers, self.consumer)
        pending = await conn.execute(
            "XPENDING", self.keys.stream, self.group, "-", "+", 1, self.consumer
        )
        if not pending:
            await conn.execute("XGROUP", "DELCONSUMER", self.keys.stream, self.group, self.consumer)

    # --------------------------------------------------------------- handlers

    @actors.handles(Lend)
    def lend(self, msg: Lend) -> Lease:
        return _ReaderLease(self.state, self.settings.dead_letter_failures)

    @actors.handles(Done, inline=True)
    def done(self, msg: Done) -> None:
        self.state.inflight.pop(msg.eid, None)

    @actors.handles(Cancelled, inline=True)
    def cancelled(self, msg: Cancelled) -> None:
        self.state.remember_cancel(msg.task_id)

    @actors.handles(InFlight)
    def in_flight(self, msg: InFlight) -> list[TaskID]:
        return [f.task_id for f in self.state.inflight.values() if f.task_id is not None]

    # --------------------------------------------------------- handing back

    async def hand_back(self, ids: list[tuple[bytes, bool]]) -> int:
        """Give entries this consumer owns back to the queue at once (HANDBACK)."""
        if not ids:
            return 0
        lent = await lend(self.conn_ref, timeout=5)
        args: list[Any] = [self.group, self.consumer, self.settings.maxlen or 0]
        for eid, started in ids:
            args += [eid, 1 if started else 0]
        n = await HANDBACK.run(lent.conn, keys=[self.keys.stream], args=args)
        log.info("redis.handed_back", entries=n, actor=self.name)
        return int(n) if isinstance(n, int) else 0

    # ------------------------------------------------------------- the reader

    async def _shared(self) -> Connection:
        lent: Lent = await lend(self.conn_ref)
        return lent.conn

    async def _read_forever(self) -> None:
        with trio.CancelScope() as scope:
            self._read_scope = scope
            await self._read_loop()

    async def _read_loop(self) -> None:
        conn = self.blocking
        assert conn is not None
        state = self.state
        stream, group, consumer = self.keys.stream, self.group, self.consumer
        settings = self.settings
        block_ms = max(1, int(settings.block * 1000))
        block_timeout = settings.block + settings.url.command_timeout
        vt_ms = int(settings.visibility_timeout * 1000)
        own_cursor: bytes | None = b"0"  # first re-read our own pending entries
        reap_cursor = b"0-0"
        next_reap = trio.current_time()
        stats = state.recv.statistics
        while True:
            demand = stats().tasks_waiting_receive
            if demand == 0 or state.leases == 0:
                state.demand = trio.Event()
                await state.demand.wait()
                continue
            entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
            counted = False
            if own_cursor is not None:
                reply = await conn.execute(
                    "XREADGROUP",
                    "GROUP",
                    group,
                    consumer,
                    "COUNT",
                    demand,
                    "STREAMS",
                    stream,
                    own_cursor,
                )
                entries = _entries(reply[0][1]) if reply else []
                own_cursor = entries[-1][0] if entries else None
                counted = bool(entries)
            elif trio.current_time() >= next_reap:
                reply = await conn.execute(
                    "XAUTOCLAIM", stream, group, consumer, vt_ms, reap_cursor, "COUNT", demand
                )
                reap_cursor = reply[0]
                entries = _entries(reply[1])
                if reap_cursor in (b"0-0", "0-0"):
                    reap_cursor = b"0-0"
                    next_reap = trio.current_time() + settings.reap
                counted = bool(entries)
                if entries:
                    log.warning("redis.reclaimed", entries=len(entries), actor=self.name)
            if not entries:
                reply = await conn.execute(
                    "XREADGROUP",
                    "GROUP",
                    group,
                    consumer,
                    "COUNT",
                    demand,
                    "BLOCK",
                    block_ms,
                    "STREAMS",
                    stream,
                    ">",
                    timeout=block_timeout,
                )
                entries = _entries(reply[0][1]) if reply else []
            if entries:
                await self._dispatch(entries, counted)

    async def _counts(self, conn: Connection, ids: list[bytes]) -> dict[bytes, int]:
        """How often each of ``ids`` (pending for this consumer) was delivered."""
        reply = await conn.execute(
            "XPENDING",
            self.keys.stream,
            self.group,
            min(ids),
            max(ids),
            len(ids) + 16,
            self.consumer,
        )
        out: dict[bytes, int] = {}
        for p in reply or ():
            if isinstance(p, list) and len(p) >= 4:
                out[p[0]] = int(p[3])
        return out

    async def _dispatch(
        self, entries: list[tuple[bytes, dict[bytes, bytes] | None]], counted: bool
    ) -> None:
        settings, codec = self.settings, self.codec
        conn = await self._shared()
        counts = await self._counts(conn, [e for e, _ in entries]) if counted else {}
        ready: list[Delivery] = []
        dead: list[tuple[bytes, bytes, str, int, TaskMessage | None]] = []
        inflight = self.state.inflight
        for eid, fields in entries:
            if eid in inflight:
                continue  # runs here already (re-read after a reconnect): not twice
            n = counts.get(eid, 1)
            if fields:
                extra = fields.get(F_COUNT)
                if extra is not None and extra.isdigit():
                    n += int(extra)
            data, reason = check_entry(fields, settings.secret, settings.max_message_bytes)
            message: TaskMessage | None = None
            if reason is None:
                try:
                    message = codec.decode_message(data)
                except DecodeError:
                    message = None  # the worker rejects it, with the reason
                if over_delivered(n, settings.max_deliveries):
                    reason = (
                        f"delivered {n} times, more than max_deliveries={settings.max_deliveries}"
                    )
            if reason is not None:
                dead.append((eid, data, reason, n, message))
                continue
            ready.append(Delivery(data, tag=eid, message=message, deliveries=n))
        if dead:
            await self.dead_letter(conn, dead)
        tids = [d.message.task_id for d in ready if d.message is not None]
        state = self.state
        if tids:
            marks = await conn.execute("MGET", *(self.keys.cancel_marker(t) for t in tids))
            for tid, mark in zip(tids, marks, strict=True):
                if mark is not None:
                    state.remember_cancel(tid)
        skipped: list[Delivery] = []
        for d in ready:
            if d.message is not None and d.message.task_id in state.cancelled:
                skipped.append(d)  # cancelled while queued: its result is stored
        if skipped:
            from bus.redis._scripts import RELEASE

            releases = [
                RELEASE.command(keys=[self.keys.unique(d.message.labels["unique_key"])],
                                args=[d.message.task_id])
                for d in skipped
                if d.message is not None and "unique_key" in d.message.labels
            ]  # fmt: skip
            await conn.pipeline(
                [("XACK", self.keys.stream, self.group, d.tag) for d in skipped]
                + [("XDEL", self.keys.stream, d.tag) for d in skipped]
                + releases
            )
            ready = [d for d in ready if d not in skipped]
        self._held = list(ready)
        send = state.send.send
        try:
            for d in ready:
                inflight[d.tag] = Flight(d.message.task_id if d.message else None, time.monotonic())
                try:
                    await send(d)
                except BaseException:
                    inflight.pop(d.tag, None)
                    raise
                self._held.remove(d)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # No worker takes deliveries any more: hand what is held back at once.
            held, self._held = self._held, []
            await self.hand_back([(d.tag, False) for d in held])

    async def dead_letter(
        self, conn: Connection, dead: list[tuple[bytes, bytes, str, int, TaskMessage | None]]
    ) -> None:
        from bus._message import RemoteError, TaskResult, TaskStatus

        keys, settings = self.keys, self.settings
        now = str(time.time())
        commands = []
        for eid, data, reason, n, _ in dead:
            commands.append(
                DEAD.command(
                    keys=[keys.stream, keys.dead],
                    args=[
                        self.group,
                        self.consumer,
                        eid,
                        settings.dead_letter_maxlen or 0,
                        b"reason",
                        reason,
                        b"data",
                        data,
                        b"id",
                        eid,
                        b"queue",
                        settings.queue,
                        b"deliveries",
                        n,
                        b"time",
                        now,
                    ],
                )
            )
        replies = await conn.pipeline(commands)
        from bus.redis._client import rerun_noscript

        await rerun_noscript(conn, commands, replies)
        for eid, _, reason, _, message in dead:
            log.error(
                "task.dead_lettered",
                entry=eid.decode(),
                reason=reason,
                task_id=message.task_id if message else None,
                task_name=message.task_name if message else None,
                actor=self.name,
            )
            if message is not None and "max_deliveries" in reason:
                err = RemoteError("bus.DeadLettered", reason)
                result: TaskResult[Any] = TaskResult(
                    message.task_id, TaskStatus.FAILURE, None, err, 0.0, message.labels
                )
                try:
                    await self.results.set_result(message.task_id, result)
                except Exception:
                    log.exception("result.store_failed", task_id=message.task_id)

    # ------------------------------------------------------------- heartbeat

    async def _heartbeat(self) -> None:
        settings, keys = self.settings, self.keys
        interval = settings.heartbeat
        beats = 0
        while True:
            try:
                conn = await self._shared()
                now = time.time()
                await conn.pipeline(
                    [
                        ("ZADD", keys.workers, now, self.consumer),
                        # A worker that stopped beating (crashed) leaves the set.
                        ("ZREMRANGEBYSCORE", keys.workers, "-inf", now - 3 * interval - 1),
                    ]
                )
                ids = list(self.state.inflight)
                for i in range(0, len(ids), 200):
                    chunk = ids[i : i + 200]
                    touched = await TOUCH.run(
                        conn, keys=[keys.stream], args=[self.group, self.consumer, *chunk]
                    )
                    lost = set(chunk) - set(touched or ())
                    for eid in lost:
                        f = self.state.inflight.pop(eid, None)
                        log.warning(
                            "task.ownership_lost",
                            entry=eid.decode(),
                            task_id=f.task_id if f else None,
                            actor=self.name,
                        )
                beats += 1
                if beats % 10 == 1:
                    await self._prune_consumers(conn, now, interval)
            except (ConnectionLost, RedisError) as exc:
                log.warning("redis.heartbeat_failed", error=str(exc), actor=self.name)
            await trio.sleep(interval)

    async def _prune_consumers(self, conn: Connection, now: float, interval: float) -> None:
        """Remove consumers of the group that own nothing and are not alive."""
        keys = self.keys
        try:
            consumers = await conn.execute("XINFO", "CONSUMERS", keys.stream, self.group)
        except ReplyError:
            return
        live = await conn.execute("ZRANGE", keys.workers, 0, -1)
        alive = set(live or ())
        idle_ms = 3 * interval * 1000
        for info in consumers or ():
            fields = {info[i]: info[i + 1] for i in range(0, len(info) - 1, 2)}
            name = fields.get(b"name")
            pending = fields.get(b"pending", 0)
            idle = fields.get(b"idle", 0)
            if (
                isinstance(name, bytes)
                and name != self.consumer
                and name not in alive
                and pending == 0
                and isinstance(idle, int)
                and idle > idle_ms
            ):
                await conn.execute("XGROUP", "DELCONSUMER", keys.stream, self.group, name)
