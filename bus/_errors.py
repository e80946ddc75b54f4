"""The bus's exceptions. Every one derives from :class:`BusError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bus._message import TaskResult


class BusError(Exception):
    """Root of every error the bus raises on purpose."""


class UnknownTaskError(BusError, LookupError):
    """A task name that no broker registration knows."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown task {name!r}: no task is registered under that name")
        self.name = name


class SendError(BusError):
    """A message could not be sent: bad arguments, codec failure, full queue, closed broker."""


class QueueFull(SendError):
    """Raised by the ``*_nowait`` senders when the broker's queue has no room."""


class BrokerClosed(SendError):
    """The broker is not running (outside ``async with broker``, or shutting down)."""


class ResultTimeout(BusError, TimeoutError):
    """``wait_result`` gave up before the result arrived."""

    def __init__(self, task_id: str, timeout: float) -> None:
        super().__init__(f"no result for task {task_id} within {timeout:g}s")
        self.task_id = task_id
        self.timeout = timeout


class ResultNotFound(BusError, LookupError):
    """No result is stored for the task id: not finished yet, expired, evicted or forgotten."""

    def __init__(self, task_id: str, why: str = "no result is stored") -> None:
        super().__init__(f"task {task_id}: {why}")
        self.task_id = task_id


class TaskFailed(BusError):
    """Raised by :meth:`TaskResult.unwrap` when the task did not succeed."""

    def __init__(self, result: TaskResult[object]) -> None:
        err = result.error
        detail = f"{err.type_name}: {err.message}" if err is not None else result.status.value
        super().__init__(f"task {result.task_id} ended {result.status.value}: {detail}")
        self.result = result


class TaskCancelled(TaskFailed):
    """Raised by :meth:`TaskResult.unwrap` for a task that was cancelled."""
