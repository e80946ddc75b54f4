"""Task options: what the decorator takes and what labels may override."""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

import attrs

__all__ = ["TaskOptions", "check_queue_name", "is_queue_name"]

_KNOWN = frozenset({"timeout", "retries", "retry_backoff", "retry_backoff_max", "retry_on"})
_SEND_ONLY = frozenset({"delay", "eta", "unique", "unique_ttl"})
#: How long a unique key holds at most when its task never finishes (seconds).
DEFAULT_UNIQUE_TTL = 3600.0
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


def _check_seconds(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")


def _retry_on(value: Any) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"retry_on takes exception types, not {item!r}")
    return tuple(items)


@attrs.frozen
class TaskOptions:
    """How a task runs. Set with decorator keywords; labels of the same name override
    ``timeout``, ``retries``, ``retry_backoff`` and ``retry_backoff_max`` per call."""

    timeout: float | None = None
    """Seconds an attempt may run before it is cancelled with status TIMEOUT."""
    retries: int = 0
    """How many times a failed attempt is tried again (0: never)."""
    retry_backoff: float = 1.0
    """Delay before the first retry; it doubles for each later one."""
    retry_backoff_max: float = 300.0
    """Upper bound of the retry delay."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Only failures that are instances of these types are retried."""

    def __attrs_post_init__(self) -> None:
        _check_seconds("timeout", self.timeout)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {self.retries!r}")
        _check_seconds("retry_backoff", self.retry_backoff, allow_zero=True)
        _check_seconds("retry_backoff_max", self.retry_backoff_max, allow_zero=True)
        _retry_on(self.retry_on)

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

    def with_labels(self, labels: dict[str, Any]) -> TaskOptions:
        """These options with any overriding labels applied (invalid labels raise)."""
        if not labels or not (_KNOWN.intersection(labels)):
            return self
        changes = {k: labels[k] for k in _KNOWN if k in labels and k != "retry_on"}
        return attrs.evolve(self, **changes) if changes else self

    def backoff(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1`` after attempt ``attempt`` failed."""
        return float(min(self.retry_backoff * (2 ** (attempt - 1)), self.retry_backoff_max))


def check_unique(unique: Any, ttl: Any) -> None:
    """Validate the ``unique`` option (``True``, ``False``/``None`` or a key string) and
    ``unique_ttl`` (seconds > 0)."""
    if unique is not None and not isinstance(unique, bool | str):
        raise TypeError(f"unique must be True, False or a key string, not {unique!r}")
    if isinstance(unique, str) and not unique:
        raise ValueError("a unique key must be a non-empty string")
    if ttl is not None:
        _check_seconds("unique_ttl", ttl)
        if not math.isfinite(ttl):
            raise ValueError(f"unique_ttl must be finite, not {ttl!r}")


def resolve_eta(values: dict[str, Any]) -> float | None:
    """The Unix time at which to run, from ``delay`` (seconds) or ``eta`` (a Unix time or
    an aware datetime). Raises ``ValueError``/``TypeError`` on bad values."""
    delay, eta = values.get("delay"), values.get("eta")
    if delay is not None and eta is not None:
        raise ValueError("give delay or eta, not both")
    if delay is not None:
        _check_seconds("delay", delay, allow_zero=True)
        return time.time() + float(delay) if delay > 0 else None
    if eta is None:
        return None
    if isinstance(eta, _dt.datetime):
        if eta.tzinfo is None:
            raise ValueError("eta must be a timezone-aware datetime (naive times are ambiguous)")
        return eta.timestamp()
    if isinstance(eta, bool) or not isinstance(eta, int | float) or math.isnan(eta):
        raise TypeError(f"eta must be a Unix time or an aware datetime, not {eta!r}")
    return float(eta)
