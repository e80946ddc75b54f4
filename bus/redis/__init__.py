"""Redis Streams broker and result backend (install the ``bus[redis]`` extra).

See docs/redis.md.
"""

from bus.redis._broker import RedisBroker
from bus.redis._results import RedisResultBackend

__all__ = ["RedisBroker", "RedisResultBackend"]
