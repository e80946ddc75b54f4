"""The in-memory broker actor: it owns the queue (see :mod:`bus._inmemory`)."""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._broker_actor import BrokerActor
from bus._codec import Codec, DecodeError
from bus._frozen import json_faithful
from bus._ids import TaskID
from bus._make import maker
from bus._memory_channel import ReadyChannel
from bus._memory_dispatch import _Dispatch, _MemoryLease, _unique_of
from bus._memory_messages import (
    EVERY_QUEUE,
    CancelUnstarted,
    CloseIntake,
    DeadLetters,
    MemorySchedules,
    PurgeDeadLetters,
    ScheduleOp,
    SendUnique,
    TakenIds,
    Upgrade,
    WatchIdle,
)
from bus._memory_room import Room
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._protocol import (
    Ack,
    BrokerInfo,
    Cancel,
    CancelRunning,
    Delivery,
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
from bus._results import ResultBackend
from bus._schedule import ScheduleSpec, claim_ttl
from bus._scheduler import TickState
from bus._task import Task
from bus._unique import UniqueTable

__all__ = ["InMemoryBrokerActor", "Kept"]

log = get_logger("bus")

_make_delivery = maker(Delivery)  # Delivery(...), cheaper (see bus._make)


# --------------------------------------------------------------------- the actor


def _cancelled(tid: TaskID, why: str) -> TaskResult[Any]:
    return TaskResult(tid, TaskStatus.CANCELLED, None, RemoteError("bus.Cancelled", why), 0.0, {})


class Kept:
    """What the in-memory broker actor owns that must outlive one instance of it: the
    queue itself. Its factory makes one and hands it to every instance, so a restart
    after a bug loses nothing that was accepted (queued, delayed, running, unique
    keys, the leases lent to workers)."""

    __slots__ = ("_channel", "_idle", "_leases", "closed", "core", "fancy", "slots", "unique")

    def __init__(self, max_queue: int) -> None:
        self.core = QueueCore()
        self.slots = Room(max_queue)
        self._channel = ReadyChannel()
        self.fancy: _Dispatch | None = None
        self._leases: list[_MemoryLease] = []
        self._idle: list[trio.Event] = []
        self.closed = False
        self.unique = UniqueTable()


class InMemoryBrokerActor(BrokerActor):
    """The in-memory broker actor. Its decisions are :class:`~bus._queue.QueueCore`'s
    (and, once queues, priorities or limits are in use, its :class:`_Dispatch`'s);
    this class applies them (channel, timer, results, workers).

    Spawned with RESTART: the queue lives in :class:`Kept`, which outlives an
    instance; a restarted instance takes it over and starts its timer again."""

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
        self.kept = kept = kept if kept is not None else Kept(max_queue)
        # The queue's parts, read from Kept (the same objects; the hot path reads plain
        # attributes). What is rebound later is written back to Kept where it is.
        #: The queue (see :class:`Kept`).
        self.core: QueueCore = kept.core
        #: The bound on waiting messages, lent to the facade (``Broker.kick`` takes a
        #: place before it sends; a worker taking the delivery gives it back).
        self.slots: Room = kept.slots
        self._channel: ReadyChannel = kept._channel  # lends receive ends to the leases
        #: The dispatch, once queues, priorities or limits are in use (else ``None``:
        #: the channel serves).
        self.fancy: _Dispatch | None = kept.fancy
        self._leases: list[_MemoryLease] = kept._leases  # lent on the channel
        self._idle: list[trio.Event] = kept._idle
        self.closed: bool = kept.closed
        #: Unique jobs' keys, held by the task ids that run them (released at the end).
        self.unique: UniqueTable = kept.unique
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
        self._channel.close()  # leases end once what is buffered was taken
        if self.fancy is not None:
            self.fancy.close()

    # ----------------------------------------------------- the dispatch

    def _upgrade(self) -> _Dispatch:
        """Move to the dispatch for good: what the channel holds goes there, in order,
        and the channel closes (its leases go on with the dispatch)."""
        fancy = self.fancy
        if fancy is not None:
            return fancy
        fancy = self.fancy = self.kept.fancy = _Dispatch(self)
        while True:
            try:
                d = self._channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            fancy.ready.put(self.default_queue, 0, d)
        for lease in self._leases:
            if not lease.closed:
                lease._fancy = fancy.lease(lease.queues, lease.consumer)
        self._leases.clear()
        self._channel.close()
        return fancy

    @actors.handles(Upgrade, inline=True)
    def upgrade(self, msg: Upgrade) -> None:
        self._upgrade()

    def _ready(self, d: Delivery) -> None:
        """``d`` may start now."""
        fancy = self.fancy
        if fancy is None:
            self._channel.send_nowait(d)
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
        self.kept._idle = self._idle
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
            unique = _unique_of(message) if message.labels else None
            d = _make_delivery(data, (message.task_id, counted, unique), shared, 1)
            if self.core.send(d, 0.0, 0.0):
                self._channel.send_nowait(d)
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
        lease = _MemoryLease(self._channel.clone(), self.core, self.slots, queues, msg.consumer)
        self._leases = self.kept._leases = [held for held in self._leases if not held.closed]
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
                "senders_waiting": self.slots.tasks_waiting,
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
        self.closed = self.kept.closed = True
        # Senders blocked on a full queue: wake them so they see BrokerClosed.
        while self.slots.tasks_waiting:
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
                    waiting.append(self._channel.receive_nowait())
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
