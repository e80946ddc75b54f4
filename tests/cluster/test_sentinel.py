"""The bus on Redis Sentinel: the master found through the sentinels, and a failover
(SIGKILL of the master) under load, seen through the same broker objects."""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker, RedisResultBackend
from bus.redis._client import open_connection
from tests.cluster.servers import SERVICE, SentinelSetup, command, wait_until
from tests.redis.server import RedisServer, free_port
from tests.redis.support import make_redis_broker


async def test_the_client_connects_to_the_master_the_sentinels_name(
    sentinels: SentinelSetup,
) -> None:
    with trio.fail_after(10):
        async with open_connection(sentinels.url) as conn:
            role = await conn.execute("ROLE")
            assert role[0] == b"master"
            assert await conn.execute("SET", "sentinel:k", "v") == b"OK"
            info = await conn.execute("INFO", "server")
            assert f"tcp_port:{sentinels.master.port}".encode() in info


async def test_a_broker_on_sentinel_runs_tasks(sentinels: SentinelSetup) -> None:
    broker = make_redis_broker(sentinels.url, min_replicas_ack=1)

    @broker.task(name="s.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 4)
            handles = [await add.kiq(i, i) for i in range(20)]
            results = await bus.gather(*handles, timeout=10)
            assert [r.return_value for r in results] == [2 * i for i in range(20)]
            worker.stop()


@pytest.mark.slow
async def test_a_failover_under_load_loses_nothing_accepted(
    sentinels: SentinelSetup, tmp_path: Path
) -> None:
    """SIGKILL the master while a producer sends and a worker runs: the sentinels
    promote the replica, the same broker objects go on, and with min_replicas_ack=1
    (and the old master back as the new one's replica) every accepted send runs and
    its result arrives."""
    options: dict[str, Any] = {
        "min_replicas_ack": 1,
        "send_timeout": 3,
        "visibility_timeout": 3,
        "connect_timeout": None,
    }
    prefix = f"t{bus.TaskID.new()[-12:]}"
    backend = RedisResultBackend(
        sentinels.url, prefix=prefix, ttl=600, min_replicas_ack=1, command_timeout=3
    )
    producer = RedisBroker(sentinels.url, prefix=prefix, queue="q", **options)
    producer.with_result_backend(backend)
    # The worker stores the results: its backend waits for the replica too. Without
    # it, a result stored on the master just before the SIGKILL, not yet replicated,
    # is lost in the failover while the task's ack, retried on the new master, lands:
    # that task never gets a result (as on the cluster, tests/cluster/test_cluster_failover.py).
    worker_side = RedisBroker(
        sentinels.url,
        prefix=prefix,
        queue="q",
        result_backend=RedisResultBackend(
            sentinels.url, prefix=prefix, ttl=600, min_replicas_ack=1, command_timeout=3
        ),
        **options,
    )
    ran: set[int] = set()
    for b in (producer, worker_side):

        @b.task(name="s.work")
        async def work(i: int) -> int:
            ran.add(i)
            return i

    task = producer.find_task("s.work")
    assert task is not None
    accepted: dict[int, bus.TaskHandle[Any]] = {}
    refused = 0
    switched: list[int] = []
    old_master = sentinels.master
    with trio.fail_after(60):
        async with producer, worker_side, trio.open_nursery() as nursery:
            w = await nursery.start(worker_side.run_worker, 8)
            for i in range(300):
                if i == 100:
                    old_master.stop(signal.SIGKILL)
                    nursery.start_soon(_rejoin, sentinels, old_master, switched)
                try:
                    accepted[i] = await task.kiq(i)
                except (bus.SendError, bus.BrokerUnavailable):
                    refused += 1  # not accepted: the producer was told
            results = await bus.gather(*accepted.values(), timeout=40)
            w.stop()
    assert [r.return_value for r in results] == list(accepted)
    assert len(accepted) >= 200, (len(accepted), refused)
    assert switched  # a failover did happen


async def _rejoin(sentinels: SentinelSetup, old_master: RedisServer, switched: list[int]) -> None:
    """Once the sentinels promoted the replica, start the old master again as its
    replica (so that min_replicas_ack=1 can be met again)."""

    def wait_and_start() -> None:
        wait_until(lambda: sentinels.master_port() != old_master.port, "the sentinels switched")
        new_port = sentinels.master_port()
        switched.append(new_port)
        old_master.extra_args = ("--replicaof", "127.0.0.1", str(new_port))
        old_master.start()

    await trio.to_thread.run_sync(wait_and_start)


async def test_an_unknown_service_name_is_one_clear_error(sentinels: SentinelSetup) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for port in sentinels.sentinel_ports)
    url = f"redis+sentinel://:pw@{hosts}/no-such-master/0"
    broker = RedisBroker(url, connect_timeout=None)  # would wait forever
    with trio.fail_after(10), pytest.raises(bus.BrokerUnavailable) as info:
        async with broker:
            pass
    text = str(info.value)
    assert "no sentinel knows a master named 'no-such-master'" in text
    assert "pw" not in text.replace("pw@", "")  # nothing of the password


async def test_all_sentinels_down_is_one_clear_error() -> None:
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/{SERVICE}"
    broker = RedisBroker(url, connect_timeout=1)
    with trio.fail_after(10), pytest.raises(bus.BrokerUnavailable) as info:
        async with broker:
            pass
    text = str(info.value)
    assert "no sentinel" in text and all(str(port) in text for port in ports)


async def test_a_replica_is_never_written_to(sentinels: SentinelSetup) -> None:
    """A connection whose master turned replica drops at the first READONLY; the next
    one goes where the sentinels point (not back to the replica)."""
    with trio.fail_after(20):
        async with open_connection(sentinels.url) as conn:
            assert await conn.execute("SET", "sentinel:x", "1") == b"OK"
            # Demote the master by hand (the sentinels will put it back: what matters
            # is that this connection stops writing to it).
            command(sentinels.master.port, "REPLICAOF", "127.0.0.1", str(sentinels.replica.port))
            with pytest.raises(bus.redis._client.ConnectionLost, match="replica"):
                await conn.execute("SET", "sentinel:x", "2")
            assert conn.is_closed


async def test_a_stale_sentinel_naming_a_replica_is_passed_over(
    sentinels: SentinelSetup,
) -> None:
    """The first sentinel of the URL names the replica (it has not seen a failover):
    the ROLE check refuses it and the next sentinel's answer is used."""
    replica = str(sentinels.replica.port).encode()

    async def stale(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(
                b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(replica), replica)
            )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, stale, 0, host="127.0.0.1")
        )
        fake = listeners[0].socket.getsockname()[1]
        hosts = ",".join(f"127.0.0.1:{p}" for p in [fake, *sentinels.sentinel_ports])
        with trio.fail_after(10):
            async with open_connection(f"redis+sentinel://{hosts}/{SERVICE}") as conn:
                info = await conn.execute("INFO", "server")
                assert f"tcp_port:{sentinels.master.port}".encode() in info
        nursery.cancel_scope.cancel()
