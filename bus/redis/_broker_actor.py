"""The Redis broker actor (``broker.ref``): it turns the ``Send``s, ``Ack``s and ``Nack``s
of each mailbox drain into one write on the shared connection, owns the stream readers
of this process (its children, with the mover of delayed messages) and listens to
cancel announcements. See :mod:`bus.redis._broker`."""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio
import trio.lowlevel

import actors
from actors._log import get_logger
from bus._broker_actor import BrokerActor
from bus._codec import Codec
from bus._errors import BusError
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import check_queue_name
from bus._protocol import (
    Ack,
    BrokerInfo,
    Cancel,
    CancelRunning,
    Delivery,
    Inspect,
    Lease,
    Nack,
    Receive,
    Release,
    Send,
    Unclaim,
)
from bus._results import ResultBackend
from bus.redis._client import (
    Command,
    Connection,
    ConnectionLost,
    Pending,
    RedisError,
    RedisTimeout,
    ReplyError,
    rerun_noscript,
)
from bus.redis._logic import (
    F_SIG,
    Entry,
    Keys,
    claim_ttl_ms,
    join_member,
    marker_ok,
    marker_value,
    sign,
    sign_count,
    sign_entry,
    unique_value,
)
from bus.redis._pool import (
    BACKOFF,
    Announcement,
    Lent,
    Resubscribed,
    Subscribe,
    UsesConnection,
    is_transient,
    lend,
    subscription_of,
    with_connection,
)
from bus.redis._reader import (
    Cancelled,
    Done,
    InFlight,
    Lend,
    ReaderState,
    StreamReaderActor,
)
from bus.redis._resp import Head
from bus.redis._scripts import (
    CLAIM_SEND,
    DEAD,
    HANDBACK,
    RELEASE,
    REQUEUE,
    Handback,
    dead_command,
    handback_command,
)
from bus.redis._settings import RedisSettings

if TYPE_CHECKING:
    from bus._task import Task

from bus.redis._mover import DelayedMoverActor, SendMany, SendNow, WakeMover

__all__ = ["RedisBrokerActor", "_Writes", "_deadline"]

log = get_logger("bus.redis")

#: Seconds before writes Redis answered "not now" (LOADING, BUSY ...) are made again.
_NOT_NOW_RETRY = 0.1

#: How long a batch of acks alone may wait for another write on the connection to go
#: out with (a write is the costly part of a command here: one write for a claim, a
#: result and the acks before them, instead of two).
_ACK_LINGER = 0.002


# ----------------------------------------------------------- the broker actor


@attrs.define
class _Reader:
    """A reader of this process: its ref, its state, its consumer name."""

    ref: actors.ActorRef
    state: ReaderState
    consumer: bytes
    index: int


@attrs.define
class _Writes:
    """What the broker actor owns that must outlive one instance of it (a restart after
    a bug loses no ack or send that was accepted, and runs nothing again): the batch of
    writes being gathered, and its readers' states (their in-flight entries, and the
    channel the workers' leases take from), by the queues they read."""

    batch: _Batch = attrs.Factory(lambda: _Batch())
    readers: dict[tuple[str, ...], _Reader] = attrs.Factory(dict)


@attrs.define
class _Batch:
    """Writes of one mailbox drain, confirmed together (and retried together). The acks
    of the drain are gathered by stream: one ``XACK`` and one ``XDEL`` for all of a
    stream's entries (:meth:`seal` puts them before the other commands)."""

    commands: list[Command] = attrs.Factory(list)
    done: list[Any] = attrs.Factory(list)  # entries (tags) the readers forget once written
    acks: dict[bytes, list[bytes]] = attrs.Factory(dict)  # stream -> entry ids

    def __bool__(self) -> bool:
        return bool(self.commands or self.acks)

    def seal(self, group: bytes) -> list[Command]:
        """The batch's commands, its acks first (each ``XACK`` before its ``XDEL``:
        an entry is deleted only once acknowledged)."""
        if self.acks:
            acks: list[Command] = []
            for stream, eids in self.acks.items():
                acks.append((b"XACK", stream, group, *eids))
                acks.append((b"XDEL", stream, *eids))
            self.commands[:0] = acks
            self.acks = {}
        return self.commands


class RedisBrokerActor(BrokerActor, UsesConnection):
    """The Redis broker actor (see the module docstring).

    Spawned with RESTART: Redis going away is not its failure (a handler that cannot
    reach Redis answers its asker with the error, and the actor goes on), and a bug
    restarts it. What must outlive an instance, the writes not yet confirmed, lives in
    :class:`_Writes`, which its factory hands to each instance."""

    replied_errors = (RedisError, BusError)

    def __init__(
        self,
        settings: RedisSettings,
        keys: Keys,
        codec: Codec,
        results: ResultBackend,
        conn_ref: actors.ActorRef,
        tasks: Mapping[str, Task[Any, Any]] | None = None,
        writes: _Writes | None = None,
    ) -> None:
        super().__init__()
        self._writes = writes if writes is not None else _Writes()
        self.settings = settings
        self.keys = keys
        self.codec = codec
        self.results = results
        self.conn_ref = conn_ref
        #: The broker's tasks (their queues, and the limits the readers apply).
        self.tasks: Mapping[str, Task[Any, Any]] = tasks if tasks is not None else {}
        self.group = settings.group.encode()
        self.consumer = settings.consumer.encode()
        self._stream = keys.stream  # the default queue's level 0: bare tags
        #: The start of an XADD to a queue's level, packed once: (queue, level) ->
        #: Head(XADD, stream, MAXLEN ~ n, *, data field).
        self._xadd_heads: dict[tuple[str | None, int], Head] = {}
        self._keys: dict[str, Keys] = {keys.queue: keys}
        #: A reader per set of queues consumed here.
        #: A reader per set of queues consumed here (kept across restarts).
        self._readers: dict[tuple[str, ...], _Reader] = self._writes.readers
        self._listening: set[bytes] = set()
        self._cancels = ReaderState()  # only its table of cancelled ids is used
        self._mover: actors.ActorRef | None = None
        self._confirming = 0
        self._confirmed: trio.Event | None = None
        #: Batches written and not confirmed yet, oldest first (see _confirmer).
        self._flights: collections.deque[tuple[Pending, _Batch, float, float]] = collections.deque()
        self._more: trio.Event | None = None

    @property
    def _batch(self) -> _Batch:
        return self._writes.batch

    @_batch.setter
    def _batch(self, batch: _Batch) -> None:
        self._writes.batch = batch

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self.start_keeping_connection()
        self.nursery.start_soon(self._confirmer)
        settings, keys, conn_ref = self.settings, self.keys, self.conn_ref
        queues = [t.queue for t in self.tasks.values() if t.queue is not None]
        self._mover = await self.spawn(
            lambda: DelayedMoverActor(settings, keys, conn_ref, queues),
            name="delayed",
            on_failure=actors.RESTART,
            max_restarts=None,
            backoff=BACKOFF,
        )
        # Restarted after a bug: the readers (children) went with the old instance;
        # start them again on their states, so the workers' leases go on and nothing
        # held here is handed out twice.
        for queues_read, kept in list(self._readers.items()):
            await self._start_reader(queues_read, kept.state, kept.index)

    async def connected(self, lent: Lent) -> None:
        # Load the scripts the inline sends use (a server restart forgets them).
        await lent.conn.pipeline(
            [("SCRIPT", "LOAD", s.source) for s in (CLAIM_SEND, RELEASE, REQUEUE, DEAD, HANDBACK)]
        )

    async def ready(self, lent: Lent) -> None:
        if self._batch:
            await self._write()  # what waited for the connection

    async def on_drained(self) -> None:
        if self._batch:
            await self._write()

    async def on_stop(self) -> None:
        """Children (the reader) stopped already; now make sure every write of this
        broker reached Redis (bounded), before the connection closes."""
        deadline = trio.current_time() + max(1.0, min(self.settings.write_timeout, 10.0))
        with trio.move_on_after(deadline - trio.current_time()):
            while self._batch or self._confirming:
                if self._batch and self.lent is not None:
                    await self._write()
                self._confirmed = trio.Event()
                with trio.move_on_after(0.5):
                    await self._confirmed.wait()
        if self._batch or self._confirming:
            log.error(
                "redis.writes_lost",
                queued=len(self._batch.seal(self.group)),
                unconfirmed=self._confirming,
                actor=self.name,
            )

    # ----------------------------------------------------------------- writes

    def _submit_now(self, commands: Sequence[Command], *, eager: bool = False) -> Pending | None:
        """:meth:`submit_now`, bounded by send_timeout on the connection itself (no
        reply in time drops it): the producer's first try needs no cancel scope of
        its own."""
        return self.submit_now(commands, timeout=self.settings.send_timeout, eager=eager)

    def _queue(self, commands: Iterable[Command], done: Iterable[Any] = ()) -> None:
        """Queue writes for the end of this drain (on_drained writes them)."""
        self._batch.commands.extend(commands)
        self._batch.done.extend(done)

    async def _write(self) -> None:
        lent = self.lent
        if lent is None or lent.lost.is_set():
            return  # _keep_connection writes it once reconnected
        batch, self._batch = self._batch, _Batch()
        # Acks alone are not urgent (the results are stored): they go out with the
        # next write on the connection (a claim, a result), or after _ACK_LINGER.
        linger = _ACK_LINGER if not batch.commands else 0.0
        try:
            pending = lent.conn.submit(batch.seal(self.group))
            if not linger:
                await lent.conn.flush()
        except ConnectionLost:
            self._requeue_batch(batch)
            return
        self._confirming += 1
        self._flights.append((pending, batch, trio.current_time(), linger))
        if self._more is not None:
            self._more.set()
            self._more = None

    def _requeue_batch(self, batch: _Batch) -> None:
        self._batch.commands[:0] = batch.seal(self.group)
        self._batch.done[:0] = batch.done

    async def _confirmer(self) -> None:
        """Confirm the written batches, oldest first (their replies come in that
        order on a connection; a lost one fails all of its own): one task for the
        actor's life, not one per batch. A batch of acks alone waits for the next
        write on the connection to carry it, ``linger`` seconds at most, then is
        written. A batch whose replies hold an error, or whose connection was lost,
        is handled apart (:meth:`_confirm`: retried), so the next are not held up.
        Cancellation: the actor stops; what is not confirmed stays counted in
        ``_confirming`` (on_stop waits for it, then logs it)."""
        flights = self._flights
        while True:
            if not flights:
                self._more = more = trio.Event()
                await more.wait()
                continue
            pending, batch, since, linger = flights[0]
            got: list[Any] | BaseException | None = None
            try:
                if linger:
                    with trio.move_on_at(since + linger):
                        got = await pending.wait(flush=False)
                if got is None:
                    got = await pending.wait()
            except (ConnectionLost, RedisTimeout) as exc:
                got = exc
            flights.popleft()
            if type(got) is list and not any(isinstance(r, ReplyError) for r in got):
                self._tell_done(batch)  # the common case
                self._settled()
            else:
                self.nursery.start_soon(self._confirm, pending, batch, since, got)

    def _tell_done(self, batch: _Batch) -> None:
        """A batch is written and confirmed: the readers forget its entries."""
        if batch.done:
            done = Done(tuple(batch.done))
            for reader in self._readers.values():
                # A reader stops before its broker's last writes: one that stops has
                # forgotten what it owned, and needs no Done.
                with contextlib.suppress(actors.ActorStopped):
                    reader.ref.tell_nowait(done)

    def _settled(self) -> None:
        """A batch written is confirmed, or given up (see on_stop)."""
        self._confirming -= 1
        if self._confirmed is not None:
            self._confirmed.set()

    async def _confirm(
        self,
        pending: Pending,
        batch: _Batch,
        since: float,
        got: list[Any] | BaseException | None = None,
    ) -> None:
        """Handle the replies of a batch (``got``: its replies, or the error waiting
        for them raised; ``None``: wait for them): tell the readers its entries are
        done; on a lost connection, queue it again (within ``write_timeout``); writes
        Redis refused for now are made again soon. Cancellation: the batch's replies
        are not waited for (the broker actor stops: its connection closes after)."""
        try:
            try:
                if isinstance(got, BaseException):
                    raise got
                replies = got if got is not None else await pending.wait()
            except (ConnectionLost, RedisTimeout) as exc:
                # Acks and the Lua writes are idempotent: send them again on the next
                # connection, until Redis is back or the write timeout passes.
                if trio.current_time() - since < self.settings.write_timeout:
                    log.debug("redis.write_retry", error=str(exc), commands=len(batch.commands))
                    self._requeue_batch(batch)
                    if self.lent is not None and not self.lent.lost.is_set():
                        await self._write()
                else:
                    log.error("redis.write_failed", error=str(exc), commands=len(batch.commands))
                return
            lent = self.lent
            again: list[Command] = []
            if any(isinstance(r, ReplyError) for r in replies):
                if lent is not None:
                    await rerun_noscript(lent.conn, batch.commands, replies)
                retrying = trio.current_time() - since < self.settings.write_timeout
                for command, reply in zip(batch.commands, replies, strict=True):
                    if retrying and is_transient(reply):
                        again.append(command)
                    elif isinstance(reply, ReplyError):
                        name = command[0]
                        name = name.decode() if isinstance(name, bytes) else str(name)
                        log.error("redis.write_refused", command=name, error=reply.message)
            if again:
                # Redis said "not now" (LOADING: it is loading its data after a restart;
                # BUSY ...): those writes were not made. Make them again soon; until
                # then the readers keep the batch's entries (told they are done, they
                # would read them again, still pending, and run them a second time).
                log.debug("redis.write_retry", error="not now", commands=len(again))
                await trio.sleep(_NOT_NOW_RETRY)
                self._requeue_batch(_Batch(again, batch.done))
                if self.lent is not None and not self.lent.lost.is_set():
                    await self._write()
                return
            self._tell_done(batch)
        finally:
            self._settled()

    # ---------------------------------------------------------------- sending

    def _wake_mover(self, queue: str | None) -> None:
        """Tell the delayed-set mover that ``queue`` has a new due time (a mover that
        stops, at shutdown, has nothing more to move: no error)."""
        mover = self._mover
        if mover is not None:
            with contextlib.suppress(actors.ActorStopped):
                mover.tell_nowait(WakeMover(queue))

    def keys_of(self, queue: str | None) -> Keys:
        """The keys of ``queue`` (``None``: the default queue)."""
        if queue is None:
            return self.keys
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = self.keys.of(queue)
        return keys

    def _enqueue_command(self, message: TaskMessage, data: bytes) -> Command:
        settings = self.settings
        queue, level = message.queue, message.priority
        # The hot path: the stream key and the fixed arguments come ready, packed.
        head = self._xadd_heads.get((queue, level))
        if head is None:
            keys = self.keys if queue is None else self.keys_of(queue)
            maxlen = settings.maxlen
            head = self._xadd_heads[queue, level] = Head(
                b"XADD",
                keys.level_stream(level),
                *((b"MAXLEN", b"~", b"%d" % maxlen) if maxlen is not None else ()),
                b"*",
                keys.data_field,
            )
        secret = settings.secret
        sig = b"" if secret is None else sign_entry(secret, head.key, data)
        eta = message.eta
        if eta is not None and eta > time.time():
            keys = self.keys if queue is None else self.keys_of(queue)
            self._wake_mover(queue)
            return ("ZADD", keys.level_delayed(level), int(eta * 1000), join_member(sig, data))
        if sig:
            return head.command(data, F_SIG, sig)
        return head.command1(data)

    def _data(self, msg: Send) -> bytes:
        return msg.data if msg.data is not None else self.codec.encode_message(msg.message)

    def _claim_command(
        self,
        message: TaskMessage,
        data: bytes,
        claim: bytes,
        ttl_ms: int,
        replace: bytes | None = None,
    ) -> Command:
        """Send ``message`` only if ``claim`` is free, or holds ``replace`` (CLAIM_SEND).
        The key's value is the task id, signed with the secret (so that a forged value
        is not taken for a queued task)."""
        settings = self.settings
        keys, level = self.keys_of(message.queue), message.priority
        eta = message.eta
        due = int(eta * 1000) if eta is not None and eta > time.time() else 0
        if due:
            self._wake_mover(message.queue)
        sig = sign_entry(settings.secret, keys.level_stream(level), data)
        value = unique_value(settings.secret, claim, message.task_id)
        return CLAIM_SEND.command(
            keys=[claim, keys.level_stream(level), keys.level_delayed(level)],
            args=[value, ttl_ms, due, data, sig, settings.maxlen or 0,
                  b"" if replace is None else replace, keys.data_field],
        )  # fmt: skip

    def _send_command(
        self, message: TaskMessage, data: bytes, replace: bytes | None = None
    ) -> Command:
        """The write that sends ``message``: a plain XADD/ZADD, or for a unique job the
        claim of its key and the send in one Lua call (whose reply is the holder's
        value)."""
        labels = message.labels
        if labels and "unique_key" in labels:
            ttl_ms = max(1, int(float(labels.get("unique_ttl", 3600.0)) * 1000))
            claim = self.keys_of(message.queue).unique(labels["unique_key"])
            return self._claim_command(message, data, claim, ttl_ms, replace)
        return self._enqueue_command(message, data)

    def _acked(self, commands: list[Command]) -> list[Command]:
        """``commands``, then the ``WAIT`` of ``min_replicas_ack`` if set (its reply
        is the last; ``RedisBroker._submit`` takes it off)."""
        if self.settings.min_replicas_ack:
            commands.append(("WAIT", self.settings.min_replicas_ack, self.settings.wait_ms))
        return commands

    @actors.handles(SendNow, inline=True)
    def send_now(self, msg: SendNow) -> Pending | None:
        # Written at once when it is the only command in flight (a sequential
        # producer's), so Redis works on it while the producer goes on to wait.
        return self._submit_now(
            self._acked([self._send_command(msg.message, msg.data, msg.replace)]), eager=True
        )

    def _releases(self, d: Delivery) -> list[Command]:
        """Freeing the unique key of a finished delivery, if it has one."""
        message = d.message
        if message is None or not message.labels or "unique_key" not in message.labels:
            return []
        key = self.keys_of(message.queue).unique(message.labels["unique_key"])
        value = unique_value(self.settings.secret, key, message.task_id)
        return [RELEASE.command(keys=[key], args=[value])]

    @actors.handles(SendMany, inline=True)
    def send_many(self, msg: SendMany) -> Pending | None:
        return self._submit_now(self._acked([self._send_command(m, d) for m, d in msg.messages]))

    @actors.handles(Send)
    def send(self, msg: Send) -> None:
        """A Send told to ``broker.ref``: written with this drain's batch."""
        self._queue([self._send_command(msg.message, self._data(msg))])

    # -------------------------------------------------------------- receiving

    @actors.handles(Receive)
    async def receive(self, msg: Receive) -> Lease:
        for queue in msg.queues:
            check_queue_name(queue)
        queues = tuple(dict.fromkeys(msg.queues)) or (self.settings.queue,)
        found = self._readers.get(queues)
        if found is None or not found.ref.is_alive:
            if found is not None:
                state, n = found.state, found.index
            else:
                state, n = ReaderState(), len(self._readers)
                # A copy: the reader owns its table, told of each cancel (Cancelled).
                state.cancelled = dict(self._cancels.cancelled)
            reader = await self._start_reader(queues, state, n)
        else:
            reader = found.ref
        lease: Lease = await reader.ask(Lend(msg.max_messages))
        return lease

    async def _start_reader(
        self, queues: tuple[str, ...], state: ReaderState, n: int
    ) -> actors.ActorRef:
        """Spawn the reader of ``queues`` on ``state``. The first reader is this
        process's consumer; another set of queues read here gets a consumer of its own
        (each hands back what it owns)."""
        consumer = self.settings.consumer if n == 0 else f"{self.settings.consumer}-{n}"
        settings, keys, codec, conn_ref = self.settings, self.keys, self.codec, self.conn_ref
        results, tasks = self.results, self.tasks
        reader = await self.spawn(
            lambda: StreamReaderActor(
                settings, keys, codec, conn_ref, results, state, queues, tasks, consumer
            ),
            name="reader" if n == 0 else f"reader-{n}",
            on_failure=actors.RESTART,
            max_restarts=None,
            backoff=BACKOFF,
            mailbox_size=math.inf,
        )
        self._readers[queues] = _Reader(reader, state, consumer.encode(), n)
        for queue in queues:
            self._wake_mover(queue)
        self.nursery.start_soon(self._listen_for_cancels, queues)
        return reader

    def _queue_names(self) -> list[str]:
        """The queues this process knows: the default one, its tasks' queues, the
        queues its workers consume."""
        names = [self.keys.queue]
        names += [t.queue for t in self.tasks.values() if t.queue is not None]
        for queues in self._readers:
            names += queues
        return list(dict.fromkeys(names))

    async def _listen_for_cancels(self, queues: tuple[str, ...]) -> None:
        """Cancels are announced on the canceller's default queue and its tasks'
        queues: listen on this broker's default queue and on every queue read here."""
        sub = await subscription_of(self.conn_ref)
        for queue in (self.keys.queue, *queues):
            channel = self.keys_of(queue).cancel_channel
            if channel not in self._listening:
                self._listening.add(channel)
                await sub.ask(Subscribe(channel, self.ref))

    # ----------------------------------------------------------- ack and nack

    def _where(self, tag: Any) -> tuple[bytes, bytes, Keys, int]:
        """(stream, entry id, the queue's keys, level) of a delivery's tag."""
        if type(tag) is Entry:
            return tag.stream, tag.eid, self.keys_of(tag.queue), tag.level
        return self._stream, tag, self.keys, 0

    def _release_slot(self, tag: Any, commands: list[Command]) -> list[Command]:
        """``commands``, and the release of the slot the entry holds, if it holds one."""
        for reader in self._readers.values():
            state = reader.state
            if state.slots:
                release = state.release_command(tag)
                if release is not None:
                    commands.append(release)
        return commands

    def _consumer_of(self, tag: Any) -> bytes:
        """The consumer that owns the entry (the reader that handed it out)."""
        for reader in self._readers.values():
            if tag in reader.state.inflight:
                return reader.consumer
        return self.consumer

    @actors.handles(Ack)
    def ack(self, msg: Ack) -> None:
        tag = msg.delivery.tag
        if type(tag) is bytes:  # the hot path: the default queue at level 0
            stream, eid = self._stream, tag
        else:
            stream, eid, _, _ = self._where(tag)
        batch = self._batch
        acks = batch.acks.get(stream)
        if acks is None:
            batch.acks[stream] = [eid]
        else:
            acks.append(eid)
        batch.done.append(tag)
        d = msg.delivery
        if d.message is not None and d.message.labels:
            batch.commands += self._releases(d)
        self._release_slot(tag, batch.commands)

    @actors.handles(Unclaim, inline=True)
    def unclaim(self, msg: Unclaim) -> Pending | None:
        commands = self._releases(msg.delivery)
        return self._submit_now(commands) if commands else None

    @actors.handles(Nack)
    def nack(self, msg: Nack) -> None:
        d = msg.delivery
        tag = d.tag
        stream, eid, keys, level = self._where(tag)
        settings = self.settings
        reason = msg.reason
        data = b""
        if msg.requeue is not None:
            try:
                data = self.codec.encode_message(msg.requeue)
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                reason = f"cannot requeue for a retry: {exc}"  # dead-lettered below
        if data:
            from bus._options import MAX_RETRY_DELAY

            # Any delay, however it was computed: NaN and <= 0 mean now, and no retry
            # waits more than MAX_RETRY_DELAY (int() of a huge float would raise).
            delay = msg.delay
            due = int(time.time() * 1000 + min(delay, MAX_RETRY_DELAY) * 1000) if delay > 0 else 0
            if due:
                self._wake_mover(keys.queue)
            self._queue(
                self._release_slot(
                    tag,
                    [
                        REQUEUE.command(
                            keys=[stream, keys.level_delayed(level), keys.level_stream(level)],
                            args=[
                                self.group,
                                self._consumer_of(tag),
                                eid,
                                due,
                                data,
                                sign_entry(settings.secret, keys.level_stream(level), data),
                                settings.maxlen or 0,
                                keys.data_field,
                            ],
                        )
                    ],
                ),
                (tag,),
            )
            return
        message = d.message
        self._queue(self._releases(d))
        log.error(
            "task.dead_lettered",
            entry=eid.decode() if isinstance(eid, bytes) else str(eid),
            reason=reason,
            task_id=message.task_id if message else None,
            task_name=message.task_name if message else None,
            actor=self.name,
        )
        self._queue(
            self._release_slot(
                tag,
                [
                    dead_command(
                        stream,
                        keys.dead,
                        self.group,
                        self.consumer,
                        eid,
                        settings.dead_letter_maxlen or 0,
                        max_bytes=settings.dead_letter_max_bytes or 0,
                        claim=keys.ran(message.task_id, message.attempt) if message else None,
                        reason=reason,
                        data=d.data,
                        queue=keys.queue,
                        deliveries=d.deliveries,
                        when=str(time.time()),
                    )
                ],
            ),
            (tag,),
        )

    @actors.handles(Release)
    def release(self, msg: Release) -> None:
        """A stop interrupted the delivery: hand it back to the queue at once (a
        copy at the end of the stream that remembers its deliveries; one never
        started does not count)."""
        d = msg.delivery
        tag = d.tag
        stream, eid, keys, _ = self._where(tag)
        consumer = self._consumer_of(tag)
        secret = self.settings.secret
        message = d.message
        # The claim of its attempt moves to the copy (so the copy is no replay); with a
        # secret, its delivery count is signed.
        claim = None if message is None else keys.ran(message.task_id, message.attempt)
        entry = Handback(eid, msg.started, claim=claim)
        if secret is not None:
            count = max(0, d.deliveries - 1 + (1 if msg.started else 0))
            csig = sign_count(secret, stream, d.data, count)
            entry = Handback(eid, msg.started, count, csig, claim)
        command = handback_command(
            stream,
            self.group,
            consumer,
            self.settings.maxlen or 0,
            [entry],
            claim_ttl_ms=claim_ttl_ms(self.results),
        )
        self._queue(self._release_slot(tag, [command]), (tag,))

    # ----------------------------------------------------------- cancellation

    def _cancel_payload(self, tid: TaskID) -> bytes:
        secret = self.settings.secret
        if secret is None:
            return tid.encode()
        return tid.encode() + b":" + sign(secret, tid.encode())

    def _announced_id(self, data: bytes) -> TaskID | None:
        secret = self.settings.secret
        text, _, sig = data.partition(b":")
        if secret is not None:
            import hmac

            if not sig or not hmac.compare_digest(sig, sign(secret, text)):
                log.warning("redis.cancel_refused", reason="bad or missing signature")
                return None
        try:
            return TaskID.parse(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None

    @actors.handles(Cancel)
    def cancel(self, msg: Cancel) -> actors.Later:
        """Mark the task cancelled (a key with ``cancel_ttl``), announce it to every
        worker (which cancels it if it runs there), and store a CANCELLED result unless
        one is stored already: a queued task then never starts, its waiters wake now."""
        tid = msg.task_id
        self._cancel_here(tid)
        settings = self.settings
        ttl_ms = max(1, int(settings.cancel_ttl * 1000))
        payload = self._cancel_payload(tid)
        # The task may wait in any queue this process knows: mark and announce it in
        # each (workers read the markers of the default queue and of their entry's).
        commands: list[Command] = []
        for queue in self._queue_names():
            keys = self.keys_of(queue)
            marker = keys.cancel_marker(tid)
            value = marker_value(settings.secret, marker)
            commands.append(("SET", marker, value, "PX", ttl_ms))
            commands.append(("PUBLISH", keys.cancel_channel, payload))

        async def mark(conn: Connection) -> None:
            replies = await conn.pipeline(commands)
            for r in replies:
                if isinstance(r, ReplyError):
                    raise r

        async def mark_and_store() -> None:
            await with_connection(
                self.conn_ref,
                mark,
                deadline=_deadline(settings.command_timeout),
                what=f"cannot cancel {tid}",
            )
            err = RemoteError("bus.Cancelled", "cancelled before it finished")
            result: TaskResult[Any] = TaskResult(tid, TaskStatus.CANCELLED, None, err, 0.0, {})
            self.nursery.start_soon(self._store_cancelled, tid, result)

        return actors.later(mark_and_store)

    async def _store_cancelled(self, tid: TaskID, result: TaskResult[Any]) -> None:
        try:
            await self.results.set_result_if_absent(tid, result)
        except (RedisError, BusError) as exc:
            log.warning("task.cancel_result_failed", task_id=tid, error=str(exc))

    def _cancel_here(self, tid: TaskID) -> None:
        self._cancels.remember_cancel(tid)  # for readers started later
        for reader in self._readers.values():
            with contextlib.suppress(actors.ActorStopped):  # stopping: owns nothing now
                reader.ref.tell_nowait(Cancelled(tid))
        if self.workers:
            self.tell_workers(CancelRunning(tid, "cancel"))

    @actors.handles(Announcement, inline=True)
    def announced(self, msg: Announcement) -> None:
        tid = self._announced_id(msg.data)
        if tid is not None:
            self._cancel_here(tid)

    @actors.handles(Resubscribed)
    def resubscribed(self, msg: Resubscribed) -> actors.Later:
        """Cancels announced while the subscription was down were missed: read the
        markers of the tasks running here (in the background)."""
        return actors.later(self._recover_cancels)

    async def _recover_cancels(self) -> None:
        tids: list[TaskID] = []
        for reader in self._readers.values():
            tids += await reader.ref.ask(InFlight())
        if not tids:
            return
        lent = await lend(self.conn_ref)
        names = self._queue_names()
        markers = [self.keys_of(q).cancel_marker(t) for t in tids for q in names]
        marks = await lent.conn.execute("MGET", *markers)
        secret = self.settings.secret
        ok = [marker_ok(secret, k, m) for k, m in zip(markers, marks, strict=True)]
        for i, tid in enumerate(tids):
            if any(ok[i * len(names) : (i + 1) * len(names)]):
                log.info("task.cancel_recovered", task_id=tid, actor=self.name)
                self._cancel_here(tid)

    # --------------------------------------------------------------- inspect

    @actors.handles(Inspect)
    def inspect(self, msg: Inspect) -> actors.Later:
        return actors.later(self._inspect)

    async def _inspect(self) -> BrokerInfo:
        from bus.redis import _ops  # operator calls: not loaded by a worker that makes none

        settings, keys, names = self.settings, self.keys, self._queue_names()
        info: dict[str, Any] = await with_connection(
            self.conn_ref,
            lambda conn: _ops.inspect(conn, keys, settings, names),
            deadline=_deadline(settings.command_timeout),
            what="cannot inspect the queue",
        )
        return _ops.broker_info(
            info,
            running=sum(len(r.state.inflight) for r in self._readers.values()),
            workers_here=len(self.workers),
        )


def _deadline(timeout: float | None) -> float:
    """The Trio-clock deadline ``timeout`` seconds from now (``None``: never)."""
    return math.inf if timeout is None else trio.current_time() + timeout
