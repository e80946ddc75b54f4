"""Messages and actors shared by the actor tests (a uniquely named helper module)."""

from __future__ import annotations

import attrs

import actors


@attrs.frozen
class Incr:
    by: int = 1


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Fail:
    reason: str = "boom"


class Counter(actors.Actor):
    """Counts, records everything it handled, and can be told to fail."""

    def __init__(self) -> None:
        self.n = 0

    @actors.handles(Incr)
    async def incr(self, msg: Incr) -> None:
        self.n += msg.by

    @actors.handles(Get)
    async def get(self, msg: Get) -> int:
        return self.n

    @actors.handles(Fail)
    async def fail(self, msg: Fail) -> None:
        raise ValueError(msg.reason)
