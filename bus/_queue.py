"""The in-memory broker's decisions, as plain synchronous state (no I/O, no Trio).

The broker actor feeds :class:`QueueCore` what happens (a send, the time, a worker
taking a delivery, an ack, a cancel) and applies what comes back (put this delivery
on the ready channel, wake the timer at this time, store a CANCELLED result for
these). Everything here can be tested without Trio; see tests/logic/test_queue_core.py.

Every delivery the core knows is in exactly one state: QUEUED (on the ready channel,
not yet taken), DELAYED (waiting for its time) or TAKEN (a worker has it). A delivery
cancelled before it started is remembered as a *tombstone* until it leaves the ready
channel or the delay heap, so that it is never handed to a task function.
"""

from __future__ import annotations

import collections
import heapq
import math

import attrs

from bus._ids import TaskID
from bus._protocol import Delivery

__all__ = ["DELAYED", "QUEUED", "TAKEN", "QueueCore"]

QUEUED = 0
DELAYED = 1
TAKEN = 2


def task_id_of(d: Delivery) -> TaskID:
    """The task id of an in-memory delivery (its tag is ``(task_id, holds_slot)``)."""
    tid: TaskID = d.tag[0]
    return tid


def holds_slot(d: Delivery) -> bool:
    """Whether the delivery holds a place in the bounded queue (retries do not)."""
    return bool(d.tag[1])


@attrs.define
class QueueCore:
    """Queued, delayed and taken deliveries; cancellations; dead letters."""

    dead_letter_max: int = 1000
    """How many dead letters are kept (the oldest are dropped beyond it)."""
    state: dict[Delivery, int] = attrs.Factory(dict)
    """Every pending delivery (sent and not finished) and its state."""
    by_id: dict[TaskID, Delivery] = attrs.Factory(dict)
    """The latest pending delivery of each task id (for cancellation)."""
    delayed: list[tuple[float, int, Delivery]] = attrs.Factory(list)
    """A heap of (due time, sequence, delivery)."""
    tombstones: set[Delivery] = attrs.Factory(set)
    """Deliveries cancelled while queued or delayed, not yet out of the channel/heap."""
    dead: collections.deque[tuple[str, bytes]] = attrs.field(init=False)
    """The last ``dead_letter_max`` dead letters: (reason, encoded message)."""
    counts: list[int] = attrs.Factory(lambda: [0, 0, 0])
    """How many deliveries are QUEUED, DELAYED and TAKEN."""
    _seq: int = 0

    def __attrs_post_init__(self) -> None:
        self.dead = collections.deque(maxlen=self.dead_letter_max)

    # ----------------------------------------------------------------- queries

    @property
    def idle(self) -> bool:
        """Nothing is queued, delayed or running."""
        return not self.state

    @property
    def queued(self) -> int:
        return self.counts[QUEUED]

    @property
    def delayed_count(self) -> int:
        return self.counts[DELAYED]

    @property
    def running(self) -> int:
        return self.counts[TAKEN]

    def next_due(self) -> float:
        """When the earliest delayed delivery is due (``math.inf`` when none is)."""
        heap = self.delayed
        while heap and heap[0][2] in self.tombstones:
            self.tombstones.discard(heapq.heappop(heap)[2])
        return heap[0][0] if heap else math.inf

    # ------------------------------------------------------------------ events

    def _set(self, d: Delivery, new: int) -> None:
        old = self.state.get(d)
        if old is not None:
            self.counts[old] -= 1
        self.state[d] = new
        self.counts[new] += 1

    def send(self, d: Delivery, delay: float, now: float) -> bool:
        """A new delivery: True when it is ready now (put it on the ready channel),
        False when it waits ``delay`` seconds from ``now`` (see :meth:`next_due`)."""
        self.by_id[d.tag[0]] = d
        if delay > 0:
            self._set(d, DELAYED)
            self._seq += 1
            heapq.heappush(self.delayed, (now + delay, self._seq, d))
            return False
        if d in self.state:
            self._set(d, QUEUED)
        else:  # the hot path: a new delivery
            self.state[d] = QUEUED
            self.counts[QUEUED] += 1
        return True

    def due(self, now: float) -> list[Delivery]:
        """The delayed deliveries due at ``now``, now QUEUED (put them on the channel)."""
        heap = self.delayed
        out: list[Delivery] = []
        while heap and heap[0][0] <= now:
            d = heapq.heappop(heap)[2]
            if d in self.tombstones:
                self.tombstones.discard(d)
                continue
            self._set(d, QUEUED)
            out.append(d)
        return out

    def take(self, d: Delivery) -> bool:
        """A worker took ``d`` off the ready channel: True to run it, False when it was
        cancelled while queued (skip it; it is finished already)."""
        tomb = self.tombstones
        if tomb and d in tomb:
            tomb.discard(d)
            return False
        state = self.state
        if state.get(d) == QUEUED:
            state[d] = TAKEN
            counts = self.counts
            counts[QUEUED] -= 1
            counts[TAKEN] += 1
            return True
        return False  # not known here (finished by a shutdown): never run it

    def _drop(self, d: Delivery) -> bool:
        state = self.state
        old = state.pop(d, None)
        if old is not None:
            self.counts[old] -= 1
        by_id = self.by_id
        tid = d.tag[0]
        if by_id.get(tid) is d:
            del by_id[tid]
        return not state

    #: ``finish(d)``: ``d`` is done (acked); True when nothing is pending any more.
    finish = _drop

    def dead_letter(self, d: Delivery, reason: str) -> bool:
        """``d`` is rejected with ``reason``: kept as a dead letter; True when idle."""
        self.dead.append((reason, d.data))
        return self._drop(d)

    def requeue(self, old: Delivery, new: Delivery, delay: float, now: float) -> bool:
        """``old`` is replaced by ``new`` (its next attempt) after ``delay`` seconds;
        True when ``new`` is ready now."""
        self._drop(old)
        return self.send(new, delay, now)

    def cancel(self, task_id: TaskID) -> tuple[str, Delivery | None, bool]:
        """A cancel request. Returns ``(outcome, delivery, frees_slot)``: outcome
        ``"unstarted"`` when the task was queued or delayed (it is finished now and will
        never start: store its CANCELLED result), ``"running"`` when a worker has it
        (tell the workers), ``"unknown"`` (finished already, or never sent here).
        ``frees_slot``: a delayed delivery's place in the bounded queue is free now
        (a queued one's is freed when it leaves the ready channel)."""
        d = self.by_id.get(task_id)
        if d is None:
            return "unknown", None, False
        st = self.state.get(d)
        if st == TAKEN:
            return "running", d, False
        self.tombstones.add(d)
        self._drop(d)
        return "unstarted", d, st == DELAYED and holds_slot(d)

    def unstarted(self, *, queued: bool) -> tuple[list[Delivery], int]:
        """Finish every delayed delivery (and, with ``queued``, every queued one too) so
        it never starts. Returns them (store their CANCELLED results) and how many
        places in the bounded queue that frees now (delayed ones holding one)."""
        out = []
        freed = 0
        for d, st in list(self.state.items()):
            if st == DELAYED or (queued and st == QUEUED):
                self.tombstones.add(d)
                self._drop(d)
                out.append(d)
                freed += st == DELAYED and holds_slot(d)
        return out, freed
