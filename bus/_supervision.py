"""How the bus's own actors are supervised (docs/concepts.md, "When Redis goes away").

Every actor of the bus is spawned with RESTART. Redis going away is not a failure (a
handler answers its asker with the error), so what restarts an actor is a bug; a bug
that keeps coming back is escalated after :data:`BUG_RESTARTS` restarts within
:data:`BUG_WINDOW` seconds, and the process ends with an error, for its own supervisor
(systemd, Kubernetes, ``bus worker --processes``) to start it again: an actor that
cannot go on never leaves a process alive and idle.
"""

from __future__ import annotations

import actors

__all__ = ["BUG_BACKOFF", "BUG_RESTARTS", "BUG_WINDOW"]

#: Restarts after bugs within :data:`BUG_WINDOW` seconds before the failure escalates.
BUG_RESTARTS = 10
#: The window of :data:`BUG_RESTARTS`, in seconds.
BUG_WINDOW = 60.0
#: The wait before such a restart: 10 ms doubling to 1 s.
BUG_BACKOFF = actors.Backoff(initial=0.01, factor=2.0, cap=1.0, jitter=0.5)
