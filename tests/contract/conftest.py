"""The broker contract suite runs once per broker implementation.

A broker joins the suite by adding a factory to ``FACTORIES``: a function taking the
pytest ``request`` and returning a callable that builds a fresh, isolated broker from
keyword options (``concurrency``, ``shutdown_timeout``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

import bus

BrokerFactory = Callable[..., bus.Broker]


def _memory(request: pytest.FixtureRequest) -> BrokerFactory:
    def make(**options: Any) -> bus.Broker:
        return bus.InMemoryBroker(**options)

    return make


def unavailable(reason: str) -> Callable[[pytest.FixtureRequest], BrokerFactory]:
    """A factory for a broker that cannot run here: its checks are skipped with
    ``reason``, or fail under ``BUS_REQUIRE_REDIS=1`` (in CI nothing may be missing)."""

    def factory(request: pytest.FixtureRequest) -> BrokerFactory:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}, and BUS_REQUIRE_REDIS=1 requires it", pytrace=False)
        pytest.skip(f"{reason} (set BUS_REQUIRE_REDIS=1 to fail instead)")

    return factory


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], BrokerFactory]] = {"memory": _memory}

try:  # the Redis broker's run needs its test support (and the redis extra)
    from tests.redis.support import redis_contract_factory
except ImportError as exc:
    FACTORIES["redis"] = unavailable(f"the Redis contract run cannot import its support: {exc}")
else:
    FACTORIES["redis"] = redis_contract_factory


@pytest.fixture(params=sorted(FACTORIES))
def make_broker(request: pytest.FixtureRequest) -> BrokerFactory:
    return FACTORIES[request.param](request)
