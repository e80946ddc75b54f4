"""The --processes supervisor uses the actors' restart limit and backoff."""

from __future__ import annotations

import pytest
import structlog
import trio

from actors import Backoff
from bus._cli import PROCESS_BACKOFF, _supervise


async def test_a_crash_loop_gives_up_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # Quick restarts for the test; the rule (limit within a window) is the actors'.
    monkeypatch.setattr("bus._cli.PROCESS_BACKOFF", Backoff(initial=0.01, cap=0.05))
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        code = await _supervise(["worker", "tests.cli.crash_app:broker"], 2, 5.0, 3, 60.0)
    assert code == 1
    crashes = [e for e in logs if e["event"] == "supervisor.crashed"]
    assert len(crashes) == 4  # three restarts allowed, the fourth crash gives up
    assert all(e["code"] == 3 for e in crashes)
    (giving_up,) = [e for e in logs if e["event"] == "supervisor.giving_up"]
    assert "more than 3 times within 60 s" in giving_up["reason"]


def test_the_backoff_is_an_actors_backoff() -> None:
    assert isinstance(PROCESS_BACKOFF, Backoff)
    assert PROCESS_BACKOFF.delay(1, rand=0) == 0.5
    assert PROCESS_BACKOFF.delay(10, rand=0) == 10.0
