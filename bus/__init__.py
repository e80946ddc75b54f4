"""A task queue and message bus for Trio, built as actors.

Declare tasks with ``@broker.task``, send them with ``await task.kiq(...)``, and get
results back with ``await handle.wait_result()``. See docs/ for the guide.
"""

from typing import TYPE_CHECKING, Any

from bus._broker import Broker, BrokerState, BrokerStats, BusEvent
from bus._broker_actor import BrokerActor
from bus._codec import Codec, DecodeError, JSONCodec
from bus._context import CONTEXT, Context, current_context
from bus._errors import (
    BrokerClosed,
    BrokerUnavailable,
    BusError,
    QueueFull,
    ResultNotFound,
    ResultTimeout,
    SendError,
    TaskCancelled,
    TaskFailed,
    UnknownTaskError,
)
from bus._frozen import FrozenDict
from bus._ids import TaskID
from bus._limits import Limit, limit
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._options import TaskOptions
from bus._results import InMemoryResultBackend, InmemoryResultBackend, ResultBackend
from bus._schedule import Cron, Every, ScheduleSpec, cron, every
from bus._scheduler import ScheduleInfo, TickState
from bus._task import AsyncTask, Kicker, SyncTask, Task, TaskHandle, gather
from bus._worker import Worker, WorkerActor

if TYPE_CHECKING:
    from bus._inmemory import InMemoryBroker
    from bus._process import run_worker_process
    from bus._workflow import (
        Chain,
        Group,
        Signature,
        StepStatus,
        WorkflowHandle,
        WorkflowStatus,
        chain,
        chord,
        group,
    )

    __version__: str

#: Public names imported when first used (``bus.NAME`` and ``from bus import NAME``
#: work as ever): a worker process that uses none of them does not load them (memory,
#: start-up time). Name -> its module.
_LAZY = {
    "InMemoryBroker": "bus._inmemory",
    "run_worker_process": "bus._process",
    **dict.fromkeys(
        (
            "Chain",
            "Group",
            "Signature",
            "StepStatus",
            "WorkflowHandle",
            "WorkflowStatus",
            "chain",
            "chord",
            "group",
        ),
        "bus._workflow",
    ),
}


def __getattr__(name: str) -> Any:
    """The lazy public names (:data:`_LAZY`) and ``__version__``, on first use."""
    if name == "__version__":
        from importlib import metadata

        try:
            version: str = metadata.version("trio-bus")
        except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "__version__"})


__all__ = [
    "CONTEXT",
    "AsyncTask",
    "Broker",
    "BrokerActor",
    "BrokerClosed",
    "BrokerUnavailable",
    "BrokerState",
    "BrokerStats",
    "BusError",
    "BusEvent",
    "Chain",
    "Codec",
    "Context",
    "Cron",
    "DecodeError",
    "Every",
    "FrozenDict",
    "Group",
    "InMemoryBroker",
    "InMemoryResultBackend",
    "InmemoryResultBackend",
    "JSONCodec",
    "Kicker",
    "Limit",
    "Middleware",
    "QueueFull",
    "RemoteError",
    "ResultBackend",
    "ResultNotFound",
    "ResultTimeout",
    "ScheduleInfo",
    "ScheduleSpec",
    "SendError",
    "Signature",
    "StepStatus",
    "SyncTask",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "TaskID",
    "TaskMessage",
    "TaskOptions",
    "TaskResult",
    "TaskStatus",
    "TickState",
    "UnknownTaskError",
    "__version__",
    "Worker",
    "WorkerActor",
    "WorkflowHandle",
    "WorkflowStatus",
    "chain",
    "chord",
    "cron",
    "current_context",
    "every",
    "gather",
    "group",
    "limit",
    "run_worker_process",
]
