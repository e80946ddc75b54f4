"""Priorities: levels and the picker's rule (highest first, a bounded share below)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus._priority import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    PRIORITY_LEVELS,
    PriorityPicker,
    check_priority,
)


def test_levels() -> None:
    assert (PRIORITY_LEVELS, DEFAULT_PRIORITY, MAX_PRIORITY) == (10, 0, 9)
    assert [check_priority(n) for n in range(10)] == list(range(10))
    for bad in (-1, 10, 100):
        with pytest.raises(ValueError, match="priority"):
            check_priority(bad)
    for wrong in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="priority"):
            check_priority(wrong)


def test_patience_is_validated() -> None:
    assert PriorityPicker().patience == 10
    picker = PriorityPicker(patience=3)
    picker.patience = 4
    assert picker.patience == 4
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="patience"):
            PriorityPicker(patience=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="patience"):
            picker.patience = bad  # type: ignore[assignment]
    assert picker.patience == 4


def drain(picker: PriorityPicker, queued: dict[int, int], n: int) -> list[int]:
    """Take `n` tasks (or all there are) from queues holding `queued[level]` tasks."""
    taken = []
    for _ in range(n):
        level = picker.pick(lvl for lvl, count in queued.items() if count)
        if level is None:
            break
        queued[level] -= 1
        taken.append(level)
    return taken


def test_nothing_to_pick() -> None:
    assert PriorityPicker().pick([]) is None


def test_the_highest_level_goes_first() -> None:
    assert drain(PriorityPicker(), {0: 2, 3: 2, 7: 1}, 5) == [7, 3, 3, 0, 0]


def test_urgent_tasks_overtake_a_backlog() -> None:
    picker = PriorityPicker()
    queued = {0: 1000}
    assert drain(picker, queued, 5) == [0] * 5  # a backlog was being worked on
    queued[9] = 10  # then 10 urgent tasks arrive
    taken = drain(picker, queued, 20)
    assert taken[:10] == [9] * 10  # all ten within the next 20 picks: in fact the first 10
    assert queued[9] == 0


def test_urgent_tasks_while_the_low_level_waits_for_its_share() -> None:
    picker = PriorityPicker()
    queued = {0: 1000, 9: 10}
    assert drain(picker, queued, 10) == [9] * 10
    queued[9] = 10  # more urgent work while 0 has been passed over 10 times
    taken = drain(picker, queued, 20)
    assert taken[:11] == [0] + [9] * 10  # the 10 high ones are done within 11 picks


def test_a_steady_high_stream_leaves_the_low_level_one_pick_in_eleven() -> None:
    picker = PriorityPicker()
    queued = {9: 10**6, 0: 10**6}
    taken = drain(picker, queued, 1100)
    assert Counter(taken) == {9: 1000, 0: 100}
    assert taken[:11] == [9] * 10 + [0]  # every 11th pick exactly
    low = [i for i, level in enumerate(taken) if level == 0]
    assert all(b - a == 11 for a, b in pairwise(low))


def test_patience_sets_the_share() -> None:
    taken = drain(PriorityPicker(patience=3), {5: 10**6, 1: 10**6}, 400)
    assert Counter(taken) == {5: 300, 1: 100}


def test_lower_levels_share_the_fairness_picks() -> None:
    taken = drain(PriorityPicker(), {9: 10**6, 5: 10**6, 0: 10**6}, 2200)
    assert Counter(taken) == {9: 2000, 5: 100, 0: 100}
    # The first fairness pick goes to the higher of the two never-picked levels.
    assert taken[10] == 5
    assert taken[21] == 0


def test_a_drained_top_level_lets_the_next_one_lead() -> None:
    assert drain(PriorityPicker(), {9: 3, 4: 3, 1: 3}, 9) == [9, 9, 9, 4, 4, 4, 1, 1, 1]


def test_pick_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="priority"):
        PriorityPicker().pick([10])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 12),
    st.lists(st.frozensets(st.integers(0, 9), min_size=1), min_size=1, max_size=400),
)
def test_a_waiting_level_is_picked_within_the_bound(
    patience: int, steps: list[frozenset[int]]
) -> None:
    picker = PriorityPicker(patience=patience)
    bound = (patience + 1) * (PRIORITY_LEVELS - 1)
    waiting = dict.fromkeys(range(PRIORITY_LEVELS), 0)  # picks since it became non-empty
    below = 0  # picks in a row that passed over a non-empty lower level
    for nonempty in steps:
        chosen = picker.pick(nonempty)
        assert chosen in nonempty
        if chosen != max(nonempty):
            assert below == patience
        below = below + 1 if chosen == max(nonempty) and len(nonempty) > 1 else 0
        for level in range(PRIORITY_LEVELS):
            waiting[level] = 0 if level == chosen or level not in nonempty else waiting[level] + 1
            assert waiting[level] < bound


def test_the_bound_is_reached_and_never_exceeded() -> None:
    picker = PriorityPicker()
    assert picker.pick({1}) == 1  # level 1 was served just now, every other level never
    taken = [picker.pick(range(PRIORITY_LEVELS)) for _ in range(200)]
    # Every fairness pick (each 11th) serves the least recently picked lower level:
    # 8, 7, ..., 2, 0 (never picked, higher first), then 1: its 99th pick.
    assert taken[10::11][:9] == [8, 7, 6, 5, 4, 3, 2, 0, 1]
    assert taken.index(1) == 98


def test_pick_only_is_pick_of_one_level() -> None:
    a, b = PriorityPicker(patience=2), PriorityPicker(patience=2)
    for levels in [{9, 0}, {9, 0}, {9}, {9, 0}, {9, 0}, {9, 0}, {0}, {9, 0}]:
        expected = a.pick(levels)
        got = b.pick_only(next(iter(levels))) if len(levels) == 1 else b.pick(levels)
        assert got == expected
    assert a == b
