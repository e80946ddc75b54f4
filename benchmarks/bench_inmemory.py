"""In-memory broker: this project against taskiq's InMemoryBroker (and, with
``--against REV``, against an earlier commit of this project), in one run.

    .venv/bin/pip install -e '.[bench]'     # taskiq, benchmark-only
    .venv/bin/python benchmarks/bench_inmemory.py [--tasks 20000] [--rounds 2000]
    .venv/bin/python benchmarks/bench_inmemory.py --concurrency 100,1000
    .venv/bin/python benchmarks/bench_inmemory.py --alloc
    .venv/bin/python benchmarks/bench_inmemory.py --against HEAD~1

Measures, on the same no-op task, at each concurrency of ``--concurrency`` (the
worker's limit; taskiq's ``max_async_tasks``; default 100 and 1000):
  * throughput: N tasks sent, then all results awaited (tasks/s);
  * round trip: sequential kiq -> wait_result, p50 and p99 (microseconds).
Each library runs in a fresh process, the libraries alternate, and the medians are
printed with our ratio to each peer, at each concurrency. ``--against`` checks REV
out in a temporary git worktree and runs the same code against it. taskiq is skipped
(said so) when missing.

``--alloc`` measures memory instead, with ``tracemalloc`` (one process per library,
``--alloc-tasks`` tasks, 10,000 by default): the blocks and bytes held per task while
it is in flight (sent, not yet run: the message, its delivery, its handle), kept per
task once it finished (its stored result, the handles dropped), and the peak of the
burst per task (sent, then all awaited: what the run needed at most).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _worktree import checkout

ROOT = Path(__file__).resolve().parent.parent


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


#: A measurement: given ``kiq()`` (sends one no-op task and returns its handle) and
#: ``wait(handle)`` (awaits its result), it returns its figures.
Measure = Callable[[Any, Any], Awaitable[dict[str, float]]]


async def _with_ours(concurrency: int, n_tasks: int, measure: Measure) -> dict[str, float]:
    import bus

    broker = bus.InMemoryBroker(
        concurrency=concurrency, max_queue=max(n_tasks, 1), max_stored_results=None
    )  # every result kept, as taskiq's max_stored_results=-1

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    async with broker:
        for _ in range(200):  # warm up
            await (await noop.kiq()).wait_result()
        return await measure(noop.kiq, lambda h: h.wait_result())


async def _with_taskiq(concurrency: int, n_tasks: int, measure: Measure) -> dict[str, float]:
    from taskiq import InMemoryBroker  # type: ignore[import-not-found]

    # Its default keeps only 100 results (older waiters would hang): keep them all.
    broker = InMemoryBroker(max_stored_results=-1, max_async_tasks=concurrency)

    @broker.task(task_name="noop")  # type: ignore[untyped-decorator]
    async def noop() -> None:
        return None

    await broker.startup()
    try:
        for _ in range(200):  # warm up
            await (await noop.kiq()).wait_result(check_interval=0)
        return await measure(noop.kiq, lambda h: h.wait_result(check_interval=0))
    finally:
        await broker.shutdown()


async def _speed(kiq: Any, wait: Any, n_tasks: int, n_rounds: int) -> dict[str, float]:
    """Throughput of a burst (all sent, then all awaited) and sequential round trips."""
    gc.collect()
    t0 = time.perf_counter()
    await _burst(kiq, wait, n_tasks)
    throughput = n_tasks / (time.perf_counter() - t0)
    lat = []
    for _ in range(n_rounds):
        t = time.perf_counter()
        await wait(await kiq())
        lat.append(time.perf_counter() - t)
    return {"throughput": throughput, "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)}


def _held() -> tuple[int, int]:
    """(blocks, bytes) traced now, the snapshot's own memory aside."""
    snapshot = tracemalloc.take_snapshot()
    traces = snapshot.traces
    return len(traces), sum(t.size for t in traces)


async def _burst(kiq: Any, wait: Any, n: int) -> None:
    handles = [await kiq() for _ in range(n)]
    for h in handles:
        await wait(h)


async def _alloc(kiq: Any, wait: Any, n: int, warm: int) -> dict[str, float]:
    """Per task: held in flight (sent, not run), kept once finished, and the peak of
    the burst. ``kiq()`` sends one no-op task and returns its handle (without yielding
    to the event loop: neither library's send does), ``wait(h)`` awaits its result.
    A first burst of ``warm`` tasks, traced, lets every runner run and park again, so
    what each keeps while it waits is in the baseline and not counted per task."""
    gc.collect()
    tracemalloc.start()
    try:
        await _burst(kiq, wait, warm)
        gc.collect()
        base = _held()
        tracemalloc.reset_peak()
        handles = [await kiq() for _ in range(n)]
        sent = _held()
        for h in handles:
            await wait(h)
        peak = tracemalloc.get_traced_memory()[1]
        del handles, h
        gc.collect()
        kept = _held()
    finally:
        tracemalloc.stop()
    return {
        "flight_blocks": (sent[0] - base[0]) / n,
        "flight_bytes": (sent[1] - base[1]) / n,
        "kept_blocks": (kept[0] - base[0]) / n,
        "kept_bytes": (kept[1] - base[1]) / n,
        "peak_bytes": (peak - base[1]) / n,
    }


def _child(which: str, n_tasks: int, n_rounds: int, concurrency: int, alloc: bool) -> None:
    """Run one measurement in this process and print it as JSON."""
    measure: Measure
    if alloc:
        measure = functools.partial(_alloc, n=n_tasks, warm=2 * concurrency)
    else:
        measure = functools.partial(_speed, n_tasks=n_tasks, n_rounds=n_rounds)
    if which == "taskiq":
        out = asyncio.run(_with_taskiq(concurrency, n_tasks, measure))
    else:
        import trio

        out = trio.run(_with_ours, concurrency, n_tasks, measure)
    print(json.dumps(out))


def _run(
    which: str, path: Path, n_tasks: int, n_rounds: int, concurrency: int, alloc: bool = False
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_inmemory as b; "
        "b._child(sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6] == '1')"
    )
    argv = [str(ROOT / "benchmarks"), which, str(n_tasks), str(n_rounds), str(concurrency)]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv, "1" if alloc else "0"],
        env=env,
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies are whole numbers >= 1: {text!r}")
    return values


def _print_alloc(runners: dict[str, tuple[str, Path]], n: int, concurrency: int) -> None:
    import trio

    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}, tracemalloc, {n} tasks, "
        f"concurrency {concurrency}, one process per library; per task:"
    )
    print(
        f"{'library':<14} {'in flight':>9} {'bytes':>7} {'kept':>6} {'bytes':>7} {'peak bytes':>11}"
    )
    for name, (which, path) in runners.items():
        m = _run(which, path, n, 0, concurrency, alloc=True)
        print(
            f"{name:<14} {m['flight_blocks']:>9.2f} {m['flight_bytes']:>7.0f} "
            f"{m['kept_blocks']:>6.2f} {m['kept_bytes']:>7.0f} {m['peak_bytes']:>11.0f}"
        )
    print("(blocks, then bytes; in flight: sent, not yet run; kept: finished, handles dropped)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=5, help="runs per library; medians shown")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision")
    ap.add_argument(
        "--concurrency",
        type=_concurrencies,
        default=[100, 1000],
        metavar="N[,N...]",
        help="the worker's concurrency (taskiq: max_async_tasks), each measured; default 100,1000",
    )
    ap.add_argument(
        "--alloc", action="store_true", help="measure allocations per task (tracemalloc) instead"
    )
    ap.add_argument("--alloc-tasks", type=int, default=10_000, help="tasks of the --alloc burst")
    args = ap.parse_args(argv)

    runners: dict[str, tuple[str, Path]] = {"trio-bus": ("ours", ROOT)}
    with contextlib.ExitStack() as stack:
        if args.against:
            rev, rev_dir = stack.enter_context(checkout(args.against))
            runners[f"rev {rev}"] = ("ours", rev_dir)
        try:
            import taskiq  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print("taskiq is not installed: pip install -e '.[bench]' to compare; measuring ours")
        else:
            runners["taskiq"] = ("taskiq", ROOT)
        for concurrency in args.concurrency:
            if args.alloc:
                _print_alloc(runners, args.alloc_tasks, concurrency)
            else:
                _measure(runners, args, concurrency)
    return 0


def _measure(runners: dict[str, tuple[str, Path]], args: Any, concurrency: int) -> None:
    """Throughput and round trips at one concurrency: the libraries alternate,
    ``args.repeat`` runs each; the medians and our ratios are printed."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(args.repeat):  # alternate libraries
        for name, (which, path) in runners.items():
            samples[name].append(_run(which, path, args.tasks, args.rounds, concurrency))
    med: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    import trio

    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}, concurrency {concurrency}, "
        f"{args.tasks} tasks, {args.rounds} round trips, median of {args.repeat}, "
        "one process per run"
    )
    print(f"{'library':<14} {'throughput/s':>14} {'rt p50 us':>10} {'rt p99 us':>10}")
    for name, m in med.items():
        print(
            f"{name:<14} {m['throughput']:>14,.0f} {m['p50'] * 1e6:>10.1f} {m['p99'] * 1e6:>10.1f}"
        )
    o = med["trio-bus"]
    for name, t in med.items():
        if name == "trio-bus":
            continue
        print(
            f"ratio trio-bus/{name} at concurrency {concurrency}: "
            f"throughput {o['throughput'] / t['throughput']:.2f}x, "
            f"p50 {t['p50'] / o['p50']:.2f}x faster"
        )
    print()


if __name__ == "__main__":
    raise SystemExit(main())
