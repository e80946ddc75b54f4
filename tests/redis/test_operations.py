"""Redis upkeep, outages and dead letters (issue: operators can trust it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import structlog
import trio

import bus
import bus.protocol
import bus.testing
from bus.redis import RedisBroker
from bus.redis._client import Connection
from bus.redis._ops import Client
from bus.redis._reader import StreamReaderActor
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


async def _wait_until(pred: Callable[[], Any], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await pred():  # noqa: ASYNC110 (watching Redis, which has no Event)
            await trio.sleep(0.02)


async def test_acknowledged_entries_leave_the_stream(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()

    @broker.task
    async def noop(i: int) -> int:
        return i

    with trio.fail_after(20):
        async with bus.testing.run_broker(broker, concurrency=8):
            handles = await noop.kiq_many((i,) for i in range(300))
            await bus.gather(*handles, timeout=15)
            client = broker.client

            async def emptied() -> bool:
                return await client.execute("XLEN", broker.keys.stream) == 0

            await _wait_until(emptied)  # acks (and XDELs) are batched in the background


async def test_workers_leave_the_group_and_the_list_on_a_clean_stop_and_ghosts_expire(
    make_broker: Callable[..., RedisBroker],
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    broker = make_broker(prefix=prefix, heartbeat_interval=0.1)
    keys = broker.keys
    with trio.fail_after(20):
        async with broker:
            client = broker.client
            await client.execute("XGROUP", "CREATE", keys.stream, broker.group, "0", "MKSTREAM")
            # A ghost: a consumer that owns nothing and a heartbeat long ago (crashed).
            await client.execute("XADD", keys.stream, "*", "d", "x")
            entry = await client.execute(
                "XREADGROUP", "GROUP", broker.group, "ghost", "STREAMS", keys.stream, ">"
            )
            eid = entry[0][1][0][0]
            await client.execute("XACK", keys.stream, broker.group, eid)
            await client.execute("ZADD", keys.workers, time.time() - 3600, "ghost")
            assert [w["consumer"] for w in (await broker.inspect())["workers"]] == []
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 1)

                async def ghost_gone() -> bool:
                    members = await client.execute("ZRANGE", keys.workers, 0, -1)
                    consumers = await client.execute(
                        "XINFO", "CONSUMERS", keys.stream, broker.group
                    )
                    names = {c[1] for c in consumers}
                    return b"ghost" not in members and b"ghost" not in names

                await _wait_until(ghost_gone)
                info = await broker.inspect()
                assert [w["consumer"] for w in info["workers"]] == [broker.consumer.decode()]
                worker.stop()
        # Stopped cleanly: no trace of this worker is left.
        async with broker:
            client = broker.client
            assert await client.execute("ZRANGE", keys.workers, 0, -1) == []
            consumers = await client.execute("XINFO", "CONSUMERS", keys.stream, broker.group)
            assert consumers == []
            assert (await broker.inspect())["live_workers"] == 0


async def test_a_six_second_outage_during_a_run_runs_the_task_once(
    aof_server: RedisServer,
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    broker = make_redis_broker(aof_server.url, prefix=prefix, visibility_timeout=60)
    started = trio.Event()
    runs = 0

    @broker.task
    async def report(day: str) -> str:
        nonlocal runs
        runs += 1
        started.set()
        await trio.sleep(3)
        return f"report for {day}"

    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 2)
            handle = await report.kiq("monday")
            await started.wait()
            await trio.to_thread.run_sync(aof_server.stop)
            await trio.sleep(6)  # Redis is down while the task finishes
            await trio.to_thread.run_sync(aof_server.start)
            result = await handle.wait_result(timeout=30)
            client = broker.client

            async def settled() -> bool:
                summary = await client.execute("XPENDING", broker.keys.stream, broker.group)
                return int(summary[0] or 0) == 0

            await _wait_until(settled, 20)  # the ack made it too
            worker.stop()
    assert result.return_value == "report for monday"
    assert runs == 1


def _reader_of(broker: RedisBroker) -> StreamReaderActor:
    """The broker's (default) stream reader, as it is now (a restart makes another)."""
    return cast(StreamReaderActor, broker.ref._cell.children["reader"].instance)


async def test_an_entry_acked_while_its_reread_was_on_the_way_does_not_run_again(
    make_broker: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader, reconnected, reads the entries pending for it again (they were
    read before the outage) and skips those it holds. A running task's entry was read
    so, its task finished and its ack landed, and the reader was told Done, all before
    the reader looked at what it had read: the entry, no longer held, was taken for
    one to run, and its attempt's claim (made by this very entry) let it run a second
    time (twice in a full run of the six-second outage above, the Done or the
    heartbeat's "not ours any more" landing in that window). Here the window is held
    open: the reply of the re-read waits until the reader has forgotten the entry."""
    broker = make_broker()
    started, release, again = trio.Event(), trio.Event(), trio.Event()
    runs = 0

    @broker.task
    async def job() -> str:
        nonlocal runs
        runs += 1
        if runs == 1:
            started.set()
            await release.wait()
        else:
            again.set()
        return "done"

    held, gate = trio.Event(), trio.Event()
    execute = Connection.execute

    async def late_reread(self: Connection, *args: Any, timeout: float | None = None) -> Any:
        reply = await execute(self, *args, timeout=timeout)
        if (
            args[0] == "XREADGROUP"
            and b">" not in args
            and not gate.is_set()
            and any(section for _, section in reply or ())
        ):
            held.set()
            await gate.wait()  # the reader looks at what it read only now
        return reply

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 2)
            handle = await job.kiq()
            await started.wait()
            monkeypatch.setattr(Connection, "execute", late_reread)
            # The reader's connection drops: restarted, it reads its own entries again.
            reader = _reader_of(broker)
            assert reader.blocking is not None
            host, port = reader.blocking._transport.socket.getsockname()[:2]
            await broker.client.execute("CLIENT", "KILL", "ADDR", f"{host}:{port}")
            await held.wait()  # the running entry, read again, its reply not looked at
            reader = _reader_of(broker)
            assert reader.blocking is not None
            release.set()
            assert (await handle.wait_result(timeout=10)).return_value == "done"
            while reader.state.inflight:  # noqa: ASYNC110 (the ack's write is confirmed)
                await trio.sleep(0.005)
            reads = reader.blocking.stats.commands
            gate.set()
            while reader.blocking.stats.commands == reads:  # noqa: ASYNC110 (read looked at)
                await trio.sleep(0.005)
            with trio.move_on_after(0.3):
                await again.wait()  # handed to the idle runner at once, if at all
            pending = await broker.client.execute("XPENDING", broker.keys.stream, broker.group)
            worker.stop()
    assert runs == 1
    assert int(pending[0] or 0) == 0


async def test_a_cancel_made_while_the_workers_subscription_was_down_still_arrives(
    aof_server: RedisServer,
) -> None:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    worker_side = make_redis_broker(aof_server.url, prefix=prefix)
    producer = make_redis_broker(aof_server.url, prefix=prefix, send_timeout=30)
    started = trio.Event()

    for b in (worker_side, producer):

        @b.task(name="x.forever")
        async def forever() -> None:
            started.set()
            await trio.sleep_forever()

    task = producer.find_task("x.forever")
    assert task is not None
    with trio.fail_after(60):
        async with worker_side, trio.open_nursery() as nursery:
            worker = await nursery.start(worker_side.run_worker, 2)
            async with producer:
                handle = await task.kiq()
                await started.wait()
                await trio.to_thread.run_sync(aof_server.stop)
                async with trio.open_nursery() as inner:
                    inner.start_soon(producer.cancel_task, handle.task_id)  # waits for Redis
                    await trio.sleep(1)
                    await trio.to_thread.run_sync(aof_server.start)
                result = await handle.wait_result(timeout=20)
                assert result.status is bus.TaskStatus.CANCELLED

                async def stopped_running() -> bool:
                    info = await worker_side.ref.ask(bus.protocol.Inspect())
                    return bool(info["running"] == 0)

                await _wait_until(stopped_running, 20)  # it really was cancelled there
            worker.stop()


async def test_with_a_secret_only_signed_cancels_cancel(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(secret="s3cret" * 6)
    started = trio.Event()

    @broker.task
    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with bus.testing.run_broker(broker):
            handle = await forever.kiq()
            await started.wait()
            client: Client = broker.client
            # Anyone who can PUBLISH can send this; it is not signed, so it is refused:
            # the refusal is logged once the announcement was read, and the task runs on.
            await client.execute("PUBLISH", broker.keys.cancel_channel, str(handle.task_id))
            while not any(e["event"] == "redis.cancel_refused" for e in logs):  # noqa: ASYNC110 (a log line)
                await trio.sleep(0.01)
            assert (await broker.ref.ask(bus.protocol.Inspect()))["running"] == 1
            assert not await handle.is_ready()
            await handle.cancel()
            assert (await handle.wait_result(timeout=5)).status is bus.TaskStatus.CANCELLED


async def test_failed_tasks_can_be_dead_lettered_and_requeued(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker(dead_letter_failures=True)
    attempts: list[int] = []
    fixed = False

    @broker.task(name="ops.fragile", retries=1, retry_backoff=0)
    async def fragile(ctx: bus.Context = bus.CONTEXT) -> str:
        attempts.append(ctx.attempt)
        if not fixed:
            raise RuntimeError("the service is down")
        return "done"

    with trio.fail_after(20):
        async with bus.testing.run_broker(broker):
            handle = await fragile.kiq()
            failed = await handle.wait_result(timeout=5)
            assert failed.status is bus.TaskStatus.FAILURE

            async def dead_lettered() -> bool:
                return len(await broker.dead_letters()) == 1

            await _wait_until(dead_lettered)
            letter = (await broker.dead_letters())[0]
            assert "failed for good after 2 attempt(s)" in letter["reason"]
            assert letter["task_id"] == handle.task_id
            fixed = True
            report = await broker.requeue_dead(task="ops.fragile")
            assert [r["outcome"] for r in report] == ["requeued"]

            async def ran_again() -> bool:
                return (await handle.get_result()).status is bus.TaskStatus.SUCCESS

            await _wait_until(ran_again)
    assert attempts == [1, 2, 2]
