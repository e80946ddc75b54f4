"""The python blocks of docs/redis.md compile, and the one full program runs; the
pages of docs/quickstart.md run, "Redis in five minutes" against a test server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.docs_pages import DOCS, ROOT, blocks
from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_blocks_compile() -> None:
    blocks = _blocks()
    assert blocks
    for b in blocks:
        compile(b, str(DOC), "exec")


async def test_first_block_runs(redis_server: RedisServer) -> None:
    code = _blocks()[0].replace("redis://127.0.0.1:6379", redis_server.url)
    code = code.replace('queue="emails"', 'queue="docs-emails"')
    ns: dict[str, Any] = {"__name__": "docs_redis"}
    exec(compile(code, str(DOC), "exec"), ns)
    broker = ns["broker"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, broker:
            w = await nursery.start(broker.run_worker, 2)
            handle = await ns["send_email"].kiq("ada@example.com")
            assert (await handle.wait_result(timeout=5)).return_value == "sent to ada@example.com"
            w.stop()


# ------------------------------------------------------------ docs/quickstart.md

QUICKSTART = "quickstart.md"


def _quickstart_files() -> dict[str, str]:
    """The quickstart's blocks that are files of their own (first line ``# NAME.py``)."""
    out = {}
    for _, code in blocks(QUICKSTART):
        first = code.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            out[first[2:]] = code
    return out


def test_quickstart_in_memory_block_runs() -> None:
    (program, *_rest) = [code for _, code in blocks(QUICKSTART)]
    assert "InMemoryBroker" in program
    exec(compile(program, f"{DOCS / QUICKSTART}:block0", "exec"), {"__name__": "__docs__"})


async def _lines_until(stream: Any, needle: bytes, seen: list[bytes]) -> None:
    async for chunk in stream:
        seen.append(chunk)
        if needle in b"".join(seen):
            return


async def test_quickstart_redis_in_five_minutes(redis_server: RedisServer, tmp_path: Path) -> None:
    files = _quickstart_files()
    assert sorted(files) == ["producer.py", "tasks.py", "worker.py"]
    queue = f"qs{time.monotonic_ns()}"
    for name, code in files.items():
        code = code.replace("redis://127.0.0.1:6379", redis_server.url)
        (tmp_path / name).write_text(code.replace('queue="quickstart"', f'queue="{queue}"'))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    text = (DOCS / QUICKSTART).read_text()
    shown = text.split("$ python producer.py\n", 1)[1].split("```", 1)[0].splitlines()
    assert "bus worker tasks:broker" in text
    # Each documented way of running the worker: `bus worker`, stopped by Ctrl-C;
    # worker.py, stopped by SIGTERM. Both drain and exit 0.
    commands = [
        ([sys.executable, "-m", "bus", "worker", "tasks:broker"], signal.SIGINT),
        ([sys.executable, "worker.py"], signal.SIGTERM),
    ]
    for command, signum in commands:
        with trio.fail_after(60):
            worker = await trio.lowlevel.open_process(
                command, cwd=tmp_path, env=env, stderr=subprocess.PIPE
            )
            seen: list[bytes] = []
            try:
                await _lines_until(worker.stderr, b"bus worker:", seen)
                done = await trio.run_process(
                    [sys.executable, "producer.py"], cwd=tmp_path, env=env,
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr.decode()
                assert done.stdout.decode().splitlines() == shown
                worker.send_signal(signum)
                assert await worker.wait() == 0
            finally:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
