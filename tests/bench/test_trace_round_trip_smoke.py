"""The round-trip tracer runs end to end with tiny counts (no timing is asserted): the
producer's and the worker's timelines, each with the socket writes and task steps of
a round trip."""

from __future__ import annotations

import re

import pytest

from tests.bench.peers import need_redis_server, run_benchmark

pytestmark = pytest.mark.redis


def test_trace_round_trip_prints_both_timelines() -> None:
    need_redis_server()
    pytest.importorskip("hiredis")
    out = run_benchmark("trace_round_trip.py", "--rounds", "30")
    assert re.search(r"30 round trips, p50 \d+ us \(traced\)", out), out
    producer, _, worker = out.partition("\nworker: ")
    assert "producer: the most common sequence" in producer, out
    # The producer writes its XADD and is woken by the announcement; the worker
    # reads the entry, runs the task in a runner's step and writes the result.
    assert re.search(r"\bW \d+", producer) and " done" in producer, out
    assert "S StreamReaderActor._read_forever" in worker, out
    assert "S WorkerActor._runner" in worker, out
    assert re.search(r"\bW \d+", worker) and " done" in worker, out
