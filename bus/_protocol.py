"""The broker protocol: the events producers, workers and brokers exchange.

A broker is anything that answers these events (see :class:`bus.Broker`):

* :class:`Send` from a producer: enqueue a message (now, or at its ``eta``).
* :class:`Receive` from a worker: hand over up to ``max_messages`` deliveries, waiting
  until there is at least one.
* :class:`Ack` from a worker: the delivery is finished (its result is stored); forget it.
* :class:`Nack` from a worker: the delivery is not finished: put a (new) message back,
  or dead-letter it with a reason.
* :class:`Cancel` from anyone: the task must not start, or must stop where it runs.
* :class:`Register` from a worker: it can run the named task.

The events are frozen values, so brokers can be tested by feeding them events.
"""

from __future__ import annotations

from typing import Any

import attrs

from bus._ids import TaskID
from bus._message import TaskMessage

__all__ = ["Ack", "Cancel", "Delivery", "Nack", "Receive", "Register", "Send"]


@attrs.frozen
class Send:
    """Enqueue ``message``; ``data`` is its encoded form (what travels).

    ``verified`` is set by :meth:`Broker.kick`, which made ``data`` from ``message`` with
    the broker's codec: an in-process broker may then hand ``message`` itself to the
    worker instead of decoding ``data`` again.
    """

    message: TaskMessage
    data: bytes
    verified: bool = False


@attrs.frozen
class Receive:
    """A worker asks for up to ``max_messages`` deliveries."""

    max_messages: int = 1
    consumer: str = "worker"


@attrs.frozen(eq=False)
class Delivery:
    """One message handed to one worker.

    ``message`` is set when the broker already has the decoded message; otherwise the
    worker decodes ``data``. ``tag`` is the broker's own handle for acking (a stream id
    for Redis). ``deliveries`` counts how often this entry was handed out (1 = first).
    """

    data: bytes
    tag: Any
    message: TaskMessage | None = None
    deliveries: int = 1


@attrs.frozen
class Ack:
    """``delivery`` is done: its outcome is stored."""

    delivery: Delivery


@attrs.frozen
class Nack:
    """``delivery`` is not done.

    With ``requeue`` set, that message (usually the next attempt) is enqueued, after
    ``delay`` seconds, in place of the delivery. Without it the delivery is dead-lettered
    (or dropped and counted, on a broker without a dead-letter store) with ``reason``.
    """

    delivery: Delivery
    reason: str
    requeue: TaskMessage | None = None
    delay: float = 0.0


@attrs.frozen
class Cancel:
    """Stop ``task_id``: a queued task never starts, a running one is cancelled."""

    task_id: TaskID


@attrs.frozen
class Register:
    """A worker announces that it can run the task ``name``."""

    name: str
