"""The dashboard's JSON API over real HTTP (hypercorn, Trio mode), against Redis with a
worker running; and `bus dashboard` as a command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

import bus
from bus.dashboard import serve
from bus.dashboard._data import DashboardData
from bus.redis import RedisBroker
from tests.observability.redis_app import make_broker
from tests.observability.support import APP, ROOT, bus_env, eventually, run_bus
from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis


@asynccontextmanager
async def dashboard(broker: bus.Broker, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``broker``'s dashboard on a free port; an HTTP client for it."""
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(
                broker, port=0, sample_interval=0.2, task_status=task_status, **options
            )
        )
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
            yield client
        nursery.cancel_scope.cancel()


async def test_the_json_api_with_a_worker_running(redis_server: RedisServer) -> None:
    prefix = f"d{bus.TaskID.new()[-12:]}"
    worker_broker = make_broker(redis_server.url, prefix)
    broker = make_broker(redis_server.url, prefix)
    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            await nursery.start(worker_broker.run_worker, 3)
            t = broker.tasks
            failed = await t["fail"].kiq(3)
            assert (await failed.wait_result()).is_err
            done = await t["ok"].kiq(41)
            await done.wait_result()
            holding = await t["hold"].kiq(9)

            async with dashboard(broker) as http:

                async def overview() -> dict[str, Any]:
                    d: dict[str, Any] = (await http.get("/api/overview")).json()
                    assert d["running"] and d["failures"] and d["workers"][0]["published"]
                    return d

                d = await eventually(overview)
                assert d["broker"]["type"] == "RedisBroker" and d["broker"]["queue"] == "q"
                assert d["allow_actions"] is False and d["show_payloads"] is False
                (queue,) = d["queues"]
                assert (queue["name"], queue["queued"], queue["dead_letters"]) == ("q", 0, 1)
                assert queue["pending"] == 1
                assert queue["pending_per_consumer"] == {worker_broker.settings.consumer: 1}
                (worker,) = d["workers"]
                assert worker["name"] == worker_broker.settings.consumer
                assert worker["heartbeat_age_seconds"] < 10 and worker["running_count"] == 1
                assert worker["stats"]["succeeded"] == 1 and worker["stats"]["failed"] == 1
                (run,) = d["running"]
                assert run["task_id"] == str(holding.task_id) and run["task_name"] == "hold"
                assert run["progress"] == {"step": "holding", "n": 9}
                assert run["worker"] == worker_broker.settings.consumer
                failure = d["failures"][0]
                assert failure["task_id"] == str(failed.task_id)
                assert (failure["error_type"], failure["error"]) == ("ValueError", "fail #3")
                assert "raise ValueError" in failure["traceback"]
                (letter,) = d["dead_letters"]["items"]
                assert letter["task_id"] == str(failed.task_id) and "payload" not in letter
                assert d["charts"]["depth"].startswith("<svg")
                assert d["history"]["error"] is None

                # A task by id: its result without the return value unless allowed.
                r = (await http.get(f"/api/tasks/{done.task_id}")).json()
                assert r["found"] and r["result"]["status"] == "success"
                assert "return_value" not in r["result"]
                r = (await http.get(f"/api/tasks/{holding.task_id}")).json()
                assert r["result"] is None and r["running"]["worker"] == worker["name"]
                assert r["progress"] == {"step": "holding", "n": 9}
                r = (await http.get(f"/api/tasks/{failed.task_id}")).json()
                assert r["result"]["error"]["message"] == "fail #3" and r["failures"]
                bad = await http.get("/api/tasks/not-an-id")
                assert bad.status_code == 400 and "not a task id" in bad.json()["error"]
                assert not (await http.get(f"/api/tasks/{bus.TaskID.new()}")).json()["found"]

                # A name that is not this host's (DNS rebinding) gets nothing.
                rebound = await http.get("/api/overview", headers={"Host": "rebound.example:80"})
                assert rebound.status_code == 403
                # Read-only: the actions are refused.
                refused = await http.post("/api/dead/purge", json={"confirm": True})
                assert refused.status_code == 403
                page = await http.get("/")
                assert page.status_code == 200 and 'id="bus-data"' in page.text
                assert "script-src 'self'" in page.headers["content-security-policy"]
                assert "requeue-all" not in page.text  # the buttons are drawn by the script

            async with dashboard(broker, allow_actions=True, show_payloads=True) as http:
                letters = (await http.get("/api/dead")).json()
                assert letters[0]["payload"]["args"] == [3]
                r = (await http.get(f"/api/tasks/{done.task_id}")).json()
                assert r["result"]["return_value"] == 41

                async def post(path: str, body: Any, **kw: Any) -> httpx.Response:
                    return await http.post(path, json=body, **kw)

                assert (await post("/api/dead/requeue", {})).status_code == 400  # no confirm
                wrong_type = await http.post("/api/dead/purge", content=b'{"confirm": true}')
                assert wrong_type.status_code == 415
                foreign = await post(
                    "/api/dead/purge", {"confirm": True}, headers={"Origin": "http://evil.example"}
                )
                assert foreign.status_code == 403
                requeued = (await post("/api/dead/requeue", {"confirm": True, "task": "ok"})).json()
                assert requeued == {"requeued": 0, "report": []}  # no letter of task "ok"
                requeued = (await post("/api/dead/requeue", {"confirm": True})).json()
                assert requeued["requeued"] == 1
                assert requeued["report"][0]["task_name"] == "fail"

                async def dead_again() -> bool:
                    return len(await broker.dead_letters()) == 1  # it failed again

                await eventually(dead_again)
                purged = (await post("/api/dead/purge", {"confirm": True})).json()
                assert purged == {"purged": 1}
            await holding.cancel()
            nursery.cancel_scope.cancel()


def test_no_password_or_secret_is_shown() -> None:
    secret = "s3cr3t-key-" + "k" * 32  # 32 bytes at least
    broker = RedisBroker("redis://:hunter2@127.0.0.1:6390/0", secret=secret)
    described = DashboardData(broker).describe()
    assert described["url"] == "redis://:***@127.0.0.1:6390/0"
    assert described["signed"] is True
    assert "hunter2" not in repr(described) and "s3cr3t" not in repr(described)


async def test_bus_dashboard_command(redis_server: RedisServer) -> None:
    env = bus_env(redis_server.url, f"d{bus.TaskID.new()[-12:]}")
    with trio.fail_after(30):
        async with run_bus(env, "dashboard", APP, "--port", "0") as proc:
            (found,) = await proc.wait_for(
                r"bus dashboard: (http://127\.0\.0\.1:\d+)/ \(read-only\)"
            )
            async with httpx.AsyncClient(base_url=found[1], timeout=10) as http:
                d = (await http.get("/api/overview")).json()
                assert d["broker"]["queue"] == "q" and d["workers"] == []
                assert (
                    await http.post("/api/dead/purge", json={"confirm": True})
                ).status_code == 403
            proc.proc.terminate()
            assert await proc.proc.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dashboard", "tests.cli.memory_app:broker"], "does not apply to InMemoryBroker"),
        (["dashboard", APP, "--port", "70000"], "--port must be from 0 to 65535"),
        (["worker", APP, "--metrics-port", "nine"], "--metrics-port takes PORT or HOST:PORT"),
        (["worker", APP, "--metrics-port", "1:99999"], "port 99999 is out of range"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    # In a subprocess: the CLI configures structlog for its whole process.
    done = subprocess.run(
        [sys.executable, "-m", "bus", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("bus: error: ") and message in done.stderr


async def test_serve_needs_a_running_broker() -> None:
    with trio.fail_after(5), pytest.raises(bus.BrokerClosed, match="inside `async with broker`"):
        await serve(bus.InMemoryBroker(), port=0)


async def test_every_named_queue_has_a_row(redis_server: RedisServer) -> None:
    broker = make_broker(redis_server.url, f"d{bus.TaskID.new()[-12:]}")
    with trio.fail_after(30):
        async with broker:
            t = broker.tasks
            await t["ok"].kicker().with_queue("reports").kiq(1)
            await t["ok"].kicker().with_queue("reports").kiq(2)
            data = DashboardData(broker, allow_actions=False, show_payloads=False)
            try:
                d = await data.overview()
            finally:
                await data.stop()
    rows = {q["name"]: q for q in d["queues"]}
    assert rows[d["queues"][0]["name"]]["rates"] is True
    assert rows["reports"]["queued"] == 2 and rows["reports"]["rates"] is False
