"""Every option is bounded: where a task is declared, where it is sent and where it is
received (issue 18, item 3). The Redis side is in test_poison_redis.py."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import trio

import bus
from bus._options import (
    MAX_DELAY,
    MAX_RETRIES,
    MAX_RETRY_DELAY,
    MAX_TIMEOUT,
    MAX_UNIQUE_KEY,
    MAX_UNIQUE_TTL,
    check_labels,
)
from bus._protocol import Send

BAD: list[tuple[str, Any]] = [
    ("timeout", MAX_TIMEOUT * 2),
    ("timeout", math.inf),
    ("timeout", 0),
    ("retries", MAX_RETRIES + 1),
    ("retries", 1.5),
    ("retry_backoff", 1e308),
    ("retry_backoff", math.inf),
    ("retry_backoff", -1),
    ("retry_backoff_max", MAX_RETRY_DELAY + 1),
    ("retry_backoff_max", math.nan),
    ("delay", MAX_DELAY * 2),
    ("delay", math.inf),
    ("eta", math.inf),
    ("eta", -math.inf),
    ("unique_ttl", MAX_UNIQUE_TTL + 1),
    ("unique_ttl", math.inf),
    ("unique_key", "k" * (MAX_UNIQUE_KEY + 1)),
    ("unique_key", 5),
    ("unique", "k" * (MAX_UNIQUE_KEY + 1)),
    # Ints too large for a float: math.isnan() or float() of them raises OverflowError.
    ("timeout", 10**400),
    ("retry_backoff", 10**400),
    ("retry_backoff_max", -(10**400)),
    ("retries", 10**400),
    ("delay", 10**400),
    ("eta", 10**400),
    ("eta", -(10**400)),
    ("unique_ttl", 10**400),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_labels_out_of_bounds_are_refused(name: str, value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=name.split("_")[0]):
        check_labels({name: value})
    if name in ("timeout", "retries", "retry_backoff", "retry_backoff_max"):
        with pytest.raises((TypeError, ValueError), match=name):
            bus.TaskOptions(**{name: value})
        with pytest.raises((TypeError, ValueError), match=name):
            bus.TaskOptions().with_labels({name: value})


def test_labels_within_bounds_are_taken() -> None:
    check_labels(
        {
            "timeout": MAX_TIMEOUT,
            "retries": MAX_RETRIES,
            "retry_backoff": MAX_RETRY_DELAY,
            "retry_backoff_max": 0,
            "delay": MAX_DELAY,
            "eta": 1.5,
            "unique_ttl": MAX_UNIQUE_TTL,
            "unique_key": "k" * MAX_UNIQUE_KEY,
            "tenant": math.inf,  # not an option: free-form
        }
    )
    opts = bus.TaskOptions().with_labels({"retry_backoff": 2, "retry_on": "ignored"})
    assert opts.retry_backoff == 2


def test_the_retry_delay_never_overflows() -> None:
    opts = bus.TaskOptions(retries=MAX_RETRIES, retry_backoff=MAX_RETRY_DELAY)
    opts = attrs.evolve(opts, retry_backoff_max=MAX_RETRY_DELAY)
    for attempt in (1, 2, 64, 1000, 1025, 10**6, 10**30):
        assert opts.backoff(attempt) == MAX_RETRY_DELAY
    tiny = bus.TaskOptions(retry_backoff=5e-324, retry_backoff_max=MAX_RETRY_DELAY)
    assert tiny.backoff(1) == 5e-324 and tiny.backoff(10**9) == MAX_RETRY_DELAY
    assert bus.TaskOptions(retry_backoff=0).backoff(10**9) == 0
    assert bus.TaskOptions(retry_backoff=1, retry_backoff_max=300).backoff(3) == 4


def test_decorator_options_out_of_bounds_are_refused() -> None:
    broker = bus.InMemoryBroker()
    for name, value in BAD:
        if name in ("unique_key", "eta", "unique"):
            continue
        with pytest.raises((TypeError, ValueError), match=name.split("_")[0]):
            broker.task(**{name: value})


async def test_in_memory_a_label_out_of_bounds_is_refused_at_send_and_rejected_received() -> None:
    broker = bus.InMemoryBroker()
    runs = 0

    @broker.task(name="bounds.job", retries=1, retry_backoff=0)
    async def job() -> int:
        nonlocal runs
        runs += 1
        return 7

    with trio.fail_after(10):
        async with broker:
            for name, value in BAD:
                with pytest.raises(bus.SendError):
                    await job.kicker().with_labels(**{name: value}).kiq()
                message = attrs.evolve(job.kicker().message(), labels={name: value})
                with pytest.raises(bus.SendError):
                    await broker.kick(message)
            with pytest.raises(bus.SendError, match="eta"):
                await broker.kick(attrs.evolve(job.kicker().message(), eta=math.inf))
            # Past the send checks (a Send told to the broker actor, as another
            # producer's bytes arrive): the worker rejects it and goes on.
            for name, value in BAD:
                if name == "unique":
                    continue  # a send-side option: a worker ignores it
                labels = {name: value}
                message = attrs.evolve(job.kicker().message(), labels=labels)
                try:
                    data = broker.codec.encode_message(message)
                except ValueError:
                    continue  # inf and NaN are not JSON: they cannot arrive
                await broker.ref.tell(Send(message, data))
                handle = bus.TaskHandle[int](message.task_id, broker)
                result = await handle.wait_result(timeout=5)
                assert result.status is bus.TaskStatus.FAILURE, labels
                assert result.error is not None and result.error.type_name == "bus.Rejected"
                assert name.split("_")[0] in result.error.message and runs == 0
            assert (await (await job.kiq()).wait_result(timeout=5)).return_value == 7


def test_a_schedule_holds_its_labels_to_the_same_bounds() -> None:
    from bus._schedule import ScheduleSpec

    with pytest.raises(ValueError, match="retry_backoff"):
        ScheduleSpec("nightly", "t", bus.every(60), labels={"retry_backoff": 1e308})
    stored = ScheduleSpec("nightly", "t", bus.every(60), labels={"retries": 2}).to_json()
    with pytest.raises(ValueError, match="retries"):
        ScheduleSpec.from_json(stored.replace('"retries":2', '"retries":100000'))


async def test_broker_schedule_refuses_labels_out_of_bounds() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(name="bounds.tick")
    async def tick() -> None:
        pass

    with trio.fail_after(10):
        async with broker:
            with pytest.raises(ValueError, match="timeout"):
                await broker.schedule(tick, bus.every(60), labels={"timeout": math.inf})
