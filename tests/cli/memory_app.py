"""A tiny app for the CLI tests: an in-memory broker with one task."""

import bus

broker = bus.InMemoryBroker()
not_a_broker = 42


@broker.task(name="add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(name="fail")
async def fail() -> None:
    raise ValueError("no")


@broker.task(name="slow")
async def slow(seconds: float) -> float:
    import trio

    await trio.sleep(seconds)
    return seconds
