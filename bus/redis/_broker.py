"""The Redis Streams broker: a small tree of supervised actors.

``RedisBroker`` is the facade. Behind it:

- the process's shared :class:`~bus.redis._pool.ConnectionActor` for the URL (the
  command connection, and as its child the one pub/sub subscription);
- :class:`RedisBrokerActor` (``broker.ref``): it turns the ``Send``s, ``Ack``s and
  ``Nack``s of each mailbox drain into one write on the shared connection, retried
  until Redis is back; it listens to cancel announcements;
- its children: a :class:`~bus.redis._reader.StreamReaderActor` per set of queues
  that workers here consume, and the :class:`DelayedMoverActor`.

Queues and levels: every queue has its own keys (``Keys(prefix, queue)``, one hash
tag per queue), and a stream and a delayed set per priority level; level 0 keeps the
names a queue always had. A send goes to its queue's stream of its level; an entry's
tag says which stream it came from (a bare id for the default queue's level 0), so
its ack, retry, dead letter and hand-back go back there.

Shutdown follows the tree: workers first, then the broker actor (its last acks are
queued, its children stop: the reader hands back what is unfinished), then its
writes are confirmed, and the connections close last.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
import trio.lowlevel

import actors
from actors._log import get_logger
from bus._broker import Broker
from bus._codec import Codec
from bus._errors import BrokerClosed, BrokerUnavailable, SendError
from bus._ids import TaskID
from bus._message import TaskMessage
from bus._middleware import Middleware
from bus._options import check_queue_name
from bus._protocol import (
    BrokerInfo,
    Cancel,
    Inspect,
)
from bus._results import ResultBackend
from bus._supervision import BUG_RESTARTS
from bus.redis._client import (
    Connection,
    ConnectionLost,
    Pending,
    RedisError,
    RedisTimeout,
    ReplyError,
)
from bus.redis._logic import (
    Keys,
    unique_holder,
)
from bus.redis._pool import (
    BACKOFF,
    Unusable,
    is_transient,
    lend,
    shared_connection,
    wait_connected,
    with_connection,
)
from bus.redis._results import RedisResultBackend
from bus.redis._schedules import RedisScheduleBackend
from bus.redis._settings import RedisSettings

if TYPE_CHECKING:
    from bus.redis import _ops
    from bus.redis._workflows import RedisWorkflowBackend

from bus.redis._broker_actor import RedisBrokerActor, _deadline, _Writes
from bus.redis._mover import DelayedMoverActor, SendMany, SendNow

__all__ = ["DelayedMoverActor", "RedisBroker", "RedisBrokerActor"]

log = get_logger("bus.redis")
T = TypeVar("T")


# ------------------------------------------------------------------ the facade


def _what(what: str | TaskMessage) -> str:
    """The beginning of a send's error text (see :meth:`RedisBroker._submit`)."""
    return what if isinstance(what, str) else f"cannot send {what.task_name}"


class RedisBroker(Broker):
    """Tasks on a Redis Streams queue, run by worker processes (``run_worker``).

    Delivery is at-least-once: a task whose worker dies is run again by another one,
    so make tasks idempotent. Every setting is a :class:`RedisSettings` field, given
    as a keyword argument (or all at once with ``settings=``); see docs/redis.md for
    the keys, every setting, and how to inspect dead letters.
    """

    distributed = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        settings: RedisSettings | None = None,
        concurrency: int = 100,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: Iterable[Middleware] = (),
        shutdown_timeout: float = 30.0,
        client_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if client_options:
            raise ValueError(
                "client_options is gone with coredis: put connection options in the URL "
                "(?connect_timeout=5&command_timeout=30, ssl_ca_certs=... for rediss://)"
            )
        if settings is None:
            try:
                settings = RedisSettings(url=url, **options)
            except TypeError as exc:
                raise TypeError(f"RedisBroker: {exc}") from None
        elif options:
            settings = attrs.evolve(settings, **options)
        self.settings = settings
        if result_backend is None:
            result_backend = RedisResultBackend(
                settings.url,
                prefix=settings.prefix,
                codec=codec,
                write_timeout=settings.write_timeout,
                command_timeout=settings.command_timeout,
                secret=settings.secret,
            )
        elif isinstance(result_backend, RedisResultBackend) and result_backend.secret is None:
            # The broker's secret signs and checks its results too (a backend given its
            # own secret keeps it).
            result_backend.secret = settings.secret
        super().__init__(
            concurrency=concurrency,
            result_backend=result_backend,
            codec=codec,
            middlewares=middlewares,
            shutdown_timeout=shutdown_timeout,
        )
        self.keys = Keys(settings.prefix, settings.queue)
        self._conn_ref: actors.ActorRef | None = None

    # Names kept from earlier versions.

    @property
    def url(self) -> str:
        """The broker's URL, without its password."""
        return self.settings.url.redacted()

    @property
    def queue(self) -> str:
        return self.settings.queue

    @property
    def consumer(self) -> bytes:
        return self.settings.consumer.encode()

    @property
    def group(self) -> bytes:
        return self.settings.group.encode()

    # ------------------------------------------------------------ lifecycle

    def describe(self) -> dict[str, str]:
        return {"url": self.url, "queue": self.queue}

    def __repr__(self) -> str:
        return f"<RedisBroker {self.url} queue={self.queue!r}>"

    async def _open(self, system: actors.ActorSystem) -> actors.ActorRef:
        conn_ref = self._conn_ref = await shared_connection(system, self.settings.url)
        timeout = (
            self.connect_timeout
            if self.connect_timeout is not None
            else self.settings.connect_timeout
        )
        start = trio.current_time()
        try:
            await lend(conn_ref, timeout=timeout)
        except RedisError as exc:
            raise self._unavailable("cannot start", start, exc) from None
        settings, keys, codec, results = self.settings, self.keys, self.codec, self.result_backend
        tasks = self.tasks
        writes = _Writes()  # outlives each instance of the broker actor
        return await system.spawn(
            lambda: RedisBrokerActor(settings, keys, codec, results, conn_ref, tasks, writes),
            name="broker",
            mailbox_size=math.inf,
            on_failure=actors.RESTART,
            max_restarts=BUG_RESTARTS,  # then it escalates: the process ends
            backoff=BACKOFF,
        )

    def _unavailable(
        self, what: str, start: float, exc: BaseException | str, maybe_stored: bool = False
    ) -> BrokerUnavailable:
        """The error a caller sees when Redis could not be used in time."""
        cause = exc if isinstance(exc, str) else str(exc)
        return BrokerUnavailable(
            what,
            url=self.url,
            waited=round(trio.current_time() - start, 3),
            cause=cause,
            maybe_stored=maybe_stored,
        )

    async def _bounded(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run an operator call that needs Redis within ``command_timeout``: any way
        Redis fails it (unreachable, refused, no answer) is a
        :class:`~bus.BrokerUnavailable`."""
        start = trio.current_time()
        deadline = _deadline(self.settings.command_timeout)
        try:
            with trio.fail_at(deadline):
                return await fn()
        except trio.TooSlowError:
            raise self._unavailable(what, start, "no answer in time") from None
        except RedisError as exc:
            raise self._unavailable(what, start, exc) from None
        except actors.ActorStopped:
            raise BrokerClosed(f"{what}: the broker is shutting down") from None

    async def _io(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await self._bounded(what, fn)

    async def _connection_call(self, what: str, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """``fn(conn)`` on the shared connection, again on the next one after a fault,
        within ``command_timeout`` (see :meth:`_bounded`)."""
        conn_ref = self._conn_ref
        if conn_ref is None:
            raise BrokerClosed("the Redis broker is not running: use it inside `async with broker`")
        deadline = _deadline(self.settings.command_timeout)
        return await self._bounded(
            what, lambda: with_connection(conn_ref, fn, deadline=deadline, what=what)
        )

    async def inspect(self) -> BrokerInfo:
        """Numbers for operators (see :meth:`Broker.inspect`); raises
        :class:`~bus.BrokerUnavailable` after ``command_timeout`` without Redis."""
        ref = self.ref
        info: BrokerInfo = await self._bounded(
            "cannot inspect the queue", lambda: ref.ask(Inspect())
        )
        return await self._with_workflows(info)

    async def cancel_task(self, task_id: TaskID | str) -> None:
        """Cancel a task by id (see :meth:`TaskHandle.cancel`): marked and announced in
        Redis before this returns; :class:`~bus.BrokerUnavailable` after
        ``command_timeout`` without Redis."""
        tid = TaskID.parse(task_id)
        ref = self.ref
        await self._bounded(f"cannot cancel {tid}", lambda: ref.ask(Cancel(tid)))

    def _schedule_backend(self) -> RedisScheduleBackend:
        conn_ref = self._conn_ref
        if conn_ref is None:
            raise RuntimeError("the Redis broker is not running")
        return RedisScheduleBackend(self.settings, self.keys, conn_ref)

    def _workflow_backend(self) -> RedisWorkflowBackend:
        """Workflows in Redis: one Lua call per step's transition (bus/redis/_workflows.py)."""
        from bus.redis._workflows import RedisWorkflowBackend

        return RedisWorkflowBackend(self)

    # ---------------------------------------------------------------- sending

    def _encode(self, message: TaskMessage) -> bytes:
        """The encoded message; :class:`SendError` when it cannot be encoded or is
        larger than ``max_message_bytes`` (workers would refuse it)."""
        data = super()._encode(message)
        limit = self.settings.max_message_bytes
        if len(data) > limit:
            raise SendError(
                f"cannot send {message.task_name}: the message is {len(data)} bytes, more "
                f"than max_message_bytes={limit} (send a reference to large data instead)"
            )
        return data

    async def _send(self, message: TaskMessage) -> TaskID:
        data = self._encode(message)
        results = self.result_backend
        if isinstance(results, RedisResultBackend):
            results.sending(message.task_id)  # a waiter to come may need no read
        replies = await self._submit(SendNow(message, data), message)
        labels = message.labels
        if not labels or "unique_key" not in labels:
            return message.task_id  # (the common case, without _sent_id's coroutine)
        what = f"cannot send {message.task_name}"
        return await self._sent_id(message, data, replies[0] if replies else None, what)

    async def _sent_id(self, message: TaskMessage, data: bytes, reply: Any, what: str) -> TaskID:
        """The id of the task that will run for a sent ``message``: its own, or for a
        unique job whose key another task holds, that task's (the claim's reply). A
        key holding a value this secret did not make is taken over (once): its holder
        is a forgery, not a queued task."""
        labels = message.labels
        if not labels or "unique_key" not in labels or not isinstance(reply, bytes):
            return message.task_id
        secret = self.settings.secret
        key = self.keys_of_queue(message.queue).unique(labels["unique_key"])
        holder = unique_holder(secret, key, reply)
        if holder is None:
            log.warning(
                "unique.forged_value", key=key.decode(errors="replace"), task_id=message.task_id
            )
            replies = await self._submit(SendNow(message, data, replace=reply), what)
            reply = replies[0] if replies else None
            holder = unique_holder(secret, key, reply)
            if holder is None:
                raise SendError(f"{what}: its unique key holds a value not signed with the secret")
        return TaskID.parse(holder)

    def keys_of_queue(self, queue: str | None) -> Keys:
        """The keys of ``queue`` (``None``: the default queue)."""
        return self.keys if queue is None else self.keys.of(queue)

    async def _submit(self, ask: object, what: str | TaskMessage) -> list[Any]:
        """Ask the broker actor to queue a write and wait for its replies; wait for
        Redis while it is unreachable, for up to ``send_timeout`` seconds, then
        :class:`~bus.BrokerUnavailable`. A write that broke with its connection is
        made again on the next one: an XADD may then be stored twice (delivery is
        at-least-once anyway). ``what`` begins the errors' text (a message: "cannot
        send" and its task's name, made only on an error).

        Cancellation: a write already made may still be stored."""
        ref = self.ref
        start = trio.current_time()
        # The first try, the usual case: the connection bounds the wait for the reply
        # (send_timeout), so no cancel scope is paid for on every send.
        try:
            pending: Pending | None = await ref.ask(ask)
            if pending is not None:
                replies = await pending.wait()
                for r in replies:
                    if type(r) is ReplyError:
                        break
                else:  # (a loop, not any(): no generator made on every send)
                    if self.settings.min_replicas_ack:
                        replies, acked = replies[:-1], replies[-1]
                        self._check_acked(acked, _what(what))
                    return replies
                if not any(is_transient(r) for r in replies):  # Redis said no
                    for reply in replies:
                        if isinstance(reply, ReplyError):
                            raise SendError(f"{_what(what)}: Redis refused it: {reply.message}")
        except (ConnectionLost, RedisTimeout):
            pass  # the careful way below, within the bound
        except actors.ActorStopped:
            raise BrokerClosed(f"{_what(what)}: the broker is shutting down") from None
        return await self._submit_slowly(ask, _what(what), start)

    async def _submit_slowly(self, ask: object, what: str, start: float) -> list[Any]:
        """:meth:`_submit` when the first try (made at ``start``) did not do: wait for
        Redis, within ``send_timeout`` of ``start``."""
        timeout = self.settings.send_timeout
        deadline = math.inf if timeout is None else start + timeout
        conn_ref = self._conn_ref
        ref = self.ref
        assert conn_ref is not None
        written = False
        cause = "no connection"
        while True:
            with trio.move_on_at(deadline):
                try:
                    pending = await ref.ask(ask)
                    if pending is None:
                        # No connection: wait for one, and for the broker actor's.
                        await lend(conn_ref)
                        await wait_connected(ref, math.inf)
                        continue
                    written = True
                    replies: list[Any] = await pending.wait()
                except Unusable as exc:
                    raise self._unavailable(what, start, exc, written) from None
                except (ConnectionLost, RedisTimeout) as exc:
                    cause = str(exc)
                    continue
                except actors.ActorStopped:
                    raise BrokerClosed(f"{what}: the broker is shutting down") from None
                if any(is_transient(r) for r in replies):
                    # Redis is loading its data (after a restart) or settling: nothing
                    # was written; try again until the deadline.
                    cause = next(r.message for r in replies if is_transient(r))
                    await trio.sleep(0.1)
                    continue
                for reply in replies:
                    if isinstance(reply, ReplyError):
                        raise SendError(f"{what}: Redis refused it: {reply.message}")
                if self.settings.min_replicas_ack:
                    replies, acked = replies[:-1], replies[-1]
                    self._check_acked(acked, what)
                return replies
            raise self._unavailable(what, start, cause, written)

    def _check_acked(self, acked: Any, what: str) -> None:
        wanted = self.settings.min_replicas_ack
        if not isinstance(acked, int) or acked < wanted:
            raise SendError(
                f"{what}: Redis has it, but only {acked} of the {wanted} replicas that "
                f"min_replicas_ack asks for confirmed it within "
                f"{self.settings.wait_ms / 1000:g} s: a failover could lose it (it may run)"
            )

    async def kick_many(self, messages: Sequence[TaskMessage]) -> list[TaskID]:
        """Send many messages in pipelines (one write per 500): the fast path for bulk
        producers. Middlewares' ``pre_send``/``post_send`` run for each message. On
        failure some of the messages may have been sent. Returns the task ids that will
        run, in order (a unique job's holder's id when its key was held)."""
        hooks = self.hooks
        prepared: list[tuple[TaskMessage, bytes]] = []
        for m in messages:
            if "pre_send" in hooks.has:
                m = await hooks.transform("pre_send", m)
            self._check_send(m)
            prepared.append((m, self._encode(m)))
        ids: list[TaskID] = []
        for i in range(0, len(prepared), 500):
            chunk = tuple(prepared[i : i + 500])
            replies = await self._submit(SendMany(chunk), "cannot send a batch")
            for (m, d), r in zip(chunk, replies, strict=True):
                ids.append(await self._sent_id(m, d, r, "cannot send a batch"))
            self.stats.sent += len(chunk)
        if "post_send" in hooks.has:
            for m, _ in prepared:
                await hooks.run_all("post_send", m)  # sent: never raise now
        return ids

    # ------------------------------------------------------------- operators

    @property
    def client(self) -> _ops.Client:
        """A small Redis client for your tasks and tools: ``await
        broker.client.execute("INCR", key)`` on the process's shared connection
        (retried while Redis is unreachable, for up to ``command_timeout``)."""
        from bus.redis import _ops  # operator calls: not loaded by a worker that makes none

        conn_ref = self._conn_ref
        if conn_ref is None:
            raise RuntimeError("the Redis broker is not running")
        return _ops.Client(conn_ref, self.settings.command_timeout, self.url)

    def _registered_retries(self, message: TaskMessage) -> int:
        """The retries of the task ``message`` names, as registered here (0: unknown)."""
        task = self.tasks.get(message.task_name)
        return 0 if task is None else task.options.retries

    def _dead_keys(self, queue: str | None) -> Keys:
        """The keys of ``queue`` (``None``: the broker's default queue)."""
        return self.keys if queue is None else self.keys.of(check_queue_name(queue))

    async def dead_letters(
        self, limit: int = 100, *, queue: str | None = None
    ) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters of ``queue`` (default: the broker's queue),
        as dicts: ``id`` (dead-letter entry id), ``reason``, ``task_name`` and
        ``task_id`` (``None`` when undecodable), ``entry`` (the original stream id),
        ``deliveries``, ``time`` (Unix) and ``data`` (bytes)."""
        from bus.redis import _ops

        keys, codec = self._dead_keys(queue), self.codec
        return await self._connection_call(
            "cannot read the dead letters", lambda conn: _ops.dead_letters(conn, keys, codec, limit)
        )

    async def requeue_dead_letters(
        self,
        limit: int = 100,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        reset_attempts: bool = False,
    ) -> int:
        """Send up to ``limit`` of the oldest dead letters of ``queue`` (matching
        ``reason`` and ``task`` when given) back to that queue; returns how many were
        requeued. See :meth:`requeue_dead` for why a letter is not, and for
        ``reset_attempts``."""
        report = await self.requeue_dead(
            limit, reason=reason, task=task, queue=queue, reset_attempts=reset_attempts
        )
        return sum(1 for r in report if r["outcome"] == "requeued")

    async def requeue_dead(
        self,
        limit: int = 100,
        *,
        reason: str | None = None,
        task: str | None = None,
        queue: str | None = None,
        reset_attempts: bool = False,
    ) -> list[dict[str, Any]]:
        """Requeue dead letters and say, for each one looked at, what happened:
        ``{"id", "task_name", "reason", "outcome"}`` with outcome ``"requeued"`` or
        ``"skipped: <why>"`` (a letter dead-lettered for its signature is never
        re-signed; an undecodable one cannot run).

        A letter runs the attempt it was dead-lettered at once more: a task that
        failed for good has no retries left. ``reset_attempts=True`` gives it its
        ``retries`` (as registered here; none for a task this broker does not know)
        again: its message gets the label ``retries`` (its attempt - 1 + those) and
        is signed again; attempt numbers go on, so each still runs at most once."""
        from bus.redis import _ops

        keys, settings, codec = self._dead_keys(queue), self.settings, self.codec
        retries_for = self._registered_retries if reset_attempts else None
        return await self._connection_call(
            "cannot requeue dead letters",
            lambda conn: _ops.requeue_dead(
                conn, keys, settings, codec, limit, reason, task, self._claim_ttl(), retries_for
            ),
        )

    def _claim_ttl(self) -> float:
        """How long the claim of a task's attempt is kept: the result TTL."""
        ttl = getattr(self.result_backend, "ttl", None)
        return float(ttl) if isinstance(ttl, int | float) and 0 < ttl < math.inf else 86_400.0

    async def purge_dead_letters(self, *, queue: str | None = None) -> int:
        """Delete the dead-letter stream of ``queue`` (default: the broker's queue);
        returns how many entries it held."""
        from bus.redis import _ops

        keys = self._dead_keys(queue)
        return await self._connection_call(
            "cannot purge dead letters", lambda conn: _ops.purge_dead(conn, keys)
        )
