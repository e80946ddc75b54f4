"""The in-memory broker's leases and its dispatch: how deliveries reach runners (see
:mod:`bus._inmemory` for queues, priorities and limits)."""

from __future__ import annotations

import collections
import itertools
import math
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio

from bus._limits import LocalLimits, Parking, TaskLimits
from bus._memory_channel import ReadyEnd, park
from bus._memory_room import Room
from bus._message import TaskMessage
from bus._protocol import (
    Delivery,
    Lease,
)
from bus._queue import QueueCore, holds_slot
from bus._ready import Consumer, ReadyQueues

if TYPE_CHECKING:
    from bus._memory_actor import InMemoryBrokerActor

__all__ = ["_Dispatch", "_FancyLease", "_Held", "_MemoryLease", "_route", "_unique_of"]

# --------------------------------------------------------------------- the lease


class _MemoryLease(Lease):
    """A receive clone of the ready channel, lent to one worker. Taking a delivery frees
    its place in the bounded queue and updates the broker's bookkeeping, as a memory
    channel's receive end updates the channel's buffer; a delivery cancelled while
    queued is skipped. Once the broker moved to its dispatch (the channel ends), the
    lease goes on with ``_fancy``, its lease on the dispatch."""

    redeliver_interrupted = False

    __slots__ = ("_core", "_fancy", "_recv", "_slots", "closed", "consumer", "queues")

    def __init__(
        self,
        recv: ReadyEnd,
        core: QueueCore,
        slots: Room,
        queues: tuple[str, ...] | None,
        consumer: str,
    ) -> None:
        self._recv = recv
        self._core = core
        self._slots = slots
        self._fancy: _FancyLease | None = None
        self.queues = queues
        self.consumer = consumer
        self.closed = False

    def receive_nowait(self) -> Delivery:
        recv = self._recv
        while True:
            try:
                d = recv.receive_nowait()
            except trio.EndOfChannel:
                if self._fancy is None:
                    raise
                return self._fancy.receive_nowait()
            if d.tag[1]:
                self._slots.release()
            if self._core.take(d):
                return d

    async def receive(self) -> Delivery:
        recv, take, slots = self._recv, self._core.take, self._slots
        while True:
            try:
                d = await recv.receive()
            except trio.EndOfChannel:
                if self._fancy is None:
                    raise
                return await self._fancy.receive()
            if d.tag[1]:
                slots.release()
            if take(d):
                return d

    def close(self) -> None:
        self.closed = True
        self._recv.close()
        if self._fancy is not None:
            self._fancy.close()


def _unique_of(message: TaskMessage) -> str | None:
    """The unique key ``message`` holds while queued or running, in the table (the last
    item of its delivery's tag): a key is per queue, as on Redis."""
    labels = message.labels
    if not labels or "unique_key" not in labels:
        return None
    return f"{message.queue or ''}\x1f{labels['unique_key']}"


def _route(d: Delivery, default: str) -> tuple[str, int, str | None]:
    """(queue, level, task name) of an in-memory delivery. Deliveries made before the
    dispatch carry ``(task_id, holds_slot)`` only: the default queue at level 0, for a
    task without limits (a task with limits moves the broker to its dispatch before
    any of its deliveries is made)."""
    tag = d.tag
    if len(tag) > 3:
        return tag[2], tag[3], tag[4]
    return default, 0, None


class _FancyLease(Lease):
    """A worker's lease on the dispatch: takes the next delivery of its queues by
    priority, waiting (as a memory channel's receiver waits) while there is none."""

    redeliver_interrupted = False

    def __init__(self, dispatch: _Dispatch, queues: tuple[str, ...] | None, name: str) -> None:
        self._dispatch = dispatch
        self.consumer = Consumer(queues)
        self.name = name
        self.waiters: collections.OrderedDict[trio.lowlevel.Task, None] = collections.OrderedDict()
        self.closed = False

    def hand(self, d: Delivery) -> None:
        """Give ``d`` to the runner that waited longest (there must be one)."""
        task, _ = self.waiters.popitem(last=False)
        trio.lowlevel.reschedule(task, outcome.Value(d))

    def receive_nowait(self) -> Delivery:
        if self.closed:
            raise trio.ClosedResourceError
        d = self._dispatch.take(self)
        if d is None:
            if self._dispatch.closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        return d

    async def receive(self) -> Delivery:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            d = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return d
        got: Delivery = await trio.lowlevel.wait_task_rescheduled(park(self.waiters, None))
        return got

    def fail_waiters(self, error: type[Exception]) -> None:
        while self.waiters:
            task, _ = self.waiters.popitem(last=False)
            trio.lowlevel.reschedule(task, outcome.Error(error()))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._dispatch.forget(self)
            self.fail_waiters(trio.ClosedResourceError)


@attrs.define
class _Held:
    """A concurrency slot held by a delivery that runs (see :class:`_Dispatch`)."""

    limits: TaskLimits
    token: str
    consumer: str


class _Dispatch:
    """The in-memory broker's queue once queues, priorities or limits are in use (see
    the module documentation). Owned by the broker actor; its leases take from it in
    their runners' tasks, as from a memory channel."""

    def __init__(self, actor: InMemoryBrokerActor) -> None:
        self.actor = actor
        self.core = actor.core
        self.slots = actor.slots
        self.tasks = actor.tasks
        self.default = actor.default_queue
        self.ready: ReadyQueues[Delivery] = ReadyQueues()
        self.parking: Parking[Delivery] = Parking()
        self.limits = LocalLimits()
        self.leases: list[_FancyLease] = []
        self.held: dict[Delivery, _Held] = {}
        self.closed = False
        self._tokens = itertools.count()

    # ------------------------------------------------------------- leases

    def lease(self, queues: tuple[str, ...] | None, name: str) -> _FancyLease:
        lease = _FancyLease(self, queues, name)
        self.leases.append(lease)
        self.pump()  # deliveries waiting for a limit may be due for this one
        return lease

    def forget(self, lease: _FancyLease) -> None:
        if lease in self.leases:
            self.leases.remove(lease)

    def close(self) -> None:
        """The broker stops: runners that wait get EndOfChannel (ready deliveries are
        still handed out to those that ask)."""
        self.closed = True
        for lease in self.leases:
            lease.fail_waiters(trio.EndOfChannel)

    # ------------------------------------------------------------ intake

    def put(self, d: Delivery, *, front: bool = False) -> None:
        """``d`` is ready: to a runner that waits for its queue, else into the ready
        queues (``front``: ahead of its level, as it was ready before)."""
        queue, level, _ = _route(d, self.default)
        for lease in self.leases:
            if lease.waiters and lease.consumer.takes_from(queue):
                if self._may_start(d, lease):
                    lease.hand(d)
                return
        self.ready.put(queue, level, d, front=front)

    # ------------------------------------------------------------ handing out

    def take(self, lease: _FancyLease) -> Delivery | None:
        """The next delivery for ``lease``'s runner: one whose limit let it start after
        it waited (they came first), else the most urgent of its queues."""
        if self.parking:
            d = self._take_parked(lease)
            if d is not None:
                return d
        ready, consumer = self.ready, lease.consumer
        while True:
            d = ready.take(consumer)
            if d is None:
                return None
            if self._may_start(d, lease):
                return d

    def _limits_of(self, name: str | None) -> TaskLimits | None:
        if name is None:
            return None
        task = self.tasks.get(name)
        return None if task is None else task.limits

    def _drop_cancelled(self, d: Delivery) -> bool:
        """True (and ``d`` forgotten) when ``d`` was cancelled while it waited."""
        tomb = self.core.tombstones
        if tomb and d in tomb:
            if holds_slot(d):
                self.slots.release()
            self.core.take(d)  # drops the tombstone
            return True
        return False

    def _start(self, d: Delivery) -> bool:
        """``d`` goes to a runner now: free its place in the bounded queue; False when
        it must not run after all (finished by a shutdown)."""
        if holds_slot(d):
            self.slots.release()
        return self.core.take(d)

    def _may_start(self, d: Delivery, lease: _FancyLease) -> bool:
        """Whether ``d`` starts now on ``lease`` (then it is taken); else it was
        cancelled (dropped) or set aside for its limits."""
        if self._drop_cancelled(d):
            return False
        _, _, name = _route(d, self.default)
        limits = self._limits_of(name)
        if limits is None:
            return self._start(d)
        parking = self.parking
        for key in limits.wait_keys:
            if parking.waiting(key):  # behind those that wait for the same limit
                parking.park(key, d, math.inf)
                return False
        return self._admit(d, limits, lease)

    def _admit(self, d: Delivery, limits: TaskLimits, lease: _FancyLease) -> bool:
        token = f"{next(self._tokens)}"
        admission = self.limits.admit(limits, token, trio.current_time())
        if not admission.ok:
            self.parking.park(admission.key, d, admission.retry_at, front=True)
            self.actor.wake_timer()
            return False
        if not self._start(d):
            self.limits.release(limits, token)
            return False
        if limits.max_running is not None:
            self.held[d] = _Held(limits, token, lease.name)
        return True

    def _take_parked(self, lease: _FancyLease) -> Delivery | None:
        parking = self.parking
        for key in parking.due(trio.current_time()):
            while True:
                d = parking.peek(key)
                if d is None:
                    break
                queue, _, name = _route(d, self.default)
                if not lease.consumer.takes_from(queue):
                    break  # ripe still: for a runner of another lease
                parking.pop(key)
                if self._drop_cancelled(d):
                    continue
                limits = self._limits_of(name)
                if limits is None:  # its task is gone: it starts and is rejected
                    if self._start(d):
                        return d
                    continue
                behind = [k for k in limits.wait_keys if k != key and parking.waiting(k)]
                if behind:
                    parking.park(behind[0], d, math.inf)
                    continue
                if self._admit(d, limits, lease):
                    return d
                if not parking.waiting(key) or parking.peek(key) is d:
                    break  # parked again under this key: try it later
        return None

    def pump(self) -> None:
        """Hand deliveries whose limit lets them start now to runners that wait."""
        if not self.parking:
            return
        for lease in list(self.leases):
            while lease.waiters:
                d = self._take_parked(lease)
                if d is None:
                    break
                lease.hand(d)

    # --------------------------------------------------------- finishing

    def finished(self, d: Delivery) -> None:
        """``d`` ended (acked, nacked or handed back): give back its slot."""
        held = self.held.pop(d, None)
        if held is not None:
            key = self.limits.release(held.limits, held.token)
            if key is not None:
                self.parking.wake(key)
                self.pump()

    def worker_gone(self, name: str) -> None:
        """The worker ``name`` stopped: what it ran holds no slot any more."""
        for d, held in list(self.held.items()):
            if held.consumer == name:
                self.finished(d)

    def remove_waiting(self) -> list[Delivery]:
        """Every delivery not handed out yet (ready or set aside), removed."""
        return self.ready.remove_if(lambda d: True) + self.parking.remove_if(lambda d: True)

    # -------------------------------------------------------------- numbers

    def queue_numbers(self, names: list[str]) -> dict[str, dict[str, Any]]:
        waiting: dict[str, int] = collections.Counter(
            _route(d, self.default)[0] for d in self.parking.items()
        )
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            ready = self.ready.count(name)
            out[name] = {
                "queued": ready + waiting.get(name, 0),
                "waiting_for_limits": waiting.get(name, 0),
                "by_priority": {str(k): v for k, v in self.ready.by_level(name).items()},
            }
        return out
