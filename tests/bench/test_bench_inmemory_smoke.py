"""The in-memory benchmark runs end to end with tiny sizes (no timing is asserted):
taskiq's code path (``tests/bench/peers.py``: BUS_REQUIRE_PEERS) and ``--against``,
which measures a git revision checked out in a temporary worktree (here HEAD)."""

from __future__ import annotations

from tests.bench.peers import BENCHMARKS, peer, run_benchmark


def test_bench_inmemory_runs_and_prints_the_ratios() -> None:
    taskiq = peer("taskiq")
    against = ["--against", "HEAD"] if (BENCHMARKS.parent / ".git").exists() else []
    args = ["--tasks", "200", "--rounds", "20", "--repeat", "1", "--concurrency", "100"]
    out = run_benchmark("bench_inmemory.py", *args, *against)
    assert "200 tasks, 20 round trips" in out, out
    assert "\ntrio-bus " in out, out
    if taskiq:
        assert "ratio trio-bus/taskiq" in out, out
    else:
        assert "taskiq is not installed" in out, out
    if against:
        assert "ratio trio-bus/rev " in out, out
