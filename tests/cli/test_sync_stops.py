"""Stops are bounded with sync tasks too: ``bus worker`` processes stopped by SIGTERM
while a ``def`` task sleeps in its thread.

The first SIGTERM drains: a sync task still running at ``--shutdown-timeout`` is
abandoned in its thread and handed back at the deadline, so the process exits 0 within
the deadline plus about a second; a task that finished within it is not run again. A
second SIGTERM ends the process at once with 143 (``forced_exit_code``), and a
``--processes`` supervisor with its children likewise. The next worker runs what was
handed back.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from bus._cli import SIGNAL_DEBOUNCE, forced_exit_code
from tests.cli.test_stops import APP, LOG_LEVEL, Proc, Redis, _events, _send, _wait
from tests.redis.server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: How long after the deadline (or a second SIGTERM) a worker may take to exit: the
#: hand-back, the last acks, the interpreter's exit, on a busy machine.
SLACK = 1.5


def _env(redis_server: RedisServer) -> tuple[dict[str, str], Redis]:
    prefix = f"sync{time.monotonic_ns()}"
    env = {**os.environ, "BUS_TEST_URL": redis_server.url, "BUS_TEST_PREFIX": prefix}
    return env, Redis(redis_server, prefix)


def _worker(env: dict[str, str], *args: str) -> Proc:
    w = Proc(env, "worker", APP, "--log-format", "json", *LOG_LEVEL, *args)
    w.wait_for(lambda line: "bus worker:" in line)
    return w


def _runs_again(env: dict[str, str], r: Redis, *ids: int) -> None:
    """The next worker takes the tasks ``ids`` over (quick: a task sleeps in its first
    run only); it exits 0 on SIGTERM with nothing pending."""
    w = _worker(env, "--concurrency", "2")
    try:
        _wait(
            lambda: all(r.count(f"done:{i}") == 1 for i in ids),
            lambda: r.dump() + "".join(w.lines),
        )
        w.proc.send_signal(signal.SIGTERM)
        assert w.finish() == 0, "".join(w.lines)
    finally:
        w.kill()


def test_a_stop_abandons_a_sync_task_at_the_deadline_and_hands_it_back(
    redis_server: RedisServer,
) -> None:
    env, r = _env(redis_server)
    w = _worker(env, "--concurrency", "2", "--shutdown-timeout", "1")
    try:
        _send(env, 1, 60, 0, "sync_job")  # still running at the deadline
        _send(env, 1, 0.3, 1, "sync_job")  # finishes within it
        _wait(lambda: r.count("started") == 2, lambda: "".join(w.lines))
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        code = w.finish(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        w.kill()
    log = "".join(w.lines)
    assert code == 0, log
    assert elapsed < 1 + SLACK, f"exited {elapsed:.2f} s after SIGTERM:\n{log}"
    assert _events(w.lines, "task.interrupted") == 1, log
    assert r.pending() == 0, log
    assert r.runs(2) == [1, 1] and r.count("done:1") == 1  # the short one finished
    assert r.count("done:0") == 0  # the long one was abandoned, unfinished
    _runs_again(env, r, 0)
    assert r.runs(2) == [2, 1], r.dump()  # handed back once, the finished one not re-run
    assert r.pending() == 0


def test_a_second_sigterm_ends_the_worker_at_once(redis_server: RedisServer) -> None:
    env, r = _env(redis_server)
    w = _worker(env, "--concurrency", "1", "--shutdown-timeout", "60")
    try:
        _send(env, 1, 60, 0, "sync_job")
        _wait(lambda: r.count("started") == 1, lambda: "".join(w.lines))
        first = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        w.wait_for(lambda line: "worker.draining" in line)
        # Two SIGTERMs closer than SIGNAL_DEBOUNCE are one request.
        time.sleep(max(0.0, first + SIGNAL_DEBOUNCE + 0.1 - time.monotonic()))
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        code = w.finish(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        w.kill()
    log = "".join(w.lines)
    assert code == forced_exit_code(signal.SIGTERM) == 143, log
    assert elapsed < SLACK, f"exited {elapsed:.2f} s after the second SIGTERM:\n{log}"
    assert _events(w.lines, "worker.cancelling") == 1, log
    assert r.count("done:0") == 0
    _runs_again(env, r, 0)
    assert r.runs(1) == [2], r.dump()
    assert r.pending() == 0


def test_a_second_sigterm_ends_a_supervisor_and_its_children_at_once(
    redis_server: RedisServer,
) -> None:
    env, r = _env(redis_server)
    sup = Proc(
        env, "worker", APP, "--log-format", "json", *LOG_LEVEL,
        "--processes", "2", "--concurrency", "1", "--shutdown-timeout", "60",
    )  # fmt: skip
    try:
        sup.wait_for(lambda line: "bus worker:" in line, count=2)
        _send(env, 2, 60, 0, "sync_job")  # one in each child
        _wait(lambda: r.count("started") == 2, lambda: "".join(sup.lines))
        first = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        sup.wait_for(lambda line: "worker.draining" in line, count=2)
        time.sleep(max(0.0, first + SIGNAL_DEBOUNCE + 0.1 - time.monotonic()))
        t0 = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        code = sup.finish(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        sup.kill()
    log = "".join(sup.lines)
    assert code == 143, log
    assert elapsed < SLACK, f"exited {elapsed:.2f} s after the second SIGTERM:\n{log}"
    assert _events(sup.lines, "worker.cancelling") == 2, log
    assert _events(sup.lines, "supervisor.killing") == 0, log
    assert r.pending() == 0, log
    _runs_again(env, r, 0, 1)
    assert r.runs(2) == [2, 2], r.dump()
