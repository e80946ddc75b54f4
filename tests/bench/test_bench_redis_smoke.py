"""The Redis benchmark runs end to end with tiny sizes (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_redis.py"

pytestmark = pytest.mark.redis


def _libs() -> str:
    """Ours always; a peer only when it is installed (it is then fast enough here)."""
    libs = ["trio-bus"]
    if importlib.util.find_spec("streaq") is not None:
        libs.append("streaq")
    return ",".join(libs)


def test_bench_redis_runs_and_prints_the_table(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
        pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")
    chart = tmp_path / "chart.png"
    args = ["--tasks", "200", "--rounds", "10", "--repeat", "1", "--only", _libs()]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--chart", str(chart)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "enqueue, sequential (tasks/s)" in proc.stdout, out
    assert "processing, 1 worker process (tasks/s)" in proc.stdout, out
    assert "round trip p50, normal wait (ms)" in proc.stdout, out
    assert "enqueue, 32 in flight (tasks/s)" in proc.stdout, out
    assert "targets (issue #10):" in proc.stdout, out
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.stat().st_size > 0
    else:
        assert "no chart drawn" in proc.stdout
