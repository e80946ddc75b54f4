"""Cancel a queued task and a running task, and print how each one ended.

The broker runs one task at a time. A long task starts, a second one waits in the
queue; both are cancelled. The running one gets ``trio.Cancelled`` at its next
checkpoint (its ``finally`` block runs); the queued one never starts. Both results say
``cancelled``. A third task, sent afterwards, shows that the worker goes on.

Run it with ``python examples/cancellation.py``.
"""

from __future__ import annotations

import trio

import bus

broker = bus.InMemoryBroker(concurrency=1)
started: list[str] = []
first_started = trio.Event()
cleaned_up: list[str] = []


@broker.task
async def long_job(name: str) -> str:
    started.append(name)
    first_started.set()
    try:
        await trio.sleep(10)
        return f"{name} finished"
    finally:
        cleaned_up.append(name)


@broker.task
async def quick() -> str:
    return "the worker goes on"


async def main() -> dict[str, str]:
    statuses: dict[str, str] = {}
    async with broker:
        running = await long_job.kiq("running")
        queued = await long_job.kiq("queued")
        await first_started.wait()  # the first task runs, the second is queued

        await queued.cancel()
        await running.cancel()
        for name, handle in (("running", running), ("queued", queued)):
            result = await handle.wait_result(timeout=5)
            statuses[name] = result.status.value
            print(f"{name:<8} {result.status.value:<9} {result.error}")

        result = await (await quick.kiq()).wait_result(timeout=5)
        statuses["after"] = result.status.value
        print(f"{'after':<8} {result.status.value:<9} {result.return_value}")

    print(f"started: {started}, cleaned up: {cleaned_up}")
    return statuses


if __name__ == "__main__":
    trio.run(main)
