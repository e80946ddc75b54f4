"""The Redis broker's settings: one frozen value, validated once."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import attrs

from bus._ids import TaskID
from bus.redis._url import RedisURL

__all__ = ["RedisSettings"]


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _seconds_or_zero(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{attribute.name} must be >= 0 seconds, not {value!r}")


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
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"secret must be bytes, str or None, not {type(value).__name__}")


def _url(value: str | RedisURL) -> RedisURL:
    return value if isinstance(value, RedisURL) else RedisURL.parse(value)


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{TaskID.new()[-8:]}"


@attrs.frozen
class RedisSettings:
    """How a :class:`~bus.redis.RedisBroker` uses Redis. ``RedisBroker(url, **kwargs)``
    builds one from its keyword arguments; pass ``settings=`` to share one."""

    url: RedisURL = attrs.field(default=RedisURL.parse("redis://127.0.0.1:6379"), converter=_url)
    """Where Redis is: ``redis://``, ``rediss://`` (TLS) or ``unix://`` (see
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
    maxlen: int | None = attrs.field(default=None, validator=_count(1, optional=True))
    """Cap the stream at about this many entries (``XADD MAXLEN ~``); ``None``: no cap
    (acknowledged entries are deleted anyway)."""
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
    secret: bytes | None = attrs.field(default=None, converter=_secret)
    """HMAC-SHA256 key: messages and cancels are signed, and unsigned or wrongly
    signed ones are refused."""
    cancel_ttl: float = attrs.field(default=86_400.0, validator=_seconds)
    """Seconds a cancel marker lives."""
    dead_letter_maxlen: int | None = attrs.field(default=100_000, validator=_count(1, True))
    """Cap of the dead-letter stream (``None``: no cap)."""
    dead_letter_failures: bool = False
    """Also dead-letter tasks that failed for good (out of retries), so that
    ``bus dead requeue`` can run them again."""
    send_timeout: float = attrs.field(default=10.0, validator=_seconds_or_zero)
    """Seconds a send (and a cancel) retries while Redis is unreachable, then
    ``SendError``."""
    write_timeout: float = attrs.field(default=300.0, validator=_seconds)
    """Seconds a worker keeps retrying a finished task's result and ack while Redis is
    unreachable (after that the task runs again elsewhere)."""
    connect_timeout: float | None = attrs.field(default=None, validator=_optional_seconds)
    """Seconds ``async with broker`` waits for Redis at start before it fails
    (``None``: wait as long as it takes, retrying with backoff)."""
    limit_backlog: int = attrs.field(default=1000, validator=_count(1))
    """How many tasks over their rate or concurrency limit a worker process keeps aside
    (read, waiting for the limit, not holding a runner) at most; with that many, it
    reads nothing more until some of them started."""
    limit_poll_interval: float = attrs.field(default=0.05, validator=_seconds)
    """How often a task waiting for a ``max_running`` slot asks again (a slot given
    back by this process wakes it at once; one given back elsewhere is seen at the
    next ask)."""

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_interval or self.visibility_timeout / 3

    @property
    def reap(self) -> float:
        return self.reap_interval or max(0.1, self.visibility_timeout / 4)
