"""Operator calls on a Redis queue: inspection and dead letters.

Plain functions of a connection and the queue's keys (no broker state), used by the
broker facade, the broker actor's ``Inspect`` and the ``bus`` command.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._codec import Codec, DecodeError
from bus._errors import BrokerUnavailable
from bus._message import TaskMessage
from bus._options import MAX_RETRIES
from bus._protocol import BrokerInfo, QueueInfo, WorkerInfo
from bus.redis._client import Arg, Connection, RedisError, ReplyError
from bus.redis._logic import F_DATA, F_SIG, Keys, check_entry, queue_of_key, sign_entry
from bus.redis._pool import with_connection
from bus.redis._scripts import REQUEUE_DEAD
from bus.redis._settings import RedisSettings

log = get_logger("bus.redis")

__all__ = ["Client", "dead_letters", "find_queues", "inspect", "purge_dead", "requeue_dead"]


def _fields(flat: Any) -> dict[bytes, Any]:
    if not isinstance(flat, list):
        return {}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


async def find_queues(conn: Connection, prefix: str) -> list[str]:
    """The queues of ``prefix`` that have a stream in Redis (``SCAN``)."""
    pattern = "{" + _glob_escape(prefix) + ":*}:stream*"
    found: dict[str, None] = {}
    cursor: Any = b"0"
    while True:
        cursor, keys = await conn.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        for key in keys or ():
            queue = queue_of_key(prefix, key)
            if queue is not None:
                found[queue] = None
        if cursor in (b"0", 0, "0"):
            return list(found)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def _queue_numbers(
    conn: Connection, keys: Keys, settings: RedisSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One queue's numbers (every level), and its live workers."""
    group = settings.group.encode()
    streams, delayeds = keys.streams, keys.delayeds
    replies = await conn.pipeline(
        [
            *(("XLEN", s) for s in streams),
            *(("ZCARD", d) for d in delayeds),
            ("XLEN", keys.dead),
            ("ZRANGE", keys.workers, 0, -1, "WITHSCORES"),
            *(("XPENDING", s, group) for s in streams),
        ]
    )
    n = len(streams)
    lengths, delayed = replies[:n], replies[n : 2 * n]
    dead, beats = replies[2 * n], replies[2 * n + 1]
    summaries = replies[2 * n + 2 :]
    per_consumer: dict[str, int] = {}
    by_priority: dict[str, int] = {}
    queued = pending = 0
    levels = range(n - 1, -1, -1)
    for level, length, summary in zip(levels, lengths, summaries, strict=True):
        level_pending = 0
        # No stream or no group yet (an error reply): nothing was delivered.
        if isinstance(summary, list) and summary:
            level_pending = int(summary[0] or 0)
            for name, count in summary[3] or ():
                per_consumer[_text(name)] = per_consumer.get(_text(name), 0) + int(count)
        # Acknowledged entries are deleted: what is in the stream is queued or pending.
        level_queued = max(0, (int(length) if isinstance(length, int) else 0) - level_pending)
        if level_queued:
            by_priority[str(level)] = level_queued
        queued += level_queued
        pending += level_pending
    now = time.time()
    stale = 3 * settings.heartbeat + 1
    workers = []
    if isinstance(beats, list):
        for i in range(0, len(beats) - 1, 2):
            name = _text(beats[i])
            age = max(0.0, now - float(beats[i + 1]))
            if age < stale:
                workers.append(
                    {
                        "consumer": name,
                        "pending": per_consumer.get(name, 0),
                        "heartbeat_age_seconds": round(age, 3),
                    }
                )
    numbers = {
        "queued": queued,
        "by_priority": by_priority,
        "delayed": sum(int(d) for d in delayed if isinstance(d, int)),
        "pending": pending,
        "pending_per_consumer": per_consumer,
        "dead_letters": int(dead) if isinstance(dead, int) else 0,
        "live_workers": len(workers),
    }
    return numbers, workers


async def inspect(
    conn: Connection, keys: Keys, settings: RedisSettings, known: Iterable[str] = ()
) -> dict[str, Any]:
    """Numbers for operators. At the top, the default queue's: ``queued`` (not yet
    delivered), ``pending`` (delivered, not acknowledged) in all and per consumer,
    ``delayed``, ``dead_letters``, and the live ``workers`` (a heartbeat within the last
    three intervals), each with its pending count and heartbeat age. Under ``queues``,
    the same numbers (and ``by_priority``: queued per level) for every queue: the
    default one, those in ``known`` (the tasks' queues) and those found in Redis."""
    found = await find_queues(conn, keys.prefix) if keys.discoverable else []
    names = list(dict.fromkeys([keys.queue, *known, *found]))
    queues: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    for name in names:
        qkeys = keys.of(name)
        numbers, live = await _queue_numbers(conn, qkeys, settings)
        queues[name] = numbers
        if name == keys.queue:
            top, workers = numbers, live
    return {
        "queue": settings.queue,
        "stream": keys.stream.decode(),
        "queued": top["queued"],
        "delayed": top["delayed"],
        "pending": top["pending"],
        "pending_per_consumer": top["pending_per_consumer"],
        "dead_letters": top["dead_letters"],
        "workers": workers,
        "live_workers": len(workers),
        "queues": queues,
    }


def broker_info(info: dict[str, Any], *, running: int, workers_here: int) -> BrokerInfo:
    """The typed answer to ``Inspect`` from :func:`inspect`'s numbers."""
    queues = {
        name: QueueInfo(
            queued=q.get("queued", 0),
            delayed=q.get("delayed", 0),
            pending=q.get("pending", 0),
            dead_letters=q.get("dead_letters", 0),
            live_workers=q.get("live_workers", 0),
            by_priority=q.get("by_priority", {}),
            details={"pending_per_consumer": q.get("pending_per_consumer", {})},
        )
        for name, q in info["queues"].items()
    }
    return BrokerInfo(
        queued=info["queued"],
        delayed=info["delayed"],
        running=running,
        pending=info["pending"],
        dead_letters=info["dead_letters"],
        workers=tuple(
            WorkerInfo(w["consumer"], w["pending"], w["heartbeat_age_seconds"])
            for w in info["workers"]
        ),
        queues=queues,
        details={
            "queue": info["queue"],
            "stream": info["stream"],
            "pending_per_consumer": info["pending_per_consumer"],
            "workers_here": workers_here,
        },
    )


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """A letter's number field as ``kind``; 0 when it is not one (a letter is listed
    whatever it holds)."""
    try:
        n = kind(_text(value)[:32] or 0)
    except (ValueError, OverflowError):
        return kind(0)
    return n if n == n and abs(n) != float("inf") else kind(0)


def _letter(entry: list[Any], codec: Codec) -> dict[str, Any]:
    """A dead letter as listed: whatever its bytes, never raising. One whose message
    cannot be decoded is listed raw: ``task_name`` and ``task_id`` are ``None`` and
    ``undecodable`` says why."""
    eid = entry[0] if isinstance(entry, list) and entry else b""
    f = {_text(k): v for k, v in _fields(entry[1] if isinstance(entry, list) else None).items()}
    data = f.get("data", b"")
    data = data if isinstance(data, bytes) else str(data).encode()
    msg: TaskMessage | None = None
    undecodable: str | None = None
    try:
        msg = codec.decode_message(data)
    except DecodeError as exc:
        undecodable = str(exc)[:500]
    except Exception as exc:  # a codec's bug must not hide the other letters
        undecodable = f"the codec raised {type(exc).__name__}: {exc}"[:500]
    return {
        "id": _text(eid),
        "reason": _text(f.get("reason")),
        "task_name": msg.task_name if msg else None,
        "task_id": str(msg.task_id) if msg else None,
        "entry": _text(f.get("id")),
        "deliveries": _number(f.get("deliveries"), int),
        "time": _number(f.get("time"), float),
        "data": data,
        "undecodable": undecodable,
    }


async def dead_letters(
    conn: Connection, keys: Keys, codec: Codec, limit: int = 100
) -> list[dict[str, Any]]:
    """The oldest ``limit`` dead letters (see ``RedisBroker.dead_letters``)."""
    entries = await conn.execute("XRANGE", keys.dead, "-", "+", "COUNT", limit)
    return [_letter(e, codec) for e in entries or ()]


async def requeue_dead(
    conn: Connection,
    keys: Keys,
    settings: RedisSettings,
    codec: Codec,
    limit: int,
    reason: str | None,
    task: str | None,
    claim_ttl: float = 86_400.0,
    retries_for: Callable[[TaskMessage], int] | None = None,
) -> list[dict[str, Any]]:
    """Requeue the oldest ``limit`` dead letters that match ``reason`` (a substring)
    and ``task`` (a task name); say for each letter looked at what happened.

    ``retries_for`` (``reset_attempts``): the letter's task gets that many retries
    again after the attempt it runs. Its attempt number goes on (a (task id,
    attempt) still runs at most once): the message is sent with the label
    ``retries`` = its attempt - 1 + that many, and signed again.

    A letter goes back to the stream it came from. Its message is checked as a worker
    checks it, with the signature it was sent with (kept in the letter): with a
    secret, a requeue signs again only what it verified (an unsigned or forged letter,
    or one cut down for its size, is skipped), then lets its attempt run once more
    (the claim, ``Keys.ran``, names the new entry for ``claim_ttl`` seconds)."""
    entries = await conn.execute("XRANGE", keys.dead, "-", "+", "COUNT", limit)
    report: list[dict[str, Any]] = []
    for entry in entries or ():
        letter = _letter(entry, codec)
        if reason is not None and reason not in letter["reason"]:
            continue
        if task is not None and letter["task_name"] != task:
            continue
        outcome = "requeued"
        if "signature" in letter["reason"] or "not signed" in letter["reason"]:
            outcome = "skipped: dead-lettered for its signature (requeueing would sign it)"
        elif letter["undecodable"] is not None:
            outcome = f"skipped: undecodable, it cannot run ({letter['undecodable'][:200]})"
        if outcome == "requeued":
            raw = _fields(entry[1]) if isinstance(entry, list) and len(entry) > 1 else {}
            checked = _requeue_check(keys, settings, codec, letter["data"], raw)
            if isinstance(checked, str):
                outcome = f"skipped: {checked}"
            else:
                stream, claim = checked
                data = letter["data"]
                if retries_for is not None:
                    data = _with_retries(codec, data, retries_for)
                done = await REQUEUE_DEAD.run(
                    conn,
                    keys=[keys.dead, keys.dead_bytes, stream, claim],
                    args=[entry[0], data, sign_entry(settings.secret, stream, data),
                          settings.maxlen or 0, max(1, int(claim_ttl * 1000)),
                          len(letter["data"]), keys.data_field],
                )  # fmt: skip
                if done == -1:
                    outcome = "skipped: its attempt ran or is claimed by another entry"
                elif not done:
                    outcome = "skipped: requeued or deleted meanwhile"
            if outcome != "requeued":
                log.warning("dead.requeue_refused", id=letter["id"], outcome=outcome)
        report.append(
            {
                "id": letter["id"],
                "task_name": letter["task_name"],
                "reason": letter["reason"],
                "outcome": outcome,
            }
        )
    return report


def _with_retries(codec: Codec, data: bytes, retries_for: Callable[[TaskMessage], int]) -> bytes:
    """The message of ``data`` (checked already) with the retries it gets again."""
    message = codec.decode_message(data)
    retries = min(MAX_RETRIES, message.attempt - 1 + max(0, retries_for(message)))
    labels = {**message.labels, "retries": retries}
    return codec.encode_message(attrs.evolve(message, labels=labels))


def _requeue_check(
    keys: Keys, settings: RedisSettings, codec: Codec, data: bytes, raw: dict[bytes, Any]
) -> tuple[bytes, bytes] | str:
    """The stream a dead letter goes back to and the claim of its attempt, or why it
    may not go back."""
    stream = raw.get(b"stream", keys.stream)
    if not isinstance(stream, bytes) or keys.queue_of_stream(stream) != keys.queue:
        return "its stream is not one of this queue's"
    sig = raw.get(b"sig")
    fields: dict[bytes, bytes] = {F_DATA: data}
    if isinstance(sig, bytes):
        fields[F_SIG] = sig
    _, refused = check_entry(fields, settings.secret, settings.max_message_bytes, stream)
    if refused is not None:
        return f"{refused} (a requeue signs only what it verified)"
    try:
        message = codec.decode_message(data)
    except Exception as exc:
        return f"undecodable, it cannot run ({str(exc)[:200]})"
    return stream, keys.ran(message.task_id, message.attempt)


async def purge_dead(conn: Connection, keys: Keys) -> int:
    """Delete the dead-letter stream; return how many entries it held."""
    n, _ = await conn.transaction([("XLEN", keys.dead), ("DEL", keys.dead, keys.dead_bytes)])
    return int(n)


class Client:
    """A small Redis client on the process's shared connection, for tasks and tools:
    ``await client.execute("INCR", key)``; ``await client.pipeline([...])``. Each call
    is retried on the next connection while Redis is unreachable, for up to ``timeout``
    seconds (``None``: as long as it takes), then raises :class:`bus.BrokerUnavailable`
    (an error reply of Redis is raised as it is)."""

    def __init__(self, conn_ref: actors.ActorRef, timeout: float | None, url: str = "") -> None:
        self._conn_ref = conn_ref
        self._timeout = timeout
        self._url = url

    async def _run(self, what: str, fn: Callable[[Connection], Awaitable[Any]]) -> Any:
        start = trio.current_time()
        deadline = math.inf if self._timeout is None else start + self._timeout
        try:
            with trio.fail_at(deadline):
                return await with_connection(self._conn_ref, fn, deadline=deadline, what=what)
        except ReplyError:
            raise
        except (RedisError, trio.TooSlowError) as exc:
            raise BrokerUnavailable(
                what,
                url=self._url,
                waited=round(trio.current_time() - start, 3),
                cause=str(exc) or "no answer in time",
            ) from None

    async def execute(self, *args: Arg) -> Any:
        what = str(args[0]) if args else "command"
        return await self._run(what, lambda conn: conn.execute(*args))

    async def pipeline(self, commands: list[tuple[Arg, ...]]) -> list[Any]:
        replies: list[Any] = await self._run("pipeline", lambda conn: conn.pipeline(commands))
        return replies
