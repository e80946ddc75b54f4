"""A lean Trio-native Redis client on hiredis: only what the bus needs.

- :class:`Connection`: one socket (TCP, TLS or unix), RESP2. Commands are written
  straight from the calling task; concurrent callers are coalesced into one socket
  write (automatic pipelining); one reader task per connection hands the replies back
  in FIFO order, except that a caller alone in flight reads its own reply (the reader
  steps aside meanwhile). :meth:`Connection.pipeline`, :meth:`Connection.transaction`, and the
  non-waiting :meth:`Connection.submit` + :meth:`Connection.flush` for actors.
- :class:`Script`: Lua by EVALSHA, falling back to EVAL on ``NOSCRIPT``.
- :class:`PubSub`: a dedicated subscriber connection; ``subscribe`` returns once Redis
  confirmed, ``unsubscribe`` has no close timeout, messages arrive by async iteration.

Structured concurrency: a connection's reader is :meth:`Connection.run`, which the
owner starts in a nursery of its own (``await nursery.start(conn.run)``), or
:func:`open_connection` / :func:`open_pubsub` open that nursery themselves.

Blocking commands (``BLPOP``, ``XREADGROUP ... BLOCK``) hold up every command queued
behind them on the same connection (replies come back in order): give blocking reads
a connection of their own, and a per-call ``timeout=`` longer than the block.

Sentinel (``redis+sentinel://``): the connect step asks the sentinels for the master
and checks its ``ROLE`` (see ``_sentinel``); a ``READONLY`` reply drops the connection.

Cluster seam (not implemented): every key of one bus queue shares a hash tag
``{queue}``, so a queue lives in one slot and one connection serves it. A cluster
mode would intercept ``MOVED``/``ASK`` error replies where :meth:`Connection._feed`
routes a reply to its command (the one place a reply is matched to its command) and
re-send the command to the right node.
"""

from __future__ import annotations

import hashlib
import math
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Final

import attrs
import trio

from bus.redis._resp import (
    MORE,
    Arg,
    Command,
    ConnectionLost,
    RedisError,
    RedisTimeout,
    Reply,
    ReplyError,
    ReplyTooLarge,
    _ProtocolError,
    encode,
    encode_many,
    new_reader,
)
from bus.redis._sentinel import master_of
from bus.redis._url import RedisURL

__all__ = [
    "Arg",
    "Command",
    "Connection",
    "ConnectionLost",
    "Pending",
    "PubSub",
    "RedisError",
    "RedisTimeout",
    "RedisURL",
    "Reply",
    "ReplyError",
    "ReplyTooLarge",
    "Script",
    "Stats",
    "is_noscript",
    "open_connection",
    "open_pubsub",
    "rerun_noscript",
]

_READ_SIZE: Final = 65536
#: At most this many replies handed over between two offers of caller-read mode.
_MAX_SKIP: Final = 16
#: Scheduler passes the reader waits, after a caller read its own reply, for that
#: caller's next command (see Connection._await_caller).
_CALLER_PASSES: Final = 4
_INF: Final = math.inf

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --------------------------------------------------------------------------- connect


def _ssl_context(url: RedisURL) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=url.ssl_ca_certs)
    if url.ssl_cert_reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif url.ssl_cert_reqs == "optional":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _setup_commands(url: RedisURL, name: str | None) -> list[Command]:
    commands: list[Command] = []
    if url.password is not None:
        auth: list[Arg] = ["AUTH"]
        if url.username is not None:
            auth.append(url.username)
        auth.append(url.password)
        commands.append(auth)
    if url.db:
        commands.append(("SELECT", url.db))
    if name:
        commands.append(("CLIENT", "SETNAME", name))
    return commands


async def _open(
    url: RedisURL, name: str | None, ssl_context: ssl.SSLContext | None
) -> tuple[trio.abc.Stream, trio.SocketStream]:
    """Connect, do TLS and AUTH/SELECT/CLIENT SETNAME; return (stream, raw socket).

    A sentinel URL connects to the master the sentinels name, and checks with ``ROLE``
    that it is one (a failover under way: :class:`ConnectionLost`, try again)."""
    if url.is_sentinel:
        # A sentinel that has not seen the failover yet names the old master (now a
        # replica, refused by the ROLE check): ask the others.
        tried: set[tuple[str, int]] = set()
        while True:
            address = await master_of(url, _open_one, frozenset(tried))
            try:
                return await _open_one(url.node(*address), name, ssl_context, master=True)
            except _NotMaster:
                tried.add(address)
    if url.is_cluster:  # one node (a subscriber: a cluster broadcasts PUBLISH)
        failures: list[str] = []
        for host, port in url.seeds:
            try:
                return await _open_one(url.node(host, port), name, ssl_context)
            except (RedisError, OSError) as exc:
                failures.append(f"{host}:{port}: {exc}")
        raise ConnectionLost(f"no seed of {url.redacted()} answered: {'; '.join(failures)}")
    return await _open_one(url, name, ssl_context)


async def _open_one(
    url: RedisURL, name: str | None, ssl_context: ssl.SSLContext | None, *, master: bool = False
) -> tuple[trio.abc.Stream, trio.SocketStream]:
    """:func:`_open` for one server; ``master``: check that it is one (``ROLE``)."""
    where = url.redacted()
    transport: trio.SocketStream | None = None
    try:
        with trio.fail_after(url.connect_timeout):
            if url.path is not None:
                transport = await trio.open_unix_socket(url.path)
            else:
                transport = await trio.open_tcp_stream(url.host, url.port)
            stream: trio.abc.Stream = transport
            if url.tls:
                context = ssl_context if ssl_context is not None else _ssl_context(url)
                tls = trio.SSLStream(transport, context, server_hostname=url.host)
                await tls.do_handshake()
                stream = tls
            commands = _setup_commands(url, name)
            if master:
                commands.append(("ROLE",))
            if commands:
                data, count = encode_many(commands)
                await stream.send_all(data)
                reader = new_reader()
                replies: list[Reply] = []
                while len(replies) < count:
                    chunk = await stream.receive_some(_READ_SIZE)
                    if not chunk:
                        raise ConnectionLost(f"{where}: the server closed the connection")
                    reader.feed(chunk)  # type: ignore[arg-type]  # any buffer works
                    while (reply := reader.gets()) is not MORE:
                        replies.append(reply)
                for command, reply in zip(commands, replies, strict=True):
                    if isinstance(reply, ReplyError):
                        what = "AUTH" if command[0] == "AUTH" else " ".join(map(str, command))
                        raise ReplyError(f"{reply.message} (while connecting: {what})")
                role = replies[-1] if master else [b"master"]
                if not isinstance(role, list) or not role or role[0] != b"master":
                    said = role[0] if isinstance(role, list) and role else role
                    raise _NotMaster(
                        f"{where} is not a master (ROLE: {said!r:.40}): a failover is under way"
                    )
            return stream, transport
    except BaseException as exc:
        if transport is not None:
            await trio.aclose_forcefully(transport)
        if isinstance(exc, RedisError):
            raise
        if isinstance(exc, trio.TooSlowError):
            raise RedisTimeout(
                f"could not connect to {where} within {url.connect_timeout} s"
            ) from None
        if isinstance(exc, (*_STREAM_ERRORS, _ProtocolError)):
            raise ConnectionLost(f"could not connect to {where}: {exc}") from exc
        raise


class _NotMaster(ConnectionLost):
    """The server a sentinel named is not a master (``ROLE``): a failover under way."""


class _Demoted(Exception):
    """A sentinel's master answered as a replica (``READONLY``): drop the connection."""


def _as_url(url: str | RedisURL) -> RedisURL:
    return url if isinstance(url, RedisURL) else RedisURL.parse(url)


# --------------------------------------------------------------------------- base


class _Base:
    """What a command connection and a subscriber connection share: the stream,
    the reader loop, and failing for good."""

    def __init__(
        self, stream: trio.abc.Stream, transport: trio.SocketStream, url: RedisURL, name: str | None
    ) -> None:
        self.url = url
        self.name = name
        self._stream = stream
        self._transport = transport
        self._parser = new_reader()
        #: Why this connection can no longer be used (None while it can).
        self._error: str | None = None
        self._cause: BaseException | None = None
        self._closing = False
        self._started = False
        self._read_scope: trio.CancelScope | None = None
        #: The read scope's deadline (kept here: cheaper to compare than to ask).
        self._armed = _INF
        self._timeout = url.command_timeout
        #: Bytes received since the last complete reply (within one read): past
        #: ``max_reply_bytes`` the connection fails instead of buffering more.
        self._since_reply = 0
        self._max_reply = url.max_reply_bytes
        self._too_large = False
        #: The socket's descriptor, read and written directly (``os.read``/``os.write``,
        #: POSIX) to save trips through the scheduler; None for TLS (its SSLStream).
        self._fd: int | None = (
            transport.socket.fileno() if stream is transport and os.name == "posix" else None
        )

    def __repr__(self) -> str:
        state = "open" if self._error is None else "closed"
        return f"<{type(self).__name__} {self.url.redacted()} name={self.name!r} {state}>"

    @property
    def is_closed(self) -> bool:
        """True once the connection broke or was closed; it is never reused then."""
        return self._error is not None

    def _lost(self) -> ConnectionLost:
        kind = ReplyTooLarge if self._too_large else ConnectionLost
        exc = kind(f"{self.url.redacted()}: {self._error}")
        exc.__cause__ = self._cause
        return exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._lost()
        if not self._started:
            raise RuntimeError(f"{self!r}: its run() reader is not running (start it first)")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reader: hands each reply to its command, and watches the socket while
        nothing is in flight. Start it in the owner's nursery
        (``await nursery.start(conn.run)``); it reports started at once.

        Returns after :meth:`aclose`. Raises :class:`ConnectionLost` when the
        connection broke (EOF, reset, killed, a protocol error, a command timed out),
        after failing every command in flight with ConnectionLost (a timed-out command
        gets :class:`RedisTimeout`): a supervisor restarts it with a new connection.

        Cancellation: the connection is closed (commands in flight get ConnectionLost)
        and Cancelled propagates."""
        if self._started:
            raise RuntimeError(f"{self!r}: run() was already started")
        self._started = True
        task_status.started()
        if self._error is not None:
            if self._closing:
                return
            raise self._lost()
        try:
            while not self.is_closed:
                # The read deadline is that of a command in flight, or earlier (stale):
                # when it fires, overdue commands time out, else it is re-armed.
                self._armed = self._next_deadline()
                with trio.CancelScope(deadline=self._armed) as scope:
                    self._read_scope = scope
                    while True:
                        try:
                            data = await self._receive()
                        except _STREAM_ERRORS as exc:
                            await self._fail(f"connection lost: {exc}", exc)
                            break
                        got = self._absorb(data)
                        if got is True:
                            await self._deliver()
                        elif got is not False:
                            await self._fail(*got)
                            break
                if scope.cancelled_caught and not self.is_closed:
                    await self._expire()
        except BaseException as exc:
            cancelled = isinstance(exc, trio.Cancelled)
            why = "closed: its reader was cancelled" if cancelled else f"reader failed: {exc!r}"
            with trio.CancelScope(shield=True):
                await self._fail(why, None if cancelled else exc)
            raise
        if not self._closing:
            raise self._lost()

    async def _receive(self) -> bytes | bytearray:
        """The next bytes from the server (a subscriber's reader; a command connection
        has its own). On a plain socket (TCP / unix), wait until it is readable before
        reading (a read now would only fail, and a failed read costs more in Trio than
        the wait). TLS: ``receive_some``."""
        fd = self._fd
        if fd is None:
            return await self._stream.receive_some(_READ_SIZE)
        while True:
            # trio.lowlevel.wait_readable + os.read: one trip through the scheduler per
            # read where receive_some makes two (a checkpoint after a successful recv).
            await trio.lowlevel.wait_readable(fd)
            if self._error is not None:
                # Closed while this task was being woken: its number may be reused.
                raise trio.ClosedResourceError("the connection was closed")
            try:
                return os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue

    def _absorb(self, data: bytes | bytearray) -> bool | tuple[str, BaseException | None]:
        """Parse ``data`` and route the replies (:meth:`_feed`). Returns whether
        :meth:`_deliver` has work, or why the connection must fail (and the cause):
        EOF (no data), a protocol error, a demoted master, a reply past
        ``max_reply_bytes``."""
        if not data:
            return "the server closed the connection", None
        self._parser.feed(data)  # type: ignore[arg-type]  # any buffer works
        self._since_reply += len(data)
        try:
            deliver = self._feed()
        except _ProtocolError as exc:
            return f"protocol error: {exc}", exc
        except _Demoted as exc:
            return str(exc), None
        if self._since_reply > self._max_reply:
            self._too_large = True
            return (
                f"a reply larger than max_reply_bytes={self._max_reply} "
                "(a URL option); the connection was dropped"
            ), None
        return deliver

    def _feed(self) -> bool:  # pragma: no cover - overridden
        """Route the parsed replies; True if :meth:`_deliver` has work."""
        raise NotImplementedError

    async def _deliver(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _next_deadline(self) -> float:
        return _INF

    async def _expire(self) -> None:
        """The read deadline fired: fail the connection if a command is overdue."""

    def _fail_waiters(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _fail(self, why: str, cause: BaseException | None = None) -> None:
        """Make the connection unusable for good: fail everything in flight, stop the
        reader, close the socket. Idempotent; a checkpoint that cannot block. Nothing
        is logged: the ConnectionLost raised to the callers and by :meth:`run` says
        why, and the owner's supervision decides what to report."""
        if self._error is None:
            self._error = why
            self._cause = cause
            self._fail_waiters()
            if self._read_scope is not None:
                self._read_scope.cancel()
        await trio.aclose_forcefully(self._transport)

    async def drop(self, why: str) -> None:
        """Break the connection as if it were lost: :meth:`run` raises
        :class:`ConnectionLost` saying ``why`` (its supervisor connects again), and
        every command in flight gets it."""
        await self._fail(why)

    async def aclose(self) -> None:
        """Close now. Commands still in flight fail with :class:`ConnectionLost`
        (to let them finish first, await them: replies come in order, so the reply to
        one last ``PING`` means every earlier one is in); :meth:`run` returns.
        Idempotent. Cancellation: the connection is closed all the same."""
        if self._error is None:
            self._closing = True
        await self._fail("closed by aclose()")

    def _write_now(self, data: bytes) -> int:
        """Write what the socket takes right now, without blocking or a checkpoint
        (plain TCP / unix; 0 on TLS). Raises OSError if the connection broke."""
        if self._fd is None or self._error is not None:
            return 0  # never write to a closed descriptor (its number may be reused)
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    async def _send(self, data: bytes) -> None:
        """Send ``data`` whole: first :meth:`_write_now` (usually all of it), then the
        rest, or all of it on TLS, shielded from cancellation (a command is never cut
        in half on the wire) and bounded by ``command_timeout``. A failed or timed-out
        write closes the connection and raises nothing: the callers' commands fail
        instead."""
        try:
            sent = self._write_now(data)
        except OSError as exc:
            await self._fail(f"connection lost while writing: {exc}", exc)
            return
        if sent < len(data):
            await self._send_rest(memoryview(data)[sent:] if sent else data)

    async def _send_rest(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            return
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.relative_deadline = self._timeout
                await self._stream.send_all(data)
        except _STREAM_ERRORS as exc:
            await self._fail(f"connection lost while writing: {exc}", exc)
            return
        if scope.cancelled_caught:
            await self._fail("a write did not complete within the command timeout")


async def _serve(
    conn: _Base, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """``conn.run`` for the context managers: a broken connection is reported to the
    commands (ConnectionLost), not by failing the body's nursery."""
    with suppress(ConnectionLost):
        await conn.run(task_status=task_status)


@asynccontextmanager
async def _served(conn: _Base) -> AsyncIterator[None]:
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve, conn)
            try:
                yield
            except BaseException as exc:
                # Re-raised outside the nursery: a plain exception, not an ExceptionGroup.
                body_error = exc
            finally:
                await conn.aclose()
    finally:
        # Also when leaving the nursery raised (Cancelled: closing woke a command of
        # a sibling task that then failed its nursery): the body's error is not lost.
        if body_error is not None:
            try:
                raise body_error
            finally:
                body_error = None


# --------------------------------------------------------------------------- commands


@attrs.define
class Stats:
    """Counters of one connection (cheap; for tests and benchmarks)."""

    #: Commands queued (a pipeline of n counts n).
    commands: int = 0
    #: Socket writes: fewer than ``commands`` when calls were coalesced.
    writes: int = 0
    #: Calls (``execute``, ``pipeline``, ``Pending.wait``) whose caller read its own
    #: reply, being the only one waiting (caller-read mode, plain sockets only).
    own_reads: int = 0


class Pending:
    """The replies to a batch of commands given to :meth:`Connection.submit` (and the
    internal slot of every command: one per call, no Task or Event of its own)."""

    __slots__ = ("_count", "_deadline", "_error", "_replies", "_seq", "_task", "conn")

    def __init__(self, conn: Connection, count: int) -> None:
        self.conn = conn
        self._count = count
        self._replies: list[Reply] = []
        self._task: trio.lowlevel.Task | None = None
        self._error: BaseException | None = None
        self._seq = 0
        self._deadline = _INF

    @property
    def done(self) -> bool:
        """True once every reply arrived, or the connection failed."""
        return self._error is not None or len(self._replies) == self._count

    async def wait(self, *, flush: bool = True) -> list[Reply]:
        """The replies, in order; an error reply is a :class:`ReplyError` in its place
        (not raised). Writes the commands first if they are still queued (so waiting
        never waits on a :meth:`Connection.flush` nobody calls). With ``flush=False``
        it leaves them queued for the next write on the connection (another caller's,
        a flush), unless the task writing hands it the next round: bound such a wait
        with a deadline, after which a plain ``wait`` writes them. Raises
        :class:`ConnectionLost` if the connection broke first, :class:`RedisTimeout`
        for the command that timed out. One task at a time may wait.

        Cancellation: only the wait stops; the commands are still sent (or stay
        queued) and their replies read (and kept: ``wait`` may be called again)."""
        if self._error is None and len(self._replies) != self._count:  # (not done)
            await self.conn._wait(self, flush)
        else:
            await trio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error
        return self._replies

    def _abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Connection(_Base):
    """One Redis connection shared by many tasks (RESP2, automatic pipelining).

    Make one with :meth:`connect` and start its reader with
    ``await nursery.start(conn.run)``, or use ``async with open_connection(url)``.

    How a command travels: the caller encodes it and appends it to the outgoing
    buffer; if no write is in progress the caller writes the buffer itself (shielded,
    bounded by ``command_timeout``), otherwise the task writing now picks it up in its
    next round, or hands that round to the owner of the newest queued command (so no
    caller writes for others for long). Then, when its command is the only one in
    flight (sequential use) on a plain socket and the reader is not waiting on the
    socket right then (as in a sequential loop), the caller reads its reply itself
    while the reader steps aside (caller-read mode: no second task between the reply
    and the caller), and wakes the reader when it has its reply; otherwise it parks
    until the reader reschedules it with its reply. Replies come back in command
    order. Whoever reads routes every reply to its command, so callers arriving while
    one reads its own reply get theirs from it or from the reader.

    The reader (:meth:`run`) watches the socket whenever no caller reads, so a
    connection dropped while idle ends :meth:`run` with :class:`ConnectionLost` at
    once, without waiting for the next command.

    Timeouts: the reply of the oldest command in flight must arrive within its
    timeout (``command_timeout`` of the URL, or the call's ``timeout=``), else that
    command raises :class:`RedisTimeout`, the connection is dropped and every other
    command in flight gets :class:`ConnectionLost`. Commands queued behind a blocking
    command wait for it.
    """

    def __init__(
        self, stream: trio.abc.Stream, transport: trio.SocketStream, url: RedisURL, name: str | None
    ) -> None:
        super().__init__(stream, transport, url, name)
        self._waiting: deque[Pending] = deque()
        self._outbuf: list[bytes] = []
        self._writing = False
        #: Sequence number of the newest queued batch, and of the newest one written.
        self._seq = 0
        self._written = 0
        self._flushers: trio.lowlevel.ParkingLot | None = None
        self.stats = Stats()
        #: A sentinel's master that answers READONLY was demoted: drop the connection
        #: (every command in flight gets ConnectionLost) so that the next one goes to
        #: the new master. Nothing is written to a replica.
        self._drop_on_readonly = url.is_sentinel
        #: Caller-read mode (plain sockets): the one command in flight whose caller
        #: reads its own reply from the socket, while the reader steps aside.
        self._owner: Pending | None = None
        #: The reader, parked aside while a caller reads (None when not parked).
        self._aside: trio.lowlevel.Task | None = None
        #: True while the reader waits for the socket to be readable: a caller cannot
        #: wait for it too then (Trio allows one reader per fd), and parks instead.
        self._watching = False
        #: The caller the reader just handed a reply to, until it ran (see _receive).
        self._handed: trio.lowlevel.Task | None = None
        #: Replies to hand over before the reader tries caller-read mode again, and
        #: that number doubled after each try in vain (up to _MAX_SKIP).
        self._skip = 0
        self._backoff = 1

    @classmethod
    async def connect(
        cls,
        url: str | RedisURL,
        *,
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Connection:
        """Connect to ``url`` (a text URL or a :class:`RedisURL`), authenticate,
        select the db, set the client name. The caller then starts :meth:`run`.

        Raises :class:`ConnectionLost` if the server cannot be reached,
        :class:`RedisTimeout` after ``connect_timeout``, :class:`ReplyError` if AUTH or
        SELECT was refused, ValueError for a malformed URL. ``ssl_context`` overrides
        the one made from the URL's ``ssl_*`` options (``rediss://`` only).
        Cancellation: nothing is left open. A ``redis+cluster://`` URL gives a
        :class:`~bus.redis._cluster.ClusterConnection`."""
        url = _as_url(url)
        if url.is_cluster:
            from bus.redis._cluster import ClusterConnection  # it imports this module

            return await ClusterConnection.connect(url, name=name, ssl_context=ssl_context)
        stream, transport = await _open(url, name, ssl_context)
        return cls(stream, transport, url, name)

    # -- queueing and writing

    def _enqueue(self, data: bytes, pending: Pending, timeout: float | None, sent: int = 0) -> None:
        """Queue ``pending``'s commands (``data``, of which the first ``sent`` bytes
        were written already)."""
        if self._error is not None or not self._started:
            self._check()
        deadline = trio.current_time() + (self._timeout if timeout is None else timeout)
        pending._deadline = deadline
        if deadline < self._armed and self._read_scope is not None:
            self._read_scope.deadline = self._armed = deadline
        self._waiting.append(pending)
        self._seq += 1
        pending._seq = self._seq
        self.stats.commands += pending._count
        if not sent:
            self._outbuf.append(data)
        elif sent < len(data):
            self._outbuf.append(data[sent:])
        else:  # written whole
            self._written = self._seq
            self.stats.writes += 1

    async def _flush(self, coalesce: bool = False) -> None:
        """Write the outgoing buffer (the caller saw no write in progress). With
        ``coalesce``, first yield once, so the other tasks running in this scheduler
        pass add their commands to the same write. Loops for what others queued
        meanwhile, unless a parked owner of such a command can take the next round.
        Not interrupted by cancellation (see :meth:`_send`)."""
        self._writing = True
        try:
            if coalesce:
                await trio.lowlevel.cancel_shielded_checkpoint()
            while self._outbuf and self._error is None:
                buffer = self._outbuf
                self._outbuf = []
                seq = self._seq
                data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
                try:
                    sent = self._write_now(data)
                except OSError as exc:
                    await self._fail(f"connection lost while writing: {exc}", exc)
                    break
                if sent < len(data):
                    await self._send_rest(memoryview(data)[sent:] if sent else data)
                self._written = seq
                self.stats.writes += 1
                if self._outbuf and self._hand_off():
                    break
        finally:
            self._writing = False
            if self._flushers is not None:
                self._flushers.unpark_all()

    def _hand_off(self) -> bool:
        """Wake the owner of the newest unwritten command to write the next round."""
        written = self._written
        for pending in reversed(self._waiting):
            if pending._seq <= written:
                break
            task = pending._task
            if task is not None:
                pending._task = None
                trio.lowlevel.reschedule(task)  # it finds its command unwritten: flushes
                return True
        return False

    async def _wait(self, pending: Pending, flush: bool = True) -> None:
        first = True
        replies = pending._replies
        # (``pending.done`` inlined: this loop and _read_own's run on every command.)
        while pending._error is None and len(replies) != pending._count:
            if pending._seq > self._written and not self._writing and flush:
                # Others in flight: pipelining is on, so gather this pass's commands
                # into one write. Alone (sequential use): write at once.
                await self._flush(first and len(self._waiting) > 1)
                continue
            first = False
            if pending._task is not None or self._owner is pending:
                raise RuntimeError("another task is already waiting for these replies")
            waiting = self._waiting
            if (
                not self._watching
                and self._owner is None
                and len(waiting) == 1
                and waiting[0] is pending
                and self._fd is not None
                and (flush or pending._seq <= self._written)
            ):
                await self._read_own(pending)
                continue
            # trio.lowlevel: one parked task per command, woken by the reader with its
            # reply (cheaper than an Event per command).
            task = pending._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(pending._abort)
            if self._handed is task:
                self._handed = None  # this caller ran (see _receive)
            flush = True  # woken unwritten: handed the next round (_hand_off)

    async def _read_own(self, pending: Pending) -> None:
        """Caller-read mode: ``pending`` is the only command in flight (written), the
        socket is plain and the reader is not waiting on it (Trio allows one waiter
        per fd), so its caller reads the reply itself, without waking the reader and
        then being woken by it. The reader steps aside (see :meth:`_receive`) and is
        woken again once this returns, so that a connection dropped while idle is
        still noticed at once.

        In a sequential loop the reader, woken when the caller had its reply, has not
        run yet when the next command is written: the caller reads that reply too,
        and so on. A command sent while the reader watches the idle socket is read by
        the reader and handed over, as before (taking the socket from it means
        cancelling its wait: measured, that costs more than the reader's pass).

        Replies to commands queued meanwhile by other tasks are handed out as the
        reader does; theirs that have not arrived yet are left to the reader. Returns
        when ``pending`` is done, or the connection failed (its error is set).

        Cancellation: raises Cancelled with the reply not (or partly) read; the bytes
        read so far stay in the parser and the command stays in flight, so the reader
        reads the rest of its reply (and discards it): no half-read reply is left for
        the next command."""
        fd = self._fd
        assert fd is not None
        self._owner = pending
        self.stats.own_reads += 1
        replies = pending._replies
        try:
            while pending._error is None and len(replies) != pending._count:  # (not done)
                # trio.lowlevel.wait_readable + os.read, as the reader does (see there).
                await trio.lowlevel.wait_readable(fd)
                if self._error is not None:
                    break  # closed meanwhile: the number may be reused
                try:
                    got = self._absorb(os.read(fd, _READ_SIZE))
                except BlockingIOError:
                    continue
                except OSError as exc:
                    got = f"connection lost: {exc}", exc
                if type(got) is tuple:
                    await self._fail(*got)
                    break
        except trio.ClosedResourceError:
            pass  # closed by another task (_fail, aclose): pending has its error
        finally:
            self._owner = None
            aside = self._aside
            if aside is not None:
                self._aside = None
                trio.lowlevel.reschedule(aside)
        if not pending.done:  # pragma: no cover - a failure sets every error
            pending._error = self._lost()

    async def _receive(self) -> bytes | bytearray:
        """The reader's next bytes from the server. On a plain socket (TCP / unix):
        with nothing in flight, wait until it is readable before reading (a read now
        would only fail, and a failed read costs more in Trio than the wait; this
        wait is what notices a connection dropped while idle); with replies due,
        yield once and read, as ``receive_some`` does. While a caller reads its own
        reply (:meth:`_read_own`) the reader parks, and comes back when it is done.
        TLS: ``receive_some``.

        Cancellation (the read deadline, :meth:`_fail`, the owner's nursery): raises
        Cancelled; nothing was read then."""
        fd = self._fd
        if fd is None:
            return await self._stream.receive_some(_READ_SIZE)
        ready = False
        if self._waiting:
            await trio.lowlevel.checkpoint()
            ready = True
        elif self._handed is not None:
            if self._skip:
                self._skip -= 1
                self._handed = None
            else:
                await self._offer()
        while True:
            if self._owner is not None:
                await self._step_aside()
                ready = bool(self._waiting)
                if not ready:
                    await self._await_caller()
                    ready = bool(self._waiting)
                continue
            if ready:
                if self._error is not None:
                    # Closed while this task was being woken: its number may be reused.
                    raise trio.ClosedResourceError("the connection was closed")
                try:
                    return os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    pass
            # Meanwhile callers do not read (Trio allows one waiter per fd). The wait
            # with nothing in flight is what notices a connection dropped while idle.
            self._watching = True
            try:
                # trio.lowlevel.wait_readable + os.read: one trip through the
                # scheduler per read where receive_some makes two.
                await trio.lowlevel.wait_readable(fd)
            finally:
                self._watching = False
            ready = True

    async def _offer(self) -> None:
        """The reader just handed a reply to a caller and nothing is in flight: let
        that caller run first (yield until it did), so that if it sends its next
        command at once, it finds the socket free and reads the reply itself
        (caller-read mode, where a sequential loop then stays). A caller that does
        not (it awaits something else first) makes the reader skip its next offers,
        twice as many each time (up to ``_MAX_SKIP``): then it costs next to nothing.
        Cancellation (the read deadline, :meth:`_fail`): raises Cancelled; nothing
        was read, the offer is over."""
        await trio.lowlevel.checkpoint()
        if self._handed is not None:  # we ran first in that pass: it runs in this one
            await trio.lowlevel.checkpoint()
        self._handed = None
        if self._owner is None:
            self._skip = self._backoff
            self._backoff = min(2 * self._backoff, _MAX_SKIP)
        else:
            self._backoff = 1

    async def _await_caller(self) -> None:
        """A caller just read its own reply and nothing is in flight: before watching
        the socket, let it run a few passes (up to ``_CALLER_PASSES``), so that if it
        sends its next command meanwhile, it finds the socket free and reads that
        reply itself too (a loop of read, handle, read again stays in caller-read
        mode, its reply never handed over by this task). A caller that does not makes
        the reader skip this, as :meth:`_offer` does. Cancellation (the read
        deadline, :meth:`_fail`): raises Cancelled; nothing was read."""
        if self._skip:
            self._skip -= 1
            return
        stats = self.stats
        reads = stats.own_reads
        passes = 0
        while passes < _CALLER_PASSES:
            await trio.lowlevel.checkpoint()
            if self._waiting or self._owner is not None:
                self._backoff = 1
                return
            if stats.own_reads != reads:
                # It sent a command and read the reply between two of these passes
                # (a fast server): it goes on, so wait for its next one afresh.
                reads = stats.own_reads
                passes = 0
                continue
            passes += 1
        self._skip = self._backoff
        self._backoff = min(2 * self._backoff, _MAX_SKIP)

    async def _step_aside(self) -> None:
        """Park while a caller reads its own reply; woken by it when it is done
        (:meth:`_read_own`). Cancellation (the read deadline, :meth:`_fail`): raises
        Cancelled, and the caller keeps reading."""

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._aside = None
            return trio.lowlevel.Abort.SUCCEEDED

        # trio.lowlevel: park this task (no Event or ParkingLot per command); the
        # caller in _read_own reschedules it, and the read deadline still cancels it.
        self._aside = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(abort)

    async def flush(self) -> None:
        """Return once everything queued so far (by :meth:`submit` or anyone) was
        written to the socket. Does not wait for replies.

        Cancellation: the write itself is shielded (bounded by ``command_timeout``):
        when cancelled while writing, Cancelled is raised once the write is done;
        when cancelled while waiting for another task's write, the queued commands
        are still written by that task."""
        self._check()
        target = self._seq
        if self._written >= target:
            await trio.lowlevel.checkpoint()
            return
        while self._written < target and self._error is None:
            if not self._writing:
                await self._flush()
            else:
                if self._flushers is None:
                    self._flushers = trio.lowlevel.ParkingLot()
                await self._flushers.park()
        if self._error is not None:
            raise self._lost()
        await trio.lowlevel.checkpoint_if_cancelled()

    def flush_nowait(self) -> bool:
        """Write everything queued so far now, without waiting: True once it is all
        written (or nothing was queued). False when another task is writing (it
        writes this too), on TLS, or when the socket took only part of it (the rest
        is written by the next :meth:`flush` or ``wait``; every submitted command is
        written once, whole and in order). Not a checkpoint.

        Raises :class:`ConnectionLost` at once on a broken connection."""
        self._check()
        buffer = self._outbuf
        if not buffer:
            return True
        if self._writing or self._fd is None:
            return False
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        try:
            sent = self._write_now(data)
        except OSError:
            # Left queued: the next flush meets the error and closes the connection.
            self._outbuf = [data]
            return False
        if sent < len(data):
            self._outbuf = [data[sent:] if sent else data]
            return False
        self._outbuf = []
        self._written = self._seq
        self.stats.writes += 1
        return True

    # -- reading

    def _feed(self) -> bool:
        # The one place a reply is matched to its command (the cluster seam: MOVED/ASK
        # would be intercepted here).
        waiting = self._waiting
        gets = self._parser.gets
        reschedule = trio.lowlevel.reschedule
        got = False
        while (reply := gets()) is not MORE:
            got = True
            if not waiting:
                raise _ProtocolError(f"a reply that no command waits for: {reply!r:.200}")
            if (
                self._drop_on_readonly
                and type(reply) is ReplyError
                and reply.code in ("READONLY", "MASTERDOWN")
            ):
                raise _Demoted(f"the master is a replica now ({reply.message}): a failover")
            pending = waiting[0]
            replies = pending._replies
            replies.append(reply)
            if len(replies) == pending._count:
                waiting.popleft()
                task = pending._task
                if task is not None:
                    pending._task = None
                    reschedule(task)
                    self._handed = task
        if got:
            self._since_reply = self._parser.len()  # the next reply's start (< 1 KiB more)
        return False

    def _next_deadline(self) -> float:
        return min((pending._deadline for pending in self._waiting), default=_INF)

    async def _expire(self) -> None:
        now = trio.current_time()
        for pending in self._waiting:
            if pending._deadline <= now:
                pending._error = RedisTimeout(
                    f"{self.url.redacted()}: no reply within the timeout; connection dropped"
                )
                await self._fail(
                    "a command got no reply within its timeout; the connection was dropped"
                )
                return

    def _fail_waiters(self) -> None:
        waiting, self._waiting = self._waiting, deque()
        self._outbuf = []
        for pending in waiting:
            if pending._error is None:
                pending._error = self._lost()
            task = pending._task
            if task is not None:
                pending._task = None
                trio.lowlevel.reschedule(task)
        if self._flushers is not None:
            self._flushers.unpark_all()

    # -- the API

    async def execute(self, *args: Arg, timeout: float | None = None) -> Reply:
        """Run one command; return its reply (``bytes`` / ``int`` / ``list`` / ``None``).

        Raises :class:`ReplyError` for an error reply, :class:`ConnectionLost` if the
        connection is or gets broken, :class:`RedisTimeout` if no reply came within
        ``timeout`` (default: the URL's ``command_timeout``; pass more than a
        blocking command's block time, or ``math.inf``) and the connection is dropped.
        A blocking command (BLPOP, XREADGROUP BLOCK) holds up every command queued
        behind it on this connection: run those on a connection of their own.

        Cancellation: if already cancelled when called, nothing is sent. Once
        queued, the command is written whole (the write is shielded, bounded by
        ``command_timeout``); if cancelled while waiting for the reply (also while
        reading it itself, in caller-read mode, with part of it read), the command
        still runs on the server and the reader reads the rest of its reply and
        discards it. Other callers on the connection are not affected."""
        await trio.lowlevel.checkpoint_if_cancelled()
        pending = Pending(self, 1)
        self._enqueue(encode(args), pending, timeout)
        await self._wait(pending)
        if pending._error is not None:
            raise pending._error
        reply = pending._replies[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Iterable[Command], *, timeout: float | None = None
    ) -> list[Reply]:
        """Run several commands in one write (no transaction: other callers' commands
        may interleave on the server); return their replies in order, each error
        reply a :class:`ReplyError` in its place (not raised). Raises ConnectionLost /
        RedisTimeout as :meth:`execute`. Cancellation: as :meth:`execute`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self.submit(commands, timeout=timeout).wait()

    async def transaction(
        self, commands: Sequence[Command], *, timeout: float | None = None
    ) -> list[Reply]:
        """Run ``commands`` inside MULTI ... EXEC (one write); return EXEC's list
        (an error of one command, such as WRONGTYPE, is a ReplyError in its place).
        Raises :class:`ReplyError` with code ``EXECABORT`` when Redis refused to queue a
        command (that refusal is its ``__cause__``). Cancellation: as :meth:`execute`
        (the transaction runs whole or not at all on the server)."""
        batch: list[Command] = [("MULTI",), *commands, ("EXEC",)]
        replies = await self.pipeline(batch, timeout=timeout)
        result = replies[-1]
        if isinstance(result, ReplyError):
            queued = [r for r in replies[:-1] if isinstance(r, ReplyError)]
            raise result from (queued[0] if queued else None)
        if result is None:
            raise RedisError("EXEC returned nil: the transaction was aborted")
        assert isinstance(result, list)
        return result

    def submit(
        self, commands: Iterable[Command], *, timeout: float | None = None, eager: bool = False
    ) -> Pending:
        """Queue ``commands`` for the next write and return at once, without waiting
        for anything: a :class:`Pending` whose ``await pending.wait()`` gives the
        replies (errors in place). The commands go out with the next write on this
        connection: call :meth:`flush` (an actor: once after queueing everything of
        one mailbox drain, so the whole drain is one write), or any ``execute`` /
        ``pipeline`` / ``wait`` writes them too. The timeout counts from now: a
        submit never flushed times out and drops the connection.

        ``eager=True``: when nothing else is in flight or queued (a sequential
        caller), write them now, as :meth:`flush_nowait` would, before the
        bookkeeping of the submit: the server starts on them while the caller goes
        on to wait. Otherwise (others in flight: their write gathers this one too)
        it is a plain submit. What the socket did not take stays queued for the next
        write.

        Raises :class:`ConnectionLost` at once on a broken connection. Not a
        checkpoint (not async)."""
        data, count = encode_many(commands)
        pending = Pending(self, count)
        if count:
            if (
                eager
                and not self._waiting
                and not self._writing
                and self._started
                and self._error is None
            ):
                self._enqueue_written(data, pending, timeout)
            else:
                self._enqueue(data, pending, timeout)
        else:
            self._check()
        return pending

    def _enqueue_written(self, data: bytes, pending: Pending, timeout: float | None) -> None:
        """:meth:`_enqueue`, the command written first, as far as the socket takes it
        now (nothing else is queued or in flight, see :meth:`submit`)."""
        try:
            sent = self._write_now(data)
        except OSError:
            sent = 0  # left queued: the next write meets the error and closes
        self._enqueue(data, pending, timeout, sent)


@asynccontextmanager
async def open_connection(
    url: str | RedisURL,
    *,
    name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Connection]:
    """``async with open_connection(url, name=...) as conn:`` connects (see
    :meth:`Connection.connect`), runs the reader in a nursery of its own, and closes
    the connection on exit. A broken connection does not cancel the body: its
    commands raise :class:`ConnectionLost`."""
    conn = await Connection.connect(url, name=name, ssl_context=ssl_context)
    async with _served(conn):
        yield conn


# --------------------------------------------------------------------------- Lua


class _ScriptCall(tuple[Arg, ...]):
    """An EVALSHA command that remembers its script (for :func:`rerun_noscript`)."""

    script: Script


class Script:
    """A Lua script run by its SHA1 (``EVALSHA``), loaded on demand.

    ``await script.run(conn, keys=[...], args=[...])`` falls back to ``EVAL`` (which
    also caches the script on the server) when the server answers ``NOSCRIPT``. In a
    batch, use :meth:`command` and repair the batch with :func:`rerun_noscript`."""

    def __init__(self, source: str | bytes) -> None:
        self.source = source.encode() if isinstance(source, str) else source
        self.sha = hashlib.sha1(self.source).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.sha[:12]}>"

    def command(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Command:
        """The ``EVALSHA`` command for a pipeline or :meth:`Connection.submit`."""
        call = _ScriptCall(("EVALSHA", self.sha, len(keys), *keys, *args))
        call.script = self
        return call

    def eval_command(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Command:
        """The same call as ``EVAL`` with the whole source."""
        return ("EVAL", self.source, len(keys), *keys, *args)

    async def load(self, conn: Connection) -> None:
        """``SCRIPT LOAD`` it (e.g. once after connecting, so batches rarely NOSCRIPT)."""
        await conn.execute("SCRIPT", "LOAD", self.source)

    async def run(
        self,
        conn: Connection,
        keys: Sequence[Arg] = (),
        args: Sequence[Arg] = (),
        *,
        timeout: float | None = None,
    ) -> Reply:
        """Run it: EVALSHA, then EVAL on ``NOSCRIPT``. Raises :class:`ReplyError`
        for a script error. Cancellation: as :meth:`Connection.execute`."""
        try:
            return await conn.execute(*self.command(keys, args), timeout=timeout)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        return await conn.execute(*self.eval_command(keys, args), timeout=timeout)


def is_noscript(reply: Reply) -> bool:
    """True for a ``NOSCRIPT`` error reply (in a batch's replies)."""
    return isinstance(reply, ReplyError) and reply.code == "NOSCRIPT"


async def rerun_noscript(
    conn: Connection, commands: Sequence[Command], replies: list[Reply]
) -> list[Reply]:
    """Repair a batch's replies after ``NOSCRIPT``: each entry made by
    :meth:`Script.command` whose reply is NOSCRIPT is run again with ``EVAL`` (all in
    one pipeline) and its reply replaced. Returns ``replies`` (changed in place).

    Those entries then ran after the rest of the batch, not in their place: a batch
    whose order matters should ``Script.load`` its scripts first. Cancellation: as
    :meth:`Connection.pipeline`."""
    again = [
        i
        for i, (command, reply) in enumerate(zip(commands, replies, strict=True))
        if is_noscript(reply) and isinstance(command, _ScriptCall)
    ]
    if again:
        retry: list[Command] = []
        for i in again:
            call = commands[i]
            assert isinstance(call, _ScriptCall)
            retry.append(("EVAL", call.script.source, *call[2:]))
        for i, reply in zip(again, await conn.pipeline(retry), strict=True):
            replies[i] = reply
    return replies


# --------------------------------------------------------------------------- pub/sub


@attrs.define
class _Confirm:
    kind: bytes
    left: int
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


_CONFIRMS: Final = {
    b"subscribe": b"subscribe",
    b"unsubscribe": b"unsubscribe",
    b"psubscribe": b"psubscribe",
    b"punsubscribe": b"punsubscribe",
    b"pong": b"ping",
}


class PubSub(_Base):
    """A dedicated subscriber connection (one per process in the bus).

    ``await ps.subscribe(*channels)`` returns once Redis confirmed every channel;
    ``await ps.unsubscribe(*channels)`` once it confirmed the unsubscribe (one round
    trip, no close timeout). Messages: ``async for channel, data in ps:``; a pattern
    subscription delivers the concrete channel. When the connection is lost the
    iteration raises :class:`ConnectionLost` (after the messages already received);
    after :meth:`aclose` it ends. The owner re-subscribes on a new PubSub. Or
    :meth:`on_message`: the reader calls a function with each message as it reads it.

    Backpressure: at most ``max_buffer`` messages wait for the consumer; past that
    the reader waits too (and so do confirmations), and Redis may eventually drop a
    subscriber that lags too far (client-output-buffer-limit pubsub).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        transport: trio.SocketStream,
        url: RedisURL,
        name: str | None,
        max_buffer: int,
    ) -> None:
        super().__init__(stream, transport, url, name)
        self._confirms: deque[_Confirm] = deque()
        self._lock = trio.Lock()
        channel = trio.open_memory_channel[tuple[bytes, bytes]](max_buffer)
        self._messages_in, self._messages_out = channel
        self._pending_messages: list[tuple[bytes, bytes]] = []
        self._on_message: Callable[[bytes, bytes], object] | None = None
        #: The channels and patterns Redis confirmed.
        self.channels: set[bytes] = set()
        self.patterns: set[bytes] = set()

    @classmethod
    async def connect(
        cls,
        url: str | RedisURL,
        *,
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_buffer: int = 1024,
    ) -> PubSub:
        """Connect as :meth:`Connection.connect` does; then start :meth:`run`."""
        url = _as_url(url)
        stream, transport = await _open(url, name, ssl_context)
        return cls(stream, transport, url, name, max_buffer)

    def on_message(self, fn: Callable[[bytes, bytes], object]) -> None:
        """Have the reader (:meth:`run`) call ``fn(channel, data)`` for each message, in
        order, in its own step as it reads it: no task and no channel between the socket
        and ``fn`` (the iteration gets no messages then). Call it before :meth:`run`.
        ``fn`` must not block (it is not awaited) and should not raise: an exception
        fails the connection, and :meth:`run` raises it."""
        self._on_message = fn

    def _feed(self) -> bool:
        gets = self._parser.gets
        messages = self._pending_messages
        got = False
        while (reply := gets()) is not MORE:
            got = True
            if type(reply) is list and reply:
                kind = reply[0]
                if kind == b"message" and len(reply) == 3:
                    messages.append((reply[1], reply[2]))
                    continue
                if kind == b"pmessage" and len(reply) == 4:
                    messages.append((reply[2], reply[3]))
                    continue
                if kind in _CONFIRMS:
                    self._confirm(_CONFIRMS[kind], reply)
                    continue
            elif reply == b"PONG":
                self._confirm(b"ping", [reply])
                continue
            elif isinstance(reply, ReplyError):
                self._confirm(None, [reply])
                continue
            raise _ProtocolError(f"unexpected reply on a subscriber connection: {reply!r:.200}")
        if got:
            self._since_reply = self._parser.len()
        return bool(messages)

    def _confirm(self, kind: bytes | None, reply: list[Any]) -> None:
        if not self._confirms:
            raise _ProtocolError(f"a confirmation nobody waits for: {reply!r:.200}")
        head = self._confirms[0]
        if kind is None:
            head.error = reply[0]
            head.left = 0
        elif kind != head.kind:
            raise _ProtocolError(f"expected a {head.kind!r} confirmation, got {reply!r:.200}")
        else:
            head.left -= 1
            if kind == b"subscribe":
                self.channels.add(reply[1])
            elif kind == b"unsubscribe":
                self.channels.discard(reply[1])
            elif kind == b"psubscribe":
                self.patterns.add(reply[1])
            elif kind == b"punsubscribe":
                self.patterns.discard(reply[1])
        if head.left == 0:
            self._confirms.popleft()
            head.done.set()

    async def _deliver(self) -> None:
        messages = self._pending_messages
        fn = self._on_message
        if fn is not None:
            self._pending_messages = []
            for channel, data in messages:
                fn(channel, data)
            return
        while messages:
            self._pending_messages = []
            try:
                for message in messages:
                    try:
                        self._messages_in.send_nowait(message)
                    except trio.WouldBlock:
                        await self._messages_in.send(message)
            except trio.ClosedResourceError:
                return  # closed meanwhile (aclose / a failure)
            messages = self._pending_messages

    def _fail_waiters(self) -> None:
        confirms, self._confirms = self._confirms, deque()
        for confirm in confirms:
            confirm.error = self._lost()
            confirm.done.set()
        self._messages_in.close()

    async def _request(self, kind: bytes, command: bytes, names: Sequence[Arg]) -> None:
        self._check()
        confirm = _Confirm(kind, max(1, len(names)))
        data = encode((command, *names))
        async with self._lock:
            self._check()
            self._confirms.append(confirm)
            await self._send(data)
        with trio.move_on_after(self._timeout) as scope:
            await confirm.done.wait()
        if scope.cancelled_caught:
            await self._fail("no confirmation within the command timeout; connection dropped")
            raise RedisTimeout(f"{self.url.redacted()}: no {kind.decode()} confirmation in time")
        if confirm.error is not None:
            raise confirm.error

    async def subscribe(self, *channels: Arg) -> None:
        """Subscribe; return once Redis confirmed every channel. Raises
        ConnectionLost / RedisTimeout. Cancellation: the SUBSCRIBE is still sent
        (whole) and may take effect; only the wait for its confirmation stops."""
        if channels:
            await self._request(b"subscribe", b"SUBSCRIBE", channels)

    async def unsubscribe(self, *channels: Arg) -> None:
        """Unsubscribe (no channels: from every confirmed channel); return once Redis
        confirmed, one round trip. Cancellation: as :meth:`subscribe`."""
        names: Sequence[Arg] = channels or tuple(self.channels)
        if names:
            await self._request(b"unsubscribe", b"UNSUBSCRIBE", names)
        else:
            await trio.lowlevel.checkpoint()

    async def psubscribe(self, *patterns: Arg) -> None:
        """Subscribe to glob patterns; as :meth:`subscribe`."""
        if patterns:
            await self._request(b"psubscribe", b"PSUBSCRIBE", patterns)

    async def punsubscribe(self, *patterns: Arg) -> None:
        """Unsubscribe from patterns (none: from every confirmed one); as
        :meth:`unsubscribe`."""
        names: Sequence[Arg] = patterns or tuple(self.patterns)
        if names:
            await self._request(b"punsubscribe", b"PUNSUBSCRIBE", names)
        else:
            await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
        """A round trip on the subscriber connection (a health check)."""
        await self._request(b"ping", b"PING", ())

    def __aiter__(self) -> AsyncIterator[tuple[bytes, bytes]]:
        return self

    async def __anext__(self) -> tuple[bytes, bytes]:
        """The next ``(channel, data)``. Raises ConnectionLost once the connection is
        lost and the messages received before are consumed; ends after aclose().
        Cancellation: no message is lost."""
        try:
            return await self._messages_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._closing:
                raise StopAsyncIteration from None
            raise self._lost() from None


@asynccontextmanager
async def open_pubsub(
    url: str | RedisURL,
    *,
    name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_buffer: int = 1024,
) -> AsyncIterator[PubSub]:
    """``async with open_pubsub(url) as ps:`` as :func:`open_connection` does."""
    ps = await PubSub.connect(url, name=name, ssl_context=ssl_context, max_buffer=max_buffer)
    async with _served(ps):
        yield ps
