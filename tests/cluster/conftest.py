"""Real Sentinel (and cluster) topologies, started and stopped by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.servers import ClusterSetup, SentinelSetup, start_cluster, start_sentinels

pytestmark = pytest.mark.redis


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master, its replica and three sentinels of this test's own (0.3 s to start)."""
    setup = start_sentinels(tmp_path)
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """Three masters and three replicas, shared by the tests that do not disturb it
    (each uses keys of its own; 2.5 s to start)."""
    setup = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    """A cluster of this test's own (to kill a master of)."""
    setup = start_cluster(tmp_path)
    try:
        yield setup
    finally:
        setup.stop()
