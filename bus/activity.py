"""What the workers are doing, for the dashboard: the tasks running now and the recent
failures. The broker keeps neither (a Redis stream knows which entries are pending, not
what runs them or why one failed), so workers that want to be seen publish them.

``ActivityMiddleware`` keeps, in each worker process, the tasks running there and the
failures seen there, in memory: a dict insert and a pop per attempt, nothing more on the
hot path. A small actor publishes them every ``interval`` seconds, in one write:

- on Redis, one pipeline per interval per process (not per task): ``SET`` of this
  worker's record (JSON, expiring after ``ttl``), ``ZADD`` of its name to an index,
  and one ``XADD`` per new failure to a capped stream;
- on the in-memory broker, nothing to write: a dashboard in the same process reads
  the middleware's own tables.

:func:`read_activity` reads them back (what ``bus dashboard`` shows). Records say what
ran at the last publication: up to ``interval`` seconds old. See docs/observability.md.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._observe import _queue_of

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["Activity", "ActivityMiddleware", "read_activity"]

log = get_logger("bus.activity")


@attrs.frozen
class Activity:
    """What :func:`read_activity` returns. ``workers``: one record per worker process
    that published lately (``worker``, ``host``, ``pid``, ``slot``, ``started_at``,
    ``time`` of the record, ``running`` (a list of ``task_id``, ``task_name``,
    ``attempt``, ``queue``, ``started_at``), ``running_count`` and ``stats``, the
    process's ``broker.stats``); ``failures``: the newest first, each with ``time``,
    ``worker``, ``task_id``, ``task_name``, ``queue``, ``attempt``, ``status``
    (``failure``, ``timeout`` or ``rejected``), ``error_type``, ``error``,
    ``traceback`` and ``retrying`` (another attempt follows)."""

    workers: list[dict[str, Any]]
    failures: list[dict[str, Any]]


class _Publisher(actors.Actor):
    def __init__(self, middleware: ActivityMiddleware) -> None:
        self.mw = middleware

    async def on_start(self) -> None:
        self.nursery.start_soon(self._publish_forever)

    async def _publish_forever(self) -> None:
        failing = False
        while True:
            await trio.sleep(self.mw.interval)
            try:
                await self.mw.flush()
            except Exception as exc:  # Redis away: the next round tries again
                if not failing:  # once, not every interval
                    log.warning("activity.publish_failed", error=f"{type(exc).__name__}: {exc}")
                failing = True
            else:
                failing = False


def _worker_name(broker: Broker) -> str:
    settings = getattr(broker, "settings", None)
    consumer = getattr(settings, "consumer", None)
    if isinstance(consumer, str):
        return consumer  # the name `bus inspect` lists the worker under
    return f"{socket.gethostname()}-{os.getpid()}"


def _redis_store(broker: Broker) -> Any:
    """The Redis store when ``broker`` is a RedisBroker (without importing bus.redis
    otherwise: if it is one, that module is loaded already)."""
    mod = sys.modules.get("bus.redis")
    if mod is None or not isinstance(broker, mod.RedisBroker):
        return None
    from bus.redis._activity import RedisActivityStore

    return RedisActivityStore(broker)


class ActivityMiddleware(Middleware):
    """Keeps the tasks running in this process and the failures seen here, and publishes
    them every ``interval`` seconds (see the module docstring for the cost). Records
    expire ``ttl`` seconds after the last publication (default: ``5 * interval``, at
    least 10 s), so a crashed worker's record goes away by itself. ``keep_failures``
    caps the failures kept (the Redis stream is trimmed to about that many);
    ``max_running`` caps the running tasks listed in one record; tracebacks are cut
    to ``traceback_chars``. Add it to the broker the workers run (the producers may
    have it too: a process that received no delivery publishes nothing)."""

    def __init__(
        self,
        *,
        interval: float = 2.0,
        ttl: float | None = None,
        keep_failures: int = 500,
        max_running: int = 200,
        traceback_chars: int = 4000,
    ) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self.interval = float(interval)
        self.ttl = float(ttl) if ttl is not None else max(10.0, 5 * self.interval)
        self.keep_failures = keep_failures
        self.max_running = max_running
        self.traceback_chars = traceback_chars
        self.started_at = time.time()
        self.running: dict[TaskID, list[dict[str, Any]]] = {}
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep_failures)
        self._unpublished: list[dict[str, Any]] = []
        self._published: tuple[Any, ...] | None = None
        self._published_at = -math.inf
        self._publisher: actors.ActorRef | None = None
        self._store: Any = None

    @property
    def worker(self) -> str:
        """This process's worker name (the Redis consumer name on Redis)."""
        return _worker_name(self.broker)

    # --------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        self._store = _redis_store(self.broker)
        self._published, self._published_at = None, -math.inf
        system = self.broker.system
        if self._store is not None and system is not None:
            self._publisher = await system.spawn(
                lambda: _Publisher(self),
                name=f"activity-{TaskID.new()[-8:]}",
                on_failure=actors.RESTART,
                max_restarts=None,
                backoff=actors.Backoff(initial=1.0, cap=30.0),
            )

    async def shutdown(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None and publisher.is_alive:
            await publisher.stop()
        if self._store is not None and self._published is not None:
            try:
                await self.flush(force=True)
                await self._store.remove(self.worker)
            except Exception as exc:
                log.warning("activity.publish_failed", error=f"{type(exc).__name__}: {exc}")
        self.running.clear()  # handed back unfinished, if anything: it runs elsewhere

    # ----------------------------------------------------------------- hooks

    def pre_execute(self, message: TaskMessage) -> TaskMessage:
        entry = {
            "task_id": str(message.task_id),
            "task_name": message.task_name,
            "attempt": message.attempt,
            "queue": _queue_of(message, self.broker),
            "started_at": time.time(),
        }
        same = self.running.get(message.task_id)
        if same is None:
            self.running[message.task_id] = [entry]
        else:
            same.append(entry)
        return message

    def _done(self, task_id: TaskID) -> None:
        same = self.running.get(task_id)
        if same is not None:
            same.pop()
            if not same:
                del self.running[task_id]

    def post_execute(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        self._done(message.task_id)

    def on_error(self, message: TaskMessage, result: TaskResult[Any], error: BaseException) -> None:
        remote = result.error or RemoteError.from_exception(error)
        status = "timeout" if result.status is TaskStatus.TIMEOUT else "failure"
        self._failed(message, status, remote, retrying=result.error is None)

    def on_reject(self, message: TaskMessage | None, reason: str) -> None:
        if message is not None:
            self._done(message.task_id)
        self._failed(message, "rejected", RemoteError("bus.Rejected", reason), retrying=False)

    def _failed(
        self, message: TaskMessage | None, status: str, error: RemoteError, *, retrying: bool
    ) -> None:
        tb = error.traceback
        if len(tb) > self.traceback_chars:
            tb = "...\n" + tb[-self.traceback_chars :]
        record = {
            "time": time.time(),
            "worker": self.worker,
            "task_id": None if message is None else str(message.task_id),
            "task_name": None if message is None else message.task_name,
            "queue": _queue_of(message, self.broker),
            "attempt": None if message is None else message.attempt,
            "status": status,
            "error_type": error.type_name,
            "error": error.message[:2000],
            "traceback": tb,
            "retrying": retrying,
        }
        self.failures.append(record)
        if self._store is not None:
            self._unpublished.append(record)
            if len(self._unpublished) > self.keep_failures:
                del self._unpublished[: -self.keep_failures]

    # ------------------------------------------------------------- publishing

    def record(self) -> dict[str, Any]:
        """This process's worker record, as published."""
        running = [e for same in self.running.values() for e in same]
        slot = os.environ.get("BUS_WORKER_SLOT")
        return {
            "worker": self.worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slot": int(slot) if slot and slot.isdigit() else None,
            "started_at": self.started_at,
            "time": time.time(),
            "running": running[: self.max_running],
            "running_count": len(running),
            "stats": attrs.asdict(self.broker.stats),
        }

    async def flush(self, *, force: bool = False) -> None:
        """Publish this worker's record and new failures now, if anything changed (or
        the record is half its ``ttl`` old). Nothing for a process that ran nothing."""
        store = self._store
        if store is None or (self.broker.stats.received == 0 and not self._unpublished):
            return
        stats = attrs.astuple(self.broker.stats)
        state = (tuple(self.running), stats)
        now = trio.current_time()
        if (
            not force
            and not self._unpublished
            and state == self._published
            and now - self._published_at < self.ttl / 2
        ):
            return
        failures, self._unpublished = self._unpublished, []
        try:
            await store.publish(self.record(), failures, self)
        except BaseException:
            self._unpublished[:0] = failures
            raise
        self._published, self._published_at = state, now

    def local(self, failures: int = 50) -> Activity:
        """This process's activity, from memory (what the in-memory broker shows)."""
        if self.broker.stats.received == 0 and not self.failures:
            return Activity([], list(reversed(self.failures))[:failures])
        return Activity([self.record()], list(reversed(self.failures))[:failures])


def _middleware_of(broker: Broker) -> ActivityMiddleware | None:
    for mw in broker.middlewares:
        if isinstance(mw, ActivityMiddleware):
            return mw
    return None


async def read_activity(broker: Broker, *, failures: int = 50) -> Activity | None:
    """The workers' published records and the newest ``failures`` failures, read from
    where the workers publish them (Redis; or this process's middleware for other
    brokers). ``None`` when there is nowhere to read from: a broker of this process
    without :class:`ActivityMiddleware`. Inside ``async with broker``."""
    store = _redis_store(broker)
    if store is not None:
        activity: Activity = await store.read(failures)
        return activity
    mw = _middleware_of(broker)
    return None if mw is None else mw.local(failures)
