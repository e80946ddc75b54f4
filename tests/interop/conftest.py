from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.redis.server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    """A stream and key prefix of this test's own, for the subprocesses on both sides."""
    n = time.monotonic_ns()
    return {
        **os.environ,
        "BUS_TEST_URL": redis_server.url,
        "TASKIQ_TEST_QUEUE": f"taskiq{n}",
        "BUS_TEST_PREFIX": f"ti{n}",
        "PYTHONPATH": str(ROOT),
    }
