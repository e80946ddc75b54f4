"""How the Redis broker joins the shared contract suite (tests/contract)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import bus
from bus.redis import RedisBroker, RedisResultBackend
from tests.redis.server import RedisServer

__all__ = ["commandstats", "make_redis_broker", "redis_contract_factory"]


def make_redis_broker(url: str, **options: Any) -> RedisBroker:
    """A broker on a queue and key prefix of its own, with a Redis result backend."""
    prefix = options.pop("prefix", None) or f"t{bus.TaskID.new()[-12:]}"
    backend = RedisResultBackend(
        url,
        prefix=prefix,
        ttl=options.pop("ttl", 600),
        command_timeout=options.get("command_timeout", 10.0),
    )
    return RedisBroker(url, prefix=prefix, queue="q", result_backend=backend, **options)


def redis_contract_factory(request: pytest.FixtureRequest) -> Callable[..., bus.Broker]:
    server: RedisServer = request.getfixturevalue("redis_server")

    def make(**options: Any) -> bus.Broker:
        return make_redis_broker(server.url, **options)

    return make


async def commandstats(broker: RedisBroker) -> dict[str, int]:
    """{command: calls} from Redis's own ``INFO commandstats`` (one command on the
    broker's shared connection: a write of its own)."""
    info = await broker.client.execute("INFO", "commandstats")
    assert isinstance(info, bytes)
    out: dict[str, int] = {}
    for line in info.decode().splitlines():
        name, sep, stats = line.removeprefix("cmdstat_").partition(":")
        if line.startswith("cmdstat_") and sep:
            out[name] = int(dict(kv.split("=") for kv in stats.split(","))["calls"])
    return out
