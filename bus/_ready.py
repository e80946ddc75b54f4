"""Ready deliveries by queue and priority level, and which one a consumer takes next.

Plain synchronous state (no I/O, no Trio), used where deliveries wait for a runner:
the in-memory broker's queue once queues or priorities are in use, and the Redis
stream reader's deliveries read ahead.

Each (queue, level) is a FIFO. A :class:`Consumer` (one worker's lease) takes from its
queues: its own :class:`~bus._priority.PriorityPicker` chooses the level among the
non-empty levels of all its queues, and among its queues that have that level
non-empty the turn goes round, so a worker consuming several queues serves them
alike at equal priority.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from bus._priority import PRIORITY_LEVELS, PriorityPicker

__all__ = ["Consumer", "ReadyQueues"]

T = TypeVar("T")


class Consumer:
    """Who takes: its queues (``None``: every queue), its picker and its turn."""

    __slots__ = ("_turn", "picker", "queues")

    def __init__(self, queues: Iterable[str] | None, patience: int = 10) -> None:
        self.queues: tuple[str, ...] | None = None if queues is None else tuple(queues)
        self.picker = PriorityPicker(patience)
        self._turn = 0

    def takes_from(self, queue: str) -> bool:
        return self.queues is None or queue in self.queues


class ReadyQueues(Generic[T]):
    """Items waiting to be taken, FIFO per (queue, level)."""

    def __init__(self) -> None:
        self._levels: dict[str, list[collections.deque[T]]] = {}
        self._nonempty: dict[str, set[int]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def put(self, queue: str, level: int, item: T, *, front: bool = False) -> None:
        """Add ``item`` at the end of its (queue, level), or first with ``front`` (an
        item that was ready before and is back, e.g. after it waited for a limit)."""
        levels = self._levels.get(queue)
        if levels is None:
            levels = self._levels[queue] = [collections.deque() for _ in range(PRIORITY_LEVELS)]
            self._nonempty[queue] = set()
        q = levels[level]
        if front:
            q.appendleft(item)
        else:
            q.append(item)
        self._nonempty[queue].add(level)
        self._len += 1

    def take(self, consumer: Consumer) -> T | None:
        """The next item for ``consumer``, removed; ``None`` when its queues are empty."""
        if not self._len:
            return None
        nonempty = self._nonempty
        queues = consumer.queues
        if queues is None:
            queues = tuple(q for q, ne in nonempty.items() if ne)
        if len(queues) == 1:
            queue = queues[0]
            levels = nonempty.get(queue)
            if not levels:
                return None
            if len(levels) == 1:
                for level in levels:
                    consumer.picker.pick_only(level)
            else:
                picked = consumer.picker.pick(levels)
                assert picked is not None
                level = picked
        else:
            found: set[int] = set()
            for q in queues:
                ne = nonempty.get(q)
                if ne:
                    found |= ne
            if not found:
                return None
            chosen = consumer.picker.pick(found)
            assert chosen is not None
            level = chosen
            candidates = [q for q in queues if level in nonempty.get(q, ())]
            queue = candidates[consumer._turn % len(candidates)]
            consumer._turn += 1
        dq = self._levels[queue][level]
        item = dq.popleft()
        if not dq:
            nonempty[queue].discard(level)
        self._len -= 1
        return item

    def count(self, queue: str, level: int | None = None) -> int:
        """How many wait in ``queue`` (at ``level``, or at every level)."""
        levels = self._levels.get(queue)
        if levels is None:
            return 0
        if level is not None:
            return len(levels[level])
        return sum(len(q) for q in levels)

    def by_level(self, queue: str) -> dict[int, int]:
        """``{level: count}`` of the non-empty levels of ``queue``, most urgent first."""
        levels = self._levels.get(queue)
        if levels is None:
            return {}
        return {lv: len(levels[lv]) for lv in range(PRIORITY_LEVELS - 1, -1, -1) if levels[lv]}

    def queue_names(self) -> list[str]:
        """Every queue that has held an item."""
        return list(self._levels)

    def remove_if(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove and return every item for which ``pred(item)`` is true."""
        out: list[T] = []
        for queue, levels in self._levels.items():
            for level, q in enumerate(levels):
                if not q:
                    continue
                kept: list[T] = []
                gone: list[T] = []
                for i in q:
                    (gone if pred(i) else kept).append(i)
                if gone:
                    out.extend(gone)
                    q.clear()
                    q.extend(kept)
                    if not q:
                        self._nonempty[queue].discard(level)
        self._len -= len(out)
        return out
