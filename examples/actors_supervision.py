"""Supervision: a flaky worker restarted by its policy, under a parent actor."""

from __future__ import annotations

import attrs
import trio

import actors


@attrs.frozen
class Job:
    n: int


@attrs.frozen
class Status:
    pass


class FlakyWorker(actors.Actor):
    def __init__(self) -> None:
        self.done = 0  # fresh after each restart

    @actors.handles(Job)
    async def job(self, msg: Job) -> int:
        if msg.n % 3 == 0:
            raise RuntimeError(f"job {msg.n} failed")
        self.done += 1
        return msg.n * 10


class Manager(actors.Actor):
    async def on_start(self) -> None:
        self.worker = await self.spawn(
            FlakyWorker, name="worker", on_failure=actors.RESTART, max_restarts=10
        )

    @actors.handles(Job)
    async def job(self, msg: Job) -> str:
        try:
            return f"job {msg.n} -> {await self.worker.ask(msg)}"
        except RuntimeError as exc:
            return f"job {msg.n} failed ({exc}); the worker restarts with fresh state"


async def main() -> list[str]:
    lines = []
    async with actors.open_system() as system:
        manager = await system.spawn(Manager, name="manager")
        for n in range(1, 7):
            lines.append(await manager.ask(Job(n), timeout=5))
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    trio.run(main)
