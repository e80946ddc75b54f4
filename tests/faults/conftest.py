"""Fixtures of the fault-injection suite: a redis-server of the test's own (append-only,
so that it can be stopped and started) and a fault proxy in front of it, run in the
test's nursery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.faults.control import RedisControl
from tests.faults.proxy import FaultProxy
from tests.redis.server import start_server


@pytest.fixture
def redis_ctl(tmp_path: Path) -> Iterator[RedisControl]:
    ctl = RedisControl(start_server(tmp_path, appendonly=True))
    try:
        yield ctl
    finally:
        ctl.close()


@pytest.fixture
async def proxy(nursery: trio.Nursery, redis_ctl: RedisControl) -> FaultProxy:
    """Runs in the test's nursery: cancelled, with its connections, when the test ends."""
    p: FaultProxy = await nursery.start(FaultProxy(redis_ctl.port).run)
    return p
