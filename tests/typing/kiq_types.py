"""Checked by ``mypy --strict`` (part of the test command), never run.

Each wrong call carries an ignore for the exact error mypy must report; with
``warn_unused_ignores`` (on under --strict), mypy fails if a wrong call is accepted.
"""

from __future__ import annotations

import bus

broker = bus.InMemoryBroker()


@broker.task
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(name="typed.shout")
def shout(word: str, *, times: int = 1) -> str:
    return word * times


@broker.task
async def with_ctx(x: int, ctx: bus.Context = bus.CONTEXT) -> str:
    return ctx.task_name


async def calls() -> None:
    handle: bus.TaskHandle[int] = await add.kiq(1, 2)
    result: bus.TaskResult[int] = await handle.wait_result()
    value: int = result.unwrap()
    del value
    await add.kiq("1", 2)  # type: ignore[arg-type]
    await add.kiq(1)  # type: ignore[call-arg]
    await add.kiq(1, 2, 3)  # type: ignore[call-arg]
    await shout.kiq("a", times=2)
    await shout.kiq("a", tiems=2)  # type: ignore[call-arg]
    await shout.kicker().with_labels(x=1).kiq(word="b")
    await shout.kicker().kiq(3)  # type: ignore[arg-type]
    await shout.kicker().with_queue("reports").with_priority(9).kiq("a", times=2)
    await shout.kicker().with_priority(1).kiq(word=3)  # type: ignore[arg-type]
    limited = bus.limit("api", "10/s", burst=2)
    assert isinstance(limited, bus.Limit)
    await with_ctx.kiq(1)
    direct: int = await add(1, 2)
    also: str = shout("x")
    del direct, also
