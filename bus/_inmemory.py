"""The in-memory broker: one process, no server, every feature.

``InMemoryBroker`` is the facade; :class:`InMemoryBrokerActor` owns the queue: the
ready channel (it keeps the send end and lends receive clones to the workers that
``Receive``), the delay timer (a task in its own nursery), the pending deliveries and
cancellations (:class:`~bus._queue.QueueCore`, plain synchronous state) and the dead
letters. The bound on waiting messages (``max_queue``) is a semaphore the actor owns
and lends to the facade, which takes a place before it sends.

Queues, priorities and limits
-----------------------------

One channel serves one queue at one priority with no limits: the hot path, kept as it
is. The first time something needs more (a send to another queue or with a priority,
a worker consuming other queues, a task with ``rate_limit`` or ``max_running``), the
actor moves what the channel holds into a :class:`_Dispatch` and closes the channel
for good; the leases lent on it then take from the dispatch (a lease's runner sees the
channel end and carries on there). The dispatch keeps the ready deliveries by queue
and level (:class:`~bus._ready.ReadyQueues`), hands a delivery to a runner that waits
for one of its queues, and decides a delivery's limits at that moment, when a runner
is there to start it: a delivery over its limit is set aside
(:class:`~bus._limits.Parking`), still queued, and handed to the next runner that asks
once the limit lets it (the timer wakes waiting runners for it). A runner never holds a
delivery that waits for a limit.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import outcome
import trio

import actors
from actors._log import get_logger
from bus._broker import Broker
from bus._broker_actor import BrokerActor, ListWorkers
from bus._codec import Codec, DecodeError, JSONCodec
from bus._errors import BrokerClosed, QueueFull, SendError
from bus._frozen import json_faithful
from bus._ids import TaskID
from bus._limits import LocalLimits, Parking, TaskLimits
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._options import check_queue_name
from bus._protocol import (
    Ack,
    BrokerInfo,
    Cancel,
    CancelRunning,
    Delivery,
    Drain,
    DrainTicket,
    Inspect,
    Lease,
    Nack,
    QueueInfo,
    Receive,
    Release,
    Send,
    Unclaim,
    Unregister,
    WorkerInfo,
)
from bus._queue import DELAYED, TAKEN, QueueCore, holds_slot, task_id_of
from bus._ready import Consumer, ReadyQueues
from bus._results import DEFAULT_MAX_STORED_RESULTS, InMemoryResultBackend, ResultBackend
from bus._schedule import ScheduleSpec, claim_ttl
from bus._scheduler import ScheduleBackend, TickState
from bus._supervision import BUG_BACKOFF, BUG_RESTARTS
from bus._task import Task
from bus._unique import UniqueTable

__all__ = ["InMemoryBroker", "InMemoryBrokerActor"]

log = get_logger("bus")

# ------------------------------------------------------------ private messages


@attrs.frozen
class SendUnique:
    """Ask (inline): send a unique job unless its key is held; the answer is the task id
    that holds the key (the message's own when it was sent)."""

    send: Send


@attrs.define
class MemorySchedules:
    """The in-memory broker's schedules added at run time, the tick states, and the
    claimed ticks. Kept by the facade across runs, handed to the broker actor (its one
    writer while it runs)."""

    runtime: dict[str, ScheduleSpec] = attrs.Factory(dict)
    states: dict[str, TickState] = attrs.Factory(dict)
    claimed: dict[tuple[str, int], float] = attrs.Factory(dict)


@attrs.frozen
class ScheduleOp:
    """Ask: run ``op`` (a method name of the actor's schedule code) with ``args``."""

    op: str
    args: tuple[Any, ...]


@attrs.frozen
class WatchIdle:
    """Ask: a ``trio.Event`` set when nothing is queued, delayed or running."""


@attrs.frozen
class CloseIntake:
    """Ask: the broker is shutting down; senders waiting for room get BrokerClosed and
    later sends are cancelled at once."""


@attrs.frozen
class TakenIds:
    """Ask: which of ``task_ids`` a worker took (a workflow's running steps)."""

    task_ids: tuple[TaskID, ...]


@attrs.frozen
class CancelUnstarted:
    """Ask: record every delayed task (and, with ``queued``, every queued one) as
    CANCELLED so it never starts; the answer is how many."""

    why_delayed: str
    why_queued: str = ""
    queued: bool = False


@attrs.frozen
class DeadLetters:
    """Ask: the oldest ``limit`` dead letters (of ``queue`` when given: those whose
    message names it, or names none when it is ``default``)."""

    limit: int = 100
    queue: str | None = None
    default: str = "default"


@attrs.frozen
class PurgeDeadLetters:
    """Ask: drop every dead letter (of ``queue`` when given, as :class:`DeadLetters`
    chooses them); the answer is how many there were."""

    queue: str | None = None
    default: str = "default"


@attrs.frozen
class Upgrade:
    """Tell (inline): a task with limits was registered; route by the dispatch now."""


#: The queue spec of the embedded worker: every queue of the process.
EVERY_QUEUE = "*"


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
        recv: trio.MemoryReceiveChannel[Delivery],
        core: QueueCore,
        slots: trio.Semaphore,
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
        recv, take, slots = self._recv, self._core.take, self._slots
        while True:
            try:
                d = recv.receive_nowait()
            except trio.EndOfChannel:
                if self._fancy is None:
                    raise
                return self._fancy.receive_nowait()
            if d.tag[1]:
                slots.release()
            if take(d):
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
        task = trio.lowlevel.current_task()
        self.waiters[task] = None

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.waiters.pop(task, None)
            return trio.lowlevel.Abort.SUCCEEDED

        got: Delivery = await trio.lowlevel.wait_task_rescheduled(abort)
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


# --------------------------------------------------------------------- the actor


def _cancelled(tid: TaskID, why: str) -> TaskResult[Any]:
    return TaskResult(tid, TaskStatus.CANCELLED, None, RemoteError("bus.Cancelled", why), 0.0, {})


class Kept:
    """What the in-memory broker actor owns that must outlive one instance of it: the
    queue itself. Its factory makes one and hands it to every instance, so a restart
    after a bug loses nothing that was accepted (queued, delayed, running, unique
    keys, the leases lent to workers)."""

    __slots__ = ("_idle", "_leases", "_recv", "_send", "closed", "core", "fancy", "slots", "unique")

    def __init__(self, max_queue: int) -> None:
        self.core = QueueCore()
        self.slots = trio.Semaphore(max_queue)
        self._send, self._recv = trio.open_memory_channel[Delivery](math.inf)
        self.fancy: _Dispatch | None = None
        self._leases: list[_MemoryLease] = []
        self._idle: list[trio.Event] = []
        self.closed = False
        self.unique = UniqueTable()


def _kept(name: str) -> Any:
    """An attribute of the actor that lives in its :class:`Kept`."""

    def get(self: InMemoryBrokerActor) -> Any:
        return getattr(self.kept, name)

    def put(self: InMemoryBrokerActor, value: Any) -> None:
        setattr(self.kept, name, value)

    return property(get, put)


class InMemoryBrokerActor(BrokerActor):
    """The in-memory broker actor. Its decisions are :class:`~bus._queue.QueueCore`'s
    (and, once queues, priorities or limits are in use, its :class:`_Dispatch`'s);
    this class applies them (channel, timer, results, workers).

    Spawned with RESTART: the queue lives in :class:`Kept`, which outlives an
    instance; a restarted instance takes it over and starts its timer again."""

    #: The queue (see :class:`Kept`).
    core: QueueCore = _kept("core")
    #: The bound on waiting messages, lent to the facade (``Broker.kick`` takes a
    #: place before it sends; a worker taking the delivery gives it back).
    slots: trio.Semaphore = _kept("slots")
    _send: trio.MemorySendChannel[Delivery] = _kept("_send")
    _recv: trio.MemoryReceiveChannel[Delivery] = _kept("_recv")
    #: The dispatch, once queues, priorities or limits are in use (else ``None``:
    #: the channel serves).
    fancy: _Dispatch | None = _kept("fancy")
    _leases: list[_MemoryLease] = _kept("_leases")  # lent on the channel
    _idle: list[trio.Event] = _kept("_idle")
    closed: bool = _kept("closed")
    #: Unique jobs' keys, held by the task ids that run them (released at the end).
    unique: UniqueTable = _kept("unique")

    def __init__(
        self,
        codec: Codec,
        max_queue: int,
        results: ResultBackend,
        schedules: MemorySchedules | None = None,
        tasks: dict[str, Task[Any, Any]] | None = None,
        default_queue: str = "default",
        kept: Kept | None = None,
    ) -> None:
        super().__init__()
        self.kept = kept if kept is not None else Kept(max_queue)
        self.codec = codec
        self.results = results
        self.schedules = schedules if schedules is not None else MemorySchedules()
        #: The registry of the broker's tasks (read for their limits).
        self.tasks: dict[str, Task[Any, Any]] = tasks if tasks is not None else {}
        self.default_queue = default_queue
        self._timer: trio.CancelScope | None = None

    async def on_start(self) -> None:
        fancy = self.fancy
        if fancy is not None:
            fancy.actor = self  # restarted: the dispatch wakes this instance's timer
        elif any(task.limits is not None for task in self.tasks.values()):
            self._upgrade()
        await self.nursery.start(self._run_timer)

    async def on_stop(self) -> None:
        self._send.close()  # leases end once what is buffered was taken
        if self.fancy is not None:
            self.fancy.close()

    # ----------------------------------------------------- the dispatch

    def _upgrade(self) -> _Dispatch:
        """Move to the dispatch for good: what the channel holds goes there, in order,
        and the channel closes (its leases go on with the dispatch)."""
        fancy = self.fancy
        if fancy is not None:
            return fancy
        fancy = self.fancy = _Dispatch(self)
        while True:
            try:
                d = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            fancy.ready.put(self.default_queue, 0, d)
        for lease in self._leases:
            if not lease.closed:
                lease._fancy = fancy.lease(lease.queues, lease.consumer)
        self._leases.clear()
        self._send.close()
        return fancy

    @actors.handles(Upgrade, inline=True)
    def upgrade(self, msg: Upgrade) -> None:
        self._upgrade()

    def _ready(self, d: Delivery) -> None:
        """``d`` may start now."""
        fancy = self.fancy
        if fancy is None:
            self._send.send_nowait(d)
        else:
            fancy.put(d)

    def _delivery(self, data: bytes, counted: bool, message: TaskMessage, shared: Any) -> Delivery:
        """A delivery for the dispatch: its tag carries its queue, level and task."""
        return Delivery(
            data,
            (
                message.task_id,
                counted,
                message.queue or self.default_queue,
                message.priority,
                message.task_name,
                _unique_of(message),
            ),
            shared,
        )

    @staticmethod
    def _next(
        old: Delivery, data: bytes, message: TaskMessage | None, deliveries: int = 1
    ) -> Delivery:
        """The delivery that replaces ``old`` (a retry, or ``old`` handed back), in the
        same queue at the same level; it holds no place in the bounded queue."""
        tag = old.tag
        return Delivery(data, (tag[0], False, *tag[2:]), message, deliveries)

    # ------------------------------------------------------------------- the timer

    def _next_wake(self) -> float:
        due = self.core.next_due()
        fancy = self.fancy
        if fancy is not None and fancy.parking:
            due = min(due, fancy.parking.next_retry())
        return due

    async def _run_timer(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        core = self.core
        while True:
            with trio.CancelScope(deadline=self._next_wake()) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._timer = None
            for d in core.due(trio.current_time()):
                self._ready(d)
            if self.fancy is not None:
                self.fancy.pump()

    def wake_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            due = self._next_wake()
            if due < timer.deadline:
                timer.deadline = due

    def _became_idle(self) -> None:
        idle, self._idle = self._idle, []
        for ev in idle:
            ev.set()

    # --------------------------------------------------------------------- sending

    def _enqueue(self, d: Delivery, message: TaskMessage, delay: float | None) -> None:
        if delay is None:
            eta = message.eta
            delay = 0.0 if eta is None else eta - time.time()
        now = trio.current_time() if delay > 0 else 0.0
        if self.core.send(d, delay, now):
            self._ready(d)
        else:
            self.wake_timer()

    def _store_later(self, task_id: TaskID, result: TaskResult[Any]) -> None:
        """Store a result without making the handler wait (the store is an actor too)."""
        self.nursery.start_soon(self.results.set_result, task_id, result)

    @actors.handles(SendUnique, inline=True)
    def send_unique(self, msg: SendUnique) -> TaskID:
        """A unique job: sent if its key is free (and then held by it), else not; the
        answer is the id of the task that holds the key."""
        message = msg.send.message
        key = _unique_of(message)
        assert key is not None
        ttl = float(message.labels.get("unique_ttl", 3600.0))
        holder = self.unique.claim(key, message.task_id, trio.current_time(), ttl)
        if holder != message.task_id:
            if msg.send.admitted:
                self.slots.release()  # nothing was queued
            return holder
        self.send(msg.send)
        return holder

    @actors.handles(Send, inline=True)
    def send(self, msg: Send) -> None:
        message = msg.message
        data = msg.data
        shared: TaskMessage | None = None
        if data is None and msg.verified:
            # The producer checked it encodes; nobody here needs the bytes.
            data = b""
            shared = message
        elif data is None:
            try:
                data = self.codec.encode_message(message)
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                reason = f"cannot encode the message: {exc}"
                log.error("task.rejected", reason=reason, task_id=message.task_id, actor=self.name)
                self.core.dead.append((reason, b""))
                err = RemoteError("bus.Rejected", reason)
                self._store_later(
                    message.task_id,
                    TaskResult(message.task_id, TaskStatus.FAILURE, None, err, 0.0, message.labels),
                )
                if msg.admitted:
                    self.slots.release()
                return
            shared = message if _faithful(message) else None
        elif msg.verified and _faithful(message):
            # A task must see its own copy of its arguments, with the codec's shapes.
            # The message is immutable and a round trip would not change it: the worker
            # may take it as it is instead of decoding ``data``.
            shared = message
        counted = msg.admitted
        if not counted:
            try:
                self.slots.acquire_nowait()
                counted = True
            except trio.WouldBlock:
                pass  # a raw Send beyond the bound: queued, not counted
        if (
            message.eta is None
            and not self.closed
            and self.fancy is None
            and message.queue is None
            and not message.priority
        ):  # the hot path: one queue, one level, no limits
            d = Delivery(data, (message.task_id, counted, _unique_of(message)), shared)
            if self.core.send(d, 0.0, 0.0):
                self._send.send_nowait(d)
            return
        if self.fancy is None and (
            (message.queue is not None and message.queue != self.default_queue) or message.priority
        ):
            self._upgrade()
        if self.fancy is None:
            d = Delivery(data, (message.task_id, counted, _unique_of(message)), shared)
        else:
            d = self._delivery(data, counted, message, shared)
        if self.closed:
            self.core.send(d, 0.0, 0.0)
            self.core.cancel(message.task_id)
            if counted:
                self.slots.release()
            why = "the broker shut down before it started"
            self._store_later(message.task_id, _cancelled(message.task_id, why))
            return
        self._enqueue(d, message, None)

    # ------------------------------------------------------------------- protocol

    @actors.handles(Receive)
    def receive(self, msg: Receive) -> Lease:
        queues: tuple[str, ...] | None
        if EVERY_QUEUE in msg.queues:
            queues = None
        else:
            queues = tuple(dict.fromkeys(msg.queues)) or (self.default_queue,)
        fancy = self.fancy
        if fancy is None and queues is not None and queues != (self.default_queue,):
            fancy = self._upgrade()
        if fancy is not None:
            return fancy.lease(queues, msg.consumer)
        lease = _MemoryLease(self._recv.clone(), self.core, self.slots, queues, msg.consumer)
        self._leases = [held for held in self._leases if not held.closed]
        self._leases.append(lease)
        return lease

    @actors.handles(Unregister, inline=True)
    def unregister(self, msg: Unregister) -> None:
        super().unregister(msg)
        if self.fancy is not None:
            self.fancy.worker_gone(msg.worker.name)

    def _release(self, d: Delivery) -> None:
        """Free the unique key ``d`` holds, if it holds one (the last item of its tag)."""
        key = d.tag[-1]
        if key is not None:
            self.unique.release(key, d.tag[0])

    @actors.handles(Unclaim, inline=True)
    def unclaim(self, msg: Unclaim) -> None:
        self._release(msg.delivery)

    @actors.handles(Ack, inline=True)
    def ack(self, msg: Ack) -> None:
        d = msg.delivery
        if d.tag[-1] is not None:
            self._release(d)
        fancy = self.fancy
        if fancy is not None and fancy.held:
            fancy.finished(d)
        if self.core.finish(d) and self._idle:
            self._became_idle()

    @actors.handles(Nack, inline=True)
    def nack(self, msg: Nack) -> None:
        d = msg.delivery
        fancy = self.fancy
        if fancy is not None and fancy.held:
            fancy.finished(d)
        retry = msg.requeue
        if retry is None:
            self._release(d)
            if not d.data and d.message is not None:
                d = attrs.evolve(d, data=self.codec.encode_message(d.message))
                self.core.dead.append((msg.reason, d.data))
                idle = self.core.finish(msg.delivery)
            else:
                idle = self.core.dead_letter(d, msg.reason)
            if idle and self._idle:
                self._became_idle()
            return
        if fancy is None:
            new = Delivery(b"", (retry.task_id, False, d.tag[-1]), retry)
        else:
            new = self._next(d, b"", retry)
        now = trio.current_time() if msg.delay > 0 else 0.0
        if self.core.requeue(d, new, msg.delay, now):
            self._ready(new)
        else:
            self.wake_timer()

    @actors.handles(Release, inline=True)
    def release(self, msg: Release) -> None:
        d = msg.delivery
        n = d.deliveries + 1 if msg.started else d.deliveries  # never run: not counted
        fancy = self.fancy
        if fancy is None:
            new = Delivery(d.data, (task_id_of(d), False, d.tag[-1]), d.message, n)
        else:
            fancy.finished(d)
            new = self._next(d, d.data, d.message, n)
        if self.core.requeue(d, new, 0.0, 0.0):
            self._ready(new)

    @actors.handles(Cancel)
    async def cancel(self, msg: Cancel) -> None:
        tid = msg.task_id
        outcome, d, frees_slot = self.core.cancel(tid)
        if outcome == "running":
            self.tell_workers(CancelRunning(tid, "cancel"))
        elif outcome == "unstarted":
            assert d is not None
            self._release(d)
            if frees_slot:
                self.slots.release()
            await self.results.set_result(tid, _cancelled(tid, "cancelled before it started"))
            if self.core.idle and self._idle:
                self._became_idle()

    def _queue_names(self) -> list[str]:
        names = [self.default_queue]
        for task in self.tasks.values():
            if task.queue is not None:
                names.append(task.queue)
        if self.fancy is not None:
            names += self.fancy.ready.queue_names()
        return list(dict.fromkeys(names))

    @actors.handles(Inspect)
    def inspect(self, msg: Inspect) -> BrokerInfo:
        core = self.core
        fancy = self.fancy
        if fancy is None:
            queues: dict[str, dict[str, Any]] = {
                name: {"queued": core.queued if name == self.default_queue else 0}
                for name in self._queue_names()
            }
        else:
            queues = fancy.queue_numbers(self._queue_names())
        workers = tuple(WorkerInfo(ref.name) for ref in self.workers)
        return BrokerInfo(
            queued=core.queued,
            delayed=core.delayed_count,
            running=core.running,
            pending=len(core.state),
            dead_letters=len(core.dead),
            workers=workers,
            queues={
                name: QueueInfo(
                    queued=q.get("queued", 0),
                    waiting_for_limits=q.get("waiting_for_limits", 0),
                    by_priority=q.get("by_priority", {}),
                    live_workers=len(workers),
                )
                for name, q in queues.items()
            },
            details={
                "senders_waiting": self.slots.statistics().tasks_waiting,
                "waiting_for_limits": 0 if fancy is None else len(fancy.parking),
            },
        )

    # ----------------------------------------------------------------- lifecycle

    @actors.handles(TakenIds, inline=True)
    def taken_ids(self, msg: TakenIds) -> list[TaskID]:
        core = self.core
        out = []
        for t in msg.task_ids:
            d = core.by_id.get(t)
            if d is not None and core.state.get(d) == TAKEN:
                out.append(t)
        return out

    @actors.handles(WatchIdle)
    def watch_idle(self, msg: WatchIdle) -> trio.Event:
        ev = trio.Event()
        if self.core.idle:
            ev.set()
        else:
            self._idle.append(ev)
        return ev

    @actors.handles(CloseIntake)
    def close_intake(self, msg: CloseIntake) -> None:
        self.closed = True
        # Senders blocked on a full queue: wake them so they see BrokerClosed.
        while self.slots.statistics().tasks_waiting:
            self.slots.release()

    @actors.handles(CancelUnstarted)
    async def cancel_unstarted(self, msg: CancelUnstarted) -> int:
        delayed_ids = {task_id_of(d) for d, st in self.core.state.items() if st == DELAYED}
        found, freed = self.core.unstarted(queued=msg.queued)
        for _ in range(freed):
            self.slots.release()
        if msg.queued:
            waiting: list[Delivery] = []
            while True:  # what is still on the channel never starts
                try:
                    waiting.append(self._recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if self.fancy is not None:
                waiting += self.fancy.remove_waiting()
            for d in waiting:
                if holds_slot(d):
                    self.slots.release()
                self.core.take(d)
        for d in found:
            self._release(d)
            tid = task_id_of(d)
            why = msg.why_delayed if tid in delayed_ids else msg.why_queued
            await self.results.set_result(tid, _cancelled(tid, why))
        if self.core.idle and self._idle:
            self._became_idle()
        return len(found)

    # -------------------------------------------------------------- schedules

    @actors.handles(ScheduleOp, inline=True)
    def schedule_op(self, msg: ScheduleOp) -> Any:
        return getattr(self, f"_schedule_{msg.op}")(*msg.args)

    def _schedule_runtime(self) -> dict[str, ScheduleSpec]:
        return dict(self.schedules.runtime)

    def _schedule_put(self, spec: ScheduleSpec) -> None:
        self.schedules.runtime[spec.name] = spec

    def _schedule_drop(self, name: str) -> bool:
        return self.schedules.runtime.pop(name, None) is not None

    def _schedule_state(self, names: list[str]) -> dict[str, TickState]:
        states = self.schedules.states
        return {n: states[n] for n in names if n in states}

    def _claim(self, spec: ScheduleSpec, tick: float) -> bool:
        claimed = self.schedules.claimed
        now = trio.current_time()
        key = (spec.name, round(tick * 1000))
        if key in claimed:
            return False
        if len(claimed) > 10_000:  # forget claims long past
            for k, until in list(claimed.items()):
                if until < now:
                    del claimed[k]
        claimed[key] = now + claim_ttl(spec, tick)
        return True

    def _schedule_fire(
        self, spec: ScheduleSpec, tick: float, message: TaskMessage, data: bytes, missed: int
    ) -> bool:
        if not self._claim(spec, tick):
            return False
        old = self.schedules.states.get(spec.name, TickState())
        self.schedules.states[spec.name] = TickState(tick, old.fires + 1, old.misses + missed, tick)
        self.send(Send(message, data, verified=True))
        return True

    def _schedule_miss(self, spec: ScheduleSpec, tick: float, missed: int) -> bool:
        if not self._claim(spec, tick):
            return False
        old = self.schedules.states.get(spec.name, TickState())
        self.schedules.states[spec.name] = TickState(
            tick, old.fires, old.misses + missed, old.last_fire
        )
        return True

    @actors.handles(DeadLetters)
    def dead_letters(self, msg: DeadLetters) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, (reason, data) in enumerate(list(self.core.dead)):
            if len(out) >= msg.limit:
                break
            try:
                message: TaskMessage | None = self.codec.decode_message(data)
            except DecodeError:
                message = None
            if msg.queue is not None and (
                message is None or (message.queue or msg.default) != msg.queue
            ):
                continue
            name = message.task_name if message is not None else None
            out.append({"id": i, "reason": reason, "task_name": name, "data": data})
        return out

    @actors.handles(PurgeDeadLetters)
    def purge_dead_letters(self, msg: PurgeDeadLetters) -> int:
        n = len(self.core.dead)
        if msg.queue is None:
            self.core.dead.clear()
            return n
        kept = [
            (reason, data)
            for reason, data in self.core.dead
            if self._queue_of(data, msg.default) != msg.queue
        ]
        self.core.dead.clear()
        self.core.dead.extend(kept)
        return n - len(kept)

    def _queue_of(self, data: bytes, default: str) -> str | None:
        """The queue of a dead letter's message (``None``: undecodable)."""
        try:
            message = self.codec.decode_message(data)
        except DecodeError:
            return None
        return message.queue or default


def _faithful(message: TaskMessage) -> bool:
    """Whether the JSON codec gives this message back unchanged (after the worker's
    thaw): then decoding is not needed to give the task its own copy."""
    if message.args and not all(json_faithful(a) for a in message.args):
        return False
    if message.kwargs and not all(json_faithful(v) for v in message.kwargs.values()):
        return False
    return not message.labels or all(json_faithful(v) for v in message.labels.values())


# -------------------------------------------------------------------- the facade


class _MemoryScheduleBackend(ScheduleBackend):
    """Schedules of an in-memory broker: asks its broker actor."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker

    async def _ask(self, op: str, *args: Any) -> Any:
        return await self.broker.ref.ask(ScheduleOp(op, args))

    async def runtime(self) -> dict[str, ScheduleSpec]:
        found: dict[str, ScheduleSpec] = await self._ask("runtime")
        return found

    async def put(self, spec: ScheduleSpec) -> None:
        await self._ask("put", spec)

    async def drop(self, name: str) -> bool:
        return bool(await self._ask("drop", name))

    async def state(self, names: list[str]) -> dict[str, TickState]:
        found: dict[str, TickState] = await self._ask("state", names)
        return found

    async def fire(
        self, spec: ScheduleSpec, tick: float, message: TaskMessage, data: bytes, missed: int
    ) -> bool:
        return bool(await self._ask("fire", spec, tick, message, data, missed))

    async def miss(self, spec: ScheduleSpec, tick: float, missed: int) -> bool:
        return bool(await self._ask("miss", spec, tick, missed))


class InMemoryBroker(Broker):
    """Runs tasks in this process: ``async with broker`` starts a worker beside you.

    - ``concurrency``: at most this many tasks run at once (a real limit).
    - ``max_queue``: at most this many messages wait (queued or delayed); ``kiq`` waits
      for room beyond it, ``kiq_nowait`` raises :class:`QueueFull`. Retries never wait.
    - ``max_stored_results`` / ``result_ttl``: bound the default result store (by
      default it keeps the newest 10,000 results; ``None``: no bound).
    - ``shutdown_timeout``: on leaving ``async with``, how long queued and running tasks
      get to finish before they are cancelled (and recorded as CANCELLED).
    - ``start_worker``: run a worker inside ``async with broker`` (the default; it runs
      the tasks of every queue). With ``False`` nothing runs the tasks until you call
      :meth:`run_worker` (which consumes the default queue, or the ``queues`` you give
      it), or drive the broker actor (``broker.ref``) with protocol messages yourself,
      as a test does.
    - ``queue``: the default queue, where a task without a ``queue`` option goes.

    The actors behind it: ``broker.ref`` (the broker actor, which owns the queue),
    ``broker.result_backend.ref`` (the result store) and the worker. Messages are
    encoded on send, and results are passed through the codec, as with a real
    transport, so what fails on Redis fails here too.
    """

    def __init__(
        self,
        concurrency: int = 100,
        *,
        max_queue: int = 10_000,
        max_stored_results: int | None = DEFAULT_MAX_STORED_RESULTS,
        result_ttl: float | None = None,
        shutdown_timeout: float = 30.0,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: tuple[Middleware, ...] = (),
        start_worker: bool = True,
        queue: str = "default",
    ) -> None:
        check_queue_name(queue)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a whole number >= 1, not {max_queue!r}")
        if result_backend is None:
            result_backend = InMemoryResultBackend(
                max_stored_results=max_stored_results, ttl=result_ttl, codec=codec
            )
        super().__init__(
            concurrency=concurrency,
            result_backend=result_backend,
            codec=codec,
            middlewares=middlewares,
            shutdown_timeout=shutdown_timeout,
        )
        self.max_queue = max_queue
        self.start_worker = bool(start_worker)
        #: The default queue: where a task without a ``queue`` goes.
        self.queue = queue
        self._slots: trio.Semaphore | None = None
        self._core: QueueCore | None = None
        self._worker_done: trio.Event | None = None
        self._schedules = MemorySchedules()
        self._clock_offset = 0.0
        self._clock_run: object = None

    async def _open(self, system: actors.ActorSystem) -> actors.ActorRef:
        # The scheduler's Unix time is anchored to Trio's clock once per `trio.run`
        # (the run's token tells runs apart): reopened in the same run, the broker keeps
        # its anchor, so time that passed on a fake clock between two runs of the broker
        # counts (a schedule's ticks missed meanwhile are seen as missed).
        run = trio.lowlevel.current_trio_token()
        if run is not self._clock_run:
            self._clock_run = run
            self._clock_offset = time.time() - trio.current_time()

        kept = Kept(self.max_queue)  # the queue: outlives each instance of the actor

        def make() -> InMemoryBrokerActor:
            actor = InMemoryBrokerActor(
                self.codec,
                self.max_queue,
                self.result_backend,
                self._schedules,
                self.tasks,
                self.queue,
                kept,
            )
            self._slots = actor.slots  # lent: the bound producers wait on
            self._core = actor.core  # read by `queued` only
            return actor

        # Unbounded: sends are bounded by max_queue (the lent semaphore), acks by the
        # workers' runners; a full mailbox would only make a producer yield. A bug in a
        # handler restarts the actor, which takes over the same queue.
        return await system.spawn(
            make,
            name="broker",
            mailbox_size=math.inf,
            on_failure=actors.RESTART,
            max_restarts=BUG_RESTARTS,  # then it escalates: the process ends
            backoff=BUG_BACKOFF,
        )

    @property
    def embedded_worker(self) -> bool:
        return self.start_worker

    def _schedule_backend(self) -> ScheduleBackend:
        return _MemoryScheduleBackend(self)

    def _scheduler_clock(self) -> Callable[[], float]:
        """Unix time that follows Trio's clock (so ``autojump_clock`` speeds it up)."""
        return lambda: trio.current_time() + self._clock_offset

    def _task_registered(self, task: Task[Any, Any]) -> None:
        if task.limits is not None and self._running and self._ref is not None:
            self._ref.tell_nowait(Upgrade())  # its limits are decided by the dispatch

    async def _started(self) -> None:
        if self.start_worker:
            assert self._nursery is not None
            await self._nursery.start(self._embedded_worker)

    async def _embedded_worker(self, task_status: trio.TaskStatus[Any]) -> None:
        done = self._worker_done = trio.Event()
        try:
            # The embedded worker runs every queue's tasks.
            await self._run_worker(self.concurrency, (EVERY_QUEUE,), "worker", task_status)
        finally:
            done.set()

    # ---------------------------------------------------------------- sending

    def _data(self, message: TaskMessage) -> bytes | None:
        """The encoded message, or ``None`` when the JSON codec is certain to encode it
        (nothing in this process needs the bytes then; a dead letter encodes it)."""
        codec = self.codec
        if type(codec) is JSONCodec and codec.encodes_trivially(message):
            return None
        return self._encode(message)

    async def _wait_for_room(self, slots: trio.Semaphore) -> None:
        await slots.acquire()
        if not self._running:
            slots.release()
            raise BrokerClosed("the broker stopped while the send waited for room")

    async def _send(self, message: TaskMessage) -> TaskID:
        """Take a place in the queue (waiting while ``max_queue`` messages wait), then
        tell the broker actor. Does not yield to the scheduler when there is room (a
        cancelled caller still gets ``Cancelled``), so a burst of sends costs no
        context switches."""
        data = self._data(message)
        await trio.lowlevel.checkpoint_if_cancelled()  # before a place is taken
        slots = self._slots
        assert slots is not None
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_room(slots)
        return await self._queue(Send(message, data, True, True))

    async def _queue(self, send: Send) -> TaskID:
        """Tell the broker actor the (admitted) Send; a unique job is asked instead (it
        may not be sent: another task holds its key)."""
        labels = send.message.labels
        if labels and "unique_key" in labels:
            holder: TaskID = await self.ref.ask(SendUnique(send))
            return holder
        self.ref.tell_nowait(send)
        return send.message.task_id

    async def kick(self, message: TaskMessage) -> TaskID:
        """As :meth:`Broker.kick`; without middlewares, in one call (the hot path of
        every ``kiq``: each layer of coroutine costs here)."""
        if self.hooks.has:
            return await super().kick(message)
        self._check_send(message)
        data = self._data(message)
        await trio.lowlevel.checkpoint_if_cancelled()  # before a place is taken
        slots = self._slots
        assert slots is not None
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await self._wait_for_room(slots)
        labels = message.labels
        if labels and "unique_key" in labels:
            tid = await self._queue(Send(message, data, True, True))
        else:
            self.ref.tell_nowait(Send(message, data, True, True))
            tid = message.task_id
        self.stats.sent += 1
        return tid

    def kick_nowait(self, message: TaskMessage) -> TaskID:
        """Send now, or raise :class:`QueueFull`. ``pre_send``/``post_send`` hooks run when
        they are plain functions; an ``async`` one makes this raise :class:`SendError`."""
        hooks = self.hooks
        send_hooks = "pre_send" in hooks.has or "post_send" in hooks.has
        if send_hooks:
            if not (hooks.is_sync("pre_send") and hooks.is_sync("post_send")):
                raise SendError("kiq_nowait cannot run async pre_send/post_send hooks; use kiq()")
            message = hooks.run_sync("pre_send", message)
        self._check_send(message)
        if message.labels and "unique_key" in message.labels:
            raise SendError("kiq_nowait cannot send a unique job (it may wait); use kiq()")
        data = self._data(message)
        slots = self._slots
        assert slots is not None
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            raise QueueFull(f"the queue holds max_queue={self.max_queue} messages") from None
        self.ref.tell_nowait(Send(message, data, True, True))
        self.stats.sent += 1
        if send_hooks:
            try:
                hooks.run_sync("post_send", message)
            except Exception:
                log.exception("middleware.failed", hook="post_send")
        return message.task_id

    # --------------------------------------------------------------- queries

    async def wait_all(self) -> None:
        """Return when nothing is queued, delayed or running.

        Cancellation: only the wait stops."""
        idle: trio.Event = await self.ref.ask(WatchIdle())
        await idle.wait()

    @property
    def queued(self) -> int:
        """Messages waiting to start (delayed ones included): the places taken in the
        bounded queue (retries, which hold none, are not counted)."""
        slots = self._slots
        return 0 if slots is None else self.max_queue - slots.value

    async def dead_letters(
        self, limit: int = 100, *, queue: str | None = None
    ) -> list[dict[str, Any]]:
        """The oldest of the last 1,000 rejected messages (this process only); of
        ``queue`` only, when given."""
        letters: list[dict[str, Any]] = await self.ref.ask(DeadLetters(limit, queue, self.queue))
        return letters

    async def purge_dead_letters(self, *, queue: str | None = None) -> int:
        """Drop the dead letters (of ``queue`` only, when given); returns how many."""
        n: int = await self.ref.ask(PurgeDeadLetters(queue, self.queue))
        return n

    # -------------------------------------------------------------- lifecycle

    async def _drain(self) -> None:
        ref = self._ref
        if ref is None:
            return
        # Intake stops first: senders now get BrokerClosed.
        self._running = False
        await ref.ask(CloseIntake())
        # Delayed tasks would not be due before the deadline: cancel them now.
        await ref.ask(CancelUnstarted("the broker shut down before it was due"))
        workers: list[actors.ActorRef] = await ref.ask(ListWorkers())
        if workers:  # else nothing could finish: no wait
            idle: trio.Event = await ref.ask(WatchIdle())
            with trio.move_on_after(self.shutdown_timeout):
                await idle.wait()
        # Past the deadline: what is queued never starts (retries waiting for their
        # backoff included), what runs is cancelled.
        await ref.ask(
            CancelUnstarted(
                "the broker shut down before its retry was due",
                "the broker shut down before it started",
                queued=True,
            )
        )
        for w in await ref.ask(ListWorkers()):
            try:
                ticket: DrainTicket = await w.ask(Drain(0))
            except actors.ActorStopped:
                continue
            await ticket.wait()
        # The embedded worker ends before the client shutdown handlers run.
        done = self._worker_done
        if done is not None and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await done.wait()
