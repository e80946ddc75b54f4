"""Where the Redis round trip's time goes: a timeline of one typical round trip.

    .venv/bin/python benchmarks/trace_round_trip.py [--rounds 2000] [--top 30]

Starts its own redis-server, a worker process (``broker.run_worker(32)``, as
``bench_redis.py`` runs it) and, in this process, a producer that sends a no-op task
and waits for its result, ``--rounds`` times. Both processes record, on the one
monotonic clock of the machine: every socket read and write of the bus's Redis client
(its ``os.read`` / ``os.write`` calls, wrapped), every Trio task step (a
``trio.abc.Instrument``, with the task's name) and every wait for I/O (``I0``: a poll
with runnable tasks, ``I1``: a blocking one). It then prints, for the sequence of
events that occurs most often, the median time of each event from the moment the
producer's ``kiq`` started: the producer's part, then the worker's. ``R`` is a socket
read, ``W n`` a write of n bytes, ``S`` a task's step.

A probe, not a benchmark: the instrument and the wrappers cost time themselves (the
round trip is a few per cent slower traced), so read the gaps, not the total. The floor of
the same commands is ``bench_floor.py``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_redis
from _redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20
QUEUE = "trace"
Event = tuple[int, str, Any]  # (monotonic ns, kind, detail)


def _record() -> tuple[list[Event], Any]:
    """Start recording this process's events: the client's socket calls from now on;
    the task steps and I/O waits through the instrument returned (run Trio with it).
    Returns the list the events are appended to, and the instrument."""
    import trio

    import bus.redis._client as client

    events: list[Event] = []
    now = time.monotonic_ns
    real = client.os

    class Os:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def read(fd: int, n: int) -> bytes:
            data = real.read(fd, n)
            events.append((now(), "R", len(data)))
            return data

        @staticmethod
        def write(fd: int, data: Any) -> int:
            events.append((now(), "W", len(data)))
            return real.write(fd, data)

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            events.append((now(), "S", ".".join(task.name.rsplit(".", 2)[-2:])))

        def before_io_wait(self, timeout: float) -> None:
            events.append((now(), "I1" if timeout > 0 else "I0", ""))

    client.os = Os()  # type: ignore[assignment]
    return events, Steps()


def _worker(port: int, out: str) -> None:
    """The worker process: run until SIGUSR1, then write the events to ``out``."""
    import trio

    events, steps = _record()
    broker, _ = bench_redis._ours(f"redis://127.0.0.1:{port}/0", QUEUE)

    def dump(*_: Any) -> None:
        Path(out).write_text(json.dumps(events))
        os._exit(0)  # a probe's worker: stopped where it stands

    signal.signal(signal.SIGUSR1, dump)
    trio.run(broker.run_worker, bench_redis.CONCURRENCY, instruments=[steps])


def _producer(port: int, rounds: int) -> tuple[list[Event], list[tuple[int, int]]]:
    """The round trips, recorded: the events and each round's (start, end)."""
    import trio

    events, steps = _record()
    broker, noop = bench_redis._ours(f"redis://127.0.0.1:{port}/0", QUEUE)
    spans: list[tuple[int, int]] = []

    async def main() -> None:
        async with broker:
            for i in range(WARMUP + rounds):
                t = time.monotonic_ns()
                await (await noop.kiq()).wait_result(timeout=30)
                if i >= WARMUP:
                    spans.append((t, time.monotonic_ns()))

    trio.run(main, instruments=[steps])
    return events, spans


def _timeline(events: list[Event], spans: list[tuple[int, int]]) -> tuple[int, list[str]]:
    """The most common sequence of ``events`` within a round trip, each event with its
    median time from the round trip's start (us), and how many rounds had it."""
    times = [e[0] for e in events]
    groups: dict[tuple[tuple[str, Any], ...], list[list[float]]] = collections.defaultdict(list)
    for start, end in spans:
        inside = events[bisect.bisect_left(times, start) : bisect.bisect_left(times, end)]
        key = tuple((kind, detail if kind != "R" else "") for _, kind, detail in inside)
        groups[key].append([(t - start) / 1e3 for t, _, _ in inside] + [(end - start) / 1e3])
    key, rows = max(groups.items(), key=lambda kv: len(kv[1]))
    lines = []
    previous = 0.0
    for j, (kind, detail) in enumerate([*key, ("done", "")]):
        at = statistics.median(row[j] for row in rows)
        lines.append(f"  {at:8.1f} us  +{at - previous:6.1f}  {kind} {detail}".rstrip())
        previous = at
    return len(rows), lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if args._worker:
        _worker(args.port, args.out)
        return 0
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "worker.json")
        cmd = [sys.executable, __file__, "--_worker", "--port", str(server.port), "--out", out]
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            events, spans = _producer(server.port, args.rounds)
        finally:
            worker.send_signal(signal.SIGUSR1)
            worker.wait(timeout=30)
        worker_events: list[Event] = [tuple(e) for e in json.loads(Path(out).read_text())]
    latencies = sorted(b - a for a, b in spans)
    print(f"{args.rounds} round trips, p50 {latencies[len(latencies) // 2] / 1e3:.0f} us (traced)")
    for who, evs in (("producer", events), ("worker", worker_events)):
        n, lines = _timeline(evs, spans)
        print(f"{who}: the most common sequence ({n} of {len(spans)} rounds), median times:")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
