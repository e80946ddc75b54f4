"""Fault injection against a real redis-server: crashes, restarts, hostile input."""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import bus
import bus.protocol
from bus.redis import RedisBroker
from bus.redis._ops import Client
from tests.redis.server import RedisServer
from tests.redis.worker_app import build

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _env(url: str, prefix: str, vt: float, concurrency: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BUS_TEST_URL=url,
        BUS_TEST_PREFIX=prefix,
        BUS_TEST_VT=str(vt),
        BUS_TEST_CONCURRENCY=str(concurrency),
        PYTHONPATH=str(ROOT),
    )
    return env


async def _count_results(client: Client, prefix: str) -> int:
    n, cursor = 0, b"0"
    while True:
        cursor, keys = await client.execute(
            "SCAN", cursor, "MATCH", f"{prefix}:result:*", "COUNT", 1000
        )
        n += len(keys)
        if cursor in (b"0", 0):
            return n


async def _pending(client: Client, broker: RedisBroker) -> int:
    summary = await client.execute("XPENDING", broker.keys.stream, broker.group)
    return int(summary[0] or 0)


async def test_kill_9_of_a_worker_process_loses_nothing(redis_server: RedisServer) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    vt = 1.5
    broker = build(redis_server.url, prefix, vt)
    sleepy = broker.find_task("fault.sleepy")
    assert sleepy is not None
    total = 2000
    with trio.fail_after(90):
        async with broker:
            client = broker.client
            messages = [sleepy.kicker().message(i) for i in range(total)]
            await broker.kick_many(messages)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.redis.worker_app"],
                env=_env(redis_server.url, prefix, vt, 50),
                cwd=ROOT,
            )
            try:
                while await _count_results(client, prefix) < 300:  # noqa: ASYNC110 (watching another process)
                    await trio.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            in_flight = await _pending(client, broker)
            done_at_kill = await _count_results(client, prefix)
            assert done_at_kill < total, "the worker finished before it was killed"
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 50)
                results = await bus.gather(
                    *(bus.TaskHandle(m.task_id, broker) for m in messages), timeout=60
                )
                worker.stop()
            assert [r.return_value for r in results] == list(range(total))
            assert all(r.status is bus.TaskStatus.SUCCESS for r in results)
            runs = await client.execute("MGET", *(f"{prefix}:runs:{i}" for i in range(total)))
            counts = [int(r or 0) for r in runs]
            assert min(counts) >= 1
            twice = sum(1 for c in counts if c > 1)
            assert twice <= in_flight, (twice, in_flight)
            with trio.fail_after(5):  # acks are sent in the background, batched
                while await _pending(client, broker):  # noqa: ASYNC110 (watching Redis)
                    await trio.sleep(0.05)


async def test_redis_restart_during_load(aof_server: RedisServer) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    broker = build(aof_server.url, prefix, 1.5)
    sleepy = broker.find_task("fault.sleepy")
    assert sleepy is not None
    total = 400
    with trio.fail_after(60):
        async with broker:
            messages = [sleepy.kicker().message(i) for i in range(total)]
            await broker.kick_many(messages)
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 8)
                while await _count_results(broker.client, prefix) < 100:  # noqa: ASYNC110 (watching another process)
                    await trio.sleep(0.02)
                await trio.to_thread.run_sync(aof_server.restart)
                results = await bus.gather(
                    *(bus.TaskHandle(m.task_id, broker) for m in messages), timeout=40
                )
                worker.stop()
            assert sorted(r.return_value for r in results) == list(range(total))
            # A producer keeps working after the restart too.
            add = broker.find_task("fault.add")
            assert add is not None
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                h = await add.kiq(1, 2)
                assert (await h.wait_result(timeout=10)).return_value == 3
                worker.stop()


def _live_mb() -> float:
    """Python memory still allocated (traced by tracemalloc), after a collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 1e6


async def test_hostile_entries_are_dead_lettered(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(secret="s3cret" * 6, max_message_bytes=64 * 1024)

    @broker.task(name="hostile.add")
    async def add(a: int, b: int) -> int:
        return a + b

    rng = __import__("random").Random(4)
    with trio.fail_after(60):
        async with broker:
            client = broker.client
            stream = broker.keys.stream
            codec = broker.codec
            secret = b"s3cret" * 6
            from bus.redis._logic import sign_entry

            kinds: list[str] = []

            def hostile(i: int) -> dict[bytes, Any]:
                kind = ["bytes", "nofield", "huge", "badsig", "unsigned", "unknown", "args"][i % 7]
                kinds.append(kind)
                if kind == "bytes":
                    data = rng.randbytes(rng.randrange(1, 300))
                    return {b"d": data, b"s": sign_entry(secret, stream, data)}
                if kind == "nofield":
                    return {b"x": b"1"}
                if kind == "huge":
                    data = b"x" * (1024 * 1024)
                    return {b"d": data, b"s": sign_entry(secret, stream, data)}
                msg = add.kicker().message(1, 2)
                data = codec.encode_message(msg)
                if kind == "badsig":
                    return {b"d": data, b"s": b"0" * 64}
                if kind == "unsigned":
                    return {b"d": data}
                if kind == "unknown":
                    data = data.replace(b"hostile.add", b"no.such.task")
                else:
                    data = data.replace(b"[1,2]", b"[1,2,3]")
                return {b"d": data, b"s": sign_entry(secret, stream, data)}

            # What the run leaves allocated (not the process's RSS, which depends on
            # the allocator and on how many entries one read happened to take): about
            # 140 of these entries are 1 MB each, so keeping them would show.
            async def send_hostile(start: int) -> None:  # its batch is freed on return
                commands = []
                for i in range(start, start + 100):
                    flat = [x for kv in hostile(i).items() for x in kv]
                    commands.append(("XADD", stream, "*", *flat))
                await client.pipeline(commands)

            tracemalloc.start()
            before = _live_mb()
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 16)
                handles = []
                for start in range(0, 1000, 100):
                    await send_hostile(start)
                    handles.append(await add.kiq(start, 1))
                results = await bus.gather(*handles, timeout=30)
                assert [r.return_value for r in results] == [s + 1 for s in range(0, 1000, 100)]
                while await client.execute("XLEN", broker.keys.dead) < 1000:  # noqa: ASYNC110 (watching another process)
                    await trio.sleep(0.05)
                worker.stop()
            kept = _live_mb() - before
            tracemalloc.stop()
            raw = await client.execute("XRANGE", broker.keys.dead, "-", "+", "COUNT", 2000)
            dead = [dict(zip(e[1][::2], e[1][1::2], strict=True)) for e in raw]
            assert len(dead) == 1000
            reasons = [e[b"reason"] for e in dead]
            assert all(reasons)
            text = b"\n".join(reasons)
            for needle in (b"signature", b"not signed", b"max_message_bytes", b"no message"):
                assert needle in text, needle
            assert b"unknown task" in text
            assert b"arguments" in text
            assert b"undecodable" in text
            assert all(len(e.get(b"data", b"")) <= 64 * 1024 for e in dead)
            assert await _pending(client, broker) == 0
            assert (await broker.ref.ask(bus.protocol.Inspect()))["running"] == 0
            assert kept < 8, f"the run left {kept:.1f} MB allocated"


async def test_long_task_is_not_redelivered_while_its_worker_lives(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    runs = 0

    def make() -> RedisBroker:
        b = make_broker(prefix=prefix, visibility_timeout=0.6, reap_interval=0.1)

        @b.task(name="long.job")
        async def job() -> str:
            nonlocal runs
            runs += 1
            await trio.sleep(2.0)
            return "ok"

        return b

    one, two = make(), make()
    job = one.find_task("long.job")
    assert job is not None
    with trio.fail_after(20):
        async with one, two, trio.open_nursery() as nursery:
            w1 = await nursery.start(one.run_worker, 1)
            h = await job.kiq()
            while runs == 0:  # noqa: ASYNC110 (watching another process)
                await trio.sleep(0.01)
            w2 = await nursery.start(two.run_worker, 4)  # idle, reaping every 0.1 s
            result = await h.wait_result(timeout=10)
            w1.stop()
            w2.stop()
    assert result.return_value == "ok"
    assert runs == 1


async def test_results_wake_a_waiter_in_another_process(redis_server: RedisServer) -> None:
    """Pushed, not polled: the result is only announced (PUBLISH), never stored under
    its key, so a waiter that read the key would wait until its timeout; this one
    wakes with the announced value."""
    from bus.redis import RedisResultBackend
    from bus.redis._client import open_connection

    prefix = f"t{bus.TaskID.new()[-12:]}"
    tid = bus.TaskID.new()
    code = (
        "import sys, trio, actors, bus\n"
        "from bus.redis import RedisResultBackend\n"
        "async def main():\n"
        "    rb = RedisResultBackend(sys.argv[1], prefix=sys.argv[2])\n"
        "    async with actors.open_system() as system:\n"
        "        await rb.startup(system)\n"
        "        print('ready', flush=True)\n"
        "        r = await rb.wait_result(bus.TaskID.parse(sys.argv[3]), timeout=60)\n"
        "        print('woke', r.return_value, flush=True)\n"
        "        await rb.shutdown()\n"
        "trio.run(main)\n"
    )
    rb = RedisResultBackend(redis_server.url, prefix=prefix)
    result = bus.TaskResult(tid, bus.TaskStatus.SUCCESS, "pushed")
    data = rb.codec.encode_result(result)
    (publish,) = [c for c in rb.store_commands(tid, data, only_new=False) if c[0] == "PUBLISH"]
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", code, redis_server.url, prefix, tid],
            stdout=__import__("subprocess").PIPE,
            cwd=ROOT,
            env=_env(redis_server.url, prefix, 1, 1),
        )
        assert proc.stdout is not None
        buf = b""
        try:
            async with open_connection(redis_server.url) as conn:
                while b"ready" not in buf:
                    buf += await proc.stdout.receive_some()
                # Announce until it wakes: the waiter may not be watching at the first
                # announcement (a missed one is not read back: nothing is stored).
                async with trio.open_nursery() as nursery:

                    async def announce() -> None:
                        while True:
                            await conn.execute(*publish)
                            await trio.sleep(0.05)

                    nursery.start_soon(announce)
                    while b"woke" not in buf or not buf.endswith(b"\n"):
                        chunk = await proc.stdout.receive_some()
                        if not chunk:
                            break
                        buf += chunk
                    nursery.cancel_scope.cancel()
                assert await conn.execute("EXISTS", rb.result_key(tid)) == 0
        finally:
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdout.aclose()
    assert b"woke pushed" in buf, buf
