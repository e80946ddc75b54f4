"""The client and the bus on a real Redis Cluster (3 masters, 3 replicas)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker
from bus.redis._client import Connection, Script, open_connection
from bus.redis._cluster import ClusterConnection, key_slot
from tests.cluster.servers import ClusterSetup
from tests.redis.server import RedisServer, free_port
from tests.redis.support import make_redis_broker


def test_key_slots_match_redis() -> None:
    # Values from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert key_slot(b"123456789") == 12739
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


def _queues_on_every_master(conn: ClusterConnection, prefix: str) -> list[str]:
    """Queue names whose hash tag ``{prefix:queue}`` lands on each master."""
    found: dict[tuple[str, int], str] = {}
    for i in range(1000):
        name = f"q{i}"
        addr = conn._addr(key_slot(f"{{{prefix}:{name}}}"))
        found.setdefault(addr, name)
        if len(found) == len(conn._nodes):
            break
    return list(found.values())


async def test_commands_route_to_the_node_of_their_slot(cluster: ClusterSetup) -> None:
    tag = uuid.uuid4().hex[:8]
    keys = [f"{tag}:{i}" for i in range(30)]  # no hash tag: spread over the masters
    with trio.fail_after(10):
        async with open_connection(cluster.url) as conn:
            assert isinstance(conn, ClusterConnection)
            assert len(conn._nodes) == 3
            for tricky in ("foo{}{bar}", "foo{{bar}}zap", "{a}b", "x{y", "{bus:q}:s", "é{"):
                assert await conn.execute("CLUSTER", "KEYSLOT", tricky) == key_slot(tricky)
            for k in keys:
                assert await conn.execute("SET", k, k) == b"OK"
            assert await conn.execute("MGET", *keys) == [k.encode() for k in keys]
            replies = await conn.pipeline([("GET", k) for k in keys] + [("PING",)])
            assert replies == [k.encode() for k in keys] + [b"PONG"]
            pending = conn.submit([("INCR", f"{k}:n") for k in keys])
            await conn.flush()
            assert await pending.wait() == [1] * len(keys)
            writes = [node.stats.writes for node in conn._nodes.values()]
            pending = conn.submit([("INCR", f"{k}:n") for k in keys])
            assert conn.flush_nowait()  # every node's part written, no checkpoint
            assert [node.stats.writes for node in conn._nodes.values()] == [w + 1 for w in writes]
            assert await pending.wait() == [2] * len(keys)
            found = await conn.execute("SCAN", 0, "MATCH", f"{tag}:*:n", "COUNT", 100)
            assert sorted(found[1]) == sorted(f"{k}:n".encode() for k in keys)
            script = Script("return redis.call('GET', KEYS[1])")
            await script.load(conn)
            assert await script.run(conn, keys=[keys[5]]) == keys[5].encode()
            assert await conn.execute("EXISTS", *keys) == len(keys)
            assert await conn.execute("DEL", *keys) == len(keys)


async def test_moved_updates_the_map(cluster: ClusterSetup) -> None:
    """A command sent to the wrong node (a stale map) is answered MOVED, and runs
    where the slot lives."""
    with trio.fail_after(10):
        async with open_connection(cluster.url) as conn:
            assert isinstance(conn, ClusterConnection)
            key = f"moved:{uuid.uuid4().hex}"
            slot = key_slot(key)
            right = conn._slots[slot]
            conn._slots[slot] = next(a for a in conn._nodes if a != right)
            assert await conn.execute("SET", key, "1") == b"OK"
            assert conn._slots[slot] == right
            conn._slots[slot] = next(a for a in conn._nodes if a != right)
            assert await conn.pipeline([("GET", key)]) == [b"1"]


async def test_a_broker_on_a_cluster_runs_queues_on_every_master(
    cluster: ClusterSetup,
) -> None:
    """Queues whose hash tags land on all three masters, one worker reading all of
    them (a blocking read per node), results and a delayed task."""
    prefix = f"t{bus.TaskID.new()[-12:]}"
    async with open_connection(cluster.url) as conn:
        assert isinstance(conn, ClusterConnection)
        queues = _queues_on_every_master(conn, prefix)
    assert len(queues) == 3
    broker = make_redis_broker(cluster.url, prefix=prefix, delay_poll_interval=0.05)

    @broker.task(name="c.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(
                lambda task_status: broker.run_worker(4, queues=queues, task_status=task_status)
            )
            handles: list[bus.TaskHandle[Any]] = []
            for i in range(30):
                kicker = add.kicker().with_queue(queues[i % 3])
                handles.append(await kicker.kiq(i, 1))
            later = add.kicker().with_queue(queues[0]).with_labels(delay=0.2)
            handles.append(await later.kiq(1, 1))
            results = await bus.gather(*handles, timeout=20)
            assert [r.return_value for r in results] == [i + 1 for i in range(30)] + [2]
            worker.stop()


async def test_a_cluster_url_at_one_server_is_one_clear_error(redis_server: RedisServer) -> None:
    broker = RedisBroker(f"redis+cluster://127.0.0.1:{redis_server.port}", connect_timeout=None)
    with trio.fail_after(10), pytest.raises(bus.BrokerUnavailable, match="not a cluster node"):
        async with broker:
            pass


async def test_all_seeds_down_is_one_clear_error() -> None:
    ports = [free_port(), free_port()]
    broker = RedisBroker(
        f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", connect_timeout=1
    )
    with trio.fail_after(10), pytest.raises(bus.BrokerUnavailable) as info:
        async with broker:
            pass
    text = str(info.value)
    assert "no seed" in text and all(str(port) in text for port in ports)


def test_connection_is_the_type() -> None:
    assert issubclass(ClusterConnection, Connection)


async def test_a_schedule_of_a_task_on_another_queue_fires_each_tick_once(
    cluster: ClusterSetup,
) -> None:
    """The tick's claim and send are in the target queue's slot, its count in the
    schedule's: two schedulers, one send per tick."""
    prefix = f"t{bus.TaskID.new()[-12:]}"
    async with open_connection(cluster.url) as conn:
        assert isinstance(conn, ClusterConnection)
        other = next(
            f"o{i}"
            for i in range(1000)
            if conn._addr(key_slot(f"{{{prefix}:o{i}}}")) != conn._addr(key_slot(f"{{{prefix}:q}}"))
        )
    ticks: list[float] = []
    brokers = [make_redis_broker(cluster.url, prefix=prefix) for _ in range(2)]
    for b in brokers:

        @b.task(name="c.tick", queue=other, schedule=bus.every(0.2))
        async def tick(ctx: bus.Context = bus.CONTEXT) -> None:
            ticks.append(ctx.labels["tick"])

    with trio.fail_after(20):
        async with brokers[0], brokers[1], trio.open_nursery() as nursery:
            workers = [
                await nursery.start(
                    lambda task_status, b=b: b.run_worker(
                        2, queues=[other], task_status=task_status
                    )
                )
                for b in brokers
            ]
            while len(ticks) < 5:  # noqa: ASYNC110 (a clock, not an event)
                await trio.sleep(0.05)
            infos = {i.spec.name: i for i in await brokers[0].schedules()}
            assert infos["c.tick"].state.fires >= 5
            for w in workers:
                w.stop()
    assert len(set(ticks)) == len(ticks)


async def test_a_workflow_outbox_left_behind_is_forwarded_once(
    cluster: ClusterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer that died after the workflow's first script and before forwarding
    leaves the first step in the outbox: a later forward (two at once, even) sends it
    once, and the outbox is gone."""
    from bus.redis import _outbox, _workflows

    prefix = f"t{bus.TaskID.new()[-12:]}"
    broker = make_redis_broker(cluster.url, prefix=prefix)

    @broker.task(name="c.double")
    async def double(x: int) -> int:
        return 2 * x

    async def no_forward(self: Any, h: bytes) -> None:
        pass

    with trio.fail_after(20):
        async with broker:
            monkeypatch.setattr(_workflows.RedisWorkflowBackend, "_forward", no_forward)
            handle = await bus.chain(double.s(21), double.s()).kiq()
            monkeypatch.undo()
            h = broker.workflows.key(handle.workflow_id)
            stream = broker.keys.level_stream(0)
            async with open_connection(cluster.url) as conn:
                assert await conn.execute("XLEN", h + b":outbox") == 1
                assert await conn.execute("XLEN", stream) == 0
                sent = [0, 0]

                async def go(n: int) -> None:
                    sent[n] = await _outbox.forward(conn, broker, h, 60_000)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(go, 0)
                    nursery.start_soon(go, 1)
                assert sorted(sent) == [0, 1]
                assert await conn.execute("XLEN", stream) == 1
                assert await conn.execute("EXISTS", h + b":outbox") == 0
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                result = await handle.wait_result(timeout=10)
                worker.stop()
    assert result.return_value == 84
