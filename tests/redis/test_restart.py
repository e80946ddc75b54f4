"""The Redis broker actor restarted after a bug: nothing accepted is lost, nothing
running is handed out again, and the worker goes on."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import bus
from bus.protocol import Inspect
from bus.redis._broker import RedisBrokerActor
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


class Boom(Exception):
    pass


async def test_a_broker_actor_restart_runs_nothing_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RedisBrokerActor._actor_handlers[Inspect]
    crashed: list[int] = []

    async def crash_once(actor: Any, message: Any) -> Any:
        if not crashed:
            crashed.append(1)
            raise Boom("a bug in a handler")
        return await real(actor, message)

    monkeypatch.setitem(RedisBrokerActor._actor_handlers, Inspect, crash_once)
    broker = make_redis_broker(redis_server.url)
    runs: dict[int, int] = {}
    release = trio.Event()

    @broker.task(name="restart.work")
    async def work(i: int) -> int:
        runs[i] = runs.get(i, 0) + 1
        if i < 4:
            await release.wait()
        return i

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 8)
            first = [await work.kiq(i) for i in range(4)]
            while len(runs) < 4:  # noqa: ASYNC110 (the runners start them)
                await trio.sleep(0.01)
            with pytest.raises(Boom):
                await broker.ref.ask(Inspect())
            await trio.testing.wait_all_tasks_blocked()
            assert broker.ref.restart_count == 1
            release.set()  # the running tasks finish after the restart
            more = [await work.kiq(i) for i in range(4, 12)]
            results = await bus.gather(*first, *more, timeout=10)
            info = await broker.inspect()  # works again
            assert info.pending == 0 or info.pending <= 12
            worker.stop()
    assert [r.return_value for r in results] == list(range(12))
    assert runs == dict.fromkeys(range(12), 1)


@pytest.mark.parametrize("claim_first", [True, False], ids=["claimed", "claim-late"])
async def test_a_stop_that_meets_an_entry_read_but_not_held_moves_its_claim(
    redis_server: RedisServer, claim_first: bool
) -> None:
    """A reader stopped between claiming an entry's attempt and holding it hands the
    entry back with its claim moved to the copy: the copy runs (it was taken for a
    replay and dropped: a lost task in the stop loops). The claim goes on the reader's
    own connection, which the stop closes: it may land after the hand-back, which then
    made the claim for the copy already, so the late claim finds it taken."""
    from types import SimpleNamespace

    from bus.redis._pool import lend
    from bus.redis._reader import StreamReaderActor
    from bus.redis._scripts import Handback, handback_command

    broker = make_redis_broker(redis_server.url)
    runs: list[int] = []

    @broker.task(name="restart.once")
    async def once(i: int) -> int:
        runs.append(i)
        return i

    with trio.fail_after(20):
        async with broker:
            handle = await once.kiq(7)
            client, keys, group = broker.client, broker.keys, broker.group
            await client.execute("XGROUP", "CREATE", keys.stream, group, "0", "MKSTREAM")
            reply = await client.execute(
                "XREADGROUP", "GROUP", group, b"gone", "COUNT", 1, "STREAMS", keys.stream, ">"
            )
            eid = reply[0][1][0][0]
            claim = keys.ran(handle.task_id, 1)
            if claim_first:
                await client.execute("SET", claim, eid)  # claimed, then the stop came
            assert broker._conn_ref is not None
            conn = (await lend(broker._conn_ref)).conn
            # What the stopping reader does for a pending entry it does not hold.
            reader: Any = SimpleNamespace(codec=broker.codec)
            stream: Any = SimpleNamespace(key=keys.stream, keys=keys)
            claims = await StreamReaderActor._claims_of(reader, conn, stream, [eid])
            assert claims == {eid: claim}
            entry = Handback(eid, False, claim=claims[eid])
            await client.execute(
                *handback_command(keys.stream, group, b"gone", 0, [entry], claim_ttl_ms=60_000)
            )
            copy = await client.execute("GET", claim)
            assert copy not in (None, eid)  # the claim follows the copy
            if not claim_first:
                assert 0 < await client.execute("PTTL", claim) <= 60_000
                # The claim the stopped reader had sent lands now: taken, by the copy.
                late = await client.execute("SET", claim, eid, "NX", "GET", "PX", 60_000)
                assert late == copy
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                assert (await handle.wait_result(timeout=10)).return_value == 7
                worker.stop()
    assert runs == [7]
