"""The in-memory broker: one process, no server, every feature."""

from __future__ import annotations

import collections
import heapq
import math
import time
from typing import Any

import structlog
import trio

from bus._broker import Broker
from bus._codec import Codec, DecodeError
from bus._errors import BrokerClosed, QueueFull, SendError
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._protocol import Ack, Cancel, Delivery, Nack, Receive, Send
from bus._results import InMemoryResultBackend, ResultBackend

__all__ = ["InMemoryBroker"]

log = structlog.get_logger("bus")


class InMemoryBroker(Broker):
    """Runs tasks in this process: ``async with broker`` starts a worker beside you.

    - ``concurrency``: at most this many tasks run at once (a real limit).
    - ``max_queue``: at most this many messages wait (queued or delayed); ``kiq`` waits
      for room beyond it, ``kiq_nowait`` raises :class:`QueueFull`. Retries never wait.
    - ``max_stored_results`` / ``result_ttl``: bound the default result store.
    - ``shutdown_timeout``: on leaving ``async with``, how long queued and running tasks
      get to finish before they are cancelled (and recorded as CANCELLED).

    Messages are encoded on send and decoded by the worker, as with a real transport,
    so a task sees its own copy of its arguments and a bad message is caught early.
    """

    runs_worker_inside = True
    records_shutdown_cancel = True

    def __init__(
        self,
        concurrency: int = 100,
        *,
        max_queue: int = 10_000,
        max_stored_results: int | None = None,
        result_ttl: float | None = None,
        shutdown_timeout: float = 30.0,
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        middlewares: tuple[Middleware, ...] = (),
    ) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a whole number >= 1, not {max_queue!r}")
        if result_backend is None:
            result_backend = InMemoryResultBackend(
                max_stored_results=max_stored_results, ttl=result_ttl
            )
        super().__init__(
            concurrency=concurrency,
            result_backend=result_backend,
            codec=codec,
            middlewares=middlewares,
            shutdown_timeout=shutdown_timeout,
        )
        self.max_queue = max_queue
        self._setup()

    def _setup(self) -> None:
        self._ready_send, self._ready_recv = trio.open_memory_channel[Delivery](math.inf)
        self._slots = trio.Semaphore(self.max_queue)
        self._delayed: list[tuple[float, int, Delivery]] = []
        self._seq = 0
        self._timer: trio.CancelScope | None = None
        self._pending: set[TaskID] = set()  # sent and not yet acked/nacked
        self._cancelled: set[TaskID] = set()
        # Made only while someone waits in wait_all(): no Event per task otherwise.
        self._all_done: trio.Event | None = None
        # The last 1,000 rejected messages: (reason, raw bytes); see dead_letters().
        self._dead: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=1000)

    # --------------------------------------------------------------- sending

    def kick_nowait(self, message: TaskMessage) -> None:
        """Send now, or raise :class:`QueueFull`. ``pre_send``/``post_send`` hooks run when
        they are plain functions; an ``async`` one makes this raise :class:`SendError`."""
        hooks = self.hooks
        send_hooks = "pre_send" in hooks.has or "post_send" in hooks.has
        if send_hooks:
            if not (hooks.is_sync("pre_send") and hooks.is_sync("post_send")):
                raise SendError("kiq_nowait cannot run async pre_send/post_send hooks; use kiq()")
            message = hooks.run_sync("pre_send", message)
        data = self._encode(message)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            raise QueueFull(f"the queue holds max_queue={self.max_queue} messages") from None
        self._enqueue(message, data, True, True)
        self.stats.sent += 1
        if send_hooks:
            try:
                hooks.run_sync("post_send", message)
            except Exception:
                log.exception("middleware.failed", hook="post_send")

    async def on_send(self, event: Send) -> None:
        """Enqueue; waits while ``max_queue`` messages are waiting.

        It does not yield to the scheduler when there is room (a cancelled caller still
        gets ``Cancelled``), so a burst of sends costs no context switches."""
        await trio.lowlevel.checkpoint_if_cancelled()  # before a slot is taken
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
            if not self._running:
                self._slots.release()
                raise BrokerClosed("the broker stopped while the send waited for room") from None
        self._enqueue(event.message, event.data, True, event.verified)

    def _enqueue(
        self,
        message: TaskMessage,
        data: bytes,
        counted: bool,
        verified: bool,
        delay: float | None = None,
    ) -> None:
        """Queue a delivery now, after ``delay`` seconds of the Trio clock, or else at
        ``message.eta`` (wall clock). ``counted``: it holds a ``max_queue`` slot
        (retries do not, so a worker never waits for room)."""
        self._pending.add(message.task_id)
        # A task must see its own copy of its arguments, which decoding ``data`` makes.
        # When they are all immutable there is nothing to copy, and the message the
        # producer built (and the codec accepted) goes to the worker as it is.
        shared = message if verified and _immutable_message(message) else None
        delivery = Delivery(data, tag=(message.task_id, counted), message=shared)
        if delay is None:
            delay = 0.0 if message.eta is None else message.eta - time.time()
        if delay > 0:
            self._delay(delivery, delay)
        else:
            self._ready_send.send_nowait(delivery)

    def _delay(self, delivery: Delivery, seconds: float) -> None:
        due = trio.current_time() + seconds
        self._seq += 1
        heapq.heappush(self._delayed, (due, self._seq, delivery))
        if self._timer is not None and due < self._timer.deadline:
            self._timer.deadline = due

    async def _run_timer(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        heap = self._delayed  # the same list for the broker's whole run
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, delivery = heapq.heappop(heap)
                self._ready_send.send_nowait(delivery)

    # ------------------------------------------------------------- protocol

    async def on_receive(self, event: Receive) -> tuple[Delivery, ...]:
        delivery = await self._ready_recv.receive()
        if delivery.tag[1]:
            self._slots.release()
        return (delivery,)

    def on_receive_nowait(self, event: Receive) -> tuple[Delivery, ...] | None:
        try:
            delivery = self._ready_recv.receive_nowait()
        except trio.WouldBlock:
            return None
        if delivery.tag[1]:
            self._slots.release()
        return (delivery,)

    def _finish(self, tid: TaskID) -> None:
        pending = self._pending
        pending.discard(tid)
        self._cancelled.discard(tid)
        if not pending and self._all_done is not None:
            self._all_done.set()
            self._all_done = None

    async def on_ack(self, event: Ack) -> None:
        self._finish_delivery(event.delivery)

    async def on_nack(self, event: Nack) -> None:
        if event.requeue is not None:
            retry = event.requeue
            data = self.codec.encode_message(retry)
            self._enqueue(retry, data, False, True, delay=event.delay)
            return
        self._dead.append((event.reason, event.delivery.data))
        self._finish_delivery(event.delivery)

    def _finish_delivery(self, d: Delivery) -> None:
        self._finish(d.tag[0])  # the tag is (task id, counted): see _enqueue

    async def on_cancel(self, event: Cancel) -> None:
        tid = event.task_id
        if self._cancel_local(tid):
            await trio.lowlevel.checkpoint()
            return
        if tid in self._pending and tid not in self._cancelled:
            self._cancelled.add(tid)
            await self._store_cancelled(tid, "cancelled before it started")
        else:
            await trio.lowlevel.checkpoint()

    async def _store_cancelled(self, tid: TaskID, why: str) -> None:
        err = RemoteError("bus.Cancelled", why)
        await self.result_backend.set_result(
            tid, TaskResult(tid, TaskStatus.CANCELLED, None, err, 0.0, {})
        )

    def is_cancelled(self, task_id: TaskID) -> bool:
        return task_id in self._cancelled

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest of the last 1,000 rejected messages (this process only)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        out = []
        for i, (reason, data) in enumerate(list(self._dead)[:limit]):
            try:
                name: str | None = self.codec.decode_message(data).task_name
            except DecodeError:
                name = None
            out.append({"id": i, "reason": reason, "task_name": name, "data": data})
        return out

    async def purge_dead_letters(self) -> int:
        n = len(self._dead)
        self._dead.clear()
        await trio.lowlevel.checkpoint_if_cancelled()
        return n

    # ------------------------------------------------------------- lifecycle

    async def wait_all(self) -> None:
        """Return when nothing is queued, delayed or running.

        Cancellation: only the wait stops."""
        if not self._pending:
            await trio.lowlevel.checkpoint()
            return
        if self._all_done is None:
            self._all_done = trio.Event()
        await self._all_done.wait()

    @property
    def queued(self) -> int:
        """Messages waiting to start (delayed ones included)."""
        return int(self._ready_recv.statistics().current_buffer_used) + len(self._delayed)

    async def _start(self, nursery: trio.Nursery) -> None:
        self._setup()
        await nursery.start(self._run_timer)

    async def _drain(self) -> None:
        # Intake stops first: senders now get BrokerClosed.
        self._running = False
        # Delayed tasks would not be due before the deadline: cancel them now.
        await self._cancel_delayed("the broker shut down before it was due")
        if any(not w.stopped for w in self.workers):  # else nothing could finish: no wait
            with trio.move_on_after(self.shutdown_timeout):
                await self.wait_all()
        # Past the deadline: what is queued never starts (retries waiting for their
        # backoff included), what runs is cancelled.
        await self._cancel_delayed("the broker shut down before its retry was due")
        while True:
            try:
                d = self._ready_recv.receive_nowait()
            except trio.WouldBlock:
                break
            await self._cancel_unstarted(d, "the broker shut down before it started")
        for w in list(self.workers):
            await w.drain(0)
        # Senders blocked on a full queue: wake them so they see BrokerClosed.
        while self._slots.statistics().tasks_waiting:
            self._slots.release()

    async def _cancel_delayed(self, why: str) -> None:
        heap = list(self._delayed)
        self._delayed.clear()  # in place: the timer task holds this list
        for _, _, d in heap:
            await self._cancel_unstarted(d, why)

    async def _cancel_unstarted(self, d: Delivery, why: str) -> None:
        tid: TaskID = d.tag[0]
        if tid not in self._cancelled:
            await self._store_cancelled(tid, why)
        self._finish(tid)

    async def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _immutable(value: object) -> bool:
    t = type(value)
    if t in _SCALARS:
        return True
    if t is tuple:
        return all(_immutable(v) for v in value)  # type: ignore[attr-defined]
    return False


def _immutable_message(message: TaskMessage) -> bool:
    return (
        all(_immutable(a) for a in message.args)
        and all(_immutable(v) for v in message.kwargs.values())
        and all(_immutable(v) for v in message.labels.values())
    )
