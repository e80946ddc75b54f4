"""taskiq-redis's keys: the stream of ``RedisStreamBroker`` and the result keys of
``RedisAsyncResultBackend``, served by the bus's Redis broker and result backend.

The broker is :class:`bus.redis.RedisBroker` with other key names
(:class:`TaskiqKeys`: the stream is the queue's name, its message field ``data``, one
priority level) and :class:`TaskiqCodec`: reading, reclaiming, retries, dead letters,
cancel and the drain are the Redis broker's own.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
import trio

from actors._log import get_logger
from bus._codec import Codec, DecodeError
from bus._errors import BrokerUnavailable, ResultNotFound
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult
from bus._options import is_queue_name
from bus._results import ResultBackend
from bus.interop.taskiq._codec import TaskiqCodec
from bus.redis._broker import RedisBroker
from bus.redis._client import Command
from bus.redis._logic import Keys
from bus.redis._results import RedisResultBackend
from bus.redis._url import RedisURL

__all__ = ["TaskiqKeys", "TaskiqRedisBroker", "TaskiqRedisResultBackend"]

log = get_logger("bus.interop.taskiq")


@attrs.frozen
class TaskiqKeys(Keys):
    """The keys of a taskiq-redis stream queue. The stream is the queue's name itself
    (taskiq-redis's ``queue_name``, or a message's ``queue_name`` label), its entries
    hold the message in the field ``data``, and it has one level (a priority travels
    as a label). What taskiq-redis has no key for (the delayed set, dead letters,
    workers, cancel markers, claims) is named ``{<queue>}:<prefix>:...``: the hash tag
    is the stream's name, so a Redis Cluster keeps them on the stream's node."""

    data_field: ClassVar[bytes] = b"data"
    levels: ClassVar[tuple[int, ...]] = (0,)
    discoverable: ClassVar[bool] = False  # a stream named as its queue has no pattern

    @property
    def base(self) -> str:
        return "{" + self.queue + "}:" + self.prefix

    @property
    def stream(self) -> bytes:
        return self.queue.encode()

    def level_stream(self, level: int) -> bytes:
        return self.stream

    def level_delayed(self, level: int) -> bytes:
        return self.delayed

    def queue_of_stream(self, key: bytes) -> str | None:
        try:
            name = key.decode()
        except UnicodeDecodeError:
            return None
        return name if is_queue_name(name) else None


class TaskiqRedisBroker(RedisBroker):
    """A :class:`~bus.redis.RedisBroker` on taskiq-redis's ``RedisStreamBroker``
    stream: ``XADD <queue_name> * data <taskiq JSON>``, read by the consumer group
    ``consumer_group_name``. A ``bus worker`` of it runs what taskiq producers send, and
    taskiq workers of that stream run what it sends; both kinds of worker may read the
    stream at once (one group: each message goes to one of them).

    On top of taskiq-redis: reclaiming with the bus's ``visibility_timeout`` (an entry
    idle that long, a taskiq worker's too, is run again elsewhere: set it above your
    longest task), a dead-letter stream (``{<queue>}:<prefix>:dead``: an unknown task, an
    undecodable message, too many deliveries), cancel, retries, delays (held by the bus
    until due, then added to the stream) and the graceful drain.

    Every other keyword is a :class:`~bus.redis.RedisSettings` field (``queue`` and
    ``group`` are these two). The result backend defaults to a
    :class:`TaskiqRedisResultBackend` of the same URL. taskiq signs nothing, so there is
    no ``secret``. A task's ``timeout`` and ``retries`` options travel as labels, so a
    taskiq worker applies them too (``retries`` as ``retry_on_error`` /
    ``max_retries``, read by taskiq's retry middleware).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        queue_name: str = "taskiq",
        consumer_group_name: str = "taskiq",
        result_backend: ResultBackend | None = None,
        codec: Codec | None = None,
        **options: Any,
    ) -> None:
        for name in ("queue", "group"):
            if name in options:
                raise TypeError(
                    f"TaskiqRedisBroker: give queue_name / consumer_group_name, not {name}="
                )
        if options.get("secret") is not None:
            raise ValueError(
                "TaskiqRedisBroker: taskiq signs no message, so a secret would refuse every "
                "message a taskiq producer sends; use RedisBroker for signed queues"
            )
        codec = codec if codec is not None else TaskiqCodec()
        if result_backend is None:
            result_backend = TaskiqRedisResultBackend(url, codec=codec)
        super().__init__(
            url,
            queue=queue_name,
            group=consumer_group_name,
            codec=codec,
            result_backend=result_backend,
            **options,
        )
        self.keys = TaskiqKeys(self.settings.prefix, self.settings.queue)

    @property
    def queue_name(self) -> str:
        """taskiq-redis's name for the stream: the default queue."""
        return self.settings.queue

    def __repr__(self) -> str:
        return f"<TaskiqRedisBroker {self.url} queue_name={self.queue!r}>"

    def _encode(self, message: TaskMessage) -> bytes:
        # A taskiq worker knows a task's options from its labels only (a taskiq
        # producer sends its decorator's labels): send the task's own with it.
        task = self.tasks.get(message.task_name)
        if task is not None:
            extra: dict[str, Any] = {}
            if task.options.timeout is not None and "timeout" not in message.labels:
                extra["timeout"] = task.options.timeout
            if task.options.retries and not {"retries", "retry_on_error"} & set(message.labels):
                extra["retries"] = task.options.retries
            if extra:
                message = attrs.evolve(message, labels={**message.labels, **extra})
        return super()._encode(message)


class TaskiqRedisResultBackend(RedisResultBackend):
    """Results where taskiq-redis's ``RedisAsyncResultBackend(serializer=JSONSerializer())``
    reads them, and theirs read: the key is the task id (``<prefix_str>:<task id>`` with
    a ``prefix_str``), the value taskiq's JSON ``TaskiqResult`` (:class:`TaskiqCodec`).

    - ``result_ex_time`` / ``result_px_time``: how long a result is kept, in seconds /
      milliseconds (as taskiq-redis: at most one of them; neither keeps results
      without an expiry).
    - ``poll_interval``: taskiq workers store a result without announcing it, so a
      ``wait_result`` also reads the key this often (seconds; ``None``: never). A result
      a bus worker stores is announced and wakes its waiters at once, as on
      :class:`~bus.redis.RedisResultBackend`.
    - ``prefix``: of the bus's own keys and channel (progress, announcements).

    Results are never signed (taskiq could not read them): a broker's ``secret`` is
    refused.
    """

    def __init__(
        self,
        url: str | RedisURL = "redis://127.0.0.1:6379",
        *,
        prefix_str: str | None = None,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        poll_interval: float | None = 0.5,
        prefix: str = "bus",
        codec: Codec | None = None,
        write_timeout: float = 300.0,
        command_timeout: float | None = 10.0,
    ) -> None:
        if result_ex_time is not None and result_px_time is not None:
            raise ValueError("give result_ex_time or result_px_time, not both")
        for name, value in (("result_ex_time", result_ex_time), ("result_px_time", result_px_time)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"{name} must be a whole number > 0, not {value!r}")
        if poll_interval is not None and not (
            isinstance(poll_interval, int | float) and 0 < poll_interval < math.inf
        ):
            raise ValueError(f"poll_interval must be > 0 seconds or None, not {poll_interval!r}")
        if prefix_str is not None and (not isinstance(prefix_str, str) or not prefix_str):
            raise ValueError(f"prefix_str must be a non-empty string or None, not {prefix_str!r}")
        codec = codec if codec is not None else TaskiqCodec()
        if not isinstance(codec, TaskiqCodec):
            raise TypeError("TaskiqRedisResultBackend reads and writes with a TaskiqCodec")
        if result_ex_time is not None:
            ttl = float(result_ex_time)
        elif result_px_time is not None:
            ttl = result_px_time / 1000
        else:
            ttl = 86_400.0  # progress reports only: results are kept
        super().__init__(
            url,
            ttl=ttl,
            prefix=prefix,
            codec=codec,
            write_timeout=write_timeout,
            command_timeout=command_timeout,
        )
        self.taskiq_codec = codec
        self.prefix_str = prefix_str
        self.expires = result_ex_time is not None or result_px_time is not None
        if not self.expires:
            self.ttl = math.inf
        self.poll_interval = poll_interval
        self.channel = f"{prefix}:taskiq-results".encode()

    # ``secret``: never set (a broker hands its own to a backend without one).

    @property
    def secret(self) -> None:
        return None

    @secret.setter
    def secret(self, value: bytes | None) -> None:
        if value is not None:
            raise ValueError(
                "TaskiqRedisResultBackend stores results unsigned (taskiq reads them): "
                "it cannot be used with a secret"
            )

    # ------------------------------------------------------------------ keys

    def result_key(self, task_id: str) -> bytes:
        """taskiq-redis's key: the task id, after ``prefix_str:`` when one is set."""
        name = task_id if self.prefix_str is None else f"{self.prefix_str}:{task_id}"
        return name.encode()

    def store_commands(
        self, task_id: TaskID, data: bytes, *, only_new: bool
    ) -> tuple[Command, ...]:
        expiry = ("PX", self.ttl_ms) if self.expires else ()
        nx = ("NX",) if only_new else ()
        return (
            ("SET", self.result_key(task_id), data, *expiry, *nx),
            ("PUBLISH", self.channel, self.announcement(task_id, data)),
            ("DEL", self.progress_key(task_id)),
        )

    def announcement(self, task_id: TaskID, value: bytes) -> bytes:
        return task_id.encode() + b"\n" + value

    def announced_id(self, payload: bytes) -> str:
        # The id before the newline, lower-cased as TaskID.parse keeps it (a uuid4
        # hex id has 32 characters, a canonical one 36): no text of an id without one.
        nl = payload.find(b"\n", 0, 37)
        return payload[:nl].decode("latin-1").lower() if nl >= 0 else ""

    def parse_announcement(self, payload: bytes) -> tuple[TaskID, bytes] | None:
        head, nl, value = payload.partition(b"\n")
        if not nl:
            return None
        try:
            return TaskID.parse(head.decode("ascii"), any_uuid=True), value
        except (UnicodeDecodeError, ValueError):
            return None

    def open(self, task_id: TaskID, value: bytes) -> TaskResult[Any] | None:
        try:
            return self.taskiq_codec.decode_result(value, task_id=task_id)
        except DecodeError as exc:
            log.error("results.undecodable", task_id=task_id, error=str(exc))
            return None

    # ------------------------------------------------------------- the ABC

    async def get_result(self, task_id: TaskID) -> TaskResult[Any]:
        return await super().get_result(TaskID.parse(task_id, any_uuid=True))

    async def is_ready(self, task_id: TaskID) -> bool:
        return await super().is_ready(TaskID.parse(task_id, any_uuid=True))

    async def forget(self, task_id: TaskID) -> None:
        await super().forget(TaskID.parse(task_id, any_uuid=True))

    async def wait_result(self, task_id: TaskID, timeout: float | None = None) -> TaskResult[Any]:
        """Pushed for results the bus stores; for those a taskiq worker stores (never
        announced), the key is also read every ``poll_interval``."""
        tid = TaskID.parse(task_id, any_uuid=True)
        if self.poll_interval is None:
            return await super().wait_result(tid, timeout)
        found: list[TaskResult[Any]] = []
        failed: list[BaseException] = []
        pushed_wait = super().wait_result
        async with trio.open_nursery() as nursery:

            async def pushed() -> None:
                try:
                    found.append(await pushed_wait(tid, timeout))
                except (ResultNotFound, BrokerUnavailable, TimeoutError) as exc:
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            async def polled(interval: float) -> None:
                while True:
                    await trio.sleep(interval)
                    try:
                        found.append(await self.get_result(tid))
                    except (ResultNotFound, BrokerUnavailable):
                        continue
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(pushed)
            nursery.start_soon(polled, self.poll_interval)
        if found:
            return found[0]
        raise failed[0]
