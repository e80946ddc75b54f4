"""The ``bus`` command refuses bad input with one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.cli.memory_app"


def bus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", "nocolon", "add"], "expected MODULE:BROKER"),
        (["send", "no_such_module_xyz:broker", "add"], "no module named 'no_such_module_xyz'"),
        (["send", f"{APP}:missing", "add"], "has no attribute 'missing'"),
        (["send", f"{APP}:not_a_broker", "add"], "not a bus broker"),
        (["send", f"{APP}:broker", "nope"], "unknown task 'nope'; registered tasks: add, fail"),
        (["send", f"{APP}:broker", "add", "--args", "[1,"], "--args is not valid JSON"),
        (["send", f"{APP}:broker", "add", "--args", "{}"], "--args must be a JSON array"),
        (["send", f"{APP}:broker", "add", "--kwargs", "[]"], "--kwargs must be a JSON object"),
        (["worker", f"{APP}:broker"], "does not apply to InMemoryBroker"),
        (["inspect", f"{APP}:broker"], "does not apply to InMemoryBroker"),
        (["dead", f"{APP}:broker", "list"], "does not apply to InMemoryBroker"),
    ],
)
def test_bad_input_gives_one_line_and_non_zero_exit(args: list[str], message: str) -> None:
    proc = bus(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bus: error: ")
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_send_and_wait_runs_in_process_for_the_in_memory_broker() -> None:
    proc = bus("send", f"{APP}:broker", "add", "--args", "[2, 3]", "--wait", "--timeout", "5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "success"
    assert out["return_value"] == 5


def test_a_failed_task_exits_1() -> None:
    proc = bus("send", f"{APP}:broker", "fail", "--wait")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == {"type": "ValueError", "message": "no"}
