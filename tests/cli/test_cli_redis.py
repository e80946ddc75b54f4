"""The ``bus`` command against a real redis-server, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis.server import RedisServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.redis_app:broker"


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    prefix = f"cli{time.monotonic_ns()}"
    return {**os.environ, "BUS_TEST_URL": redis_server.url, "BUS_TEST_PREFIX": prefix}


def bus(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


class Worker:
    """A ``bus worker`` subprocess. A thread collects its stderr lines, so waiting for
    a line has a deadline instead of blocking on a pipe."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "worker", APP, "--log-format", "json", *args],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda line: "bus worker:" in line or "supervisor" in line)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(
        self, pred: Callable[[str], bool], count: int = 1, timeout: float = 30
    ) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if pred(line)]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"expected output not seen: {''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


def counter(env: dict[str, str], name: str) -> int:
    proc = bus_redis(env, "GET", f"{env['BUS_TEST_PREFIX']}:{name}")
    return int(proc or 0)


def bus_redis(env: dict[str, str], *cmd: str) -> str:
    url = env["BUS_TEST_URL"]
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, *cmd], capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.strip()


def wait_until(pred: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_worker_runs_what_send_wait_sends(env: dict[str, str], workers: list[Worker]) -> None:
    w = Worker(env, "--concurrency", "4")
    workers.append(w)
    assert "tasks=add, flaky, sleep, stubborn" in w.wait_for(lambda line: "bus worker:" in line)[0]
    proc = bus(env, "send", APP, "add", "--args", "[20, 22]", "--wait", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["return_value"] == 42


def test_sigterm_drains_running_tasks_and_exits_0(
    env: dict[str, str], workers: list[Worker]
) -> None:
    w = Worker(env, "--concurrency", "4", "--shutdown-timeout", "20")
    workers.append(w)
    for _ in range(3):
        assert bus(env, "send", APP, "sleep", "--args", "[1.0]").returncode == 0
    wait_until(lambda: counter(env, "started") == 3)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    assert counter(env, "finished") == 3


def test_second_sigint_exits_promptly_and_another_worker_finishes(
    env: dict[str, str], workers: list[Worker]
) -> None:
    env = {**env, "BUS_TEST_VT": "1"}
    first = Worker(env, "--concurrency", "4", "--shutdown-timeout", "60")
    workers.append(first)
    for _ in range(2):
        assert bus(env, "send", APP, "sleep", "--args", "[3.0]").returncode == 0
    wait_until(lambda: counter(env, "started") == 2)
    first.proc.send_signal(signal.SIGINT)
    first.wait_for(lambda line: "worker.draining" in line)  # the first one is handled
    first.proc.send_signal(signal.SIGINT)
    first.proc.wait(10)
    # Promptly: it did not wait for its running tasks (a drain would have let them
    # finish, 3 s after they started).
    assert counter(env, "finished") == 0
    second = Worker(env, "--concurrency", "4")
    workers.append(second)
    wait_until(lambda: counter(env, "finished") == 2, timeout=30)


def test_processes_restarts_a_killed_child(env: dict[str, str], workers: list[Worker]) -> None:
    sup = Worker(env, "--processes", "2", "--concurrency", "2")
    workers.append(sup)

    def started(line: str) -> bool:
        return "supervisor.started" in line

    pids = [json.loads(line)["pid"] for line in sup.wait_for(started, count=2)]
    sup.wait_for(lambda line: "bus worker:" in line, count=2)
    os.kill(pids[0], signal.SIGKILL)
    lines = sup.wait_for(started, count=3)
    new_pid = json.loads(lines[2])["pid"]
    assert new_pid not in pids
    sup.wait_for(lambda line: "bus worker:" in line, count=3)
    proc = bus(env, "send", APP, "add", "--args", "[1, 2]", "--wait", "--timeout", "20")
    assert json.loads(proc.stdout)["return_value"] == 3
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(30) == 0


def test_inspect_and_dead_letters(env: dict[str, str]) -> None:
    prefix = env["BUS_TEST_PREFIX"]
    for i in range(3):
        assert bus(env, "send", APP, "add", "--args", f"[{i}, 1]").returncode == 0
    # A delayed task, straight into the sorted set (the CLI has no --delay), and two
    # hostile entries in the dead-letter stream's place: let a worker reject them.
    bus_redis(env, "ZADD", f"{{{prefix}:q}}:delayed", str(int(time.time() * 1000) + 3_600_000), "x")
    proc = bus(env, "inspect", APP, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["queued"] == 3
    assert info["delayed"] == 1
    assert info["dead_letters"] == 0
    bus_redis(env, "XADD", f"{{{prefix}:q}}:stream", "*", "d", "garbage")
    worker = subprocess.Popen(
        [sys.executable, "-m", "bus", "worker", APP, "--log-format", "json"],
        cwd=ROOT, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: json.loads(bus(env, "inspect", APP, "--json").stdout)["queued"] == 0)
        info = json.loads(bus(env, "inspect", APP, "--json").stdout)
        assert info["dead_letters"] == 1
        assert info["live_workers"] == 1
        table = bus(env, "inspect", APP)
        assert "dead_letters" in table.stdout and "queued" in table.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    listed = bus(env, "dead", APP, "list", "--json")
    letters = json.loads(listed.stdout)
    assert len(letters) == 1 and "undecodable" in letters[0]["reason"]
    assert "undecodable" in bus(env, "dead", APP, "list").stdout
    # An undecodable letter cannot run: requeue skips it, saying why, and keeps it.
    requeued = bus(env, "dead", APP, "requeue").stdout
    assert "skipped: undecodable, it cannot run" in requeued and "requeued 0" in requeued
    info = json.loads(bus(env, "inspect", APP, "--json").stdout)
    assert info["queued"] == 0 and info["dead_letters"] == 1
    bus_redis(env, "XADD", f"{{{prefix}:q}}:dead", "*", "reason", "test", "data", "x")
    assert "purged 2" in bus(env, "dead", APP, "purge").stdout
