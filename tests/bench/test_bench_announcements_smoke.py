"""The announcements benchmark runs end to end with tiny sizes (no timing is asserted),
and against a git revision (a temporary worktree of HEAD, removed at the end)."""

from __future__ import annotations

import re
import subprocess

from tests.bench.peers import BENCHMARKS, run_benchmark


def test_bench_announcements_prints_both_payloads_and_the_ratio() -> None:
    git = (BENCHMARKS.parent / ".git").exists()
    against = ["--against", "HEAD"] if git else []
    worktrees = ["git", "-C", str(BENCHMARKS.parent), "worktree", "list"]
    before = subprocess.run(worktrees, capture_output=True, text=True).stdout if git else ""
    out = run_benchmark("bench_announcements.py", "--calls", "5", "--repeat", "1", *against)
    assert re.search(r"^this tree +\d+\.\d\d +\d+\.\d\d$", out, re.M), out
    if git:
        assert re.search(r"^ratio this tree / rev \w+: others [\d.]+x, own [\d.]+x$", out, re.M), (
            out
        )
        after = subprocess.run(worktrees, capture_output=True, text=True).stdout
        assert after == before, "the benchmark left a git worktree behind"
