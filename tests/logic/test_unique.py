"""Unique jobs: keys, the in-memory table, and the Redis scripts against a real server."""

from __future__ import annotations

import time

import pytest
import redis

from bus._ids import TaskID
from bus._unique import (
    CLAIM_LUA,
    RELEASE_LUA,
    UniqueTable,
    canonical_args,
    ttl_ms,
    unique_key,
)

A = TaskID.new()
B = TaskID.new()
C = TaskID.new()


def test_canonical_args_sorts_keys_and_is_compact() -> None:
    assert canonical_args((1, "é"), {"b": 2, "a": [1, {"z": 0, "y": 1}]}) == (
        '[[1,"é"],{"a":[1,{"y":1,"z":0}],"b":2}]'.encode()
    )
    assert canonical_args((), {"x": 1, "y": 2}) == canonical_args((), {"y": 2, "x": 1})
    assert canonical_args(((1, 2),), {}) == canonical_args(([1, 2],), {})
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_args((float("nan"),), {})
    with pytest.raises(TypeError):
        canonical_args((object(),), {})


def test_unique_key_default_hashes_the_arguments() -> None:
    k = unique_key("emails.send", canonical_args((1,), {"to": "a"}), None)
    assert k.startswith("emails.send:args:")
    assert len(k) == len("emails.send:args:") + 64
    assert k == unique_key("emails.send", canonical_args((1,), {"to": "a"}), None)
    assert k != unique_key("emails.send", canonical_args((2,), {"to": "a"}), None)
    assert k != unique_key("emails.other", canonical_args((1,), {"to": "a"}), None)


def test_unique_key_of_the_caller_is_used_as_is() -> None:
    assert unique_key("emails.send", b"ignored", "user:42") == "emails.send:key:user:42"
    digest = unique_key("t", b"x", None).rsplit(":", 1)[1]
    assert unique_key("t", b"x", f"args:{digest}") != unique_key("t", b"x", None)
    with pytest.raises(ValueError, match="unique key"):
        unique_key("t", b"", "")
    with pytest.raises(ValueError, match="task name"):
        unique_key("", b"", None)


def test_ttl_ms() -> None:
    assert ttl_ms(1) == 1000
    assert ttl_ms(0.0001) == 1
    assert ttl_ms(1.0001) == 1001
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            ttl_ms(bad)


def test_claim_returns_the_holder() -> None:
    table = UniqueTable()
    assert table.claim("k", A, now=0, ttl=10) == A
    assert table.claim("k", B, now=5, ttl=10) == A  # held: the holder comes back
    assert table.claim("k", A, now=5, ttl=10) == A  # the holder again: unchanged
    assert table.holder("k", 9.99) == A  # ...with its first deadline
    assert table.claim("other", B, now=5, ttl=10) == B
    assert len(table) == 2


def test_claim_after_expiry() -> None:
    table = UniqueTable()
    table.claim("k", A, now=0, ttl=10)
    assert table.holder("k", 10) is None  # the deadline is exclusive
    assert table.claim("k", B, now=10, ttl=10) == B
    assert table.release_task(A) == 0  # A's expired hold is gone


def test_release_only_by_the_holder() -> None:
    table = UniqueTable()
    table.claim("k", A, now=0, ttl=10)
    assert table.release("k", B) is False
    assert table.holder("k", 1) == A
    assert table.release("k", A) is True
    assert table.release("k", A) is False
    assert table.claim("k", B, now=1, ttl=10) == B


def test_release_task_frees_all_its_keys() -> None:
    table = UniqueTable()
    table.claim("k1", A, now=0, ttl=10)
    table.claim("k2", A, now=0, ttl=10)
    table.claim("k3", B, now=0, ttl=10)
    assert table.release_task(A) == 2
    assert table.holder("k1", 1) is None
    assert table.holder("k3", 1) == B
    assert table.release_task(C) == 0


def test_prune_drops_expired_entries() -> None:
    table = UniqueTable()
    table.claim("k1", A, now=0, ttl=1)
    table.claim("k2", B, now=0, ttl=5)
    table.claim("k3", A, now=0, ttl=9)
    assert table.prune(5) == 2
    assert len(table) == 1
    assert table.holder("k3", 5) == A
    assert table.release_task(A) == 1
    assert table.release_task(B) == 0


def test_claim_validates_ttl() -> None:
    with pytest.raises(ValueError, match="ttl"):
        UniqueTable().claim("k", A, now=0, ttl=0)
    with pytest.raises(TypeError, match="ttl"):
        UniqueTable().claim("k", A, now=0, ttl="1")  # type: ignore[arg-type]


@pytest.mark.redis
def test_lua_claim_and_release(redis_client: redis.Redis, key_prefix: str) -> None:
    claim = redis_client.register_script(CLAIM_LUA)
    release = redis_client.register_script(RELEASE_LUA)
    key = f"{key_prefix}:unique:{unique_key('t', canonical_args((1,), {}), None)}"
    assert claim(keys=[key], args=[A, ttl_ms(10)]) == A.encode()
    assert 9000 < redis_client.pttl(key) <= 10000
    assert claim(keys=[key], args=[B, ttl_ms(10)]) == A.encode()  # the holder comes back
    assert claim(keys=[key], args=[A, ttl_ms(10)]) == A.encode()
    assert release(keys=[key], args=[B]) == 0  # not the holder: nothing happens
    assert redis_client.get(key) == A.encode()
    assert release(keys=[key], args=[A]) == 1
    assert redis_client.exists(key) == 0
    assert release(keys=[key], args=[A]) == 0
    assert claim(keys=[key], args=[B, ttl_ms(10)]) == B.encode()


@pytest.mark.redis
def test_lua_claim_expires(redis_client: redis.Redis, key_prefix: str) -> None:
    claim = redis_client.register_script(CLAIM_LUA)
    key = f"{key_prefix}:unique:k"
    assert claim(keys=[key], args=[A, 1]) == A.encode()  # held for 1 ms
    deadline = time.monotonic() + 5
    while (holder := claim(keys=[key], args=[B, 60_000])) == A.encode():
        assert time.monotonic() < deadline, "the claim never expired"
    assert holder == B.encode()
    assert redis_client.get(key) == B.encode()
