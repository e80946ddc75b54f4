"""Periodic tasks and unique jobs across real processes (issue: fire exactly once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_stops import Proc, Redis, _wait
from tests.redis.server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.sched_app:broker"


def _env(server: RedisServer) -> dict[str, str]:
    prefix = f"sch{time.monotonic_ns()}"
    return {**os.environ, "BUS_TEST_URL": server.url, "BUS_TEST_PREFIX": prefix}


def _app(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cli.sched_app", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _bus(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_three_schedulers_fire_each_tick_once_even_when_one_is_killed(
    redis_server: RedisServer,
) -> None:
    env = _env(redis_server)
    r = Redis(redis_server, env["BUS_TEST_PREFIX"])

    def beats() -> list[float]:
        return [float(b) for b in r("LRANGE", f"{env['BUS_TEST_PREFIX']}:beats", "0", "-1").split()]

    workers = [Proc(env, "worker", APP, "--log-format", "json") for _ in range(3)]
    try:
        for w in workers:
            w.wait_for(lambda line: "bus worker:" in line)
        # Counted ticks, not slept seconds: a few fire, a scheduler dies, more fire.
        _wait(lambda: len(beats()) >= 4, lambda: f"beats: {beats()}", timeout=30)
        os.killpg(workers[0].proc.pid, signal.SIGKILL)  # a scheduler dies midway
        workers[0].finish()
        at_kill = len(beats())
        _wait(lambda: len(beats()) >= at_kill + 5, lambda: f"beats: {beats()}", timeout=30)
        for w in workers[1:]:
            w.proc.send_signal(signal.SIGTERM)
            assert w.finish() == 0
    finally:
        for w in workers:
            w.kill()
    fired = beats()
    print(f"{len(fired)} beats, {at_kill} before the kill")
    assert len(fired) == len(set(fired)), "a tick fired twice"
    assert all(b == int(b) for b in fired)  # on the 1 s grid
    ticks = sorted(fired)
    missing = sorted(set(range(int(ticks[0]), int(ticks[-1]) + 1)) - set(ticks))
    assert not missing, f"ticks lost: {missing}"  # none lost, across the kill too


def test_a_schedule_added_at_run_time_from_a_producer_fires_on_the_workers(
    redis_server: RedisServer,
) -> None:
    env = _env(redis_server)
    r = Redis(redis_server, env["BUS_TEST_PREFIX"])
    workers = [Proc(env, "worker", APP, "--log-format", "json") for _ in range(2)]
    try:
        for w in workers:
            w.wait_for(lambda line: "bus worker:" in line)
        added = _app(env, "schedule", "nightly", "0.5")
        assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            records = r("LRANGE", f"{env['BUS_TEST_PREFIX']}:records", "0", "-1").split()
            if len(records) >= 4:
                break
            time.sleep(0.1)
        listed = json.loads(_bus(env, "schedules", APP, "list", "--json").stdout)
        text = _bus(env, "schedules", APP, "list").stdout
        for w in workers:
            w.proc.send_signal(signal.SIGTERM)
            assert w.finish() == 0
    finally:
        for w in workers:
            w.kill()
    assert len(records) >= 4 and len(set(records)) == len(records)
    assert all(rec.startswith("nightly@") for rec in records)
    by_name = {s["name"]: s for s in listed}
    assert by_name["nightly"]["source"] == "runtime" and by_name["nightly"]["fires"] >= 4
    assert by_name["beat"]["source"] == "task"
    assert "nightly  task=record  every 0.5s  (runtime)" in text
    assert "next=" in text and "misses=0" in text


def test_a_hundred_sends_of_a_unique_job_from_four_processes_run_it_once(
    redis_server: RedisServer,
) -> None:
    env = _env(redis_server)
    r = Redis(redis_server, env["BUS_TEST_PREFIX"])
    worker = Proc(env, "worker", APP, "--log-format", "json", "--no-scheduler")
    try:
        worker.wait_for(lambda line: "bus worker:" in line)
        senders = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.cli.sched_app", "unique", "25"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        _wait(lambda: r.count("sent") == 100, lambda: f"{r.count('sent')} sent", timeout=60)
        assert r.count("builds") == 1  # all sent while the one run still runs
        r("SET", f"{env['BUS_TEST_PREFIX']}:go", "1")
        outputs = []
        for p in senders:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outputs.extend(json.loads(out))
        assert len(outputs) == 100
        assert len({tid for tid, _ in outputs}) == 1  # one job: every handle on it
        assert {result for _, result in outputs} == {"built 1.0"}
        assert r.count("builds") == 1
        # Its result is stored: the key is free, and the job runs again.
        r("SET", f"{env['BUS_TEST_PREFIX']}:go", "1")  # the next run may finish at once
        again = _app(env, "unique", "3")
        assert again.returncode == 0, again.stderr
        ids = {tid for tid, _ in json.loads(again.stdout)}
        assert len(ids) == 1 and ids != {outputs[0][0]}
        assert r.count("builds") == 2
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.finish() == 0
    finally:
        worker.kill()
