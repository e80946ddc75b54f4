"""Real Sentinel (and cluster) topologies, started and stopped by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.servers import SentinelSetup, start_sentinels

pytestmark = pytest.mark.redis


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master, its replica and three sentinels of this test's own (0.3 s to start)."""
    setup = start_sentinels(tmp_path)
    try:
        yield setup
    finally:
        setup.stop()
