"""The broker protocol: the messages producers, workers, brokers and result stores exchange.

Every broker is an actor (``broker.ref``) whose mailbox takes these events:

* :class:`Send` from a producer: enqueue a message (now, or at its ``eta``).
* :class:`Receive` from a worker (``ask``): the answer is a :class:`Lease`, a receive
  channel of deliveries the broker lends the worker.
* :class:`Ack` from a worker: the delivery is finished (its result is stored).
* :class:`Nack` from a worker: the delivery is not finished: put a (new) message back,
  or dead-letter it with a reason.
* :class:`Release` from a worker: a stop interrupted the delivery; hand it to another
  worker as it was.
* :class:`Cancel` from anyone (``ask``): the task must not start, or must stop where it
  runs.
* :class:`Register` / :class:`Unregister` from a worker: it can run a task, and the ref
  the broker sends :class:`CancelRunning` to.
* :class:`Inspect` (``ask``): numbers for operators and tests.

Every result store is an actor (``result_backend.ref``) that takes :class:`StoreResult`,
:class:`GetResult` (``ask``), :class:`ForgetResult`, :class:`Watch` / :class:`Unwatch`,
:class:`SetProgress` and :class:`GetProgress` (``ask``).

A worker is an actor that takes :class:`CancelRunning` and :class:`Drain` (``ask``).

The messages are frozen values, so every part can be tested by feeding it messages.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult

if TYPE_CHECKING:
    import actors

__all__ = [
    "Ack",
    "Cancel",
    "CancelRunning",
    "ChannelLease",
    "Delivery",
    "Drain",
    "DrainTicket",
    "ForgetResult",
    "GetProgress",
    "GetResult",
    "Inspect",
    "Lease",
    "Nack",
    "Receive",
    "Register",
    "Release",
    "Send",
    "SetProgress",
    "StoreResult",
    "Unclaim",
    "Unregister",
    "Unwatch",
    "Watch",
    "Watcher",
]

# ------------------------------------------------------------------ broker events


@attrs.frozen
class Send:
    """Enqueue ``message``.

    ``data`` is its encoded form (what travels); ``None`` lets the broker encode it
    with its codec. ``verified`` is set by :meth:`Broker.kick`, which made ``data``
    from ``message`` with the broker's codec: a broker may then hand ``message``
    itself to the worker instead of decoding ``data``. Without it the worker decodes
    ``data`` (and rejects it when it is not a valid message). ``admitted`` is set when
    the producer already holds a place in a bounded queue (``Broker.kick`` takes one
    before it sends); a broker counts other sends against its bound on arrival.
    """

    message: TaskMessage
    data: bytes | None = None
    verified: bool = False
    admitted: bool = False


@attrs.frozen
class Receive:
    """A worker asks for deliveries; the answer to ``ask`` is a :class:`Lease`.

    ``max_messages`` is how many deliveries the consumer holds at most at once (its
    concurrency): a broker that reads ahead (Redis) reads no more than that.
    ``consumer`` names the worker; ``queues`` lists the queues it consumes (empty:
    the broker's default queue).
    """

    max_messages: int = 1
    consumer: str = "worker"
    queues: tuple[str, ...] = ()


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

    With ``requeue`` set, that message (the next attempt, or the same one handed back
    at shutdown) is enqueued, after ``delay`` seconds, in place of the delivery.
    Without it the delivery is dead-lettered (or dropped and counted, on a broker
    without a dead-letter store) with ``reason``.
    """

    delivery: Delivery
    reason: str
    requeue: TaskMessage | None = None
    delay: float = 0.0


@attrs.frozen
class Unclaim:
    """Asked by a worker before it stores the final result of a unique job: free the
    key the delivery's task holds, so that a waiter woken by the result can send the
    job again. The answer is ``None``, or something to ``await x.wait()`` for until
    the key is free (a broker that writes to a server). Brokers without unique jobs
    answer ``None``."""

    delivery: Delivery


@attrs.frozen
class Release:
    """``delivery`` was interrupted unfinished (its worker stopped): hand it back as it
    was, so that another worker runs it again (its delivery count goes on).

    With ``started=False`` the worker took it but never began running it (a drain
    began in that moment): it goes back without counting as a delivery."""

    delivery: Delivery
    #: Whether a runner began running it (then it counts toward ``max_deliveries``).
    started: bool = True


@attrs.frozen
class Cancel:
    """Stop ``task_id``: a queued task never starts, a running one is cancelled, and its
    result says CANCELLED. The answer to ``ask`` comes once the broker took it."""

    task_id: TaskID


@attrs.frozen(eq=False)
class Register:
    """A worker announces that it can run the task ``name``.

    ``worker`` is the worker's ref: the broker sends it :class:`CancelRunning` when a
    task it may run is cancelled. A register without a ref only informs.
    """

    name: str
    worker: actors.ActorRef | None = None


@attrs.frozen(eq=False)
class Unregister:
    """The worker behind ``worker`` stopped; the broker forgets it."""

    worker: actors.ActorRef


@attrs.frozen
class Inspect:
    """Ask a broker for numbers: the answer is a :class:`BrokerInfo`, the same shape
    on every broker."""


def _mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


@attrs.frozen
class WorkerInfo:
    """A worker a broker knows of."""

    name: str
    """The worker's name: its consumer name on Redis, its actor's name in memory."""
    pending: int = 0
    """Deliveries it holds (taken and not finished)."""
    heartbeat_age: float | None = None
    """Seconds since its last heartbeat (``None`` where workers do not send any)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "consumer": self.name,
            "pending": self.pending,
            "heartbeat_age_seconds": self.heartbeat_age,
        }


@attrs.frozen
class QueueInfo:
    """The numbers of one queue."""

    queued: int = 0
    """Waiting to start."""
    delayed: int = 0
    """Waiting for their time (a delay, an eta, a retry's backoff)."""
    pending: int = 0
    """Delivered to a worker, not finished."""
    dead_letters: int = 0
    live_workers: int = 0
    """Workers consuming it that are alive (where the broker knows)."""
    waiting_for_limits: int = 0
    """Read but held back by a rate or concurrency limit."""
    by_priority: Mapping[str, int] = attrs.field(factory=dict, converter=_mapping)
    """Queued per priority level (levels with none are left out)."""
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
    """What only this kind of broker knows (Redis: ``pending_per_consumer``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "delayed": self.delayed,
            "pending": self.pending,
            "dead_letters": self.dead_letters,
            "live_workers": self.live_workers,
            "waiting_for_limits": self.waiting_for_limits,
            "by_priority": dict(self.by_priority),
            **self.details,
        }


@attrs.frozen
class BrokerInfo(Mapping[str, Any]):
    """A broker's answer to :class:`Inspect` (``await broker.inspect()``), the same
    shape on every broker: typed fields, and read-only mapping access to the same
    numbers as plain values (``info["queued"]``, ``dict(info)`` for JSON), broker
    specific ones (``details``) included."""

    queued: int
    """The default queue's tasks waiting to start."""
    delayed: int
    """The default queue's tasks waiting for their time."""
    running: int
    """Tasks handed to a worker of this process and not finished."""
    pending: int
    """The default queue's deliveries not acknowledged (by any worker)."""
    dead_letters: int
    workers: tuple[WorkerInfo, ...] = ()
    """The live workers the broker knows of."""
    queues: Mapping[str, QueueInfo] = attrs.field(factory=dict, converter=_mapping)
    """Every known queue's numbers, by name (the default one included)."""
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping)
    """What only this kind of broker knows (e.g. the stream's key on Redis, the
    producers waiting for room in memory)."""

    @property
    def live_workers(self) -> int:
        return len(self.workers)

    def as_dict(self) -> dict[str, Any]:
        """Plain values: lists and dicts, for JSON."""
        return {
            "queued": self.queued,
            "delayed": self.delayed,
            "running": self.running,
            "pending": self.pending,
            "dead_letters": self.dead_letters,
            "live_workers": self.live_workers,
            "workers": [w.as_dict() for w in self.workers],
            "queues": {name: q.as_dict() for name, q in self.queues.items()},
            **self.details,
        }

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


class Lease(trio.abc.ReceiveChannel[Delivery]):
    """The receive end of a broker's deliveries, lent to one worker (the answer to
    :class:`Receive`).

    ``receive()`` waits for the next delivery; ``receive_nowait()`` returns one or
    raises ``trio.WouldBlock``; both raise ``trio.EndOfChannel`` once the broker stops
    lending (it is shutting down) and ``trio.ClosedResourceError`` after ``aclose``.
    Closing a lease tells the broker that this worker takes nothing more.

    ``redeliver_interrupted`` tells the worker what to do with a task that a stop
    interrupts: ``True`` (a broker shared between processes) hands it back with a
    :class:`Release`, so another worker runs it; ``False`` (the in-memory broker)
    records it as CANCELLED.

    Cancellation: ``receive`` takes nothing when it is cancelled.
    """

    redeliver_interrupted: bool = False
    #: ``True``: a task that failed for good (out of retries) is dead-lettered once its
    #: result is stored (a ``Nack`` instead of an ``Ack``), so it can be requeued.
    dead_letter_failures: bool = False
    #: ``True``: deliveries may be ready before anyone waits (a buffered queue), so a
    #: worker tries ``receive_nowait()`` before ``receive()``. ``False``: a delivery is
    #: handed over to a waiting ``receive()`` (the broker reads only for those), and a
    #: ``receive_nowait()`` first would nearly always raise ``WouldBlock`` for nothing.
    ready_ahead: bool = True

    def receive_nowait(self) -> Delivery:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        """Give the lease back now (the synchronous twin of ``aclose``)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class ChannelLease(Lease):
    """A :class:`Lease` over a receive clone of a Trio memory channel of deliveries,
    for brokers that keep their ready queue in a memory channel (the in-memory broker
    does). ``skip`` (optional) is asked about each delivery taken: when it returns
    True the delivery is dropped and the next one is taken (a task cancelled while it
    was queued)."""

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[Delivery],
        skip: Callable[[Delivery], bool] | None = None,
        *,
        redeliver_interrupted: bool = False,
    ) -> None:
        self._recv = receive
        self._skip = skip
        self.redeliver_interrupted = redeliver_interrupted

    def receive_nowait(self) -> Delivery:
        skip = self._skip
        while True:
            d = self._recv.receive_nowait()
            if skip is None or not skip(d):
                return d

    async def receive(self) -> Delivery:
        skip = self._skip
        while True:
            d = await self._recv.receive()
            if skip is None or not skip(d):
                return d

    def close(self) -> None:
        self._recv.close()


# ------------------------------------------------------------------- worker control


@attrs.frozen
class CancelRunning:
    """Told to a worker: cancel ``task_id`` if it runs there (``reason`` is recorded:
    ``"cancel"`` for a user's request, ``"shutdown"`` for a stop)."""

    task_id: TaskID
    reason: str = "cancel"


@attrs.frozen
class Drain:
    """Asked of a worker: take nothing more, give running tasks ``timeout`` seconds
    (``None``: as long as they need), then interrupt the rest. The answer is a
    :class:`DrainTicket` at once; ``await ticket.wait()`` returns how many tasks were
    interrupted."""

    timeout: float | None = None


class DrainTicket:
    """The answer to :class:`Drain`: wait for the drain to end."""

    __slots__ = ("_done", "interrupted")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.interrupted = 0

    def finish(self, interrupted: int) -> None:
        self.interrupted = interrupted
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> int:
        """Wait until the drain has ended; return how many tasks it interrupted.

        Cancellation: only the waiting stops; the drain goes on."""
        await self._done.wait()
        return self.interrupted


# ------------------------------------------------------------------- result store


@attrs.frozen
class StoreResult:
    """Store ``result`` for ``task_id`` and wake its watchers."""

    task_id: TaskID
    result: TaskResult[Any]


@attrs.frozen
class GetResult:
    """Ask for the stored result of ``task_id``: the answer is the ``TaskResult`` or
    ``None``."""

    task_id: TaskID


@attrs.frozen
class ForgetResult:
    """Drop the result (and progress) of ``task_id``; its later watchers learn it is
    gone."""

    task_id: TaskID


class Watcher:
    """Made by whoever waits for a result and handed over with :class:`Watch`; the
    result store resolves it once, with the result or with the reason it is gone."""

    __slots__ = ("event", "gone", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: TaskResult[Any] | None = None
        self.gone = ""

    def resolve(self, result: TaskResult[Any]) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()

    def fail(self, why: str) -> None:
        if not self.event.is_set():
            self.gone = why
            self.event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until resolved, at most ``timeout`` seconds; True if resolved.

        Cancellation: only the waiting stops (send :class:`Unwatch` to withdraw)."""
        if timeout is None:
            await self.event.wait()
            return True
        with trio.move_on_after(timeout):
            await self.event.wait()
        return self.event.is_set()


@attrs.frozen(eq=False)
class Watch:
    """Resolve ``watcher`` when the result of ``task_id`` is stored (at once if it
    is already stored, or already known to be gone)."""

    task_id: TaskID
    watcher: Watcher


@attrs.frozen(eq=False)
class Unwatch:
    """Withdraw ``watcher`` (its wait timed out or was cancelled)."""

    task_id: TaskID
    watcher: Watcher


@attrs.frozen
class SetProgress:
    """Store the latest progress report of a running task."""

    task_id: TaskID
    progress: Any


@attrs.frozen
class GetProgress:
    """Ask for the latest progress report of ``task_id`` (``None`` when there is none)."""

    task_id: TaskID
