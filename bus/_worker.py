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


class _Run:
    __slots__ = ("reason", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.reason = ""


class Worker:
    """Runs a broker's tasks: ``concurrency`` runner tasks in one nursery, each taking a
    delivery, running it to its end, and acking it.

    Made by :meth:`Broker.run_worker` (which hands it to ``nursery.start``'s caller).
    Use :meth:`drain` for a graceful stop and :meth:`cancel_running` to stop one task.
    """

    def __init__(self, broker: Broker, concurrency: int, name: str | None = None) -> None:
        self.broker = broker
        self.concurrency = concurrency
        self.name = name or f"worker-{TaskID.new()[-12:]}"
        self.running: dict[TaskID, _Run] = {}
        self._intake: set[trio.CancelScope] = set()
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._thread_limiter = trio.CapacityLimiter(concurrency)
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._log = log.bind(actor=self.name)

    # ------------------------------------------------------------------ control

    def cancel_running(self, task_id: TaskID, reason: str = "cancel") -> bool:
        """Cancel ``task_id`` if this worker runs it; True if it did."""
        run = self.running.get(task_id)
        if run is None:
            return False
        run.reason = reason
        run.scope.cancel()
        return True

    def stop_intake(self) -> None:
        """Take no new deliveries; running tasks go on."""
        self._draining = True
        for scope in list(self._intake):
            scope.cancel()

    async def drain(self, timeout: float | None = None) -> int:
        """Stop intake, wait up to ``timeout`` seconds for running tasks, then cancel the
        rest (recorded as CANCELLED, or left unacknowledged on brokers that redeliver).
        Returns how many were cancelled. Cancellation: the running tasks go on."""
        self.stop_intake()
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await self._idle.wait()
        n = 0
        for tid in list(self.running):
            n += self.cancel_running(tid, "shutdown")
        await self._idle.wait()
        return n

    def stop(self) -> None:
        """Cancel everything at once (running tasks included)."""
        self.stop_intake()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

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
            broker.workers.remove(self)
            self._nursery = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 10
                await broker._fire(BusEvent.WORKER_SHUTDOWN)
            self._log.info("worker.stopped")

    async def _runner(self) -> None:
        receive = Receive(1, self.name)
        on_receive = self.broker.on_receive
        process = self._process
        while not self._draining:
            with trio.CancelScope() as scope:
                self._intake.add(scope)
                try:
                    deliveries = await on_receive(receive)
                finally:
                    self._intake.discard(scope)
            if scope.cancelled_caught:
                return
            for d in deliveries:
                await process(d)

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
            try:
                await broker.result_backend.set_result(message.task_id, result)
            except Exception:
                self._log.exception("result.store_failed", task_id=message.task_id)
        await broker.on_nack(Nack(delivery, reason))

    async def _process(self, delivery: Delivery) -> None:
        broker = self.broker
        broker.stats.received += 1
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
            broker.stats.cancelled += 1
            await broker.on_ack(Ack(delivery))
            return
        try:
            options = task.options.with_labels(message.labels)
        except (TypeError, ValueError) as exc:
            await self._reject(delivery, f"invalid option labels: {exc}", message)
            return
        self.running_count_inc()
        try:
            decision = await self._attempt(task, message, options)
        finally:
            self.running_count_dec()
        if decision is None:  # bad arguments: rejected
            await self._reject(delivery, "arguments do not match the task's signature", message)
            return
        if decision.retry is not None:
            broker.stats.retried += 1
            await broker.on_nack(
                Nack(delivery, "retry", requeue=decision.retry, delay=decision.delay)
            )
            return
        result: TaskResult[Any] | None = decision.result
        if result is None:
            # Interrupted by shutdown on a redelivering broker: left unacknowledged so
            # that another worker runs it again.
            return
        try:
            await broker.result_backend.set_result(tid, result)
        except Exception:
            self._log.exception("result.store_failed", task_id=tid, task_name=message.task_name)
            return  # not acked: a redelivering broker runs it again
        hooks = broker.hooks
        if "post_save" in hooks.has:
            await self._hook("post_save", message, result)
        await broker.on_ack(Ack(delivery))

    def running_count_inc(self) -> None:
        self._active += 1
        if self._active == 1:
            self._idle = trio.Event()

    def running_count_dec(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def _hook(self, name: str, *args: Any) -> None:
        try:
            await self.broker.hooks.run(name, *args)
        except Exception:
            self._log.exception("middleware.failed", hook=name)

    async def _attempt(
        self, task: Task[Any, Any], message: TaskMessage, options: TaskOptions
    ) -> Decision | None:
        broker = self.broker
        hooks = broker.hooks
        tid = message.task_id
        status = TaskStatus.SUCCESS
        value: Any = None
        error: BaseException | None = None
        token = _current.set(Context(message, broker))
        t0 = time.perf_counter()
        deadline = math.inf if options.timeout is None else trio.current_time() + options.timeout
        with trio.CancelScope(deadline=deadline) as scope:
            run = _Run(scope)
            self.running[tid] = run
            try:
                if "pre_execute" in hooks.has:
                    message = await hooks.transform("pre_execute", message)
                kwargs = message.kwargs
                if task.context_param is not None:
                    kwargs = {**kwargs, task.context_param: Context(message, broker)}
                if task.is_async:
                    value = await task.func(*message.args, **kwargs)
                else:
                    value = await trio.to_thread.run_sync(
                        functools.partial(task.func, *message.args, **kwargs),
                        limiter=self._thread_limiter,
                    )
            except TypeError as exc:
                if not _binds(task, message.args, kwargs):
                    return None
                status, error = TaskStatus.FAILURE, exc
            except Exception as exc:
                status, error = TaskStatus.FAILURE, exc
            finally:
                del self.running[tid]
                _current.reset(token)
        elapsed = time.perf_counter() - t0
        if (scope.cancel_called and status is TaskStatus.SUCCESS) or scope.cancelled_caught:
            if run.reason:
                status, error = TaskStatus.CANCELLED, None
                if run.reason == "shutdown" and not broker.records_shutdown_cancel:
                    return Decision()  # no result, no ack: see _process
            else:
                status, error = TaskStatus.TIMEOUT, None
            value = None
        if status is TaskStatus.SUCCESS:
            broker.stats.succeeded += 1
        elif status is TaskStatus.FAILURE:
            broker.stats.failed += 1
            self._log.warning(
                "task.failed",
                task_id=tid,
                task_name=message.task_name,
                attempt=message.attempt,
                error=repr(error),
            )
        elif status is TaskStatus.TIMEOUT:
            broker.stats.timed_out += 1
            self._log.warning("task.timeout", task_id=tid, task_name=message.task_name)
        else:
            broker.stats.cancelled += 1
        decision = decide(message, options, status, value, error, elapsed)
        if hooks.has:
            result = decision.result or TaskResult(
                tid, status, value, None, elapsed, message.labels
            )
            if "post_execute" in hooks.has:
                await self._hook("post_execute", message, result)
            if status in _ERRORS and "on_error" in hooks.has:
                err = error if error is not None else TimeoutError("task timed out")
                await self._hook("on_error", message, result, err)
        return decision


_ERRORS = (TaskStatus.FAILURE, TaskStatus.TIMEOUT)


def _binds(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(task.func).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True
