"""A counter actor: tell, ask, backpressure and a clean stop."""

from __future__ import annotations

import attrs
import trio

import actors


@attrs.frozen
class Incr:
    by: int


@attrs.frozen
class Get:
    pass


class Counter(actors.Actor):
    def __init__(self) -> None:
        self.n = 0

    @actors.handles(Incr)
    async def incr(self, msg: Incr) -> None:
        self.n += msg.by

    @actors.handles(Get)
    async def get(self, msg: Get) -> int:
        return self.n


async def main() -> int:
    async with actors.open_system() as system:
        counter = await system.spawn(Counter, name="counter", mailbox_size=8)
        async with trio.open_nursery() as nursery:
            for _ in range(4):  # four senders share one actor; tell waits when it is full
                nursery.start_soon(send_many, counter)
        total = await counter.ask(Get(), timeout=5)
        print(f"counted {total}")
        await counter.stop()
    return int(total)


async def send_many(counter: actors.ActorRef) -> None:
    for _ in range(250):
        await counter.tell(Incr(1))


if __name__ == "__main__":
    trio.run(main)
