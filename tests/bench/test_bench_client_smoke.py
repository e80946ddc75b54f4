"""The Redis client benchmark runs end to end with a tiny count (no timing is asserted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_client.py"

pytestmark = pytest.mark.redis


def test_bench_client_runs_and_prints_both_tables() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
        pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "64", "--repeat", "1", "--inflight", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sequential GET (us/command)" in proc.stdout, out
    assert "8 in flight on one connection" in proc.stdout, out
    for client in ("ours (trio)", "bare trio + hiredis", "redis-py (sync)", "coredis (trio)"):
        assert client in proc.stdout, out
