"""The outbox of a workflow on a Redis Cluster: sends that cross slots.

A workflow's scripts (``START``, ``TRANSITION``) run on the keys of the workflow's
hash tag ``{prefix:wf:<id>}``; the steps they send go to their queues' streams, in
other slots, which a cluster refuses in one script. There the scripts send to the
workflow's outbox instead, in its own slot (:func:`outbox_keys`: a stream for sends
now, a sorted set for delayed ones, written by the same ``send`` as a queue's), and
:func:`forward` moves each entry to its queue with :data:`FORWARD`: ``SET
{prefix:queue}:fwd:<task id> NX`` first (in the queue's slot, so a forward repeated
after a crash, or by two workers at once, sends once), then the send, then the entry
leaves the outbox.

Who forwards: whoever ran the script, right after it (the producer that started the
workflow, the worker that finished a step), and again whenever a step's transition
is reported again (a worker that died after the transition and before forwarding
has its step redelivered, whose transition answers ``dup`` and forwards). One server
has no slots: there the scripts send directly and nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actors._log import get_logger
from bus._codec import DecodeError
from bus.redis._client import Connection, Script
from bus.redis._scripts import SEND_LUA

if TYPE_CHECKING:
    from bus.redis._broker import RedisBroker

__all__ = ["FORWARD", "forward", "outbox_keys"]

log = get_logger("bus.redis")

#: Sends one outbox entry to its queue, once. KEYS: the forward claim, the stream, the
#: delayed set. ARGV: ttl (ms), due (ms, 0: now), data, signature, maxlen, data field.
#: Returns 1 if it sent, 0 if it was forwarded before.
FORWARD = Script(
    SEND_LUA
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
send(KEYS[2], KEYS[3], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6])
return 1
"""
)

#: Deletes what was forwarded, and the outbox once empty (one script: a send added
#: meanwhile is never deleted). KEYS: outbox stream, outbox delayed set. ARGV: 'x' or
#: 'z' then stream ids or members.
_DONE = Script("""
if ARGV[1] == 'x' then
  for a = 2, #ARGV do redis.call('XDEL', KEYS[1], ARGV[a]) end
else
  for a = 2, #ARGV do redis.call('ZREM', KEYS[2], ARGV[a]) end
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
""")


def outbox_keys(h: bytes) -> list[bytes]:
    """The outbox of the workflow whose hash is ``h``: its stream and delayed set (the
    keys a script's ``send`` takes), in the workflow's slot."""
    return [h + b":outbox", h + b":outbox:delayed"]


async def forward(conn: Connection, broker: RedisBroker, h: bytes, ttl_ms: int) -> int:
    """Move every entry of the outbox of ``h`` to its queue (see the module's
    docstring); returns how many were sent (not counting those forwarded before)."""
    stream, delayed = outbox_keys(h)
    field = broker.keys.data_field
    sent = 0
    entries = await conn.execute("XRANGE", stream, "-", "+", "COUNT", 1000)
    done: list[Any] = []
    for eid, raw in entries or ():
        fields = {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
        data = fields.get(field, b"")
        sent += await _forward_one(conn, broker, data, fields.get(b"s", b""), 0, ttl_ms)
        done.append(eid)
    if done:
        await _DONE.run(conn, keys=[stream, delayed], args=["x", *done])
    later = await conn.execute("ZRANGE", delayed, 0, 999, "WITHSCORES")
    members: list[Any] = []
    for i in range(0, len(later or ()) - 1, 2):
        member, score = later[i], int(float(later[i + 1]))
        sig, _, data = bytes(member).partition(b"\n")
        sent += await _forward_one(conn, broker, data, sig, score, ttl_ms)
        members.append(member)
    if members:
        await _DONE.run(conn, keys=[stream, delayed], args=["z", *members])
    return sent


async def _forward_one(
    conn: Connection, broker: RedisBroker, data: bytes, sig: bytes, due: int, ttl_ms: int
) -> int:
    try:
        message = broker.codec.decode_message(data)
    except DecodeError as exc:
        log.error("workflow.outbox_undecodable", error=str(exc))
        return 0
    target = broker.keys_of_queue(message.queue)
    level = message.priority
    claim = f"{target.base}:fwd:{message.task_id}"  # in the queue's slot
    got = await FORWARD.run(
        conn,
        keys=[claim, target.level_stream(level), target.level_delayed(level)],
        args=[ttl_ms, due, data, sig, broker.settings.maxlen or 0, target.data_field],
    )
    return int(got or 0)
