"""What a subscribed process pays for the result announcements it receives.

Every result a worker stores is announced on the result channel, and every process
waiting for results is subscribed to it: each one receives the announcements of all
tasks, most of them tasks it does not wait for. This measures the result store's
handler (``RedisResultStoreActor.announced``, called as the subscription's reader
calls it) on two payloads, in a process per tree and run, no Redis needed:

  * ``others``: a batch of 64 announcements (a worker's joined ``PUBLISH``) of tasks
    this process does not wait for, while it waits for one other task and has sent
    some not yet announced (so the handler has something to look for);
  * ``own``: the announcement of the one result this process waits for (the waiter
    registered again before each call): looked up, opened, decoded, woken.

Prints the CPU time per announcement, the median of ``--repeat`` runs; with
``--against REV``, the same at that revision (a temporary worktree), alternating::

    .venv/bin/python benchmarks/bench_announcements.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _worktree import checkout

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


def _child(calls: int) -> None:
    """In a process importing the tree under test: time both payloads."""
    from bus import TaskID, TaskResult, TaskStatus
    from bus._protocol import Watcher
    from bus.redis import RedisResultBackend
    from bus.redis._logic import join_announcements
    from bus.redis._pool import Announcement
    from bus.redis._results import RedisResultStoreActor

    backend = RedisResultBackend("redis://127.0.0.1:1/0")
    store = RedisResultStoreActor(backend, conn_ref=None)  # type: ignore[arg-type]
    handle = RedisResultStoreActor.announced

    def announcement(tid: Any) -> bytes:
        data = backend.codec.encode_result(TaskResult(tid, TaskStatus.SUCCESS, 1))
        return backend.announcement(tid, data)

    channel = backend.channel
    others = Announcement(
        channel, join_announcements([announcement(TaskID.new()) for _ in range(BATCH)])
    )
    mine = TaskID.new()
    own = Announcement(channel, announcement(mine))
    store.watchers[TaskID.new()] = [Watcher()]  # a task of ours not in the batch
    for _ in range(8):
        store._sent[TaskID.new()] = None  # sent, not announced yet

    out: dict[str, float] = {}
    t0 = time.process_time()
    for _ in range(calls):
        handle(store, others)
    out["others"] = (time.process_time() - t0) / (calls * BATCH) * 1e6
    t0 = time.process_time()
    for _ in range(calls * 8):
        store.watchers[mine] = [Watcher()]
        handle(store, own)
    out["own"] = (time.process_time() - t0) / (calls * 8) * 1e6
    print(json.dumps(out))


def _run(path: Path, calls: int) -> dict[str, float]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_announcements as b; "
        "b._child(int(sys.argv[2]))"
    )
    env = dict(os.environ, PYTHONPATH=str(path))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "benchmarks"), str(calls)],
        env=env,
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="batches handled a run")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each tree")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeat < 1:
        ap.error("--calls and --repeat must be at least 1")
    with contextlib.ExitStack() as stack:
        trees: dict[str, Path] = {"this tree": ROOT}
        if args.against:
            rev, path = stack.enter_context(checkout(args.against))
            trees[f"rev {rev}"] = path
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for i in range(args.repeat):
            for name, path in trees.items() if i % 2 == 0 else reversed(trees.items()):
                runs[name].append(_run(path, args.calls))
    print(
        f"python {sys.version.split()[0]}, a batch of {BATCH} announcements, "
        f"{args.calls} batches a run, median of {args.repeat} runs; CPU us an announcement"
    )
    print(f"{'tree':<14} {'others':>8} {'own':>8}")
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("others", "own")}
        for name, rs in runs.items()
    }
    for name, m in medians.items():
        print(f"{name:<14} {m['others']:>8.2f} {m['own']:>8.2f}")
    if len(medians) == 2:
        (a, ma), (b, mb) = medians.items()
        print(
            f"ratio {a} / {b}: others {ma['others'] / mb['others']:.2f}x, "
            f"own {ma['own'] / mb['own']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
