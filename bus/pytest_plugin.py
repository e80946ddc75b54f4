"""The bus's pytest plugin (registered as the ``bus`` pytest11 entry point).

Fixtures, for pytest-trio tests:

- ``bus_broker``: a running :class:`~bus.InMemoryBroker` (entered; stopped after the
  test), for tasks a test declares itself;
- ``bus_in_memory``: :func:`bus.testing.in_memory`, to run the tasks of your
  application's broker (a ``RedisBroker`` at module level) in memory;
- ``bus_redis_url``: the URL of a private ``redis-server`` started for the session
  on a free port (the test is skipped when no ``redis-server`` is installed, and
  fails instead when the environment sets ``BUS_REQUIRE_REDIS=1``, as a CI should).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import pytest

import bus
from bus.testing import in_memory

__all__ = ["bus_broker", "bus_in_memory", "bus_redis_url"]


@pytest.fixture
async def bus_broker() -> AsyncIterator[bus.InMemoryBroker]:
    """A running in-memory broker with a worker (see ``bus.testing.run_broker``)."""
    broker = bus.InMemoryBroker()
    async with broker:
        yield broker


@pytest.fixture
def bus_in_memory() -> object:
    """``async with bus_in_memory(app.broker) as mem:`` runs ``app.broker``'s tasks in
    memory (see ``bus.testing.in_memory``)."""
    return in_memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _missing(what: str) -> NoReturn:
    """Skip the test for want of ``what``, or fail it when ``BUS_REQUIRE_REDIS=1``
    says that nothing may be missing (in CI a missing piece is a failure)."""
    if os.environ.get("BUS_REQUIRE_REDIS") == "1":
        pytest.fail(f"{what}, and BUS_REQUIRE_REDIS=1 requires it", pytrace=False)
    pytest.skip(f"{what} (set BUS_REQUIRE_REDIS=1 to fail instead)")


@pytest.fixture(scope="session")
def bus_redis_url() -> Iterator[str]:
    """A private redis-server for the test session (no persistence, on 127.0.0.1).

    Skipped when no ``redis-server`` is installed; failed instead under
    ``BUS_REQUIRE_REDIS=1``."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server is not installed")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bus-redis-") as directory:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the private redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)
