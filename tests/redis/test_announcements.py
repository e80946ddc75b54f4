"""Result announcements joined (issue #22): the results a worker stores together are
announced with one ``PUBLISH`` (``RedisResultBackend.announce_commands``), and a waiting
process wakes every waiter of such a batch. What a batch carries is parsed without
trusting it: a malformed one yields what came before the fault, never an exception,
and with a secret each result in it is checked on its own."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
import trio
from hypothesis import given
from hypothesis import strategies as st

import bus
from bus.redis import RedisBroker, RedisResultBackend
from bus.redis._logic import BATCH_MARK, join_announcements, split_announcements
from bus.redis._results import _ANNOUNCE_BATCH
from tests.faults.test_store_soon import Confirmations
from tests.redis.server import RedisServer

SECRET = b"k" * 32

# ------------------------------------------------------------------- the format


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_a_batch_splits_into_what_was_joined(payloads: list[bytes]) -> None:
    assert split_announcements(join_announcements(payloads)) == payloads


def test_a_single_announcement_is_itself() -> None:
    tid = bus.TaskID.new()
    single = tid.encode() + b'{"r":1}'
    assert split_announcements(single) == [single]


@given(st.binary(max_size=200))
def test_any_bytes_after_the_mark_parse_without_raising(tail: bytes) -> None:
    parts = split_announcements(BATCH_MARK + tail)
    # Each piece is a slice of the payload, in order: never more bytes than it has.
    assert sum(len(p) for p in parts) <= len(tail)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"*3:abc2:de", [b"abc", b"de"]),
        (b"*3:abc9:de", [b"abc"]),  # a length past the end: stops there
        (b"*3:abcxx:de", [b"abc"]),  # not a length
        (b"*3:abc:de", [b"abc"]),  # an empty length
        (b"*3:abc" + b"9" * 30 + b":x", [b"abc"]),  # more digits than any length has
        (b"*-1:x", []),
        (b"*", []),
    ],
)
def test_a_malformed_batch_yields_what_came_before_the_fault(
    payload: bytes, expected: list[bytes]
) -> None:
    assert split_announcements(payload) == expected


def _stores(backend: RedisResultBackend, n: int) -> tuple[list[bus.TaskID], list[Any]]:
    ids = [bus.TaskID.new() for _ in range(n)]
    commands: list[Any] = []
    for i, tid in enumerate(ids):
        result = bus.TaskResult(tid, bus.TaskStatus.SUCCESS, i)
        commands += backend.store_commands(tid, backend.codec.encode_result(result), only_new=False)
    return ids, commands


def test_the_stores_of_a_batch_are_announced_in_one_publish_per_batch_of_results() -> None:
    backend = RedisResultBackend(secret=SECRET)
    ids, commands = _stores(backend, _ANNOUNCE_BATCH + 3)
    joined = backend.announce_commands(commands)
    publishes = [c for c in joined if c[0] == "PUBLISH"]
    assert len(publishes) == 2  # 64, then 3
    # Every other command kept, in order; the announcements after them.
    assert [c for c in joined if c[0] != "PUBLISH"] == [c for c in commands if c[0] != "PUBLISH"]
    assert joined[-2:] == publishes
    singles = [s for p in publishes for s in split_announcements(p[2])]
    assert [backend.announced_id(s) for s in singles] == ids
    for i, single in enumerate(singles):
        found = backend.parse_announcement(single)
        assert found is not None and found[0] == ids[i]
        result = backend.open(*found)
        assert result is not None
        assert result.return_value == i
    # One store alone: its own announcement, unchanged.
    _, one = _stores(backend, 1)
    assert backend.announce_commands(one) == one


# ------------------------------------------------------------------ on Redis


def _broker(
    url: str, secret: bytes | None = None, **backend_options: Any
) -> tuple[RedisBroker, RedisResultBackend]:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    backend = RedisResultBackend(url, prefix=prefix, secret=secret, **backend_options)
    broker = RedisBroker(url, prefix=prefix, queue="q", result_backend=backend, secret=secret)
    return broker, backend


async def _subscribed(broker: RedisBroker, backend: RedisResultBackend) -> None:
    while True:
        reply = await broker.client.execute("PUBSUB", "NUMSUB", backend.channel)
        if reply[1]:
            return
        await trio.sleep(0.01)


@pytest.mark.redis
async def test_one_publish_wakes_every_waiter_of_its_batch(redis_server: RedisServer) -> None:
    """No result key is written: only the joined announcement can wake the waiters (a
    waiter's own read finds nothing), and one forged result in it wakes nobody."""
    broker, backend = _broker(redis_server.url, secret=SECRET)
    ids, commands = _stores(backend, 5)
    forged_id = bus.TaskID.new()
    forged = bus.TaskResult(forged_id, bus.TaskStatus.SUCCESS, 666)
    unsigned = forged_id.encode() + backend.codec.encode_result(forged)
    publish = backend.announce_commands(commands)[-1]
    payload = join_announcements([*split_announcements(publish[2]), unsigned])
    got: dict[bus.TaskID, Any] = {}
    all_woken = trio.Event()
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        async with broker, trio.open_nursery() as nursery:

            async def wait(tid: bus.TaskID) -> None:
                got[tid] = (await backend.wait_result(tid)).return_value
                if len(got) == len(ids):
                    all_woken.set()

            for tid in [*ids, forged_id]:
                nursery.start_soon(wait, tid)
            await _subscribed(broker, backend)
            await broker.client.execute("PUBLISH", backend.channel, payload)
            # The whole batch is handled at once: the forged one was refused by then.
            await all_woken.wait()
            nursery.cancel_scope.cancel()
    assert got == {tid: i for i, tid in enumerate(ids)}
    assert [e["task_id"] for e in logs if e["event"] == "results.refused"] == [forged_id]


@pytest.mark.redis
async def test_a_store_of_a_joined_batch_whose_announcement_fails_is_told_so_once(
    redis_server: RedisServer,
) -> None:
    """The replies of a joined batch are not each store's own: on an error reply (here a
    user that may not PUBLISH), each store is written again alone and told its own
    outcome, once."""
    url = redis_server.url
    admin, _ = _broker(url)
    async with admin:
        await admin.client.execute(
            "ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish"
        )
    limited = url.replace("redis://", "redis://nopub:pw@", 1)
    broker, backend = _broker(limited, write_timeout=1.0)
    seen = Confirmations()
    ids = [bus.TaskID.new() for _ in range(6)]
    with trio.fail_after(20):
        async with broker:
            for n, tid in enumerate(ids):  # one scheduler pass: one joined batch
                result = bus.TaskResult(tid, bus.TaskStatus.SUCCESS, n)
                assert backend.set_result_soon(tid, result, seen.stored(n))
            await seen.wait(len(ids))
    # Each told once (the broker stopped: no call can come later), with the error.
    assert sorted(n for n, _ in seen.calls) == list(range(len(ids)))
    for _, error in seen.calls:
        assert isinstance(error, Exception)
        assert "publish" in str(error).lower(), error


@pytest.mark.redis
async def test_a_waiter_is_woken_from_a_batch_of_other_tasks_and_junk(
    redis_server: RedisServer,
) -> None:
    """A process receives the announcements of every task; those it does not wait for,
    and pieces that are not announcements at all (short, not ASCII, its own task's id
    upper-cased with a forged value), are passed over without being opened: the one
    result waited for wakes its waiter, and nothing is refused or logged."""
    broker, backend = _broker(redis_server.url, secret=SECRET)
    _, commands = _stores(backend, 40)
    mine = bus.TaskID.new()
    result = bus.TaskResult(mine, bus.TaskStatus.SUCCESS, "mine")
    stored = backend.store_commands(mine, backend.codec.encode_result(result), only_new=False)
    ours = next(c[2] for c in stored if c[0] == "PUBLISH")
    forged = bus.TaskResult(mine, bus.TaskStatus.SUCCESS, "forged")
    upper = mine.upper().encode() + backend.codec.encode_result(forged)
    pieces = [
        *(c[2] for c in commands if c[0] == "PUBLISH"),
        b"short",
        b"\xff" * 40,
        upper,
        ours,
    ]
    with trio.fail_after(20), structlog.testing.capture_logs() as logs:
        got: list[Any] = []
        async with broker, trio.open_nursery() as nursery:

            async def wait() -> None:
                got.append((await backend.wait_result(mine)).return_value)

            nursery.start_soon(wait)
            await _subscribed(broker, backend)
            await broker.client.execute("PUBLISH", backend.channel, join_announcements(pieces))
    assert got == ["mine"]
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
