"""``bus_redis_url`` without a redis-server: skipped, or failed under
``BUS_REQUIRE_REDIS=1`` (a CI run must not pass by skipping its Redis tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

USES_THE_FIXTURE = """
def test_needs_redis(bus_redis_url):
    assert bus_redis_url.startswith("redis://")
"""


def run_without_redis_server(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_uses_redis.py").write_text(USES_THE_FIXTURE)
    empty = tmp_path / "bin"
    empty.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "BUS_REQUIRE_REDIS"}
    environ.update(PATH=str(empty), **env)  # no redis-server on this PATH
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsE", "test_uses_redis.py"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_a_server_the_test_is_skipped(tmp_path: Path) -> None:
    proc = run_without_redis_server(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout
    assert "set BUS_REQUIRE_REDIS=1 to fail instead" in proc.stdout


def test_with_bus_require_redis_a_missing_server_fails(tmp_path: Path) -> None:
    proc = run_without_redis_server(tmp_path, BUS_REQUIRE_REDIS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 error" in proc.stdout
    assert "redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it" in proc.stdout


@pytest.mark.parametrize("value", ["0", ""])
def test_only_one_means_required(tmp_path: Path, value: str) -> None:
    proc = run_without_redis_server(tmp_path, BUS_REQUIRE_REDIS=value)
    assert proc.returncode == 0, proc.stdout + proc.stderr
