"""The Lua scripts of Redis workflows (see bus/redis/_workflows.py for the keys and
how the transition is used). Each runs atomically on the server; every key they
touch but the queues' streams has the workflow's hash tag."""

from __future__ import annotations

from bus.redis._client import Script
from bus.redis._scripts import SEND_LUA

__all__ = ["CANCEL", "SNAPSHOT", "START", "TRANSITION"]

#: Records a workflow and sends its first steps, once (a repeated call finds the
#: hash and sends nothing). KEYS: the hash, then a stream and a delayed set per first
#: step. ARGV: plan, number of steps, maxlen, then per first step: index, data,
#: signature, due (ms, 0: now). Returns 1, or 0 if it was recorded already.
START = Script(
    SEND_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'state', 'running', 'n', ARGV[2])
local maxlen = tonumber(ARGV[3])
local k = 2
for a = 4, #ARGV, 4 do
  send(KEYS[k], KEYS[k + 1], tonumber(ARGV[a + 3]), ARGV[a + 1], ARGV[a + 2], maxlen)
  redis.call('HSET', KEYS[1], 't:' .. ARGV[a], '1')
  k = k + 2
end
return 1
"""
)

#: Lua shared by the scripts that end a workflow: its keys expire after the result
#: backend's TTL (the steps' outcomes are kept until the end), its joins go.
END_LUA = """
local function finish(h, done, first_join, last_join, ttl)
  redis.call('PEXPIRE', h, ttl)
  redis.call('PEXPIRE', done, ttl)
  for j = first_join, last_join do redis.call('DEL', KEYS[j]) end
end
"""

#: One step's completion. KEYS: hash, done set, on_error's stream and delayed set,
#: every join set of the workflow (m of them), then a stream and a delayed set per
#: successor of the step. ARGV: step, outcome, kind ('ok', 'fail', 'cancel'), number
#: of steps, ttl (ms), the workflow's result if this call may end it (else ''),
#: maxlen, on_error's data (or ''), its signature, its due, m, then per successor:
#: its index, its join's position in KEYS (0: it waits for this step only), its
#: number of deps, data ('' when the caller saw it not runnable yet), signature, due.
#: Returns {'ok'}, {'ended', state, result}, {'dup', state, result}, {'late', state},
#: {'retry'} (nothing written: read again), or {'unknown'}.
TRANSITION = Script(
    SEND_LUA
    + END_LUA
    + """
local h, done = KEYS[1], KEYS[2]
local i = ARGV[1]
local state = redis.call('HGET', h, 'state')
if not state then return {'unknown'} end
if redis.call('HEXISTS', h, 'o:' .. i) == 1 then
  return {'dup', state, redis.call('HGET', h, 'result') or ''}
end
if state ~= 'running' then
  redis.call('HSET', h, 'o:' .. i, ARGV[2])
  return {'late', state}
end
local m = tonumber(ARGV[11])
local ttl = tonumber(ARGV[5])
local maxlen = tonumber(ARGV[7])
if ARGV[3] ~= 'ok' then
  local ended = 'cancelled'
  if ARGV[3] == 'fail' then ended = 'failed' end
  redis.call('HSET', h, 'o:' .. i, ARGV[2], 'state', ended, 'result', ARGV[6])
  redis.call('SADD', done, i)
  if ended == 'failed' then
    redis.call('HSET', h, 'failed', i)
    if ARGV[8] ~= '' then send(KEYS[3], KEYS[4], tonumber(ARGV[10]), ARGV[8], ARGV[9], maxlen) end
  end
  finish(h, done, 5, 4 + m, ttl)
  return {'ended', ended, ARGV[6]}
end
-- Check first, write after: a successor runnable now must have come with its message.
local runnable = {}
local s = 0
for a = 12, #ARGV, 6 do
  s = s + 1
  local join = tonumber(ARGV[a + 1])
  local ready = true
  if join > 0 then
    local have = redis.call('SCARD', KEYS[join])
    if redis.call('SISMEMBER', KEYS[join], i) == 0 then have = have + 1 end
    ready = have >= tonumber(ARGV[a + 2])
  end
  if ready and ARGV[a + 3] == '' then return {'retry'} end
  runnable[s] = ready
end
local ends = redis.call('SCARD', done) + 1 >= tonumber(ARGV[4])
if ends and ARGV[6] == '' then return {'retry'} end
redis.call('HSET', h, 'o:' .. i, ARGV[2])
redis.call('SADD', done, i)
s = 0
for a = 12, #ARGV, 6 do
  s = s + 1
  local join = tonumber(ARGV[a + 1])
  if join > 0 then redis.call('SADD', KEYS[join], i) end
  if runnable[s] and redis.call('HSETNX', h, 't:' .. ARGV[a], '1') == 1 then
    local k = 4 + m + 2 * s - 1
    send(KEYS[k], KEYS[k + 1], tonumber(ARGV[a + 5]), ARGV[a + 3], ARGV[a + 4], maxlen)
  end
end
if ends then
  redis.call('HSET', h, 'state', 'succeeded', 'result', ARGV[6])
  finish(h, done, 5, 4 + m, ttl)
  return {'ended', 'succeeded', ARGV[6]}
end
return {'ok'}
"""
)

#: Cancels a running workflow. KEYS: hash, done set, its join sets. ARGV: the
#: workflow's result, ttl (ms), number of steps. Returns {1, steps sent and not
#: finished...}, or {0} if it was not running.
CANCEL = Script(
    END_LUA
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return {0} end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'result', ARGV[1])
local out = {1}
for i = 0, tonumber(ARGV[3]) - 1 do
  if redis.call('HEXISTS', KEYS[1], 't:' .. i) == 1 and
     redis.call('HEXISTS', KEYS[1], 'o:' .. i) == 0 then
    out[#out + 1] = i
  end
end
finish(KEYS[1], KEYS[2], 3, #KEYS, tonumber(ARGV[2]))
return out
"""
)

#: One read of a transition's snapshot: whether the step is done already, the size of
#: the done set and of each join. KEYS: done set, joins. ARGV: the step.
SNAPSHOT = Script("""
local out = {redis.call('SISMEMBER', KEYS[1], ARGV[1]), redis.call('SCARD', KEYS[1])}
for k = 2, #KEYS do out[#out + 1] = redis.call('SCARD', KEYS[k]) end
return out
""")
