"""Priorities: which level a worker takes its next task from, decided without I/O.

A task's priority (``kicker().with_priority(n)``) is a whole number from 0 to 9; 9 is
the most urgent, 0 (the default) the least. A broker keeps one queue per level and
asks a :class:`PriorityPicker` which non-empty level to take from next.

The rule
--------

A pick takes the highest non-empty level, except after ``patience`` (default 10) picks
in a row that each passed over a non-empty lower level: then the next pick takes from
the non-empty level below the highest that was picked least recently (a level never
picked comes first; a tie goes to the higher level), and the count starts again. A pick
that passes over nothing (only one level is non-empty) also starts the count again.

So while two or more levels are non-empty, exactly one pick in every ``patience + 1``
(1 in 11 by default) goes below the highest level, and those picks go round the
waiting lower levels; a level that stays non-empty is picked within
``(patience + 1) * (PRIORITY_LEVELS - 1)`` picks (99 by default), however busy the
levels above it are. Between lower levels the order is fairness, not priority: with
levels 9, 5 and 0 all busy, 9 gets 10 picks in 11 and 5 and 0 one in 22 each.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = [
    "DEFAULT_PRIORITY",
    "MAX_PRIORITY",
    "PRIORITY_LEVELS",
    "PriorityPicker",
    "check_priority",
]

PRIORITY_LEVELS = 10
"""How many levels there are: 0 to 9."""
MAX_PRIORITY = PRIORITY_LEVELS - 1
"""The most urgent level."""
DEFAULT_PRIORITY = 0
"""The level of a task sent without a priority (the least urgent)."""


def check_priority(n: object) -> int:
    """``n`` if it is a priority level; :class:`TypeError` unless it is an ``int`` (a
    ``bool`` is not), :class:`ValueError` unless it is within 0..9."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"a priority is a whole number from 0 to {MAX_PRIORITY}, not {n!r}")
    if not 0 <= n <= MAX_PRIORITY:
        raise ValueError(
            f"a priority is from 0 (the default) to {MAX_PRIORITY} (the most urgent), not {n}"
        )
    return n


def _check_patience(_: object, __: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"patience is a whole number >= 1, not {value!r}")


# No on_setattr hook at all: one on any field makes attrs route every attribute set
# through a Python-level __setattr__, and the counters are set at every pick, on a
# worker's hot path. ``patience`` is checked by its property's setter instead.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class PriorityPicker:
    """Chooses the level of the next pick (see the module documentation for the rule).
    Feed it the non-empty levels at each pick; it keeps the count and the history."""

    _patience: int = attrs.field(default=10, validator=_check_patience, alias="patience")
    _passed_over: int = attrs.field(default=0, init=False)
    _picks: int = attrs.field(default=0, init=False)
    _last_picked: list[int] = attrs.field(factory=lambda: [-1] * PRIORITY_LEVELS, init=False)

    @property
    def patience(self) -> int:
        """How many picks in a row may pass over a waiting lower level; the next one
        then serves a lower level (a whole number >= 1, checked when set)."""
        return self._patience

    @patience.setter
    def patience(self, value: int) -> None:
        _check_patience(self, None, value)
        self._patience = value

    def pick(self, nonempty: Iterable[int]) -> int | None:
        """The level to take the next task from, given the levels that have tasks;
        ``None`` when there are none. Raises like :func:`check_priority` for a bad level.
        """
        levels = {check_priority(level) for level in nonempty}
        if not levels:
            return None
        top = max(levels)
        levels.discard(top)
        if not levels:
            self._passed_over = 0
            chosen = top
        elif self._passed_over >= self._patience:
            self._passed_over = 0
            # Least recently picked first; on a tie (never picked) the higher level.
            chosen = min(levels, key=lambda level: (self._last_picked[level], -level))
        else:
            self._passed_over += 1
            chosen = top
        self._last_picked[chosen] = self._picks
        self._picks += 1
        return chosen

    def pick_only(self, level: int) -> int:
        """``pick([level])`` when ``level`` (a valid level) is the only non-empty one,
        without the checks: what a broker's hot path calls for a single busy level."""
        self._passed_over = 0
        self._last_picked[level] = self._picks
        self._picks += 1
        return level
