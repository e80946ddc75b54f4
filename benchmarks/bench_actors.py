"""Throughput of actors.tell / actors.ask next to a bare trio memory channel.

Usage: .venv/bin/python benchmarks/bench_actors.py [--messages N] [--asks N] [--repeat N]

Each figure is the best of --repeat runs; the bare loop uses the same channel size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import actors

MAILBOX = 64


class Sink(actors.Actor):
    def __init__(self) -> None:
        self.count = 0

    @actors.handles(int)
    async def on_int(self, msg: int) -> int:
        self.count += 1
        return msg


async def bare_tell(n: int) -> float:
    send, receive = trio.open_memory_channel[object](MAILBOX)
    got = 0

    async def consumer() -> None:
        nonlocal got
        async with receive:
            async for _ in receive:
                got += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        start = time.perf_counter()
        async with send:
            for i in range(n):
                await send.send(i)
    elapsed = time.perf_counter() - start
    assert got == n
    return elapsed


async def bare_ask(n: int) -> float:
    requests, incoming = trio.open_memory_channel[tuple[int, trio.Event, list[int]]](MAILBOX)

    async def server() -> None:
        async with incoming:
            async for value, event, box in incoming:
                box.append(value)
                event.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        start = time.perf_counter()
        async with requests:
            for i in range(n):
                event = trio.Event()
                box: list[int] = []
                await requests.send((i, event, box))
                await event.wait()
        elapsed = time.perf_counter() - start
    return elapsed


async def actor_tell(n: int) -> float:
    async with actors.open_system() as system:
        instance = Sink()
        ref = await system.spawn(lambda: instance, name="sink", mailbox_size=MAILBOX)
        start = time.perf_counter()
        for i in range(n):
            await ref.tell(i)
        await ref.stop()
        elapsed = time.perf_counter() - start
    assert instance.count == n
    return elapsed


async def actor_ask(n: int) -> float:
    async with actors.open_system() as system:
        ref = await system.spawn(Sink, name="sink", mailbox_size=MAILBOX)
        start = time.perf_counter()
        for i in range(n):
            await ref.ask(i)
        elapsed = time.perf_counter() - start
    return elapsed


def best(fn: object, n: int, repeat: int) -> float:
    return min(trio.run(fn, n) for _ in range(repeat))  # type: ignore[arg-type]


def run(messages: int, asks: int, repeat: int) -> dict[str, float]:
    """Run every measurement; print a table; return the per-second rates."""
    rows = {
        "bare channel send/receive": messages / best(bare_tell, messages, repeat),
        "actors tell": messages / best(actor_tell, messages, repeat),
        "bare channel + Event round trip": asks / best(bare_ask, asks, repeat),
        "actors ask": asks / best(actor_ask, asks, repeat),
    }
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, mailbox {MAILBOX}")
    print(f"tell: {messages} messages, ask: {asks} round trips, best of {repeat}")
    for label, rate in rows.items():
        print(f"  {label:<34} {rate:>12,.0f} /s")
    tell_cost = rows["bare channel send/receive"] / rows["actors tell"]
    ask_cost = rows["bare channel + Event round trip"] / rows["actors ask"]
    print(f"  tell cost vs bare channel: {tell_cost:.2f}x")
    print(f"  ask cost vs bare round trip: {ask_cost:.2f}x")
    rows["tell_ratio"] = tell_cost
    rows["ask_ratio"] = ask_cost
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--asks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.messages, args.asks, args.repeat)


if __name__ == "__main__":
    # This script is an application: it may quiet the library's debug lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    main()
