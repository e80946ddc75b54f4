"""The in-memory broker actor's own messages (its facade's and its leases' words to
it), beside those of :mod:`bus.protocol`."""

from __future__ import annotations

from typing import Any

import attrs

from bus._ids import TaskID
from bus._protocol import (
    Send,
)
from bus._schedule import ScheduleSpec
from bus._scheduler import TickState

__all__ = [
    "CancelUnstarted",
    "CloseIntake",
    "DeadLetters",
    "EVERY_QUEUE",
    "MemorySchedules",
    "PurgeDeadLetters",
    "ScheduleOp",
    "SendUnique",
    "TakenIds",
    "Upgrade",
    "WatchIdle",
]

# ------------------------------------------------------------ private messages


@attrs.frozen
class SendUnique:
    """Ask (inline): send a unique job unless its key is held; the answer is the task id
    that holds the key (the message's own when it was sent)."""

    send: Send


@attrs.define
class MemorySchedules:
    """The in-memory broker's schedules added at run time, the tick states, and the
    claimed ticks. Kept by the facade across runs, handed to the broker actor (its one
    writer while it runs)."""

    runtime: dict[str, ScheduleSpec] = attrs.Factory(dict)
    states: dict[str, TickState] = attrs.Factory(dict)
    claimed: dict[tuple[str, int], float] = attrs.Factory(dict)


@attrs.frozen
class ScheduleOp:
    """Ask: run ``op`` (a method name of the actor's schedule code) with ``args``."""

    op: str
    args: tuple[Any, ...]


@attrs.frozen
class WatchIdle:
    """Ask: a ``trio.Event`` set when nothing is queued, delayed or running."""


@attrs.frozen
class CloseIntake:
    """Ask: the broker is shutting down; senders waiting for room get BrokerClosed and
    later sends are cancelled at once."""


@attrs.frozen
class TakenIds:
    """Ask: which of ``task_ids`` a worker took (a workflow's running steps)."""

    task_ids: tuple[TaskID, ...]


@attrs.frozen
class CancelUnstarted:
    """Ask: record every delayed task (and, with ``queued``, every queued one) as
    CANCELLED so it never starts; the answer is how many."""

    why_delayed: str
    why_queued: str = ""
    queued: bool = False


@attrs.frozen
class DeadLetters:
    """Ask: the oldest ``limit`` dead letters (of ``queue`` when given: those whose
    message names it, or names none when it is ``default``)."""

    limit: int = 100
    queue: str | None = None
    default: str = "default"


@attrs.frozen
class PurgeDeadLetters:
    """Ask: drop every dead letter (of ``queue`` when given, as :class:`DeadLetters`
    chooses them); the answer is how many there were."""

    queue: str | None = None
    default: str = "default"


@attrs.frozen
class Upgrade:
    """Tell (inline): a task with limits was registered; route by the dispatch now."""


#: The queue spec of the embedded worker: every queue of the process.
EVERY_QUEUE = "*"
