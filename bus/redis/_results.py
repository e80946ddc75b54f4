"""The Redis result backend: results in keys with a TTL, announced on one channel.

:class:`RedisResultBackend` is the facade; :class:`RedisResultStoreActor` owns the
waiters of this process: it is told ``Watch`` / ``Unwatch``, listens to the results
channel through the process's one subscription, and wakes a waiter the moment its
result is announced (or found by the read that follows its registration: pushed,
never polled). A waiter of a task sent from this process after the subscription was
confirmed needs no read while its announcement was not seen before it registered and
the subscription was not made again (see :class:`Sent`).
Writes go through the store actor onto the process's shared command
connection, and are retried until Redis is back (within ``write_timeout``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.lowlevel

import actors
from actors._log import get_logger
from bus import _ids
from bus._codec import Codec, DecodeError, JSONCodec
from bus._errors import BrokerUnavailable, BusError, ResultNotFound, ResultTimeout
from bus._ids import TaskID
from bus._message import TaskResult
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
from bus._results import ResultBackend, encode_result_checked
from bus._supervision import BUG_RESTARTS
from bus.redis._client import (
    Command,
    ConnectionLost,
    Pending,
    RedisError,
    RedisTimeout,
    ReplyError,
)
from bus.redis._logic import join_announcements, open_result, seal_result, split_announcements
from bus.redis._pool import (
    BACKOFF,
    Announcement,
    Resubscribed,
    Subscribe,
    UsesConnection,
    is_transient,
    shared_connection,
    subscription_of,
    wait_connected,
    with_connection,
)
from bus.redis._url import RedisURL

__all__ = ["RedisResultBackend", "RedisResultStoreActor"]

log = get_logger("bus.redis.results")

#: At most this many tasks are marked as first runs (see ``mark_first_run``): marks of
#: tasks whose result is not stored here (``store_result=False``, handed back) stay
#: until then; a worker has at most its runners and a read-ahead marked at a time.
_FIRST_RUNS_MAX = 4096


#: At most this many results are announced in one ``PUBLISH`` (see
#: ``announce_commands``): a waiting process's subscription reads each at once.
_ANNOUNCE_BATCH = 64

#: At most this many sent task ids are remembered for their waiters (see ``Sent``).
_SENT_MAX = 4096
#: A waiter registered without reading its key (see ``Sent``) and not woken after this
#: many seconds reads it once: a safety net for an announcement that never comes (a
#: result stored by another process under an id this one sends again).
_LATE_READ = 1.0


def _made_last(task_id: str) -> bool:
    """Whether ``task_id`` is the id ``TaskID.new`` made last in this process (its
    millisecond and counter; ids made in one process never repeat)."""
    clock = _ids._clock
    prefix = clock[2]
    n = len(prefix)
    return task_id[:n] == prefix and task_id[n : n + 3] == "%03x" % clock[1]  # noqa: UP031


@attrs.frozen
class Sent:
    """Told (inline) by a producer of this process just before it writes the send of
    ``task_id``: a waiter of that task registered later needs no read of its key while
    no announcement of it was seen and the subscription stayed up (see
    :meth:`RedisResultStoreActor.watch`)."""

    task_id: TaskID


@attrs.frozen
class _Live:
    """Told by the store actor to itself once Redis confirmed its subscription."""


@attrs.frozen
class Write:
    """Ask (inline): queue ``commands`` on the shared connection; the answer is the
    :class:`Pending` of their replies (``ConnectionLost`` while reconnecting)."""

    commands: tuple[Command, ...]


@attrs.frozen
class StoreSoon:
    """Told (inline) by a worker's runner: store a result (``commands``), then call
    ``stored`` with ``None``, or with the error that ``set_result`` would have raised
    (see :meth:`RedisResultBackend.set_result_soon`)."""

    commands: tuple[Command, ...]
    stored: Callable[[BaseException | None], None]


class _Waiters:
    """This process's waiters, by task id: kept by the store actor's factory, so a
    restarted store still wakes every waiter registered before. And a read view for
    the producers of this process: whether the running store's subscription is
    confirmed (written by the store only)."""

    def __init__(self) -> None:
        self.by_id: dict[TaskID, list[Watcher]] = {}
        #: The store's ``_live``: until it is True a store ignores :class:`Sent`, so
        #: ``RedisResultBackend.sending`` does not tell it (the waiter of such a task
        #: reads its key, the safe way).
        self.live = False


class RedisResultStoreActor(UsesConnection):
    """Owns this process's waiters for results kept in Redis.

    Spawned with RESTART: an instance that fails (a bug) is replaced, and the waiters
    (:class:`_Waiters`) outlive it; the new instance re-reads every key waited on."""

    replied_errors = (RedisError, BusError)

    def __init__(
        self,
        backend: RedisResultBackend,
        conn_ref: actors.ActorRef,
        waiters: _Waiters | None = None,
    ) -> None:
        self.backend = backend
        self.conn_ref = conn_ref
        self._view = waiters if waiters is not None else _Waiters()
        self._view.live = False  # this instance's subscription is not confirmed yet
        self.watchers: dict[TaskID, list[Watcher]] = self._view.by_id
        self.subscribed = trio.Event()
        self._subscribing = False
        self._to_check: set[TaskID] = set()
        self._checking = False
        #: True once the subscription was confirmed (told in mailbox order, see _Live).
        self._live = False
        #: Task ids sent from this process while subscribed whose announcement was not
        #: seen since (a set as a dict; cleared at _SENT_MAX and on Resubscribed).
        self._sent: dict[str, None] = {}  # (TaskIDs; looked up by their text too)
        #: Waiters registered without a read, and when they read if still waiting.
        self._late: dict[TaskID, float] = {}
        self._late_reading = False
        #: Results told with StoreSoon and not yet taken by ``_confirm``.
        self._storing: list[StoreSoon] = []
        self._confirming = False
        #: The last batch of stores had one store: write the next one at once.
        self._alone = False
        #: The store written at once, for the confirmer (see store_soon).
        self._first: tuple[list[StoreSoon], Pending] | None = None
        self._wake_confirmer: trio.Event | None = None

    async def on_start(self) -> None:
        self.start_keeping_connection()
        self.nursery.start_soon(self._confirmer)
        if self.watchers:  # restarted: read what is waited on (and subscribe)
            self._subscribing = True
            self.nursery.start_soon(self._subscribe)
            self._to_check.update(self.watchers)
            self._checking = True
            self.nursery.start_soon(self._check)

    # ------------------------------------------------------------------ writes

    @actors.handles(Write, inline=True)
    def write(self, msg: Write) -> Pending | None:
        """Queue the commands; ``None`` while there is no connection (the asker
        waits for one and asks again: not a failure of this actor)."""
        return self.submit_now(msg.commands)

    @actors.handles(StoreSoon, inline=True)
    def store_soon(self, msg: StoreSoon) -> None:
        """Store a result without waiting: written at once when no store is in flight
        and the last ones came one at a time; otherwise the stores told in one
        scheduler pass (all of a worker's runners that finished together) go out in
        one submit and one write. ``_confirm`` waits for the replies."""
        if self._confirming:
            self._storing.append(msg)
            return
        self._confirming = True
        first: tuple[list[StoreSoon], Pending] | None = None
        if self._alone:
            # The last stores came one at a time (a worker running one task after
            # another): written now, not a scheduler pass late. Otherwise _confirm
            # takes it with the others told in this pass (one write for the runners
            # that finish together).
            pending = self.submit_now(msg.commands)
            if pending is not None:
                first = ([msg], pending)
                with contextlib.suppress(ConnectionLost):
                    pending.conn.flush_nowait()  # else written by the wait in _confirm
        if first is None:
            self._storing.append(msg)
        self._first = first
        if self._wake_confirmer is not None:
            self._wake_confirmer.set()
            self._wake_confirmer = None

    async def _confirmer(self) -> None:
        """Confirms the stores told with StoreSoon (:meth:`_confirm`) whenever there
        are some: one task for the actor's life, not one per wave of stores.
        Cancellation: the actor stops (see :meth:`_confirm`)."""
        while True:
            if not self._confirming:
                self._wake_confirmer = wake = trio.Event()
                await wake.wait()
                continue
            first, self._first = self._first, None
            await self._confirm(first)

    async def _confirm(self, first: tuple[list[StoreSoon], Pending] | None) -> None:
        """Wait for the replies of the stores in flight, oldest first, and call each
        store's ``stored``; meanwhile the stores told since are submitted in one batch
        (pipelined), until none is left. A store whose write failed (Redis
        unreachable, loading) is written again on its own within ``write_timeout``,
        as ``set_result`` does. Cancelled (this actor stops or is replaced): each
        store not confirmed is told ``ActorStopped``; its task's entry stays pending
        and is delivered again."""
        storing = self._storing
        backend = self.backend
        flights: collections.deque[tuple[list[StoreSoon], Pending | None]] = collections.deque()
        if first is not None:
            flights.append(first)
        batch: list[StoreSoon] = []
        try:
            while flights or storing:
                if storing:
                    told = list(storing)
                    storing.clear()
                    self._alone = len(told) == 1
                    commands = [c for m in told for c in m.commands]
                    if len(told) > 1:  # a lone store (a round trip's) keeps its own
                        commands = backend.announce_commands(commands)
                    sent = self.submit_now(commands)
                    flights.append((told, sent))
                    if sent is not None and len(flights) > 1:
                        # Behind a store in flight: written now, not once the wait below
                        # (for the older one) is over. Alone, the wait writes it.
                        with contextlib.suppress(ConnectionLost):
                            sent.conn.flush_nowait()
                batch, pending = flights.popleft()
                replies: list[Any] | None = None
                if pending is not None:
                    try:
                        replies = await pending.wait()
                    except (ConnectionLost, RedisTimeout):
                        replies = None
                if replies is not None and not any(isinstance(r, ReplyError) for r in replies):
                    # The common case: every result stored (an error reply, transient
                    # ones included, is a ReplyError).
                    for msg in batch:
                        msg.stored(None)
                    batch = []
                    continue
                if replies is not None and len(replies) != sum(len(m.commands) for m in batch):
                    # Announced together (announce_commands): the replies are not each
                    # store's own. Each is written again alone (what it had written
                    # already is written again: the same value, a second announcement).
                    replies = None
                i = 0
                while batch:
                    msg = batch[0]
                    n = len(msg.commands)
                    mine = replies[i : i + n] if replies is not None else None
                    i += n
                    if mine is None or any(
                        is_transient(r) or isinstance(r, ReplyError) for r in mine
                    ):
                        try:
                            await backend._write(msg.commands, "storing a result")
                        except Exception as exc:
                            del batch[0]
                            msg.stored(exc)
                            continue
                    del batch[0]
                    msg.stored(None)
        finally:
            self._confirming = False
            stopped = actors.ActorStopped("the result store stopped before storing it")
            for msg in (*batch, *(m for told, _ in flights for m in told), *storing):
                msg.stored(stopped)
            storing.clear()

    @actors.handles(StoreResult)
    def store(self, msg: StoreResult) -> actors.Later:
        return actors.later(self.backend.set_result, msg.task_id, msg.result)

    @actors.handles(ForgetResult)
    def forget(self, msg: ForgetResult) -> actors.Later:
        return actors.later(self.backend.forget, msg.task_id)

    @actors.handles(SetProgress)
    def set_progress(self, msg: SetProgress) -> actors.Later:
        return actors.later(self.backend.set_progress, msg.task_id, msg.progress)

    # ------------------------------------------------------------------- reads

    @actors.handles(GetResult)
    def get(self, msg: GetResult) -> actors.Later:
        return actors.later(self._get, msg.task_id)

    async def _get(self, tid: TaskID) -> TaskResult[Any] | None:
        try:
            return await self.backend.get_result(tid)
        except ResultNotFound:
            return None

    @actors.handles(GetProgress)
    def get_progress(self, msg: GetProgress) -> actors.Later:
        return actors.later(self.backend.get_progress, msg.task_id)

    # ---------------------------------------------------------------- watching

    @actors.handles(Sent, inline=True)
    def sent(self, msg: Sent) -> None:
        if self._live:
            sent = self._sent
            if len(sent) >= _SENT_MAX:
                sent.clear()  # their waiters read, as before (cheaper than the oldest out)
            sent[msg.task_id] = None

    @actors.handles(_Live, inline=True)
    def live(self, msg: _Live) -> None:
        self._live = self._view.live = True

    @actors.handles(Watch, inline=True)
    def watch(self, msg: Watch) -> None:
        self.watchers.setdefault(msg.task_id, []).append(msg.watcher)
        if self._sent and self._sent.pop(msg.task_id, False) is None:
            # Sent from here after the subscription was confirmed (Sent came after
            # _Live in this mailbox, the announcement can only come after Sent), and
            # no announcement of it was handled since nor the subscription made again:
            # its result is not stored yet, or its announcement is still on its way.
            # If the subscription drops meanwhile, Resubscribed reads every key waited
            # on. So no read: the announcement wakes this waiter (or, if none came
            # within _LATE_READ, one late read: see _read_late).
            self._late[msg.task_id] = trio.current_time() + _LATE_READ
            if not self._late_reading:
                self._late_reading = True
                self.nursery.start_soon(self._read_late)
            return
        if not self.subscribed.is_set() and not self._subscribing:
            # Subscribe when the first waiter of this process waits: a worker-only
            # process would otherwise receive every announcement.
            self._subscribing = True
            self.nursery.start_soon(self._subscribe)
        # Registered first, then read: a result stored in between is seen either way.
        self._to_check.add(msg.task_id)
        if not self._checking:
            self._checking = True
            self.nursery.start_soon(self._check)

    @actors.handles(Unwatch, inline=True)
    def unwatch(self, msg: Unwatch) -> None:
        ws = self.watchers.get(msg.task_id)
        if ws is not None:
            if msg.watcher in ws:
                ws.remove(msg.watcher)
            if not ws:
                del self.watchers[msg.task_id]

    async def _subscribe(self) -> None:
        sub = await subscription_of(self.conn_ref)
        await sub.ask(Subscribe(self.backend.channel, self.ref))
        self.subscribed.set()
        self.ref.tell_nowait(_Live())  # in mailbox order with Sent (see watch)

    async def _check(self) -> None:
        """Read the keys of the new watchers (after the subscription is live, so no
        announcement falls between the read and the subscription)."""
        try:
            await self.subscribed.wait()
            while self._to_check:
                ids = [t for t in self._to_check if t in self.watchers]
                self._to_check = set()
                if ids:
                    await self._read_and_wake(ids)
        finally:
            self._checking = False

    async def _read_late(self) -> None:
        """Read, once, the keys of the waiters registered without a read that are still
        waiting ``_LATE_READ`` seconds later (their ids in order of registration, so the
        first is the next due). Returns when none is left. Cancellation: the actor
        stopped; its waiters are failed by ``on_stop``."""
        late = self._late
        try:
            while late:
                tid, due = next(iter(late.items()))
                await trio.sleep_until(due)
                now = trio.current_time()
                while late:
                    tid, due = next(iter(late.items()))
                    if due > now:
                        break
                    del late[tid]
                    if tid in self.watchers:
                        self._to_check.add(tid)
                if self._to_check and not self._checking:
                    self._checking = True
                    self.nursery.start_soon(self._check)
        finally:
            self._late_reading = False

    async def _read_and_wake(self, ids: list[TaskID]) -> None:
        backend = self.backend
        keys = [backend.result_key(t) for t in ids]
        try:
            raws = await with_connection(
                self.conn_ref,
                lambda conn: conn.execute("MGET", *keys),
                deadline=trio.current_time() + backend.write_timeout,
                what="reading results",
            )
        except ConnectionLost as exc:
            log.warning("results.read_failed", error=str(exc))
            return
        assert isinstance(raws, list)
        for tid, raw in zip(ids, raws, strict=True):
            if isinstance(raw, bytes):
                result = backend.open(tid, raw)
                if result is not None:
                    self._wake(tid, result)

    def _wake(self, tid: TaskID, result: TaskResult[Any]) -> None:
        self._late.pop(tid, None)
        for w in self.watchers.pop(tid, ()):
            w.resolve(result)

    @actors.handles(Announcement, inline=True)
    def announced(self, msg: Announcement) -> None:
        # Every result stored anywhere is announced to every subscribed process, most
        # of them for tasks nobody here waits for: an id is looked up as written
        # (announced_id), and only one this process waits for is parsed and opened.
        sent, watchers = self._sent, self.watchers
        if not sent and not watchers:
            return  # nothing sent, nobody waiting: nothing to look for
        backend = self.backend
        for single in split_announcements(msg.data):
            text = backend.announced_id(single)
            if sent:
                sent.pop(text, None)  # announced: a waiter from now on reads its key
            if text in watchers:
                found = backend.parse_announcement(single)
                if found is not None:
                    tid, value = found
                    result = backend.open(tid, value)
                    if result is not None:
                        self._wake(tid, result)

    @actors.handles(Resubscribed)
    def resubscribed(self, msg: Resubscribed) -> None:
        # Announcements made while the subscription was down were missed: re-read
        # every key being waited on, and the key of every waiter to come.
        self._sent.clear()
        self._to_check.update(self.watchers)
        if not self._checking and self._to_check:
            self._checking = True
            self.nursery.start_soon(self._check)

    async def on_stop(self) -> None:
        watchers, self.watchers = self.watchers, {}
        for ws in watchers.values():
            for w in ws:
                w.fail("the result backend shut down")


class RedisResultBackend(ResultBackend):
    """Results in Redis, pushed to waiters through one pub/sub subscription per process.

    - ``url``: a ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
      ``redis+cluster://`` URL (password and db included); a malformed one raises
      ``ValueError`` here.
    - ``min_replicas_ack``: a result store returns once this many replicas have it
      (``WAIT``; stored again until then, within ``write_timeout``).
    - ``ttl``: seconds a result (and a progress report) is kept (``SET ... PX``).
    - ``prefix``: first part of every key and of the channel (default ``"bus"``).
    - ``codec``: how results are encoded (JSON by default; nothing is ever unpickled).
    - ``write_timeout``: seconds a write is retried while Redis is unreachable.
    - ``command_timeout``: seconds a read (``get_result``, ``is_ready``,
      ``get_progress``) waits while Redis is unreachable, then
      :class:`bus.BrokerUnavailable` (``None``: as long as it takes). ``wait_result``
      is not bounded by it: it waits through an outage until its own timeout.
    - ``secret``: HMAC-SHA256 key (a ``RedisBroker`` hands its own to a backend without
      one): each result is stored and announced signed with its task id, and a result
      that is unsigned, wrongly signed or stored for another task is ignored (logged).

    Keys: ``{prefix}:result:{task_id}``, ``{prefix}:progress:{task_id}``; channel
    ``{prefix}:results`` (payload: the task id followed by the encoded result). In one
    process, every user of the same URL shares one connection and one subscription.
    """

    def __init__(
        self,
        url: str | RedisURL = "redis://127.0.0.1:6379",
        *,
        ttl: float = 86_400.0,
        prefix: str = "bus",
        codec: Codec | None = None,
        write_timeout: float = 300.0,
        command_timeout: float | None = 10.0,
        secret: bytes | str | None = None,
        min_replicas_ack: int = 0,
    ) -> None:
        if (
            isinstance(min_replicas_ack, bool)
            or not isinstance(min_replicas_ack, int)
            or min_replicas_ack < 0
        ):
            raise ValueError(f"min_replicas_ack must be an integer >= 0, not {min_replicas_ack!r}")
        #: A result is stored only once this many replicas have it (``WAIT``).
        self.min_replicas_ack = min_replicas_ack
        if command_timeout is not None and (
            isinstance(command_timeout, bool)
            or not isinstance(command_timeout, int | float)
            or not 0 < command_timeout < math.inf
        ):
            raise ValueError(
                f"command_timeout must be > 0 seconds or None, not {command_timeout!r}"
            )
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if not isinstance(write_timeout, int | float) or not 0 < write_timeout < math.inf:
            raise ValueError(f"write_timeout must be > 0 seconds, not {write_timeout!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, not {prefix!r}")
        self.url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        self.ttl = float(ttl)
        self.ttl_ms = max(1, int(ttl * 1000))
        self.prefix = prefix
        self.codec: Codec = codec or JSONCodec()
        self.write_timeout = float(write_timeout)
        self.command_timeout = None if command_timeout is None else float(command_timeout)
        self.channel = f"{prefix}:results".encode()
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not isinstance(secret, bytes):
            raise TypeError(f"secret must be bytes, str or None, not {type(secret).__name__}")
        self.secret: bytes | None = secret
        self._ref: actors.ActorRef | None = None
        self._conn_ref: actors.ActorRef | None = None
        #: A write of this process waits one scheduler pass for others to join it.
        self._gathering = False
        #: The newest task id told to the store as sent (see :meth:`sending`).
        self._newest_sent = ""
        #: The store's waiters and read view (one per start; see :class:`_Waiters`).
        self._waiters = _Waiters()
        #: Tasks whose result needs no DEL of a progress key: the first run anywhere of
        #: their first attempt (the reader made its claim) that stored no progress here.
        #: Filled by :meth:`mark_first_run`; a task not in it gets the DEL (the safe way).
        self._first_runs: set[str] = set()

    # ------------------------------------------------------------------ keys

    def result_key(self, task_id: str) -> bytes:
        return f"{self.prefix}:result:{task_id}".encode()

    def progress_key(self, task_id: str) -> bytes:
        return f"{self.prefix}:progress:{task_id}".encode()

    # ------------------------------------------------------------- lifecycle

    @property
    def ref(self) -> actors.ActorRef:
        if self._ref is None:
            raise RuntimeError("the result backend is not running (enter `async with broker`)")
        return self._ref

    async def startup(self, system: actors.ActorSystem) -> None:
        conn_ref = self._conn_ref = await shared_connection(system, self.url)
        waiters = self._waiters = _Waiters()  # outlives each instance of the store actor
        self._ref = await system.spawn(
            lambda: RedisResultStoreActor(self, conn_ref, waiters),
            name="results",
            mailbox_size=math.inf,
            on_failure=actors.RESTART,
            max_restarts=BUG_RESTARTS,  # then it escalates: the process ends
            backoff=BACKOFF,
        )

    async def shutdown(self) -> None:
        ref, self._ref = self._ref, None
        if ref is not None and ref.is_alive:
            await ref.stop()

    def sending(self, task_id: TaskID) -> None:
        """Called by a producer of this process just before it writes the send of
        ``task_id``. Nothing while the store's subscription is not confirmed (it
        would ignore the news: see :class:`_Waiters`). When the id is the last one
        this process made (``TaskID.new``) and newer than every id sent through here
        before, it was never sent anywhere: no result of it can be stored yet, and the
        store is told (see :class:`Sent`), so a ``wait_result`` for it may need no
        read. An id sent again (``with_task_id``: a worker drops the repeat and
        announces nothing) is not. Not a checkpoint."""
        ref = self._ref
        if not self._waiters.live:
            return  # the store would ignore it: no tell (about 5 % of a send's CPU)
        if ref is not None and task_id > self._newest_sent and _made_last(task_id):
            self._newest_sent = task_id
            with contextlib.suppress(actors.ActorStopped):
                ref.tell_nowait(Sent(task_id))  # unbounded mailbox: never full

    def _conn(self) -> actors.ActorRef:
        if self._conn_ref is None:
            raise ResultNotFound("-", "the result backend is not running")
        return self._conn_ref

    # --------------------------------------------------------------- encoding

    def decode(self, data: bytes) -> TaskResult[Any] | None:
        try:
            return self.codec.decode_result(data)
        except DecodeError as exc:
            log.error("results.undecodable", error=str(exc))
            return None

    def open(self, task_id: TaskID, value: bytes) -> TaskResult[Any] | None:
        """The result a result key (or an announcement, after the id) holds for
        ``task_id``; ``None`` (logged) when it is unsigned or wrongly signed (with a
        secret), undecodable, or the result of another task."""
        data, refused = open_result(self.secret, task_id, value)
        if data is None:
            log.warning("results.refused", task_id=task_id, reason=refused)
            return None
        result = self.decode(data)
        if result is not None and result.task_id != task_id:
            log.warning(
                "results.refused",
                task_id=task_id,
                reason=f"the result is that of another task ({result.task_id})",
            )
            return None
        return result

    def announcement(self, task_id: TaskID, value: bytes) -> bytes:
        """What a result's announcement carries: the task id, then the key's value."""
        return task_id.encode() + value

    def parse_announcement(self, payload: bytes) -> tuple[TaskID, bytes] | None:
        """The task id and the value an :meth:`announcement` carries (``None``: not
        one)."""
        if len(payload) < 36:
            return None
        try:
            return TaskID.parse(payload[:36].decode("ascii")), payload[36:]
        except (UnicodeDecodeError, ValueError):
            return None

    def announced_id(self, payload: bytes) -> str:
        """The text of the task id an :meth:`announcement` names, as its bytes read
        (latin-1: any bytes, one character each): unchecked and never raising, to be
        looked up among the ids this process knows before :meth:`parse_announcement`
        checks it. What is not an announcement gives a text no task id has."""
        return payload[:36].decode("latin-1")

    def announce_commands(self, commands: list[Command]) -> list[Command]:
        """``commands`` (those of several :meth:`store_commands`) with their result
        announcements joined: one ``PUBLISH`` for every :data:`_ANNOUNCE_BATCH`
        results, after the rest, in place of one each (a command less a result for
        Redis to run and, on a cluster, to spread to every node)."""
        channel = self.channel
        rest: list[Command] = []
        payloads: list[bytes] = []
        for c in commands:
            payload = c[2] if len(c) == 3 else None
            if c[0] == "PUBLISH" and c[1] == channel and isinstance(payload, bytes):
                payloads.append(payload)
            else:
                rest.append(c)
        if len(payloads) < 2:
            return commands
        for i in range(0, len(payloads), _ANNOUNCE_BATCH):
            rest.append(("PUBLISH", channel, join_announcements(payloads[i : i + _ANNOUNCE_BATCH])))
        return rest

    def store_commands(
        self, task_id: TaskID, data: bytes, *, only_new: bool
    ) -> tuple[Command, ...]:
        key = self.result_key(task_id)
        data = seal_result(self.secret, task_id, data)
        payload = self.announcement(task_id, data)
        set_cmd: Command = ("SET", key, data, "PX", self.ttl_ms, *(("NX",) if only_new else ()))
        first_runs = self._first_runs
        if task_id in first_runs:
            # No run of this task but this one, which stored no progress: no progress
            # key can exist, so no DEL (one command in five of a drain).
            first_runs.discard(task_id)
            return (set_cmd, ("PUBLISH", self.channel, payload))
        return (set_cmd, ("PUBLISH", self.channel, payload), ("DEL", self.progress_key(task_id)))

    def mark_first_run(self, task_id: str, first: bool) -> None:
        """What the stream reader knows of a delivery it claimed: ``first`` when it is
        the task's first attempt and its claim was made now (no other entry or process
        ran it: no progress of another run can exist). Its result is then stored
        without deleting a progress key, unless progress is stored here meanwhile.
        Bounded: past ``_FIRST_RUNS_MAX`` tasks (deliveries never stored here, handed
        back at a stop) the marks are dropped, and those results delete as before."""
        first_runs = self._first_runs
        if not first:
            first_runs.discard(task_id)
            return
        if len(first_runs) >= _FIRST_RUNS_MAX:
            first_runs.clear()
        first_runs.add(task_id)

    async def _write(self, commands: tuple[Command, ...], what: str) -> list[Any]:
        """Queue ``commands`` through the store actor and wait for their replies,
        retrying while Redis is unreachable (within ``write_timeout``)."""
        deadline = trio.current_time() + self.write_timeout
        self._conn()  # running?
        while True:
            try:
                pending: Pending | None = await self.ref.ask(Write(commands))
                if pending is None:
                    raise ConnectionLost("not connected")
                if not self._gathering:
                    # The first write of this scheduler pass waits for the pass's
                    # end: the others of the pass (a worker's runners storing their
                    # results) queue theirs meanwhile, and one write carries them
                    # all (the write, not the command, is what costs; a lone write
                    # waits one pass). trio.lowlevel: a yield that no cancellation
                    # can interrupt (the command is queued: its reply is awaited).
                    self._gathering = True
                    try:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    finally:
                        self._gathering = False
                replies = await pending.wait()
            except (ConnectionLost, RedisTimeout) as exc:
                left = deadline - trio.current_time()
                if left <= 0 or not await wait_connected(self.ref, left):
                    raise ConnectionLost(f"{what}: {exc}") from exc
                continue
            if any(is_transient(r) for r in replies):
                # Redis is loading its data (after a restart) or settling: not yet.
                if trio.current_time() >= deadline:
                    raise ConnectionLost(f"{what}: Redis is not ready")
                await trio.sleep(0.1)
                continue
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
            return replies

    # ------------------------------------------------------------- the ABC

    async def set_result(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store and announce ``result``; retried while Redis is unreachable, for up to
        ``write_timeout`` seconds (then ``ConnectionLost``)."""
        data = encode_result_checked(self.codec, task_id, result)
        commands = self.store_commands(task_id, data, only_new=False)
        wanted = self.min_replicas_ack
        if not wanted:
            await self._write(commands, "storing a result")
            return
        # Stored only once enough replicas have it: else a failover could lose it.
        # Stored again until then (within write_timeout): a SET that a failover lost
        # is written to the new master.
        wait_ms = max(1, int(1000 * min(self.command_timeout or 10.0, 10.0)))
        deadline = trio.current_time() + self.write_timeout
        while True:
            replies = await self._write((*commands, ("WAIT", wanted, wait_ms)), "storing a result")
            acked = replies[-1]
            if isinstance(acked, int) and acked >= wanted:
                return
            if trio.current_time() >= deadline:
                raise ConnectionLost(
                    f"storing a result: only {acked} of the {wanted} replicas that "
                    f"min_replicas_ack asks for confirmed it within {self.write_timeout:g} s"
                )

    def set_result_soon(
        self,
        task_id: TaskID,
        result: TaskResult[Any],
        stored: Callable[[BaseException | None], None],
    ) -> bool:
        """Queue the result's write on the shared connection and return at once; the
        store actor calls ``stored`` once Redis has it (see the base class). Not with
        ``min_replicas_ack`` (False: use :meth:`set_result`)."""
        ref = self._ref
        if ref is None or self.min_replicas_ack:
            return False
        data = encode_result_checked(self.codec, task_id, result)
        commands = self.store_commands(task_id, data, only_new=False)
        try:
            ref.tell_nowait(StoreSoon(commands, stored))  # unbounded mailbox: never full
        except actors.ActorStopped:
            return False
        return True

    async def set_result_if_absent(self, task_id: TaskID, result: TaskResult[Any]) -> bool:
        data = encode_result_checked(self.codec, task_id, result)
        commands = self.store_commands(task_id, data, only_new=True)
        stored, *_ = await self._write(commands[:1], "storing a result")
        if stored is not None:
            await self._write(commands[1:2], "announcing a result")
        return stored is not None

    async def _execute(self, *args: Any) -> Any:
        """A read, within ``command_timeout`` (then :class:`bus.BrokerUnavailable`)."""
        conn_ref = self._conn()
        start = trio.current_time()
        timeout = self.command_timeout
        deadline = math.inf if timeout is None else start + timeout
        what = f"cannot read results ({args[0]})"
        try:
            with trio.fail_at(deadline):
                return await with_connection(
                    conn_ref, lambda conn: conn.execute(*args), deadline=deadline, what=what
                )
        except (RedisError, trio.TooSlowError) as exc:
            raise BrokerUnavailable(
                what,
                url=self.url.redacted(),
                waited=round(trio.current_time() - start, 3),
                cause=str(exc) or "no answer in time",
            ) from None

    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        raw = await self._execute("GET", self.result_key(task_id))
        if raw is None:
            raise ResultNotFound(task_id, "no result is stored (not finished, or expired)")
        result = self.open(TaskID.parse(task_id), raw)
        if result is None:
            raise ResultNotFound(
                task_id, "the stored result cannot be decoded, or is not signed for it"
            )
        return result

    async def is_ready(self, task_id: TaskID) -> bool:
        return bool(await self._execute("EXISTS", self.result_key(task_id)))

    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        ref = self._ref
        if ref is None:
            raise ResultNotFound(task_id, "the result backend is not running")
        tid = TaskID.parse(task_id)
        watcher = Watcher()
        try:
            ref.tell_nowait(Watch(tid, watcher))  # unbounded mailbox: never full
        except actors.ActorStopped:
            raise ResultNotFound(tid, "the result backend is stopping") from None
        try:
            await watcher.wait(timeout)
        finally:
            if not watcher.event.is_set() and self._ref is not None:
                # A store that stops meanwhile forgets its watchers anyway; never
                # let that hide the exception (Cancelled) that ended the wait.
                with contextlib.suppress(actors.ActorStopped):
                    self._ref.tell_nowait(Unwatch(tid, watcher))
        if watcher.result is not None:
            return watcher.result
        if watcher.gone:
            raise ResultNotFound(task_id, watcher.gone)
        raise ResultTimeout(task_id, math.inf if timeout is None else timeout)

    async def forget(self, task_id: TaskID) -> None:
        await self._write(
            (("DEL", self.result_key(task_id), self.progress_key(task_id)),), "forgetting a result"
        )

    async def set_progress(self, task_id: TaskID, progress: Any) -> None:
        data = json.dumps(progress, separators=(",", ":"), allow_nan=False).encode()
        self._first_runs.discard(task_id)  # its result deletes the progress key
        await self._write(
            (("SET", self.progress_key(task_id), data, "PX", self.ttl_ms),), "storing progress"
        )

    async def get_progress(self, task_id: TaskID) -> Any | None:
        raw = await self._execute("GET", self.progress_key(task_id))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # a poisoned key: no progress to show
            return None
