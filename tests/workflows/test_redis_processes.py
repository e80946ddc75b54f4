"""Workflows on Redis with real worker processes (``bus worker``): a SIGKILLed worker
in the middle of a chord, a step that crashes after its transition, a failing chain,
cancelling 100 running steps, a chord of chains, and a 10,000-step group."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker
from bus.redis._workflows import RedisWorkflowBackend
from tests.redis.server import RedisServer
from tests.workflows.wf_app import build

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.workflows.wf_app:broker"


def _prefix() -> str:
    return f"w{bus.TaskID.new()[-12:]}"


@contextlib.asynccontextmanager
async def workers(
    url: str, prefix: str, n: int, *, vt: float = 2.0, concurrency: int = 10, crash: bool = False
) -> AsyncIterator[list[trio.Process]]:
    """``n`` ``bus worker`` processes of the workflow app; stopped on the way out."""
    env = {
        **os.environ,
        "BUS_TEST_URL": url,
        "BUS_TEST_PREFIX": prefix,
        "BUS_TEST_VT": str(vt),
        "BUS_TEST_CRASH": "1" if crash else "0",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "bus", "worker", APP, "--concurrency", str(concurrency)]
    procs = []
    try:
        for _ in range(n):
            procs.append(
                await trio.lowlevel.open_process(
                    [*command, "--shutdown-timeout", "1", "--log-level", "warning"],
                    env=env,
                    cwd=ROOT,
                )
            )
        yield procs
    finally:
        with trio.CancelScope(shield=True):
            for p in procs:
                if p.returncode is None:
                    p.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                for p in procs:
                    await p.wait()
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()


async def _runs(broker: RedisBroker, prefix: str, name: str, args: list[Any]) -> list[int]:
    got = await broker.client.execute("MGET", *(f"{prefix}:runs:{name}:{a}" for a in args))
    return [int(x or 0) for x in got]


async def _barrier(broker: RedisBroker) -> None:
    """Run one more task behind everything sent so far (one runner, first in first out)."""
    step = broker.find_task("wf.step")
    assert step is not None
    await (await step.kiq(-1)).wait_result(timeout=20)


async def test_a_chord_of_200_runs_its_body_once_when_a_worker_is_killed(
    redis_server: RedisServer,
) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 1.0)
    step, body = broker.find_task("wf.step"), broker.find_task("wf.body")
    assert step is not None and body is not None
    with trio.fail_after(60):
        async with broker, workers(redis_server.url, prefix, 2, vt=1.0) as procs:
            h = await bus.chord([step.s(i, 0.05) for i in range(200)], body.s()).kiq()
            backend = broker.workflows
            assert isinstance(backend, RedisWorkflowBackend)
            done = backend.key(h.workflow_id) + b":done"
            while int(await broker.client.execute("SCARD", done)) < 50:  # noqa: ASYNC110 (other processes)
                await trio.sleep(0.02)
            procs[0].send_signal(signal.SIGKILL)
            result = await h.wait_result(timeout=45)
            bodies = await broker.client.execute("LRANGE", f"{prefix}:bodies", 0, -1)
            runs = await _runs(broker, prefix, "step", list(range(200)))
            status = await h.status()
    assert result.status is bus.TaskStatus.SUCCESS and result.return_value == sum(range(200))
    assert [json.loads(b) for b in bodies] == [list(range(200))]
    assert min(runs) >= 1  # some ran twice: those the killed worker held
    assert status.state == "succeeded" and {s.state for s in status.steps} == {"succeeded"}


async def test_a_step_redelivered_after_its_transition_sends_nothing_twice(
    redis_server: RedisServer,
) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 1.0)
    step, double = broker.find_task("wf.step"), broker.find_task("wf.double")
    assert step is not None and double is not None
    with trio.fail_after(40):
        async with broker:
            wf = step.si(1) | double.s().set(labels={"crash": True}) | double.s()
            async with workers(redis_server.url, prefix, 1, vt=1.0, crash=True, concurrency=1) as p:
                h = await wf.kiq()
                assert await p[0].wait() == 9  # it ended itself after double(1)'s transition
            async with workers(redis_server.url, prefix, 1, vt=1.0, crash=True, concurrency=1):
                result = await h.wait_result(timeout=20)
                while (await _runs(broker, prefix, "double", [1]))[0] < 2:  # noqa: ASYNC110 (other processes)
                    await trio.sleep(0.05)  # the reclaimed entry runs again
                await _barrier(broker)
            runs = await _runs(broker, prefix, "double", [1, 2])
    assert result.return_value == 4
    assert runs == [2, 1]  # double(1) ran twice, its successor once


async def test_a_chain_failing_in_its_middle_skips_the_rest_and_alerts_once(
    redis_server: RedisServer,
) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 2.0)
    step, boom, alert = (broker.find_task(n) for n in ("wf.step", "wf.boom", "wf.alert"))
    assert step is not None and boom is not None and alert is not None
    with trio.fail_after(30):
        async with broker, workers(redis_server.url, prefix, 1, concurrency=1):
            wf = bus.chain(step.si(1), boom.s(), step.si(3), step.si(4), on_error=alert.s())
            h = await wf.kiq()
            result = await h.wait_result(timeout=20)
            await _barrier(broker)
            alerts = await broker.client.execute("LRANGE", f"{prefix}:alerts", 0, -1)
            runs = await _runs(broker, prefix, "step", [1, 3, 4])
            status = await h.status()
    assert result.status is bus.TaskStatus.FAILURE
    assert result.error is not None and result.error.message == "boom after 1"
    assert result.labels["failed_task"] == "wf.boom"
    assert runs == [1, 0, 0]
    assert [json.loads(a)["error"]["message"] for a in alerts] == ["boom after 1"]
    assert [s.state for s in status.steps] == ["succeeded", "failed", "skipped", "skipped"]


async def test_cancel_a_workflow_with_100_running_steps(redis_server: RedisServer) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 5.0)
    step, body = broker.find_task("wf.step"), broker.find_task("wf.body")
    assert step is not None and body is not None
    with trio.fail_after(40):
        async with broker, workers(redis_server.url, prefix, 1, vt=5.0, concurrency=100):
            h = await bus.chord([step.s(i, 60) for i in range(100)], body.s()).kiq()
            while sum(await _runs(broker, prefix, "step", list(range(100)))) < 100:  # noqa: ASYNC110 (other processes)
                await trio.sleep(0.05)
            before = await h.status()
            assert await h.cancel()
            result = await h.wait_result(timeout=10)
            status = await h.status()
            steps = await bus.gather(
                *(bus.TaskHandle(s.task_id, broker) for s in status.steps[:100]), timeout=15
            )
            bodies = await broker.client.execute("LLEN", f"{prefix}:bodies")
    assert [s.state for s in before.steps] == ["running"] * 100 + ["pending"]
    assert result.status is bus.TaskStatus.CANCELLED
    assert {r.status for r in steps} == {bus.TaskStatus.CANCELLED}
    assert status.state == "cancelled" and status.steps[100].state == "skipped"
    assert bodies == 0


async def test_a_chord_of_chains_across_two_workers(redis_server: RedisServer) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 2.0)
    step, double, body = (broker.find_task(n) for n in ("wf.step", "wf.double", "wf.body"))
    assert step is not None and double is not None and body is not None
    with trio.fail_after(30):
        async with broker, workers(redis_server.url, prefix, 2):
            wf = bus.chord([bus.chain(step.s(i, 0.01), double.s()) for i in range(20)], body.s())
            h = await wf.kiq()
            result = await h.wait_result(timeout=20)
            bodies = await broker.client.execute("LRANGE", f"{prefix}:bodies", 0, -1)
    assert result.return_value == sum(2 * i for i in range(20))
    assert [json.loads(b) for b in bodies] == [[2 * i for i in range(20)]]


def _count(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_a_10000_step_group_finishes_with_memory_bounded(redis_server: RedisServer) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 10.0)
    step = broker.find_task("wf.step")
    assert step is not None
    n = 10_000
    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 100)
            warm = await bus.group(step.s(i) for i in range(10)).kiq()
            await warm.wait_result(timeout=10)
            results_before = _count(bus.TaskResult)
            h = await bus.group(step.s(i) for i in range(n)).kiq()
            values = (await h.wait_result(timeout=50)).return_value
            results_left = _count(bus.TaskResult) - results_before
            backend = broker.workflows
            assert isinstance(backend, RedisWorkflowBackend)
            key = backend.key(h.workflow_id)
            ttls = [await broker.client.execute("PTTL", k) for k in (key, key + b":done")]
            joins = await broker.client.execute("KEYS", key.decode() + ":j:*")
            running = await backend.running()
            worker.stop()
    assert values == list(range(n))
    # Nothing per step stays in this process: no step's result, only the plan cache
    # (bounded in steps); in Redis the workflow's keys expire with the results' TTL.
    assert results_left < 50, results_left
    assert backend._cached_steps <= 20_000
    assert all(t > 0 for t in ttls) and joins == [] and running == 0


async def test_with_a_secret_plans_and_outcomes_are_signed(redis_server: RedisServer) -> None:
    prefix = _prefix()
    broker = build(redis_server.url, prefix, 2.0, secret=b"s" * 32)
    step, body = broker.find_task("wf.step"), broker.find_task("wf.body")
    assert step is not None and body is not None
    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 8)
            h = await bus.chord([step.s(i) for i in range(5)], body.s()).kiq()
            result = await h.wait_result(timeout=10)
            backend = broker.workflows
            assert isinstance(backend, RedisWorkflowBackend)
            key = backend.key(h.workflow_id)
            signed = await broker.client.execute("HGET", key, "plan")
            # A plan written without the secret is refused, as if there were none.
            await broker.client.execute("HSET", key, "plan", signed.partition(b"\n")[2])
            backend._plans.clear()
            with pytest.raises(bus.ResultNotFound):
                await h.status()
            worker.stop()
    assert result.return_value == 10
    assert signed.startswith(b"v2.")
