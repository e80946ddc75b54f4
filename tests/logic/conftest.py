"""Fixtures for the sans-I/O decision tests: a redis-py client for the Lua scripts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.redis.server import RedisServer


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix() -> str:
    """A prefix of this test's own, so tests sharing the server never see each other."""
    return f"logic-test:{uuid.uuid4().hex}"
