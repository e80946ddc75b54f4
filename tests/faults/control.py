"""Really stop, start, freeze and thaw the redis-server under a fault test."""

from __future__ import annotations

import signal

import attrs
import trio

from tests.redis.server import RedisServer

__all__ = ["RedisControl"]


@attrs.define
class RedisControl:
    """A redis-server of the test's own, with appendonly on, so that what was written
    before a stop is there after the start (same port, same directory)."""

    server: RedisServer
    paused: bool = False

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        """SIGTERM, and wait until it exited (it writes its append-only file first)."""
        if self.paused:
            self.resume()
        await trio.to_thread.run_sync(self.server.stop)

    async def start(self) -> None:
        """Start it again on the same port; returns once it answers PING."""
        await trio.to_thread.run_sync(self.server.start)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, Redis answers nothing."""
        assert self.server.process is not None
        self.server.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT."""
        if self.server.process is not None and self.paused:
            self.server.process.send_signal(signal.SIGCONT)
        self.paused = False

    def close(self) -> None:
        self.resume()
        self.server.stop()
