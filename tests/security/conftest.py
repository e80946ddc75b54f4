from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bus.redis import RedisBroker
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker


@pytest.fixture
def make_broker(redis_server: RedisServer) -> Callable[..., RedisBroker]:
    """A Redis broker on a queue and key prefix of its own (see tests/redis/support)."""

    def make(**options: Any) -> RedisBroker:
        return make_redis_broker(redis_server.url, **options)

    return make
