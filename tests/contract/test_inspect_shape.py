"""``broker.inspect()`` answers a typed ``bus.protocol.BrokerInfo`` of the same shape
on every broker (in memory ``workers`` was a number, on Redis a list)."""

from __future__ import annotations

import json

import trio

from bus.protocol import BrokerInfo, QueueInfo, WorkerInfo
from tests.contract.conftest import BrokerFactory


async def test_inspect_has_one_shape(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task(name="shape.noop")
    async def noop() -> None:
        return None

    with trio.fail_after(20):
        async with broker, trio.open_nursery() as nursery:
            if not broker.embedded_worker:
                await nursery.start(broker.run_worker, 2)
            await (await noop.kiq()).wait_result(timeout=10)
            info = await broker.inspect()
            nursery.cancel_scope.cancel()
    assert isinstance(info, BrokerInfo)
    for field in ("queued", "delayed", "running", "pending", "dead_letters"):
        assert isinstance(getattr(info, field), int), field
        assert info[field] == getattr(info, field)
    assert info.live_workers == len(info.workers) >= 1
    assert all(isinstance(w, WorkerInfo) and w.name for w in info.workers)
    assert all(isinstance(q, QueueInfo) for q in info.queues.values())
    plain = dict(info)
    assert isinstance(plain["workers"], list) and isinstance(plain["queues"], dict)
    assert json.loads(json.dumps(plain)) == plain  # plain values, for JSON
