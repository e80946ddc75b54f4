"""A newcomer's first hour with the ``bus`` command (issue 21, section 4): errors that
name their cause, one logging story, the options a Celery or taskiq user expects."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

import bus as bus_module
from bus import TaskID
from tests.cli import test_cli_redis
from tests.cli.test_cli_redis import bus
from tests.redis.server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.first_hour_app:broker"
MEMORY = "tests.cli.memory_app"


def run_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``bus ARGS`` run from ``folder`` (where a newcomer keeps tasks.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bus", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bus: error: ") and "Traceback" not in proc.stderr
    return lines[0]


# ----------------------------------------------------------- errors with a cause


def test_an_error_in_the_tasks_module_names_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(
        "import bus\n\nbroker = bus.InMemoryBroker()\nretries = RETRIES + 1\n"
    )
    line = one_error_line(run_in(tmp_path, "send", "jobs:broker", "add"))
    assert "NameError: name 'RETRIES' is not defined" in line
    assert "jobs.py, line 4" in line


def test_a_file_path_gets_a_dotted_path_hint(tmp_path: Path) -> None:
    line = one_error_line(run_in(tmp_path, "send", "myapp/tasks.py:broker", "add"))
    assert "e.g. myapp.tasks:broker" in line


def test_a_task_named_in_place_of_the_broker() -> None:
    line = one_error_line(bus({**os.environ}, "send", f"{MEMORY}:add", "add"))
    assert "is an AsyncTask, not a bus broker" in line
    assert f"did you mean {MEMORY}:broker?" in line


def test_an_unknown_task_suggests_its_module_qualified_name(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(
        textwrap.dedent(
            """
            import bus

            broker = bus.InMemoryBroker()


            @broker.task
            async def add(a: int, b: int) -> int:
                return a + b
            """
        )
    )
    line = one_error_line(run_in(tmp_path, "send", "jobs:broker", "add"))
    assert "did you mean 'jobs:add'?" in line


def test_a_json_object_in_args_suggests_kwargs() -> None:
    proc = bus({**os.environ}, "send", f"{MEMORY}:broker", "add", "--args", '{"to": 1}')
    assert """keyword arguments go in --kwargs '{"to": 1}'""" in one_error_line(proc)


def test_a_task_sent_from_a_script_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(
        textwrap.dedent(
            """
            from bus.redis import RedisBroker

            broker = RedisBroker("redis://127.0.0.1:1")


            @broker.task
            async def add(a: int, b: int) -> int:
                return a + b
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "jobs.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "jobs.py:7: UserWarning: task '__main__:add'" in proc.stderr
    assert "@broker.task(name='add')" in proc.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    prefix = f"first{time.monotonic_ns()}"
    return {**os.environ, "BUS_TEST_URL": redis_server.url, "BUS_TEST_PREFIX": prefix}


@pytest.mark.slow
def test_a_busy_port_names_the_address(env: dict[str, str], busy_port: int) -> None:
    where = f"127.0.0.1:{busy_port}"
    metrics = bus(env, "worker", APP, "--metrics-port", str(busy_port))
    line = one_error_line(metrics, 1)
    assert f"cannot listen on {where}: the address is already in use" in line
    assert "Errno" not in line
    dashboard = bus(env, "dashboard", APP, "--port", str(busy_port))
    line = one_error_line(dashboard, 1)
    assert f"cannot listen on {where}" in line and "--port" in line and "Errno" not in line


# --------------------------------------------------------------------- logging


class Worker(test_cli_redis.Worker):
    """``bus worker`` of this module's app, JSON lines, stderr collected."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "worker", APP, "--log-format", "json", *args],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda line: "bus worker:" in line)


def records(w: Worker) -> list[dict[str, Any]]:
    return [json.loads(line) for line in w.lines]  # every line is JSON


@pytest.mark.slow
def test_a_tasks_stdlib_logging_goes_through_the_json_renderer(env: dict[str, str]) -> None:
    w = Worker(env, "--log-level", "info", "--log-tasks", "--concurrency", "1")
    try:
        (banner,) = w.wait_for(lambda line: "bus worker:" in line)
        shown = json.loads(banner)
        assert shown["event"] == "worker.ready" and "chatty" in shown["tasks"]
        assert bus(env, "send", APP, "chatty", "--args", "[7]", "--wait").returncode == 0
        w.wait_for(lambda line: "task.succeeded" in line)
        w.proc.send_signal(2)
        assert w.proc.wait(30) == 0
    finally:
        w.stop()
    events = {r["event"]: r for r in records(w)}
    assert events["hello from info 7"]["level"] == "info"
    assert events["hello from info 7"]["logger"] == "jobs"
    assert events["careful 7"]["level"] == "warning"
    assert events["task.succeeded"]["task_name"] == "chatty"


@pytest.mark.slow
def test_the_log_level_holds_for_stdlib_logging_too(env: dict[str, str]) -> None:
    w = Worker(env, "--log-level", "warning", "--concurrency", "1")
    try:
        assert bus(env, "send", APP, "chatty", "--args", "[8]", "--wait").returncode == 0
        w.wait_for(lambda line: "careful 8" in line)
        w.proc.send_signal(15)
        assert w.proc.wait(30) == 0
    finally:
        w.stop()
    shown = [r["event"] for r in records(w)]
    assert "careful 8" in shown and "hello from info 8" not in shown
    assert "task.succeeded" not in shown  # only with --log-tasks


@pytest.mark.slow
def test_a_crash_loop_says_why_in_the_chosen_format(env: dict[str, str]) -> None:
    code = (
        "import sys; import actors, bus._cli as cli; "
        "cli.PROCESS_BACKOFF = actors.Backoff(initial=0.01, cap=0.02); "
        f"sys.exit(cli.main(['worker', {APP!r}, '--processes', '2']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**env, "FIRST_HOUR_CRASH": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # all JSON
    (last,) = [r for r in lines if r["event"] == "supervisor.giving_up"]
    assert "crashed more than 5 times" in last["reason"] and last["level"] == "error"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main`` configures logging for the process: undo it after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_supervised_children_log_in_the_supervisors_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bus._cli as cli

    seen: list[list[str]] = []

    def supervise(argv: list[str], *rest: Any) -> int:
        seen.append(list(argv))
        return 0

    class Terminal:
        """stderr as if on a terminal: the supervisor picks the console format."""

        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def isatty(self) -> bool:
            return True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stream, name)

    monkeypatch.setattr(cli, "supervise", supervise)
    monkeypatch.setattr(sys, "stderr", Terminal(sys.stderr))
    monkeypatch.setattr(cli, "load_broker", lambda spec: _distributed())
    assert cli.main(["worker", APP, "--processes", "2"]) == 0
    assert seen[0][-2:] == ["--log-format", "console"]
    assert cli.main(["worker", APP, "--processes", "2", "--log-format", "json"]) == 0
    assert seen[1].count("--log-format") == 1


def _distributed() -> Any:
    import bus

    class Shared(bus.InMemoryBroker):
        distributed = True

    return Shared()


# ------------------------------------------------------- send, result, dead --queue


async def _bus(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "bus", *args], cwd=ROOT, env=env,
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip


@pytest.mark.slow
async def test_send_options_result_and_dead_letters_of_a_named_queue(
    env: dict[str, str], redis_server: RedisServer
) -> None:
    from tests.cli import first_hour_app
    from tests.redis.support import make_redis_broker

    prefix = env["BUS_TEST_PREFIX"]
    worker = make_redis_broker(redis_server.url, prefix=prefix, block=0.2)
    worker.register_task(first_hour_app.labelled.func, name="labelled")
    producer = make_redis_broker(redis_server.url, prefix=prefix)

    @producer.task(name="ghost", queue="other")
    async def ghost() -> None:  # unknown to the worker: dead-lettered
        pass

    with trio.fail_after(60):
        async with worker, producer, trio.open_nursery() as nursery:
            w = await nursery.start(functools.partial(worker.run_worker, 2, queues=["other"]))
            sent = await _bus(
                env, "send", APP, "labelled", "--queue", "other", "--delay", "0.1",
                "--label", "team=ops", "--label", "n=3", "--wait", "--timeout", "30",
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            assert json.loads(sent.stdout)["return_value"] == {"team": "ops", "n": 3}

            handle = await ghost.kiq()
            rejected = await handle.wait_result(timeout=20)
            assert rejected.error is not None and rejected.error.type_name == "bus.Rejected"
            assert [d["task_name"] for d in await producer.dead_letters(queue="other")] == ["ghost"]
            assert await producer.dead_letters() == []
            listed = await _bus(env, "dead", APP, "list", "--queue", "other", "--json")
            assert [d["task_name"] for d in json.loads(listed.stdout)] == ["ghost"]
            default = await _bus(env, "dead", APP, "list", "--json")
            assert json.loads(default.stdout) == []

            stored = await _bus(env, "result", APP, str(handle.task_id))
            assert stored.returncode == 0, stored.stderr
            assert json.loads(stored.stdout)["status"] == "failure"
            missing = await _bus(env, "result", APP, str(TaskID.new()))
            assert missing.returncode == 1
            assert b"no result is stored" in missing.stderr
            w.stop()


def test_schedules_works_on_the_in_memory_broker(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(
        textwrap.dedent(
            """
            import bus

            broker = bus.InMemoryBroker()


            @broker.task(name="tick", schedule=bus.every(60))
            async def tick() -> None:
                pass
            """
        )
    )
    proc = run_in(tmp_path, "schedules", "jobs:broker", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    (only,) = json.loads(proc.stdout)
    assert only["task"] == "tick" and only["source"] == "task"


@pytest.mark.slow
async def test_requeue_with_reset_attempts_gives_the_retries_again(
    env: dict[str, str], redis_server: RedisServer
) -> None:
    from tests.redis.support import make_redis_broker

    worker = make_redis_broker(
        redis_server.url, prefix=env["BUS_TEST_PREFIX"], block=0.2, dead_letter_failures=True
    )
    attempts: list[int] = []
    dead = trio.Event()

    @worker.task(name="fragile", retries=1, retry_backoff=0)
    async def fragile(ctx: bus_module.Context = bus_module.CONTEXT) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("the service is down")

    class Watch(bus_module.Middleware):
        def post_execute(self, message: Any, result: Any) -> None:
            if len(attempts) in (2, 4):  # the last attempt of each round failed for good
                dead.set()

    worker.with_middlewares(Watch())
    with trio.fail_after(60):
        async with worker, trio.open_nursery() as nursery:
            w = await nursery.start(worker.run_worker, 1)
            await fragile.kiq()
            await dead.wait()
            while len(await worker.dead_letters()) != 1:  # noqa: ASYNC110 (Redis state)
                await trio.sleep(0.02)
            assert attempts == [1, 2]
            plain = await _bus(env, "dead", APP, "list", "--reset-attempts")
            assert plain.returncode == 2 and b"goes with requeue" in plain.stderr
            dead = trio.Event()
            done = await _bus(env, "dead", APP, "requeue", "--reset-attempts", "--json")
            assert [r["outcome"] for r in json.loads(done.stdout)] == ["requeued"]
            await dead.wait()
            # Attempt 2 once more, then one retry (attempt 3): the retries were given again.
            assert attempts == [1, 2, 2, 3]
            w.stop()
