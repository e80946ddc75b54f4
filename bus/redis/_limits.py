"""The Redis side of rate and concurrency limits: the keys, and the Lua scripts that
take a token from a :class:`~bus._limits.TokenBucket` and a slot of a
:class:`~bus._limits.RunningTable` atomically, with the same rules as the in-memory
ones (bus/_limits.py holds the rules; this module only their Redis form)."""

from __future__ import annotations

from bus._limits import Limit

__all__ = [
    "ACQUIRE_SLOT_LUA",
    "REFRESH_SLOT_LUA",
    "RELEASE_SLOT_LUA",
    "TOKEN_BUCKET_LUA",
    "bucket_args",
    "limit_redis_key",
    "running_redis_key",
]


def limit_redis_key(prefix: str, key: str) -> str:
    """The Redis hash of a limit's token bucket: ``{prefix}:rate:{key}``."""
    return f"{prefix}:rate:{key}"


def running_redis_key(prefix: str, key: str) -> str:
    """The Redis sorted set of a concurrency limit's leases: ``{prefix}:running:{key}``."""
    return f"{prefix}:running:{key}"


def bucket_args(lim: Limit, now_ms: int | None = None) -> list[str]:
    """ARGV for :data:`TOKEN_BUCKET_LUA`: the server's clock unless ``now_ms`` is given."""
    return [
        "" if now_ms is None else str(now_ms),
        str(lim.rate.count),
        repr(lim.rate.per * 1000),
        str(lim.burst),
    ]


# Sets `now` (ms): ARGV[1] if given, else the server's clock.
_NOW = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
"""

TOKEN_BUCKET_LUA = (
    """
-- Take a token from a token bucket. KEYS[1]: a hash {tokens, ts}.
-- ARGV[1]: now in ms, or '' for the server's clock; ARGV[2]: count; ARGV[3]: per in
-- ms (count tokens are added every per ms); ARGV[4]: burst (the capacity).
-- Returns 0 if a token was taken, else the ms until one is there (nothing taken).
-- The hash expires when the bucket would be full again: a missing bucket is full."""
    + _NOW
    + """
local count = tonumber(ARGV[2])
local per = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * count / per)
  ts = now
end
local wait = 0
if tokens >= 1 - 1e-9 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) * per / count))
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) * per / count)))
return wait
"""
)
"""Redis script: the token bucket of :class:`TokenBucket`, atomic (ARGV from
:func:`bucket_args`)."""

ACQUIRE_SLOT_LUA = (
    """
-- Take a concurrency slot. KEYS[1]: a sorted set of tokens scored by lease expiry (ms).
-- ARGV[1]: now in ms, or '' for the server's clock; ARGV[2]: the token;
-- ARGV[3]: max_running; ARGV[4]: lease ttl in ms.
-- Returns 1 if the token holds a slot (taken, or its lease extended), else 0."""
    + _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2])
    or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now))
  return 1
end
return 0
"""
)
"""Redis script: :meth:`RunningTable.acquire` on a sorted set."""

REFRESH_SLOT_LUA = (
    """
-- Extend a lease. KEYS[1]: the sorted set; ARGV[1]: now in ms, or '' for the server's
-- clock; ARGV[2]: the token; ARGV[3]: lease ttl in ms.
-- Returns 1 if extended, 0 if the token holds no live lease. Expired leases are removed."""
    + _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now))
return 1
"""
)
"""Redis script: :meth:`RunningTable.refresh` on a sorted set."""

RELEASE_SLOT_LUA = """
-- Give back a slot. KEYS[1]: the sorted set; ARGV[1]: the token. Returns 1 if it held one.
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
"""Redis script: :meth:`RunningTable.release` (a plain ``ZREM``, kept as a script so the
three operations are used alike)."""
