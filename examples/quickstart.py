"""The main job: a producer sends tasks, an in-memory worker runs them, results are printed.

Run it with ``sh scripts/demo.sh`` (or ``python examples/quickstart.py`` in the venv).
"""

from __future__ import annotations

import trio

import bus

broker = bus.InMemoryBroker(concurrency=8)


@broker.task
async def add(a: int, b: int) -> int:
    await trio.sleep(0.01)  # pretend to do some I/O
    return a + b


@broker.task(name="text.shout", retries=2, retry_backoff=0.01)
def shout(word: str) -> str:  # a sync task: runs in a worker thread
    return word.upper() + "!"


async def main() -> None:
    async with broker:
        handles = [await add.kiq(i, i * 10) for i in range(5)]
        handles.append(await shout.kiq("hello"))
        for handle, result in zip(handles, await bus.gather(*handles, timeout=10), strict=True):
            print(f"{handle.task_id}  {result.status.value:<8} -> {result.return_value!r}")
        failed = await add.kiq("one", 2)  # a TypeError inside the task
        result = await failed.wait_result(timeout=5)
        print(f"{failed.task_id}  {result.status.value:<8} -> {result.error}")


if __name__ == "__main__":
    trio.run(main)
