"""What the benchmarks' smoke tests need: a ``redis-server`` binary and the peers.

The peers (taskiq, taskiq-redis, streaQ, Celery, matplotlib for the chart) come with the
``bench`` extra; coredis and redis-py with ``dev``. A smoke test runs every peer's code
path of its benchmark at tiny sizes, so that the harness behind the published ratios
cannot rot unnoticed. When a peer is missing the benchmark measures ours alone, and the
test checks that it says so, unless ``BUS_REQUIRE_PEERS=1`` (set by ``.ci/run``, with the
extra installed): then a missing peer fails the test, as ``BUS_REQUIRE_REDIS=1`` does for
a missing server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def need_redis_server() -> None:
    """Skip the test without a ``redis-server`` binary; fail under BUS_REQUIRE_REDIS=1."""
    if shutil.which("redis-server") is not None:
        return
    if os.environ.get("BUS_REQUIRE_REDIS") == "1":
        pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
    pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a dotted name whose parent is missing
        return False


def peer(*modules: str) -> bool:
    """Whether every module of a peer can be imported. A missing one fails the test under
    BUS_REQUIRE_PEERS=1; otherwise the caller checks that the benchmark said it skipped it."""
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        return True
    if os.environ.get("BUS_REQUIRE_PEERS") == "1":
        pytest.fail(
            f"{', '.join(missing)} cannot be imported, and BUS_REQUIRE_PEERS=1 requires every "
            "benchmark peer (pip install -e '.[dev,bench]')"
        )
    return False


def run_benchmark(script: str, *args: str, timeout: float = 60) -> str:
    """Run ``benchmarks/<script>`` with these arguments; check it succeeded, return its
    standard output."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
