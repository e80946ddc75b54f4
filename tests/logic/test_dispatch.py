"""The sans-I/O parts of queues, priorities and limits: ReadyQueues, Parking,
LocalLimits and the placement options."""

from __future__ import annotations

import math

import pytest

from bus._limits import LocalLimits, Parking, TaskLimits, limit, parse_rate, placement
from bus._ready import Consumer, ReadyQueues

# ------------------------------------------------------------------ ReadyQueues


def test_fifo_within_a_level_and_the_most_urgent_level_first() -> None:
    ready: ReadyQueues[str] = ReadyQueues()
    for i in range(3):
        ready.put("q", 0, f"low{i}")
    ready.put("q", 9, "high0")
    ready.put("q", 9, "high1")
    c = Consumer(["q"])
    assert [ready.take(c) for _ in range(6)] == ["high0", "high1", "low0", "low1", "low2", None]
    assert len(ready) == 0


def test_front_puts_an_item_ahead_of_its_level() -> None:
    ready: ReadyQueues[str] = ReadyQueues()
    ready.put("q", 3, "a")
    ready.put("q", 3, "back", front=True)
    assert ready.take(Consumer(["q"])) == "back"


def test_a_consumer_takes_only_from_its_queues_and_turns_between_them() -> None:
    ready: ReadyQueues[str] = ReadyQueues()
    for i in range(3):
        ready.put("a", 0, f"a{i}")
        ready.put("b", 0, f"b{i}")
        ready.put("c", 0, f"c{i}")
    both = Consumer(["a", "b"])
    assert [ready.take(both) for _ in range(6)] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert ready.take(both) is None
    assert ready.count("c") == 3
    every = Consumer(None)
    assert ready.take(every) == "c0"


def test_priority_goes_across_the_queues_of_a_consumer() -> None:
    ready: ReadyQueues[str] = ReadyQueues()
    ready.put("a", 0, "a-low")
    ready.put("b", 5, "b-mid")
    ready.put("a", 9, "a-high")
    c = Consumer(["a", "b"])
    assert [ready.take(c) for _ in range(3)] == ["a-high", "b-mid", "a-low"]


def test_low_levels_get_their_bounded_share() -> None:
    ready: ReadyQueues[str] = ReadyQueues()
    for _ in range(100):
        ready.put("q", 0, "low")
    for _ in range(100):
        ready.put("q", 9, "high")
    c = Consumer(["q"])
    first = [ready.take(c) for _ in range(22)]
    assert first.count("low") == 2  # one pick in eleven
    assert first[10] == "low" and first[21] == "low"


def test_counts_and_remove_if() -> None:
    ready: ReadyQueues[int] = ReadyQueues()
    for i in range(6):
        ready.put("q", i % 2 * 9, i)
    assert ready.count("q") == 6 and ready.count("q", 9) == 3 and ready.count("nope") == 0
    assert ready.by_level("q") == {9: 3, 0: 3}
    assert sorted(ready.remove_if(lambda i: i < 2)) == [0, 1]
    assert len(ready) == 4 and ready.by_level("q") == {9: 2, 0: 2}
    assert ready.queue_names() == ["q"]


# ------------------------------------------------------------------ Parking


def test_a_parked_key_ripens_at_its_time_and_keeps_its_order() -> None:
    p: Parking[str] = Parking()
    p.park("k", "a", 10.0)
    p.park("k", "b", 1.0)  # behind "a": its time does not apply
    assert p.waiting("k") and len(p) == 2 and p.count("k") == 2
    assert p.next_retry() == 10.0
    assert p.due(9.9) == []
    assert p.due(10.0) == ["k"]
    assert p.next_retry() == math.inf  # ripe keys wait for a runner, not for time
    assert p.due(10.5) == ["k"]  # still ripe until handled
    assert p.pop("k") == "a"
    assert p.due(10.5) == ["k"]  # "b" may start too
    p.park("k", "b2", 12.0, front=True)  # "b" stays: "b2" could not start yet
    assert p.due(11.0) == [] and p.next_retry() == 12.0
    assert p.pop("k") == "b2" and p.pop("k") == "b" and p.pop("k") is None
    assert not p.waiting("k") and len(p) == 0


def test_a_key_waiting_for_a_release_ripens_when_woken() -> None:
    p: Parking[str] = Parking()
    p.park("slot", "x", math.inf)
    assert p.next_retry() == math.inf and p.due(1e9) == []
    p.wake("slot")
    p.wake("unknown")  # nothing waits for it: nothing happens
    assert p.due(0.0) == ["slot"]
    assert p.peek("slot") == "x"


def test_ripe_keys_come_oldest_first_and_remove_if_forgets_empty_keys() -> None:
    p: Parking[int] = Parking()
    p.park("b", 1, 2.0)
    p.park("a", 2, 1.0)
    p.park("a", 3, 0.0)
    assert p.due(5.0) == ["a", "b"]
    assert sorted(p.remove_if(lambda i: i != 3)) == [1, 2]
    assert p.due(5.0) == ["a"] and p.items() == [3]
    assert not p.waiting("b")


# ------------------------------------------------------------------ LocalLimits


def _limits(rate: str | None = None, max_running: int | None = None, burst: int = 1) -> TaskLimits:
    lim = None if rate is None else limit("task:t", rate, burst=burst)
    return TaskLimits(lim, max_running, "task:t")


def test_local_limits_take_a_slot_then_a_token() -> None:
    local = LocalLimits()
    both = _limits("2/s", max_running=1)
    assert both.wait_keys == ("running:task:t", "rate:task:t")
    assert local.admit(both, "a", 0.0).ok
    no_slot = local.admit(both, "b", 0.0)
    assert (no_slot.ok, no_slot.key, no_slot.retry_at) == (False, "running:task:t", math.inf)
    assert local.release(both, "a") == "running:task:t"
    assert local.release(both, "a") is None  # given back once
    no_token = local.admit(both, "b", 0.1)
    assert (no_token.ok, no_token.key) == (False, "rate:task:t")
    assert no_token.retry_at == pytest.approx(0.5)
    assert local.running.running("task:t", 0.1) == 0  # the slot went back with the refusal
    assert local.admit(both, "b", 0.5).ok


def test_local_limits_keep_the_rate() -> None:
    local = LocalLimits()
    rate = _limits("10/s", burst=3)
    starts, now = [], 0.0
    while len(starts) < 23:
        a = local.admit(rate, "x", now)
        if a.ok:
            starts.append(now)
        else:
            now = a.retry_at
    assert starts[:3] == [0.0, 0.0, 0.0]
    assert starts[-1] == pytest.approx(2.0)


def test_placement_reads_the_options() -> None:
    p = placement("reports.build", {"queue": "reports", "priority": 3, "timeout": 5})
    assert (p.queue, p.priority, p.limits) == ("reports", 3, None)
    p = placement("t", {"rate_limit": "5/m", "max_running": 2})
    assert p.limits == TaskLimits(limit("task:t", parse_rate("5/m")), 2, "task:t")
    shared = limit("api", "10/s")
    assert placement("t", {"rate_limit": shared}).limits == TaskLimits(shared, None, "task:t")
    with pytest.raises(TypeError, match="rate_limit"):
        placement("t", {"rate_limit": 10})
