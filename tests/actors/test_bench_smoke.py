"""The actor benchmark still runs (tiny sizes; no timing asserts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_actors.py"


def test_bench_actors_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_actors", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--messages", "500", "--asks", "100", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "actors tell" in out
    assert "actors ask" in out
    assert "tell cost vs bare channel" in out
