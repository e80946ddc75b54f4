"""The Redis client benchmark runs end to end with a tiny count (no timing is asserted),
every client's code path included (``tests/bench/peers.py``: BUS_REQUIRE_PEERS)."""

from __future__ import annotations

import re

import pytest

from tests.bench.peers import need_redis_server, peer, run_benchmark

pytestmark = pytest.mark.redis


def test_bench_client_runs_and_prints_both_tables() -> None:
    need_redis_server()
    if not peer("redis"):
        pytest.skip("redis-py (the harness's own client and a peer) is not installed")
    coredis = peer("coredis")
    out = run_benchmark("bench_client.py", "--count", "64", "--repeat", "1", "--inflight", "8")
    assert "sequential GET (us/command)" in out, out
    assert "8 in flight on one connection" in out, out
    for client in ("ours (trio)", "bare trio + hiredis", "bare, reader task", "redis-py (sync)"):
        assert client in out, out
    assert "sequential GET interleaved in blocks of" in out, out
    assert re.search(r"ours / bare one-task, interleaved .*: \d+\.\d\dx", out), out
    # The issue #22 goal, read straight off the output.
    assert re.search(r"ours / bare one-task \(issue #22 goal: <= 1\.20x\): \d+\.\d\dx", out), out
    assert ("coredis (trio)" in out) == coredis, out


def test_bench_client_against_a_revision() -> None:
    """``--against REV``: our client at REV and this tree's, each in its own process."""
    need_redis_server()
    if not peer("redis"):
        pytest.skip("redis-py (the harness's own client) is not installed")
    out = run_benchmark(
        "bench_client.py", "--count", "32", "--repeat", "1", "--inflight", "8", "--against", "HEAD"
    )
    assert "ours, own process" in out and "ours at HEAD" in out, out
    assert re.search(r"ours / ours at HEAD \(each in a process of its own\): \d+\.\d\dx", out), out
