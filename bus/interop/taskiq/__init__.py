"""taskiq on the wire: a bus worker runs tasks a taskiq producer sent, a taskiq client
reads their results, and the other way round (see docs/taskiq.md, "Coming from taskiq").

- :class:`TaskiqCodec`: a :class:`bus.Codec` for taskiq's JSON ``TaskiqMessage`` and
  ``TaskiqResult`` (labels with their type codes, option labels mapped, errors as
  :class:`bus.RemoteError`, never a class imported).
- :class:`TaskiqRedisBroker`: a :class:`bus.redis.RedisBroker` on taskiq-redis's
  ``RedisStreamBroker`` stream (``XADD <queue_name> * data <json>``, consumer group
  ``taskiq``), with the bus's reclaiming, dead letters, cancel and drain on top.
- :class:`TaskiqRedisResultBackend`: results where taskiq-redis's
  ``RedisAsyncResultBackend(serializer=JSONSerializer())`` reads them, and theirs read.

- :func:`dead_letter_unknown_tasks`: for a taskiq worker on such a stream, a message it
  cannot run goes to the bus's dead letters (as a ``bus worker`` does) instead of being
  acknowledged and dropped.

Nothing here imports taskiq (these classes speak its bytes and keys), except
:func:`dead_letter_unknown_tasks` when a taskiq worker calls it.
"""

from bus.interop.taskiq._codec import LABEL_TYPES, TaskiqCodec
from bus.interop.taskiq._redis import TaskiqKeys, TaskiqRedisBroker, TaskiqRedisResultBackend
from bus.interop.taskiq._taskiq_side import DEAD_LETTER_TASK, dead_letter_unknown_tasks

__all__ = [
    "DEAD_LETTER_TASK",
    "LABEL_TYPES",
    "TaskiqCodec",
    "TaskiqKeys",
    "TaskiqRedisBroker",
    "TaskiqRedisResultBackend",
    "dead_letter_unknown_tasks",
]
