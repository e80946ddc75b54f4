"""The bus examples run and do what they say (the actors examples have their own test)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bus_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prints_results() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = [line.split() for line in done.stdout.splitlines() if " -> " in line]
    values = [parts[-1] for parts in results if parts[1] == "success"]
    assert values == ["0", "11", "22", "33", "44", "'HELLO!'"]
    failure = [line for line in done.stdout.splitlines() if "failure" in line and " -> " in line]
    assert len(failure) == 1
    assert "TypeError" in failure[0]


async def test_embedded_service_answers_over_tcp() -> None:
    service = _load("embedded_service")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(service.main, 0)
            assert port > 0
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"hello big world\n\n")
                data = b""
                while data.count(b"\n") < 2:
                    chunk = await stream.receive_some()
                    assert chunk, "the server closed the connection"
                    data += chunk
            ok, error = data.decode().splitlines()
            assert ok.startswith("ok ")
            assert json.loads(ok[3:]) == {
                "words": 3,
                "longest": "hello",
                "upper": "HELLO BIG WORLD",
            }
            assert error == "error ValueError: empty line"
            nursery.cancel_scope.cancel()


async def test_cancellation_example(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        statuses = await _load("cancellation").main()
    assert statuses == {"running": "cancelled", "queued": "cancelled", "after": "success"}
    out = capsys.readouterr().out
    assert "cancelled before it started" in out
    assert "started: ['running'], cleaned up: ['running']" in out


async def test_retries_progress_example() -> None:
    with trio.fail_after(10):
        result, reports = await _load("retries_progress").main()
    assert result.return_value == 4
    assert result.status.value == "success"
    assert {r["attempt"] for r in reports} == {1, 2, 3}
    assert reports[-1]["attempt"] == 3
    assert all(r["of"] == 4 for r in reports)


async def test_schedules_unique_example(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        out = await _load("schedules_unique").main()
    samples = out["samples"]
    assert isinstance(samples, list) and len(samples) >= 2
    assert {round(b - a, 3) for a, b in itertools.pairwise(samples)} == {0.2}
    assert out["digests"] and set(out["digests"]) == {"ops@example.com"}  # type: ignore[arg-type]
    assert out["rebuilds"] == ["paris"]
    assert out["answers"] == ["paris: rebuilt"] * 10
    printed = capsys.readouterr().out
    assert "10 answers from 1 run: paris: rebuilt" in printed
    assert "(runtime" not in printed and ": runtime, fired" in printed
