"""The ``bus`` command as operators use it (issue: operators can trust it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus._ids import TaskID
from tests.cli.test_cli_redis import APP, Worker, bus, bus_redis, wait_until
from tests.redis.server import RedisServer, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MEMORY = "tests.cli.memory_app:broker"


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    prefix = f"ops{time.monotonic_ns()}"
    return {**os.environ, "BUS_TEST_URL": redis_server.url, "BUS_TEST_PREFIX": prefix}


def _dead_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "BUS_TEST_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens


def test_version() -> None:
    import bus as bus_module

    proc = bus({}, "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"bus {bus_module.__version__}"


def test_start_up_line_names_url_and_queue_without_password(env: dict[str, str]) -> None:
    from bus.redis import RedisBroker

    secret = RedisBroker("redis://:s3cret@example.org:6380/2", queue="emails")
    assert "s3cret" not in repr(secret) and "s3cret" not in str(secret.describe())
    assert secret.describe() == {"url": "redis://:***@example.org:6380/2", "queue": "emails"}
    # Every timeout it could wait out is a minute long (the shutdown timeout, the
    # visibility timeout): exiting within the half-minute deadline proves it waited
    # for none of them, whatever the machine's speed.
    w = Worker({**env, "BUS_TEST_VT": "60"}, "--concurrency", "2", "--shutdown-timeout", "60")
    try:
        line = w.wait_for(lambda s: "bus worker:" in s)[0]
        assert f"url={env['BUS_TEST_URL']}" in line and "queue=q" in line
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0, "the process lingered after the drain"
    finally:
        w.stop()


def test_send_timeout_bounds_the_wait_for_an_unreachable_server(env: dict[str, str]) -> None:
    # The bound is the one given (the default send timeout is 10 s), and the command
    # ends: run() has a deadline of its own.
    proc = bus(_dead_env(env), "send", APP, "add", "--args", "[1, 2]", "--timeout", "1")
    assert proc.returncode == 1
    assert "within 1" in proc.stderr and "Traceback" not in proc.stderr


def test_connect_timeout_fails_a_worker_that_cannot_reach_redis(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bus", "worker", APP, "--connect-timeout", "1"],
        cwd=ROOT, env=_dead_env(env), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "within 1 s" in proc.stderr  # the bound given, not the default (10 s)
    assert "unavailable" in proc.stderr and "127.0.0.1:" in proc.stderr  # names the URL
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bus: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_redis_extra_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['hiredis'] = None; from bus._cli import main; "
        f"sys.exit(main(['send', {APP!r}, 'add']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "pip install 'trio-bus[redis]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", MEMORY, "ad"], "did you mean 'add'?"),
        (["send", MEMORY, "add", "--args", "[1]"], "missing a required argument: 'b'"),
        (
            ["send", MEMORY, "add", "--args", "[1, 2]", "--kwargs", '{"c": 1}'],
            "unexpected keyword argument 'c'",
        ),
    ],
)
def test_send_refuses_with_a_useful_line(args: list[str], message: str) -> None:
    proc = bus({**os.environ}, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_exit_codes_are_those_the_docs_give() -> None:
    env = {**os.environ}
    slow = bus(env, "send", MEMORY, "slow", "--args", "[30]", "--wait", "--timeout", "0.5")
    assert slow.returncode == 1, slow.stderr  # --timeout passed first
    assert bus(env, "send", MEMORY, "fail", "--wait").returncode == 1  # the task failed
    assert bus(env, "send", MEMORY, "add", "--args", "[1, 2]", "--wait").returncode == 0
    assert bus(env, "send", MEMORY, "nope").returncode == 2  # bad input
    docs = (ROOT / "docs" / "cli.md").read_text()
    assert "0 when the task succeeded, 1 when it failed" in docs


def test_console_logs_have_no_colour_codes_off_a_terminal(
    env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "worker", APP, "--log-format", "console"],
            cwd=ROOT, env=env, stderr=err, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: "bus worker:" in log.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    text = log.read_text()
    assert "worker.draining" in text
    assert "\x1b[" not in text


def test_processes_children_run_without_processes_and_lines_stay_whole(
    env: dict[str, str],
) -> None:
    sup = Worker(env, "--processes", "2", "--concurrency", "2")
    try:
        sup.wait_for(lambda s: "bus worker:" in s, count=2)
        pids = [
            json.loads(line)["pid"]
            for line in sup.wait_for(lambda s: "supervisor.started" in s, count=2)
        ]
        for pid in pids:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--processes" not in argv, argv
            assert os.getsid(pid) == pid  # a session of its own
        for _ in range(20):  # log lines from both children, interleaved in time
            assert (
                bus(env, "send", APP, "flaky", "--args", json.dumps(["x" * 2000])).returncode == 0
            )
        sup.wait_for(lambda s: "task.failed" in s, count=20)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(30) == 0
    finally:
        sup.stop()
    for line in sup.lines:
        json.loads(line)  # every line is one whole JSON object, the start-up lines too


def test_processes_kill_children_that_outlive_the_shutdown_timeout(env: dict[str, str]) -> None:
    sup = Worker(
        env, "--processes", "2", "--concurrency", "1", "--shutdown-timeout", "0.5",
        "--kill-grace", "0.5",
    )  # fmt: skip
    try:
        sup.wait_for(lambda s: "bus worker:" in s, count=2)
        # Ten minutes of uninterruptible work each: only a kill ends them before the
        # deadline below.
        for _ in range(2):
            assert bus(env, "send", APP, "stubborn", "--args", "[600]").returncode == 0
        wait_until(
            lambda: (
                int(
                    bus_redis(
                        env, "XPENDING", f"{{{env['BUS_TEST_PREFIX']}:q}}:stream", "workers"
                    ).splitlines()[0]
                    or 0
                )
                == 2
            )
        )
        sup.proc.send_signal(signal.SIGTERM)
        code = sup.proc.wait(30)
        assert code == 1  # not a clean stop: children had to be killed
        sup.wait_for(lambda s: "supervisor.killing" in s, count=2)
    finally:
        sup.stop()


def test_inspect_text_is_a_table_without_python_reprs(env: dict[str, str]) -> None:
    w = Worker(env, "--concurrency", "2")
    try:
        wait_until(
            lambda: json.loads(bus(env, "inspect", APP, "--json").stdout)["live_workers"] == 1
        )
        text = bus(env, "inspect", APP).stdout
    finally:
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(20)
        w.stop()
    assert "workers:" in text and "consumer=" in text and "heartbeat_age_seconds=" in text
    assert "{'" not in text and "[{" not in text
    # A clean stop leaves the worker list and the group's consumers.
    info = json.loads(bus(env, "inspect", APP, "--json").stdout)
    assert info["live_workers"] == 0 and info["workers"] == []
    consumers = bus_redis(
        env, "XINFO", "CONSUMERS", f"{{{env['BUS_TEST_PREFIX']}:q}}:stream", "workers"
    )
    assert consumers == ""


def test_dead_letters_requeue_per_letter_with_filters_and_json_data(env: dict[str, str]) -> None:
    prefix = env["BUS_TEST_PREFIX"]
    dead = f"{{{prefix}:q}}:dead"
    message = json.dumps({"id": str(TaskID.new()), "name": "x", "args": [], "kwargs": {}})
    bus_redis(env, "XADD", dead, "*", "reason", "unknown task 'x'", "data", message)
    bus_redis(env, "XADD", dead, "*", "reason", "message signature is wrong", "data", "sig")
    subprocess.run(  # not UTF-8: shown as base64
        ["redis-cli", "-p", env["BUS_TEST_URL"].rsplit(":", 1)[1].split("/")[0], "-x", "XADD",
         dead, "*", "reason", "undecodable message", "data"],
        input=b"\xff\xfe\x00bin", check=True, capture_output=True,
    )  # fmt: skip
    letters = json.loads(bus(env, "dead", APP, "list", "--json").stdout)
    assert [d["data_encoding"] for d in letters] == ["utf-8", "utf-8", "base64"]
    assert letters[0]["data"] == message
    assert [d["undecodable"] is None for d in letters] == [True, False, False]
    only = json.loads(bus(env, "dead", APP, "list", "--json", "--reason", "signature").stdout)
    assert len(only) == 1
    out = bus(env, "dead", APP, "requeue").stdout
    assert "skipped: dead-lettered for its signature" in out
    assert "skipped: undecodable, it cannot run" in out  # never requeued: it cannot run
    assert "requeued 1 dead letter(s)" in out
    assert len(json.loads(bus(env, "dead", APP, "list", "--json").stdout)) == 2
