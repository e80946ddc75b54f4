"""Fixtures shared across test packages.

``redis_server`` starts a private ``redis-server`` the first time a test asks for it
(so runs that need no Redis never start one) and stops it at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis.server import RedisServer, start_server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
