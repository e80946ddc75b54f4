"""The in-memory broker's decisions (``bus._queue.QueueCore``): plain synchronous state,
tested without Trio. The time is a number passed in; nothing here awaits."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from bus._ids import TaskID
from bus._protocol import Delivery
from bus._queue import DELAYED, QUEUED, TAKEN, QueueCore


def delivery(n: int = 0, *, slot: bool = True, tid: TaskID | None = None) -> Delivery:
    """An in-memory delivery: its tag is ``(task_id, holds_slot)``."""
    return Delivery(data=f"message {n}".encode(), tag=(tid or TaskID.new(), slot))


def counts(core: QueueCore) -> tuple[int, int, int]:
    return core.queued, core.delayed_count, core.running


# --- sending, taking, finishing -------------------------------------------------------


def test_a_send_without_delay_is_ready_at_once() -> None:
    core = QueueCore()
    d = delivery()
    assert core.idle
    assert core.send(d, 0.0, now=5.0) is True
    assert core.state == {d: QUEUED}
    assert counts(core) == (1, 0, 0)
    assert not core.idle
    assert core.next_due() == math.inf


def test_a_taken_delivery_runs_once_and_its_finish_makes_the_core_idle() -> None:
    core = QueueCore()
    d = delivery()
    core.send(d, 0.0, 0.0)
    assert core.take(d) is True
    assert counts(core) == (0, 0, 1)
    assert core.take(d) is False  # already taken: never run twice
    assert core.finish(d) is True  # nothing pending any more
    assert core.idle
    assert counts(core) == (0, 0, 0)
    assert core.by_id == {}


def test_finish_says_idle_only_when_the_last_delivery_is_done() -> None:
    core = QueueCore()
    a, b = delivery(1), delivery(2)
    core.send(a, 0.0, 0.0)
    core.send(b, 0.0, 0.0)
    core.take(a)
    assert core.finish(a) is False
    core.take(b)
    assert core.finish(b) is True


def test_a_delivery_it_does_not_know_is_never_run() -> None:
    # e.g. one still in the ready channel after a shutdown finished it
    assert QueueCore().take(delivery()) is False


# --- delays ---------------------------------------------------------------------------


def test_a_delayed_delivery_waits_for_its_time() -> None:
    core = QueueCore()
    d = delivery()
    assert core.send(d, 2.0, now=10.0) is False
    assert core.state == {d: DELAYED}
    assert counts(core) == (0, 1, 0)
    assert core.next_due() == 12.0
    assert core.due(11.999) == []
    assert core.due(12.0) == [d]
    assert core.state == {d: QUEUED}
    assert counts(core) == (1, 0, 0)
    assert core.next_due() == math.inf
    assert core.due(100.0) == []  # handed out once


def test_delayed_deliveries_come_due_in_time_order_and_equal_times_in_send_order() -> None:
    core = QueueCore()
    late, first, second = delivery(1), delivery(2), delivery(3)
    core.send(late, 5.0, 0.0)
    core.send(first, 1.0, 0.0)
    core.send(second, 1.0, 0.0)
    assert core.next_due() == 1.0
    assert core.due(1.0) == [first, second]
    assert core.next_due() == 5.0
    assert core.due(10.0) == [late]


# --- retries --------------------------------------------------------------------------


def test_a_requeue_replaces_the_delivery_with_its_next_attempt() -> None:
    core = QueueCore()
    tid = TaskID.new()
    first = delivery(1, tid=tid)
    retry = Delivery(data=b"attempt 2", tag=(tid, False))  # retries hold no slot
    core.send(first, 0.0, 0.0)
    core.take(first)
    assert core.requeue(first, retry, 0.5, now=3.0) is False
    assert core.state == {retry: DELAYED}
    assert core.by_id == {tid: retry}
    assert core.next_due() == 3.5
    assert core.due(3.5) == [retry]
    assert core.take(retry) is True
    assert core.finish(retry) is True


def test_a_requeue_without_delay_is_ready_at_once() -> None:
    core = QueueCore()
    tid = TaskID.new()
    first, retry = delivery(1, tid=tid), delivery(2, slot=False, tid=tid)
    core.send(first, 0.0, 0.0)
    core.take(first)
    assert core.requeue(first, retry, 0.0, 0.0) is True
    assert counts(core) == (1, 0, 0)


# --- dead letters ---------------------------------------------------------------------


def test_a_dead_letter_keeps_the_reason_and_the_encoded_message() -> None:
    core = QueueCore()
    d = delivery(7)
    core.send(d, 0.0, 0.0)
    core.take(d)
    assert core.dead_letter(d, "unknown task 'x'") is True
    assert list(core.dead) == [("unknown task 'x'", b"message 7")]
    assert core.idle


def test_dead_letters_beyond_the_maximum_drop_the_oldest() -> None:
    core = QueueCore(dead_letter_max=2)
    for n in range(3):
        d = delivery(n)
        core.send(d, 0.0, 0.0)
        core.take(d)
        core.dead_letter(d, f"reason {n}")
    assert list(core.dead) == [("reason 1", b"message 1"), ("reason 2", b"message 2")]


# --- cancellation ---------------------------------------------------------------------


def test_cancelling_a_queued_task_finishes_it_and_its_delivery_is_skipped() -> None:
    core = QueueCore()
    d = delivery()
    core.send(d, 0.0, 0.0)
    tid = d.tag[0]
    # a queued one's place is freed when it leaves the ready channel, not now
    assert core.cancel(tid) == ("unstarted", d, False)
    assert core.idle
    assert d in core.tombstones
    assert core.take(d) is False  # it leaves the channel: skipped, never run
    assert core.tombstones == set()
    assert core.cancel(tid) == ("unknown", None, False)


def test_cancelling_a_delayed_task_frees_its_place_and_it_never_comes_due() -> None:
    core = QueueCore()
    d = delivery(slot=True)
    core.send(d, 1.0, 0.0)
    assert core.cancel(d.tag[0]) == ("unstarted", d, True)
    assert core.idle
    assert core.next_due() == math.inf  # the tombstone is dropped from the heap
    assert core.tombstones == set()
    assert core.due(5.0) == []


def test_a_cancelled_delayed_retry_frees_no_place() -> None:
    core = QueueCore()
    d = delivery(slot=False)
    core.send(d, 1.0, 0.0)
    assert core.cancel(d.tag[0]) == ("unstarted", d, False)
    assert core.due(5.0) == []  # skipped by due() as well
    assert core.tombstones == set()


def test_cancelling_a_running_task_leaves_it_to_the_workers() -> None:
    core = QueueCore()
    d = delivery()
    core.send(d, 0.0, 0.0)
    core.take(d)
    assert core.cancel(d.tag[0]) == ("running", d, False)
    assert core.state == {d: TAKEN}  # still pending until its worker acks
    assert core.finish(d) is True


def test_cancelling_an_unknown_or_finished_task_changes_nothing() -> None:
    core = QueueCore()
    assert core.cancel(TaskID.new()) == ("unknown", None, False)
    d = delivery()
    core.send(d, 0.0, 0.0)
    core.take(d)
    core.finish(d)
    assert core.cancel(d.tag[0]) == ("unknown", None, False)
    assert core.tombstones == set()


# --- stopping -------------------------------------------------------------------------


def test_unstarted_finishes_the_delayed_and_optionally_the_queued_never_the_running() -> None:
    core = QueueCore()
    queued, delayed, retry, running = delivery(1), delivery(2), delivery(3, slot=False), delivery(4)
    core.send(queued, 0.0, 0.0)
    core.send(delayed, 1.0, 0.0)
    core.send(retry, 1.0, 0.0)
    core.send(running, 0.0, 0.0)
    core.take(running)

    found, freed = core.unstarted(queued=False)
    assert set(found) == {delayed, retry}
    assert freed == 1  # the retry held no place
    assert core.state == {queued: QUEUED, running: TAKEN}
    assert core.due(5.0) == []

    found, freed = core.unstarted(queued=True)
    assert found == [queued]
    assert freed == 0  # freed when it leaves the channel
    assert core.state == {running: TAKEN}
    assert core.take(queued) is False


# --- every delivery is in exactly one state -------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["send", "send_later", "due", "take", "finish", "cancel", "retry"]),
        st.integers(min_value=0, max_value=7),
    ),
    max_size=60,
)


@given(OPS)
def test_counts_and_states_agree_whatever_happens(ops: list[tuple[str, int]]) -> None:
    core = QueueCore()
    tids = [TaskID.new() for _ in range(8)]
    latest: dict[int, Delivery] = {}
    channel: list[Delivery] = []  # the ready channel, as the broker actor keeps it
    now = 0.0
    ran: list[Delivery] = []
    for op, n in ops:
        now += 0.25
        d = latest.get(n)
        if op in ("send", "send_later") and n not in latest:
            d = latest[n] = Delivery(data=b"%d" % n, tag=(tids[n], True))
            if core.send(d, 1.0 if op == "send_later" else 0.0, now):
                channel.append(d)
        elif op == "due":
            channel.extend(core.due(now))
        elif op == "take" and channel:
            taken = channel.pop(0)
            if core.take(taken):
                ran.append(taken)
        elif op == "finish" and d is not None and core.state.get(d) == TAKEN:
            core.finish(d)
        elif op == "cancel":
            outcome, found, _ = core.cancel(tids[n])
            assert outcome in ("unstarted", "running", "unknown")
            assert (found is None) == (outcome == "unknown")
        elif op == "retry" and d is not None and core.state.get(d) == TAKEN:
            new = latest[n] = Delivery(data=d.data + b"+", tag=(tids[n], False))
            if core.requeue(d, new, 0.5, now):
                channel.append(new)
        states = list(core.state.values())
        assert list(core.counts) == [states.count(s) for s in (QUEUED, DELAYED, TAKEN)]
        assert core.idle == (not core.state)
        assert all(core.by_id[t] in core.state for t in core.by_id)
        assert all(core.state[d] == TAKEN for d in ran if d in core.state)
        assert len(ran) == len(set(ran)), "a delivery ran twice"
        assert not (core.tombstones & core.state.keys()), "a cancelled delivery is pending"
