"""SIGKILL a master of a Redis Cluster under load: its replica is promoted, the same
producer and worker objects go on, and with min_replicas_ack=1 nothing accepted is
lost (every accepted send runs, every result arrives)."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker, RedisResultBackend
from bus.redis._client import open_connection
from bus.redis._cluster import ClusterConnection, key_slot
from tests.cluster.servers import ClusterSetup, wait_until
from tests.redis.server import RedisServer

pytestmark = pytest.mark.slow


async def test_a_master_killed_under_load_loses_nothing_accepted(
    own_cluster: ClusterSetup,
) -> None:
    cluster = own_cluster
    prefix = f"t{bus.TaskID.new()[-12:]}"
    async with open_connection(cluster.url) as conn:
        assert isinstance(conn, ClusterConnection)
        queues: dict[int, str] = {}  # master port -> a queue whose slot it holds
        for i in range(1000):
            _host, port = conn._addr(key_slot(f"{{{prefix}:q{i}}}"))
            queues.setdefault(port, f"q{i}")
    assert len(queues) == 3
    victim_port = next(iter(queues))
    victim = next(n for n in cluster.nodes if n.port == victim_port)
    options: dict[str, Any] = {
        "min_replicas_ack": 1,
        "send_timeout": 5,
        "visibility_timeout": 3,
        "connect_timeout": None,
        "queue": "q",
        "prefix": prefix,
    }
    backend = RedisResultBackend(
        cluster.url, prefix=prefix, ttl=600, min_replicas_ack=1, command_timeout=5
    )
    producer = RedisBroker(cluster.url, result_backend=backend, **options)
    worker_side = RedisBroker(
        cluster.url,
        result_backend=RedisResultBackend(
            cluster.url, prefix=prefix, ttl=600, min_replicas_ack=1, command_timeout=5
        ),
        **options,
    )
    for b in (producer, worker_side):

        @b.task(name="c.work")
        async def work(i: int) -> int:
            return i

    task = producer.find_task("c.work")
    assert task is not None
    accepted: dict[int, bus.TaskHandle[Any]] = {}
    refused = 0
    names = list(queues.values())
    with trio.fail_after(60):
        async with producer, worker_side, trio.open_nursery() as nursery:
            w = await nursery.start(
                lambda task_status: worker_side.run_worker(8, queues=names, task_status=task_status)
            )
            for i in range(300):
                if i == 100:
                    victim.stop(signal.SIGKILL)
                    nursery.start_soon(_rejoin, cluster, victim)
                try:
                    accepted[i] = await task.kicker().with_queue(names[i % 3]).kiq(i)
                except (bus.SendError, bus.BrokerUnavailable):
                    refused += 1  # not accepted: the producer was told
            results = await bus.gather(*accepted.values(), timeout=40)
            w.stop()
    assert [r.return_value for r in results] == list(accepted)
    assert len(accepted) >= 200, (len(accepted), refused)
    assert victim_port not in cluster.masters()  # its replica took over


async def _rejoin(cluster: ClusterSetup, victim: RedisServer) -> None:
    """Once its replica took over, start the killed master again: it rejoins as that
    replica's replica (so that min_replicas_ack=1 can be met again)."""

    def wait_and_start() -> None:
        wait_until(
            lambda: victim.port not in cluster.masters() and len(cluster.masters()) == 3,
            "a replica took over",
        )
        victim.start()

    await trio.to_thread.run_sync(wait_and_start)
