"""examples/redis_worker.py and examples/redis_producer.py run against the test server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import bus
from bus.redis import RedisBroker, RedisResultBackend
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


async def _worker_example(env: dict[str, str]) -> tuple[trio.Process, list[bytes]]:
    """The example worker, started, with its stderr collected as it comes (the caller
    runs :func:`_collect`)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / "redis_worker.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, []


async def _collect(proc: trio.Process, out: list[bytes], started: trio.Event | None = None) -> None:
    """Keep the process's stderr in ``out``; set ``started`` at its start-up line."""
    assert proc.stderr is not None
    async for chunk in proc.stderr:
        out.append(chunk)
        if started is not None and b"bus worker:" in b"".join(out):
            started.set()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_the_example_worker_drains_on_a_signal(
    redis_server: RedisServer, signum: int
) -> None:
    """Ctrl-C or SIGTERM: exit 0, no traceback, the running task finished or handed
    back (a task left to its 30 s visibility timeout would miss the deadline)."""
    env = dict(os.environ)
    queue = f"ex{bus.TaskID.new()[-12:]}"
    env.update(BUS_REDIS_URL=redis_server.url, BUS_REDIS_QUEUE=queue)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import redis_worker
    finally:
        sys.path.remove(str(EXAMPLES))
    producer = RedisBroker(redis_server.url, queue=queue).with_result_backend(
        RedisResultBackend(redis_server.url)
    )
    producer.register_task(redis_worker.pause.func, name="examples.pause")
    pause = producer.find_task("examples.pause")
    assert pause is not None
    with trio.fail_after(20):
        async with producer, trio.open_nursery() as nursery:
            proc, err = await _worker_example(env)
            nursery.start_soon(_collect, proc, err)
            handle = await pause.kiq(0.5)
            for _ in range(10_000):  # until it runs (the deadline above bounds it)
                if await handle.get_progress() is not None:
                    break
                await trio.sleep(0.01)
            proc.send_signal(signum)
            assert await proc.wait() == 0, b"".join(err).decode()
            text = b"".join(err).decode()
            assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
            # Finished in the drain, or handed back: a second worker gets it at once.
            again, err2 = await _worker_example(env)
            started = trio.Event()
            nursery.start_soon(_collect, again, err2, started)
            result = await handle.wait_result()
            assert result.return_value == 0.5
            await started.wait()  # its signals drain from now on
            again.send_signal(signal.SIGTERM)
            assert await again.wait() == 0
