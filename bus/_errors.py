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


class BrokerUnavailable(SendError, ConnectionError):
    """The broker's server (Redis) could not be reached within a bound.

    Raised by sends after ``send_timeout`` and by every other call that needs the
    server (``inspect``, ``cancel``, dead letters, schedules, ``get_result``) after
    ``command_timeout``. ``url`` names the server (password masked), ``waited`` is
    how long the call waited in seconds. For a send, ``maybe_stored`` says whether the
    message may have reached the server before the connection broke (delivery is
    at-least-once: such a message may still run); a send that returned was stored.
    It is a :class:`SendError` so that code catching failed sends catches it too, and
    a ``ConnectionError``.
    """

    def __init__(
        self,
        what: str,
        *,
        url: str = "",
        waited: float = 0.0,
        cause: str = "",
        maybe_stored: bool = False,
    ) -> None:
        where = f" at {url}" if url else ""
        because = f": {cause}" if cause else ""
        stored = " (the message may have been stored)" if maybe_stored else ""
        super().__init__(
            f"{what}: the broker{where} is unavailable after {waited:g} s{because}{stored}"
        )
        self.url = url
        self.waited = waited
        self.cause = cause
        self.maybe_stored = maybe_stored


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
