"""Move the slot of a live queue to another master while tasks flow (the steps of
``redis-cli --cluster reshard``: SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT
NODE): nothing is lost and no error reaches the producer."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import bus
from bus.redis._client import open_connection
from bus.redis._cluster import ClusterConnection, key_slot
from tests.cluster.servers import ClusterSetup, command
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.slow


def _node_id(port: int) -> str:
    return command(port, "CLUSTER", "MYID").split(b"\r\n")[1].decode()


def _move_slot(cluster: ClusterSetup, slot: int, source: int, target: int) -> int:
    """Migrate ``slot`` from the master at port ``source`` to the one at ``target``;
    returns how many keys moved."""
    source_id, target_id = _node_id(source), _node_id(target)
    command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    moved = 0
    while True:
        reply = command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "50")
        keys = [line.decode() for line in reply.split(b"\r\n")[2::2] if line]
        if not keys:
            break
        done = command(
            source, "MIGRATE", "127.0.0.1", str(target), '""', "0", "5000", "KEYS", *keys
        )
        assert done.startswith((b"+OK", b"+NOKEY")), done
        moved += len(keys)
    for port in (target, source, *(n.port for n in cluster.nodes if n.process is not None)):
        command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    return moved


async def test_moving_a_live_queue_loses_nothing(own_cluster: ClusterSetup) -> None:
    cluster = own_cluster
    prefix = f"t{bus.TaskID.new()[-12:]}"
    slot = key_slot(f"{{{prefix}:q}}")
    async with open_connection(cluster.url) as conn:
        assert isinstance(conn, ClusterConnection)
        _, source = conn._addr(slot)
    target = next(p for p in cluster.masters() if p != source)
    producer = make_redis_broker(cluster.url, prefix=prefix, delay_poll_interval=0.05)
    worker_side = make_redis_broker(cluster.url, prefix=prefix, delay_poll_interval=0.05)
    for b in (producer, worker_side):

        @b.task(name="r.echo")
        async def echo(i: int) -> int:
            return i

    task = producer.find_task("r.echo")
    assert task is not None
    handles: dict[int, bus.TaskHandle[Any]] = {}
    moved: list[int] = []
    with trio.fail_after(60):
        async with producer, worker_side, trio.open_nursery() as nursery:
            w = await nursery.start(worker_side.run_worker, 4)
            for i in range(400):
                if i == 100:
                    nursery.start_soon(_reshard, cluster, slot, source, target, moved)
                kicker = task.kicker()
                if i % 10 == 0:
                    kicker = kicker.with_labels(delay=0.05)
                handles[i] = await kicker.kiq(i)  # no error may reach the producer
                if i % 20 == 0:
                    await trio.sleep(0.01)  # let the worker and the migration run
            results = await bus.gather(*handles.values(), timeout=40)
            w.stop()
    assert [r.return_value for r in results] == list(range(400))
    assert moved and moved[0] > 0  # the queue's keys did move
    async with open_connection(cluster.url) as conn:
        assert isinstance(conn, ClusterConnection)
        assert conn._addr(slot)[1] == target


async def _reshard(
    cluster: ClusterSetup, slot: int, source: int, target: int, moved: list[int]
) -> None:
    moved.append(await trio.to_thread.run_sync(lambda: _move_slot(cluster, slot, source, target)))
