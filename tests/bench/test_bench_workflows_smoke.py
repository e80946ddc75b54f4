"""The workflows benchmark runs end to end with tiny sizes (no timing is asserted).

Celery is in the ``bench`` extra only (CI installs ``dev``): without it, the
benchmark measures ours alone, and this test checks that it says so."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_workflows.py"

pytestmark = pytest.mark.redis


def test_bench_workflows_runs_and_prints_the_ratios() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
        pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")
    celery = importlib.util.find_spec("celery") is not None
    args = ["--chord", "20", "--chain", "5", "--repeat", "1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "chord 20 + body, end to end" in proc.stdout, out
    assert "chain of 5, end to end" in proc.stdout, out
    assert "a chord step costs" in proc.stdout, out
    assert "a chain step costs" in proc.stdout, out
    if celery:
        assert "chord: trio-bus is" in proc.stdout, out
        assert "chain: trio-bus is" in proc.stdout, out
    else:
        assert "celery is not installed" in proc.stdout, out
