"""Redis Streams broker and result backend (install the ``trio-bus[redis]`` extra).

See docs/redis.md.
"""

try:
    import hiredis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("bus.redis needs the redis extra: pip install 'trio-bus[redis]'") from exc

from bus.redis._broker import RedisBroker
from bus.redis._results import RedisResultBackend
from bus.redis._settings import RedisSettings
from bus.redis._url import RedisURL

__all__ = ["RedisBroker", "RedisResultBackend", "RedisSettings", "RedisURL"]
