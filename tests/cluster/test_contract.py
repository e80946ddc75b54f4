"""The broker contract checks of ``bus.testing`` on a Redis Cluster (3 masters, 3
replicas): every core and workflow check, as for one Redis server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import bus
from tests.cluster.servers import ClusterSetup
from tests.contract.test_contract import CHECKS
from tests.redis.support import make_redis_broker

BrokerFactory = Callable[..., bus.Broker]


@pytest.fixture
def make_broker(cluster: ClusterSetup) -> BrokerFactory:
    def make(**options: Any) -> bus.Broker:
        return make_redis_broker(cluster.url, **options)

    return make


#: Checks that do not pass on a cluster yet (none).
NOT_YET: set[str] = set()


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
async def test_contract_on_a_cluster(
    check: Callable[[BrokerFactory], Awaitable[None]], make_broker: BrokerFactory
) -> None:
    if check.__name__ in NOT_YET:
        pytest.skip("not yet on a cluster")
    await check(make_broker)
