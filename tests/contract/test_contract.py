"""The broker contract (bus._contract) runs against every broker this project ships.

Each check is one test per broker factory (see conftest.py); ``check_broker`` runs
them all for a third-party broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import bus
import bus.testing
from bus._contract import CHECKS
from tests.contract.conftest import BrokerFactory


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
async def test_contract(
    check: Callable[[BrokerFactory], Awaitable[None]], make_broker: BrokerFactory
) -> None:
    await check(make_broker)


async def test_check_broker_passes_for_the_in_memory_broker() -> None:
    await bus.testing.check_broker(lambda **options: bus.InMemoryBroker(**options))


async def test_check_broker_names_what_fails() -> None:
    class Forgetful(bus.InMemoryBroker):
        """Loses every message sent with a delay."""

        async def kick(self, message: bus.TaskMessage) -> None:
            if message.eta is None:
                await super().kick(message)

    with pytest.raises(AssertionError, match="check_delay_is_honoured") as info:
        await bus.testing.check_broker(
            lambda **options: Forgetful(**options),
            skip=[c.__name__ for c in CHECKS if c.__name__ != "check_delay_is_honoured"],
        )
    assert "1 broker contract check(s) failed" in str(info.value)


async def test_check_broker_refuses_unknown_skips() -> None:
    with pytest.raises(ValueError, match="check_nope"):
        await bus.testing.check_broker(bus.InMemoryBroker, skip=["check_nope"])


def test_the_feature_checks_are_named_right() -> None:
    names = {c.__name__ for c in CHECKS}
    assert set(bus.testing.QUEUE_CHECKS) <= names
    assert set(bus.testing.SCHEDULE_CHECKS) <= names
    assert set(bus.testing.UNIQUE_CHECKS) <= names
