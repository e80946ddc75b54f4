"""For a taskiq worker that shares a stream with the bus: what it cannot run goes to the
bus's dead letters instead of being acknowledged and dropped.

This is the one part of :mod:`bus.interop.taskiq` that imports taskiq (and redis-py),
when it is called, in a taskiq worker's process.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bus.interop.taskiq._redis import TaskiqKeys

__all__ = ["DEAD_LETTER_TASK", "dead_letter_unknown_tasks"]

DEAD_LETTER_TASK = "bus.interop.taskiq:dead_letter"
"""The name of the taskiq task :func:`dead_letter_unknown_tasks` registers."""


def dead_letter_unknown_tasks(broker: Any, *, prefix: str = "bus") -> Any:
    """Make a taskiq-redis ``RedisStreamBroker`` (its worker side) dead-letter what it
    cannot run, as a ``bus worker`` does; returns the broker.

    A taskiq worker acknowledges a message naming a task it does not know (or one it
    cannot parse) and drops it, with a warning. With this, such a message goes to the
    dead-letter stream the bus keeps for its queue (``{<queue>}:<prefix>:dead``, the
    ``prefix`` of the :class:`TaskiqRedisBroker` of that stream) with its reason, where
    ``bus dead MODULE:BROKER list`` shows it and ``requeue`` sends it back once a worker
    knows the task. Call it where the taskiq broker is made::

        broker = dead_letter_unknown_tasks(RedisStreamBroker(url, queue_name="taskiq"))

    How: the broker's formatter hands a message it cannot run to a task registered as
    :data:`DEAD_LETTER_TASK`, which adds the letter and stores no result.
    """
    from redis.asyncio import Redis
    from taskiq.abc.formatter import TaskiqFormatter
    from taskiq.exceptions import NoResultError
    from taskiq.message import BrokerMessage, TaskiqMessage

    inner = broker.formatter
    default_queue = broker.queue_name

    async def dead_letter(data: str, reason: str, queue: str, stream: str) -> None:
        letter = {
            "reason": reason,
            "data": data,
            "id": "",
            "queue": queue,
            "deliveries": "1",
            "time": str(time.time()),
            "stream": stream,
        }
        async with Redis(connection_pool=broker.connection_pool) as redis:
            await redis.xadd(TaskiqKeys(prefix, queue).dead, letter)  # type: ignore[arg-type]
        raise NoResultError

    broker.register_task(dead_letter, task_name=DEAD_LETTER_TASK)

    class DeadLetteringFormatter(TaskiqFormatter):
        def dumps(self, message: TaskiqMessage) -> BrokerMessage:
            dumped: BrokerMessage = inner.dumps(message)
            return dumped

        def loads(self, message: bytes) -> TaskiqMessage:
            queue = default_queue
            try:
                parsed: TaskiqMessage = inner.loads(message)
                if broker.find_task(parsed.task_name) is not None:
                    return parsed
                queue = str(parsed.labels.get("queue_name") or default_queue)
                task_id = parsed.task_id
                reason = (
                    f"unknown task {parsed.task_name!r}: no task is registered under that "
                    "name (in a taskiq worker)"
                )
            except Exception as exc:
                task_id = uuid.uuid4().hex
                reason = f"undecodable message (in a taskiq worker): {exc}"[:500]
            return TaskiqMessage(
                task_id=task_id,
                task_name=DEAD_LETTER_TASK,
                labels={},
                labels_types={},
                args=[bytes(message).decode("utf-8", "replace"), reason, queue, queue],
                kwargs={},
            )

    broker.formatter = DeadLetteringFormatter()
    return broker
