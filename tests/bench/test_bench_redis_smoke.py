"""The Redis benchmark runs end to end with tiny sizes (no timing is asserted), every
peer's code path and the chart included (``tests/bench/peers.py``: BUS_REQUIRE_PEERS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.peers import BENCHMARKS, need_redis_server, peer, run_benchmark

pytestmark = pytest.mark.redis


def test_bench_redis_runs_and_prints_the_table(tmp_path: Path) -> None:
    need_redis_server()
    if not peer("redis"):
        pytest.skip("redis-py (the harness's own client) is not installed")
    peers = {"streaq": peer("streaq"), "taskiq": peer("taskiq", "taskiq_redis")}
    matplotlib = peer("matplotlib")
    chart = tmp_path / "chart.png"
    out = run_benchmark(
        "bench_redis.py",
        *("--tasks", "100", "--rounds", "3", "--repeat", "1"),
        *("--only", "trio-bus,streaq,taskiq", "--chart", str(chart)),
        timeout=90,
    )
    assert "enqueue, sequential (tasks/s)" in out, out
    assert "processing, 1 worker process (tasks/s)" in out, out
    assert "round trip p50, normal wait (ms)" in out, out
    assert "enqueue, 32 in flight (tasks/s)" in out, out
    assert "targets (issue #10):" in out, out
    # The floor of a sequential send, measured in the same run, and ours against it.
    assert "the wire: bare socket, same XADD (/s)" in out, out
    if "ratio trio-bus/" in out:
        assert "sequential send at the wire: ours " in out, out
    for name, installed in peers.items():
        if installed:
            assert f"ratio trio-bus/{name}: enqueue seq" in out, out
            assert "rt p50 vs poll" in out.split(f"ratio trio-bus/{name}:")[1], out
        else:
            assert f"{name} is not installed" in out, out
    if matplotlib:
        assert chart.stat().st_size > 0
    else:
        assert "no chart drawn" in out


def test_bench_redis_against_a_revision() -> None:
    """``--against REV``: ours at this checkout and at REV (here HEAD, in a worktree)."""
    need_redis_server()
    if not peer("redis"):
        pytest.skip("redis-py (the harness's own client) is not installed")
    if not (BENCHMARKS.parent / ".git").exists():
        pytest.skip("not a git checkout")
    out = run_benchmark(
        "bench_redis.py", "--against", "HEAD", "--tasks", "100", "--rounds", "3", "--repeat", "1"
    )
    assert "processing, 1 worker process (tasks/s)" in out, out
    assert "ratio trio-bus/rev " in out, out
    assert "targets (issue #10)" not in out, out
