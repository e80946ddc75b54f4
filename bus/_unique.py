"""Unique jobs: at most one task per key is queued or running at a time.

A send with ``kicker().with_unique(key=None, ttl=...)`` (or a task with
``unique=True``) first claims its unique key for its task id. If another task holds
the key, the send does not happen and the holder's id is returned instead, so the
caller gets a handle on the task that is already there. The key is released when the
holder finishes (``release_task``), or when its ``ttl`` runs out: the ttl is the
bound on how long a crashed holder can block the key.

The key (:func:`unique_key`) is the task name plus either a hash of the arguments
(the default: the same task with the same arguments is "the same job") or the key
the caller chose.

:class:`UniqueTable` is the in-memory table (sans-I/O: the caller passes the time);
:data:`CLAIM_LUA` and :data:`RELEASE_LUA` are the same two operations for Redis, where
the key holds the holder's task id with a ``PX`` expiry.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import attrs

from bus._ids import TaskID

__all__ = [
    "CLAIM_LUA",
    "RELEASE_LUA",
    "UniqueTable",
    "canonical_args",
    "ttl_ms",
    "unique_key",
]


def canonical_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The arguments as canonical JSON: ``[args, kwargs]``, keys sorted, no spaces,
    UTF-8. Tuples and lists encode alike, so ``f((1, 2))`` and ``f([1, 2])`` are the same
    job. Raises :class:`TypeError`/:class:`ValueError` for values JSON cannot hold."""
    return json.dumps(
        [list(args), kwargs],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def unique_key(task_name: str, encoded_args: bytes, key: str | None) -> str:
    """The unique key of one send.

    - ``key=None``: ``{task_name}:args:{sha256 of encoded_args, hex}``, where
      ``encoded_args`` is :func:`canonical_args` of the call;
    - a key of the caller's: ``{task_name}:key:{key}``, the key as is.

    The two forms never collide for one task name.
    """
    if not isinstance(task_name, str) or not task_name:
        raise ValueError(f"a task name is a non-empty string, not {task_name!r}")
    if key is None:
        return f"{task_name}:args:{hashlib.sha256(encoded_args).hexdigest()}"
    if not isinstance(key, str) or not key:
        raise ValueError(f"a unique key is a non-empty string, not {key!r}")
    return f"{task_name}:key:{key}"


def _check_ttl(ttl: float) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, not {ttl!r}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive, finite number of seconds, not {ttl!r}")


def ttl_ms(ttl: float) -> int:
    """A ttl in seconds as the whole milliseconds Redis takes (``PX``), rounded up."""
    _check_ttl(ttl)
    return max(1, math.ceil(ttl * 1000))


@attrs.frozen
class _Hold:
    task_id: TaskID
    """The holder."""
    expires: float
    """The time at which the key is free again."""


@attrs.define
class UniqueTable:
    """Unique keys held by task ids, each until a deadline; the caller passes the time.

    Expired entries are dropped when their key is next claimed or looked at, and by
    :meth:`prune`.
    """

    _holds: dict[str, _Hold] = attrs.field(factory=dict, init=False)
    _keys_of: dict[TaskID, set[str]] = attrs.field(factory=dict, init=False)

    def claim(self, key: str, task_id: TaskID, now: float, ttl: float) -> TaskID:
        """Claim ``key`` for ``task_id`` until ``now + ttl``.

        Returns ``task_id`` when the key was free (or expired) and is now held by it;
        else the id of the task that holds it, and nothing changes. Claiming a key
        again for its holder returns the holder and keeps its deadline.
        """
        _check_ttl(ttl)
        hold = self.holder(key, now)
        if hold is not None:
            return hold
        self._holds[key] = _Hold(task_id, now + ttl)
        self._keys_of.setdefault(task_id, set()).add(key)
        return task_id

    def holder(self, key: str, now: float) -> TaskID | None:
        """The task id holding ``key`` at ``now``, or ``None``."""
        hold = self._holds.get(key)
        if hold is None:
            return None
        if hold.expires <= now:
            self._drop(key, hold.task_id)
            return None
        return hold.task_id

    def release(self, key: str, task_id: TaskID) -> bool:
        """Free ``key`` if ``task_id`` holds it; a release by another id does nothing.
        True if the key was freed."""
        hold = self._holds.get(key)
        if hold is None or hold.task_id != task_id:
            return False
        self._drop(key, task_id)
        return True

    def release_task(self, task_id: TaskID) -> int:
        """Free every key that ``task_id`` holds (when it finishes); how many."""
        keys = self._keys_of.pop(task_id, set())
        for key in keys:
            del self._holds[key]
        return len(keys)

    def prune(self, now: float) -> int:
        """Drop the entries expired at ``now``; how many (a scan of the table)."""
        expired = [(k, h.task_id) for k, h in self._holds.items() if h.expires <= now]
        for key, task_id in expired:
            self._drop(key, task_id)
        return len(expired)

    def __len__(self) -> int:
        return len(self._holds)

    def _drop(self, key: str, task_id: TaskID) -> None:
        del self._holds[key]
        keys = self._keys_of.get(task_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of[task_id]


CLAIM_LUA = """
-- Claim a unique key. KEYS[1]: the key; ARGV[1]: the claiming task id;
-- ARGV[2]: ttl in milliseconds. Returns the holder's task id: ARGV[1] if the key was
-- free (it now holds ARGV[1] for ARGV[2] ms), else the id already there (no change).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
"""
"""Redis script: claim a unique key (``SET NX PX``, or the holder's id)."""

RELEASE_LUA = """
-- Release a unique key. KEYS[1]: the key; ARGV[1]: the releasing task id.
-- Deletes the key only if ARGV[1] holds it. Returns 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""Redis script: release a unique key, only by its holder."""
