"""The workflows benchmark runs end to end with tiny sizes (no timing is asserted).

Celery is in the ``bench`` extra: without it the benchmark measures ours alone and this
test checks that it says so, unless BUS_REQUIRE_PEERS=1 (``tests/bench/peers.py``)."""

from __future__ import annotations

import pytest

from tests.bench.peers import need_redis_server, peer, run_benchmark

pytestmark = pytest.mark.redis


def test_bench_workflows_runs_and_prints_the_ratios() -> None:
    need_redis_server()
    celery = peer("celery", "redis")
    out = run_benchmark("bench_workflows.py", "--chord", "20", "--chain", "5", "--repeat", "1")
    assert "chord 20 + body, end to end" in out, out
    assert "chain of 5, end to end" in out, out
    assert "a chord step costs" in out, out
    assert "a chain step costs" in out, out
    if celery:
        assert "chord: trio-bus is" in out, out
        assert "chain: trio-bus is" in out, out
    else:
        assert "celery is not installed" in out, out
