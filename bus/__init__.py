"""A task queue and message bus for Trio, built as actors.

Declare tasks with ``@broker.task``, send them with ``await task.kiq(...)``, and get
results back with ``await handle.wait_result()``. See docs/ for the guide.
"""

from importlib import metadata as _metadata

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
from bus._inmemory import InMemoryBroker
from bus._limits import Limit, limit
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._options import TaskOptions
from bus._process import run_worker_process
from bus._results import InMemoryResultBackend, InmemoryResultBackend, ResultBackend
from bus._schedule import Cron, Every, ScheduleSpec, cron, every
from bus._scheduler import ScheduleInfo, TickState
from bus._task import AsyncTask, Kicker, SyncTask, Task, TaskHandle, gather
from bus._worker import Worker, WorkerActor
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

try:
    __version__: str = _metadata.version("trio-bus")
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "0+unknown"

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
