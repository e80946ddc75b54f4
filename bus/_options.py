"""Task options: what the decorator takes and what labels may override."""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "MAX_DELAY",
    "MAX_ETA",
    "MAX_RETRIES",
    "MAX_RETRY_DELAY",
    "MAX_TIMEOUT",
    "MAX_UNIQUE_KEY",
    "MAX_UNIQUE_TTL",
    "TaskOptions",
    "check_eta",
    "check_labels",
    "check_queue_name",
    "is_queue_name",
]

_KNOWN = frozenset(
    {"timeout", "retries", "retry_backoff", "retry_backoff_max", "retry_on", "store_result"}
)
_SEND_ONLY = frozenset({"delay", "eta", "unique", "unique_ttl"})
#: How long a unique key holds at most when its task never finishes (seconds).
DEFAULT_UNIQUE_TTL = 3600.0

# The bounds of every option (decorator keyword or label). Each is checked where the
# task is declared, where it is sent (``kiq`` raises) and where it is received (the
# worker rejects the message): no value read from a queue can overflow a computation.
MAX_TIMEOUT = 7 * 86_400.0
"""The longest ``timeout`` (seconds): a week."""
MAX_RETRIES = 1000
"""The most ``retries``."""
MAX_RETRY_DELAY = 86_400.0
"""The longest ``retry_backoff`` and ``retry_backoff_max`` (seconds): a day. So no retry
waits longer than a day."""
MAX_DELAY = 3650 * 86_400.0
"""The longest ``delay`` (seconds), and how far ahead an ``eta`` may be: 3650 days
(about ten years)."""
MAX_ETA = 1e12
"""The largest ``eta`` (a Unix time, seconds) anywhere: a message's, a label's (so a
time in milliseconds stays an exact float)."""
MAX_UNIQUE_TTL = 30 * 86_400.0
"""The longest ``unique_ttl`` (seconds): 30 days."""
MAX_UNIQUE_KEY = 1024
"""The longest unique key (characters), the task's name included."""
#: Labels named like options, checked wherever labels are (see :func:`check_labels`).
_LABELS = _KNOWN | _SEND_ONLY | {"unique_key"}
#: Options read by the task and the broker, not by the worker's run: where a task goes
#: (queue, priority) and the limits on its starts (see bus._limits).
_PLACEMENT = frozenset({"queue", "priority", "rate_limit", "max_running"})

_QUEUE_FORBIDDEN = frozenset("{}*")


def is_queue_name(name: object) -> bool:
    """Whether ``name`` can name a queue: a non-empty string of at most 200 characters
    without whitespace, braces or ``*`` (a Redis key holds it; ``*`` is reserved)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 200
        and not any(c.isspace() or c in _QUEUE_FORBIDDEN for c in name)
    )


def check_queue_name(name: object) -> str:
    """``name`` if :func:`is_queue_name`; :class:`TypeError` / :class:`ValueError` saying
    why not."""
    if not isinstance(name, str):
        raise TypeError(f"a queue name is a string, not {name!r}")
    if not is_queue_name(name):
        raise ValueError(
            f"bad queue name {name!r}: 1 to 200 characters, without whitespace, braces or '*'"
        )
    return name


def _check_seconds(
    name: str, value: float | None, *, allow_zero: bool = False, most: float = math.inf
) -> None:
    if value is None:
        return
    # (value != value: NaN; math.isnan would raise OverflowError on a huge int.)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise TypeError(f"{name} must be a number of seconds, not {_short(value)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {_short(value)}")
    if not value <= most:  # infinity and huge ints too
        raise ValueError(f"{name} must be at most {most:g} seconds, not {_short(value)}")


def _short(value: object) -> str:
    """``repr(value)``, cut short (a label may hold a 4000-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _retry_on(value: Any) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"retry_on takes exception types, not {item!r}")
    return tuple(items)


@attrs.frozen
class TaskOptions:
    """How a task runs. Set with decorator keywords; labels of the same name override
    ``timeout``, ``retries``, ``retry_backoff``, ``retry_backoff_max`` and
    ``store_result`` per call."""

    timeout: float | None = None
    """Seconds an attempt may run before it is cancelled with status TIMEOUT (at most
    :data:`MAX_TIMEOUT`, a week)."""
    retries: int = 0
    """How many times a failed attempt is tried again (0: never; at most
    :data:`MAX_RETRIES`)."""
    retry_backoff: float = 1.0
    """Delay before the first retry; it doubles for each later one (0 to
    :data:`MAX_RETRY_DELAY`, a day)."""
    retry_backoff_max: float = 300.0
    """Upper bound of the retry delay (0 to :data:`MAX_RETRY_DELAY`, a day)."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only failures that are instances of these types are retried."""
    store_result: bool = True
    """Whether the worker stores the task's result. ``False``: nothing is stored (on
    Redis no SET and no PUBLISH), and ``wait_result`` / ``get_result`` on its handle
    raise :class:`bus.ResultNotFound` at once. A workflow's steps store theirs anyway."""

    def __attrs_post_init__(self) -> None:
        _check_seconds("timeout", self.timeout, most=MAX_TIMEOUT)
        r = self.retries
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RETRIES:
            raise ValueError(f"retries must be a whole number, 0 to {MAX_RETRIES}, not {_short(r)}")
        _check_seconds("retry_backoff", self.retry_backoff, allow_zero=True, most=MAX_RETRY_DELAY)
        _check_seconds(
            "retry_backoff_max", self.retry_backoff_max, allow_zero=True, most=MAX_RETRY_DELAY
        )
        _retry_on(self.retry_on)
        if not isinstance(self.store_result, bool):
            raise TypeError(f"store_result must be True or False, not {_short(self.store_result)}")

    @classmethod
    def build(cls, options: dict[str, Any]) -> tuple[TaskOptions, dict[str, Any]]:
        """Split decorator keywords into run options and send defaults (delay / eta).
        The placement options (``queue``, ``priority``, ``rate_limit``, ``max_running``)
        are accepted and left out of both: see :func:`bus._limits.placement`."""
        unknown = set(options) - _KNOWN - _SEND_ONLY - _PLACEMENT
        if unknown:
            known = sorted(_KNOWN | _SEND_ONLY | _PLACEMENT)
            raise TypeError(f"unknown task option(s) {sorted(unknown)}; known: {known}")
        run = {k: v for k, v in options.items() if k in _KNOWN}
        if "retry_on" in run:
            run["retry_on"] = _retry_on(run["retry_on"])
        send = {k: v for k, v in options.items() if k in _SEND_ONLY}
        if send:
            resolve_eta(send)  # validate now, not at the first kiq
            check_unique(send.get("unique"), send.get("unique_ttl"))
        return cls(**run), send

    def with_labels(self, labels: Mapping[str, Any]) -> TaskOptions:
        """These options with any overriding labels applied. Every label named like an
        option is checked (:func:`check_labels`): invalid ones raise ``TypeError`` /
        ``ValueError``."""
        if not labels or not (_LABELS.intersection(labels)):
            return self
        check_labels(labels, options=False)
        changes = {k: labels[k] for k in _KNOWN if k in labels and k != "retry_on"}
        return attrs.evolve(self, **changes) if changes else self

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1`` after attempt ``attempt`` failed:
        ``min(retry_backoff * 2 ** (attempt - 1), retry_backoff_max)``, never more than
        :data:`MAX_RETRY_DELAY` whatever ``attempt`` is."""
        try:
            delay = math.ldexp(self.retry_backoff, min(max(0, attempt - 1), 4096))
        except OverflowError:
            delay = math.inf
        return float(min(delay, self.retry_backoff_max, MAX_RETRY_DELAY))


def check_labels(labels: Mapping[str, Any], *, options: bool = True) -> None:
    """Check the labels named like options (others are free-form): ``timeout``,
    ``retries``, ``retry_backoff``, ``retry_backoff_max``, ``store_result`` as the
    decorator keywords;
    ``delay`` (0 to :data:`MAX_DELAY`), ``eta`` (a finite Unix time), ``unique``,
    ``unique_ttl`` (up to :data:`MAX_UNIQUE_TTL`) and ``unique_key`` (a string of at
    most :data:`MAX_UNIQUE_KEY` characters). A ``retry_on`` label is ignored (exception
    types are not JSON). Raises ``TypeError`` / ``ValueError`` saying which is wrong.
    ``options=False`` leaves out the first four (the caller builds a
    :class:`TaskOptions` of them, which checks them)."""
    if not labels or not _LABELS.intersection(labels):
        return
    if options:
        run = {k: labels[k] for k in _KNOWN if k in labels and k != "retry_on"}
        if run:
            TaskOptions(**run)
    if "delay" in labels:
        _check_seconds("delay", labels["delay"], allow_zero=True, most=MAX_DELAY)
    eta = labels.get("eta")
    if (
        eta is not None
        and not isinstance(eta, _dt.datetime)
        and (isinstance(eta, bool) or not isinstance(eta, int | float) or not abs(eta) <= MAX_ETA)
    ):
        raise ValueError(
            f"eta must be a Unix time (at most {MAX_ETA:g}) or an aware datetime, not {_short(eta)}"
        )
    if "unique" in labels or "unique_ttl" in labels:
        check_unique(labels.get("unique"), labels.get("unique_ttl"))
    if "unique_key" in labels:
        key = labels["unique_key"]
        if not isinstance(key, str) or not 0 < len(key) <= MAX_UNIQUE_KEY:
            raise ValueError(
                f"unique_key must be a string of 1 to {MAX_UNIQUE_KEY} characters, "
                f"not {str(key)[:80]!r}"
            )


def check_unique(unique: Any, ttl: Any) -> None:
    """Validate the ``unique`` option (``True``, ``False``/``None`` or a key string) and
    ``unique_ttl`` (seconds > 0)."""
    if unique is not None and not isinstance(unique, bool | str):
        raise TypeError(f"unique must be True, False or a key string, not {unique!r}")
    if isinstance(unique, str) and not unique:
        raise ValueError("a unique key must be a non-empty string")
    if isinstance(unique, str) and len(unique) > MAX_UNIQUE_KEY:
        raise ValueError(f"a unique key is at most {MAX_UNIQUE_KEY} characters long")
    if ttl is not None:
        _check_seconds("unique_ttl", ttl, most=MAX_UNIQUE_TTL)


def resolve_eta(values: dict[str, Any]) -> float | None:
    """The Unix time at which to run, from ``delay`` (seconds) or ``eta`` (a Unix time or
    an aware datetime). Raises ``ValueError``/``TypeError`` on bad values."""
    delay, eta = values.get("delay"), values.get("eta")
    if delay is not None and eta is not None:
        raise ValueError("give delay or eta, not both")
    if delay is not None:
        _check_seconds("delay", delay, allow_zero=True, most=MAX_DELAY)
        return time.time() + float(delay) if delay > 0 else None
    if eta is None:
        return None
    if isinstance(eta, _dt.datetime):
        if eta.tzinfo is None:
            raise ValueError("eta must be a timezone-aware datetime (naive times are ambiguous)")
        return check_eta(eta.timestamp())
    if isinstance(eta, bool) or not isinstance(eta, int | float) or eta != eta:
        raise TypeError(f"eta must be a Unix time or an aware datetime, not {_short(eta)}")
    return check_eta(float(eta))


def check_eta(eta: float) -> float:
    """``eta`` (a Unix time) if it is at most :data:`MAX_DELAY` ahead of now (a time in
    the past means now); ``ValueError`` if not."""
    if not (abs(eta) <= MAX_ETA and eta <= time.time() + MAX_DELAY):  # NaN and inf too
        raise ValueError(
            f"eta must be a finite Unix time at most {MAX_DELAY / 86_400:g} days ahead, "
            f"not {_short(eta)}"
        )
    return eta
