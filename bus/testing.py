"""Helpers for testing code that uses the bus (with pytest-trio, or plain Trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from bus._broker import Broker

__all__ = ["run_broker"]

B = TypeVar("B", bound=Broker)


@asynccontextmanager
async def run_broker(broker: B, *, concurrency: int | None = None) -> AsyncIterator[B]:
    """Enter ``async with broker`` and make sure a worker runs beside the test.

    The in-memory broker runs its own worker; for a distributed broker (Redis) this
    starts one with ``run_worker`` in a nursery and stops it on the way out, so one
    test body works against any broker::

        async with run_broker(broker) as b:
            handle = await add.kiq(1, 2)
            assert (await handle.wait_result(timeout=5)).return_value == 3
    """
    async with broker:
        if not broker.distributed:
            yield broker
            return
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, concurrency)
            try:
                yield broker
            finally:
                worker.stop()
