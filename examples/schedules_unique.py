"""Periodic tasks and unique jobs on the in-memory broker.

``sample_queue`` runs every 0.2 seconds (a declared schedule); ``send_digest`` is added
at run time with ``broker.schedule`` and removed again; ``rebuild`` is a unique job:
ten concurrent requests to rebuild the same shop make one run, and all ten get its
result. The same code runs on ``RedisBroker`` across processes, where each tick fires
once however many workers run a scheduler.

Run it with ``python examples/schedules_unique.py``.
"""

from __future__ import annotations

import trio

import bus

broker = bus.InMemoryBroker()
samples: list[float] = []
digests: list[str] = []
rebuilds: list[str] = []


@broker.task(schedule=bus.every(0.2))
async def sample_queue(ctx: bus.Context = bus.CONTEXT) -> None:
    samples.append(ctx.labels["tick"])


@broker.task
async def send_digest(to: str) -> None:
    digests.append(to)


@broker.task(unique=True)
async def rebuild(shop: str) -> str:
    rebuilds.append(shop)
    await trio.sleep(0.1)
    return f"{shop}: rebuilt"


async def main() -> dict[str, object]:
    answers: list[str] = []

    async def request(shop: str) -> None:
        handle = await rebuild.kiq(shop)
        answers.append((await handle.wait_result(timeout=5)).unwrap())

    async with broker:
        await broker.schedule(send_digest, bus.every(0.25), args=["ops@example.com"])
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(request, "paris")
        await trio.sleep(0.6)
        for info in await broker.schedules():
            print(
                f"{info.spec.name}: {info.source}, fired {info.state.fires}, "
                f"missed {info.state.misses}"
            )
        await broker.unschedule(send_digest.name)
    print(f"ticks {len(samples)}, digests {len(digests)}")
    print(f"{len(answers)} answers from {len(rebuilds)} run: {answers[0]}")
    return {"samples": samples, "digests": digests, "rebuilds": rebuilds, "answers": answers}


if __name__ == "__main__":
    trio.run(main)
