"""Schedules on Redis: run-time schedules in a hash, tick state in another, and each
tick claimed and sent in one Lua call, so that any number of schedulers fire it once.

Keys (all in the queue's hash tag): ``{prefix:queue}:schedules`` (name -> the
schedule as JSON), ``{prefix:queue}:schedule-state`` (``name<US>last``,
``name<US>fires``, ``name<US>misses``, ``name<US>last_fire``; ``<US>`` is the unit
separator, which a schedule name cannot contain) and ``{prefix:queue}:tick:{name}:{ms}``
(the claim of one tick, expiring after ``claim_ttl``).
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import trio

import actors
from actors._log import get_logger
from bus._ids import TaskID
from bus._message import TaskMessage
from bus._schedule import ScheduleSpec, claim_ttl
from bus._scheduler import ScheduleBackend, TickState
from bus.redis._client import Connection, Script
from bus.redis._logic import Keys, check_schedule, sign_entry, sign_schedule
from bus.redis._pool import lend, with_connection
from bus.redis._scripts import SEND_LUA
from bus.redis._settings import RedisSettings
from bus.redis._slots import key_slot

__all__ = ["RedisScheduleBackend"]

US = "\x1f"

log = get_logger("bus.redis")

#: Claims a tick and sends its message, and records it in the state hash.
#: KEYS: claim, stream, delayed, state. ARGV: claim value, ttl (ms), due (ms, 0: now),
#: data, signature, maxlen (0: none), schedule name, tick, missed ticks of the backlog,
#: the message field (``Keys.data_field``). Returns 1 if this call claimed (and sent)
#: it, else 0.
FIRE_TICK = Script(
    SEND_LUA
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
send(KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[10])
local name = ARGV[7]
redis.call('HSET', KEYS[4], name .. '\\31last', ARGV[8], name .. '\\31last_fire', ARGV[8])
redis.call('HINCRBY', KEYS[4], name .. '\\31fires', 1)
if tonumber(ARGV[9]) > 0 then redis.call('HINCRBY', KEYS[4], name .. '\\31misses', ARGV[9]) end
return 1
"""
)

#: On a Redis Cluster, a tick whose task goes to another queue (another hash tag, so
#: another slot): the claim, in the target queue's slot, and the send, atomically ...
#: KEYS: claim, stream, delayed. ARGV: claim value, ttl (ms), due, data, sig, maxlen,
#: data field.
FIRE_SEND = Script(
    SEND_LUA
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
send(KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7])
return 1
"""
)

#: ... then, by the one that sent it, the schedule's state in its own slot (a crash in
#: between loses a count, never a tick: a scheduler that reads the older state finds
#: the tick claimed). KEYS: state. ARGV: schedule name, tick, missed.
FIRE_STATE = Script("""
local name = ARGV[1]
redis.call('HSET', KEYS[1], name .. '\\31last', ARGV[2], name .. '\\31last_fire', ARGV[2])
redis.call('HINCRBY', KEYS[1], name .. '\\31fires', 1)
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], name .. '\\31misses', ARGV[3]) end
return 1
""")

#: Claims a skipped tick and counts the missed ticks, once.
#: KEYS: claim, state. ARGV: claim value, ttl (ms), schedule name, tick, missed.
MISS_TICK = Script("""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[3] .. '\\31last', ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '\\31misses', ARGV[5])
return 1
""")


def _tick_ms(tick: float) -> int:
    return round(tick * 1000)


def _ttl_ms(spec: ScheduleSpec, tick: float) -> int:
    return max(1, math.ceil(claim_ttl(spec, tick) * 1000))


class RedisScheduleBackend(ScheduleBackend):
    """A Redis broker's schedules (see the module docstring); stateless."""

    def __init__(self, settings: RedisSettings, keys: Keys, conn_ref: actors.ActorRef) -> None:
        self.settings = settings
        self.keys = keys
        self.conn_ref = conn_ref
        # Who claimed a tick, for operators (the value of the claim key).
        self.claimer = f"{socket.gethostname()}-{os.getpid()}-{TaskID.new()[-8:]}"

    async def _conn(self) -> Connection:
        return (await lend(self.conn_ref, timeout=self.settings.command_timeout)).conn

    async def _execute(self, *args: Any) -> Any:
        """One command, again on the next connection after a fault, within
        ``command_timeout``."""
        timeout = self.settings.command_timeout
        return await with_connection(
            self.conn_ref,
            lambda conn: conn.execute(*args),
            deadline=math.inf if timeout is None else trio.current_time() + timeout,
            what=f"schedules ({args[0]})",
        )

    async def runtime(self) -> dict[str, ScheduleSpec]:
        """The run-time schedules; with a secret, only those signed with it (each
        under its own name): the others are ignored, and logged."""
        key = self.keys.schedules()
        flat = await self._execute("HGETALL", key)
        out: dict[str, ScheduleSpec] = {}
        secret = self.settings.secret
        for i in range(0, len(flat or ()) - 1, 2):
            name, value = flat[i], flat[i + 1]
            if not isinstance(name, bytes) or not isinstance(value, bytes):
                continue
            text, refused = check_schedule(secret, key, name, value)
            if text is None:
                log.warning(
                    "schedule.refused", name=name.decode(errors="replace")[:200], reason=refused
                )
                continue
            try:
                spec = ScheduleSpec.from_json(text)
            except ValueError:
                continue  # written by someone else, or by a newer version
            if spec.name.encode() != name:
                log.warning(
                    "schedule.refused",
                    name=name.decode(errors="replace")[:200],
                    reason=f"the schedule is stored under another name than its own ({spec.name})",
                )
                continue
            out[spec.name] = spec
        return out

    async def put(self, spec: ScheduleSpec) -> None:
        key = self.keys.schedules()
        value = sign_schedule(self.settings.secret, key, spec.name, spec.to_json().encode())
        await self._execute("HSET", key, spec.name, value)

    async def drop(self, name: str) -> bool:
        return bool(await self._execute("HDEL", self.keys.schedules(), name))

    async def state(self, names: list[str]) -> dict[str, TickState]:
        if not names:
            return {}
        fields = [f"{n}{US}{f}" for n in names for f in ("last", "fires", "misses", "last_fire")]
        values = await self._execute("HMGET", self.keys.schedule_state(), *fields)
        out: dict[str, TickState] = {}
        for i, name in enumerate(names):
            last, fires, misses, last_fire = values[4 * i : 4 * i + 4]
            if last is None and fires is None and misses is None:
                continue
            out[name] = TickState(
                last_tick=float(last) if last is not None else None,
                fires=int(fires or 0),
                misses=int(misses or 0),
                last_fire=float(last_fire) if last_fire is not None else None,
            )
        return out

    async def fire(
        self, spec: ScheduleSpec, tick: float, message: TaskMessage, data: bytes, missed: int
    ) -> bool:
        keys, settings = self.keys, self.settings
        # The task's queue and level: another queue's keys have another hash tag (one
        # Lua call then spans two slots, which a Redis Cluster would refuse).
        target = keys if message.queue is None else keys.of(message.queue)
        if len(data) > settings.max_message_bytes:
            log.error(
                "schedule.message_too_large",
                name=spec.name,
                size=len(data),
                max_message_bytes=settings.max_message_bytes,
            )
            return False
        eta = message.eta
        due = int(eta * 1000) if eta is not None and eta > time.time() else 0
        args: list[Any] = [
            f"{message.task_id}:{self.claimer}",
            _ttl_ms(spec, tick),
            due,
            data,
            sign_entry(settings.secret, target.level_stream(message.priority), data),
            settings.maxlen or 0,
            spec.name,
            repr(tick),
            missed,
            target.data_field,
        ]
        claim = keys.tick_claim(spec.name, _tick_ms(tick))
        level = message.priority
        stream = target.level_stream(level)
        if settings.url.is_cluster and key_slot(stream) != key_slot(claim):
            # One script over two slots is refused by a cluster: claim and send in
            # the target's slot, then count in the schedule's.
            conn = await self._conn()
            claim = target.tick_claim(spec.name, _tick_ms(tick))
            sent = await FIRE_SEND.run(
                conn,
                keys=[claim, stream, target.level_delayed(level)],
                args=[*args[:6], target.data_field],
            )
            if sent:
                await FIRE_STATE.run(
                    conn, keys=[keys.schedule_state()], args=[spec.name, repr(tick), missed]
                )
            return bool(sent)
        done = await FIRE_TICK.run(
            await self._conn(),
            keys=[
                claim,
                target.level_stream(level),
                target.level_delayed(level),
                keys.schedule_state(),
            ],
            args=args,
        )
        return bool(done)

    async def miss(self, spec: ScheduleSpec, tick: float, missed: int) -> bool:
        keys = self.keys
        claim = keys.tick_claim(spec.name, _tick_ms(tick))
        done = await MISS_TICK.run(
            await self._conn(),
            keys=[claim, keys.schedule_state()],
            args=[f"missed:{self.claimer}", _ttl_ms(spec, tick), spec.name, repr(tick), missed],
        )
        return bool(done)
