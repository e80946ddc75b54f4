"""Hearing of a Sentinel failover as it happens: :class:`SwitchWatch`.

A child of the connection actor of a ``redis+sentinel://`` URL: it subscribes to
``+switch-master`` on one of the sentinels and tells its parent :class:`Switched`
when the sentinels moved the URL's service to another master; the parent then drops
its command connection, and supervision connects to the new master. (A connection
to the old master also breaks when that master dies, and is dropped at its first
``READONLY`` reply once it is demoted: this watch only makes the move prompt when
the old master is alive and cut off.) Restarted with backoff like every Redis actor.
"""

from __future__ import annotations

import contextlib

import attrs
import trio

import actors
from bus.redis._client import PubSub, RedisError
from bus.redis._sentinel import sentinel_url
from bus.redis._url import RedisURL

__all__ = ["SwitchWatch", "Switched"]

CHANNEL = b"+switch-master"


@attrs.frozen
class Switched:
    """Told to the parent: the sentinels named ``host:port`` the new master."""

    host: str
    port: int


def parse_switch(service: str, data: bytes) -> Switched | None:
    """A ``+switch-master`` message (``name old-ip old-port new-ip new-port``) about
    ``service``; ``None`` for another service or a malformed one."""
    parts = data.split()
    if len(parts) != 5 or parts[0] != service.encode():
        return None
    try:
        return Switched(parts[3].decode(), int(parts[4]))
    except (UnicodeDecodeError, ValueError):
        return None


class SwitchWatch(actors.Actor):
    """Listens to the first sentinel that answers (in the URL's order)."""

    expected_failures = (RedisError, OSError)

    def __init__(self, url: RedisURL, parent: actors.ActorRef) -> None:
        assert url.service is not None
        self.url = url
        self.service = url.service
        self.parent = parent
        self.ps: PubSub | None = None

    async def on_start(self) -> None:
        failures: list[str] = []
        for host, port in self.url.seeds:
            try:
                ps = await PubSub.connect(sentinel_url(self.url, host, port), name="bus-switch")
            except (RedisError, OSError) as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            self.ps = ps
            await self.nursery.start(ps.run)
            await ps.subscribe(CHANNEL)
            self.nursery.start_soon(self._listen, ps)
            return
        raise RedisError(f"no sentinel to watch: {'; '.join(failures)}")

    async def _listen(self, ps: PubSub) -> None:
        async for _channel, data in ps:
            switched = parse_switch(self.service, data)
            if switched is not None:
                with contextlib.suppress(actors.ActorStopped, actors.MailboxFull):
                    self.parent.tell_nowait(switched)

    async def on_stop(self) -> None:
        ps, self.ps = self.ps, None
        if ps is not None:
            with trio.CancelScope(shield=True):
                await ps.aclose()
