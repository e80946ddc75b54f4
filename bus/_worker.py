"""The worker: an actor that takes deliveries from a broker and runs them, with a real
concurrency limit.

The decisions (what an attempt's outcome means: store, retry, reject) live in plain
synchronous functions (:func:`decide`); the worker actor does the I/O around them. It
speaks to the broker only by message (``Register``, ``Receive``, ``Ack``, ``Nack``,
``Release``) and through the :class:`~bus.protocol.Lease` the broker lent it, and it
takes ``CancelRunning`` and ``Drain`` in its own mailbox.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._codec import DecodeError
from bus._context import Context, _current
from bus._frozen import thaw, thaw_args
from bus._ids import TaskID
from bus._make import maker
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import TaskOptions
from bus._protocol import (
    Ack,
    CancelRunning,
    Delivery,
    Drain,
    DrainTicket,
    Lease,
    Nack,
    Receive,
    Register,
    Release,
    Unclaim,
    Unregister,
)
from bus._workflow_plan import ON_ERROR_LABEL, failed_step_args

if TYPE_CHECKING:
    from bus._broker import Broker
    from bus._task import Task

__all__ = ["Decision", "Worker", "WorkerActor", "decide"]

log = get_logger("bus.worker")

# TaskResult(...) and Ack(...) of the hot path, cheaper (see bus._make).
_make_result = maker(TaskResult)
_make_ack = maker(Ack)
_NO_KWARGS: dict[str, Any] = {}


@attrs.frozen
class Decision:
    """What to do with a finished attempt: store ``result`` and ack, or requeue ``retry``
    after ``delay`` seconds."""

    result: TaskResult[Any] | None = None
    retry: TaskMessage | None = None
    delay: float = 0.0


def decide(
    message: TaskMessage,
    options: TaskOptions,
    status: TaskStatus,
    value: Any,
    error: BaseException | None,
    elapsed: float,
) -> Decision:
    """Plain decision logic for one attempt (no I/O): retry when the options allow it and
    the failure matches ``retry_on``; otherwise the attempt's result is final."""
    if status is TaskStatus.SUCCESS:
        return Decision(TaskResult(message.task_id, status, value, None, elapsed, message.labels))
    if (
        status in (TaskStatus.FAILURE, TaskStatus.TIMEOUT)
        and message.attempt <= options.retries
        and isinstance(error if error is not None else TimeoutError(), options.retry_on)
    ):
        nxt = attrs.evolve(message, attempt=message.attempt + 1, eta=None)
        return Decision(retry=nxt, delay=options.backoff(message.attempt))
    remote = RemoteError.from_exception(error) if error is not None else None
    if remote is None:
        text = {TaskStatus.TIMEOUT: "timed out", TaskStatus.CANCELLED: "cancelled"}[status]
        remote = RemoteError(f"bus.{status.name.title()}", f"task {text}")
    return Decision(TaskResult(message.task_id, status, None, remote, elapsed, message.labels))


_STREAK = 32
_ERRORS = (TaskStatus.FAILURE, TaskStatus.TIMEOUT)
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


class _Runner:
    """One of the worker's ``concurrency`` slots. Its cancel scope spans its whole life,
    so running a task costs no scope of its own: a timeout is the scope's deadline, a
    cancel request cancels the scope, and a fresh runner takes the slot over.

    While a sync task runs in its thread (``in_thread``) only a stop cancels the scope
    (see :meth:`WorkerActor._run_in_thread`)."""

    __slots__ = (
        "delivery",
        "finished",
        "idle",
        "in_thread",
        "message",
        "reason",
        "scope",
        "started",
    )

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.idle = True
        # Why the scope was cancelled: "cancel", "shutdown" or "" (the timeout); a sync
        # task's timeout, noticed when it returns, is "timeout".
        self.reason = ""
        self.message: TaskMessage | None = None
        self.delivery: Delivery | None = None
        self.started = 0.0
        self.in_thread = False
        # What a task returned or raised (value, error) when a stop cancelled the
        # runner after the task had finished: the epilogue records it.
        self.finished: tuple[Any, BaseException | None] | None = None


class _StoredThenAck:
    """What a worker does once a result stored with ``set_result_soon`` is in the
    backend (or could not be): ack the task (or log why not, leaving it to be
    delivered again), and end its part of the worker's activity."""

    __slots__ = ("delivery", "message", "worker")

    def __init__(self, worker: WorkerActor, delivery: Delivery, message: TaskMessage) -> None:
        self.worker = worker
        self.delivery = delivery
        self.message = message

    def __call__(self, error: BaseException | None) -> None:
        worker = self.worker
        try:
            tid = self.message.task_id
            if error is not None:
                worker._log.error(
                    "result.store_failed",
                    task_id=tid,
                    task_name=self.message.task_name,
                    exc_info=error,
                )
                return
            broker_ref = worker._broker_ref
            assert broker_ref is not None
            try:
                broker_ref.tell_nowait(_make_ack(self.delivery))
            except actors.MailboxFull:
                try:  # a task of the worker's own tells it
                    worker.nursery.start_soon(worker._tell_broker, _make_ack(self.delivery))
                except (actors.ActorError, RuntimeError):  # the worker is gone
                    worker._log.warning("worker.ack_lost", task_id=tid)
            except actors.ActorStopped:
                worker._log.warning("worker.ack_lost", task_id=tid)
        finally:
            worker._storing -= 1
            idle = worker._idle
            if idle is not None and worker._storing == 0:
                idle.set()
                worker._idle = None


class WorkerActor(actors.Actor):
    """Runs a broker's tasks: ``concurrency`` runner tasks in its own nursery, each taking
    a delivery from the broker's lease, running it to its end, storing its result and
    acking it.

    On start it registers every task with the broker actor (``Register`` with its own
    ref) and asks it for a lease (``Receive``). Its mailbox takes ``CancelRunning``
    (cancel one task if it runs here) and ``Drain`` (stop taking work, let running
    tasks finish within a timeout, interrupt the rest). Made by
    :meth:`Broker.run_worker`, which hands out a :class:`Worker` handle.
    """

    def __init__(self, broker: Broker, concurrency: int, queues: tuple[str, ...] = ()) -> None:
        self.broker = broker
        self.concurrency = concurrency
        self.queues = queues
        self.stats = broker.stats
        self.running: dict[TaskID, _Runner] = {}
        # A second delivery of a task id that runs here already (at-least-once: a
        # redelivery can overlap the first run): rare, kept apart from the hot dict.
        self._also_running: dict[TaskID, list[_Runner]] = {}
        self._runners: set[_Runner] = set()
        self._draining = False
        self._thread_limiter = trio.CapacityLimiter(concurrency)
        self._active = 0
        #: Results being stored in the background (``set_result_soon``): at most
        #: ``concurrency``; past that a runner waits for its own store.
        self._storing = 0
        self._idle: trio.Event | None = None  # made only while a drain waits
        self._lease: Lease | None = None
        self._broker_ref: actors.ActorRef | None = None
        self._tickets: list[DrainTicket] = []
        self._log = log

    # ------------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        broker_ref = self.broker.ref
        self._broker_ref = broker_ref
        self._log = log.bind(actor=self.name)
        me = self.ref
        for name in self.broker.tasks:
            await broker_ref.tell(Register(name, me))
        lease = await broker_ref.ask(Receive(self.concurrency, self.name, self.queues))
        if not isinstance(lease, Lease):
            raise TypeError(f"the broker answered Receive with {lease!r}, not a bus.protocol.Lease")
        self._lease = lease
        await self.nursery.start(self._keep)
        for _ in range(self.concurrency):
            self.nursery.start_soon(self._runner)
        self._log.info(
            "worker.started", concurrency=self.concurrency, tasks=sorted(self.broker.tasks)
        )

    async def _keep(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lives as long as the worker's nursery: on the way out (a stop, a failure or
        Trio's cancellation) the lease is given back and the broker told."""
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            for ticket in self._tickets:  # drains cut short by a cancellation: done too
                if not ticket.done:
                    ticket.finish(len(self.running))
            if self._lease is not None:
                self._lease.close()
            if self._broker_ref is not None:
                with contextlib.suppress(actors.ActorError):
                    self._broker_ref.tell_nowait(Unregister(self.ref))
            self._log.info("worker.stopped")

    async def on_stop(self) -> None:
        if self._active or self._storing:
            await self._drain(self.broker.shutdown_timeout, DrainTicket())

    # -------------------------------------------------------------------- control

    @actors.handles(CancelRunning, inline=True)
    def cancel_running(self, msg: CancelRunning) -> bool:
        """Cancel ``msg.task_id`` if this worker runs it; True if it did."""
        runner = self.running.get(msg.task_id)
        if runner is None:
            return False
        for r in (runner, *self._also_running.get(msg.task_id, ())):
            if msg.reason == "shutdown" and r.reason == "cancel":
                pass  # cancelled by request already: recorded CANCELLED, not handed back
            else:
                r.reason = msg.reason
            if msg.reason == "shutdown" or not r.in_thread:
                # A thread cannot be interrupted: a cancel request to a sync task takes
                # effect when it returns; only a stop abandons it (_run_in_thread).
                r.scope.cancel()
        if msg.reason == "cancel":
            self._log.info("task.cancel_requested", task_id=msg.task_id)
        return True

    @actors.handles(Drain)
    def drain(self, msg: Drain) -> DrainTicket:
        ticket = DrainTicket()
        self._tickets.append(ticket)
        self.nursery.start_soon(self._drain, msg.timeout, ticket)
        return ticket

    def _stop_intake(self) -> None:
        self._draining = True
        if self._lease is not None:
            self._lease.close()  # the broker lends this worker nothing more
        for runner in list(self._runners):
            if runner.idle:
                runner.scope.cancel()

    async def _drain(self, timeout: float | None, ticket: DrainTicket) -> None:
        self._stop_intake()
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await self._wait_idle(stores=True)
        n = 0
        for tid in list(self.running):
            n += self.cancel_running(CancelRunning(tid, "shutdown")) * (
                1 + len(self._also_running.get(tid, ()))
            )
        # The interrupted runners record their tasks; results still being stored
        # past the deadline are not waited for (their tasks are acked if the store
        # is confirmed later, else delivered again).
        await self._wait_idle(stores=False)
        ticket.finish(n)

    async def _wait_idle(self, *, stores: bool) -> None:
        """Until no runner runs a task (and, with ``stores``, no result is being
        stored in the background)."""
        if not (self._active or (stores and self._storing)):
            await trio.lowlevel.checkpoint()
            return
        while self._active or (stores and self._storing):
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def _task_done(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    # --------------------------------------------------------------------- running

    async def _runner(self) -> None:
        lease = self._lease
        assert lease is not None
        receive = lease.receive
        receive_nowait = lease.receive_nowait
        # The fast path below, only where deliveries can be ready before a runner waits.
        nowait_streak = _STREAK if getattr(lease, "ready_ahead", True) else 0
        process = self._process
        streak = 0
        with trio.CancelScope() as scope:
            r = _Runner(scope)
            self._runners.add(r)
            try:
                while not self._draining:
                    # Fast path: take what is ready without a trip through the
                    # scheduler, but yield at least every _STREAK deliveries so no-op
                    # tasks cannot starve the rest of the program.
                    d: Delivery | None = None
                    if streak < nowait_streak:
                        try:  # noqa: SIM105 - the hot path: no context manager
                            d = receive_nowait()
                        except trio.WouldBlock:
                            pass
                    if d is not None:
                        streak += 1
                        try:
                            await trio.lowlevel.checkpoint_if_cancelled()
                        except trio.Cancelled:
                            # A delivery once taken is run or handed back, never lost.
                            self._hand_back(d)
                            raise
                    else:
                        streak = 0
                        d = await receive()
                        if self._draining:
                            # Intake stopped in the scheduler pass that handed this
                            # runner ``d`` (``_stop_intake`` cancelled its scope: the
                            # flag says so without asking the scope, which reads the
                            # clock): ``d`` has not started, so it goes back unrun.
                            # (mypy keeps the loop condition's narrowing across the
                            # await; the flag changes meanwhile.)
                            self._hand_back(d)  # type: ignore[unreachable]
                            break
                    r.idle = False
                    await process(d, r)
                    r.idle = True
            except (trio.EndOfChannel, trio.ClosedResourceError):
                pass  # the broker stopped lending, or intake stopped
            finally:
                self._runners.discard(r)
                if r.message is not None:
                    self._unrun(r.message.task_id, r)
        if r.message is not None and r.delivery is not None:
            # The task was interrupted (timeout, cancel request, shutdown), or a stop
            # cancelled the runner just after it finished: record it here, outside
            # the cancelled scope, and hand the slot to a fresh runner.
            message, delivery = r.message, r.delivery
            try:
                await self._interrupted(r, message, delivery)
            finally:
                self._task_done()
            if not self._draining:
                self.nursery.start_soon(self._runner)

    async def _process(self, delivery: Delivery, r: _Runner) -> None:
        broker = self.broker
        stats = self.stats
        stats.received += 1
        message = delivery.message
        if message is None:
            try:
                message = broker.codec.decode_message(delivery.data)
            except DecodeError as exc:
                await self._reject(delivery, f"undecodable message: {exc}", None)
                return
        task = broker.tasks.get(message.task_name)
        if task is None:
            why = f"unknown task {message.task_name!r}"
            if message.task_name.startswith("__main__:"):
                why += (
                    " (a task declared in a script run as __main__ is named after it: "
                    "give it a name, @broker.task(name=...))"
                )
            await self._reject(delivery, why, message)
            return
        tid = message.task_id
        labels = message.labels
        try:
            options = task.options.with_labels(labels) if labels else task.options
        except (TypeError, ValueError) as exc:
            await self._reject(delivery, f"invalid option labels: {exc}", message)
            return
        hooks = broker.hooks
        status = TaskStatus.SUCCESS
        error: BaseException | None = None
        value: Any = None
        self._active += 1
        r.message, r.delivery, r.reason = message, delivery, ""
        if tid in self.running:
            self._also_running.setdefault(tid, []).append(r)
        else:
            self.running[tid] = r
        token = _current.set(Context(message, broker))
        t0 = r.started = time.perf_counter()
        timeout = options.timeout
        timed = timeout is not None
        if timeout is not None:
            r.scope.deadline = trio.current_time() + timeout
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = _NO_KWARGS  # never written: a task's own are a copy
        calling = False
        try:
            if hooks.has and "pre_execute" in hooks.has:
                message = r.message = await hooks.transform("pre_execute", message)
            if message.args:
                args = thaw_args(message.args)
                if message.labels and message.labels.get(ON_ERROR_LABEL):
                    args = failed_step_args(args)  # on_error gets a TaskResult
            if message.kwargs:
                kwargs = _thaw_kwargs(message.kwargs)
            if task.context_param is not None:
                kwargs = {**kwargs, task.context_param: Context(message, broker)}
            calling = True
            if task.is_async:
                value = await task.func(*args, **kwargs)
            else:
                value = await self._run_in_thread(r, functools.partial(task.func, *args, **kwargs))
                if r.reason == "cancel":  # requested while it ran (see _run_in_thread)
                    status = TaskStatus.CANCELLED
                elif r.reason == "timeout":
                    status = TaskStatus.TIMEOUT
        except TypeError as exc:
            if calling and not _binds(task, args, kwargs):
                self._forget_run(r, tid, token)
                try:
                    await self._reject(
                        delivery, "arguments do not match the task's signature", message
                    )
                finally:
                    self._task_done()
                return
            status, error = TaskStatus.FAILURE, exc
        except Exception as exc:
            status, error = TaskStatus.FAILURE, exc
        # Only a cancel request (which sets ``r.reason``) or the deadline cancels the
        # runner's scope while a task runs: a plain task skips the check, which reads
        # the clock.
        if (r.reason or timed) and r.scope.cancel_called:
            # Cancelled while it ran, but it returned anyway: it swallowed Cancelled,
            # or it ended in the scheduler pass that cancelled it (a thread's result
            # already on its way). After a cancel request or the timeout its outcome
            # is discarded and the runner's epilogue records CANCELLED / TIMEOUT. A
            # stop's cancellation came too late: the task finished, so the epilogue
            # (outside this cancelled scope) records what it returned and acks it; it
            # is never handed back to run again.
            if r.reason == "shutdown":
                r.finished = (value, error)
            await trio.lowlevel.checkpoint()  # raises Cancelled here
        # From here on a cancel request or the deadline no longer concerns this task.
        if timed:
            r.scope.deadline = math.inf
        running = self.running
        if self._also_running or running.get(tid) is not r:
            self._unrun(tid, r)
        else:  # the common case of _unrun
            del running[tid]
        r.message = r.delivery = None
        _current.reset(token)
        try:
            if status is TaskStatus.SUCCESS and not hooks.has:
                # The common case, without the decision machinery: store, then ack.
                stats.succeeded += 1
                labels = message.labels
                result: TaskResult[Any] = _make_result(
                    tid, status, value, None, time.perf_counter() - t0, labels
                )
                if labels and "unique_key" in labels:
                    await self._unclaim(delivery)
                try:
                    if options.store_result or "workflow" in labels:
                        backend = broker.result_backend
                        if backend.set_result_nowait(tid, result):
                            pass
                        elif (
                            self._storing < self.concurrency
                            and not (labels and "workflow" in labels)
                            and backend.set_result_soon(
                                tid, result, _StoredThenAck(self, delivery, message)
                            )
                        ):
                            # Stored in the background, then acked (_StoredThenAck):
                            # this runner takes its next task meanwhile (a drain
                            # waits for the store too, within its deadline).
                            self._storing += 1
                            return
                        else:
                            await backend.set_result(tid, result)
                except Exception:
                    self._log.exception(
                        "result.store_failed", task_id=tid, task_name=message.task_name
                    )
                else:
                    if (
                        labels
                        and "workflow" in labels
                        and not await self._step_done(message, result)
                    ):
                        return  # not acked: its transition runs again with the redelivery
                    try:
                        self._broker_ref.tell_nowait(_make_ack(delivery))  # type: ignore[union-attr]
                    except (actors.MailboxFull, actors.ActorStopped):
                        # The careful way: a task of the worker's own tells it, or it is logged.
                        self._ack(delivery, tid)
            else:
                await self._finish(message, delivery, options, status, value, error, t0)
        finally:
            self._active -= 1
            if self._active == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _run_in_thread(self, r: _Runner, call: Callable[[], Any]) -> Any:
        """Run a sync task's function in a worker thread and return what it returns.

        Trio cannot interrupt a thread, so the task's own timeout and a cancel request
        wait for the function to return (``r.reason`` then says which, and the caller
        records TIMEOUT or CANCELLED). A stop cannot wait: the drain's deadline, a
        second stop request (``Worker.stop``) or Trio cancelling the worker cancels
        this await, and ``abandon_on_cancel=True`` makes it return at once, leaving
        the thread to run to its end in the background; whatever it returns then is
        discarded. The delivery is handed back (or recorded CANCELLED in memory) at
        the deadline, so a stop takes ``shutdown_timeout`` and no longer. The thread
        keeps its ``CapacityLimiter`` token until it returns, so abandoned threads
        never outnumber ``concurrency``.

        If the function had returned when the stop came (its outcome is in ``box``
        though Trio has not told this task yet), ``r.finished`` keeps the outcome:
        the task finished, so it is recorded and acked, never run again.
        """
        deadline = r.scope.deadline
        if deadline != math.inf:
            r.scope.deadline = math.inf  # checked when the function returns
        box: list[tuple[Any, BaseException | None]] = []

        def run() -> None:
            try:
                box.append((call(), None))
            except Exception as exc:
                box.append((None, exc))

        r.in_thread = True
        try:
            await trio.to_thread.run_sync(run, limiter=self._thread_limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            if box and r.reason == "shutdown":
                r.finished = box[0]
            raise
        finally:
            r.in_thread = False
        value, error = box[0]
        if not r.reason and trio.current_time() >= deadline:
            r.reason = "timeout"
        if r.reason in ("cancel", "timeout"):
            return None  # its outcome is discarded
        if error is not None:
            raise error
        return value

    def _ack(self, delivery: Delivery, tid: TaskID) -> None:
        self._tell_soon(Ack(delivery), "worker.ack_lost", tid)

    def _hand_back(self, delivery: Delivery) -> None:
        """Give a delivery that was taken but never started back to the broker."""
        self._tell_soon(Release(delivery, started=False), "worker.handback_lost", None)

    def _tell_soon(self, msg: object, lost: str, tid: TaskID | None) -> None:
        """Tell the broker ``msg`` without waiting (from a task that must not wait, or
        cannot: a cancelled scope); a full mailbox makes a task of the actor's own
        tell it; a stopped broker is logged as ``lost``."""
        broker_ref = self._broker_ref
        assert broker_ref is not None
        try:
            broker_ref.tell_nowait(msg)
        except actors.MailboxFull:
            self.nursery.start_soon(self._tell_broker, msg)
        except actors.ActorStopped:
            self._log.warning(lost, task_id=tid)

    def _unrun(self, tid: TaskID, r: _Runner) -> None:
        """``r`` no longer runs ``tid``."""
        running = self.running
        if running.get(tid) is r:
            extra = self._also_running.get(tid)
            if extra:
                running[tid] = extra.pop()
                if not extra:
                    del self._also_running[tid]
            else:
                del running[tid]
        else:
            extra = self._also_running.get(tid)
            if extra and r in extra:
                extra.remove(r)
                if not extra:
                    del self._also_running[tid]

    def _forget_run(self, r: _Runner, tid: TaskID, token: Any) -> None:
        if r.scope.deadline != math.inf:
            r.scope.deadline = math.inf
        self._unrun(tid, r)
        r.message = r.delivery = None
        _current.reset(token)

    async def _interrupted(self, r: _Runner, message: TaskMessage, delivery: Delivery) -> None:
        task = self.broker.tasks[message.task_name]
        try:
            options = task.options.with_labels(message.labels)
        except (TypeError, ValueError):
            options = task.options
        finished, r.finished = r.finished, None
        if finished is not None:
            # A stop came after it had finished: what it returned is its result.
            value, error = finished
            status = TaskStatus.SUCCESS if error is None else TaskStatus.FAILURE
            await self._finish(message, delivery, options, status, value, error, r.started)
            return
        lease = self._lease
        if r.reason == "shutdown" and lease is not None and lease.redeliver_interrupted:
            # Handed back unfinished: another worker runs it again.
            self._log.info("task.interrupted", task_id=message.task_id, task_name=message.task_name)
            await self._tell_broker(Release(delivery))
            return
        status = TaskStatus.TIMEOUT if r.reason in ("", "timeout") else TaskStatus.CANCELLED
        await self._finish(message, delivery, options, status, None, None, r.started)

    async def _reject(self, delivery: Delivery, reason: str, message: TaskMessage | None) -> None:
        self.stats.rejected += 1
        self._log.error(
            "task.rejected",
            reason=reason,
            task_id=message.task_id if message else None,
            task_name=message.task_name if message else None,
        )
        hooks = self.broker.hooks
        if "on_reject" in hooks.has:
            await hooks.run_all("on_reject", message, reason)
        if message is not None:
            # Whoever waits for this id learns it will never run.
            err = RemoteError("bus.Rejected", reason)
            result: TaskResult[Any] = TaskResult(
                message.task_id, TaskStatus.FAILURE, None, err, 0.0, message.labels
            )
            if await self._store(message, result):
                await self._step_done(message, result)
        await self._tell_broker(Nack(delivery, reason))

    async def _finish(
        self,
        message: TaskMessage,
        delivery: Delivery,
        options: TaskOptions,
        status: TaskStatus,
        value: Any,
        error: BaseException | None,
        t0: float,
    ) -> None:
        stats = self.stats
        hooks = self.broker.hooks
        elapsed = time.perf_counter() - t0
        if status is TaskStatus.SUCCESS:
            stats.succeeded += 1
            decision = Decision(
                TaskResult(message.task_id, status, value, None, elapsed, message.labels)
            )
        else:
            if status is TaskStatus.FAILURE:
                stats.failed += 1
                self._log.warning(
                    "task.failed",
                    task_id=message.task_id,
                    task_name=message.task_name,
                    attempt=message.attempt,
                    error=repr(error),
                )
            elif status is TaskStatus.TIMEOUT:
                stats.timed_out += 1
                self._log.warning(
                    "task.timeout", task_id=message.task_id, task_name=message.task_name
                )
            else:
                stats.cancelled += 1
            decision = decide(message, options, status, value, error, elapsed)
        if hooks.has:
            result = decision.result or TaskResult(
                message.task_id, status, value, None, elapsed, message.labels
            )
            if "post_execute" in hooks.has:
                await hooks.run_all("post_execute", message, result)
            if status in _ERRORS and "on_error" in hooks.has:
                err = error if error is not None else TimeoutError("task timed out")
                await hooks.run_all("on_error", message, result, err)
        if decision.retry is not None:
            stats.retried += 1
            await self._tell_broker(
                Nack(delivery, "retry", requeue=decision.retry, delay=decision.delay)
            )
            return
        assert decision.result is not None
        if message.labels and "unique_key" in message.labels:
            await self._unclaim(delivery)
        if (options.store_result or "workflow" in message.labels) and not await self._store(
            message, decision.result
        ):
            return  # not acked: a redelivering broker runs it again
        if message.labels and not await self._step_done(message, decision.result):
            return  # not acked: its transition runs again with the redelivery
        if "post_save" in hooks.has:
            await hooks.run_all("post_save", message, decision.result)
        lease = self._lease
        if status in _ERRORS and lease is not None and lease.dead_letter_failures:
            why = f"failed for good after {message.attempt} attempt(s): {decision.result.error}"
            await self._tell_broker(Nack(delivery, why))
            return
        self._ack(delivery, message.task_id)

    async def _unclaim(self, delivery: Delivery) -> None:
        """Free a unique job's key before its result is stored (see ``Unclaim``)."""
        broker_ref = self._broker_ref
        assert broker_ref is not None
        try:
            answer = await broker_ref.ask(Unclaim(delivery))
            if answer is not None:
                await answer.wait()
        except Exception as exc:  # the key then expires with its ttl
            self._log.warning("task.unclaim_failed", error=repr(exc))

    async def _tell_broker(self, msg: object) -> None:
        broker_ref = self._broker_ref
        assert broker_ref is not None
        try:
            await broker_ref.tell(msg)
        except actors.ActorStopped:
            self._log.warning("worker.broker_stopped", message=type(msg).__name__)

    async def _step_done(self, message: TaskMessage, result: TaskResult[Any]) -> bool:
        """The seam of workflows: a step (its labels name its workflow) has its final
        result stored; its transition (mark it done, send what it unblocks, once) runs
        before the ack, so a crash in between redelivers the step and the transition
        runs again, finding it done (see bus/_workflow_plan.py). False: not done."""
        if "workflow" not in message.labels:
            return True
        try:
            await self.broker.workflows.step_done(message, result)
        except Exception:
            self._log.exception(
                "workflow.transition_failed", task_id=message.task_id, task_name=message.task_name
            )
            return False
        return True

    async def _store(self, message: TaskMessage, result: TaskResult[Any]) -> bool:
        try:
            await self.broker.result_backend.set_result(message.task_id, result)
        except Exception:
            self._log.exception(
                "result.store_failed", task_id=message.task_id, task_name=message.task_name
            )
            return False
        return True


def _thaw_kwargs(kwargs: Any) -> dict[str, Any]:
    for v in kwargs.values():
        if type(v) not in _SCALARS:
            return {k: thaw(v) for k, v in kwargs.items()}
    return dict(kwargs)


def _binds(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(task.func).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


class Worker:
    """A handle on a running worker (what ``await nursery.start(broker.run_worker)``
    returns): its actor's ref, a graceful :meth:`drain` and a hard :meth:`stop`."""

    __slots__ = ("_scope", "concurrency", "name", "ref")

    def __init__(
        self, ref: actors.ActorRef, concurrency: int, name: str, scope: trio.CancelScope
    ) -> None:
        self.ref = ref
        self.concurrency = concurrency
        self.name = name
        self._scope = scope

    async def drain(self, timeout: float | None = None) -> int:
        """Stop taking work, wait up to ``timeout`` seconds (``None``: no limit) for
        running tasks, then interrupt the rest (recorded as CANCELLED, or handed back
        for another worker on brokers that redeliver). Returns how many were
        interrupted. Cancellation: only the waiting stops; the drain goes on."""
        try:
            ticket: DrainTicket = await self.ref.ask(Drain(timeout))
        except actors.ActorStopped:
            return 0
        return await ticket.wait()

    def stop(self) -> None:
        """Cancel the worker at once: running tasks are cancelled and nothing is
        recorded for them (a redelivering broker runs them again). ``run_worker``
        then returns."""
        self._scope.cancel()

    async def cancel_running(self, task_id: TaskID | str) -> bool:
        """Cancel ``task_id`` if this worker runs it; True if it did."""
        found: bool = await self.ref.ask(CancelRunning(TaskID.parse(task_id)))
        return found

    @property
    def is_alive(self) -> bool:
        return self.ref.is_alive

    def __repr__(self) -> str:
        return f"<Worker {self.name} concurrency={self.concurrency}>"
