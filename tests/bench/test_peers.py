"""The smoke tests' check of the peers: a missing one fails under BUS_REQUIRE_PEERS=1."""

from __future__ import annotations

import pytest

from tests.bench.peers import peer


def test_an_installed_peer_is_there() -> None:
    assert peer("trio", "attrs")


def test_a_missing_peer_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUS_REQUIRE_PEERS", raising=False)
    assert not peer("trio", "no_such_peer_module")
    assert not peer("no_such_peer_module.sub")


def test_a_missing_peer_fails_when_peers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match=r"no_such_peer_module.*BUS_REQUIRE_PEERS=1"):
        peer("trio", "no_such_peer_module")
