"""The value objects that travel: task messages, results, remote errors."""

from __future__ import annotations

import enum
import traceback as _tb
from typing import Any, Generic, TypeVar

import attrs

from bus._errors import TaskCancelled, TaskFailed
from bus._frozen import FrozenDict, freeze_args, freeze_mapping
from bus._ids import TaskID

__all__ = ["RemoteError", "TaskMessage", "TaskResult", "TaskStatus"]

R = TypeVar("R")


@attrs.frozen
class TaskMessage:
    """One request to run a task: what a producer sends and a worker receives.

    Immutable all the way down: lists in the arguments and labels become tuples and
    dicts become read-only :class:`~bus._frozen.FrozenDict` values, so a message can
    be shared and hashed. A worker hands the task function mutable copies.
    """

    task_id: TaskID
    """Identity of this task; retries keep it, so its final result is found under it."""
    task_name: str
    """The registered name of the task to run."""
    args: tuple[Any, ...] = attrs.field(converter=freeze_args)
    """Positional arguments (JSON values with the default codec)."""
    kwargs: FrozenDict = attrs.field(converter=freeze_mapping)
    """Keyword arguments (read-only)."""
    labels: FrozenDict = attrs.field(converter=freeze_mapping)
    """Free-form metadata (read-only); the task options (``timeout``, ``retries``,
    ...) may be set here."""
    attempt: int = 1
    """1 for the first delivery to a task function, 2 for the first retry, and so on."""
    eta: float | None = None
    """Unix time (seconds) before which the task must not start, or ``None`` for now."""
    queue: str | None = None
    """The queue the task is sent to; ``None`` (the default) is the broker's default
    queue. Set by the task option ``queue=`` or ``kicker().with_queue(name)``."""
    priority: int = 0
    """0 (the default, least urgent) to 9 (most urgent); see ``kicker().with_priority``."""


class TaskStatus(enum.Enum):
    """How a task ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


@attrs.frozen
class RemoteError:
    """An exception raised by a task, as plain text: no class is imported or unpickled."""

    type_name: str
    """Qualified name of the exception's type, e.g. ``"builtins.ValueError"``."""
    message: str
    """``str(exception)``."""
    traceback: str = ""
    """The formatted traceback, as text."""

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        t = type(exc)
        name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        text = "".join(_tb.format_exception(t, exc, exc.__traceback__))
        return cls(type_name=name, message=str(exc), traceback=text)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


@attrs.frozen
class TaskResult(Generic[R]):
    """The outcome of one task, stored under its :class:`TaskID`."""

    task_id: TaskID
    """The task this result belongs to."""
    status: TaskStatus
    """SUCCESS, FAILURE, CANCELLED or TIMEOUT."""
    return_value: R | None = None
    """What the task returned (``None`` unless ``status`` is SUCCESS)."""
    error: RemoteError | None = None
    """What went wrong, for every status but SUCCESS."""
    execution_time: float = 0.0
    """Seconds the last attempt ran for."""
    labels: dict[str, Any] = attrs.Factory(dict)
    """The message's labels."""

    @property
    def is_err(self) -> bool:
        """True unless the task succeeded."""
        return self.status is not TaskStatus.SUCCESS

    def unwrap(self) -> R:
        """The return value; raises :class:`TaskFailed` (or :class:`TaskCancelled`) otherwise."""
        if self.status is TaskStatus.SUCCESS:
            return self.return_value  # type: ignore[return-value]
        if self.status is TaskStatus.CANCELLED:
            raise TaskCancelled(self)  # type: ignore[arg-type]
        raise TaskFailed(self)  # type: ignore[arg-type]
