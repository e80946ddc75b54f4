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
import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

import actors
from actors._log import get_logger
from bus.redis._client import Connection, ConnectionLost, PubSub, RedisError
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

#: Reconnect backoff of every Redis actor: 50 ms doubling to 2 s, with jitter.
BACKOFF = actors.Backoff(initial=0.05, factor=2.0, cap=2.0, jitter=0.5)

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
        await self.nursery.start(ps.run)
        channels = list(self.listeners.by_channel)
        if channels:
            await ps.subscribe(*channels)
        self.nursery.start_soon(self._deliver, ps)
        self.listeners.subscriptions += 1
        if self.listeners.subscriptions > 1:  # again: tell everyone they may have missed things
            for channel, refs in self.listeners.by_channel.items():
                for ref in list(refs):
                    _tell(ref, Resubscribed(channel))

    async def _deliver(self, ps: PubSub) -> None:
        listeners = self.listeners.by_channel
        async for channel, data in ps:
            for ref in list(listeners.get(channel, ())):
                if not _tell(ref, Announcement(channel, data)):
                    listeners[channel].discard(ref)
        # The iteration ends only after aclose (a stop): nothing to do.

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


class ConnectionActor(actors.Actor):
    """Owns the shared command connection to one Redis URL (and, as its child, the
    subscription). A lost connection is a failure: supervision restarts it with
    backoff, and asks for the connection wait in the mailbox meanwhile."""

    expected_failures = (RedisError, OSError)

    def __init__(self, url: RedisURL, listeners: _Listeners) -> None:
        self.url = url
        self.listeners = listeners
        self.lent: Lent | None = None
        self._subscription: actors.ActorRef | None = None

    async def on_start(self) -> None:
        conn = await Connection.connect(self.url, name="bus")
        self.lent = Lent(conn, trio.Event())
        await self.nursery.start(self._serve, self.lent)
        if self.listeners.by_channel:  # restarted: the subscription comes back too
            await self._subscription_ref()

    async def _serve(
        self, lent: Lent, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await lent.conn.run(task_status=task_status)
        finally:
            lent.lost.set()

    @actors.handles(GetConnection, inline=True)
    def get_connection(self, msg: GetConnection) -> Lent:
        assert self.lent is not None
        return self.lent

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

    async def on_stop(self) -> None:
        lent, self.lent = self.lent, None
        if lent is not None:
            await lent.conn.aclose()


def _actor_name(url: RedisURL) -> str:
    where = url.path if url.path is not None else f"{url.host}:{url.port}"
    tag = hashlib.sha1(repr(attrs.astuple(url)).encode()).hexdigest()[:8]
    return f"redis {where}/{url.db} {tag}"


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
            lent = await lend(self.conn_ref)
            if lent.lost.is_set():
                await trio.sleep(0.01)  # the connection actor is restarting it
                continue
            try:
                await self.connected(lent)  # before anyone may use it
            except ConnectionLost:
                continue
            self.lent = lent
            assert self._connected is not None
            self._connected.set()
            await self.ready(lent)
            await lent.lost.wait()
            if self.lent is lent:
                self.lent = None
                self._connected = trio.Event()

    async def connected(self, lent: Lent) -> None:
        """Called with each new connection before the actor uses it (load scripts)."""

    async def ready(self, lent: Lent) -> None:
        """Called once the new connection is in use (write what waited for it)."""

    @actors.handles(WhenConnected, inline=True)
    def when_connected(self, msg: WhenConnected) -> trio.Event:
        if self._connected is None:
            self._connected = trio.Event()
        return self._connected


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


async def lend(conn_ref: actors.ActorRef, timeout: float | None = None) -> Lent:
    """Ask for the connection, waiting at most ``timeout`` seconds while Redis is
    unreachable (``ConnectionLost`` after it)."""
    try:
        lent: Lent = await conn_ref.ask(GetConnection(), timeout=timeout)
    except actors.AskTimeout:
        raise ConnectionLost(f"Redis is unreachable: no connection within {timeout:g} s") from None
    return lent


async def with_connection(
    conn_ref: actors.ActorRef,
    fn: Callable[[Connection], Awaitable[T]],
    *,
    deadline: float,
    what: str,
) -> T:
    """Run ``fn(conn)`` on the current connection, again on the next one after a
    connection fault, until the Trio-clock ``deadline``; then raise the fault (a
    ``ConnectionLost`` naming ``what``).

    Cancellation: the current try is abandoned (see ``Connection.execute``)."""
    while True:
        left = deadline - trio.current_time()
        try:
            lent = await lend(conn_ref, timeout=max(left, 0.0) if left < math.inf else None)
            if lent.lost.is_set():
                raise ConnectionLost("the connection was lost; reconnecting")
            return await fn(lent.conn)
        except ConnectionLost as exc:
            if trio.current_time() >= deadline:
                raise ConnectionLost(f"{what}: {exc}") from exc
            # The connection actor restarts with its own backoff; the next ask waits.
            await trio.sleep(0.02)
