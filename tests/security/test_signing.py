"""What a signed Redis worker trusts, and what it refuses (issue 18, items 1, 2 and 4).

An attacker here can write to Redis but does not know the secret: every test writes
what such an attacker could (an HSET, a PUBLISH, a SET, an XADD of a captured entry)
and checks that a worker with the secret does not act on it, on a real redis-server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing

import bus
import bus.redis
from bus.redis import RedisBroker
from bus.redis._client import Connection, ConnectionLost
from bus.redis._logic import Keys, sign_entry
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis

SECRET = "an-example-secret-of-32-bytes-or-more!"


@pytest.fixture
def make_broker(redis_server: RedisServer) -> Callable[..., RedisBroker]:
    def make(**options: Any) -> RedisBroker:
        options.setdefault("secret", SECRET)
        return make_redis_broker(redis_server.url, **options)

    return make


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait (inside the test's deadline) until ``check`` holds: what is watched happens
    in another actor or in Redis."""
    while not await check():  # noqa: ASYNC110 (another actor's or Redis's state)
        await trio.sleep(0.01)


@asynccontextmanager
async def _worker(broker: RedisBroker, **options: Any) -> AsyncIterator[bus.Worker]:
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(functools.partial(broker.run_worker, 2, **options))
        try:
            yield worker
        finally:
            worker.stop()


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == event]


async def _entries(broker: RedisBroker, stream: bytes) -> list[dict[bytes, bytes]]:
    raw = await broker.client.execute("XRANGE", stream, "-", "+")
    return [dict(zip(e[1][::2], e[1][1::2], strict=True)) for e in raw or ()]


async def _xadd(broker: RedisBroker, stream: bytes, fields: dict[bytes, bytes]) -> None:
    await broker.client.execute("XADD", stream, "*", *(x for kv in fields.items() for x in kv))


async def _empty(broker: RedisBroker, *streams: bytes) -> bool:
    """Nothing in ``streams`` (read and acked, dropped or dead-lettered)."""
    lengths = await broker.client.pipeline([("XLEN", s) for s in streams])
    return not any(lengths)


# ------------------------------------------------------------------ schedules


async def test_an_unsigned_schedule_never_runs_on_a_signed_worker(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    paid: list[tuple[str, int]] = []
    ticks: list[int] = []

    @broker.task(name="bank.pay")
    async def pay(to: str, amount: int) -> None:
        paid.append((to, amount))

    @broker.task(name="bank.tick")
    async def tick() -> None:
        ticks.append(1)

    forged = bus.every(0.05)
    spec = {
        "v": 1,
        "name": "evil",
        "task_name": "bank.pay",
        "trigger": {"every": forged.seconds, "anchor": 0.0},
        "args": ["mallory", 1_000_000],
        "kwargs": {},
        "labels": {},
        "misfire_grace": 60.0,
    }
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker:
            key = broker.keys.schedules()
            # One HSET, as an attacker would: today it ran pay() every tick, signed.
            await broker.client.execute("HSET", key, "evil", json.dumps(spec))
            await broker.schedule(tick, bus.every(0.05), name="good")
            async with _worker(broker):
                # Rounds of the scheduler read both; the signed one fires.
                await _until(lambda: _true(len(ticks) >= 3))
            names = [s.spec.name for s in await broker.schedules()]
    assert paid == []
    assert "good" in names and "evil" not in names
    refused = _events(logs, "schedule.refused")
    assert refused and refused[0]["reason"] == "schedule is not signed"


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------- dead letters


async def test_forged_and_oversized_dead_letters_are_refused_on_requeue(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(max_message_bytes=2048)
    paid: list[str] = []

    @broker.task(name="bank.pay")
    async def pay(to: str, pad: str = "") -> None:
        paid.append(to)

    codec = broker.codec
    with trio.fail_after(20):
        async with broker:
            keys, stream = broker.keys, broker.keys.stream
            data = codec.encode_message(pay.kicker().message("forged"))
            # 1. A forged letter ("unknown task" invites a requeue), with no signature
            #    and with one made up.
            for sig in (None, b"v2.1." + b"0" * 64):
                fields = {b"reason": b"unknown task", b"data": data, b"id": b"1-0",
                          b"queue": b"q", b"deliveries": b"1", b"time": b"0"}  # fmt: skip
                if sig is not None:
                    fields[b"sig"] = sig
                await _xadd(broker, keys.dead, fields)
            # 2. An unsigned entry padded past max_message_bytes: refused as unsigned
            #    (checked before the size), so never re-signed.
            big = codec.encode_message(pay.kicker().message("padded", "x" * 4000))
            await _xadd(broker, stream, {b"d": big})
            # 3. A signed entry too large: its letter keeps a cut-down copy, whose
            #    signature no longer holds.
            await _xadd(broker, stream, {b"d": big, b"s": sign_entry(SECRET.encode(), stream, big)})
            async with _worker(broker):
                await _until(lambda: _letters(broker, 4))
            letters = await broker.dead_letters()
            reasons = sorted(letter["reason"] for letter in letters)
            report = await broker.requeue_dead()
            assert await broker.client.execute("XLEN", stream) == 0
    assert paid == []
    assert reasons.count("unknown task") == 2
    assert "message is not signed" in reasons
    assert any("exceeds max_message_bytes=2048" in r for r in reasons)
    assert [r["outcome"].startswith("skipped") for r in report] == [True] * 4, report
    outcomes = " ".join(r["outcome"] for r in report)
    assert "not signed" in outcomes and "signature is wrong" in outcomes


async def _letters(broker: RedisBroker, n: int) -> bool:
    return len(await broker.dead_letters()) >= n


async def test_a_genuine_dead_letter_keeps_its_signature_and_runs_once_when_requeued(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    # A worker that does not know the task dead-letters it ("unknown task"); one that
    # does runs it after the requeue, once (the claim of its attempt moves along).
    without, producer = make_broker(prefix=prefix), make_broker(prefix=prefix)
    runs: list[int] = []

    @producer.task(name="later.job")
    async def job(i: int) -> int:
        runs.append(i)
        return i

    with trio.fail_after(20):
        async with without, producer:
            h = await job.kiq(7)
            async with _worker(without):
                await _until(lambda: _letters(without, 1))
            [letter] = await without.dead_letters()
            assert "unknown task" in letter["reason"] or "not registered" in letter["reason"]
            raw = await producer.client.execute("XRANGE", producer.keys.dead, "-", "+")
            fields = dict(zip(raw[0][1][::2], raw[0][1][1::2], strict=True))
            assert fields[b"sig"].startswith(b"v2.")  # the original signature, kept
            report = await producer.requeue_dead()
            assert [r["outcome"] for r in report] == ["requeued"]
            async with _worker(producer):
                # (A FAILURE of the rejection may be stored before: wait for the run.)
                await _until(lambda: _true(runs == [7]))
                await _until(lambda: _result_is(producer, h.task_id, 7))
                # Requeued again (an attacker re-adding the same letter): already run.
                await _xadd(producer, producer.keys.dead, fields)
                await producer.requeue_dead()
                await _until(lambda: _empty(producer, producer.keys.stream))
    assert runs == [7]


async def _result_is(broker: RedisBroker, tid: bus.TaskID, value: Any) -> bool:
    try:
        result = await broker.result_backend.get_result(tid)
    except bus.ResultNotFound:
        return False
    return result.return_value == value


async def test_dead_letters_are_capped_in_bytes(make_broker: Callable[..., RedisBroker]) -> None:
    broker = make_broker(dead_letter_max_bytes=5000)
    with trio.fail_after(20):
        async with broker:
            stream = broker.keys.stream
            for i in range(10):  # unsigned: each dead-lettered with its 1000 bytes
                await _xadd(broker, stream, {b"d": b"%04d" % i + b"x" * 996})
            async with _worker(broker):
                await _until(lambda: _empty(broker, stream))
            letters = await broker.dead_letters()
            counted = int(await broker.client.execute("GET", broker.keys.dead_bytes))
    assert 1 <= len(letters) <= 5
    assert sum(len(letter["data"]) for letter in letters) == counted <= 5000
    assert letters[-1]["data"].startswith(b"0009")  # the newest stay


# -------------------------------------------------------------------- results


async def test_a_forged_result_announcement_is_ignored(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    go = trio.Event()

    @broker.task(name="bank.balance")
    async def balance() -> int:
        await go.wait()
        return 42

    @broker.task(name="bank.other")
    async def other() -> int:
        return 666

    backend = broker.result_backend
    assert isinstance(backend, bus.redis.RedisResultBackend)
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker, _worker(broker), trio.open_nursery() as nursery:
            # A result signed for another task, to replay under this one's id.
            o = await other.kiq()
            await o.wait_result(timeout=5)
            signed_other = await broker.client.execute("GET", backend.result_key(o.task_id))
            h = await balance.kiq()
            got: list[bus.TaskResult[Any]] = []

            async def wait() -> None:
                got.append(await h.wait_result(timeout=15))

            nursery.start_soon(wait)

            async def subscribed() -> bool:
                reply = await broker.client.execute("PUBSUB", "NUMSUB", backend.channel)
                return bool(reply[1])

            await _until(subscribed)
            forged = bus.TaskResult(h.task_id, bus.TaskStatus.SUCCESS, 1_000_000)
            unsigned = broker.codec.encode_result(forged)
            tid = str(h.task_id).encode()
            await broker.client.execute("PUBLISH", backend.channel, tid + unsigned)
            await broker.client.execute("PUBLISH", backend.channel, tid + signed_other)
            await broker.client.execute("SET", backend.result_key(h.task_id), unsigned)
            await _until(lambda: _true(len(_events(logs, "results.refused")) >= 2))
            with pytest.raises(bus.ResultNotFound):
                await backend.get_result(h.task_id)  # the forged key is not a result
            assert not got
            go.set()
    assert [r.return_value for r in got] == [42]
    reasons = {e["reason"] for e in _events(logs, "results.refused")}
    assert {"result is not signed", "result signature is wrong"} <= reasons


# ---------------------------------------------------------------- unique keys


async def test_a_forged_unique_value_is_ignored(make_broker: Callable[..., RedisBroker]) -> None:
    broker = make_broker()
    runs: list[int] = []

    @broker.task(name="report.daily")
    async def daily() -> int:
        runs.append(1)
        return 1

    attacker = bus.TaskID.new()
    with trio.fail_after(20):
        async with broker:
            first = await daily.kicker().with_unique("d").kiq()
            [key] = await broker.client.execute(
                "KEYS", broker.keys.base.replace("{", "\\{").replace("}", "\\}") + ":unique:*"
            )
            await broker.client.pipeline([("DEL", key, broker.keys.stream)])
            await broker.client.execute("SET", key, str(attacker))  # the forgery
            h = await daily.kicker().with_unique("d").kiq()
            assert h.task_id not in (attacker, first.task_id)
            # While it is queued, the same job is that task (a value this secret made).
            again = await daily.kicker().with_unique("d").kiq()
            assert again.task_id == h.task_id
            async with _worker(broker):
                assert (await h.wait_result(timeout=10)).return_value == 1
    assert runs == [1]


# -------------------------------------------------------------------- replays


async def test_a_replayed_signed_entry_runs_once_also_in_another_queue_or_level(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    runs: list[str] = []

    @broker.task(name="bank.pay")
    async def pay(to: str) -> str:
        runs.append(to)
        return to

    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with broker:
            keys = broker.keys
            other = Keys(keys.prefix, "other")
            h = await pay.kiq("bob")
            [captured] = await _entries(broker, keys.stream)
            streams = (keys.stream, keys.level_stream(5), other.stream, other.level_stream(3))
            async with _worker(broker, queues=[keys.queue, "other"]):
                await h.wait_result(timeout=10)
                for stream in streams:
                    await _xadd(broker, stream, captured)
                await _xadd(broker, keys.stream, captured)  # and twice in its own
                await _until(lambda: _empty(broker, *streams))
            letters = await broker.dead_letters()
            letters += [
                {"reason": f[b"reason"].decode()} for f in await _entries(broker, other.dead)
            ]
    assert runs == ["bob"]
    assert len(_events(logs, "task.replay_dropped")) == 2
    # Moved to another queue or level, its signature no longer holds.
    assert sorted(letter["reason"] for letter in letters) == ["message signature is wrong"] * 3


async def test_a_duplicated_unsent_entry_runs_once(make_broker: Callable[..., RedisBroker]) -> None:
    """A retried XADD may store a message twice: one copy runs."""
    broker = make_broker(secret=None)
    runs: list[int] = []

    @broker.task(name="x.count")
    async def count() -> None:
        runs.append(1)

    with trio.fail_after(20):
        async with broker:
            h = await count.kiq()
            [entry] = await _entries(broker, broker.keys.stream)
            await _xadd(broker, broker.keys.stream, entry)
            async with _worker(broker):
                await h.wait_result(timeout=10)
                await _until(lambda: _empty(broker, broker.keys.stream))
    assert runs == [1]


async def test_entries_older_than_max_message_age_are_refused(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(max_message_age=60)
    runs: list[str] = []

    @broker.task(name="bank.pay")
    async def pay(to: str) -> None:
        runs.append(to)

    with trio.fail_after(20):
        async with broker:
            stream = broker.keys.stream
            data = broker.codec.encode_message(pay.kicker().message("old"))
            sig = sign_entry(SECRET.encode(), stream, data, now=time.time() - 3600)
            await _xadd(broker, stream, {b"d": data, b"s": sig})
            h = await pay.kiq("fresh")
            async with _worker(broker):
                await h.wait_result(timeout=10)
                await _until(lambda: _letters(broker, 1))
            [letter] = await broker.dead_letters()
    assert runs == ["fresh"]
    assert "more than max_message_age=60" in letter["reason"]


# ------------------------------------------------------------ cancel markers


async def test_a_forged_cancel_marker_is_ignored(make_broker: Callable[..., RedisBroker]) -> None:
    broker = make_broker()

    @broker.task(name="bank.pay")
    async def pay(to: str) -> str:
        return to

    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker:
            message = pay.kicker().message("alice")
            # A plain SET, as an attacker would: today it silently dropped the task.
            await broker.client.execute("SET", broker.keys.cancel_marker(message.task_id), "1")
            tid = await broker.kick(message)
            async with _worker(broker):
                result = await bus.TaskHandle(tid, broker).wait_result(timeout=10)
    assert result.status is bus.TaskStatus.SUCCESS and result.return_value == "alice"
    assert _events(logs, "task.cancel_marker_refused")


async def test_a_signed_cancel_marker_still_cancels_a_queued_task(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    producer, worker_side = make_broker(prefix=prefix), make_broker(prefix=prefix)
    runs: list[int] = []
    for b in (producer, worker_side):

        @b.task(name="x.job")
        async def job() -> None:
            runs.append(1)

    task = producer.find_task("x.job")
    assert task is not None
    with trio.fail_after(20):
        async with producer, worker_side:
            h = await task.kiq()
            await producer.cancel_task(h.task_id)
            done = await task.kiq()
            async with _worker(worker_side):
                await done.wait_result(timeout=10)
                await _until(lambda: _empty(worker_side, worker_side.keys.stream))
            result = await h.wait_result(timeout=5)
    assert result.status is bus.TaskStatus.CANCELLED
    assert runs == [1]


# ------------------------------------------------------------ delivery counts


async def test_a_forged_delivery_count_does_not_overwrite_a_success(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(max_deliveries=3)
    runs: list[int] = []

    @broker.task(name="bank.pay")
    async def pay(i: int) -> int:
        runs.append(i)
        return i

    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker:
            stream = broker.keys.stream
            h = await pay.kiq(1)
            [captured] = await _entries(broker, stream)
            # Not run yet: a copy with a forged count is ignored (one of the two runs).
            h2 = await pay.kiq(2)
            [_, second] = await _entries(broker, stream)
            await _xadd(broker, stream, {**second, b"n": b"99"})
            async with _worker(broker):
                await h.wait_result(timeout=10)
                await h2.wait_result(timeout=10)
                # Run already: a copy with a forged count is dropped, the SUCCESS stays.
                await _xadd(broker, stream, {**captured, b"n": b"99"})
                await _until(lambda: _empty(broker, stream))
            r1 = await broker.result_backend.get_result(h.task_id)
            r2 = await broker.result_backend.get_result(h2.task_id)
            letters = await broker.dead_letters()
    assert sorted(runs) == [1, 2]
    assert r1.status is bus.TaskStatus.SUCCESS and r2.status is bus.TaskStatus.SUCCESS
    assert letters == []
    refused = _events(logs, "task.count_refused")
    assert refused and refused[0]["reason"] == "delivery count is not signed"


# ----------------------------------------------------------------------- sizes


async def test_an_oversize_send_is_refused_at_the_producer(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(max_message_bytes=1024)

    @broker.task(name="x.echo")
    async def echo(text: str) -> str:
        return text

    with trio.fail_after(10):
        async with broker:
            with pytest.raises(bus.SendError, match="more than max_message_bytes=1024"):
                await echo.kiq("x" * 2000)
            with pytest.raises(bus.SendError, match="max_message_bytes"):
                await echo.kiq_many([(("y" * 2000,), {})])
            await echo.kiq("small")
            assert await broker.client.execute("XLEN", broker.keys.stream) == 1


def test_the_stream_has_a_default_maxlen() -> None:
    settings = bus.redis.RedisSettings()
    assert settings.maxlen == 1_000_000
    assert settings.max_message_age is None
    assert settings.dead_letter_max_bytes == 256 * 1024 * 1024


async def test_an_oversize_reply_is_refused_by_the_client(redis_server: RedisServer) -> None:
    key = f"t{bus.TaskID.new()}"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            big = await Connection.connect(redis_server.url)
            await nursery.start(big.run)
            await big.execute("SET", key, b"x" * 100_000)
            await big.execute("RPUSH", key + ":l", *(b"%d" % i for i in range(20_000)))
            small = await Connection.connect(redis_server.url + "?max_reply_bytes=4096")
            failed: list[BaseException] = []

            async def run_small() -> None:
                try:
                    await small.run()
                except ConnectionLost as exc:
                    failed.append(exc)

            nursery.start_soon(run_small)
            await trio.testing.wait_all_tasks_blocked()
            assert await small.execute("GET", key + ":none") is None
            with pytest.raises(ConnectionLost, match="max_reply_bytes=4096"):
                await small.execute("GET", key)
            # Many small elements count as much as one big string.
            small2 = await Connection.connect(redis_server.url + "?max_reply_bytes=4096")
            nursery.start_soon(_swallow, small2)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ConnectionLost, match="max_reply_bytes"):
                await small2.execute("LRANGE", key + ":l", 0, -1)
            assert len(await big.execute("GET", key)) == 100_000
            await big.execute("DEL", key, key + ":l")
            await big.aclose()
    assert failed


async def _swallow(conn: Connection) -> None:
    with contextlib.suppress(ConnectionLost):
        await conn.run()


def test_the_age_of_a_delayed_message_counts_from_when_it_is_due() -> None:
    from bus.redis._logic import too_old

    stream = Keys("bus", "q").stream
    sig = sign_entry(b"k" * 32, stream, b"data", now=1000.0)
    assert too_old(sig, None, 60, now=1060.0) is None
    assert "more than max_message_age=60" in (too_old(sig, None, 60, now=1061.0) or "")
    # Sent at 1000 to run at 5000: fresh until 5060.
    assert too_old(sig, 5000.0, 60, now=5059.0) is None
    assert too_old(sig, 5000.0, 60, now=5061.0) is not None
    assert too_old(b"", None, 60, now=1e12) is None  # unsigned: no time to judge


async def test_entries_too_large_for_a_reply_do_not_stall_the_queue(
    redis_server: RedisServer,
) -> None:
    # Replies are capped at 64 KiB here: one entry of 200 KB can never be read, and
    # sixteen legitimate 15 KB messages cannot be read in one go.
    url = redis_server.url + "?max_reply_bytes=65536"
    broker = make_redis_broker(url, secret=SECRET, max_message_bytes=16_384)
    sizes: list[int] = []

    @broker.task(name="x.size")
    async def size(text: str) -> int:
        sizes.append(len(text))
        return len(text)

    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with broker:
            stream = broker.keys.stream
            await _xadd(broker, stream, {b"d": b"x" * 200_000})
            handles = await size.kiq_many([("y" * 15_000,)] * 16)
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 16)
                results = await bus.gather(*handles, timeout=25)
                await _until(lambda: _letters(broker, 1))
                worker.stop()
            [letter] = await broker.dead_letters()
    assert [r.return_value for r in results] == [15_000] * 16
    assert "is larger than the" in letter["reason"] and len(letter["data"]) == 1024
    assert _events(logs, "redis.read_too_large")


async def test_a_signed_task_interrupted_by_a_stop_runs_again_with_its_count(
    make_broker: Callable[..., RedisBroker],
) -> None:
    """The hand-back at a stop moves the claim of the attempt to the copy (it is no
    replay) and signs its delivery count (it is not ignored)."""
    broker = make_broker()
    started: list[int] = []
    block = trio.Event()

    @broker.task(name="x.slow")
    async def slow() -> str:
        started.append(1)
        if len(started) == 1:
            await block.wait()  # interrupted by the stop
        return "done"

    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker:
            h = await slow.kiq()
            async with _worker(broker) as worker:
                await _until(lambda: _true(len(started) == 1))
                assert await worker.drain(0.05) == 1  # handed back for another worker
            [copy] = await _entries(broker, broker.keys.stream)
            assert copy[b"n"] == b"1" and copy[b"c"]
            async with _worker(broker):
                result = await h.wait_result(timeout=10)
    assert result.return_value == "done" and len(started) == 2
    assert not _events(logs, "task.replay_dropped")
    assert not _events(logs, "task.count_refused")
