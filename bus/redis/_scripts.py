"""The Lua scripts of the Redis broker (each atomic on the server).

Every script that changes an entry a worker read first checks, with ``XPENDING``,
that this consumer still owns it: a retried script (after a lost reply) or a late
one (another worker reclaimed the entry meanwhile) then does nothing twice.
"""

from __future__ import annotations

from bus._limits import ACQUIRE_SLOT_LUA, REFRESH_SLOT_LUA, RELEASE_SLOT_LUA, TOKEN_BUCKET_LUA
from bus.redis._client import Command, Script

__all__ = [
    "ACQUIRE_SLOT",
    "CLAIM_SEND",
    "DEAD",
    "HANDBACK",
    "PROMOTE",
    "REFRESH_SLOT",
    "RELEASE",
    "RELEASE_SLOT",
    "REQUEUE",
    "SEND_LUA",
    "TAKE_TOKEN",
    "TOUCH",
    "dead_command",
]

#: Lua shared by the scripts that send a message: ``send(stream, delayed, due, data,
#: sig, maxlen)`` XADDs it to ``stream`` (``due`` 0) or ZADDs it to ``delayed`` at
#: ``due`` (ms), as the broker's own sends do (fields ``d`` and, when signed, ``s``).
SEND_LUA = """
local function send(stream, delayed, due, data, sig, maxlen)
  if due > 0 then
    redis.call('ZADD', delayed, due, sig .. '\\n' .. data)
    return
  end
  local args = {stream}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  args[#args + 1] = 'd'; args[#args + 1] = data
  if sig ~= '' then args[#args + 1] = 's'; args[#args + 1] = sig end
  redis.call('XADD', unpack(args))
end
"""

#: Moves due members of delayed sets into their streams: KEYS are n delayed sets, then
#: the n streams they feed (a queue's levels: delayed:pN feeds stream:pN).
#: ARGV: now (ms), batch size (per set), maxlen (0: none).
#: Returns {moved, the earliest score left in any set or false}.
PROMOTE = Script("""
local n = #KEYS / 2
local batch = tonumber(ARGV[2])
local maxlen = tonumber(ARGV[3])
local moved = 0
local nxt = false
for i = 1, n do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, batch)
  for _, member in ipairs(due) do
    local args = {KEYS[n + i]}
    if maxlen > 0 then
      args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
    end
    args[#args + 1] = '*'
    local nl = string.find(member, '\\n', 1, true)
    if nl then
      local sig = string.sub(member, 1, nl - 1)
      args[#args + 1] = 'd'; args[#args + 1] = string.sub(member, nl + 1)
      if sig ~= '' then args[#args + 1] = 's'; args[#args + 1] = sig end
    else
      args[#args + 1] = 'd'; args[#args + 1] = member
    end
    redis.call('XADD', unpack(args))
    redis.call('ZREM', KEYS[i], member)
  end
  if #due > moved then moved = #due end
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (not nxt or tonumber(first[2]) < tonumber(nxt)) then nxt = first[2] end
end
return {moved, nxt}
""")

#: Resets the idle time of the entries this consumer still owns (a heartbeat).
#: KEYS: stream. ARGV: group, consumer, ids... Returns the ids it touched.
TOUCH = Script("""
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then args[#args + 1] = ARGV[i] end
end
if #args == 4 then return {} end
args[#args + 1] = 'JUSTID'
return redis.call('XCLAIM', unpack(args))
""")

#: Hands entries this consumer owns back to the queue at once, as fresh copies at
#: the end of the stream: acknowledged and deleted here, so nothing stays pending.
#: The copy carries how often the entry was delivered (field ``n``), so that
#: ``max_deliveries`` still counts them. KEYS: stream. ARGV: group, consumer, maxlen
#: (0: none), then pairs (id, started: 1 if a worker began running it, else 0).
#: Returns how many were handed back.
HANDBACK = Script("""
local n = 0
local maxlen = tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if e[1] then
      local fields = e[1][2]
      local count = p[1][4] - 1 + tonumber(ARGV[i + 1])
      local args = {KEYS[1]}
      if maxlen > 0 then
        args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
      end
      args[#args + 1] = '*'
      for j = 1, #fields, 2 do
        if fields[j] == 'n' then
          count = count + tonumber(fields[j + 1])
        else
          args[#args + 1] = fields[j]; args[#args + 1] = fields[j + 1]
        end
      end
      args[#args + 1] = 'n'; args[#args + 1] = tostring(count)
      redis.call('XADD', unpack(args))
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    n = n + 1
  end
end
return n
""")

#: Replaces an entry this consumer owns by the next attempt of its message (a retry):
#: XADD to the target stream (due = 0) or ZADD to the delayed set, then XACK + XDEL
#: of the old entry. KEYS: stream (of the entry), delayed, target stream (default: the
#: entry's). ARGV: group, consumer, id, due (ms, 0: now), data, signature, maxlen
#: (0: none). Returns 1, or 0 if not owned (any more).
REQUEUE = Script(
    SEND_LUA
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (p[1] and p[1][2] == ARGV[2]) then return 0 end
send(KEYS[3] or KEYS[1], KEYS[2], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

#: Moves an entry this consumer owns to the dead-letter stream: XADD there (fields
#: from ARGV), then XACK + XDEL. KEYS: stream, dead stream. ARGV: group, consumer,
#: id, dead maxlen (0: none), then field/value pairs. Returns 1, or 0 if not owned.
DEAD = Script("""
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (p[1] and p[1][2] == ARGV[2]) then return 0 end
local args = {KEYS[2]}
local maxlen = tonumber(ARGV[4])
if maxlen > 0 then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
end
args[#args + 1] = '*'
for i = 5, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('XADD', unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
""")


def dead_command(
    stream: bytes,
    dead: bytes,
    group: bytes,
    consumer: bytes,
    eid: bytes,
    maxlen: int,
    *,
    reason: str,
    data: bytes,
    queue: str,
    deliveries: int,
    when: str,
) -> Command:
    """The :data:`DEAD` call moving entry ``eid`` of ``stream`` to the ``dead`` stream,
    with the fields a dead letter carries (``bus dead`` reads them)."""
    return DEAD.command(
        keys=[stream, dead],
        args=[group, consumer, eid, maxlen, b"reason", reason, b"data", data, b"id", eid,
              b"queue", queue, b"deliveries", deliveries, b"time", when],
    )  # fmt: skip


#: Sends a message only if it can claim a key first (a unique job, a schedule's tick):
#: SET key id NX PX ttl, then XADD to the stream (due = 0) or ZADD to the delayed set.
#: KEYS: claim key, stream, delayed. ARGV: task id, ttl (ms), due (ms, 0: now), data,
#: signature, maxlen (0: none). Returns the id holding the key: ARGV[1] when it was
#: free (and the message was sent), else the holder's (and nothing was sent).
CLAIM_SEND = Script(
    SEND_LUA
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('GET', KEYS[1])
end
send(KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]))
return ARGV[1]
"""
)

#: Frees a unique key, only if the finishing task holds it. KEYS: the key. ARGV: the
#: task id. Returns 1 if freed, else 0.
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")
#: The limits' scripts (see bus._limits): a token of a rate limit's bucket, and the
#: leases of a concurrency limit's slots.
TAKE_TOKEN = Script(TOKEN_BUCKET_LUA)
ACQUIRE_SLOT = Script(ACQUIRE_SLOT_LUA)
REFRESH_SLOT = Script(REFRESH_SLOT_LUA)
RELEASE_SLOT = Script(RELEASE_SLOT_LUA)
