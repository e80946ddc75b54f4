"""Pure decisions of the Redis broker: key names, signing, entry checks, backoff.

Nothing here does I/O, so every rule can be unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import attrs

from bus._priority import PRIORITY_LEVELS

__all__ = [
    "F_COUNT",
    "F_DATA",
    "F_SIG",
    "Entry",
    "Keys",
    "check_entry",
    "queue_of_key",
    "join_member",
    "over_delivered",
    "sign",
    "split_member",
]

#: Stream entry fields: the encoded message, its HMAC (when a secret is set), and how
#: often it was delivered before it was handed back (a copy made at shutdown).
F_DATA = b"d"
F_SIG = b"s"
F_COUNT = b"n"


@attrs.frozen
class Keys:
    """Every Redis key and channel one queue uses, derived from ``prefix`` and ``queue``.

    Every key of a queue shares one hash tag, ``{prefix:queue}``, so that a Redis
    Cluster keeps them on one node (the Lua scripts and transactions touch several).
    """

    prefix: str
    queue: str

    @property
    def base(self) -> str:
        return "{" + f"{self.prefix}:{self.queue}" + "}"

    @property
    def stream(self) -> bytes:
        """The stream messages are XADDed to (priority 0, the default level)."""
        return f"{self.base}:stream".encode()

    @property
    def delayed(self) -> bytes:
        """Sorted set of messages not due yet (score: due time in ms), priority 0."""
        return f"{self.base}:delayed".encode()

    def level_stream(self, level: int) -> bytes:
        """The stream of priority ``level``: :attr:`stream` for 0 (so a queue without
        priorities keeps its one stream), ``...:stream:p<level>`` for 1 to 9."""
        return self.stream if level == 0 else f"{self.base}:stream:p{level}".encode()

    def level_delayed(self, level: int) -> bytes:
        """The delayed set of priority ``level`` (:attr:`delayed` for 0): a due member
        moves to :meth:`level_stream` of the same level."""
        return self.delayed if level == 0 else f"{self.base}:delayed:p{level}".encode()

    @property
    def streams(self) -> tuple[bytes, ...]:
        """Every level's stream, the most urgent first."""
        return tuple(self.level_stream(lv) for lv in range(PRIORITY_LEVELS - 1, -1, -1))

    @property
    def delayeds(self) -> tuple[bytes, ...]:
        """Every level's delayed set, in the order of :attr:`streams`."""
        return tuple(self.level_delayed(lv) for lv in range(PRIORITY_LEVELS - 1, -1, -1))

    @property
    def dead(self) -> bytes:
        """The dead-letter stream."""
        return f"{self.base}:dead".encode()

    @property
    def workers(self) -> bytes:
        """Sorted set of workers: consumer name scored by the Unix time of its last
        heartbeat (stale members are pruned)."""
        return f"{self.base}:workers".encode()

    @property
    def cancel_channel(self) -> bytes:
        """Pub/sub channel on which cancellations are announced (payload: the task id,
        then its signature when a secret is set)."""
        return f"{self.base}:cancel".encode()

    def unique(self, key: str) -> bytes:
        """The key a unique job holds while it is queued or running (value: its id)."""
        return f"{self.base}:unique:{key}".encode()

    def schedules(self) -> bytes:
        """Hash of the schedules added at run time: name -> the schedule as JSON."""
        return f"{self.base}:schedules".encode()

    def schedule_state(self) -> bytes:
        """Hash: schedule name -> its state as JSON (last tick, fires, misses)."""
        return f"{self.base}:schedule-state".encode()

    def tick_claim(self, name: str, tick_ms: int) -> bytes:
        """The key that claims one tick of one schedule (set once, with an expiry)."""
        return f"{self.base}:tick:{name}:{tick_ms}".encode()

    def cancel_marker(self, task_id: str) -> bytes:
        """Key set (with a TTL) when ``task_id`` is cancelled, so it never starts."""
        return f"{self.base}:cancelled:{task_id}".encode()


@attrs.frozen
class Entry:
    """The tag of a delivery read from any stream but the broker's default one (whose
    tag is the bare entry id): which stream, which entry, and the stream's queue and
    level."""

    stream: bytes
    eid: bytes
    queue: str
    level: int


def queue_of_key(prefix: str, key: bytes) -> str | None:
    """The queue whose stream (of any level) ``key`` is, for keys of ``prefix``:
    ``{prefix:<queue>}:stream`` or ``...:stream:p<n>``; ``None`` for any other key."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    head = "{" + prefix + ":"
    if not text.startswith(head):
        return None
    queue, sep, rest = text[len(head) :].partition("}:stream")
    if not sep or not queue or (rest and not (rest.startswith(":p") and rest[2:].isdigit())):
        return None
    return queue


def sign(secret: bytes | None, data: bytes) -> bytes:
    """The signature field for ``data``: hex HMAC-SHA256, or empty without a secret."""
    if secret is None:
        return b""
    return hmac.new(secret, data, hashlib.sha256).hexdigest().encode()


def check_entry(
    fields: Mapping[bytes, bytes] | None, secret: bytes | None, max_bytes: int
) -> tuple[bytes, str | None]:
    """Validate a raw stream entry: ``(data, None)`` when it may be handed to a worker,
    ``(what to keep of it, reason)`` when it must be dead-lettered."""
    if not fields:
        return b"", "entry has no fields (deleted or trimmed)"
    data = fields.get(F_DATA)
    if not isinstance(data, bytes):
        return b"", "entry has no message field 'd'"
    if len(data) > max_bytes:
        return data[:1024], f"message of {len(data)} bytes exceeds max_message_bytes={max_bytes}"
    if secret is not None:
        sig = fields.get(F_SIG)
        if not isinstance(sig, bytes) or not sig:
            return data, "message is not signed"
        if not hmac.compare_digest(sig, sign(secret, data)):
            return data, "message signature is wrong"
    return data, None


def join_member(sig: bytes, data: bytes) -> bytes:
    """A delayed-set member: signature, newline, data (the Lua mover splits it)."""
    return sig + b"\n" + data


def split_member(member: bytes) -> tuple[bytes, bytes]:
    """Inverse of :func:`join_member`."""
    sig, _, data = member.partition(b"\n")
    return sig, data


def over_delivered(deliveries: int, max_deliveries: int | None) -> bool:
    """Whether an entry handed out ``deliveries`` times must be dead-lettered."""
    return max_deliveries is not None and deliveries > max_deliveries
