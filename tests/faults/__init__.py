"""The fault-injection suite (issue 17, item 9).

- ``proxy.py``: :class:`FaultProxy`, a Trio TCP proxy between the bus and Redis that
  refuses, drops, blackholes, delays and resets mid-reply; ``test_proxy.py`` tests it.
- ``control.py``: :class:`RedisControl`, a redis-server of the test's own (append-only)
  to stop, start, SIGSTOP and SIGCONT.
- ``matrix.py``: every public call of the Redis bus in a loop through one outage, with
  the contract's checks; ``test_outages.py`` runs it through each kind of fault.
- ``test_supervision.py``: in memory, an actor whose handler raises is restarted.

The long runs are marked ``slow``: ``pytest tests/faults -m "not slow"`` takes about
half a minute, the whole folder about three.
"""
