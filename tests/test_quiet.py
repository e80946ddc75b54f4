"""The library is quiet: a program that embeds the bus prints only its own output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis.server import RedisServer

ROOT = Path(__file__).resolve().parents[1]

EMBEDDED = """
import sys
import trio
import bus

broker = bus.InMemoryBroker()

@broker.task
async def add(a: int, b: int) -> int:
    return a + b

@broker.task
async def boom() -> None:
    raise ValueError("no")

async def main() -> None:
    async with broker:
        print((await (await add.kiq(1, 2)).wait_result(timeout=5)).return_value)
        print((await (await boom.kiq()).wait_result(timeout=5)).status.value)

trio.run(main)
"""

PRODUCER = """
import sys
import trio
from bus.redis import RedisBroker

broker = RedisBroker(sys.argv[1], queue="quiet")

@broker.task(name="add")  # unnamed, it would be __main__:add (a warning says so)
async def add(a: int, b: int) -> int:
    return a + b

async def main() -> None:
    async with broker:
        handle = await add.kiq(1, 2)
        print("sent")

trio.run(main)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_an_embedding_program_prints_only_its_own_output() -> None:
    proc = _run(EMBEDDED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3\nfailure\n"
    # The failure is a warning: it goes to stderr, one line each, no colour codes.
    assert "task.failed" in proc.stderr
    assert "\x1b[" not in proc.stderr
    assert "worker.started" not in proc.stderr  # info and debug stay silent


@pytest.mark.redis
def test_a_redis_producer_prints_only_its_own_output(redis_server: RedisServer) -> None:
    proc = _run(PRODUCER, redis_server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "sent\n"
    assert proc.stderr == ""


def test_configured_structlog_gets_the_bus_events_with_their_keys() -> None:
    code = (
        "import structlog\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])\n" + EMBEDDED
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    events = [__import__("json").loads(line) for line in lines]
    failed = [e for e in events if e["event"] == "task.failed"]
    assert failed and failed[0]["task_name"].endswith(":boom") and "task_id" in failed[0]
    assert failed[0]["actor"] == "worker"


QUIET_RUN = """
import sys
import trio
import bus

class Failing(bus.Middleware):
    def post_send(self, message):
        raise RuntimeError("a middleware's own bug")

broker = bus.InMemoryBroker().with_middlewares(Failing())

@broker.task(name="add")
async def add(a: int, b: int) -> int:
    return a + b

async def main() -> None:
    async with broker:
        print((await (await add.kiq(1, 2)).wait_result(timeout=5)).return_value)

trio.run(main)
print("structlog" in sys.modules)
"""


def test_a_failing_middleware_is_reported_on_stderr_not_stdout() -> None:
    proc = _run(QUIET_RUN)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3\nTrue\n"  # (the warning imported structlog, to write it)
    assert "middleware.failed" in proc.stderr and "a middleware's own bug" in proc.stderr


def test_structlog_is_not_imported_until_an_event_needs_it() -> None:
    # Nothing to report, no structlog configured: a process that logs another way
    # does not pay for importing structlog (and rich, when installed).
    proc = _run(QUIET_RUN.replace("with_middlewares(Failing())", "with_middlewares()"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3\nFalse\n"
    assert proc.stderr == ""
