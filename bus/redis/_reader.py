"""The stream reader: a child of the Redis broker actor that feeds this process's
workers of one set of queues.

It owns the entries it read and has not finished, a blocking connection of its own for
``XREADGROUP ... BLOCK``, the reclaiming of abandoned entries (``XAUTOCLAIM``) and the
heartbeat that keeps its entries fresh and this worker listed. Deliveries go to the
workers through a zero-buffer channel whose receive ends it lends as leases: it reads
only as many entries as runners wait for. Its state outlives restarts of the actor (a
lost connection is a failure, restarted with backoff), so leases stay valid.

Queues and priorities. Each queue has a stream per priority level (level 0 is the
queue's one stream of old, ``Keys.level_stream``). One ``XREADGROUP`` reads them all
(``STREAMS s9 ... s0 > ... >``, the most urgent first, each at most as many entries as
runners wait for, and only levels of which fewer are held); what it read is *held* by
queue and level (:class:`~bus._ready.ReadyQueues`) and handed to runners by priority
(:class:`~bus._priority.PriorityPicker`). Held entries are read ahead, at most one
read's worth per level: they are pending for this consumer and kept fresh by the
heartbeat like running ones.

Limits. A delivery whose task has a ``rate_limit`` or ``max_running`` takes its token
and its slot (Lua, atomic on the server, shared by every process) when a runner waits
for it; if it may not start, it is set aside (:class:`~bus._limits.Parking`): still
pending for this consumer, refreshed by the heartbeat, handed back at a stop like any
held entry, and tried again when its limit may let it (the bucket says when; a slot is
asked for again every ``limit_poll_interval``). Meanwhile the reader goes on reading,
so runners run other tasks (up to ``limit_backlog`` entries set aside). A slot is a
lease that expires ``visibility_timeout`` after its last refresh: the heartbeat
refreshes the slots of running tasks, the broker actor gives a slot back with the
task's ack, and a dead worker's slots come back when their leases expire.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._codec import Codec, DecodeError
from bus._ids import TaskID
from bus._limits import Parking, TaskLimits
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._protocol import ChannelLease, Delivery, Lease
from bus._ready import Consumer, ReadyQueues
from bus.redis._client import (
    Command,
    Connection,
    ConnectionLost,
    RedisError,
    ReplyError,
    ReplyTooLarge,
    rerun_noscript,
)
from bus.redis._limits import bucket_args, limit_redis_key, running_redis_key
from bus.redis._logic import (
    F_DATA,
    F_SIG,
    Entry,
    Keys,
    check_entry,
    claim_ttl_ms,
    count_of,
    marker_ok,
    over_delivered,
    sign_count,
    too_old,
    unique_value,
)
from bus.redis._pool import Lent, lend
from bus.redis._scripts import (
    ACQUIRE_SLOT,
    REFRESH_SLOT,
    RELEASE,
    RELEASE_SLOT,
    SWEEP_LARGE,
    TAKE_TOKEN,
    TOUCH,
    Handback,
    dead_command,
    handback_command,
)
from bus.redis._settings import RedisSettings

if TYPE_CHECKING:
    from bus._task import Task

__all__ = ["Cancelled", "Done", "InFlight", "Lend", "ReaderState", "StreamReaderActor"]

log = get_logger("bus.redis")


@attrs.frozen
class Lend:
    """Ask: a lease on the reader's deliveries for a worker of ``max_messages`` runners."""

    max_messages: int


@attrs.frozen
class Done:
    """Tell (inline): the entries behind ``tags`` are finished (acked, nacked or handed
    back): one message for a whole confirmed write."""

    tags: tuple[Any, ...]


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
    #: The claim of its attempt (``Keys.ran``), moved to the copy if it is handed back.
    claim: bytes | None = None


@attrs.frozen
class StreamRef:
    """One stream a reader reads: a level of a queue."""

    key: bytes
    queue: str
    level: int
    keys: Keys


class ReaderState:
    """What survives a restart of the reader: the hand-off channel (leases hold its
    receive clones), the entries in flight, the concurrency slots they hold, the
    cancelled ids, demand."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[Delivery](0)
        self.inflight: dict[Any, Flight] = {}
        #: Slots (``max_running``) held by deliveries in flight: tag -> (key, token).
        self.slots: dict[Any, tuple[bytes, str]] = {}
        self.cancelled: dict[TaskID, None] = {}
        self.demand = trio.Event()
        self.leases = 0
        #: The runners of the open leases (their ``max_messages``, added up).
        self.capacity = 0
        #: At most this many entries per stream in one read (``None``: as many as
        #: runners wait for): halved each time a read's reply was larger than the
        #: client's ``max_reply_bytes``.
        self.count_cap: int | None = None

    def wake(self) -> None:
        self.demand.set()

    def remember_cancel(self, tid: TaskID) -> None:
        c = self.cancelled
        c[tid] = None
        if len(c) > 100_000:
            del c[next(iter(c))]

    def release_command(self, tag: Any) -> Command | None:
        """The command that gives back the slot ``tag`` holds (``None``: it holds none);
        the broker actor writes it with the entry's ack."""
        held = self.slots.pop(tag, None)
        if held is None:
            return None
        return RELEASE_SLOT.command(keys=[held[0]], args=[held[1]])


class _ReaderLease(ChannelLease):
    """A worker's lease: each ``receive`` tells the reader a runner waits. The channel
    has no buffer and the reader reads only for runners that wait: nothing is ready
    ahead (``ready_ahead``)."""

    ready_ahead = False

    def __init__(
        self, state: ReaderState, dead_letter_failures: bool, max_messages: int = 1
    ) -> None:
        super().__init__(state.recv.clone(), redeliver_interrupted=True)
        self.dead_letter_failures = dead_letter_failures
        self._state = state
        self._open = True
        self._runners = max(1, max_messages)
        state.leases += 1
        state.capacity += self._runners

    async def receive(self) -> Delivery:
        self._state.wake()
        return await self._recv.receive()  # (no skip: the reader drops what is cancelled)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._state.leases -= 1
            self._state.capacity -= self._runners
            self._state.wake()
        super().close()


def _touched(reply: Any) -> tuple[set[bytes], set[bytes]]:
    """TOUCH's reply: the ids it touched, and those pending for another consumer
    (:class:`RedisError` for anything else: the heartbeat tries again)."""
    if (
        not isinstance(reply, list)
        or len(reply) != 2
        or not all(isinstance(part, list) for part in reply)
    ):
        raise RedisError(f"TOUCH answered {reply!r:.200}")
    return set(reply[0]), set(reply[1])


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


_Raw = tuple[StreamRef, bytes, "dict[bytes, bytes] | None"]

#: How late Redis may end a blocking read (its timeouts are checked on a server tick).
_TICK = 0.1
#: How long a read waits for more runners when few wait and the others are busy.
_GATHER = 0.001
#: Read-ahead (the next entries read while every runner is busy, so the runners that
#: come back find them here instead of waiting for a read and a claim): only while
#: runners came back within _QUICK of all being busy (short tasks) and the last
#: read found as many entries as it asked for (a backlog; not one runner), at most
#: _AHEAD_MAX entries (and no more than the worker's runners), and handed back to the
#: queue when no runner took them within _AHEAD_HOLD (other workers may run them).
_QUICK = 0.01
_AHEAD_MAX = 256
_AHEAD_HOLD = 0.1


def decode_entry(codec: Codec, data: bytes) -> tuple[TaskMessage | None, str | None]:
    """An entry's message, decoded without ever raising: ``(message, None)``;
    ``(None, None)`` when the codec refuses the bytes (:class:`DecodeError`: a worker
    rejects the delivery with the codec's reason, once); ``(None, reason)`` when the
    codec failed otherwise (dead-lettered at once: a codec that raises something else on
    some bytes would raise it again on every delivery)."""
    try:
        return codec.decode_message(data), None
    except DecodeError:
        return None, None
    except Exception as exc:
        return None, f"undecodable message: the codec raised {type(exc).__name__}: {exc}"[:500]


class StreamReaderActor(actors.Actor):
    """Reads the streams of a set of queues for this process's workers (see the module
    docstring)."""

    expected_failures = (RedisError, OSError)

    def __init__(
        self,
        settings: RedisSettings,
        keys: Keys,
        codec: Codec,
        conn_ref: actors.ActorRef,
        results: Any,
        state: ReaderState,
        queues: tuple[str, ...] = (),
        tasks: Mapping[str, Task[Any, Any]] | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys  # the broker's default queue: its level-0 entries have bare tags
        self.codec = codec
        self.conn_ref = conn_ref
        self.results = results
        self.state = state
        self.tasks: Mapping[str, Task[Any, Any]] = tasks if tasks is not None else {}
        self.group = settings.group.encode()
        self.consumer = (consumer or settings.consumer).encode()
        self.queues = queues or (keys.queue,)
        self.streams: list[StreamRef] = []
        for queue in self.queues:
            qkeys = keys.of(queue)
            for level in qkeys.levels:
                self.streams.append(StreamRef(qkeys.level_stream(level), queue, level, qkeys))
        self.by_key = {s.key: s for s in self.streams}
        self._default_stream = keys.stream
        if self._default_stream not in self.by_key:  # bare tags name it: know it anyway
            self.by_key[self._default_stream] = StreamRef(keys.stream, keys.queue, 0, keys)
        self.blocking: Connection | None = None
        self._last_count = 1  # how many entries per stream the last read asked for
        self._read_scope: trio.CancelScope | None = None
        self._gathered = False  # this read waited for more runners already
        # Read-ahead (see _QUICK): a delivery was handed out since the last read-ahead
        # (_ahead_ok), since when every runner is busy (until one comes back), whether
        # the runners came back quickly, and whether what is held was read ahead.
        self._ahead_ok = False
        self._busy_since: float | None = None
        self._quick = False
        self._held_ahead = False
        #: The last read returned all it asked for, two or more: a backlog to read from.
        self._full = False
        #: Runners were handed deliveries since the last read: they have not run yet.
        self._handed = False
        # Read and not handed to a runner yet: held by priority, or set aside for a
        # limit. ``_aside`` has both, by tag (for the heartbeat and the hand-back).
        self.held: ReadyQueues[Delivery] = ReadyQueues()
        self.parking: Parking[Delivery] = Parking()
        self._aside: dict[Any, Delivery] = {}
        self._picker = Consumer(self.queues)

    # ------------------------------------------------------------ tags

    def _tag(self, s: StreamRef, eid: bytes) -> Any:
        if s.key == self._default_stream:
            return eid  # the hot path: the default queue at level 0, as before levels
        return Entry(s.key, eid, s.queue, s.level)

    def _where(self, tag: Any) -> tuple[StreamRef, bytes]:
        if isinstance(tag, Entry):
            return self.by_key[tag.stream], tag.eid
        return self.by_key[self._default_stream], tag

    def _by_stream(self, tags: list[Any]) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        for tag in tags:
            s, eid = self._where(tag)
            out.setdefault(s.key, []).append(eid)
        return out

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        conn = await Connection.connect(self.settings.url, name="bus-reader")
        self.blocking = conn
        await self.nursery.start(conn.run)
        await self._ensure_groups(conn)
        self.nursery.start_soon(self._read_forever)
        self.nursery.start_soon(self._heartbeat)

    async def _ensure_groups(self, conn: Connection) -> None:
        replies = await conn.pipeline(
            [("XGROUP", "CREATE", s.key, self.group, "0", "MKSTREAM") for s in self.streams]
        )
        for reply in replies:
            if isinstance(reply, ReplyError) and reply.code != "BUSYGROUP":
                raise reply

    async def on_stop(self) -> None:
        """Hand back everything this consumer still owns, so a clean stop leaves
        nothing pending: entries read and not handed to a runner (held or set aside for
        a limit), and entries no worker finished (a worker cancelled at once). Acks
        queued before are applied first (the same connection, in order), so nothing
        finished is handed back."""
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self.blocking is not None:
            # Closed first: a blocked XREADGROUP then delivers nothing more to us.
            await self.blocking.aclose()
        state = self.state
        started = {self._where(tag)[1] for tag in state.inflight}
        known: dict[tuple[bytes, bytes], tuple[Delivery | None, bytes | None]] = {}
        for tag, flight in state.inflight.items():
            s, eid = self._where(tag)
            known[s.key, eid] = (None, flight.claim)
        state.inflight.clear()
        for d in self._forget_aside():
            s, eid = self._where(d.tag)
            known[s.key, eid] = (d, self._claim_of(d))
        with trio.move_on_after(max(1.0, min(self.settings.send_timeout or 5.0, 5.0))):
            try:
                lent = await lend(self.conn_ref, timeout=2)
                for s in self.streams:
                    while True:
                        reply = await lent.conn.execute(
                            "XPENDING", s.key, self.group, "-", "+", 1000, self.consumer
                        )
                        ids = [p[0] for p in reply or () if isinstance(p, list) and p]
                        if not ids:
                            break
                        unknown = [i for i in ids if (s.key, i) not in known]
                        if unknown:
                            # Read and claimed, but the stop came before it was held
                            # here: find its attempt's claim, so it moves to the copy
                            # (else the copy is taken for a replay, and never runs).
                            claims = await self._claims_of(lent.conn, s, unknown)
                            for i in unknown:
                                known[s.key, i] = (None, claims.get(i))
                        entries = [
                            self._handback(s, i, i in started, *known.get((s.key, i), (None, None)))
                            for i in ids
                        ]
                        if await self._hand_back(s, entries) == 0:
                            break
                await self._leave()
            except RedisError as exc:
                log.warning("redis.stop_incomplete", error=str(exc), actor=self.name)

    async def _claims_of(
        self, conn: Connection, s: StreamRef, ids: list[bytes]
    ) -> dict[bytes, bytes]:
        """The claim keys (``Keys.ran``) of the attempts of entries ``ids`` of ``s``,
        read from the entries themselves (those that cannot be decoded have none)."""
        replies = await conn.pipeline([("XRANGE", s.key, i, i) for i in ids])
        out: dict[bytes, bytes] = {}
        field = s.keys.data_field
        for eid, reply in zip(ids, replies, strict=True):
            if isinstance(reply, ReplyError):
                continue
            for _, fields in _entries(reply):
                data = (fields or {}).get(field) or (fields or {}).get(F_DATA)
                if not isinstance(data, bytes):
                    continue
                message, _ = decode_entry(self.codec, data)
                if message is not None:
                    out[eid] = s.keys.ran(message.task_id, message.attempt)
        return out

    def _forget_aside(self) -> list[Delivery]:
        self.held.remove_if(lambda d: True)
        self.parking.remove_if(lambda d: True)
        aside = list(self._aside.values())
        self._aside.clear()
        return aside

    async def _leave(self) -> None:
        """A clean stop: drop this worker from the presence sets and, owning nothing
        now, from the consumer groups."""
        conn = (await lend(self.conn_ref, timeout=2)).conn
        for queue in self.queues:
            await conn.execute("ZREM", self.keys.of(queue).workers, self.consumer)
        for s in self.streams:
            pending = await conn.execute("XPENDING", s.key, self.group, "-", "+", 1, self.consumer)
            if not pending:
                await conn.execute("XGROUP", "DELCONSUMER", s.key, self.group, self.consumer)

    # --------------------------------------------------------------- handlers

    @actors.handles(Lend)
    def lend(self, msg: Lend) -> Lease:
        return _ReaderLease(self.state, self.settings.dead_letter_failures, msg.max_messages)

    @actors.handles(Done, inline=True)
    def done(self, msg: Done) -> None:
        pop = self.state.inflight.pop
        for tag in msg.tags:
            pop(tag, None)

    @actors.handles(Cancelled, inline=True)
    def cancelled(self, msg: Cancelled) -> None:
        self.state.remember_cancel(msg.task_id)

    @actors.handles(InFlight)
    def in_flight(self, msg: InFlight) -> list[TaskID]:
        return [f.task_id for f in self.state.inflight.values() if f.task_id is not None]

    # --------------------------------------------------------- handing back

    def _handback(
        self,
        s: StreamRef,
        eid: bytes,
        started: bool,
        d: Delivery | None = None,
        claim: bytes | None = None,
    ) -> Handback:
        """What the hand-back of entry ``eid`` of ``s`` records: with a secret and the
        delivery known, its delivery count signed; its attempt's claim moves along."""
        secret = self.settings.secret
        if secret is None or d is None:
            return Handback(eid, started, claim=claim)
        count = max(0, d.deliveries - 1 + (1 if started else 0))
        return Handback(eid, started, count, sign_count(secret, s.key, d.data, count), claim)

    async def _hand_back(self, s: StreamRef, entries: list[Handback]) -> int:
        """Give entries of ``s`` this consumer owns back to the queue at once."""
        if not entries:
            return 0
        lent = await lend(self.conn_ref, timeout=5)
        command = handback_command(
            s.key,
            self.group,
            self.consumer,
            self.settings.maxlen or 0,
            entries,
            claim_ttl_ms=claim_ttl_ms(self.results),
        )
        n = (await rerun_noscript(lent.conn, [command], await lent.conn.pipeline([command])))[0]
        if isinstance(n, ReplyError):
            raise n
        log.info("redis.handed_back", entries=n, actor=self.name)
        return int(n) if isinstance(n, int) else 0

    async def _give_back(self) -> None:
        """Hand back what is held or set aside here (never started), dropping what was
        cancelled meanwhile."""
        aside = self._forget_aside()
        cancelled = [d for d in aside if self._is_cancelled(d)]
        if cancelled:
            await self._drop(await self._shared(), cancelled)
        await self.hand_back([d for d in aside if not self._is_cancelled(d)])

    async def hand_back(self, deliveries: list[Delivery]) -> None:
        """Give deliveries read here and never started back to the queue."""
        by_stream: dict[bytes, list[Handback]] = {}
        for d in deliveries:
            s, eid = self._where(d.tag)
            entry = self._handback(s, eid, False, d, self._claim_of(d))
            by_stream.setdefault(s.key, []).append(entry)
        for stream, entries in by_stream.items():
            await self._hand_back(self.by_key[stream], entries)

    # ------------------------------------------------------------- the reader

    async def _shared(self) -> Connection:
        lent: Lent = await lend(self.conn_ref)
        return lent.conn

    def _waiting(self) -> int:
        return self.state.recv.statistics().tasks_waiting_receive

    async def _read_forever(self) -> None:
        with trio.CancelScope() as scope:
            self._read_scope = scope
            await self._sweep_large()
            try:
                await self._read_loop()
            except ReplyTooLarge:
                # Entries too large for one reply: the restart dead-letters those
                # larger than a message may be, and reads fewer at once from now on.
                state = self.state
                state.count_cap = max(1, self._last_count // 2)
                log.warning("redis.read_too_large", count=state.count_cap, actor=self.name)
                raise

    async def _sweep_large(self) -> None:
        """Dead-letter the entries pending for this consumer that are larger than a
        message may be (``max_message_bytes``, and some room for the other fields):
        read, they would exceed the client's ``max_reply_bytes`` at every try."""
        settings = self.settings
        limit = settings.max_message_bytes + 4096
        conn = await self._shared()
        now = str(time.time())
        caps = (settings.dead_letter_maxlen or 0, settings.dead_letter_max_bytes or 0)
        commands: list[Command] = [
            SWEEP_LARGE.command(
                keys=[s.key, s.keys.dead, s.keys.dead_bytes],
                args=[self.group, self.consumer, limit, *caps, s.queue, now],
            )
            for s in self.streams
        ]
        replies = await rerun_noscript(conn, commands, await conn.pipeline(commands))
        moved = sum(r for r in replies if isinstance(r, int))
        if moved:
            log.error(
                "task.dead_lettered",
                entries=moved,
                reason=f"larger than {limit} bytes (max_message_bytes and its fields)",
                actor=self.name,
            )

    async def _read_loop(self) -> None:
        state = self.state
        own: dict[bytes, bytes] = {s.key: b"0" for s in self.streams}  # our pending first
        reap: dict[bytes, bytes] = {}
        next_reap = trio.current_time()
        while True:
            demand = self._waiting()
            if state.leases == 0 and self._aside:
                await self._give_back()  # no worker here any more: others may run them
                continue  # runners may have come meanwhile: their wake-up is spent
            ahead = False
            if not demand:
                if self._busy_since is None and state.leases:
                    self._busy_since = trio.current_time()  # every runner is busy
            elif self._busy_since is not None:
                self._quick = trio.current_time() - self._busy_since <= _QUICK
                self._busy_since = None
            if not self.held:
                self._held_ahead = False
            if demand == 0 or state.leases == 0:
                if not (state.leases and self._may_read_ahead()):
                    await self._wait_demand()
                    continue
                # Every runner is busy with short tasks: read the next entries now
                # (no blocking read), while they run and store their results.
                ahead = self._held_ahead = True
                self._ahead_ok = False
                demand = min(state.capacity, _AHEAD_MAX)
            elif self._held_ahead and len(self.held) >= demand and not self.parking:
                await self._hand_out()  # read ahead: no read before these runners start
                continue
            elif demand < state.capacity // 2 and not self.held and not self._gathered:
                # Few runners wait and the others are busy: give those a moment to
                # come back, so that one read, one claim and one result write serve
                # many (a worker of short tasks); runners that stay busy cost this
                # read _GATHER at most.
                self._gathered = True
                await self._gather(state.capacity // 2)
                continue
            self._gathered = False
            if self.parking and await self._serve_parked():
                continue
            if state.count_cap is not None:
                demand = min(demand, state.count_cap)
            self._last_count = demand
            entries: list[_Raw] = []
            counted = False
            if own:
                entries = await self._read_own(own, demand)
                counted = bool(entries)
            elif trio.current_time() >= next_reap:
                if not reap:
                    reap = {s.key: b"0-0" for s in self.streams}
                entries = await self._reap(reap, demand)
                counted = bool(entries)
                if not reap:
                    next_reap = trio.current_time() + self.settings.reap
            if not entries:
                entries = await self._read_new(demand, block=not ahead)
            self._full = demand >= 2 and len(entries) >= demand
            if entries:
                await self._accept(entries, counted)
            await self._hand_out()
            handed, self._handed = self._handed, False
            if handed and not self.held and self._waiting():
                # The runners just handed a delivery run before the next read is made
                # for the others that wait (a blocking one: nothing is held), so that
                # their results go out first: a round trip waits for its result, not
                # for the next read. Two passes: Trio runs the tasks of a pass in
                # either order. (With every runner busy, the loop goes on at once: it
                # notices that, for the read-ahead of short tasks.)
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()

    def _may_read_ahead(self) -> bool:
        """Whether to read entries for runners that are all busy (see _QUICK)."""
        return self._ahead_ok and self._quick and self._full and not self.held and not self.parking

    async def _wait_demand(self) -> None:
        """Wait until a runner waits (or the number of leases changes). Entries read
        ahead that no runner took within _AHEAD_HOLD go back to the queue meanwhile.

        Cancellation: only the wait ends (what is held stays held, handed back at the
        stop)."""
        state = self.state
        state.demand = trio.Event()
        if not self._held_ahead:
            await state.demand.wait()
            return
        with trio.move_on_after(_AHEAD_HOLD):
            await state.demand.wait()
            return
        if not self._waiting() and not self.parking:
            self._held_ahead = self._quick = False
            await self._give_back()  # what is held, never started: others may run it

    async def _gather(self, wanted: int) -> None:
        """Wait until ``wanted`` runners wait, or :data:`_GATHER` seconds.

        Cancellation: only the wait ends (nothing was read)."""
        state = self.state
        with trio.move_on_after(_GATHER):
            while self._waiting() < wanted and state.leases:
                state.demand = trio.Event()
                await state.demand.wait()

    async def _read_own(self, own: dict[bytes, bytes], demand: int) -> list[_Raw]:
        """Re-read entries pending for this consumer (after a restart), level by level."""
        conn = self.blocking
        assert conn is not None
        keys = list(own)
        reply = await conn.execute(
            "XREADGROUP",
            "GROUP",
            self.group,
            self.consumer,
            "COUNT",
            demand,
            "STREAMS",
            *keys,
            *(own[k] for k in keys),
        )
        out: list[_Raw] = []
        seen: set[bytes] = set()
        inflight, aside = self.state.inflight, self._aside
        for key, section in reply or ():
            found = _entries(section)
            s = self.by_key[key]
            if found:
                seen.add(key)
                own[key] = found[-1][0]
                # Entries still held here (running, or finished with their ack not yet
                # written: a restart after an outage) are not handed out again.
                out += [
                    (s, eid, fields)
                    for eid, fields in found
                    if (tag := self._tag(s, eid)) not in inflight and tag not in aside
                ]
        for key in keys:
            if key not in seen:
                del own[key]
        return out

    async def _reap(self, cursors: dict[bytes, bytes], demand: int) -> list[_Raw]:
        """Claim entries that other consumers left idle past the visibility timeout."""
        conn = self.blocking
        assert conn is not None
        vt_ms = int(self.settings.visibility_timeout * 1000)
        keys = list(cursors)
        replies = await conn.pipeline(
            [
                ("XAUTOCLAIM", k, self.group, self.consumer, vt_ms, cursors[k], "COUNT", demand)
                for k in keys
            ]
        )
        out: list[_Raw] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, ReplyError):
                raise reply
            cursor = reply[0]
            if cursor in (b"0-0", "0-0"):
                del cursors[key]
            else:
                cursors[key] = cursor
            s = self.by_key[key]
            out += [(s, eid, fields) for eid, fields in _entries(reply[1])]
        if out:
            log.warning("redis.reclaimed", entries=len(out), actor=self.name)
        return out

    async def _read_new(self, demand: int, *, block: bool = True) -> list[_Raw]:
        """New entries: of each level of which fewer than ``demand`` are held, at most
        ``demand``; blocking only when nothing is held to hand out meanwhile, and no
        longer than until a delivery set aside for a limit is to be tried again (never
        without ``block``: a read-ahead)."""
        held, parking, settings = self.held, self.parking, self.settings
        streams = [s for s in self.streams if held.count(s.queue, s.level) < demand]
        retry_at = parking.next_retry() if parking else math.inf
        wait = min(settings.block, max(0.0, retry_at - trio.current_time()))
        if not streams or len(parking) >= settings.limit_backlog:
            if not held:
                with trio.move_on_after(wait):
                    self.state.demand = trio.Event()
                    await self.state.demand.wait()
            return []
        conn = self.blocking
        assert conn is not None
        command: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", demand]
        timeout = None
        # Redis ends a blocking read up to a server tick (100 ms at hz 10) after its
        # time: block until a tick before a retry is due, and sleep the rest here.
        block_s = wait if retry_at == math.inf else wait - _TICK
        if not held and block_s > 0 and block:
            command += ["BLOCK", max(1, int(block_s * 1000))]
            timeout = block_s + settings.url.command_timeout
        command += ["STREAMS", *(s.key for s in streams), *(b">" for _ in streams)]
        reply = await conn.execute(*command, timeout=timeout)
        out: list[_Raw] = []
        for key, section in reply or ():
            s = self.by_key[key]
            out += [(s, eid, fields) for eid, fields in _entries(section)]
        if not out and not held and retry_at < math.inf:
            await trio.sleep_until(min(retry_at, trio.current_time() + settings.block))
        return out

    async def _counts(self, conn: Connection, raw: list[_Raw]) -> dict[Any, int | None]:
        """How often each of the entries was delivered, asked of each entry alone (a
        range would be cut short by the other entries this consumer owns in it):
        ``None`` for one no longer pending for this consumer. Such an entry was
        finished after this read was made (its ack landed, and the reader, told Done
        or finding it gone at a heartbeat, forgot it) or another consumer claimed it
        since: it must not run here (its claim, made by this very entry, would let it
        run a second time). An entry whose count cannot be read is left out."""
        replies = await conn.pipeline(
            [("XPENDING", s.key, self.group, eid, eid, 1, self.consumer) for s, eid, _ in raw]
        )
        out: dict[Any, int | None] = {}
        for (s, eid, _), reply in zip(raw, replies, strict=True):
            if isinstance(reply, ReplyError):
                continue
            p = reply[0] if isinstance(reply, list) and reply else None
            if isinstance(p, list) and len(p) >= 4 and p[0] == eid:
                out[self._tag(s, eid)] = int(p[3])
            else:
                out[self._tag(s, eid)] = None
        return out

    async def _accept(self, raw: list[_Raw], counted: bool) -> None:
        """Check what was read: bad entries are dead-lettered, cancelled ones dropped,
        the rest held for the runners."""
        settings, codec = self.settings, self.codec
        conn = await self._shared()
        counts = await self._counts(conn, raw) if counted else {}
        ready: list[tuple[StreamRef, Delivery]] = []
        dead: list[tuple[StreamRef, bytes, bytes, str, int, TaskMessage | None]] = []
        inflight, aside = self.state.inflight, self._aside
        for s, eid, fields in raw:
            tag = self._tag(s, eid)
            if tag in inflight or tag in aside:
                continue  # runs or waits here already (re-read after a reconnect): not twice
            n = counts.get(tag, 1)
            if n is None:
                # Read as ours, but finished (or claimed elsewhere) since: see _counts.
                log.info("redis.read_finished_since", entry=eid.decode(), actor=self.name)
                continue
            field = s.keys.data_field
            if fields is not None and field != F_DATA and field in fields:
                fields = {**fields, F_DATA: fields[field]}  # read as the message field
            if fields:
                extra, ignored = count_of(fields, settings.secret, s.key)
                n += extra
                if ignored is not None:
                    log.warning(
                        "task.count_refused", entry=eid.decode(), reason=ignored, actor=self.name
                    )
            data, reason = check_entry(
                fields,
                settings.secret,
                settings.max_message_bytes,
                s.key,
            )
            message: TaskMessage | None = None
            if reason is None:
                # Counted before decoding: an entry that keeps failing is dead-lettered
                # whatever its bytes do to the codec.
                if over_delivered(n, settings.max_deliveries):
                    reason = (
                        f"delivered {n} times, more than max_deliveries={settings.max_deliveries}"
                    )
                message, undecodable = decode_entry(codec, data)
                reason = reason or undecodable
                if reason is None and settings.max_message_age is not None and fields:
                    # Signed (the time is in its signature) too long before it was due.
                    eta = message.eta if message is not None else None
                    reason = too_old(fields.get(F_SIG), eta, settings.max_message_age)
            if reason is not None:
                dead.append((s, eid, data, reason, n, message))
                continue
            ready.append((s, Delivery(data, tag=tag, message=message, deliveries=n)))
        if dead:
            await self.dead_letter(conn, dead)
        # The claims go on the reader's own connection, idle between its reads: the
        # reader writes them at once and reads their replies itself (caller-read),
        # without queueing behind the broker's acks or waking the shared connection's
        # reader. (A stop that closes it with a claim in flight: see HANDBACK.)
        ready = await self._check_marks_and_claims(self.blocking or conn, ready)
        skipped = [d for _, d in ready if self._is_cancelled(d)]
        if skipped:
            await self._drop(conn, skipped)  # cancelled while queued: its result is stored
        for s, d in ready:
            if not self._is_cancelled(d):
                self.held.put(s.queue, s.level, d)
                aside[d.tag] = d

    async def _check_marks_and_claims(
        self, conn: Connection, ready: list[tuple[StreamRef, Delivery]]
    ) -> list[tuple[StreamRef, Delivery]]:
        """In one round trip: read the cancel markers of ``ready`` (only a marker signed
        with the secret cancels), and claim each delivery's attempt (``Keys.ran``: ``SET
        NX`` of its entry id, kept for the result TTL). A delivery whose attempt another
        entry claimed is a replay or a duplicate (a retried send): acknowledged and
        deleted, never run. Returns the others."""
        state, secret = self.state, self.settings.secret
        marks = self._marker_keys(ready)
        claims = [
            (s, d, s.keys.ran(d.message.task_id, d.message.attempt))
            for s, d in ready
            if d.message is not None
        ]
        commands: list[Command] = [("MGET", *(k for _, k in marks))] if marks else []
        ttl_ms = claim_ttl_ms(self.results)
        for _, d, key in claims:
            commands.append(("SET", key, self._where(d.tag)[1], "NX", "GET", "PX", ttl_ms))
        if not commands:
            return ready
        replies = await conn.pipeline(commands)
        if marks:
            found = replies.pop(0)
            if isinstance(found, ReplyError):
                raise found
            for (tid, key), mark in zip(marks, found, strict=True):
                if marker_ok(secret, key, mark):
                    state.remember_cancel(tid)
                elif mark is not None:
                    log.warning(
                        "task.cancel_marker_refused",
                        task_id=tid,
                        reason="cancel marker is not signed with the secret",
                        actor=self.name,
                    )
        replayed: list[Delivery] = []
        mark = getattr(self.results, "mark_first_run", None)
        for (_, d, _), reply in zip(claims, replies, strict=True):
            eid = self._where(d.tag)[1]
            if reply is None or reply == eid:
                # Claimed now, or by this very entry (delivered again). Claimed now for
                # a first attempt: no other run can have left progress for its result
                # store to delete (the result backend's mark_first_run).
                if mark is not None:
                    assert d.message is not None
                    first = reply is None and d.message.attempt == 1 and d.deliveries == 1
                    mark(d.message.task_id, first)
                continue
            replayed.append(d)
            assert d.message is not None
            log.warning(
                "task.replay_dropped",
                entry=eid.decode(),
                task_id=d.message.task_id,
                attempt=d.message.attempt,
                reason=(
                    f"cannot claim the attempt: {reply.message}"
                    if isinstance(reply, ReplyError)
                    else "this attempt was claimed by another entry (a replay or a duplicate)"
                ),
                actor=self.name,
            )
        if not replayed:
            return ready
        commands = []
        for stream, eids in self._by_stream([d.tag for d in replayed]).items():
            commands += [("XACK", stream, self.group, eid) for eid in eids]
            commands += [("XDEL", stream, eid) for eid in eids]
        await conn.pipeline(commands)
        dropped = {id(d) for d in replayed}
        return [(s, d) for s, d in ready if id(d) not in dropped]

    def _claim_of(self, d: Delivery) -> bytes | None:
        """The claim key of a delivery's attempt (``None`` when undecoded)."""
        if d.message is None:
            return None
        return self._where(d.tag)[0].keys.ran(d.message.task_id, d.message.attempt)

    def _marker_keys(self, ready: list[tuple[StreamRef, Delivery]]) -> list[tuple[TaskID, bytes]]:
        """The cancel markers to read: each task's under the broker's default queue, and
        under its own queue when that is another (task id, marker key)."""
        out = []
        for s, d in ready:
            if d.message is None:
                continue
            tid = d.message.task_id
            out.append((tid, self.keys.cancel_marker(tid)))
            if s.queue != self.keys.queue:
                out.append((tid, s.keys.cancel_marker(tid)))
        return out

    def _is_cancelled(self, d: Delivery) -> bool:
        return d.message is not None and d.message.task_id in self.state.cancelled

    async def _drop(self, conn: Connection, deliveries: list[Delivery]) -> None:
        """Acknowledge and delete entries that must not run (cancelled). Their CANCELLED
        result is stored first unless one is (the canceller stores it too, but its write
        may have failed while its marker got through): a dropped task always ends."""
        for d in deliveries:
            if d.message is not None:
                tid = d.message.task_id
                err = RemoteError("bus.Cancelled", "cancelled before it started")
                result: TaskResult[Any] = TaskResult(tid, TaskStatus.CANCELLED, None, err, 0.0, {})
                await self.results.set_result_if_absent(tid, result)
        commands: list[Command] = []
        for stream, eids in self._by_stream([d.tag for d in deliveries]).items():
            commands += [("XACK", stream, self.group, eid) for eid in eids]
            commands += [("XDEL", stream, eid) for eid in eids]
        for d in deliveries:  # a unique job's key is free again
            if d.message is not None and "unique_key" in d.message.labels:
                keys = self._where(d.tag)[0].keys
                key = keys.unique(d.message.labels["unique_key"])
                value = unique_value(self.settings.secret, key, d.message.task_id)
                commands.append(RELEASE.command(keys=[key], args=[value]))
        await conn.pipeline(commands)

    # --------------------------------------------------------- handing out

    def _limits_of(self, d: Delivery) -> TaskLimits | None:
        if d.message is None:
            return None
        task = self.tasks.get(d.message.task_name)
        return None if task is None else task.limits

    async def _hand_out(self) -> None:
        """Hand held deliveries to the runners that wait, the most urgent first."""
        held, parking = self.held, self.parking
        while held and self._waiting():
            d = held.take(self._picker)
            assert d is not None
            if self._is_cancelled(d):
                self._aside.pop(d.tag, None)
                await self._drop(await self._shared(), [d])
                continue
            limits = self._limits_of(d)
            if limits is not None:
                behind = [k for k in limits.wait_keys if parking.waiting(k)]
                if behind:  # after those that wait for the same limit
                    parking.park(behind[0], d, math.inf)
                    continue
                if not await self._admit(d, limits):
                    continue
            if not await self._send(d):
                return

    async def _serve_parked(self) -> int:
        """Hand deliveries whose limit may let them start now to waiting runners."""
        parking = self.parking
        n = 0
        for key in parking.due(trio.current_time()):
            while self._waiting():
                d = parking.peek(key)
                if d is None:
                    break
                parking.pop(key)
                if self._is_cancelled(d):
                    self._aside.pop(d.tag, None)
                    await self._drop(await self._shared(), [d])
                    continue
                limits = self._limits_of(d)
                if limits is not None:
                    behind = [k for k in limits.wait_keys if k != key and parking.waiting(k)]
                    if behind:
                        parking.park(behind[0], d, math.inf)
                        continue
                    if not await self._admit(d, limits):
                        if not parking.waiting(key) or parking.peek(key) is d:
                            break  # parked again under this key: later
                        continue
                if not await self._send(d):
                    return n
                n += 1
            if not self._waiting():
                break
        return n

    async def _admit(self, d: Delivery, limits: TaskLimits) -> bool:
        """Take what ``limits`` need for ``d`` to start (a slot, then a token), on the
        server; if either is missing, take nothing and set ``d`` aside."""
        conn = await self._shared()
        prefix, keys = self.keys.prefix, limits.wait_keys
        slot: tuple[bytes, str] | None = None
        if limits.max_running is not None:
            s, eid = self._where(d.tag)
            token = f"{self.consumer.decode()}:{s.key.decode()}:{eid.decode()}"
            zkey = running_redis_key(prefix, limits.running_key).encode()
            ttl_ms = max(1, int(self.settings.visibility_timeout * 1000))
            got = await ACQUIRE_SLOT.run(
                conn, keys=[zkey], args=["", token, limits.max_running, ttl_ms]
            )
            if got != 1:
                retry = trio.current_time() + self.settings.limit_poll_interval
                self.parking.park(keys[0], d, retry, front=True)
                return False
            slot = (zkey, token)
        rate = limits.rate
        if rate is not None:
            wait_ms = await TAKE_TOKEN.run(
                conn, keys=[limit_redis_key(prefix, rate.key)], args=bucket_args(rate)
            )
            if wait_ms:
                if slot is not None:
                    await RELEASE_SLOT.run(conn, keys=[slot[0]], args=[slot[1]])
                retry = trio.current_time() + int(wait_ms) / 1000
                self.parking.park(keys[-1], d, retry, front=True)
                return False
        if slot is not None:
            self.state.slots[d.tag] = slot
        return True

    async def _send(self, d: Delivery) -> bool:
        """Hand ``d`` to a runner; False when no worker takes deliveries any more (then
        everything read here goes back to the queue)."""
        state = self.state
        self._aside.pop(d.tag, None)
        state.inflight[d.tag] = Flight(
            d.message.task_id if d.message else None, time.monotonic(), self._claim_of(d)
        )
        try:
            try:
                # A runner waits (the callers checked): handed over without a
                # scheduler pass per delivery; the loop around is bounded by the
                # waiting runners.
                state.send.send_nowait(d)
            except trio.WouldBlock:
                await state.send.send(d)
            self._ahead_ok = self._handed = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            state.inflight.pop(d.tag, None)
            release = state.release_command(d.tag)
            if release is not None:
                await (await self._shared()).pipeline([release])
            await self.hand_back([d])
            await self._give_back()
            return False
        except BaseException:
            state.inflight.pop(d.tag, None)
            self._aside[d.tag] = d  # still ours: handed back at the stop
            raise
        return True

    async def dead_letter(
        self,
        conn: Connection,
        dead: list[tuple[StreamRef, bytes, bytes, str, int, TaskMessage | None]],
    ) -> None:

        settings = self.settings
        now = str(time.time())
        commands = []
        for s, eid, data, reason, n, message in dead:
            claim = None if message is None else s.keys.ran(message.task_id, message.attempt)
            commands.append(
                dead_command(
                    s.key,
                    s.keys.dead,
                    self.group,
                    self.consumer,
                    eid,
                    settings.dead_letter_maxlen or 0,
                    reason=reason,
                    data=data,
                    queue=s.queue,
                    deliveries=n,
                    when=now,
                    max_bytes=settings.dead_letter_max_bytes or 0,
                    claim=claim,
                )
            )
        replies = await conn.pipeline(commands)
        await rerun_noscript(conn, commands, replies)
        for _, eid, _, reason, _, message in dead:
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
                    # Never over a stored result (a replayed entry's, or one whose ack
                    # was lost): that task finished.
                    await self.results.set_result_if_absent(message.task_id, result)
                except Exception:
                    log.exception("result.store_failed", task_id=message.task_id)

    # ------------------------------------------------------------- heartbeat

    async def _heartbeat(self) -> None:
        settings = self.settings
        interval = settings.heartbeat
        beats = 0
        while True:
            try:
                conn = await self._shared()
                now = time.time()
                presence: list[Command] = []
                for queue in self.queues:
                    workers = self.keys.of(queue).workers
                    presence.append(("ZADD", workers, now, self.consumer))
                    # A worker that stopped beating (crashed) leaves the set.
                    presence.append(("ZREMRANGEBYSCORE", workers, "-inf", now - 3 * interval - 1))
                await conn.pipeline(presence)
                await self._touch(conn)
                await self._refresh_slots(conn)
                beats += 1
                if beats % 10 == 1:
                    await self._prune_consumers(conn, interval)
            except (ConnectionLost, RedisError) as exc:
                log.debug("redis.heartbeat_failed", error=str(exc), actor=self.name)
            await trio.sleep(interval)

    async def _touch(self, conn: Connection) -> None:
        """Reset the idle time of every entry this reader holds (running, held or set
        aside), so no other worker claims them; forget those it no longer owns. One
        pending for another consumer was claimed away (``task.ownership_lost``, a
        warning); one no longer pending at all was acknowledged: most often its own
        ack, written (after an outage, say) before the reader was told it is done
        (``redis.entry_finished``, at debug level)."""
        tags = list(self.state.inflight) + list(self._aside)
        for stream, eids in self._by_stream(tags).items():
            s = self.by_key[stream]
            for i in range(0, len(eids), 200):
                chunk = eids[i : i + 200]
                reply = await TOUCH.run(
                    conn, keys=[stream], args=[self.group, self.consumer, *chunk]
                )
                touched, elsewhere = _touched(reply)
                for eid in set(chunk) - touched:
                    tag = self._tag(s, eid)
                    f = self.state.inflight.pop(tag, None)
                    tid = f.task_id if f else None
                    d = self._aside.pop(tag, None)
                    if d is not None:
                        self._unhold(d)
                        tid = d.message.task_id if d.message else None
                    if eid in elsewhere:
                        log.warning(
                            "task.ownership_lost",
                            entry=eid.decode(),
                            task_id=tid,
                            reason="another consumer claimed its entry",
                            actor=self.name,
                        )
                    else:
                        log.debug(
                            "redis.entry_finished", entry=eid.decode(), task_id=tid, actor=self.name
                        )

    def _unhold(self, d: Delivery) -> None:
        """Forget ``d``, held or set aside (another consumer owns its entry now)."""

        def it(x: Delivery) -> bool:
            return x is d

        self.held.remove_if(it)
        self.parking.remove_if(it)

    async def _refresh_slots(self, conn: Connection) -> None:
        """Extend the leases of the slots held by running tasks."""
        slots = list(self.state.slots.items())
        if not slots:
            return
        ttl_ms = max(1, int(self.settings.visibility_timeout * 1000))
        commands = [REFRESH_SLOT.command(keys=[k], args=["", t, ttl_ms]) for _, (k, t) in slots]
        replies = await conn.pipeline(commands)
        await rerun_noscript(conn, commands, replies)
        for (tag, (key, _)), reply in zip(slots, replies, strict=True):
            if reply == 0 and tag in self.state.slots:
                log.warning("task.slot_lost", key=key.decode(), actor=self.name)

    async def _prune_consumers(self, conn: Connection, interval: float) -> None:
        """Remove consumers of the groups that own nothing and are not alive."""
        alive: set[bytes] = set()
        for queue in self.queues:
            live = await conn.execute("ZRANGE", self.keys.of(queue).workers, 0, -1)
            alive.update(live or ())
        idle_ms = 3 * interval * 1000
        for s in self.streams:
            try:
                consumers = await conn.execute("XINFO", "CONSUMERS", s.key, self.group)
            except ReplyError:
                continue
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
                    await conn.execute("XGROUP", "DELCONSUMER", s.key, self.group, name)
