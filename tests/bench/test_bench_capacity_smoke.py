"""The capacity benchmark runs end to end with tiny sizes (no figure is asserted but
that every path was measured)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_capacity.py"

pytestmark = pytest.mark.redis

SMALL = [
    "--tasks",
    "200",
    "--check-tasks",
    "300",
    "--idle",
    "0.2",
    "--connections",
    "2",
    "--repeat",
    "1",
]


def _need_redis() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
        pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")


def test_bench_capacity_measures_every_path_and_prints_the_model() -> None:
    _need_redis()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    paths = res["paths"]
    assert paths["send"]["calls"]["xadd"] == pytest.approx(1.0)
    for path in ("delivery", "ack", "result", "announcement"):
        assert paths[path]["commands"] > 0, path
        assert paths[path]["bytes_in"] > 0, path
    assert res["saturation"]["commands_per_s"] > 0
    assert res["model"]["tasks_per_s_saturated"] > 0
    assert res["check"]["tasks"] == 300
    assert res["check"]["redis_cpu_s"] > 0
    # The table is drawn from the same results.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_capacity
    finally:
        sys.path.remove(str(SCRIPT.parent))
    text = "\n".join(bench_capacity.report(res))
    for line in ("per task, by path", "saturation:", "model:", "check: 2 worker processes"):
        assert line in text, text
