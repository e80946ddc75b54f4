"""The Redis broker's settings: one frozen value, validated once."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import attrs

from bus._ids import TaskID
from bus.redis._url import RedisURL

__all__ = ["DEFAULT_DEAD_LETTER_BYTES", "DEFAULT_MAXLEN", "RedisSettings"]

#: The default ``maxlen`` of each stream (see docs/redis.md for how it was sized).
DEFAULT_MAXLEN = 1_000_000
#: The default byte cap of a queue's dead-letter stream (256 MiB).
DEFAULT_DEAD_LETTER_BYTES = 256 * 1024 * 1024


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _seconds_or_zero(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{attribute.name} must be >= 0 seconds, not {value!r}")


def _optional_seconds_or_zero(
    instance: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value is not None:
        _seconds_or_zero(instance, attribute, value)


def _optional_seconds(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _seconds(instance, attribute, value)


def _count(minimum: int, optional: bool = False) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = f"a whole number >= {minimum}" + (" or None" if optional else "")
            raise ValueError(f"{attribute.name} must be {what}, not {value!r}")

    return check


def _name(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value or any(c in value for c in "{}\n "):
        raise ValueError(
            f"{attribute.name} must be a non-empty string without braces, spaces or newlines, "
            f"not {value!r}"
        )


def _secret(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    elif not isinstance(value, bytes):
        raise TypeError(f"secret must be bytes, str or None, not {type(value).__name__}")
    # As long as the HMAC-SHA256 output at least: a short key is guessed sooner.
    if len(value) < 32:
        raise ValueError(
            f"secret must be at least 32 bytes long, not {len(value)}: make one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return value


def _url(value: str | RedisURL) -> RedisURL:
    return value if isinstance(value, RedisURL) else RedisURL.parse(value)


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{TaskID.new()[-8:]}"


@attrs.frozen
class RedisSettings:
    """How a :class:`~bus.redis.RedisBroker` uses Redis. ``RedisBroker(url, **kwargs)``
    builds one from its keyword arguments; pass ``settings=`` to share one."""

    url: RedisURL = attrs.field(default=RedisURL.parse("redis://127.0.0.1:6379"), converter=_url)
    """Where Redis is: ``redis://``, ``rediss://`` (TLS), ``unix://``,
    ``redis+sentinel://`` or ``redis+cluster://`` (and ``rediss+...``; see
    :class:`~bus.redis._url.RedisURL`); a malformed URL raises ``ValueError`` here."""
    queue: str = attrs.field(default="bus", validator=_name)
    """The default queue: where a task without a ``queue`` goes, and what a worker
    consumes unless given ``queues`` (part of every key of the queue)."""
    prefix: str = attrs.field(default="bus", validator=_name)
    """First part of every key."""
    group: str = attrs.field(default="workers", validator=_name)
    """The consumer group of the queue's stream."""
    consumer: str = attrs.field(factory=_default_consumer, validator=_name)
    """This worker's consumer name (default: host, pid and a random part)."""
    maxlen: int | None = attrs.field(default=DEFAULT_MAXLEN, validator=_count(1, optional=True))
    """Cap each stream (a queue's level) at about this many entries (``XADD MAXLEN ~``):
    when more wait, the oldest are dropped, so a flood of sends cannot fill Redis's
    memory (acknowledged entries are deleted anyway). The default, one million, holds
    about 210 MB of typical 180-byte messages (310 MB signed; measured, see
    docs/redis.md); ``None``: no cap."""
    block: float = attrs.field(default=1.0, validator=_seconds)
    """Seconds a blocking read waits before reading again."""
    visibility_timeout: float = attrs.field(default=60.0, validator=_seconds)
    """Seconds without heartbeat after which another worker claims an entry."""
    heartbeat_interval: float | None = attrs.field(default=None, validator=_optional_seconds)
    """How often entries of running tasks are refreshed (default: a third of the
    visibility timeout)."""
    reap_interval: float | None = attrs.field(default=None, validator=_optional_seconds)
    """How often a worker looks for abandoned entries (default: a quarter of the
    visibility timeout, at least 0.1 s)."""
    max_deliveries: int | None = attrs.field(default=5, validator=_count(1, optional=True))
    """An entry delivered more often is dead-lettered; ``None``: no limit."""
    delay_poll_interval: float = attrs.field(default=0.5, validator=_seconds)
    """Longest time the mover of delayed messages sleeps."""
    max_message_bytes: int = attrs.field(default=1_048_576, validator=_count(1))
    """Larger entries are dead-lettered."""
    secret: bytes | None = attrs.field(default=None, converter=_secret, repr=False)
    """HMAC-SHA256 key: messages and cancels are signed, and unsigned or wrongly
    signed ones are refused. At least 32 bytes (``ValueError`` otherwise); never shown
    by ``repr()``."""
    cancel_ttl: float = attrs.field(default=86_400.0, validator=_seconds)
    """Seconds a cancel marker lives."""
    dead_letter_maxlen: int | None = attrs.field(default=100_000, validator=_count(1, True))
    """Cap of the dead-letter stream (``None``: no cap)."""
    dead_letter_failures: bool = False
    """Also dead-letter tasks that failed for good (out of retries), so that
    ``bus dead requeue`` can run them again."""
    send_timeout: float | None = attrs.field(default=10.0, validator=_optional_seconds_or_zero)
    """Seconds a send (``kiq``, ``kick``, ``kiq_many``) waits for Redis while it is
    unreachable, then :class:`bus.BrokerUnavailable`; ``None``: wait as long as it
    takes."""
    command_timeout: float | None = attrs.field(default=10.0, validator=_optional_seconds)
    """Seconds every other call that needs Redis waits while it is unreachable or
    does not answer (``inspect``, ``cancel``, dead letters, schedules, ``get_result``),
    then :class:`bus.BrokerUnavailable`; ``None``: wait as long as it takes."""
    write_timeout: float = attrs.field(default=300.0, validator=_seconds)
    """Seconds a worker keeps retrying a finished task's result and ack while Redis is
    unreachable (after that the task runs again elsewhere)."""
    connect_timeout: float | None = attrs.field(default=10.0, validator=_optional_seconds)
    """Seconds ``async with broker`` (and so ``run_worker``) waits for Redis at start,
    then :class:`bus.BrokerUnavailable` naming the URL and the cause (``None``: wait as
    long as it takes, retrying with backoff). A Redis that refuses us for good (a wrong
    password, no such db, a server that is not Redis) fails the start at once."""
    limit_backlog: int = attrs.field(default=1000, validator=_count(1))
    """How many tasks over their rate or concurrency limit a worker process keeps aside
    (read, waiting for the limit, not holding a runner) at most; with that many, it
    reads nothing more until some of them started."""
    limit_poll_interval: float = attrs.field(default=0.05, validator=_seconds)
    """How often a task waiting for a ``max_running`` slot asks again (a slot given
    back by this process wakes it at once; one given back elsewhere is seen at the
    next ask)."""
    max_message_age: float | None = attrs.field(default=None, validator=_optional_seconds)
    """With ``secret`` set: entries signed more than this many seconds before they
    are read (or before their ``eta``, for a delayed message) are refused
    (dead-lettered, never run), so a captured entry cannot be replayed later. ``None``
    (the default): no limit (a replay of an attempt that ran is dropped anyway). Set it
    above the longest time a message may wait in the queue."""
    dead_letter_max_bytes: int | None = attrs.field(
        default=DEFAULT_DEAD_LETTER_BYTES, validator=_count(1, True)
    )
    """Cap of the messages the dead-letter stream holds, in bytes (the oldest letters go
    first); ``None``: no byte cap (``dead_letter_maxlen`` still applies)."""

    min_replicas_ack: int = attrs.field(default=0, validator=_count(0))
    """A send (``kiq``, ``kick``, ``kick_many``) returns only once this many replicas
    have it (``WAIT``, at most ``send_timeout`` or 10 s; fewer: :class:`bus.SendError`,
    the task may still run), so that a failover loses no accepted send. 0 (the
    default): Redis's asynchronous replication, where a send acknowledged just before
    a failover can be lost. See docs/redis.md, "Cluster and Sentinel"."""

    @property
    def wait_ms(self) -> int:
        """The ``WAIT`` timeout of ``min_replicas_ack``, in milliseconds."""
        return max(1, int(1000 * min(self.send_timeout or 10.0, 10.0)))

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_interval or self.visibility_timeout / 3

    @property
    def reap(self) -> float:
        return self.reap_interval or max(0.1, self.visibility_timeout / 4)
