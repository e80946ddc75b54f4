"""Pure decisions of the Redis broker: key names, signing, entry checks, backoff.

Nothing here does I/O, so every rule can be unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from bus._priority import PRIORITY_LEVELS

__all__ = [
    "claim_ttl_ms",
    "F_COUNT",
    "F_COUNT_SIG",
    "F_DATA",
    "F_SIG",
    "Entry",
    "Keys",
    "check_entry",
    "check_schedule",
    "count_of",
    "join_announcements",
    "join_member",
    "level_of_key",
    "marker_ok",
    "marker_value",
    "open_result",
    "over_delivered",
    "queue_of_key",
    "seal_result",
    "sign",
    "sign_count",
    "sign_entry",
    "sign_schedule",
    "signed_at",
    "split_announcements",
    "split_member",
    "too_old",
    "unique_holder",
    "unique_value",
]

#: Stream entry fields: the encoded message, its signature (when a secret is set), and
#: how often it was delivered before it was handed back (a copy made at shutdown), with
#: the signature of that count (when a secret is set).
F_DATA = b"d"
F_SIG = b"s"
F_COUNT = b"n"
F_COUNT_SIG = b"c"

#: The version tag that starts every signature made with a secret (``v2.``): an entry
#: signature is ``v2.<signing time, Unix ms>.<hex HMAC>``, the others ``v2.<hex HMAC>``.
SIG_VERSION = b"v2"


@attrs.frozen
class Keys:
    """Every Redis key and channel one queue uses, derived from ``prefix`` and ``queue``.

    Every key of a queue shares one hash tag, ``{prefix:queue}``, so that a Redis
    Cluster keeps them on one node (the Lua scripts and transactions touch several).
    """

    prefix: str
    queue: str
    #: ``base``, made once (every key is named after it, several on a task's path).
    _base: str = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        # A subclass may name its keys otherwise (its own ``base``): taken from it.
        object.__setattr__(self, "_base", self.base)

    #: The stream field that holds the encoded message (a subclass may name another:
    #: taskiq's streams use ``data``). Every write of an entry uses it; a reader takes
    #: it for ``d``.
    data_field: ClassVar[bytes] = F_DATA
    #: The priority levels a queue has a stream for, the most urgent first.
    levels: ClassVar[tuple[int, ...]] = tuple(range(PRIORITY_LEVELS - 1, -1, -1))
    #: Whether the queues of a prefix are found by their keys (``SCAN``) for
    #: ``inspect`` (named otherwise, only the known queues are listed).
    discoverable: ClassVar[bool] = True

    def of(self, queue: str) -> Keys:
        """The keys of ``queue``, named as these are (the same class and prefix)."""
        return self if queue == self.queue else attrs.evolve(self, queue=queue)

    def queue_of_stream(self, key: bytes) -> str | None:
        """The queue whose stream (of any level) ``key`` is, ``None`` if none is."""
        return queue_of_key(self.prefix, key)

    @property
    def base(self) -> str:
        return "{" + f"{self.prefix}:{self.queue}" + "}"

    @property
    def stream(self) -> bytes:
        """The stream messages are XADDed to (priority 0, the default level)."""
        return f"{self._base}:stream".encode()

    @property
    def delayed(self) -> bytes:
        """Sorted set of messages not due yet (score: due time in ms), priority 0."""
        return f"{self._base}:delayed".encode()

    def level_stream(self, level: int) -> bytes:
        """The stream of priority ``level``: :attr:`stream` for 0 (so a queue without
        priorities keeps its one stream), ``...:stream:p<level>`` for 1 to 9."""
        return self.stream if level == 0 else f"{self._base}:stream:p{level}".encode()

    def level_delayed(self, level: int) -> bytes:
        """The delayed set of priority ``level`` (:attr:`delayed` for 0): a due member
        moves to :meth:`level_stream` of the same level."""
        return self.delayed if level == 0 else f"{self._base}:delayed:p{level}".encode()

    @property
    def streams(self) -> tuple[bytes, ...]:
        """Every level's stream, the most urgent first."""
        return tuple(self.level_stream(lv) for lv in self.levels)

    @property
    def delayeds(self) -> tuple[bytes, ...]:
        """Every level's delayed set, in the order of :attr:`streams`."""
        return tuple(self.level_delayed(lv) for lv in self.levels)

    @property
    def dead(self) -> bytes:
        """The dead-letter stream."""
        return f"{self._base}:dead".encode()

    @property
    def workers(self) -> bytes:
        """Sorted set of workers: consumer name scored by the Unix time of its last
        heartbeat (stale members are pruned)."""
        return f"{self._base}:workers".encode()

    @property
    def cancel_channel(self) -> bytes:
        """Pub/sub channel on which cancellations are announced (payload: the task id,
        then its signature when a secret is set)."""
        return f"{self._base}:cancel".encode()

    def unique(self, key: str) -> bytes:
        """The key a unique job holds while it is queued or running (value: its id)."""
        return f"{self._base}:unique:{key}".encode()

    def schedules(self) -> bytes:
        """Hash of the schedules added at run time: name -> the schedule as JSON."""
        return f"{self._base}:schedules".encode()

    def schedule_state(self) -> bytes:
        """Hash: schedule name -> its state as JSON (last tick, fires, misses)."""
        return f"{self._base}:schedule-state".encode()

    def tick_claim(self, name: str, tick_ms: int) -> bytes:
        """The key that claims one tick of one schedule (set once, with an expiry)."""
        return f"{self._base}:tick:{name}:{tick_ms}".encode()

    def cancel_marker(self, task_id: str) -> bytes:
        """Key set (with a TTL) when ``task_id`` is cancelled, so it never starts
        (value: :func:`marker_value`)."""
        return f"{self._base}:cancelled:{task_id}".encode()

    def ran(self, task_id: str, attempt: int) -> bytes:
        """The claim of one attempt of a task (value: the id of the entry allowed to run
        it; kept for the result TTL): a replayed or duplicated entry is dropped."""
        return f"{self._base}:ran:{task_id}:{attempt}".encode()

    @property
    def dead_bytes(self) -> bytes:
        """How many bytes of messages the dead-letter stream holds (its byte cap)."""
        return f"{self._base}:dead:bytes".encode()


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


def level_of_key(key: bytes) -> int:
    """The priority level of a stream key (``...:stream`` is 0, ``...:stream:p<n>``
    is n); 0 for anything else."""
    _, sep, tail = key.rpartition(b":stream:p")
    if sep and tail.isdigit() and len(tail) == 1:
        return int(tail)
    return 0


def sign(secret: bytes | None, data: bytes) -> bytes:
    """Plain hex HMAC-SHA256 of ``data``, or empty without a secret (the cancel
    announcements' signature)."""
    if secret is None:
        return b""
    return hmac.new(secret, data, hashlib.sha256).hexdigest().encode()


def _mac(secret: bytes, purpose: bytes, *parts: bytes) -> bytes:
    """Hex HMAC-SHA256 over a purpose and parts, each length-prefixed (so no two lists
    of parts sign the same bytes, and no purpose's signature is valid for another)."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (SIG_VERSION, purpose, *parts):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest().encode()


def sign_entry(secret: bytes | None, stream: bytes, data: bytes, now: float | None = None) -> bytes:
    """The ``s`` field of a message sent to ``stream`` (the stream it must be read
    from: its prefix, queue and level), signed at ``now`` (Unix seconds, default the
    current time): ``v2.<ms>.<hex HMAC>``; empty without a secret. An entry moved to
    another stream or re-added later than ``max_message_age`` is refused."""
    if secret is None:
        return b""
    ms = b"%d" % int((time.time() if now is None else now) * 1000)
    return SIG_VERSION + b"." + ms + b"." + _mac(secret, b"entry", stream, ms, data)


def _entry_sig_ok(secret: bytes, stream: bytes, data: bytes, sig: bytes) -> bool:
    version, _, rest = sig.partition(b".")
    ms, _, mac = rest.partition(b".")
    if version != SIG_VERSION or not ms.isdigit() or len(ms) > 16:
        return False
    return hmac.compare_digest(mac, _mac(secret, b"entry", stream, ms, data))


def signed_at(sig: bytes) -> float | None:
    """When an entry signature was made (Unix seconds), ``None`` if it has no time."""
    version, _, rest = sig.partition(b".")
    ms = rest.partition(b".")[0]
    if version != SIG_VERSION or not ms.isdigit() or len(ms) > 16:
        return None
    return int(ms) / 1000


def check_entry(
    fields: Mapping[bytes, bytes] | None,
    secret: bytes | None,
    max_bytes: int,
    stream: bytes = b"",
    *,
    max_age: float | None = None,
    now: float | None = None,
) -> tuple[bytes, str | None]:
    """Validate a raw stream entry read from ``stream``: ``(data, None)`` when it may be
    handed to a worker, ``(what to keep of it, reason)`` when it must be dead-lettered.

    With a secret, the signature is checked first (bound to ``stream`` and to its time
    of signing, which must be at most ``max_age`` seconds before ``now``), then the
    size: an unsigned entry is refused as unsigned whatever its size, so a requeue
    (which checks the signature again) never runs it."""
    if not fields:
        return b"", "entry has no fields (deleted or trimmed)"
    data = fields.get(F_DATA)
    if not isinstance(data, bytes):
        return b"", "entry has no message field 'd'"
    if secret is not None:
        keep = data if len(data) <= max_bytes else data[:1024]
        sig = fields.get(F_SIG)
        if not isinstance(sig, bytes) or not sig:
            return keep, "message is not signed"
        if not _entry_sig_ok(secret, stream, data, sig):
            return keep, "message signature is wrong"
        when = signed_at(sig)
        if max_age is not None and when is not None:
            age = (time.time() if now is None else now) - when
            if age > max_age:
                return (
                    keep,
                    f"message signed {age:.0f} s ago, more than max_message_age={max_age:g}",
                )
    if len(data) > max_bytes:
        return data[:1024], f"message of {len(data)} bytes exceeds max_message_bytes={max_bytes}"
    return data, None


def too_old(
    sig: bytes | None, eta: float | None, max_age: float, now: float | None = None
) -> str | None:
    """Why an entry signed with ``sig`` is too old to run (``None`` when it is not):
    signed more than ``max_age`` seconds before ``now``, or before its ``eta`` (a
    delayed message) when that is later. An entry without a signing time (no secret)
    is never too old."""
    when = signed_at(sig) if isinstance(sig, bytes) else None
    if when is None:
        return None
    start = when if eta is None else max(when, eta)
    age = (time.time() if now is None else now) - start
    if age <= max_age:
        return None
    return f"message signed {age:.0f} s ago, more than max_message_age={max_age:g}"


def sign_count(secret: bytes | None, stream: bytes, data: bytes, count: int) -> bytes:
    """The ``c`` field: the signature of the delivery count ``n`` of an entry of
    ``stream`` holding ``data`` (empty without a secret)."""
    if secret is None:
        return b""
    return _mac(secret, b"count", stream, data, b"%d" % count)


def count_of(
    fields: Mapping[bytes, bytes], secret: bytes | None, stream: bytes
) -> tuple[int, str | None]:
    """The deliveries an entry's ``n`` field records (0 without one), and why it was
    ignored (``None`` when it was not): with a secret, only a count signed for this
    stream and data (``c``) counts."""
    raw = fields.get(F_COUNT)
    if raw is None:
        return 0, None
    if not isinstance(raw, bytes) or not raw.isdigit() or len(raw) > 9:
        return 0, "delivery count is not a number"
    if secret is not None:
        csig, data = fields.get(F_COUNT_SIG), fields.get(F_DATA)
        if not isinstance(csig, bytes) or not isinstance(data, bytes):
            return 0, "delivery count is not signed"
        if not hmac.compare_digest(csig, sign_count(secret, stream, data, int(raw))):
            return 0, "delivery count signature is wrong"
    return int(raw), None


def marker_value(secret: bytes | None, marker: bytes) -> bytes:
    """The value of the cancel marker key ``marker``: ``1``, or with a secret
    ``v2.<hex HMAC of the key>``."""
    if secret is None:
        return b"1"
    return SIG_VERSION + b"." + _mac(secret, b"cancel", marker)


def marker_ok(secret: bytes | None, marker: bytes, value: object) -> bool:
    """Whether a cancel marker's value cancels (any value without a secret)."""
    if value is None:
        return False
    if secret is None:
        return True
    return isinstance(value, bytes) and hmac.compare_digest(value, marker_value(secret, marker))


def unique_value(secret: bytes | None, key: bytes, task_id: str) -> bytes:
    """The value a unique job's key holds: its task id, then with a secret ``.`` and the
    HMAC of the key and the id."""
    if secret is None:
        return task_id.encode()
    return task_id.encode() + b"." + _mac(secret, b"unique", key, task_id.encode())


def unique_holder(secret: bytes | None, key: bytes, value: object) -> str | None:
    """The task id a unique key's ``value`` names, ``None`` when it is not one this
    secret made (or not a value at all)."""
    if not isinstance(value, bytes):
        return None
    tid, dot, _ = value.partition(b".")
    try:
        text = tid.decode("ascii")
    except UnicodeDecodeError:
        return None
    if secret is None:
        return None if dot else text
    return text if hmac.compare_digest(value, unique_value(secret, key, text)) else None


def sign_schedule(secret: bytes | None, key: bytes, name: str, spec: bytes) -> bytes:
    """The value of a run-time schedule in the hash ``key``: its JSON, or with a secret
    ``v2.<hex HMAC of key, name and JSON>\n<JSON>``."""
    if secret is None:
        return spec
    return SIG_VERSION + b"." + _mac(secret, b"schedule", key, name.encode(), spec) + b"\n" + spec


def check_schedule(
    secret: bytes | None, key: bytes, name: bytes, value: bytes
) -> tuple[bytes | None, str | None]:
    """The JSON of a run-time schedule's hash value, or ``None`` and why it is refused."""
    if secret is None:
        return value, None
    head, nl, spec = value.partition(b"\n")
    if not nl or not head.startswith(SIG_VERSION + b"."):
        return None, "schedule is not signed"
    if not hmac.compare_digest(head[3:], _mac(secret, b"schedule", key, name, spec)):
        return None, "schedule signature is wrong"
    return spec, None


def seal_result(secret: bytes | None, task_id: str, data: bytes) -> bytes:
    """What a result key holds (and its announcement carries after the task id): the
    encoded result, or with a secret ``v2.<hex HMAC of task id and data>.<data>``."""
    if secret is None:
        return data
    return SIG_VERSION + b"." + _mac(secret, b"result", task_id.encode(), data) + b"." + data


def open_result(
    secret: bytes | None, task_id: str, value: bytes
) -> tuple[bytes | None, str | None]:
    """The encoded result in ``value`` stored or announced for ``task_id``, or ``None``
    and why it is refused."""
    if secret is None:
        return value, None
    head = SIG_VERSION + b"."
    if not value.startswith(head) or value[len(head) + 64 : len(head) + 65] != b".":
        return None, "result is not signed"
    mac, data = value[len(head) : len(head) + 64], value[len(head) + 65 :]
    if not hmac.compare_digest(mac, _mac(secret, b"result", task_id.encode(), data)):
        return None, "result signature is wrong"
    return data, None


#: What starts an announcement of several results (a single one starts with its task
#: id, which never starts with it).
BATCH_MARK = b"*"
#: The most digits a length in a batched announcement has (a length is at most the
#: size of a Redis string, 512 MiB: 9 digits).
_LEN_DIGITS = 10


def join_announcements(payloads: list[bytes]) -> bytes:
    """One announcement for several results: :data:`BATCH_MARK`, then each single
    announcement (task id, then value) after its length in decimal digits and ``:``."""
    parts = [BATCH_MARK]
    for p in payloads:
        parts += (b"%d:" % len(p), p)
    return b"".join(parts)


def split_announcements(payload: bytes) -> list[bytes]:
    """The single announcements in ``payload``: itself when it is not a batch (see
    :func:`join_announcements`); in a batch, those before the first malformed piece
    (a bad length, one past the end), which ends the parse. Never raises, and takes
    time linear in the payload whatever its bytes."""
    if not payload.startswith(BATCH_MARK):
        return [payload]
    out: list[bytes] = []
    pos, end = len(BATCH_MARK), len(payload)
    while pos < end:
        colon = payload.find(b":", pos, pos + _LEN_DIGITS + 1)
        digits = payload[pos:colon]
        if colon < 0 or not digits.isdigit():
            break
        start = colon + 1
        stop = start + int(digits)
        if stop > end:
            break
        out.append(payload[start:stop])
        pos = stop
    return out


def join_member(sig: bytes, data: bytes) -> bytes:
    """A delayed-set member: signature, newline, data (the Lua mover splits it)."""
    return sig + b"\n" + data


def split_member(member: bytes) -> tuple[bytes, bytes]:
    """Inverse of :func:`join_member`."""
    sig, _, data = member.partition(b"\n")
    return sig, data


def claim_ttl_ms(results: Any) -> int:
    """How long the claim of an attempt (``Keys.ran``) is kept, in ms: the result
    backend's TTL (a day without a Redis result backend)."""
    ttl = getattr(results, "ttl", None)
    if not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        ttl = 86_400.0
    return max(1, int(ttl * 1000))


def over_delivered(deliveries: int, max_deliveries: int | None) -> bool:
    """Whether an entry handed out ``deliveries`` times must be dead-lettered."""
    return max_deliveries is not None and deliveries > max_deliveries
