"""The round-trip floor benchmark runs end to end with tiny counts (no timing is
asserted): ours, the bare-socket floor and (in a git checkout) ours at a revision, in a
temporary worktree removed at the end."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.bench.peers import BENCHMARKS, need_redis_server, run_benchmark

pytestmark = pytest.mark.redis


def test_bench_floor_runs_and_prints_the_ratios() -> None:
    need_redis_server()
    pytest.importorskip("hiredis")
    git = (BENCHMARKS.parent / ".git").exists()
    worktrees = ["git", "-C", str(BENCHMARKS.parent), "worktree", "list"]
    before = subprocess.run(worktrees, capture_output=True, check=True).stdout if git else b""
    against = ["--against", "HEAD"] if git else []
    out = run_benchmark("bench_floor.py", "--rounds", "30", "--repeat", "1", *against)
    assert "the floor (the same commands, bare sockets)" in out, out
    assert re.search(r"ratio trio-bus / floor, p50: \d+\.\d\dx", out), out
    if git:
        assert re.search(r"ratio trio-bus / rev \w+, p50: \d+\.\d\dx", out), out
        after = subprocess.run(worktrees, capture_output=True, check=True).stdout
        assert after == before, "the benchmark left a git worktree behind"
