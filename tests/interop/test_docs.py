"""Every python block of docs/taskiq.md runs, each as the program it is: the bus worker
module under ``bus worker``, the taskiq producer against it, the taskiq worker module
under ``taskiq worker``, the bus producer against that (tests/docs_pages.py's RUN_BY
sends taskiq.md here)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import trio

from bus.interop.taskiq import TaskiqRedisBroker
from tests.docs_pages import ROOT, blocks
from tests.redis.server import RedisServer

pytest.importorskip("taskiq_redis")

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PAGE = "taskiq.md"
BUS_TASKS, TASKIQ_PRODUCER, BUS_PRODUCER, TASKIQ_TASKS = range(4)


@pytest.fixture
def setup(redis_server: RedisServer, tmp_path: Path) -> tuple[dict[str, str], list[str], str]:
    """The environment, the page's blocks on this test's server and stream, the stream."""
    queue = f"docs{time.monotonic_ns()}"
    code = [
        c.replace("redis://127.0.0.1:6379", redis_server.url).replace(
            'queue_name="taskiq"', f'queue_name="{queue}"'
        )
        for _, c in blocks(PAGE)
    ]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    return env, code, queue


def test_the_page_has_its_four_programs() -> None:
    assert len(blocks(PAGE)) == 4
    assert not any(is_test for is_test, _ in blocks(PAGE))


async def _logged(log: Path, needle: str) -> None:
    while True:
        if needle in await trio.Path(log).read_text(errors="replace"):
            return
        await trio.sleep(0.05)


async def _kill_group(proc: trio.Process, log: Path, done: str) -> None:
    """taskiq's main process lingers after its worker stopped: stop the worker
    gracefully, then end the group."""
    with trio.move_on_after(20):
        os.killpg(proc.pid, signal.SIGTERM)
        await _logged(log, done)
    os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def test_taskiq_producer_and_bus_worker(
    setup: tuple[dict[str, str], list[str], str], tmp_path: Path
) -> None:
    env, code, _ = setup
    (tmp_path / "tasks.py").write_text(code[BUS_TASKS])
    (tmp_path / "producer.py").write_text(code[TASKIQ_PRODUCER])
    log = tmp_path / "worker.log"
    with trio.fail_after(60), log.open("wb") as err:
        worker = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bus", "worker", "tasks:broker"],
            cwd=tmp_path, env=env, stdout=err, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            done = await trio.run_process(
                [sys.executable, "-W", "error", "producer.py"],
                cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            code_ = await worker.wait()
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().splitlines()[-1] == "charged 1999 for order 42 (attempt 1)"
    assert code_ == 0, log.read_text()[-3000:]


async def test_bus_producer_and_taskiq_worker(
    setup: tuple[dict[str, str], list[str], str], redis_server: RedisServer, tmp_path: Path
) -> None:
    env, code, queue = setup
    (tmp_path / "taskiq_tasks.py").write_text(code[TASKIQ_TASKS])
    (tmp_path / "producer.py").write_text(code[BUS_PRODUCER])
    log = tmp_path / "taskiq.log"
    with trio.fail_after(60), log.open("wb") as err:
        # The group from the stream's start, as the page says (taskiq creates it at $).
        async with TaskiqRedisBroker(redis_server.url, queue_name=queue) as b:
            await b.client.execute("XGROUP", "CREATE", queue, "taskiq", "0", "MKSTREAM")
        worker = await trio.lowlevel.open_process(
            [sys.executable, "-m", "taskiq", "worker", "taskiq_tasks:broker", "--workers", "1"],
            cwd=tmp_path, env=env, stdout=err, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            done = await trio.run_process(
                [sys.executable, "-W", "error", "producer.py"],
                cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        finally:
            await _kill_group(worker, log, "Stopped process worker-0")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().splitlines()[-1] == "report for 2024-06-01"
