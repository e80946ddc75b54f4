"""In-memory broker: this project against taskiq's InMemoryBroker (and, with
``--against REV``, against an earlier commit of this project), in one run.

    .venv/bin/pip install -e '.[bench]'     # taskiq, benchmark-only
    .venv/bin/python benchmarks/bench_inmemory.py [--tasks 20000] [--rounds 2000]
    .venv/bin/python benchmarks/bench_inmemory.py --against HEAD~1

Measures, on the same no-op task:
  * throughput: N tasks sent, then all results awaited (tasks/s);
  * round trip: sequential kiq -> wait_result, p50 and p99 (microseconds).
Each library runs in a fresh process, the libraries alternate, and the medians are
printed with our ratio to each peer. ``--against`` checks REV out in a temporary git
worktree and runs the same code against it. taskiq is skipped (said so) when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def _ours(n_tasks: int, n_rounds: int) -> dict[str, float]:
    import bus

    broker = bus.InMemoryBroker(
        concurrency=100, max_queue=max(n_tasks, 1), max_stored_results=None
    )  # every result kept, as taskiq's max_stored_results=-1

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


def _child(which: str, n_tasks: int, n_rounds: int) -> None:
    """Run one measurement in this process and print it as JSON."""
    if which == "taskiq":
        out = asyncio.run(_taskiq(n_tasks, n_rounds))
    else:
        import trio

        out = trio.run(_ours, n_tasks, n_rounds)
    print(json.dumps(out))


def _run(which: str, path: Path, n_tasks: int, n_rounds: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import bench_inmemory as b; b._child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks"), which, str(n_tasks), str(n_rounds)],
        env=env,
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=5, help="runs per library; medians shown")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision")
    args = ap.parse_args(argv)

    runners: dict[str, tuple[str, Path]] = {"trio-bus": ("ours", ROOT)}
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.against:
        tmp = tempfile.TemporaryDirectory(prefix="bench-rev-")
        rev_dir = Path(tmp.name) / "rev"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(rev_dir), args.against],
            check=True,
            capture_output=True,
        )
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", args.against],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        runners[f"rev {rev}"] = ("ours", rev_dir)
    try:
        import taskiq  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("taskiq is not installed: pip install -e '.[bench]' to compare; measuring ours")
    else:
        runners["taskiq"] = ("taskiq", ROOT)

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    try:
        for _ in range(args.repeat):  # alternate libraries
            for name, (which, path) in runners.items():
                samples[name].append(_run(which, path, args.tasks, args.rounds))
    finally:
        if tmp is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(rev_dir)],
                check=False,
                capture_output=True,
            )
            tmp.cleanup()

    med: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    import trio

    print(
        f"python {sys.version.split()[0]}, trio {trio.__version__}, {args.tasks} tasks, "
        f"{args.rounds} round trips, median of {args.repeat}, one process per run"
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
            f"ratio trio-bus/{name}: throughput {o['throughput'] / t['throughput']:.2f}x, "
            f"p50 {t['p50'] / o['p50']:.2f}x faster"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
