"""examples/redis_worker.py and examples/redis_producer.py run against the test server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import bus
from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_redis_examples(redis_server: RedisServer) -> None:
    env = dict(os.environ)
    env.update(
        BUS_REDIS_URL=redis_server.url,
        BUS_REDIS_QUEUE=f"ex{bus.TaskID.new()[-12:]}",
        PYTHONPATH=str(EXAMPLES.parent),
    )
    with trio.fail_after(30):
        worker = await trio.lowlevel.open_process(
            [sys.executable, str(EXAMPLES / "redis_worker.py")],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            done = await trio.run_process(
                [sys.executable, str(EXAMPLES / "redis_producer.py")],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
            )
        finally:
            worker.terminate()
            await worker.wait()
    # structlog prints its default output to stdout too: keep the result lines.
    lines = [x for x in done.stdout.decode().splitlines() if x.startswith("success")]
    assert lines == [
        "success: 0",
        "success: 11",
        "success: 22",
        "success: report for 2024-06-01 (attempt 1)",
    ]
    assert done.returncode == 0
