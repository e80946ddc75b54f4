"""The stream reader's heartbeat keeps the entries it holds, and tells apart the ones
it no longer owns: claimed by another consumer (a warning: the task may run there
too) or acknowledged meanwhile (its own ack landed before the reader was told it is
done, as after an outage: no warning)."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
import trio
import trio.testing

from bus.redis._pool import lend
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


async def test_an_entry_acked_meanwhile_is_forgotten_quietly_one_claimed_away_loudly(
    redis_server: RedisServer,
) -> None:
    broker = make_redis_broker(redis_server.url)
    gate = trio.Event()
    started: list[int] = []

    @broker.task(name="heartbeat.gated")
    async def gated(i: int) -> int:
        started.append(i)
        await gate.wait()
        return i

    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 4)
            handles = [await gated.kiq(i) for i in range(3)]
            while len(started) < 3:  # noqa: ASYNC110 (polled under the test's deadline)
                await trio.sleep(0.005)
            reader: Any = broker.ref._cell.children["reader"].instance
            client, keys, group = broker.client, broker.keys, broker.group
            pending = await client.execute("XPENDING", keys.stream, group, "-", "+", 10)
            acked, claimed, kept = sorted(p[0] for p in pending)
            assert {acked, claimed, kept} <= set(reader.state.inflight)
            # One is acknowledged behind the reader's back (its ack landed, the Done
            # did not come yet); one is claimed by another consumer.
            assert await client.execute("XACK", keys.stream, group, acked) == 1
            await client.execute("XCLAIM", keys.stream, group, b"elsewhere", 0, claimed, "JUSTID")
            assert broker._conn_ref is not None
            conn = (await lend(broker._conn_ref)).conn
            with structlog.testing.capture_logs() as logs:
                await reader._touch(conn)
            lost = [e for e in logs if e["event"] == "task.ownership_lost"]
            finished = [e for e in logs if e["event"] == "redis.entry_finished"]
            assert [e["entry"] for e in lost] == [claimed.decode()]
            assert lost[0]["log_level"] == "warning"
            assert [e["entry"] for e in finished] == [acked.decode()]
            assert finished[0]["log_level"] == "debug"
            assert set(reader.state.inflight) == {kept}  # both forgotten, the third kept
            idle = await client.execute("XPENDING", keys.stream, group, kept, kept, 1)
            assert idle[0][2] < 1000  # touched: its idle time was reset
            gate.set()
            results = [await h.wait_result(timeout=10) for h in handles]
            worker.stop()
    assert [r.return_value for r in results] == [0, 1, 2]
