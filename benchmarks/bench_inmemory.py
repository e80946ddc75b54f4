"""In-memory broker: this project against taskiq's InMemoryBroker, in one run.

    .venv/bin/pip install -e '.[bench]'     # taskiq, benchmark-only
    .venv/bin/python benchmarks/bench_inmemory.py [--tasks 20000] [--rounds 2000]

Measures, on the same no-op task:
  * throughput: N tasks sent, then all results awaited (tasks/s);
  * round trip: sequential kiq -> wait_result, p50 and p99 (microseconds).
Prints a table and our ratio to taskiq. taskiq is skipped (said so) when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

import bus


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def _ours(n_tasks: int, n_rounds: int) -> dict[str, float]:
    broker = bus.InMemoryBroker(concurrency=100, max_queue=max(n_tasks, 1))

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    async with broker:
        for _ in range(200):  # warm up
            await (await noop.kiq()).wait_result()
        gc.collect()
        t0 = time.perf_counter()
        handles = [await noop.kiq() for _ in range(n_tasks)]
        for h in handles:
            await h.wait_result()
        throughput = n_tasks / (time.perf_counter() - t0)
        lat = []
        for _ in range(n_rounds):
            t = time.perf_counter()
            await (await noop.kiq()).wait_result()
            lat.append(time.perf_counter() - t)
    return {"throughput": throughput, "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)}


async def _taskiq(n_tasks: int, n_rounds: int) -> dict[str, float]:
    from taskiq import InMemoryBroker  # type: ignore[import-not-found]

    # Its default keeps only 100 results (older waiters would hang): keep them all.
    broker = InMemoryBroker(max_stored_results=-1, max_async_tasks=100)

    @broker.task(task_name="noop")  # type: ignore[untyped-decorator]
    async def noop() -> None:
        return None

    await broker.startup()
    try:
        for _ in range(200):
            await (await noop.kiq()).wait_result(check_interval=0)
        gc.collect()
        t0 = time.perf_counter()
        handles = [await noop.kiq() for _ in range(n_tasks)]
        for h in handles:
            await h.wait_result(check_interval=0)
        throughput = n_tasks / (time.perf_counter() - t0)
        lat = []
        for _ in range(n_rounds):
            t = time.perf_counter()
            await (await noop.kiq()).wait_result(check_interval=0)
            lat.append(time.perf_counter() - t)
    finally:
        await broker.shutdown()
    return {"throughput": throughput, "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per library; medians shown")
    args = ap.parse_args(argv)

    runners: dict[str, Callable[[], dict[str, float]]] = {
        "trio-bus": lambda: trio.run(_ours, args.tasks, args.rounds),
    }
    try:
        import taskiq  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("taskiq is not installed: pip install -e '.[bench]' to compare; measuring ours")
    else:
        runners["taskiq"] = lambda: asyncio.run(_taskiq(args.tasks, args.rounds))

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(args.repeat):  # alternate libraries
        for name, run in runners.items():
            samples[name].append(run())

    med: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}, {args.tasks} tasks, "
        f"{args.rounds} round trips, median of {args.repeat}"
    )
    print(f"{'library':<10} {'throughput/s':>14} {'rt p50 us':>10} {'rt p99 us':>10}")
    for name, m in med.items():
        print(
            f"{name:<10} {m['throughput']:>14,.0f} {m['p50'] * 1e6:>10.1f} {m['p99'] * 1e6:>10.1f}"
        )
    if "taskiq" in med:
        o, t = med["trio-bus"], med["taskiq"]
        print(
            f"ratio trio-bus/taskiq: throughput {o['throughput'] / t['throughput']:.2f}x, "
            f"p50 {t['p50'] / o['p50']:.2f}x faster"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
