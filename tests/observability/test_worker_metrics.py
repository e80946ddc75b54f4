"""`bus worker --metrics-port` of real worker processes on Redis, scraped over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket

import httpx
import pytest
import trio

import bus
from tests.observability.redis_app import make_broker
from tests.observability.support import APP, bus_env, eventually, get, metric, run_bus
from tests.redis.server import RedisServer, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def test_metrics_of_a_worker_after_100_tasks(redis_server: RedisServer) -> None:
    prefix = f"m{bus.TaskID.new()[-12:]}"
    env = bus_env(redis_server.url, prefix)
    producer = make_broker(redis_server.url, prefix)
    with trio.fail_after(60):
        async with run_bus(
            env, "worker", APP, "--concurrency", "20", "--metrics-port", "0", "--log-level",
            "warning",
        ) as worker:  # fmt: skip
            port = int((await worker.wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/"))[0][1])
            url = f"http://127.0.0.1:{port}/metrics"
            async with producer:
                t = producer.tasks
                messages = (
                    [t["ok"].kicker().message(i) for i in range(65)]
                    + [t["fail"].kicker().message(i) for i in range(20)]
                    + [t["flaky"].kicker().message(i) for i in range(10)]
                )
                await producer.kick_many(messages)
                holds = [await t["hold"].kiq(i) for i in range(5)]

                async def holding() -> bool:
                    return all([await h.get_progress() for h in holds])

                await eventually(holding)
                for h in holds:
                    await h.cancel()
                ids = [m.task_id for m in messages] + [h.task_id for h in holds]
                for tid in ids:
                    await producer.result_backend.wait_result(tid)

                async def scraped() -> str:
                    text = (await get(url)).text
                    assert metric(text, "bus_tasks_cancelled_total", task_name="hold") == 5
                    assert metric(text, "bus_dead_letters") == 20
                    return text

                text = await eventually(scraped)

    def total(name: str, **labels: str) -> float:
        return sum(
            metric(text, name, task_name=task, **labels) or 0.0
            for task in ("ok", "fail", "flaky", "hold")
        )

    assert total("bus_tasks_started_total") == 110
    assert total("bus_tasks_succeeded_total") == 75
    assert metric(text, "bus_tasks_failed_total", task_name="fail", queue="q") == 20
    assert metric(text, "bus_tasks_retried_total", task_name="flaky", queue="q") == 10
    assert total("bus_tasks_failed_total") == 20 and total("bus_tasks_retried_total") == 10
    assert total("bus_tasks_cancelled_total") == 5 and total("bus_tasks_timed_out_total") == 0
    assert total("bus_tasks_running") == 0
    assert total("bus_task_queue_wait_seconds_count") == 100  # first attempts
    assert total("bus_task_duration_seconds_count") == 110
    assert metric(text, "bus_queue_depth", queue="q") == 0
    assert metric(text, "bus_workers_live", queue="q") == 1
    assert metric(text, "bus_worker_restarts", slot="0") == 0
    # The producer's own registry counted the sends.
    sent = producer.middlewares[0].registry.get_sample_value  # type: ignore[attr-defined]
    assert sent("bus_tasks_sent_total", {"task_name": "ok", "queue": "q"}) == 65


def two_free_ports() -> int:
    """A port P such that P and P + 1 were both free a moment ago."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


async def test_processes_serve_one_port_each(redis_server: RedisServer) -> None:
    env = bus_env(redis_server.url, f"m{bus.TaskID.new()[-12:]}")
    port = two_free_ports()
    with trio.fail_after(30):
        async with run_bus(
            env, "worker", APP, "--processes", "2", "--metrics-port", f"127.0.0.1:{port}",
            "--log-format", "json",
        ) as sup:  # fmt: skip
            found = await sup.wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/", count=2)
            assert sorted(int(m[1]) for m in found) == [port, port + 1]
            for slot in (0, 1):
                text = (await get(f"http://127.0.0.1:{port + slot}/metrics")).text
                assert metric(text, "bus_worker_restarts", slot=str(slot)) == 0
            # A crashed child comes back on its slot's port, and says it was restarted.
            started = await sup.wait_for(
                r'"supervisor.started".*"slot": 0|"slot": 0.*"supervisor.started"'
            )
            pid = int(json.loads(started[0].string)["pid"])
            os.kill(pid, signal.SIGKILL)

            async def restarted() -> bool:
                try:
                    text = (await get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.ConnectError:
                    return False  # between the crash and the restart
                return metric(text, "bus_worker_restarts", slot="0") == 1

            await eventually(restarted)
