"""Supervision policies and the restart limiter."""

from __future__ import annotations

import enum
from collections import deque

__all__ = ["ESCALATE", "RESTART", "STOP", "Policy"]


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


class RestartLimiter:
    """Allows at most ``max_restarts`` restarts within ``window`` seconds."""

    __slots__ = ("_max", "_times", "_window")

    def __init__(self, max_restarts: int, window: float) -> None:
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if window <= 0:
            raise ValueError("restart_window must be > 0")
        self._max = max_restarts
        self._window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the limit allows it; say whether it did."""
        times = self._times
        while times and times[0] <= now - self._window:
            times.popleft()
        if len(times) >= self._max:
            return False
        times.append(now)
        return True
