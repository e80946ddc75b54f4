"""A flaky task with retries and backoff that reports its progress.

``sync_files`` fails its first two attempts with ``ConnectionError``; the task allows
three retries with a backoff that starts at 0.05 seconds and doubles (capped at 0.2).
Each attempt reports its progress with ``ctx.set_progress``. The producer reads the
progress with ``handle.get_progress()`` while it waits for the result, and prints each
new report. Results are pushed to waiters, but progress is read on demand; the
in-memory store drops a task's progress once its result is stored.

Run it with ``python examples/retries_progress.py``.
"""

from __future__ import annotations

import trio

import bus

broker = bus.InMemoryBroker()
FILES = ["a.txt", "b.txt", "c.txt", "d.txt"]


@broker.task(
    name="files.sync",
    retries=3,
    retry_backoff=0.05,
    retry_backoff_max=0.2,
    retry_on=(ConnectionError,),
)
async def sync_files(files: list[str], ctx: bus.Context = bus.CONTEXT) -> int:
    for i, name in enumerate(files, start=1):
        await trio.sleep(0.02)  # stands for an upload
        if ctx.attempt < 3 and i == 2:
            raise ConnectionError(f"lost the connection while sending {name}")
        await ctx.set_progress({"attempt": ctx.attempt, "done": i, "of": len(files)})
    return len(files)


async def main() -> tuple[bus.TaskResult[int], list[dict[str, int]]]:
    reports: list[dict[str, int]] = []
    async with broker:
        handle = await sync_files.kiq(FILES)
        async with trio.open_nursery() as nursery:

            async def watch_progress() -> None:
                while True:
                    progress = await handle.get_progress()
                    if progress is not None and (not reports or progress != reports[-1]):
                        reports.append(progress)
                        print(
                            f"progress: attempt {progress['attempt']}, "
                            f"{progress['done']}/{progress['of']} files"
                        )
                    await trio.sleep(0.005)

            nursery.start_soon(watch_progress)
            result = await handle.wait_result(timeout=5)
            nursery.cancel_scope.cancel()
    print(f"{result.status.value}: {result.return_value} files, {broker.stats.retried} retries")
    return result, reports


if __name__ == "__main__":
    trio.run(main)
