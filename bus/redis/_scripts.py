"""The Lua scripts of the Redis broker (each atomic on the server).

Every script that changes an entry a worker read first checks, with ``XPENDING``,
that this consumer still owns it: a retried script (after a lost reply) or a late
one (another worker reclaimed the entry meanwhile) then does nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from bus.redis._client import Arg, Command, Script
from bus.redis._limits import (
    ACQUIRE_SLOT_LUA,
    REFRESH_SLOT_LUA,
    RELEASE_SLOT_LUA,
    TOKEN_BUCKET_LUA,
)
from bus.redis._settings import DEFAULT_DEAD_LETTER_BYTES

__all__ = [
    "ACQUIRE_SLOT",
    "CLAIM_SEND",
    "DEAD",
    "HANDBACK",
    "Handback",
    "PROMOTE",
    "REFRESH_SLOT",
    "RELEASE",
    "RELEASE_SLOT",
    "REQUEUE",
    "SWEEP_LARGE",
    "REQUEUE_DEAD",
    "SEND_LUA",
    "TAKE_TOKEN",
    "TOUCH",
    "dead_command",
    "handback_command",
]

#: Lua shared by the scripts that send a message: ``send(stream, delayed, due, data,
#: sig, maxlen, field)`` XADDs it to ``stream`` (``due`` 0) or ZADDs it to ``delayed``
#: at ``due`` (ms), as the broker's own sends do (fields ``d``, or ``field`` when given
#: (``Keys.data_field``), and when signed ``s``).
SEND_LUA = """
local function send(stream, delayed, due, data, sig, maxlen, field)
  if not field or field == '' then field = 'd' end
  if due > 0 then
    redis.call('ZADD', delayed, due, sig .. '\\n' .. data)
    return
  end
  local args = {stream}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  args[#args + 1] = field; args[#args + 1] = data
  if sig ~= '' then args[#args + 1] = 's'; args[#args + 1] = sig end
  redis.call('XADD', unpack(args))
end
"""

#: Moves due members of delayed sets into their streams: KEYS are n delayed sets, then
#: the n streams they feed (a queue's levels: delayed:pN feeds stream:pN).
#: ARGV: now (ms), batch size (per set), maxlen (0: none), optionally the message
#: field (``Keys.data_field``, default ``d``).
#: Returns {moved, the earliest score left in any set or false}.
PROMOTE = Script("""
local n = #KEYS / 2
local batch = tonumber(ARGV[2])
local maxlen = tonumber(ARGV[3])
local field = ARGV[4] or 'd'
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
      args[#args + 1] = field; args[#args + 1] = string.sub(member, nl + 1)
      if sig ~= '' then args[#args + 1] = 's'; args[#args + 1] = sig end
    else
      args[#args + 1] = field; args[#args + 1] = member
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
#: KEYS: stream. ARGV: group, consumer, ids... Returns {the ids it touched, the ids
#: pending for another consumer}; an id in neither is no longer pending (acknowledged).
TOUCH = Script("""
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
local elsewhere = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      args[#args + 1] = ARGV[i]
    else
      elsewhere[#elsewhere + 1] = ARGV[i]
    end
  end
end
local touched = {}
if #args > 4 then
  args[#args + 1] = 'JUSTID'
  touched = redis.call('XCLAIM', unpack(args))
end
return {touched, elsewhere}
""")

#: Hands entries this consumer owns back to the queue at once, as fresh copies at
#: the end of the stream: acknowledged and deleted here, so nothing stays pending.
#: The copy carries how often the entry was delivered (field ``n``, and with a secret
#: its signature ``c``), so that ``max_deliveries`` still counts them; the claim of the
#: task's attempt (``Keys.ran``) moves to the copy, so it is not taken for a replay.
#: A claim not made yet is made for the copy (kept ``claim_ttl`` ms): a claim of the
#: entry still on its way (made on another connection, the reader's) then finds it
#: taken, whichever lands first. KEYS: stream, then claim keys. ARGV: group, consumer,
#: maxlen (0: none), claim_ttl (ms), then per entry five values: id, started (1 if a
#: worker began running it, else 0), its count ('' : counted here, unsigned), the
#: count's signature (''), the index in KEYS of its claim (0: none). Returns how many
#: were handed back.
HANDBACK = Script("""
local n = 0
local maxlen = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
for i = 5, #ARGV, 5 do
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
          count = count + (tonumber(fields[j + 1]) or 0)
        elseif fields[j] ~= 'c' then
          args[#args + 1] = fields[j]; args[#args + 1] = fields[j + 1]
        end
      end
      if ARGV[i + 2] ~= '' then count = tonumber(ARGV[i + 2]) end
      args[#args + 1] = 'n'; args[#args + 1] = tostring(count)
      if ARGV[i + 3] ~= '' then args[#args + 1] = 'c'; args[#args + 1] = ARGV[i + 3] end
      local copy = redis.call('XADD', unpack(args))
      local k = tonumber(ARGV[i + 4])
      if k > 0 then
        local claim = redis.call('GET', KEYS[k])
        if claim == id then
          redis.call('SET', KEYS[k], copy, 'KEEPTTL')
        elseif not claim then
          redis.call('SET', KEYS[k], copy, 'PX', ttl)
        end
      end
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    n = n + 1
  end
end
return n
""")


@attrs.frozen
class Handback:
    """One entry to hand back (:data:`HANDBACK`): its id, whether a worker began
    running it, the delivery count to record with its signature (``None``: counted on
    the server, unsigned), and the claim of its attempt (``None``: none known)."""

    eid: bytes
    started: bool
    count: int | None = None
    count_sig: bytes = b""
    claim: bytes | None = None


def handback_command(
    stream: bytes,
    group: bytes,
    consumer: bytes,
    maxlen: int,
    entries: Iterable[Handback],
    *,
    claim_ttl_ms: int = 86_400_000,
) -> Command:
    """The :data:`HANDBACK` call for ``entries`` of ``stream`` (a claim it makes is
    kept ``claim_ttl_ms``: the result TTL)."""
    keys: list[Arg] = [stream]
    args: list[Arg] = [group, consumer, maxlen, max(1, claim_ttl_ms)]
    for e in entries:
        k = 0
        if e.claim is not None:
            keys.append(e.claim)
            k = len(keys)
        count = b"" if e.count is None else b"%d" % e.count
        args += [e.eid, 1 if e.started else 0, count, e.count_sig, k]
    return HANDBACK.command(keys=keys, args=args)


#: Replaces an entry this consumer owns by the next attempt of its message (a retry):
#: XADD to the target stream (due = 0) or ZADD to the delayed set, then XACK + XDEL
#: of the old entry. KEYS: stream (of the entry), delayed, target stream (default: the
#: entry's). ARGV: group, consumer, id, due (ms, 0: now), data, signature, maxlen
#: (0: none), optionally the message field (``Keys.data_field``). Returns 1, or 0 if
#: not owned (any more).
REQUEUE = Script(
    SEND_LUA
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (p[1] and p[1][2] == ARGV[2]) then return 0 end
send(KEYS[3] or KEYS[1], KEYS[2], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7]),
     ARGV[8])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

#: Lua shared by the scripts that add dead letters: ``trim_dead(dead, bytes, added,
#: maxlen, cap)`` counts the bytes of messages the dead stream holds (the key
#: ``bytes``, :attr:`~bus.redis._logic.Keys.dead_bytes`) and drops the oldest letters
#: while there are more than ``maxlen`` (0: no cap) or more than ``cap`` bytes (0: no
#: cap); the letter just added (``added``) stays.
TRIM_DEAD_LUA = """
local function letter_size(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'data' then return #fields[j + 1] end
  end
  return 0
end
local function trim_dead(dead, bytes, added, maxlen, cap)
  local total = tonumber(redis.call('GET', bytes) or '0') or 0
  if redis.call('XLEN', dead) <= 1 then total = 0 end
  local e = redis.call('XRANGE', dead, added, added)
  if e[1] then total = total + letter_size(e[1][2]) end
  while (maxlen > 0 and redis.call('XLEN', dead) > maxlen) or (cap > 0 and total > cap) do
    local first = redis.call('XRANGE', dead, '-', '+', 'COUNT', 1)
    if not first[1] or first[1][1] == added then break end
    total = total - letter_size(first[1][2])
    redis.call('XDEL', dead, first[1][1])
  end
  if total < 0 then total = 0 end
  redis.call('SET', bytes, total)
end
"""

#: Moves an entry this consumer owns to the dead-letter stream: XADD there (fields
#: from ARGV, then ``stream``, the stream it came from, and ``sig``, its original
#: signature, which a requeue checks), trimmed by count and bytes, then XACK + XDEL.
#: The claim of the task's attempt, if this entry holds it, then names the letter
#: (``dead:<letter id>``): a requeue lets only that letter run the attempt again.
#: KEYS: stream, dead stream, the dead stream's byte count, optionally the claim.
#: ARGV: group, consumer, id, dead maxlen (0: none), dead byte cap (0: none), then
#: field/value pairs. Returns 1, or 0 if not owned.
DEAD = Script(
    TRIM_DEAD_LUA
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not (p[1] and p[1][2] == ARGV[2]) then return 0 end
local args = {KEYS[2], '*'}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = 'stream'; args[#args + 1] = KEYS[1]
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if e[1] then
  local fields = e[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == 's' then args[#args + 1] = 'sig'; args[#args + 1] = fields[j + 1] end
  end
end
local added = redis.call('XADD', unpack(args))
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[3] then
  redis.call('SET', KEYS[4], 'dead:' .. added, 'KEEPTTL')
end
trim_dead(KEYS[2], KEYS[3], added, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

#: Requeues one dead letter: deletes it (nothing if another requeue did first), XADDs
#: its message to its stream (signed again once its original signature was checked),
#: and lets that entry run its attempt (the claim, ``Keys.ran``, names it) unless the
#: attempt is claimed by anything but this letter (it ran, or runs: the letter is a
#: copy). KEYS: dead stream, its byte count, the stream, the claim. ARGV: letter id,
#: data, signature, maxlen (0: none), claim ttl (ms), the letter's size, optionally the
#: message field (``Keys.data_field``). Returns 1, 0 if the letter was gone, -1 if its
#: attempt is claimed (the letter stays).
REQUEUE_DEAD = Script(
    SEND_LUA
    + """
local held = redis.call('GET', KEYS[4])
if held and held ~= 'dead:' .. ARGV[1] then return -1 end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
local total = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) - tonumber(ARGV[6])
if total < 0 then total = 0 end
redis.call('SET', KEYS[2], total)
local args = {KEYS[3]}
local maxlen = tonumber(ARGV[4])
if maxlen > 0 then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
end
args[#args + 1] = '*'
args[#args + 1] = ARGV[7] or 'd'; args[#args + 1] = ARGV[2]
if ARGV[3] ~= '' then args[#args + 1] = 's'; args[#args + 1] = ARGV[3] end
local id = redis.call('XADD', unpack(args))
redis.call('SET', KEYS[4], id, 'PX', ARGV[5])
return 1
"""
)


#: Dead-letters the entries pending for a consumer that are too large to read (their
#: fields hold more than a byte limit): read in one reply they would exceed the
#: client's ``max_reply_bytes`` again and again. The letter keeps the first KiB of the
#: largest field. KEYS: stream, dead stream, its byte count. ARGV: group, consumer,
#: limit (bytes), dead maxlen (0: none), dead byte cap (0: none), queue, time.
#: Returns how many it moved.
SWEEP_LARGE = Script(
    TRIM_DEAD_LUA
    + """
local moved = 0
local limit = tonumber(ARGV[3])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
for _, p in ipairs(pending) do
  local id = p[1]
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if e[1] then
    local fields = e[1][2]
    local size, big = 0, ''
    for j = 1, #fields, 2 do
      size = size + #fields[j] + #fields[j + 1]
      if #fields[j + 1] > #big then big = fields[j + 1] end
    end
    if size > limit then
      local added = redis.call('XADD', KEYS[2], '*',
        'reason', 'entry of ' .. size .. ' bytes is larger than the ' .. limit .. ' a worker reads',
        'data', string.sub(big, 1, 1024), 'id', id, 'queue', ARGV[6],
        'deliveries', tostring(p[4]), 'time', ARGV[7], 'stream', KEYS[1])
      trim_dead(KEYS[2], KEYS[3], added, tonumber(ARGV[4]), tonumber(ARGV[5]))
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      moved = moved + 1
    end
  end
end
return moved
"""
)


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
    max_bytes: int = DEFAULT_DEAD_LETTER_BYTES,
    claim: bytes | None = None,
) -> Command:
    """The :data:`DEAD` call moving entry ``eid`` of ``stream`` to the ``dead`` stream,
    with the fields a dead letter carries (``bus dead`` reads them), capped at
    ``maxlen`` letters and ``max_bytes`` bytes of messages (0: no cap). ``claim``: the
    claim of the message's attempt (``Keys.ran``), when the message is known."""
    return DEAD.command(
        keys=[stream, dead, dead + b":bytes", *(() if claim is None else (claim,))],
        args=[group, consumer, eid, maxlen, max_bytes, b"reason", reason, b"data", data,
              b"id", eid, b"queue", queue, b"deliveries", deliveries, b"time", when],
    )  # fmt: skip


#: Sends a message only if it can claim a key first (a unique job, a schedule's tick):
#: SET key id NX PX ttl, then XADD to the stream (due = 0) or ZADD to the delayed set.
#: KEYS: claim key, stream, delayed. ARGV: value (the task id, signed with a secret),
#: ttl (ms), due (ms, 0: now), data, signature, maxlen (0: none), and optionally a
#: value to replace (a forgery the producer found there; '' for none) and the message
#: field (``Keys.data_field``). Returns the value holding
#: the key: ARGV[1] when it was free or held that value (and the message was sent),
#: else the holder's (and nothing was sent).
CLAIM_SEND = Script(
    SEND_LUA
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local held = redis.call('GET', KEYS[1])
  if held and (ARGV[7] == nil or ARGV[7] == '' or held ~= ARGV[7]) then return held end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
send(KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[8])
return ARGV[1]
"""
)

#: Frees a unique key, only if the finishing task holds it. KEYS: the key. ARGV: its
#: value (``unique_value``). Returns 1 if freed, else 0.
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
