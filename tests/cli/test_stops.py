"""Stops are features: ``bus worker`` stopped by a signal, again and again.

Each stop must exit 0, leave nothing pending in Redis and run nothing twice, whether
the worker was idle, busy, or in the middle of a drain; the same for ``--processes 2``
stopped by a signal to its whole process group. A stop while the worker still
connects ends it at once (exit 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.redis.server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.stop_app:broker"


class Redis:
    """redis-cli against the test server (no event loop in these tests)."""

    def __init__(self, server: RedisServer, prefix: str) -> None:
        self.port = str(server.port)
        self.prefix = prefix

    def __call__(self, *cmd: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", self.port, *cmd], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    def pending(self) -> int:
        reply = self("XPENDING", "{" + self.prefix + ":q}:stream", "workers")
        return int(reply.splitlines()[0] or 0) if reply else 0

    def runs(self, n: int) -> list[int]:
        if n == 0:
            return []
        keys = [f"{self.prefix}:run:{i}" for i in range(n)]
        return [int(v or 0) for v in self("MGET", *keys).splitlines()]

    def count(self, name: str) -> int:
        return int(self("GET", f"{self.prefix}:{name}") or 0)

    def dump(self) -> str:
        """Every key of the queue and what it holds: for a failure's message."""
        out = []
        for key in self("--scan", "--pattern", "{" + self.prefix + ":*").splitlines():
            kind = self("TYPE", key)
            if kind == "stream":
                out.append(f"{key}: {self('XRANGE', key, '-', '+')}")
                out.append(f"  pending: {self('XPENDING', key, 'workers')}")
            elif kind == "zset":
                out.append(f"{key}: {self('ZRANGE', key, '0', '-1', 'WITHSCORES')}")
            else:
                out.append(f"{key}: {kind}")
        return "\n".join(out)


class Proc:
    """A subprocess in a session of its own; its stderr lines are collected."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pred: Callable[[str], bool], count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for line in list(self.lines) if pred(line)) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError("expected output not seen:\n" + "".join(self.lines))

    def finish(self, timeout: float = 40) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _send(env: dict[str, str], n: int, seconds: float, offset: int, task: str = "job") -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.cli.stop_app", str(n), str(seconds), str(offset), task],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _wait(pred: Callable[[], bool], what: Callable[[], str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"condition not reached in {timeout} s: {what()}")


def _diag(r: Redis, attempt: int, mode: str, w: Proc) -> Callable[[], str]:
    return lambda: f"try {attempt} ({mode}): {r.count('started')} started\n" + "".join(w.lines)


def _lost(r: Redis, runs: list[int], history: list[tuple[int, str]], last: list[str]) -> str:
    """What a failure of the final check shows: the tasks never run, the Redis keys, the
    logs of the tries during which they were sent, and the final worker's log."""
    lost = [i for i, n in enumerate(runs) if n != 1]
    out = [f"tasks not run exactly once: {lost}", r.dump()]
    for i in lost:
        tid = r("GET", f"{r.prefix}:tid:{i}")
        out.append(f"task {i}: id {tid}, result {r('GET', f'{r.prefix}:result:{tid}')!r}")
    shown: set[int] = set()
    for k, (first, _) in enumerate(history):
        end = history[k + 1][0] if k + 1 < len(history) else len(runs)
        if any(first <= i < end for i in lost):
            shown.update(range(k, min(k + 3, len(history))))  # sent then, lost then or soon
    out += [history[k][1] for k in sorted(shown)]
    return "\n".join([*out, "final worker:", *last])


def _events(lines: list[str], name: str) -> int:
    n = 0
    for line in lines:
        try:
            if json.loads(line).get("event") == name:
                n += 1
        except ValueError:
            continue
    return n


MODES = ("idle", "busy", "mid-drain")
#: BUS_TEST_STOP_LOG=debug shows every delivery in a failure's logs.
LOG_LEVEL = ("--log-level", os.environ.get("BUS_TEST_STOP_LOG", "info"))


def _stops(
    redis_server: RedisServer, tries: int, worker_args: tuple[str, ...], group_signal: bool
) -> None:
    prefix = f"stop{time.monotonic_ns()}"
    env = {**os.environ, "BUS_TEST_URL": redis_server.url, "BUS_TEST_PREFIX": prefix}
    r = Redis(redis_server, prefix)
    sent = 0
    workers = (
        int(worker_args[worker_args.index("--processes") + 1])
        if "--processes" in worker_args
        else 1
    )
    history: list[tuple[int, str]] = []  # (first task sent after it, its log)
    for attempt in range(tries):
        mode = MODES[attempt % len(MODES)]
        first = sent
        w = Proc(env, "worker", APP, "--log-format", "json", *LOG_LEVEL, *worker_args)
        try:
            w.wait_for(lambda line: "bus worker:" in line, count=workers)
            if mode == "busy":
                # Tasks running when the signal comes: they finish within the drain.
                started = r.count("started")
                _send(env, 4, 0.3, sent)
                sent += 4
                _wait(
                    lambda s=started: r.count("started") >= s + 1,
                    _diag(r, attempt, "busy", w),
                )
            elif mode == "mid-drain":
                # More tasks than runners: some run, some wait in the queue or were
                # read and not started when the signal comes.
                started = r.count("started")
                _send(env, 12, 0.15, sent)
                sent += 12
                _wait(
                    lambda s=started: r.count("started") >= s + 2,
                    _diag(r, attempt, "mid-drain", w),
                )
            if group_signal:
                os.killpg(w.proc.pid, signal.SIGTERM)  # the whole process group
            else:
                w.proc.send_signal(signal.SIGTERM)
            code = w.finish()
        finally:
            w.kill()
        history.append((first, f"try {attempt} ({mode}):\n" + "".join(w.lines)))
        assert code == 0, f"try {attempt} ({mode}) exited {code}:\n{''.join(w.lines)}"
        assert _events(w.lines, "worker.cancelling") == 0, "a stop was taken as two"
        assert _events(w.lines, "worker.draining") == workers, "".join(w.lines)
        assert r.pending() == 0, f"try {attempt} ({mode}) left entries pending:\n" + "".join(
            w.lines
        )
        runs = r.runs(sent)
        assert max(runs, default=0) <= 1, f"try {attempt} ({mode}): a task ran twice: {runs}"
    # Whatever was still queued runs now, each task exactly once.
    final = Proc(env, "worker", APP, "--log-format", "json")
    try:
        final.wait_for(lambda line: "bus worker:" in line)
        _wait(
            lambda: r.runs(sent) == [1] * sent,
            lambda: _lost(r, r.runs(sent), history, final.lines),
            timeout=60,
        )
        final.proc.send_signal(signal.SIGTERM)
        assert final.finish() == 0
    finally:
        final.kill()
    assert r.pending() == 0
    assert r.runs(sent) == [1] * sent


def test_fifty_sigterm_stops_of_a_worker(redis_server: RedisServer) -> None:
    _stops(redis_server, 50, ("--concurrency", "2"), group_signal=False)


def test_fifty_group_stops_of_two_worker_processes(redis_server: RedisServer) -> None:
    _stops(redis_server, 50, ("--concurrency", "2", "--processes", "2"), group_signal=True)


def test_a_stop_while_the_worker_connects_ends_it_at_once() -> None:
    # Nothing listens on port 1: the worker keeps trying to connect. Its first log
    # line comes after the stop requests are watched.
    env = {**os.environ, "BUS_TEST_URL": "redis://127.0.0.1:1", "BUS_TEST_PREFIX": "nowhere"}
    w = Proc(env, "worker", APP, "--log-format", "json")
    try:
        w.wait_for(lambda line: True)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        code = w.finish(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        w.kill()
    assert code == 0, "".join(w.lines)
    assert elapsed < 2, f"exited {elapsed:.2f} s after SIGTERM:\n{''.join(w.lines)}"
