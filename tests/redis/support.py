"""How the Redis broker joins the shared contract suite (tests/contract)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import bus
from bus.redis import RedisBroker, RedisResultBackend
from tests.redis.server import RedisServer

__all__ = ["collect_coredis_garbage", "make_redis_broker", "redis_contract_factory"]


def collect_coredis_garbage() -> None:
    """Collect the anyio memory streams coredis 6.9 leaves unclosed on connections it
    drops (a cancelled blocking read, a server restart), now and silently, rather than
    in some later test where ``-W error`` turns the ResourceWarning into a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def make_redis_broker(url: str, **options: Any) -> RedisBroker:
    """A broker on a queue and key prefix of its own, with a Redis result backend."""
    prefix = options.pop("prefix", None) or f"t{bus.TaskID.new()[-12:]}"
    backend = RedisResultBackend(url, prefix=prefix, ttl=options.pop("ttl", 600))
    return RedisBroker(url, prefix=prefix, queue="q", result_backend=backend, **options)


def redis_contract_factory(request: pytest.FixtureRequest) -> Callable[..., bus.Broker]:
    server: RedisServer = request.getfixturevalue("redis_server")
    request.addfinalizer(collect_coredis_garbage)

    def make(**options: Any) -> bus.Broker:
        return make_redis_broker(server.url, **options)

    return make
