"""Helpers for testing code that uses the bus (with pytest-trio, or plain Trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from bus._broker import Broker

__all__ = [
    "QUEUE_CHECKS",
    "SCHEDULE_CHECKS",
    "UNIQUE_CHECKS",
    "WORKFLOW_CHECKS",
    "ContractError",
    "check_broker",
    "in_memory",
    "run_broker",
]

B = TypeVar("B", bound=Broker)

#: The names of the contract checks of named queues, priorities and limits, for a
#: broker that has one queue and no limits: ``check_broker(factory, skip=QUEUE_CHECKS)``.
QUEUE_CHECKS: tuple[str, ...] = (
    "check_named_queues_route_tasks",
    "check_priorities_take_the_most_urgent_first",
    "check_rate_limit_spreads_starts_without_holding_a_runner",
    "check_max_running_is_a_limit",
)
#: The contract check of periodic tasks, for a broker without a schedule backend.
SCHEDULE_CHECKS: tuple[str, ...] = ("check_schedules_fire_each_tick_once",)
#: The contract check of unique jobs, for a broker that does not claim unique keys.
UNIQUE_CHECKS: tuple[str, ...] = ("check_unique_jobs_run_once_while_queued_or_running",)
#: The contract checks of workflows (chains, groups, chords), for a broker without
#: a workflow backend.
WORKFLOW_CHECKS: tuple[str, ...] = (
    "check_workflow_chain_passes_results_on",
    "check_workflow_group_and_chord_keep_order",
    "check_workflow_arity_is_checked_at_kiq",
    "check_workflow_failure_skips_downstream_and_runs_on_error_once",
    "check_workflow_cancel_stops_queued_and_running_steps",
    "check_workflow_step_reported_twice_sends_once",
    "check_workflow_counted_while_running",
)


class ContractError(AssertionError):
    """A broker did not keep the contract: raised by :func:`check_broker` (naming every
    failed check) and by each check. The checks raise it themselves, not with
    ``assert``, so they check under ``python -O`` too. An :class:`AssertionError`,
    so a test framework reports it as a failure."""


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


@asynccontextmanager
async def in_memory(broker: Broker, **options: Any) -> AsyncIterator[Broker]:
    """Run the tasks declared on ``broker`` (a module-level ``RedisBroker``, say) in
    memory, for the length of the block: inside it, ``task.kiq(...)`` of those tasks
    goes to a fresh :class:`~bus.InMemoryBroker` (made with ``options``, e.g.
    ``concurrency``) that runs them in this process, with the same options and
    lifecycle handlers. No server is needed. On the way out the tasks point at
    ``broker`` again::

        async with bus.testing.in_memory(app.broker) as mem:
            result = await (await app.resize.kiq(640)).wait_result(timeout=5)

    Cancellation: as ``async with broker``; the tasks are restored either way.
    """
    from bus._inmemory import InMemoryBroker

    options.setdefault("concurrency", broker.concurrency)
    options.setdefault("shutdown_timeout", broker.shutdown_timeout)
    mem = InMemoryBroker(codec=broker.codec, **options)
    for event, handlers in broker._handlers.items():
        mem._handlers[event] = list(handlers)
    saved = {name: task.broker for name, task in broker.tasks.items()}
    try:
        for name, task in broker.tasks.items():
            mem.tasks[name] = task
            task.broker = mem
        async with mem:
            yield mem
    finally:
        for name, task in broker.tasks.items():
            task.broker = saved[name]


async def check_broker(factory: Callable[..., Broker], *, skip: Sequence[str] = ()) -> None:
    """Run the broker contract suite against brokers made by ``factory``.

    ``factory(**options)`` must build a fresh, isolated broker (its own queue and
    result keys) from keyword options such as ``concurrency`` and
    ``shutdown_timeout``. Every check runs in turn (names in ``skip`` are skipped,
    e.g. ``"check_delay_is_honoured"``); if any fails, a :class:`ContractError` (an
    ``AssertionError``) names every failed check, with the first failure as its
    cause::

        async def test_my_broker_keeps_the_contract() -> None:
            await bus.testing.check_broker(lambda **options: MyBroker(**options))

    Cancellation: the run stops; nothing is left running.
    """
    from bus._contract import CHECKS as CORE_CHECKS
    from bus._workflow_contract import WORKFLOW_CHECK_FUNCS

    CHECKS = CORE_CHECKS + WORKFLOW_CHECK_FUNCS

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
        raise ContractError("\n".join(lines)) from failed[0][1]
