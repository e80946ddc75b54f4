from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.redis import RedisBroker
from tests.redis.server import RedisServer, start_server
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def make_broker(redis_url: str) -> Callable[..., RedisBroker]:
    def make(**options: Any) -> RedisBroker:
        return make_redis_broker(redis_url, **options)

    return make


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, with appendonly on (for restart tests)."""
    server = start_server(tmp_path, appendonly=True)
    try:
        yield server
    finally:
        server.stop()
