"""The broker contract (bus._contract) runs against every broker this project ships.

Each check is one test per broker factory (see conftest.py); ``check_broker`` runs
them all for a third-party broker.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import bus
import bus._contract
import bus._workflow_contract
import bus.testing
from bus._contract import CHECKS as CORE_CHECKS
from bus._workflow_contract import WORKFLOW_CHECK_FUNCS
from tests.contract.conftest import FACTORIES, BrokerFactory, unavailable

ROOT = Path(__file__).resolve().parents[2]
#: Every check check_broker runs: the core ones, then the workflow checks.
CHECKS = CORE_CHECKS + WORKFLOW_CHECK_FUNCS


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
    assert set(bus.testing.WORKFLOW_CHECKS) == {n for n in names if n.startswith("check_workflow")}


IMPATIENT = """
import attrs, trio, bus, bus.testing

class Impatient(bus.InMemoryBroker):
    '''Runs a delayed task at once.'''

    async def kick(self, message: bus.TaskMessage) -> bus.TaskID:
        return await super().kick(attrs.evolve(message, eta=None))

async def main() -> None:
    await bus.testing.check_broker(
        lambda **options: Impatient(**options), skip=[{skip}]
    )

trio.run(main)
"""


def test_check_broker_fails_a_broken_broker_under_python_O() -> None:
    # Under -O a bare ``assert`` is gone: the checks must raise their error themselves.
    skip = ", ".join(repr(c.__name__) for c in CHECKS if c.__name__ != "check_delay_is_honoured")
    proc = subprocess.run(
        [sys.executable, "-O", "-c", IMPATIENT.format(skip=skip)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "bus.testing.ContractError: 1 broker contract check(s) failed" in proc.stderr
    assert "check_delay_is_honoured" in proc.stderr


@pytest.mark.parametrize("module", [bus.testing, bus._contract, bus._workflow_contract])
def test_the_checks_use_no_bare_assert(module: object) -> None:
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    lines = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert lines == [], f"assert statements (gone under python -O) at lines {lines}"


def test_a_contract_error_is_an_assertion_error() -> None:
    assert issubclass(bus.testing.ContractError, AssertionError)


def test_every_shipped_broker_has_a_contract_run() -> None:
    # A Redis run that cannot be set up is a skip with its reason (a failure in CI),
    # never a run that silently is not there.
    assert set(FACTORIES) == {"memory", "redis"}


def test_a_run_that_cannot_be_set_up_skips_or_fails_as_required(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    factory = unavailable("no module named 'redis'")
    monkeypatch.delenv("BUS_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no module named 'redis'"):
        factory(request)
    monkeypatch.setenv("BUS_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="BUS_REQUIRE_REDIS=1 requires it"):
        factory(request)


def test_the_redis_run_is_reported_when_its_support_cannot_be_imported() -> None:
    # Without the support module the suite still collects a Redis run: it fails under
    # BUS_REQUIRE_REDIS=1 (and says why), where it used to vanish.
    code = (
        "import sys, pytest; sys.modules['tests.redis.support'] = None; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rfE', "
        "'tests/contract/test_contract.py', '-k', 'kiq_then_wait_result']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "BUS_REQUIRE_REDIS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "1 error" in proc.stdout, proc.stdout
    assert "cannot import its support" in proc.stdout
