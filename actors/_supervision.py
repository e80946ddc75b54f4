"""Supervision policies, the restart limiter and the restart backoff."""

from __future__ import annotations

import enum
import math
import random
from collections import deque

import attrs

__all__ = ["ESCALATE", "RESTART", "STOP", "Backoff", "Policy"]


class Policy(enum.Enum):
    """What happens when an actor fails (see ``spawn(..., on_failure=...)``)."""

    #: The actor stops; queued asks get ``ActorStopped``.
    STOP = "stop"
    #: A fresh instance is built from the factory; the mailbox and ref survive.
    RESTART = "restart"
    #: The failure becomes a failure of the parent (or of the system).
    ESCALATE = "escalate"


STOP = Policy.STOP
RESTART = Policy.RESTART
ESCALATE = Policy.ESCALATE


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"Backoff.{attribute.name} must be a number >= 0, not {value!r}")


@attrs.frozen
class Backoff:
    """How long a restarting actor waits before its next instance starts.

    The n-th restart within the restart window waits
    ``min(cap, initial * factor ** (n - 1))`` seconds, scaled by a random factor
    in ``[1 - jitter, 1]`` so that many actors restarting together spread out.
    Pass one to ``spawn(..., on_failure=RESTART, backoff=...)``; without one an
    actor restarts at once. While it waits, messages queue in its mailbox and a
    stop request ends the wait (the actor then stops without restarting).
    """

    initial: float = attrs.field(default=0.05, validator=_positive)
    """Delay before the first restart, in seconds."""
    factor: float = attrs.field(default=2.0, validator=_positive)
    """Each further restart within the window multiplies the delay by this."""
    cap: float = attrs.field(default=2.0, validator=_positive)
    """Upper bound of the delay, in seconds."""
    jitter: float = attrs.field(default=0.5)
    """Share of the delay that is random: 0 for none, 1 for "anywhere down to 0"."""

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff.jitter must be between 0 and 1, not {self.jitter!r}")
        if self.factor < 1:
            raise ValueError(f"Backoff.factor must be >= 1, not {self.factor!r}")

    def delay(self, attempt: int, rand: float | None = None) -> float:
        """Seconds to wait before restart number ``attempt`` (1 = the first).

        ``rand`` (in ``[0, 1)``) replaces the random draw, for tests.
        """
        n = max(1, attempt)
        try:
            base = self.initial * self.factor ** (n - 1)
        except OverflowError:
            base = math.inf
        base = min(self.cap, base)
        r = random.random() if rand is None else rand
        return base * (1.0 - self.jitter * r)


class RestartLimiter:
    """Allows at most ``max_restarts`` restarts within ``window`` seconds
    (``None``: no limit)."""

    __slots__ = ("_max", "_times", "_window")

    def __init__(self, max_restarts: int | None, window: float) -> None:
        if max_restarts is not None and (
            isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0
        ):
            raise ValueError(
                f"max_restarts must be a whole number >= 0 or None, not {max_restarts!r}"
            )
        if not window > 0:
            raise ValueError("restart_window must be > 0")
        self._max = max_restarts
        self._window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the limit allows it; say whether it did."""
        times = self._times
        while times and times[0] <= now - self._window:
            times.popleft()
        if self._max is not None and len(times) >= self._max:
            return False
        times.append(now)
        return True

    @property
    def recent(self) -> int:
        """Restarts recorded within the window (as of the last ``allow``)."""
        return len(self._times)
