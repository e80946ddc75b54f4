"""The in-process Redis drain benchmark runs end to end with tiny sizes (no timing is
asserted), with its counts, and against a git revision (a temporary worktree of HEAD,
removed at the end)."""

from __future__ import annotations

import subprocess

import pytest

from tests.bench.peers import BENCHMARKS, need_redis_server, run_benchmark

pytestmark = pytest.mark.redis


def _worktrees() -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(BENCHMARKS.parent), "worktree", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def test_bench_drain_runs_and_prints_the_ratio() -> None:
    need_redis_server()
    git = (BENCHMARKS.parent / ".git").exists()
    before = _worktrees() if git else []
    against = ["--against", "HEAD"] if git else []
    out = run_benchmark("bench_drain.py", "--tasks", "300", "--repeat", "1", "--counts", *against)
    assert "300 tasks, concurrency" in out, out
    if git:
        assert "ratio this tree / HEAD" in out, out
        assert _worktrees() == before, "the benchmark left a git worktree behind"
