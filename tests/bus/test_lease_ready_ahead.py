"""``Lease.ready_ahead``: a worker tries ``receive_nowait()`` before ``receive()`` only
on a lease whose deliveries may be ready before a runner waits."""

from __future__ import annotations

import pytest
import trio

import bus
from bus._memory_dispatch import _MemoryLease
from bus._protocol import Delivery


@pytest.mark.parametrize("ready_ahead", [True, False])
async def test_a_worker_takes_every_delivery_either_way(
    monkeypatch: pytest.MonkeyPatch, ready_ahead: bool
) -> None:
    tries: list[int] = []
    receive_nowait = _MemoryLease.receive_nowait

    def counted(self: _MemoryLease) -> Delivery:
        tries.append(1)
        return receive_nowait(self)

    # The in-memory broker's lease, told either way (its queue is buffered: ready
    # ahead; the Redis reader's lease says False).
    monkeypatch.setattr(_MemoryLease, "ready_ahead", ready_ahead)
    monkeypatch.setattr(_MemoryLease, "receive_nowait", counted)
    broker = bus.InMemoryBroker()

    @broker.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    with trio.fail_after(10):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 4)
            handles = [await double.kiq(i) for i in range(50)]
            results = await bus.gather(*handles, timeout=5)
            worker.stop()
    assert [r.return_value for r in results] == [2 * i for i in range(50)]
    # Tried first where deliveries may be ready; never where they cannot be.
    assert bool(tries) is ready_ahead
