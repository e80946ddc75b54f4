"""Schedules: when periodic tasks are due, decided without I/O.

Two triggers, both frozen values with ``next_after(t)`` (the Unix time of the first
tick strictly after Unix time ``t``):

- :func:`every` (``Every``) ticks at ``anchor + k * seconds`` for every integer ``k``.
  The ticks depend only on the two numbers, never on when a scheduler started, so
  every scheduler process computes the same ticks.
- :func:`cron` (``Cron``) takes a standard 5-field cron expression (minute, hour,
  day of month, month, day of week), parsed and matched by the ``cronsim`` library,
  plus the nicknames ``@yearly``/``@annually``, ``@monthly``, ``@weekly``,
  ``@daily``/``@midnight`` and ``@hourly``. Ticks are computed on the wall clock of a
  time zone (``zoneinfo``; ``tz=None`` is UTC) and converted to Unix time. Cron ticks
  fall on whole seconds; a 6-field expression (with seconds) is refused: use
  :func:`every` for schedules finer than a minute.

Daylight-saving time
--------------------

A cron schedule in a zone with daylight-saving time follows the rule of Debian cron,
as ``cronsim`` documents it (``cronsim`` parses the expressions and matches wall-clock
times; this module maps wall-clock times to instants):

- *Fixed-time schedules*, whose minute and hour fields both name fixed values (neither
  starts with ``*``), e.g. ``30 2 * * *`` or ``0 9,17 * * 1-5``, follow the wall clock.
  A time that the clock skips (spring forward: 02:30 on 2027-03-28 does not exist in
  Europe/Paris) fires once, at the first valid instant after the gap (03:00 CEST);
  several skipped times of one gap fire together, as that one tick. A time that the
  clock shows twice (fall back: 02:30 on 2027-10-31 happens at 00:30 and at 01:30 UTC)
  fires once, at its first occurrence (02:30 CEST).
- *Interval schedules*, where ``*`` starts the minute or the hour field, e.g.
  ``*/5 * * * *``, ``0 * * * *`` or ``@hourly``, follow elapsed time: they fire at
  each instant at which the zone's clock shows a matching time. A skipped hour shows
  no times, so nothing fires in it and nothing is lost (``0 * * * *`` goes from
  01:00 CET to 03:00 CEST, one real hour later); a repeated hour shows its times twice,
  so both fire (02:00 CEST and 02:00 CET, one real hour apart). An hourly schedule
  thus stays one tick per real hour. The consequence, Debian's too: an interval
  schedule confined to the skipped hour (``*/30 2 * * *``) does not fire on the day of
  the spring-forward, and fires at both occurrences on the day of the fall-back.

Deciding what to fire
---------------------

:func:`plan` takes a :class:`ScheduleSpec`, the time up to which its ticks were
already handled (``last_tick``, kept by the scheduler, in Redis for a shared one) and
the current time, and says which tick to fire now (at most one), how many were
missed, and when to wake up next. See its docstring for the rules.

Several schedulers
------------------

With Redis, every scheduler process computes the due ticks of every schedule itself,
and claims each tick before sending it with ``SET claim_key(...) <id> NX PX <ttl>``
(``ttl`` from :func:`claim_ttl`, in milliseconds rounded up): only the scheduler whose
``SET`` succeeds sends the task; the others drop the tick. The task id of a tick is
:func:`tick_task_id`, the same in every process, so a tick sent twice anyway (a claim
lost to an expiry or a failover) is the same task twice, which a broker can drop.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any, TypeAlias

import attrs

from bus._codec import MAX_DEPTH, too_deep
from bus._ids import TaskID
from bus._options import check_labels

__all__ = [
    "MISSED_COUNT_LIMIT",
    "Cron",
    "Every",
    "Plan",
    "ScheduleSpec",
    "Trigger",
    "claim_key",
    "claim_ttl",
    "cron",
    "every",
    "plan",
    "tick_task_id",
]

MISSED_COUNT_LIMIT = 10_000
""":func:`plan` counts the due ticks of a cron schedule one by one, up to this many: past
it, ``Plan.missed`` is this value and means "at least this many". The ticks of an
``every`` schedule are counted exactly, whatever the backlog."""

_NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_UTC = _dt.UTC
# A fixed reference for the construction-time check that an expression matches at all.
_PROBE = _dt.datetime(2000, 1, 1, tzinfo=_UTC)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    return number


def _zone(tz: str | None) -> _dt.tzinfo:
    if tz is None:
        return _UTC
    if not isinstance(tz, str):
        raise TypeError(f"tz must be a time zone name such as 'Europe/Paris', not {tz!r}")
    # zoneinfo and cronsim are imported when a cron schedule is made: a worker process
    # without one does not load them.
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {tz!r} (use an IANA name such as 'Europe/Paris' or 'UTC')"
        ) from None


_SEGMENT_PROBE = 6 * 3600
"""Offset changes are looked for every 6 hours of an interval (then pinned to the
second): a zone would need two changes within 6 hours for one to go unseen."""


def _offset(zone: _dt.tzinfo, instant: int) -> _dt.timedelta:
    offset = _dt.datetime.fromtimestamp(instant, zone).utcoffset()
    assert offset is not None
    return offset


def _first_change(zone: _dt.tzinfo, lo: int, hi: int, offset: _dt.timedelta) -> int | None:
    """The first whole second in ``(lo, hi]`` at which the zone's UTC offset is no
    longer ``offset`` (the offset at ``lo``), or ``None``."""
    probe = lo
    while probe < hi:
        step = min(probe + _SEGMENT_PROBE, hi)
        if _offset(zone, step) != offset:
            lo, hi = probe, step
            while hi - lo > 1:  # offset(lo) == offset, offset(hi) != offset
                mid = (lo + hi) // 2
                if _offset(zone, mid) == offset:
                    lo = mid
                else:
                    hi = mid
            return hi
        probe = step
    return None


def _wall(zone: _dt.tzinfo, instant: int) -> _dt.datetime:
    """The naive wall-clock time that the zone shows at ``instant``."""
    return _dt.datetime.fromtimestamp(instant, zone).replace(tzinfo=None)


def _seconds(wall: _dt.datetime) -> int:
    """A naive wall-clock time as seconds, counted as if it were UTC."""
    return int(wall.replace(tzinfo=_UTC).timestamp())


@attrs.frozen
class Cron:
    """A cron schedule: ticks where a 5-field cron expression matches the wall clock of a
    time zone. Make one with :func:`cron`."""

    expr: str
    """The cron expression as given, e.g. ``"30 2 * * *"`` or ``"@hourly"``."""
    tz: str | None = None
    """The IANA time zone whose wall clock the expression reads; ``None`` is UTC."""
    _fields: str = attrs.field(init=False, repr=False, eq=False)
    _zone: _dt.tzinfo = attrs.field(init=False, repr=False, eq=False)
    _fixed_time: bool = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.expr, str):
            raise TypeError(f"a cron expression is a string, not {self.expr!r}")
        text = self.expr.strip()
        fields = _NICKNAMES.get(text.lower(), text)
        parts = fields.split()
        if len(parts) != 5:
            hint = " (use bus.every() for schedules finer than a minute)" if len(parts) == 6 else ""
            raise ValueError(
                f"bad cron expression {self.expr!r}: it needs 5 fields "
                f"(minute hour day-of-month month day-of-week), not {len(parts)}{hint}"
            )
        zone = _zone(self.tz)
        from cronsim import CronSim, CronSimError

        try:
            next(CronSim(fields, _PROBE))
        except CronSimError as exc:
            raise ValueError(f"bad cron expression {self.expr!r}: {exc}") from None
        except StopIteration:
            raise ValueError(f"cron expression {self.expr!r} matches no date") from None
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_zone", zone)
        object.__setattr__(
            self, "_fixed_time", not parts[0].startswith("*") and not parts[1].startswith("*")
        )

    # cronsim is used only as a matcher of naive wall-clock times (given a naive
    # datetime it does plain calendar arithmetic and yields the matches strictly after
    # it, in order). Mapping wall-clock times to instants, i.e. time zones and
    # daylight-saving time, is done here: cronsim's own zone handling steps hours in
    # UTC and lands on hh:30 in zones whose offset changes by 30 minutes.

    def _walls_after(self, wall: _dt.datetime) -> Iterator[_dt.datetime]:
        from cronsim import CronSim

        try:
            yield from CronSim(self._fields, wall)
        except StopIteration:  # pragma: no cover - cronsim gives up after 50 years
            return

    def _instant(self, wall: _dt.datetime) -> int:
        """The instant of a wall-clock time: its first occurrence, or for a time that
        the clock skips, the first instant after the gap."""
        instant = int(wall.replace(tzinfo=self._zone, fold=0).timestamp())
        if _wall(self._zone, instant) == wall:
            return instant
        # Skipped: with fold=0 the time maps past the gap (the offset before it), with
        # fold=1 before it (the offset after it); the gap ends between the two.
        before = int(wall.replace(tzinfo=self._zone, fold=1).timestamp())
        end = _first_change(self._zone, before, instant, _offset(self._zone, before))
        return instant if end is None else end

    def _fixed_ticks(self, start: int) -> Iterator[int]:
        # Wall-clock order is instant order here (first occurrences; a gap's times all
        # map to its end), so dropping what is not after the last tick is enough: that
        # drops the first occurrence of a repeated time when the start lies in its
        # second one, and the further times of a gap.
        last = start
        for wall in self._walls_after(_wall(self._zone, start)):
            instant = self._instant(wall)
            if instant > last:
                yield instant
                last = instant

    def _interval_ticks(self, start: int) -> Iterator[int]:
        # Every instant at which the clock shows a matching time. Within a stretch of
        # constant UTC offset the wall clock is the instant plus that offset; at each
        # change of offset the search restarts from the wall time shown after it.
        zone = self._zone
        s = start
        while True:
            offset = _offset(zone, s)
            shift = int(offset.total_seconds())
            prev = s
            change = None
            for wall in self._walls_after(_wall(zone, s)):
                instant = _seconds(wall) - shift
                change = _first_change(zone, prev, instant, offset)
                if change is not None:
                    break
                yield instant
                prev = instant
            else:  # pragma: no cover - cronsim gave up
                return
            # The offset changes at `change`, before the next match at the old offset.
            first = _wall(zone, change)
            if next(self._walls_after(first - _dt.timedelta(seconds=1)), None) == first:
                yield change
            s = change

    def _ticks_after(self, t: float) -> Iterator[float]:
        start = math.floor(t)  # ticks are whole seconds: the first > t is the first > start
        ticks = self._fixed_ticks(start) if self._fixed_time else self._interval_ticks(start)
        for tick in ticks:
            yield float(tick)

    def next_after(self, t: float) -> float:
        """The Unix time of the first tick strictly after Unix time ``t``
        (``math.inf`` if the expression matches nothing within cronsim's 50-year horizon).
        """
        return next(self._ticks_after(t), math.inf)


@attrs.frozen
class Every:
    """A fixed-period schedule: ticks at ``anchor + k * seconds`` for every integer ``k``.
    Make one with :func:`every`."""

    seconds: float
    """The period, in seconds (at least 0.001: ticks are told apart by the millisecond)."""
    anchor: float = 0.0
    """One tick's Unix time; the default 0.0 puts ticks on multiples of the period since
    the Unix epoch (``every(86400)`` ticks at 00:00 UTC)."""

    def __attrs_post_init__(self) -> None:
        seconds = _number("seconds", self.seconds)
        if seconds <= 0:
            raise ValueError(f"every() needs a positive number of seconds, not {self.seconds!r}")
        if seconds < 0.001:
            raise ValueError(f"every() needs at least 0.001 seconds, not {self.seconds!r}")
        _number("anchor", self.anchor)

    def _tick(self, k: int) -> float:
        return self.anchor + k * self.seconds

    def _k_after(self, t: float) -> int:
        """The smallest ``k`` whose tick is strictly after ``t``."""
        k = math.floor((t - self.anchor) / self.seconds) + 1
        while self._tick(k) <= t:
            k += 1
        while self._tick(k - 1) > t:
            k -= 1
        return k

    def _ticks_after(self, t: float) -> Iterator[float]:
        k = self._k_after(t)
        while True:
            yield self._tick(k)
            k += 1

    def next_after(self, t: float) -> float:
        """The Unix time of the first tick strictly after Unix time ``t``."""
        return self._tick(self._k_after(t))


Trigger: TypeAlias = Cron | Every
"""What makes a schedule tick."""


def cron(expr: str, tz: str | None = None) -> Cron:
    """A schedule from a 5-field cron expression read on the wall clock of ``tz``
    (an IANA zone name; ``None`` is UTC). Raises :class:`ValueError` for a bad
    expression or an unknown zone. See the module documentation for daylight-saving
    time."""
    return Cron(expr, tz)


def every(seconds: float, *, anchor: float = 0.0) -> Every:
    """A schedule that ticks every ``seconds`` seconds, at ``anchor + k * seconds``.
    Raises :class:`ValueError` unless ``seconds`` is at least 0.001."""
    return Every(seconds, anchor)


def _first_at_or_after(trigger: Trigger, t: float) -> float:
    if isinstance(trigger, Every):
        k = math.ceil((t - trigger.anchor) / trigger.seconds)
        while trigger._tick(k) < t:
            k += 1
        while trigger._tick(k - 1) >= t:
            k -= 1
        return trigger._tick(k)
    # Cron ticks are whole seconds: a tick >= t is a tick > ceil(t) - 1.
    return trigger.next_after(math.ceil(t) - 1)


def _latest_at_or_before(trigger: Trigger, t: float) -> float | None:
    """The last tick <= ``t``, searched in windows that grow backwards from ``t``."""
    if isinstance(trigger, Every):
        return trigger._tick(trigger._k_after(t) - 1)
    for window in (60, 600, 3600, 6 * 3600, 86400, 4 * 86400, 16 * 86400, 64 * 86400):
        found = _last_in(trigger, t - window, t)
        if found is not None:
            return found
    for years in (1, 4, 16, 64):
        found = _last_in(trigger, t - years * 366 * 86400, t)
        if found is not None:
            return found
    return None


def _last_in(trigger: Cron, start: float, end: float) -> float | None:
    latest = None
    for tick in trigger._ticks_after(start):
        if tick > end:
            break
        latest = tick
    return latest


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, not {name!r}")
    if not name or not name.strip():
        raise ValueError(f"{what} must not be empty")
    if len(name) > 200:
        raise ValueError(f"{what} is longer than 200 characters: {name[:40]!r}...")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{what} must not contain control characters: {name!r}")
    return name


def _to_tuple(value: Any) -> tuple[Any, ...]:
    return value if type(value) is tuple else tuple(value)


def _check_dict(what: str, value: object) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{what} must be a dict with string keys, not {value!r}")


@attrs.frozen
class ScheduleSpec:
    """One periodic task: which task to send, with what, and when."""

    name: str
    """The schedule's unique name: it keys its claims, its task ids and its state."""
    task_name: str
    """The registered name of the task to send at each tick."""
    trigger: Trigger
    """When it ticks: a :func:`cron` or an :func:`every`."""
    args: tuple[Any, ...] = attrs.field(default=(), converter=_to_tuple)
    """Positional arguments of each sent task (JSON values)."""
    kwargs: dict[str, Any] = attrs.Factory(dict)
    """Keyword arguments of each sent task (JSON values)."""
    labels: dict[str, Any] = attrs.Factory(dict)
    """Labels of each sent task (JSON values)."""
    misfire_grace: float = 60.0
    """How late (seconds after its tick) a tick may still be fired; later, it is skipped
    and counted as missed. It also has to cover a scheduler's ordinary wake-up delay."""

    def __attrs_post_init__(self) -> None:
        _check_name("a schedule name", self.name)
        _check_name("a task name", self.task_name)
        if not isinstance(self.trigger, Cron | Every):
            raise TypeError(
                f"trigger must be bus.cron(...) or bus.every(...), not {self.trigger!r}"
            )
        _check_dict("kwargs", self.kwargs)
        _check_dict("labels", self.labels)
        check_labels(self.labels)  # option labels within their bounds, as a kiq's
        grace = _number("misfire_grace", self.misfire_grace)
        if grace <= 0:
            raise ValueError(f"misfire_grace must be > 0 seconds, not {self.misfire_grace!r}")

    def to_json(self) -> str:
        """This schedule as JSON text (arguments and labels must be JSON values; tuples
        inside them come back as lists)."""
        trigger: dict[str, Any]
        if isinstance(self.trigger, Cron):
            trigger = {"cron": self.trigger.expr, "tz": self.trigger.tz}
        else:
            trigger = {"every": self.trigger.seconds, "anchor": self.trigger.anchor}
        doc = {
            "v": 1,
            "name": self.name,
            "task_name": self.task_name,
            "trigger": trigger,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "labels": self.labels,
            "misfire_grace": self.misfire_grace,
        }
        return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> ScheduleSpec:
        """The schedule that :meth:`to_json` wrote. Raises :class:`ValueError` saying
        what is wrong when ``data`` is not one."""
        try:
            text = data.decode() if isinstance(data, bytes) else data
            if too_deep(text):  # before json parses (and recurses): a stored poison
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
            raise ValueError(f"a schedule is JSON text: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("a schedule is a JSON object")
        if doc.get("v") != 1:
            raise ValueError(f"unknown schedule format version {doc.get('v')!r}")
        expected = {"v", "name", "task_name", "trigger", "args", "kwargs", "labels"}
        missing = expected - set(doc)
        if missing:
            raise ValueError(f"a schedule lacks {sorted(missing)}")
        raw = doc["trigger"]
        trigger: Trigger
        try:
            if isinstance(raw, dict) and set(raw) == {"cron", "tz"}:
                trigger = Cron(raw["cron"], raw["tz"])
            elif isinstance(raw, dict) and set(raw) == {"every", "anchor"}:
                trigger = Every(raw["every"], raw["anchor"])
            else:
                raise ValueError(
                    'a trigger is {"cron": expr, "tz": zone} or {"every": s, "anchor": a},'
                    f" not {raw!r}"
                )
            if not isinstance(doc["args"], list):
                raise ValueError(f"args must be a list, not {doc['args']!r}")
            return cls(
                name=doc["name"],
                task_name=doc["task_name"],
                trigger=trigger,
                args=tuple(doc["args"]),
                kwargs=doc["kwargs"],
                labels=doc["labels"],
                misfire_grace=doc.get("misfire_grace", 60.0),
            )
        except TypeError as exc:
            raise ValueError(f"bad schedule: {exc}") from None


@attrs.frozen
class Plan:
    """What a scheduler does now for one schedule: the result of :func:`plan`."""

    fire: tuple[float, ...]
    """The ticks to send now: empty or one tick (the latest due one)."""
    missed: int
    """Due ticks that are not fired: older ticks of a backlog, and the latest one when it
    is later than ``misfire_grace`` (see :data:`MISSED_COUNT_LIMIT` for cron backlogs)."""
    next_tick: float
    """The next tick after ``now``: when to call :func:`plan` again."""
    last_tick: float
    """Pass this as ``last_tick`` next time: the latest due tick (fired or missed), the
    given ``last_tick`` when none was due, or ``now`` for a new schedule with none due."""


def plan(spec: ScheduleSpec, last_tick: float | None, now: float) -> Plan:
    """Decide what to fire for ``spec`` at time ``now``.

    ``last_tick`` is the time up to which the schedule's ticks were already handled
    (fired or counted missed), normally the previous plan's ``last_tick``. ``None``
    means a new schedule: there is no backlog, its first tick is ``now`` when ``now``
    is exactly a tick, else the next one after ``now``.

    Otherwise the due ticks are those after ``last_tick`` and at or before ``now``. The
    latest of them is fired if it is at most ``spec.misfire_grace`` seconds old, else
    skipped; every other due tick is skipped (a scheduler that was down or asleep fires
    at most one late tick, never a burst of them). Skipped ticks are counted in
    ``missed``. A ``last_tick`` after ``now`` (a clock that went back) makes nothing
    due until the first tick after ``last_tick``.
    """
    trigger = spec.trigger
    if last_tick is None:
        first = _first_at_or_after(trigger, now)
        if first == now:
            return Plan((now,), 0, trigger.next_after(now), now)
        return Plan((), 0, first, now)
    if last_tick >= now:
        return Plan((), 0, trigger.next_after(last_tick), last_tick)
    count = 0
    capped = False
    latest: float | None = None
    upcoming = math.inf
    if isinstance(trigger, Every):
        k_first = trigger._k_after(last_tick)
        k_next = trigger._k_after(now)
        count = k_next - k_first
        if count:
            latest = trigger._tick(k_next - 1)
        upcoming = trigger._tick(k_next)
    else:
        for tick in trigger._ticks_after(last_tick):
            if tick > now:
                upcoming = tick
                break
            if count == MISSED_COUNT_LIMIT:
                capped = True
                latest = _latest_at_or_before(trigger, now)
                upcoming = trigger.next_after(now)
                break
            count += 1
            latest = tick
    if latest is None:
        return Plan((), 0, upcoming, last_tick)
    fire = now - latest <= spec.misfire_grace
    missed = MISSED_COUNT_LIMIT if capped else count - fire
    return Plan((latest,) if fire else (), missed, upcoming, latest)


def _tick_ms(tick: float) -> int:
    ms = round(_number("tick", tick) * 1000)
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"a tick must be a Unix time between 1970 and 10889, not {tick!r}")
    return ms


def tick_task_id(schedule_name: str, tick: float) -> TaskID:
    """The task id of one tick of one schedule: the same in every process.

    A UUIDv7 whose 48-bit timestamp is the tick (in milliseconds) and whose other 74
    free bits come from ``sha256(name, tick)``; the version and variant bits are set as
    :meth:`TaskID.parse` expects. Ticks are told apart by the millisecond.
    """
    _check_name("a schedule name", schedule_name)
    ms = _tick_ms(tick)
    digest = hashlib.sha256(
        b"trio-bus schedule tick\x00" + schedule_name.encode() + b"\x00" + str(ms).encode()
    ).digest()
    bits = int.from_bytes(digest[:10], "big")  # 80 bits, 74 of them used
    rand_a = bits >> 68  # 12 bits
    rand_b = bits & ((1 << 62) - 1)  # 62 bits
    h = f"{ms:012x}7{rand_a:03x}{(rand_b >> 48) | 0x8000:04x}{rand_b & 0xFFFF_FFFF_FFFF:012x}"
    return TaskID.parse(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")


def claim_key(prefix: str, schedule_name: str, tick: float) -> str:
    """The Redis key a scheduler sets (``SET key id NX PX ttl``) to claim one tick:
    ``{prefix}:sched:{schedule_name}:{tick in ms}``."""
    _check_name("a schedule name", schedule_name)
    return f"{prefix}:sched:{schedule_name}:{_tick_ms(tick)}"


def claim_ttl(spec: ScheduleSpec, tick: float) -> float:
    """How long (seconds) the claim of ``tick`` lives: ``max(2 * period, misfire_grace)``,
    ``period`` being the time from ``tick`` to the next tick.

    A tick can only be fired while it is the latest due tick and at most
    ``misfire_grace`` old, that is for ``min(period, misfire_grace)`` seconds after it;
    the claim outlives that by at least ``misfire_grace / 2``, the clock skew between
    scheduler hosts it tolerates. Give Redis ``PX ceil(ttl * 1000)``.
    """
    period = spec.trigger.next_after(tick) - tick
    if math.isinf(period):
        return spec.misfire_grace
    return max(2 * period, spec.misfire_grace)
