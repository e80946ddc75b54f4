"""Rate limits and concurrency limits, decided without I/O (plus their Redis scripts).

Rates
-----

:func:`parse_rate` reads ``"<count>/<period>"``: a whole number of starts per period.
The period is a unit, optionally preceded by a positive number of units:

- ``s``, ``sec``, ``second`` (also plural), ``m``, ``min``, ``minute``, ``h``, ``hr``,
  ``hour``, ``d``, ``day``: ``"100/s"``, ``"10/minute"``, ``"5/hour"``, ``"1000/day"``;
- with a number of units: ``"10/5s"`` (10 per 5 seconds), ``"3/1.5h"``, ``"1/30 min"``.

``m`` is minutes (there is no millisecond unit). Case and spaces around the parts do
not matter. Anything else raises :class:`ValueError` saying what was expected.

Rate limits: one token bucket per limit key
-------------------------------------------

:func:`limit` makes a :class:`Limit` (``bus.limit``): a key and a rate, shared by every
task that names the same key; the task option ``rate_limit="100/s"`` is
``Limit(key="task:<name>", rate=...)`` (:func:`task_limit`).

A limit is a token bucket holding at most ``burst`` tokens, refilled continuously at
``count / per`` tokens a second; a task starts only by taking a token.

*Burst.* ``burst`` is the bucket's capacity: how many tasks may start at once after the
limit has been idle. A limit of ``count/per`` with burst ``b`` lets at most
``b + count * w / per`` tasks start in any window of ``w`` seconds, so at most
``rate + burst`` in any 1-second window, ``rate`` being ``count / per`` a second. The
default burst is 1: starts are spread evenly, one every ``per / count`` seconds, and a
second holds at most ``rate + 1`` of them (``"100/s"`` never exceeds 101 starts in a
second; with ``burst=100`` it may start 100 at once, and up to 200 in one second).

:class:`TokenBucket` is the bucket in memory; ``TOKEN_BUCKET_LUA`` (in
bus/redis/_limits.py) is the same bucket in Redis, atomic, with all its state on the
server.

*Time in Redis.* The scripts read the server's clock (``TIME``) unless ARGV[1] passes
a time: every worker host then refills a shared bucket and expires shared leases by
the same clock, whatever the skew between the hosts' clocks. A script that reads
``TIME`` and then writes is replicated by its effects, the only mode since Redis 7 and
the default since Redis 5 (the bus needs Redis 6.2 anyway, for ``XAUTOCLAIM``).
Passing ARGV[1] is for tests, which need a clock they control; one key must not mix
the two.

Concurrency limits
------------------

``max_running=5`` lets at most 5 tasks of one key run at once, across processes. A
running task holds a *lease* on a slot, which expires unless the task's worker
refreshes it, so a slot held by a dead worker comes back after ``lease_ttl``.
:class:`RunningTable` is the in-memory table; the scripts of ``bus/redis/_limits.py``
do the same on a Redis sorted set of tokens scored by the expiry time (ms) of their
lease. Expired leases are dropped by
the next acquire or refresh of their key.
"""

from __future__ import annotations

import collections
import heapq
import math
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

__all__ = [
    "Admission",
    "Limit",
    "LocalLimits",
    "Parking",
    "Placement",
    "Rate",
    "RunningTable",
    "TaskLimits",
    "TokenBucket",
    "limit",
    "parse_rate",
    "placement",
    "task_limit",
    "task_limit_key",
]

_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?|\.\d+)?\s*([a-z]+)\s*", re.IGNORECASE)
_SHORT = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}

# Tokens are floats: a refill that should reach exactly one token may fall short of it
# by a rounding error; this much short still counts as a token (and the debt is kept).
_EPSILON = 1e-9


@attrs.frozen
class Rate:
    """``count`` starts per ``per`` seconds."""

    count: int
    """How many starts a period allows (a whole number >= 1)."""
    per: float
    """The period, in seconds (at least 0.001)."""

    def __attrs_post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a rate's count is a whole number >= 1, not {self.count!r}")
        if isinstance(self.per, bool) or not isinstance(self.per, int | float):
            raise TypeError(f"a rate's period is a number of seconds, not {self.per!r}")
        if not (math.isfinite(self.per) and self.per >= 0.001):
            raise ValueError(f"a rate's period is at least 0.001 seconds, not {self.per!r}")

    @property
    def per_second(self) -> float:
        """Starts per second."""
        return self.count / self.per

    def __str__(self) -> str:
        unit = _SHORT.get(float(self.per))
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per:g}s"


def parse_rate(text: str) -> Rate:
    """Read a rate such as ``"100/s"``, ``"10/minute"`` or ``"10/5s"`` (see the module
    documentation for the grammar). Raises :class:`ValueError` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"a rate is a string such as '100/s', not {text!r}")
    expected = (
        "expected '<count>/<period>' such as '100/s', '10/minute', '5/hour' or '10/5s'"
        " (units: s, m, h, d and their names)"
    )
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad rate {text!r}: {expected}")
    count_text, amount_text, unit_text = match.groups()
    unit = _UNITS.get(unit_text.lower())
    if unit is None:
        raise ValueError(f"bad rate {text!r}: unknown unit {unit_text!r}; {expected}")
    amount = 1.0 if amount_text is None else float(amount_text)
    count = int(count_text)
    if count < 1:
        raise ValueError(f"bad rate {text!r}: the count must be at least 1")
    if amount <= 0:
        raise ValueError(f"bad rate {text!r}: the period must be positive")
    return Rate(count, amount * unit)


def _rate(rate: str | Rate) -> Rate:
    return rate if isinstance(rate, Rate) else parse_rate(rate)


def _check_burst(burst: object) -> None:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst is a whole number >= 1, not {burst!r}")


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a limit key is a non-empty string, not {key!r}")


@attrs.frozen
class Limit:
    """A rate limit shared by every task that names its key. Make one with
    :func:`limit`."""

    key: str
    """What the limit is shared by, e.g. ``"api.example.com"``; ``"task:<name>"`` for a
    task's own ``rate_limit``."""
    rate: Rate
    """The sustained rate."""
    burst: int = 1
    """The bucket's capacity: how many may start at once after an idle spell (at most
    ``burst + count * w / per`` starts in any ``w`` seconds)."""

    def __attrs_post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.rate, Rate):
            raise TypeError(f"a limit's rate is a Rate (see parse_rate), not {self.rate!r}")
        _check_burst(self.burst)

    def bucket(self) -> TokenBucket:
        """A fresh in-memory bucket for this limit (full)."""
        return TokenBucket(self.rate, self.burst)


def limit(key: str, rate: str | Rate, *, burst: int | None = None) -> Limit:
    """A rate limit shared by key: ``bus.limit("api", "10/s")``. ``burst`` defaults to 1
    (evenly spread starts); see the module documentation for what it bounds."""
    return Limit(key, _rate(rate), 1 if burst is None else burst)


def task_limit_key(task_name: str) -> str:
    """The limit key of a task's own ``rate_limit`` / ``max_running``: ``task:<name>``."""
    return f"task:{task_name}"


def task_limit(task_name: str, rate_limit: str | Rate | Limit) -> Limit:
    """The :class:`Limit` of the task option ``rate_limit=``: a :class:`Limit` as given,
    a rate as ``Limit(key="task:<name>", rate=...)``."""
    if isinstance(rate_limit, Limit):
        return rate_limit
    return Limit(task_limit_key(task_name), _rate(rate_limit))


@attrs.define
class TokenBucket:
    """A token bucket in memory; the caller passes the time (seconds, any monotonic
    clock). It starts full."""

    rate: Rate
    """The refill rate: ``rate.count`` tokens every ``rate.per`` seconds."""
    burst: int = 1
    """The capacity."""
    tokens: float = attrs.field(init=False)
    """Tokens in the bucket at ``updated``."""
    updated: float | None = attrs.field(init=False, default=None)
    """When ``tokens`` was last brought up to date (``None``: never used)."""

    def __attrs_post_init__(self) -> None:
        _check_burst(self.burst)
        self.tokens = float(self.burst)

    def _refill(self, now: float) -> None:
        if self.updated is None:
            self.updated = now
        elif now > self.updated:  # a clock that steps back refills nothing
            gained = (now - self.updated) * self.rate.count / self.rate.per
            self.tokens = min(float(self.burst), self.tokens + gained)
            self.updated = now

    def try_take(self, now: float) -> float:
        """Take a token: 0.0 if one was taken, else the seconds until one is there
        (and nothing is taken)."""
        self._refill(now)
        if self.tokens >= 1 - _EPSILON:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * self.rate.per / self.rate.count


@attrs.define
class RunningTable:
    """Concurrency slots by key, each held through a lease that expires; the caller
    passes the time. A holder is named by a token of its choice (e.g. its task id)."""

    _leases: dict[str, dict[str, float]] = attrs.field(factory=dict, init=False)

    def _live(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases.get(key)
        if leases is None:
            return {}
        for token in [t for t, expires in leases.items() if expires <= now]:
            del leases[token]
        if not leases:
            del self._leases[key]
        return leases

    def acquire(
        self, key: str, token: str, now: float, lease_ttl: float, *, max_running: int
    ) -> bool:
        """Take a slot of ``key`` for ``token`` until ``now + lease_ttl``, if fewer than
        ``max_running`` live leases hold one. True if ``token`` holds a slot now (a token
        that already holds one has its lease extended)."""
        _check_max(max_running)
        _check_ttl(lease_ttl)
        leases = self._live(key, now)
        if token in leases or len(leases) < max_running:
            self._leases.setdefault(key, leases)[token] = now + lease_ttl
            return True
        return False

    def refresh(self, key: str, token: str, now: float, lease_ttl: float) -> bool:
        """Extend ``token``'s lease to ``now + lease_ttl``. False if it holds none (its
        lease expired: its slot may have gone to another)."""
        _check_ttl(lease_ttl)
        leases = self._live(key, now)
        if token not in leases:
            return False
        leases[token] = now + lease_ttl
        return True

    def release(self, key: str, token: str) -> bool:
        """Give back ``token``'s slot; True if it held one (a lease that expired counts
        until :meth:`acquire` or :meth:`refresh` drops it, as in Redis)."""
        leases = self._leases.get(key)
        if leases is None or leases.pop(token, None) is None:
            return False
        if not leases:
            del self._leases[key]
        return True

    def running(self, key: str, now: float) -> int:
        """How many live leases ``key`` has at ``now`` (a query: it changes nothing)."""
        return sum(expires > now for expires in self._leases.get(key, {}).values())


def _check_max(max_running: object) -> None:
    if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
        raise ValueError(f"max_running is a whole number >= 1, not {max_running!r}")


def _check_ttl(lease_ttl: object) -> None:
    if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float):
        raise TypeError(f"lease_ttl is a number of seconds, not {lease_ttl!r}")
    if not (lease_ttl > 0 and math.isfinite(lease_ttl)):
        raise ValueError(
            f"lease_ttl must be a positive, finite number of seconds, not {lease_ttl!r}"
        )


# ------------------------------------------------------------ limits of one task


@attrs.frozen
class TaskLimits:
    """The limits on the starts of one task: its rate limit (shared by the limit's key)
    and its concurrency limit (``max_running``, keyed by the task's name)."""

    rate: Limit | None = None
    """The token bucket a start takes a token from (``None``: no rate limit)."""
    max_running: int | None = None
    """How many may run at once across the deployment (``None``: no limit)."""
    running_key: str = ""
    """The key of the concurrency limit: ``task:<name>``."""

    @property
    def wait_keys(self) -> tuple[str, ...]:
        """The keys a start may wait for, in the order they are taken: the slot first
        (``running:<key>``), then the token (``rate:<key>``). They name the queues of
        :class:`Parking`."""
        keys: tuple[str, ...] = ()
        if self.max_running is not None:
            keys += (f"running:{self.running_key}",)
        if self.rate is not None:
            keys += (f"rate:{self.rate.key}",)
        return keys


@attrs.frozen
class Placement:
    """Where a task goes and what limits its starts: the options ``queue``,
    ``priority``, ``rate_limit`` and ``max_running``, checked."""

    queue: str | None = None
    priority: int = 0
    limits: TaskLimits | None = None


def placement(task_name: str | None, options: dict[str, Any]) -> Placement:
    """Read the placement options of a task (the others are ignored). Raises
    :class:`TypeError` / :class:`ValueError` on bad values. ``task_name`` may be
    ``None`` to check the options before the name is known."""
    from bus._options import check_queue_name
    from bus._priority import check_priority

    queue = options.get("queue")
    if queue is not None:
        check_queue_name(queue)
    priority = check_priority(options.get("priority", 0))
    rate_limit = options.get("rate_limit")
    max_running = options.get("max_running")
    if max_running is not None:
        _check_max(max_running)
    if rate_limit is None and max_running is None:
        return Placement(queue, priority)
    name = task_name or "?"
    rate = None
    if rate_limit is not None:
        if not isinstance(rate_limit, str | Rate | Limit):
            raise TypeError(
                "rate_limit is a rate such as '100/s' or a bus.limit(key, rate), "
                f"not {rate_limit!r}"
            )
        rate = task_limit(name, rate_limit)
    return Placement(queue, priority, TaskLimits(rate, max_running, task_limit_key(name)))


# ------------------------------------------------------------ waiting for a limit

T = TypeVar("T")


class Parking(Generic[T]):
    """Deliveries set aside until a limit lets them start: a FIFO queue per wait key
    (see :attr:`TaskLimits.wait_keys`), of which only the first is tried again.

    Whoever hands out deliveries owns one. A delivery that may not start yet is
    parked (:meth:`park`) with the time its limit may let it start (``math.inf``: when
    :meth:`wake` says so, e.g. a slot was given back). A key becomes *ripe* at that
    time (see :meth:`due`); it stays ripe until the owner, when a runner is there to
    take a delivery, has tried it: :meth:`pop` its first delivery and either hand it
    out or park it again with ``front=True`` and a new time. A later delivery of a key
    that has a queue waits behind it without being tried, so the deliveries of one
    limit start in the order they came, and a busy limit costs one try per retry time,
    not one per delivery.
    """

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[T]] = {}
        self._retry: dict[str, float] = {}  # the retry time of each unripe key's first item
        self._ripe: dict[str, None] = {}  # keys to try now, oldest first
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def waiting(self, key: str) -> bool:
        """Whether deliveries wait for ``key`` (a new one then waits behind them)."""
        return key in self._queues

    def count(self, key: str) -> int:
        q = self._queues.get(key)
        return 0 if q is None else len(q)

    def park(self, key: str, item: T, retry_at: float, *, front: bool = False) -> None:
        """Set ``item`` aside for ``key``. ``retry_at`` is when to try the first of the
        key again (``math.inf``: when woken); it applies when ``item`` becomes the first
        (the key had no queue, or ``front``)."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = collections.deque()
            front = True
        if front:
            q.appendleft(item)
            self._ripe.pop(key, None)
            self._retry[key] = retry_at
            if retry_at < math.inf:
                self._seq += 1
                heapq.heappush(self._heap, (retry_at, self._seq, key))
        else:
            q.append(item)
        self._len += 1

    def wake(self, key: str) -> None:
        """Make ``key`` ripe now (its limit may let its first delivery start)."""
        if key in self._queues:
            self._retry.pop(key, None)
            self._ripe[key] = None

    def next_retry(self) -> float:
        """When a key ripens next (``math.inf``: none will by itself). Ripe keys do not
        count: they wait for a runner."""
        heap, retry = self._heap, self._retry
        while heap and retry.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def due(self, now: float) -> list[str]:
        """The ripe keys at ``now``, oldest first (see the class documentation)."""
        heap, retry = self._heap, self._retry
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if retry.get(key) == at:
                del retry[key]
                self._ripe[key] = None
        return list(self._ripe)

    def peek(self, key: str) -> T | None:
        """The first delivery waiting for ``key`` (``None``: there is none)."""
        q = self._queues.get(key)
        return None if q is None else q[0]

    def pop(self, key: str) -> T | None:
        """The first delivery waiting for ``key``, removed (``None``: there is none). The
        key stays ripe while deliveries remain (the next may start too)."""
        q = self._queues.get(key)
        if q is None:
            return None
        item = q.popleft()
        self._len -= 1
        if not q:
            self._forget(key)
        return item

    def _forget(self, key: str) -> None:
        del self._queues[key]
        self._retry.pop(key, None)
        self._ripe.pop(key, None)

    def remove_if(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove and return every delivery for which ``pred(item)`` is true."""
        out: list[T] = []
        for key in list(self._queues):
            kept: collections.deque[T] = collections.deque()
            for i in self._queues[key]:
                (out if pred(i) else kept).append(i)
            if kept:
                self._queues[key] = kept
            else:
                self._forget(key)
        self._len -= len(out)
        return out

    def items(self) -> list[T]:
        """Every delivery waiting, key by key, first to last."""
        return [i for q in self._queues.values() for i in q]


@attrs.frozen
class Admission:
    """The answer to "may this delivery start now?": ``ok``, or the wait key it waits
    for and when to try it again (``math.inf``: when woken)."""

    ok: bool
    key: str = ""
    retry_at: float = math.inf


ADMITTED = Admission(True)

#: A slot in memory is given back when its task ends or its worker stops: it needs no
#: expiry. (RunningTable wants a finite lease; this one outlives any run.)
_LOCAL_LEASE = 1e12


class LocalLimits:
    """Rate and concurrency limits within one process (the in-memory broker): a
    :class:`TokenBucket` per limit key and a :class:`RunningTable`. Time is the
    caller's (the Trio clock)."""

    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.running = RunningTable()

    def admit(self, limits: TaskLimits, token: str, now: float) -> Admission:
        """Take what ``limits`` need for one start held by ``token`` (a slot, then a
        token of the bucket); take nothing if either is missing."""
        keys = limits.wait_keys
        slot = limits.max_running is not None
        if slot:
            assert limits.max_running is not None
            if not self.running.acquire(
                limits.running_key, token, now, _LOCAL_LEASE, max_running=limits.max_running
            ):
                return Admission(False, keys[0], math.inf)
        rate = limits.rate
        if rate is not None:
            bucket = self.buckets.get(rate.key)
            if bucket is None:
                bucket = self.buckets[rate.key] = rate.bucket()
            wait = bucket.try_take(now)
            if wait > 0:
                if slot:
                    self.running.release(limits.running_key, token)
                return Admission(False, keys[-1], now + wait)
        return ADMITTED

    def release(self, limits: TaskLimits, token: str) -> str | None:
        """Give back the slot ``token`` holds; the wait key to wake, or ``None``."""
        if limits.max_running is not None and self.running.release(limits.running_key, token):
            return limits.wait_keys[0]
        return None
