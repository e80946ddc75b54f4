"""Task options: what the decorator takes and what labels may override."""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

import attrs

__all__ = ["TaskOptions"]

_KNOWN = frozenset({"timeout", "retries", "retry_backoff", "retry_backoff_max", "retry_on"})
_SEND_ONLY = frozenset({"delay", "eta", "unique", "unique_ttl"})
#: How long a unique key holds at most when its task never finishes (seconds).
DEFAULT_UNIQUE_TTL = 3600.0


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
        """Split decorator keywords into run options and send defaults (delay / eta)."""
        unknown = set(options) - _KNOWN - _SEND_ONLY
        if unknown:
            raise TypeError(
                f"unknown task option(s) {sorted(unknown)}; known: {sorted(_KNOWN | _SEND_ONLY)}"
            )
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
