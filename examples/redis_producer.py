"""A Redis producer: sends tasks to the worker of ``redis_worker.py`` and prints results.

It imports the task declarations from ``redis_worker.py`` (producer and worker must
agree on task names); it runs no task itself. Needs the extra ``trio-bus[redis]``.
"""

from __future__ import annotations

import trio
from redis_worker import add, broker, report

import bus


async def main() -> list[str]:
    lines: list[str] = []
    async with broker:  # a producer only enters the broker; workers run elsewhere
        handles = [await add.kiq(i, 10 * i) for i in range(3)]
        handles.append(await report.kicker().with_labels(team="ops").kiq("2024-06-01"))
        for result in await bus.gather(*handles, timeout=30):
            lines.append(f"{result.status.value}: {result.return_value}")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    trio.run(main)
