"""``bus workflows MODULE:BROKER show ID``: the tree with each step's state, and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import bus
from tests.redis.server import RedisServer
from tests.workflows.wf_app import build

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]


async def _bus(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "BUS_TEST_URL": url, "BUS_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    return await trio.run_process(
        [sys.executable, "-m", "bus", "workflows", "tests.workflows.wf_app:broker", *args],
        env=env,
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_show_prints_the_tree_and_json(redis_server: RedisServer) -> None:
    prefix = f"w{bus.TaskID.new()[-12:]}"
    broker = build(redis_server.url, prefix, 2.0)
    step, boom = broker.find_task("wf.step"), broker.find_task("wf.boom")
    assert step is not None and boom is not None
    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 4)
            h = await bus.chain(bus.group(step.s(1), step.s(2)), boom.s(), step.si(3)).kiq()
            await h.wait_result(timeout=10)
            worker.stop()
        wid = str(h.workflow_id)
        text = await _bus(redis_server.url, prefix, "show", wid)
        as_json = await _bus(redis_server.url, prefix, "show", wid, "--json")
        missing = await _bus(redis_server.url, prefix, "show", str(bus.TaskID.new()))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert lines[0] == f"workflow {wid}  failed"
    tree = []
    for line in lines[1:]:
        branch, sep, rest = line.partition("── ")
        tree.append([branch + sep, *rest.split("  ")[:2]])
    assert tree == [
        ["└── ", "chain"],
        ["    ├── ", "group"],
        ["    │   ├── ", "wf.step", "succeeded"],
        ["    │   └── ", "wf.step", "succeeded"],
        ["    ├── ", "wf.boom", "failed"],
        ["    └── ", "wf.step", "skipped"],
    ]
    doc = json.loads(as_json.stdout)
    assert doc["state"] == "failed" and doc["failed_step"] == 2
    assert [s["state"] for s in doc["steps"]] == ["succeeded", "succeeded", "failed", "skipped"]
    assert missing.returncode == 1 and b"ResultNotFound" in missing.stderr
