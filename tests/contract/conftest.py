"""The broker contract suite runs once per broker implementation.

A broker joins the suite by adding a factory to ``FACTORIES``: a function taking the
pytest ``request`` and returning a callable that builds a fresh, isolated broker from
keyword options (``concurrency``, ``shutdown_timeout``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import bus

BrokerFactory = Callable[..., bus.Broker]


def _memory(request: pytest.FixtureRequest) -> BrokerFactory:
    def make(**options: Any) -> bus.Broker:
        return bus.InMemoryBroker(**options)

    return make


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], BrokerFactory]] = {"memory": _memory}

try:  # the Redis broker joins when its test support is importable
    from tests.redis.support import redis_contract_factory
except ImportError:  # pragma: no cover
    pass
else:
    FACTORIES["redis"] = redis_contract_factory


@pytest.fixture(params=sorted(FACTORIES))
def make_broker(request: pytest.FixtureRequest) -> BrokerFactory:
    return FACTORIES[request.param](request)
