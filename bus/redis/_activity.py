"""Where ``bus.activity.ActivityMiddleware`` publishes on Redis, and how it is read.

With ``prefix="bus"`` and ``queue="emails"`` (the queue's hash tag, like every key):

- ``{bus:emails}:activity:{worker}``: a string, the worker's JSON record, expiring;
- ``{bus:emails}:activity``: a sorted set, worker name -> Unix time of its last record
  (an index, so that reading needs no SCAN; stale names are trimmed when written);
- ``{bus:emails}:failures``: a stream capped at about ``keep_failures`` entries, field
  ``f`` = one failure as JSON.

Publishing is one pipeline; reading is two round trips.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from bus._codec import too_deep
from bus.redis._client import Arg

if TYPE_CHECKING:
    from bus.activity import Activity, ActivityMiddleware
    from bus.redis._broker import RedisBroker

__all__ = ["RedisActivityStore"]


class RedisActivityStore:
    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        base = broker.keys.base
        self.index = f"{base}:activity".encode()
        self.failures = f"{base}:failures".encode()
        self._record_prefix = f"{base}:activity:"

    def record_key(self, worker: str) -> bytes:
        return (self._record_prefix + worker).encode()

    async def publish(
        self, record: dict[str, Any], failures: list[dict[str, Any]], mw: ActivityMiddleware
    ) -> None:
        now = time.time()
        worker = record["worker"]
        commands: list[tuple[Arg, ...]] = [
            ("SET", self.record_key(worker), json.dumps(record), "PX", int(mw.ttl * 1000)),
            ("ZADD", self.index, now, worker),
            ("ZREMRANGEBYSCORE", self.index, "-inf", now - 10 * mw.ttl),
        ]
        for f in failures:
            commands.append(
                ("XADD", self.failures, "MAXLEN", "~", mw.keep_failures, "*", "f", json.dumps(f))
            )
        await self.broker.client.pipeline(commands)

    async def remove(self, worker: str) -> None:
        await self.broker.client.pipeline(
            [("DEL", self.record_key(worker)), ("ZREM", self.index, worker)]
        )

    async def read(self, failures: int) -> Activity:
        from bus.activity import Activity

        client = self.broker.client
        names, entries = await client.pipeline(
            [
                ("ZRANGE", self.index, 0, -1),
                ("XREVRANGE", self.failures, "+", "-", "COUNT", max(1, failures)),
            ]
        )
        workers: list[dict[str, Any]] = []
        names = [n for n in names or () if isinstance(n, bytes)]
        if names:
            raws = await client.execute("MGET", *(self._record_prefix.encode() + n for n in names))
            for raw in raws or ():
                record = _loads(raw)
                if isinstance(record, dict):
                    workers.append(record)
        out: list[dict[str, Any]] = []
        for entry in entries or ():
            fields = entry[1] if isinstance(entry, list) and len(entry) > 1 else None
            if isinstance(fields, list):
                for i in range(0, len(fields) - 1, 2):
                    failure = _loads(fields[i + 1]) if fields[i] == b"f" else None
                    if isinstance(failure, dict):
                        out.append(failure)
        return Activity(workers, out[:failures])


def _loads(raw: Any) -> Any:
    """JSON read back from Redis, or ``None`` when it is not JSON or is nested deeper
    than a message may be (anyone who can write to Redis could have put it there: a
    reader of the dashboard must not fail on it)."""
    if not isinstance(raw, bytes):
        return None
    try:
        text = raw.decode()
        return None if too_deep(text) else json.loads(text)
    except (ValueError, RecursionError):
        return None
