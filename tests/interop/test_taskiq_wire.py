"""taskiq and the bus on one taskiq-redis stream, against the real packages: a taskiq
producer's tasks run by ``bus worker``, a bus producer's by ``taskiq worker``; labels,
retries, errors, timeouts and a task name the worker does not know, both ways."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import bus
from bus.interop.taskiq import TaskiqRedisBroker
from tests.interop.conftest import ROOT

pytest.importorskip("taskiq_redis")

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def _lines_until(path: Path, needle: str) -> str:
    """The log's text once it holds ``needle`` (the caller's deadline bounds it)."""
    while True:
        text = await trio.Path(path).read_text(errors="replace")
        if needle in text:
            return text
        await trio.sleep(0.05)


async def _letters(broker: TaskiqRedisBroker, n: int) -> list[dict[str, Any]]:
    """The dead letters once there are ``n`` (the caller's deadline bounds it)."""
    while True:
        letters = await broker.dead_letters()
        if len(letters) >= n:
            return letters
        await trio.sleep(0.05)


async def _stop(proc: trio.Process) -> int:
    """SIGTERM the process group started for ``proc`` and wait for ``proc``."""
    with trio.move_on_after(20):
        os.killpg(proc.pid, signal.SIGTERM)
        return await proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)
    return await proc.wait()


async def test_taskiq_producer_bus_worker(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "bus-worker.log"
    with trio.fail_after(120), log.open("wb") as err:
        worker = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bus", "worker", "tests.interop.bus_app:broker",
             "--log-format", "json"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            done = await trio.run_process(
                [sys.executable, "-W", "error", "-m", "tests.interop.taskiq_app"],
                cwd=ROOT, env=env, capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()[-3000:]
            out: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])

            # taskiq's wait_result read what the bus worker stored, under taskiq's ids.
            assert out["add"]["value"] == 3 and not out["add"]["is_err"]
            assert len(out["add"]["task_id"]) == 32  # uuid4().hex
            labels = out["labels"]["value"]
            assert labels["custom"] == "x" and labels["n"] == 5  # typed again
            assert labels["ratio"] == 0.5 and labels["flag"] is True
            # retry_on_error / max_retries=3: three runs, by the bus's retries.
            assert out["flaky"]["value"] == 3 and not out["flaky"]["is_err"]
            boom = out["boom"]
            assert boom["is_err"] and boom["error"] == "ValueError" and boom["error_is_builtin"]
            assert boom["error_args"] == ["boom 42"]
            timeout = out["timeout"]
            assert timeout["is_err"] and timeout["error"] == "TimeoutError"

            # A task the worker does not know: dead-lettered with a reason, not lost.
            text = await _lines_until(log, "task.dead_lettered")
            assert "interop:nobody" in text
            reader = TaskiqRedisBroker(
                env["BUS_TEST_URL"],
                queue_name=env["TASKIQ_TEST_QUEUE"],
                prefix=env["BUS_TEST_PREFIX"],
            )
            async with reader:
                letters = await reader.dead_letters()
                assert [(x["task_name"], x["task_id"]) for x in letters] == [
                    ("interop:nobody", out["nobody"])
                ]
                assert "unknown task" in letters[0]["reason"]
                # Requeued, it goes back to the stream in taskiq's format.
                report = await reader.requeue_dead()
                assert [r["outcome"] for r in report] == ["requeued"]
        finally:
            code = await _stop(worker)
    assert code == 0, log.read_text()[-3000:]


async def test_bus_producer_taskiq_worker(env: dict[str, str], tmp_path: Path) -> None:
    url, queue = env["BUS_TEST_URL"], env["TASKIQ_TEST_QUEUE"]
    broker = TaskiqRedisBroker(url, queue_name=queue, prefix=env["BUS_TEST_PREFIX"])

    # Declared here for their names and options; taskiq's worker runs them.
    @broker.task(name="interop:add")
    async def add(a: int, b: int) -> int:
        raise AssertionError("run by taskiq")

    @broker.task(name="interop:labels")
    async def labels() -> dict[str, Any]:
        raise AssertionError("run by taskiq")

    @broker.task(name="interop:flaky", retries=2)
    async def flaky() -> int:
        raise AssertionError("run by taskiq")

    @broker.task(name="interop:boom")
    async def boom() -> None:
        raise AssertionError("run by taskiq")

    @broker.task(name="interop:slow", timeout=0.2)
    async def slow(seconds: float) -> str:
        raise AssertionError("run by taskiq")

    @broker.task(name="interop:nobody")
    async def nobody(n: int) -> None:
        raise AssertionError("no worker knows it")

    log = tmp_path / "taskiq-worker.log"
    with trio.fail_after(120), log.open("wb") as err:
        async with broker:
            # The group from the stream's start: what is sent before taskiq's worker
            # is up is not skipped (taskiq-redis creates it at "$").
            await broker.client.execute("XGROUP", "CREATE", queue, "taskiq", "0", "MKSTREAM")
            worker = await trio.lowlevel.open_process(
                [sys.executable, "-m", "taskiq", "worker", "tests.interop.taskiq_app:broker",
                 "--workers", "1"],
                cwd=ROOT, env=env, stdout=err, stderr=err, start_new_session=True,
            )  # fmt: skip
            try:
                r = await (await add.kiq(1, 2)).wait_result(timeout=60)
                assert r.status is bus.TaskStatus.SUCCESS and r.return_value == 3

                h = await labels.kicker().with_labels(custom="x", n=5, on=True).kiq()
                seen = (await h.wait_result(timeout=60)).unwrap()
                assert seen["custom"] == "x" and seen["n"] == 5 and seen["on"] is True

                # retries=2 travels as retry_on_error / max_retries=3: taskiq's retry
                # middleware runs it three times, under the one task id.
                r = await (await flaky.kiq()).wait_result(timeout=60)
                assert r.unwrap() == 3

                r = await (await boom.kiq()).wait_result(timeout=60)
                assert r.status is bus.TaskStatus.FAILURE
                assert r.error == bus.RemoteError("ValueError", "boom 42")

                r = await (await slow.kiq(30)).wait_result(timeout=60)
                assert r.is_err and r.error is not None
                assert r.error.type_name == "TimeoutError"

                # A task taskiq's worker does not know: with dead_letter_unknown_tasks
                # it is dead-lettered with a reason, where the bus keeps its letters.
                h = await nobody.kiq(7)
                letters = await _letters(broker, 1)
                assert [(x["task_name"], x["task_id"]) for x in letters] == [
                    ("interop:nobody", h.task_id)
                ]
                assert "unknown task 'interop:nobody'" in letters[0]["reason"]
                assert "taskiq worker" in letters[0]["reason"]
                # taskiq's worker acknowledges it just after the letter is written.
                while await broker.client.execute("XPENDING", queue, "taskiq", "-", "+", 10):  # noqa: ASYNC110 (another process acks)
                    await trio.sleep(0.05)
                # Requeued, it is a message taskiq reads again (and dead-letters again).
                report = await broker.requeue_dead()
                assert [r["outcome"] for r in report] == ["requeued"]
                again = await _letters(broker, 1)
                assert again[0]["id"] != letters[0]["id"] and again[0]["task_id"] == h.task_id
            finally:
                # taskiq's main process lingers after its worker stopped: stop that
                # worker gracefully, then end the group.
                with trio.move_on_after(20):
                    os.killpg(worker.pid, signal.SIGTERM)
                    await _lines_until(log, "Stopped process worker-0")
                os.killpg(worker.pid, signal.SIGKILL)
                await worker.wait()
