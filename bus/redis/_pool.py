"""The process's Redis connections, as supervised actors.

One :class:`ConnectionActor` per Redis URL and actor system holds the shared command
connection; its child :class:`SubscriptionActor` holds the process's one pub/sub
subscription, shared by every listener (the result store, the broker's cancels).
Both are restarted with backoff when their connection breaks: reconnecting is
supervision, not a loop. Users ask for the connection (:class:`GetConnection`, an
inline ask: no scheduler pass when it is up) and are lent it with an event that is set
when it is lost.
"""

from __future__ import annotations

import contextlib
import functools
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import attrs
import trio
import trio.lowlevel

import actors
from actors._log import get_logger
from bus.redis._client import Command, Connection, ConnectionLost, Pending, PubSub, RedisError
from bus.redis._failover import Switched, SwitchWatch
from bus.redis._resp import RedisTimeout, ReplyError, _ProtocolError
from bus.redis._url import RedisURL

__all__ = [
    "Announcement",
    "ConnectionActor",
    "GetConnection",
    "Lent",
    "Resubscribed",
    "Subscribe",
    "SubscriptionActor",
    "UsesConnection",
    "WhenConnected",
    "shared_connection",
    "with_connection",
]

log = get_logger("bus.redis")

#: Reconnect backoff of every Redis actor: 50 ms doubling to 0.5 s, with jitter. The
#: cap is short so that work resumes within a second of Redis answering again; a
#: failed attempt against a server that is down costs next to nothing.
BACKOFF = actors.Backoff(initial=0.05, factor=2.0, cap=0.5, jitter=0.5)

T = TypeVar("T")


@attrs.frozen
class Lent:
    """A connection lent by a :class:`ConnectionActor`; ``lost`` is set once it broke
    (ask again for the next one)."""

    conn: Connection
    lost: trio.Event


@attrs.frozen
class GetConnection:
    """Ask: the current :class:`Lent` connection (waits while reconnecting)."""


@attrs.frozen(eq=False)
class Subscribe:
    """Ask: deliver :class:`Announcement` s of ``channel`` to ``listener`` (answered
    once Redis confirmed the subscription)."""

    channel: bytes
    listener: actors.ActorRef


@attrs.frozen
class Announcement:
    """Told to a listener: ``data`` was published on ``channel``."""

    channel: bytes
    data: bytes


@attrs.frozen
class Resubscribed:
    """Told to a listener after the subscription was re-established: announcements
    made while it was down were missed (re-read what matters)."""

    channel: bytes


@attrs.frozen
class _GetSubscription:
    """Ask (of the connection actor): the subscription actor's ref."""


class _Listeners:
    """Who listens to which channel, and how often the subscription was made: survives
    restarts of the subscription actor and of its parent."""

    def __init__(self) -> None:
        self.by_channel: dict[bytes, set[actors.ActorRef]] = {}
        self.subscriptions = 0


class SubscriptionActor(actors.Actor):
    """Owns the process's one pub/sub connection. On (re)start it subscribes to every
    channel someone listens to and tells them :class:`Resubscribed`; a lost connection
    is a failure (the parent restarts it with backoff)."""

    expected_failures = (RedisError, OSError)

    def __init__(self, url: RedisURL, listeners: _Listeners) -> None:
        self.url = url
        self.listeners = listeners
        self.ps: PubSub | None = None

    async def on_start(self) -> None:
        ps = await PubSub.connect(self.url, name="bus-subscription")
        self.ps = ps
        ps.on_message(self._deliver)  # in the reader's step: no task in between
        await self.nursery.start(ps.run)
        channels = list(self.listeners.by_channel)
        if channels:
            await ps.subscribe(*channels)
        self.listeners.subscriptions += 1
        if self.listeners.subscriptions > 1:  # again: tell everyone they may have missed things
            for channel, refs in self.listeners.by_channel.items():
                for ref in list(refs):
                    _tell(ref, Resubscribed(channel))

    def _deliver(self, channel: bytes, data: bytes) -> None:
        """A message, told to the channel's listeners (``tell_nowait``: an idle
        listener's inline handler runs here, in the subscription's reader step)."""
        refs = self.listeners.by_channel.get(channel)
        if refs:
            for ref in list(refs):
                if not _tell(ref, Announcement(channel, data)):
                    refs.discard(ref)

    @actors.handles(Subscribe)
    async def subscribe(self, msg: Subscribe) -> None:
        refs = self.listeners.by_channel.setdefault(msg.channel, set())
        new = not refs
        refs.add(msg.listener)
        if new and self.ps is not None:
            await self.ps.subscribe(msg.channel)

    async def on_stop(self) -> None:
        ps, self.ps = self.ps, None
        if ps is not None:
            with trio.move_on_after(1), contextlib.suppress(RedisError):
                await ps.unsubscribe()  # a clean UNSUBSCRIBE before the socket closes
            await ps.aclose()


def _tell(ref: actors.ActorRef, msg: object) -> bool:
    try:
        ref.tell_nowait(msg)
    except actors.ActorStopped:
        return False
    except actors.MailboxFull:
        log.warning("redis.listener_mailbox_full", actor=ref.name, message=type(msg).__name__)
    return True


class Unusable(ConnectionLost):
    """Redis answered, but it cannot be used as configured (a wrong password, no such
    db, a server that does not speak RESP): retrying will not help, so a caller that
    waits for the connection gets this at once, naming the cause."""


#: Error replies of a server that will answer later (loading its data after a restart,
#: running a long script, a cluster or replica settling): waited out like an outage.
TRANSIENT_CODES = frozenset({"LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"})


def is_transient(reply: object) -> bool:
    """Whether an error reply means "not now" rather than "no"."""
    return isinstance(reply, ReplyError) and reply.code in TRANSIENT_CODES


def is_fatal(exc: BaseException) -> bool:
    """Whether a failure to connect is one that retrying cannot fix."""
    if isinstance(exc, ReplyError):
        # A server still loading, busy, or full answers again later.
        return not is_transient(exc) and "max number of clients" not in exc.message
    cause = exc.__cause__
    return isinstance(exc, ConnectionLost) and (
        isinstance(cause, (_ProtocolError, ssl.SSLCertVerificationError))
    )


@attrs.frozen
class _Linked:
    """Told by the link: a new connection is up."""

    lent: Lent


@attrs.frozen
class _LinkDown:
    """Told by the link: connecting failed, or the connection broke."""

    cause: str
    fatal: bool


@attrs.frozen
class Waiting:
    """The answer to :class:`GetConnection` while there is no connection: ``changed``
    is set when that may be different (a connection is up, or Redis refused us);
    ``cause`` is why there is none, ``fatal`` whether retrying cannot help."""

    changed: trio.Event
    cause: str
    fatal: bool


class _LinkActor(actors.Actor):
    """Holds one command connection: connects on start, fails when it breaks (its
    parent restarts it with backoff) and tells the parent either way."""

    expected_failures = (RedisError, OSError)

    def __init__(self, url: RedisURL, parent: actors.ActorRef) -> None:
        self.url = url
        self.parent = parent
        self.lent: Lent | None = None

    async def on_start(self) -> None:
        try:
            conn = await Connection.connect(self.url, name="bus")
        except (RedisError, OSError) as exc:
            self.parent.tell_nowait(_LinkDown(str(exc), is_fatal(exc)))
            raise
        self.lent = lent = Lent(conn, trio.Event())
        await self.nursery.start(self._serve, lent)
        self.parent.tell_nowait(_Linked(lent))

    async def _serve(
        self, lent: Lent, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await lent.conn.run(task_status=task_status)
        except RedisError as exc:
            lent.lost.set()
            with contextlib.suppress(actors.ActorStopped):
                self.parent.tell_nowait(_LinkDown(str(exc), False))
            raise
        finally:
            lent.lost.set()

    async def on_stop(self) -> None:
        lent, self.lent = self.lent, None
        if lent is not None:
            await lent.conn.aclose()


class ConnectionActor(actors.Actor):
    """The process's command connection to one Redis URL, as a small tree: a link
    child holds the connection and is restarted with backoff when it breaks (that is
    the reconnect), and the subscription child holds the pub/sub connection. This
    actor never fails for Redis's sake: it answers :class:`GetConnection` at once,
    with the connection or with what to wait for, and logs one line when Redis goes
    away and one when it is back."""

    def __init__(self, url: RedisURL, listeners: _Listeners) -> None:
        self.url = url
        self.listeners = listeners
        self.lent: Lent | None = None
        self._changed = trio.Event()
        self._cause = "connecting"
        self._fatal = False
        self._was_up = False
        self._down_logged = False
        self._subscription: actors.ActorRef | None = None

    async def on_start(self) -> None:
        url, me = self.url, self.ref
        await self.spawn(
            lambda: _LinkActor(url, me),
            name="link",
            on_failure=actors.RESTART,
            max_restarts=None,
            backoff=BACKOFF,
        )
        if self.listeners.by_channel:  # restarted: the subscription comes back too
            await self._subscription_ref()
        if url.is_sentinel:  # hear of a failover at once
            await self.spawn(
                lambda: SwitchWatch(url, me),
                name="switch-watch",
                on_failure=actors.RESTART,
                max_restarts=None,
                backoff=BACKOFF,
            )

    @actors.handles(Switched)
    async def switched(self, msg: Switched) -> None:
        """The sentinels moved the master: drop the connection (its link connects
        again, to the new master)."""
        lent = self.lent
        log.warning("redis.failover", url=self.url.redacted(), master=f"{msg.host}:{msg.port}")
        if lent is not None and not lent.lost.is_set():
            await lent.conn.drop("the sentinels switched the master (+switch-master)")

    @actors.handles(_Linked)
    def linked(self, msg: _Linked) -> None:
        self.lent = msg.lent
        self._fatal = False
        if self._down_logged:
            log.warning("redis.reachable", url=self.url.redacted(), actor=self.name)
        self._down_logged = False
        self._was_up = True
        self._wake()

    @actors.handles(_LinkDown)
    def link_down(self, msg: _LinkDown) -> None:
        self._cause = msg.cause
        if msg.fatal != self._fatal:
            self._fatal = msg.fatal
            self._wake()  # waiters learn at once that retrying cannot help
        if not self._down_logged:
            self._down_logged = True
            (log.error if msg.fatal else log.warning)(
                "redis.refused" if msg.fatal else "redis.unreachable",
                url=self.url.redacted(),
                error=msg.cause,
                actor=self.name,
            )

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @actors.handles(GetConnection, inline=True)
    def get_connection(self, msg: GetConnection) -> Lent | Waiting:
        lent = self.lent
        if lent is not None and not lent.lost.is_set():
            return lent
        return Waiting(self._changed, self._cause, self._fatal)

    @actors.handles(_GetSubscription)
    async def get_subscription(self, msg: _GetSubscription) -> actors.ActorRef:
        return await self._subscription_ref()

    async def _subscription_ref(self) -> actors.ActorRef:
        ref = self._subscription
        if ref is None or not ref.is_alive:
            url, listeners = self.url, self.listeners
            ref = self._subscription = await self.spawn(
                lambda: SubscriptionActor(url, listeners),
                name="subscription",
                on_failure=actors.RESTART,
                max_restarts=None,
                backoff=BACKOFF,
                mailbox_size=math.inf,
            )
        return ref


#: A number per distinct URL seen in this process, for actor names: two URLs that
#: differ only in what a name does not show (user, password, TLS, timeouts) get two
#: connection actors, and nothing derived from a password is ever in a name.
_URL_NUMBERS: dict[RedisURL, int] = {}


def _actor_name(url: RedisURL) -> str:
    if url.mode is not None:
        seeds = ",".join(f"{host}:{port}" for host, port in url.seeds)
        where = f"{url.mode} {seeds}/{url.service}" if url.service else f"{url.mode} {seeds}"
    else:
        where = url.path if url.path is not None else f"{url.host}:{url.port}"
    number = _URL_NUMBERS.setdefault(url, len(_URL_NUMBERS) + 1)
    return f"redis {where}/{url.db} #{number}"


@attrs.frozen
class WhenConnected:
    """Ask (inline): a ``trio.Event`` set once the actor has a live connection."""


class UsesConnection(actors.Actor):
    """Base of actors that write on the shared connection: ``self.lent`` is the
    current connection (``None`` while reconnecting), kept by a task of the actor's
    nursery; an asker that found none waits on :class:`WhenConnected`."""

    conn_ref: actors.ActorRef
    lent: Lent | None = None
    _connected: trio.Event | None = None

    def start_keeping_connection(self) -> None:
        self._connected = trio.Event()
        self.nursery.start_soon(self._keep_connection)

    async def _keep_connection(self) -> None:
        while True:
            lent = await lend(self.conn_ref, through_fatal=True)
            try:
                await self.connected(lent)  # before anyone may use it
            except (ConnectionLost, RedisTimeout):
                # That connection broke already: wait for the next one. It may not be
                # marked lost yet (its link has not run since), and a broken
                # connection fails without yielding: yield, or this loop would spin
                # and the link that marks it never run.
                await trio.lowlevel.checkpoint()
                continue
            self.lent = lent
            assert self._connected is not None
            self._connected.set()
            await self.ready(lent)
            await lent.lost.wait()
            if self.lent is lent:
                self.lent = None
                if self._connected.is_set():
                    self._connected = trio.Event()

    def submit_now(
        self, commands: Iterable[Command], timeout: float | None = None, *, eager: bool = False
    ) -> Pending | None:
        """Queue ``commands`` on the current connection (``timeout``: the connection's
        command timeout by default; ``eager``: see ``Connection.submit``); ``None``
        while there is none or it broke (the asker waits for the next one and asks
        again: not a failure of this actor)."""
        lent = self.lent
        if lent is None or lent.lost.is_set():
            return None
        try:
            return lent.conn.submit(commands, timeout=timeout, eager=eager)
        except ConnectionLost:
            return None

    async def connected(self, lent: Lent) -> None:
        """Called with each new connection before the actor uses it (load scripts)."""

    async def ready(self, lent: Lent) -> None:
        """Called once the new connection is in use (write what waited for it)."""

    @actors.handles(WhenConnected, inline=True)
    def when_connected(self, msg: WhenConnected) -> trio.Event:
        connected = self._connected
        lent = self.lent
        if connected is None or (
            connected.is_set() and (lent is None or lent.lost.is_set() or lent.conn.is_closed)
        ):
            # No connection, or one that broke and is not yet replaced: the event of
            # the next one (a broken one is never reported as connected).
            connected = self._connected = trio.Event()
        return connected


async def wait_connected(ref: actors.ActorRef, timeout: float) -> bool:
    """Wait until the actor behind ``ref`` (a :class:`UsesConnection`) has a connection,
    at most ``timeout`` seconds; True if it has."""
    event: trio.Event = await ref.ask(WhenConnected())
    with trio.move_on_after(timeout):
        await event.wait()
    return event.is_set()


async def shared_connection(system: actors.ActorSystem, url: RedisURL) -> actors.ActorRef:
    """The connection actor of ``url`` in ``system``, spawned by the first caller.

    Every user of the same URL in one actor system (the broker, its result store)
    shares its command connection and its subscription."""
    name = _actor_name(url)
    for _ in range(2):
        ref = system.actors.get(name)
        if ref is not None and ref.is_alive:
            return ref
        try:
            return await system.spawn(
                functools.partial(ConnectionActor, url, _Listeners()),
                name=name,
                on_failure=actors.RESTART,
                max_restarts=None,
                backoff=BACKOFF,
                mailbox_size=math.inf,
            )
        except ValueError:
            continue  # spawned by a concurrent caller meanwhile
    raise RuntimeError(f"cannot start the Redis connection actor {name!r}")


async def subscription_of(conn_ref: actors.ActorRef) -> actors.ActorRef:
    """The subscription actor that belongs to a connection actor."""
    ref: actors.ActorRef = await conn_ref.ask(_GetSubscription())
    return ref


async def lend(
    conn_ref: actors.ActorRef, timeout: float | None = None, *, through_fatal: bool = False
) -> Lent:
    """The connection, waiting at most ``timeout`` seconds (``None``: as long as it
    takes) while Redis is unreachable; then ``ConnectionLost`` naming the cause. A
    connection refused for good (:class:`Unusable`: a wrong password, say) raises at
    once, unless ``through_fatal`` (the actors that keep a connection wait through
    it, in case it is fixed).

    Cancellation: only the waiting ends."""
    deadline = math.inf if timeout is None else trio.current_time() + timeout
    while True:
        got: Lent | Waiting = await conn_ref.ask(GetConnection())
        if type(got) is Lent:
            if not got.lost.is_set():
                return got
            await trio.lowlevel.checkpoint()  # the link's word that it broke is on its way
            continue
        assert isinstance(got, Waiting)
        if got.fatal and not through_fatal:
            raise Unusable(f"Redis refused the connection: {got.cause}")
        with trio.move_on_at(deadline):
            await got.changed.wait()
        if not got.changed.is_set():
            last = await conn_ref.ask(GetConnection())  # the latest cause
            cause = last.cause if isinstance(last, Waiting) else got.cause
            raise ConnectionLost(
                f"Redis is unreachable: no connection within {timeout:g} s ({cause})"
            )


async def with_connection(
    conn_ref: actors.ActorRef,
    fn: Callable[[Connection], Awaitable[T]],
    *,
    deadline: float,
    what: str,
) -> T:
    """Run ``fn(conn)`` on the current connection, again on the next one after a
    connection fault, until the Trio-clock ``deadline``; then raise the fault (a
    ``ConnectionLost`` naming ``what``). This is the one "when connected" helper:
    the connection actor's supervision does the reconnecting.

    Cancellation: the current try is abandoned (see ``Connection.execute``)."""
    while True:
        left = deadline - trio.current_time()
        try:
            lent = await lend(conn_ref, timeout=max(left, 0.0) if left < math.inf else None)
        except Unusable as exc:
            raise Unusable(f"{what}: {exc}") from exc
        except ConnectionLost as exc:
            raise ConnectionLost(f"{what}: {exc}") from exc
        try:
            if left < math.inf:
                with trio.fail_after(max(left, 0.0)):
                    return await fn(lent.conn)
            return await fn(lent.conn)
        except ReplyError as exc:
            if not is_transient(exc):
                raise
            # Redis is loading its data (after a restart) or settling: not yet.
            if trio.current_time() >= deadline:
                raise ConnectionLost(f"{what}: {exc.message}") from exc
            await trio.sleep(min(0.1, max(0.0, deadline - trio.current_time())))
        except Unusable as exc:
            raise Unusable(f"{what}: {exc}") from exc
        except (ConnectionLost, RedisTimeout, trio.TooSlowError) as exc:
            if trio.current_time() >= deadline:
                raise ConnectionLost(f"{what}: {exc}") from exc
            # That connection is gone: wait until its link says so (the next ask then
            # waits for the new one) rather than ask again at once.
            with trio.move_on_at(deadline):
                await lent.lost.wait()
