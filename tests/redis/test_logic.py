"""The Redis broker's pure decisions, without Redis."""

from __future__ import annotations

import pytest

from bus.redis._logic import (
    Keys,
    check_entry,
    join_member,
    over_delivered,
    sign,
    sign_entry,
    split_member,
)


def test_keys_are_namespaced_and_share_one_hash_tag() -> None:
    k = Keys("bus", "emails")
    assert k.stream == b"{bus:emails}:stream"
    assert k.delayed == b"{bus:emails}:delayed"
    assert k.dead == b"{bus:emails}:dead"
    assert k.workers == b"{bus:emails}:workers"
    assert k.cancel_channel == b"{bus:emails}:cancel"
    assert k.cancel_marker("abc") == b"{bus:emails}:cancelled:abc"
    # A Redis Cluster hashes only what is inside the braces: one slot per queue.
    tags = {key.split(b"}")[0] for key in (k.stream, k.delayed, k.dead, k.workers)}
    assert tags == {b"{bus:emails"}


def test_sign_is_empty_without_secret_and_hmac_with_one() -> None:
    assert sign(None, b"x") == b""
    s = sign(b"k", b"x")
    assert len(s) == 64
    assert s == sign(b"k", b"x")
    assert s != sign(b"other", b"x")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (None, "no fields"),
        ({}, "no fields"),
        ({b"x": b"1"}, "no message field"),
        ({b"d": b"y" * 11}, "exceeds max_message_bytes=10"),
    ],
)
def test_check_entry_rejects(fields: dict[bytes, bytes] | None, reason: str) -> None:
    _, why = check_entry(fields, None, 10)  # type: ignore[arg-type]
    assert why is not None
    assert reason in why


def test_check_entry_keeps_little_of_huge_payloads() -> None:
    kept, why = check_entry({b"d": b"z" * 5000}, None, 100)
    assert why is not None
    assert len(kept) == 1024


def test_check_entry_signatures() -> None:
    data = b'{"id":1}'
    stream = Keys("bus", "q").stream
    assert check_entry({b"d": data}, None, 100, stream) == (data, None)
    good = sign_entry(b"k", stream, data)
    assert check_entry({b"d": data, b"s": good}, b"k", 100, stream) == (data, None)
    assert check_entry({b"d": data}, b"k", 100, stream)[1] == "message is not signed"
    assert check_entry({b"d": data, b"s": b"0" * 64}, b"k", 100, stream)[1] == (
        "message signature is wrong"
    )
    # The plain HMAC of the data (the format of old) is not an entry signature.
    assert check_entry({b"d": data, b"s": sign(b"k", data)}, b"k", 100, stream)[1] == (
        "message signature is wrong"
    )


def test_delayed_members_round_trip() -> None:
    for sig in (b"", sign(b"k", b"data\nwith newline")):
        assert split_member(join_member(sig, b"data\nwith newline")) == (
            sig,
            b"data\nwith newline",
        )


def test_over_delivered() -> None:
    assert not over_delivered(5, 5)
    assert over_delivered(6, 5)
    assert not over_delivered(1000, None)
