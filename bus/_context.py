"""What a running task can learn about itself."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from bus._ids import TaskID
from bus._message import TaskMessage

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["CONTEXT", "Context", "current_context"]

_current: ContextVar[Context] = ContextVar("bus_context")


class Context:
    """Handed to a task that declares a parameter annotated :class:`Context`.

    That parameter is not part of the ``kiq`` arguments; give it the default
    :data:`bus.CONTEXT` so type checkers do not ask for it at call sites.
    """

    __slots__ = ("broker", "message")

    def __init__(self, message: TaskMessage, broker: Broker) -> None:
        self.message = message
        self.broker = broker

    @property
    def task_id(self) -> TaskID:
        return self.message.task_id

    @property
    def task_name(self) -> str:
        return self.message.task_name

    @property
    def labels(self) -> dict[str, Any]:
        return self.message.labels

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, ..."""
        return self.message.attempt

    async def set_progress(self, meta: Any) -> None:
        """Store a progress report, readable with ``TaskHandle.get_progress()``.

        ``meta`` must be encodable by the result backend (JSON values by default).
        Cancellation: the report may or may not have been stored.
        """
        await self.broker.result_backend.set_progress(self.message.task_id, meta)

    def __repr__(self) -> str:
        return f"<Context {self.task_name} {self.task_id} attempt={self.attempt}>"


class _Injected:
    def __repr__(self) -> str:
        return "bus.CONTEXT"


#: Default value for a task's :class:`Context` parameter: replaced by the real context
#: when a worker runs the task.
CONTEXT: Context = cast(Context, _Injected())


def current_context() -> Context:
    """The context of the task running in this Trio task; ``LookupError`` outside one."""
    return _current.get()
