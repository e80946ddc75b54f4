"""An application as users write one: a module-level RedisBroker and its tasks."""

from __future__ import annotations

import bus
from bus.redis import RedisBroker

broker = RedisBroker("redis://127.0.0.1:1/0", queue="app")  # nothing listens there
seen: list[str] = []


@broker.on_event(bus.BusEvent.WORKER_STARTUP)
def ready(state: bus.BrokerState) -> None:
    state.greeting = "hello"


@broker.task(name="app.greet", retries=1, retry_backoff=0)
async def greet(name: str, ctx: bus.Context = bus.CONTEXT) -> str:
    seen.append(name)
    if ctx.attempt == 1 and name == "flaky":
        raise ConnectionError("first attempt fails")
    return f"{ctx.broker.state.greeting} {name}"
