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

import math
import time
from collections.abc import Callable
from typing import Any

import trio

import actors
from actors._log import get_logger
from bus._broker import Broker
from bus._broker_actor import ListWorkers
from bus._codec import Codec, JSONCodec
from bus._errors import BrokerClosed, QueueFull, SendError
from bus._ids import TaskID
from bus._make import maker
from bus._memory_actor import InMemoryBrokerActor, Kept
from bus._memory_messages import (
    EVERY_QUEUE,
    CancelUnstarted,
    CloseIntake,
    DeadLetters,
    MemorySchedules,
    PurgeDeadLetters,
    ScheduleOp,
    SendUnique,
    Upgrade,
    WatchIdle,
)
from bus._memory_room import Room
from bus._message import TaskMessage
from bus._middleware import Middleware
from bus._options import check_queue_name
from bus._protocol import (
    Drain,
    DrainTicket,
    Send,
)
from bus._queue import QueueCore
from bus._results import DEFAULT_MAX_STORED_RESULTS, InMemoryResultBackend, ResultBackend
from bus._schedule import ScheduleSpec
from bus._scheduler import ScheduleBackend, TickState
from bus._supervision import BUG_BACKOFF, BUG_RESTARTS
from bus._task import Task

__all__ = ["InMemoryBroker", "InMemoryBrokerActor"]

log = get_logger("bus")

_make_send = maker(Send)  # Send(...), cheaper (see bus._make)


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
        self._slots: Room | None = None
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

    async def _wait_for_room(self, slots: Room) -> None:
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
        """As :meth:`Broker.kick`; without middlewares and with room in the queue, in
        one call (:meth:`_kick_now`)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # before a place is taken
        tid = self._kick_now(message)
        return tid if tid is not None else await super().kick(message)

    def _kick_now(self, message: TaskMessage) -> TaskID | None:
        """Send ``message`` now, without waiting, when it needs nothing more: no
        middleware, not a unique job (it asks the broker actor), room in the queue.
        ``None``: nothing was sent (send it with :meth:`Broker.kick`, which waits for
        room). The hot path of every ``kiq``: the caller passed its own cancellation
        point, and each layer of coroutine costs here."""
        labels = message.labels
        if self.hooks.has or (labels and "unique_key" in labels):
            return None
        self._check_send(message)
        codec = self.codec  # self._data, unrolled
        if type(codec) is JSONCodec and codec.encodes_trivially(message):
            data = None
        else:
            data = self._encode(message)
        slots = self._slots
        assert slots is not None
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        self.ref.tell_nowait(_make_send(message, data, True, True))
        self.stats.sent += 1
        return message.task_id

    @property
    def _fast_kick(self) -> Callable[[TaskMessage], TaskID | None] | None:
        """What ``Task.kiq`` calls, after its cancellation point, before :meth:`kick`
        (which it calls when this returns ``None``): :meth:`_kick_now`, unless a
        subclass changed :meth:`kick` (then every send goes through it)."""
        return self._kick_now if type(self).kick is InMemoryBroker.kick else None

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
