"""Helpers for testing code that uses the bus (with pytest-trio, or plain Trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from bus._broker import Broker

__all__ = ["QUEUE_CHECKS", "check_broker", "run_broker"]

B = TypeVar("B", bound=Broker)

#: The names of the contract checks of named queues, priorities and limits, for a
#: broker that has one queue and no limits: ``check_broker(factory, skip=QUEUE_CHECKS)``.
QUEUE_CHECKS: tuple[str, ...] = (
    "check_named_queues_route_tasks",
    "check_priorities_take_the_most_urgent_first",
    "check_rate_limit_spreads_starts_without_holding_a_runner",
    "check_max_running_is_a_limit",
)


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
        if broker.embedded_worker:
            yield broker
            return
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, concurrency)
            try:
                yield broker
            finally:
                worker.stop()


async def check_broker(factory: Callable[..., Broker], *, skip: Sequence[str] = ()) -> None:
    """Run the broker contract suite against brokers made by ``factory``.

    ``factory(**options)`` must build a fresh, isolated broker (its own queue and
    result keys) from keyword options such as ``concurrency`` and
    ``shutdown_timeout``. Every check runs in turn (names in ``skip`` are skipped,
    e.g. ``"check_delay_is_honoured"``); if any fails, an ``AssertionError`` names
    every failed check, with the first failure as its cause::

        async def test_my_broker_keeps_the_contract() -> None:
            await bus.testing.check_broker(lambda **options: MyBroker(**options))

    Cancellation: the run stops; nothing is left running.
    """
    from bus._contract import CHECKS

    known = {check.__name__ for check in CHECKS}
    unknown = set(skip) - known
    if unknown:
        raise ValueError(f"unknown checks to skip: {sorted(unknown)}; known: {sorted(known)}")
    failed: list[tuple[str, BaseException]] = []
    for check in CHECKS:
        if check.__name__ in skip:
            continue
        try:
            await check(factory)
        except Exception as exc:
            failed.append((check.__name__, exc))
    if failed:
        lines = [f"{len(failed)} broker contract check(s) failed:"]
        lines += [f"  {name}: {type(exc).__name__}: {exc}" for name, exc in failed]
        raise AssertionError("\n".join(lines)) from failed[0][1]
