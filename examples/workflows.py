"""Workflows: a fan-out and fan-in (a chord), a failing chain with an ``on_error``
alert, and a cancelled workflow.

``count_words`` runs once per document, side by side; ``total`` gets the list of their
counts (in the order of the documents) and adds them up. A chain whose first step
fails skips the rest and sends ``alert`` once, with the failing step's result. The
last workflow is cancelled while its steps run. Each prints its status as a tree.

Run it with ``python examples/workflows.py``.
"""

from __future__ import annotations

from typing import Any

import trio

import bus

broker = bus.InMemoryBroker(concurrency=4)
DOCUMENTS = ["a b c", "d e", "f g h i", "j"]
alerts: list[bus.TaskResult[Any]] = []


@broker.task(name="docs.count_words")
async def count_words(text: str) -> int:
    await trio.sleep(0.01 * len(text))  # stands for real work; they finish out of order
    return len(text.split())


@broker.task(name="docs.total")
async def total(counts: list[int]) -> int:
    return sum(counts)


@broker.task(name="docs.parse")
async def parse(text: str) -> int:
    return int(text)


@broker.task(name="docs.alert")
async def alert(failed: bus.TaskResult[Any]) -> None:
    alerts.append(failed)  # the failing step's result


crawling_started = trio.Event()


@broker.task(name="docs.crawl")
async def crawl(site: int) -> int:
    crawling_started.set()
    await trio.sleep(60)
    return site


async def main() -> dict[str, Any]:
    async with broker:
        chord = bus.chord(bus.group(count_words.s(d) for d in DOCUMENTS), total.s())
        counted = await chord.kiq()
        words = await counted.wait_result(timeout=10)
        print(f"{words.return_value} words in {len(DOCUMENTS)} documents")
        print((await counted.status()).render())

        failing = await bus.chain(parse.s("twelve"), total.si([1]), on_error=alert.s()).kiq()
        failed = await failing.wait_result(timeout=10)  # int("twelve") fails
        print(f"the chain: {failed.status.name} at {failed.labels['failed_task']}")

        crawling = await bus.chord([crawl.s(i) for i in range(6)], total.s()).kiq()
        await crawling_started.wait()  # a step runs: cancel them all
        await crawling.cancel()
        cancelled = await crawling.wait_result(timeout=10)
        status = await crawling.status()
        print(f"the crawl: {cancelled.status.name}")
        print(status.render())
        await broker.wait_all()
    print(f"alerts: {len(alerts)} ({alerts[0].error.type_name if alerts[0].error else '-'})")
    return {
        "words": words.return_value,
        "failed": failed.status,
        "alerts": len(alerts),
        "cancelled": cancelled.status,
        "crawl_states": [s.state for s in status.steps],
    }


if __name__ == "__main__":
    trio.run(main)
