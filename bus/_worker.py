"""The worker: takes deliveries from a broker and runs them, with a real concurrency limit.

The decisions (what an attempt's outcome means: store, retry, reject) live in plain
synchronous functions (:func:`decide`), the I/O around them in :class:`Worker`.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio

from bus._codec import DecodeError
from bus._context import Context, _current
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import TaskOptions
from bus._protocol import Ack, Delivery, Nack, Receive, Register

if TYPE_CHECKING:
    from bus._broker import Broker
    from bus._task import Task

__all__ = ["Decision", "Worker", "decide"]

log = structlog.get_logger("bus.worker")


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


class _Runner:
    """One of the worker's ``concurrency`` slots. Its cancel scope spans its whole life,
    so running a task costs no scope of its own: a timeout is the scope's deadline, a
    cancel request cancels the scope, and a fresh runner takes the slot over."""

    __slots__ = ("delivery", "idle", "message", "reason", "scope", "started")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.idle = True
        self.reason = ""  # why the scope was cancelled: "cancel", "shutdown" or "" (timeout)
        self.message: TaskMessage | None = None
        self.delivery: Delivery | None = None
        self.started = 0.0


class Worker:
    """Runs a broker's tasks: ``concurrency`` runner tasks in one nursery, each taking a
    delivery, running it to its end, storing its result and acking it.

    Made by :meth:`Broker.run_worker` (which hands it to ``nursery.start``'s caller).
    Use :meth:`drain` for a graceful stop and :meth:`cancel_running` to stop one task.
    """

    def __init__(self, broker: Broker, concurrency: int, name: str | None = None) -> None:
        self.broker = broker
        self.concurrency = concurrency
        self.name = name or f"worker-{TaskID.new()[-12:]}"
        self.running: dict[TaskID, _Runner] = {}
        self._runners: set[_Runner] = set()
        #: Set by :meth:`stop` (and when the worker's task ends).
        self.stopped = False
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._thread_limiter = trio.CapacityLimiter(concurrency)
        self._active = 0
        self._idle: trio.Event | None = None  # made only while drain() waits
        self._log = log.bind(actor=self.name)

    # ------------------------------------------------------------------ control

    def cancel_running(self, task_id: TaskID, reason: str = "cancel") -> bool:
        """Cancel ``task_id`` if this worker runs it; True if it did."""
        runner = self.running.get(task_id)
        if runner is None:
            return False
        runner.reason = reason
        runner.scope.cancel()
        return True

    def stop_intake(self) -> None:
        """Take no new deliveries; running tasks go on."""
        self._draining = True
        for runner in list(self._runners):
            if runner.idle:
                runner.scope.cancel()

    async def drain(self, timeout: float | None = None) -> int:
        """Stop intake, wait up to ``timeout`` seconds for running tasks, then cancel the
        rest (recorded as CANCELLED, or left unacknowledged on brokers that redeliver).
        Returns how many were cancelled. Cancellation: the running tasks go on."""
        self.stop_intake()
        if self.stopped:
            return 0
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await self._wait_idle()
        n = 0
        for tid in list(self.running):
            n += self.cancel_running(tid, "shutdown")
        await self._wait_idle()
        return n

    def stop(self) -> None:
        """Cancel everything at once (running tasks included, nothing recorded)."""
        self._draining = True
        self.stopped = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def active(self) -> int:
        """How many tasks run right now."""
        return self._active

    # ------------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or stopped."""
        from bus._broker import BusEvent

        broker = self.broker
        for name in broker.tasks:
            await broker.on_register(Register(name))
        await broker._fire(BusEvent.WORKER_STARTUP)
        broker.workers.append(self)
        self._log.info("worker.started", concurrency=self.concurrency, tasks=sorted(broker.tasks))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.concurrency):
                    nursery.start_soon(self._runner)
                task_status.started(self)
        finally:
            self.stopped = True
            self._active = 0  # runners are gone, whatever they were doing
            if self._idle is not None:
                self._idle.set()
            broker.workers.remove(self)
            self._nursery = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 10
                await broker._fire(BusEvent.WORKER_SHUTDOWN)
            self._log.info("worker.stopped")

    async def _runner(self) -> None:
        receive = Receive(1, self.name)
        on_receive = self.broker.on_receive
        on_receive_nowait = self.broker.on_receive_nowait
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
                    deliveries = on_receive_nowait(receive) if streak < _STREAK else None
                    if deliveries:
                        streak += 1
                        await trio.lowlevel.checkpoint_if_cancelled()
                    else:
                        streak = 0
                        deliveries = await on_receive(receive)
                    r.idle = False
                    for d in deliveries:
                        await process(d, r)
                    r.idle = True
            finally:
                self._runners.discard(r)
                if r.message is not None:
                    self.running.pop(r.message.task_id, None)
        if r.message is not None and r.delivery is not None:
            # The task was interrupted (timeout, cancel request, shutdown): record it
            # here, outside the cancelled scope, and hand the slot to a fresh runner.
            message, delivery = r.message, r.delivery
            try:
                await self._interrupted(r, message, delivery)
            finally:
                self._task_done()
            if not self._draining and self._nursery is not None:
                self._nursery.start_soon(self._runner)

    async def _wait_idle(self) -> None:
        if self._active == 0:
            await trio.lowlevel.checkpoint()
            return
        if self._idle is None:
            self._idle = trio.Event()
        await self._idle.wait()

    def _task_started(self) -> None:
        self._active += 1

    def _task_done(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def _reject(self, delivery: Delivery, reason: str, message: TaskMessage | None) -> None:
        broker = self.broker
        broker.stats.rejected += 1
        self._log.error(
            "task.rejected",
            reason=reason,
            task_id=message.task_id if message else None,
            task_name=message.task_name if message else None,
        )
        if message is not None:
            # Whoever waits for this id learns it will never run.
            err = RemoteError("bus.Rejected", reason)
            result: TaskResult[Any] = TaskResult(
                message.task_id, TaskStatus.FAILURE, None, err, 0.0, message.labels
            )
            await self._store(message, result)
        await broker.on_nack(Nack(delivery, reason))

    async def _process(self, delivery: Delivery, r: _Runner) -> None:
        broker = self.broker
        stats = broker.stats
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
            await self._reject(delivery, f"unknown task {message.task_name!r}", message)
            return
        tid = message.task_id
        if broker.is_cancelled(tid):
            stats.cancelled += 1
            await broker.on_ack(Ack(delivery))
            return
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
        self._task_started()
        r.message, r.delivery, r.reason = message, delivery, ""
        self.running[tid] = r
        token = _current.set(Context(message, broker))
        t0 = r.started = time.perf_counter()
        if options.timeout is not None:
            r.scope.deadline = trio.current_time() + options.timeout
        kwargs = message.kwargs
        calling = False
        try:
            if "pre_execute" in hooks.has:
                message = r.message = await hooks.transform("pre_execute", message)
                kwargs = message.kwargs
            if task.context_param is not None:
                kwargs = {**kwargs, task.context_param: Context(message, broker)}
            calling = True
            if task.is_async:
                value = await task.func(*message.args, **kwargs)
            else:
                value = await trio.to_thread.run_sync(
                    functools.partial(task.func, *message.args, **kwargs),
                    limiter=self._thread_limiter,
                )
        except TypeError as exc:
            if calling and not _binds(task, message.args, kwargs):
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
        if r.scope.cancel_called:
            # Cancelled or timed out while it ran, but it returned anyway: a sync task
            # (a thread cannot be interrupted) or one that swallowed Cancelled. Its
            # outcome is discarded; the runner's epilogue records TIMEOUT / CANCELLED.
            await trio.lowlevel.checkpoint()  # raises Cancelled here
        # From here on a cancel request or the deadline no longer concerns this task.
        self._forget_run(r, tid, token)
        try:
            await self._finish(message, delivery, options, status, value, error, t0)
        finally:
            self._task_done()

    def _forget_run(self, r: _Runner, tid: TaskID, token: Any) -> None:
        if r.scope.deadline != math.inf:
            r.scope.deadline = math.inf
        del self.running[tid]
        r.message = r.delivery = None
        _current.reset(token)

    async def _interrupted(self, r: _Runner, message: TaskMessage, delivery: Delivery) -> None:
        broker = self.broker
        task = broker.tasks[message.task_name]
        try:
            options = task.options.with_labels(message.labels)
        except (TypeError, ValueError):
            options = task.options
        if r.reason == "shutdown" and not broker.records_shutdown_cancel:
            # Left unacknowledged: another worker runs it again.
            self._log.info("task.interrupted", task_id=message.task_id, task_name=message.task_name)
            return
        status = TaskStatus.CANCELLED if r.reason else TaskStatus.TIMEOUT
        await self._finish(message, delivery, options, status, None, None, r.started)

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
        broker = self.broker
        stats = broker.stats
        hooks = broker.hooks
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
                await self._hook("post_execute", message, result)
            if status in _ERRORS and "on_error" in hooks.has:
                err = error if error is not None else TimeoutError("task timed out")
                await self._hook("on_error", message, result, err)
        if decision.retry is not None:
            stats.retried += 1
            await broker.on_nack(
                Nack(delivery, "retry", requeue=decision.retry, delay=decision.delay)
            )
            return
        assert decision.result is not None
        if not await self._store(message, decision.result):
            return  # not acked: a redelivering broker runs it again
        if "post_save" in hooks.has:
            await self._hook("post_save", message, decision.result)
        await broker.on_ack(Ack(delivery))

    async def _store(self, message: TaskMessage, result: TaskResult[Any]) -> bool:
        try:
            await self.broker.result_backend.set_result(message.task_id, result)
        except Exception:
            self._log.exception(
                "result.store_failed", task_id=message.task_id, task_name=message.task_name
            )
            return False
        return True

    async def _hook(self, name: str, *args: Any) -> None:
        await self.broker.hooks.run_all(name, *args)


_ERRORS = (TaskStatus.FAILURE, TaskStatus.TIMEOUT)


def _binds(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(task.func).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True
