"""Redis: this project against streaQ and taskiq + taskiq-redis, in one run.

    .venv/bin/pip install -e '.[redis,bench]'     # hiredis; streaQ, taskiq, matplotlib
    .venv/bin/python benchmarks/bench_redis.py [--tasks 20000] [--rounds 200] [--repeat 3]
        [--only trio-bus,streaq,taskiq] [--chart docs/benchmarks-redis.png] [--cpu N]
    .venv/bin/python benchmarks/bench_redis.py --against REV [--tasks ...] [--cpu N]

Starts its own redis-server (127.0.0.1, a free port, no persistence) and measures, on
the same no-op task, for each library:
  * enqueue, sequential: N ``await send()`` one after the other (tasks/s);
  * enqueue, 32 in flight: 32 concurrent senders, N in all (tasks/s);
  * enqueue, batched: each library's fastest documented bulk way (tasks/s);
  * processing: one worker process (concurrency 32) drains the N batched tasks; wall
    time from spawning the process to the last result stored (tasks/s);
  * round trip: sequential send-one-then-wait-for-its-result with the worker running,
    p50 and p99, with the library's normal result wait and (peers) a 1 ms polling one;
  * the worker process's peak RSS (VmHWM) after all of the above.
Repetitions alternate the libraries; medians, spread (min-max) and our ratio to each
peer are printed, and a chart is written. A missing peer is said so and skipped.
``--against REV`` measures ours at this checkout against ours at REV instead of the
peers: REV is checked out in a temporary git worktree, and each repetition runs this
script once on each checkout's code (``PYTHONPATH``, alternately, in fresh processes).
streaQ runs on Trio (its ``anyio_backend="trio"``), taskiq on asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A worker process (``--_worker LIB``) is measured (its peak RSS, its start-up): it
# imports its library and not the harness's own tools, whatever the library.
if "--_worker" not in sys.argv:
    import importlib.metadata
    import json
    import platform
    import statistics
    import subprocess
    import tempfile
    import traceback

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _redis_server import RedisServer, redis_server_binary, redis_server_version
    from _worktree import checkout

ROOT = Path(__file__).resolve().parent.parent
LIBS = ("trio-bus", "streaq", "taskiq")
BATCH = 500  # messages per kick_many call (ours)
# taskiq has no batch API: concurrent kiq() in asyncio.gather chunks. Chunks of 5 to 50
# all gave about the same here; 500 and more were slower (a connection per kiq).
GATHER = 50
CONCURRENCY = 32
INFLIGHT = 32  # concurrent senders in the "in flight" enqueue
WARMUP = 5  # untimed round trips before the timed ones
POLL = 0.010  # how often the harness checks for stored results (processing)
RT_TIMEOUT = 30.0

Keys = list[str]
RoundTrips = dict[str, list[float]]  # variant ("normal" / "poll") -> latencies, seconds


# ----------------------------------------------------------------- trio-bus


def _ours(url: str, queue: str) -> tuple[Any, Any]:
    from bus.redis import RedisBroker, RedisResultBackend

    broker = RedisBroker(url, queue=queue).with_result_backend(RedisResultBackend(url))

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    return broker, noop


async def _wire_enqueue(url: str, queue: str, n: int) -> float:
    """The wire under our sequential send: the ``XADD`` our ``kiq`` writes (same stream,
    ``MAXLEN``, field and message bytes), ``n`` times one after the other, on a bare Trio
    socket with hiredis, the caller writing and reading each reply itself (no client,
    no broker, no encoding). Seconds taken."""
    import hiredis
    import trio

    from bus.redis._url import RedisURL

    broker, noop = _ours(url, queue)
    message = noop.kicker().message()
    keys, maxlen = broker.keys, broker.settings.maxlen
    command = (
        b"XADD",
        keys.level_stream(message.priority),
        *((b"MAXLEN", b"~", b"%d" % maxlen) if maxlen is not None else ()),
        b"*",
        keys.data_field,
        broker.codec.encode_message(message),
    )
    where = RedisURL.parse(url)
    stream = await trio.open_tcp_stream(where.host, where.port)
    reader = hiredis.Reader()
    try:
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(n):
            await stream.send_all(hiredis.pack_command(command))
            reply = reader.gets()
            while reply is False:
                reader.feed(await stream.receive_some(65536))
                reply = reader.gets()
            if not isinstance(reply, bytes):
                raise RuntimeError(f"XADD replied {reply!r}")
        return time.perf_counter() - t0
    finally:
        await stream.aclose()


async def _ours_enqueue(url: str, queue: str, n: int, batched: bool | str) -> tuple[float, Keys]:
    import trio

    broker, noop = _ours(url, queue)
    async with broker:
        gc.collect()
        t0 = time.perf_counter()
        if batched == "inflight":
            ids: list[Any] = []

            async def sender(count: int) -> None:
                for _ in range(count):
                    ids.append((await noop.kiq()).task_id)

            async with trio.open_nursery() as nursery:
                for i in range(INFLIGHT):
                    nursery.start_soon(sender, n // INFLIGHT + (i < n % INFLIGHT))
        elif batched:
            kicker = noop.kicker()
            ids = []
            for i in range(0, n, BATCH):
                messages = [kicker.message() for _ in range(min(BATCH, n - i))]
                await broker.kick_many(messages)
                ids.extend(m.task_id for m in messages)
        else:
            ids = [(await noop.kiq()).task_id for _ in range(n)]
        elapsed = time.perf_counter() - t0
        keys = [broker.result_backend.result_key(t).decode() for t in ids]
    return elapsed, keys


async def _ours_round_trips(url: str, queue: str, rounds: int) -> RoundTrips:
    broker, noop = _ours(url, queue)
    lat: list[float] = []
    async with broker:
        for i in range(WARMUP + rounds):
            t = time.perf_counter()
            result = await (await noop.kiq()).wait_result(timeout=RT_TIMEOUT)
            if i >= WARMUP:
                lat.append(time.perf_counter() - t)
            if result.is_err:
                raise RuntimeError(f"the task failed: {result.error}")
    return {"normal": lat}


# Logging is configured for no library (the peers log through stdlib logging with no
# handler): ours, unconfigured, drops debug and info events and writes warnings to
# stderr, and does not import structlog until a warning needs it.


def _ours_worker(url: str, queue: str, concurrency: int) -> None:
    import trio

    broker, _ = _ours(url, queue)
    trio.run(broker.run_worker, concurrency)


def _run_ours(fn: Callable[..., Any], *args: Any) -> Any:
    import trio

    return trio.run(fn, *args)


# ------------------------------------------------------------------- streaQ


def _streaq(url: str, queue: str, concurrency: int = CONCURRENCY) -> tuple[Any, Any]:
    from streaq import Worker  # type: ignore[import-not-found]

    worker = Worker(redis_url=url, queue_name=queue, concurrency=concurrency, anyio_backend="trio")

    @worker.task(name="noop")  # type: ignore[untyped-decorator]
    async def noop() -> None:
        return None

    return worker, noop


async def _streaq_enqueue(url: str, queue: str, n: int, batched: bool | str) -> tuple[float, Keys]:
    import trio

    worker, noop = _streaq(url, queue)
    async with worker:
        gc.collect()
        t0 = time.perf_counter()
        if batched == "inflight":
            tasks: list[Any] = []

            async def sender(count: int) -> None:
                for _ in range(count):
                    tasks.append(await noop.enqueue())

            async with trio.open_nursery() as nursery:
                for i in range(INFLIGHT):
                    nursery.start_soon(sender, n // INFLIGHT + (i < n % INFLIGHT))
        elif batched:  # documented bulk way: enqueue_many (one pipeline; all N in one
            # call was faster here than chunks of 100-1000)
            tasks = [noop.enqueue() for _ in range(n)]
            await worker.enqueue_many(tasks)
        else:
            tasks = [await noop.enqueue() for _ in range(n)]
        elapsed = time.perf_counter() - t0
    return elapsed, [worker.results_key + t.id for t in tasks]


async def _streaq_round_trips(url: str, queue: str, rounds: int) -> RoundTrips:
    import trio

    worker, noop = _streaq(url, queue)
    out: RoundTrips = {"normal": [], "poll": []}
    async with worker:
        # normal: task.result() (a pub/sub subscription per call)
        for i in range(WARMUP + rounds):
            t = time.perf_counter()
            task = await noop.enqueue()
            res = await task.result(timeout=int(RT_TIMEOUT))
            if i >= WARMUP:
                out["normal"].append(time.perf_counter() - t)
            if not res.success:
                raise RuntimeError(f"the task failed: {res}")
        # polling: GET the task's result key every 1 ms, then decode it
        for i in range(WARMUP + rounds):
            t = time.perf_counter()
            task = await noop.enqueue()
            key = worker.results_key + task.id
            with trio.fail_after(RT_TIMEOUT):
                while (raw := await worker.redis.get(key)) is None:  # noqa: ASYNC110
                    await trio.sleep(0.001)
            data = await worker.deserialize(raw)
            if i >= WARMUP:
                out["poll"].append(time.perf_counter() - t)
            if not data["s"]:
                raise RuntimeError(f"the task failed: {data}")
    return out


def _streaq_worker(url: str, queue: str, concurrency: int) -> None:
    worker, _ = _streaq(url, queue, concurrency)
    worker.run_sync()


# ------------------------------------------------------------------- taskiq


def _taskiq(url: str, queue: str) -> tuple[Any, Any]:
    from taskiq_redis import (  # type: ignore[import-not-found]
        RedisAsyncResultBackend,
        RedisStreamBroker,
    )

    broker = RedisStreamBroker(url, queue_name=queue).with_result_backend(
        RedisAsyncResultBackend(url)
    )

    @broker.task(task_name="noop")  # type: ignore[untyped-decorator]
    async def noop() -> None:
        return None

    return broker, noop


async def _taskiq_enqueue(url: str, queue: str, n: int, batched: bool | str) -> tuple[float, Keys]:
    broker, noop = _taskiq(url, queue)
    await broker.startup()  # creates the consumer group ("$") before anything is sent
    try:
        gc.collect()
        t0 = time.perf_counter()
        if batched == "inflight":
            tasks: list[Any] = []

            async def sender(count: int) -> None:
                for _ in range(count):
                    tasks.append(await noop.kiq())

            await asyncio.gather(
                *(sender(n // INFLIGHT + (i < n % INFLIGHT)) for i in range(INFLIGHT))
            )
        elif batched:  # no batch API: concurrent kiq() with asyncio.gather, in chunks
            tasks = []
            for i in range(0, n, GATHER):
                chunk = min(GATHER, n - i)
                tasks.extend(await asyncio.gather(*(noop.kiq() for _ in range(chunk))))
        else:
            tasks = [await noop.kiq() for _ in range(n)]
        elapsed = time.perf_counter() - t0
    finally:
        await broker.shutdown()
    return elapsed, [t.task_id for t in tasks]


async def _taskiq_round_trips(url: str, queue: str, rounds: int) -> RoundTrips:
    broker, noop = _taskiq(url, queue)
    out: RoundTrips = {"normal": [], "poll": []}
    await broker.startup()
    try:
        for variant, kwargs in (("normal", {}), ("poll", {"check_interval": 0.001})):
            for i in range(WARMUP + rounds):
                t = time.perf_counter()
                res = await (await noop.kiq()).wait_result(timeout=RT_TIMEOUT, **kwargs)
                if i >= WARMUP:
                    out[variant].append(time.perf_counter() - t)
                if res.is_err:
                    raise RuntimeError(f"the task failed: {res.error}")
    finally:
        await broker.shutdown()
    return out


def _run_asyncio(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.run(fn(*args))


def _taskiq_worker(url: str, queue: str, concurrency: int) -> None:
    from taskiq.api import run_receiver_task  # type: ignore[import-not-found]

    broker, _ = _taskiq(url, queue)
    # The programmatic form of `taskiq worker ... --workers 1 --max-async-tasks 32`
    # (the CLI forks worker processes of its own; this keeps one process to measure).
    asyncio.run(run_receiver_task(broker, max_async_tasks=concurrency, run_startup=True))


# ---------------------------------------------------------------- the table


class Lib:
    def __init__(
        self,
        name: str,
        modules: tuple[str, ...],
        dists: tuple[str, ...],
        run: Callable[..., Any],
        enqueue: Callable[..., Any],
        round_trips: Callable[..., Any],
        worker: Callable[[str, str, int], None],
        normal_wait: str,
        poll_wait: str | None,
        batch_way: str,
    ) -> None:
        self.name, self.modules, self.dists = name, modules, dists
        self.run, self.enqueue, self.round_trips, self.worker = run, enqueue, round_trips, worker
        self.normal_wait, self.poll_wait, self.batch_way = normal_wait, poll_wait, batch_way

    def missing(self) -> str | None:
        import importlib

        for m in self.modules:
            try:
                importlib.import_module(m)
            except ImportError as exc:
                return f"{m} cannot be imported ({exc})"
        return None

    def versions(self) -> str:
        parts = []
        for d in self.dists:
            try:
                parts.append(f"{d} {importlib.metadata.version(d)}")
            except importlib.metadata.PackageNotFoundError:
                parts.append(f"{d} ?")
        return ", ".join(parts)


LIBRARIES: dict[str, Lib] = {
    "trio-bus": Lib(
        "trio-bus",
        ("trio", "hiredis", "bus.redis"),
        ("trio-bus", "hiredis", "trio"),
        _run_ours,
        _ours_enqueue,
        _ours_round_trips,
        _ours_worker,
        "wait_result() (pushed)",
        None,
        f"broker.kick_many() per {BATCH} messages",
    ),
    "streaq": Lib(
        "streaq",
        ("streaq",),
        ("streaq", "coredis"),
        _run_ours,  # on Trio, like ours
        _streaq_enqueue,
        _streaq_round_trips,
        _streaq_worker,
        "task.result() (pub/sub per call)",
        "GET result key every 1 ms",
        "worker.enqueue_many(all N tasks)",
    ),
    "taskiq": Lib(
        "taskiq",
        ("taskiq", "taskiq_redis"),
        ("taskiq", "taskiq-redis", "redis"),
        _run_asyncio,
        _taskiq_enqueue,
        _taskiq_round_trips,
        _taskiq_worker,
        "wait_result() (polls every 0.2 s)",
        "wait_result(check_interval=0.001)",
        f"asyncio.gather(kiq() x {GATHER}) per chunk",
    ),
}
WORKERS: dict[str, Callable[[str, str, int], None]] = {
    n: lib.worker for n, lib in LIBRARIES.items()
}


# ------------------------------------------------------------------ harness


class Harness:
    """Drives one library through all phases against the private server."""

    def __init__(self, server: RedisServer, args: argparse.Namespace) -> None:
        import redis  # redis-py (a taskiq-redis dependency): the harness's own client

        self.server = server
        self.args = args
        self.redis = redis.Redis(host="127.0.0.1", port=server.port)

    def flush(self) -> None:
        self.redis.flushall()

    def spawn_worker(self, lib: str, queue: str, log: Any) -> subprocess.Popen[bytes]:
        # The worker imports this script as a module, compiled once (_WORKER_MAIN),
        # rather than running it as __main__: Python compiles a __main__ script at
        # every start, and that compiler's memory would count in each library's peak
        # RSS (about 2 MB here).
        cmd = [
            sys.executable,
            "-c",
            _WORKER_MAIN,
            "--_worker",
            lib,
            "--queue",
            queue,
            "--port",
            str(self.server.port),
            "--concurrency",
            str(CONCURRENCY),
        ]
        # This tree last on the path: after a checkout of --against's PYTHONPATH.
        paths = [*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait_results(self, keys: Keys, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Return when every key exists: every POLL seconds, EXISTS on the next 1000 keys
        not yet seen (a chunk is dropped once all of it exists)."""
        deadline = time.monotonic() + timeout
        i = 0
        while i < len(keys):
            chunk = keys[i : i + 1000]
            if self.redis.exists(*chunk) == len(chunk):
                i += len(chunk)
                continue
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(keys) - i} results missing after {timeout:.0f} s")
            time.sleep(POLL)

    def measure(self, lib: Lib) -> dict[str, float]:
        n, rounds = self.args.tasks, self.args.rounds
        url = self.server.url
        queue = f"bench-{lib.name}"
        out: dict[str, float] = {}

        if lib.name == "trio-bus":
            # The floor of a sequential send, in the same repetition (see _wire_enqueue).
            self.flush()
            out["enq_wire"] = n / lib.run(_wire_enqueue, url, queue, n)
        self.flush()
        elapsed, _ = lib.run(lib.enqueue, url, queue, n, False)
        out["enq_seq"] = n / elapsed
        self.flush()
        elapsed, _ = lib.run(lib.enqueue, url, queue, n, "inflight")
        out["enq_inflight"] = n / elapsed
        self.flush()
        elapsed, keys = lib.run(lib.enqueue, url, queue, n, True)
        out["enq_batch"] = n / elapsed
        if len(keys) != n:
            raise RuntimeError(f"{len(keys)} tasks sent, not {n}")

        with tempfile.TemporaryFile() as log:
            gc.collect()
            t0 = time.perf_counter()
            proc = self.spawn_worker(lib.name, queue, log)
            try:
                try:
                    self.wait_results(keys, proc, timeout=max(120.0, n / 50))
                    out["proc"] = n / (time.perf_counter() - t0)
                    rt = lib.run(lib.round_trips, url, queue, rounds)
                    rss = _peak_rss(proc.pid)
                except BaseException:
                    _stop(proc)
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    if tail.strip():
                        print(f"--- {lib.name} worker output (tail) ---\n{tail}---", flush=True)
                    raise
            finally:
                _stop(proc)
        for variant, lat in rt.items():
            out[f"rt_{variant}_p50"] = _pct(lat, 0.50)
            out[f"rt_{variant}_p99"] = _pct(lat, 0.99)
        if rss is not None:
            out["rss"] = rss
        self.flush()
        return out


def _peak_rss(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), MiB; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


# ------------------------------------------------------------------ report

METRICS: list[tuple[str, str, float, bool]] = [
    # key, label, scale, higher is better
    ("enq_wire", "the wire: bare socket, same XADD (/s)", 1, True),
    ("enq_seq", "enqueue, sequential (tasks/s)", 1, True),
    ("enq_inflight", f"enqueue, {INFLIGHT} in flight (tasks/s)", 1, True),
    ("enq_batch", "enqueue, batched (tasks/s)", 1, True),
    ("proc", "processing, 1 worker process (tasks/s)", 1, True),
    ("rt_normal_p50", "round trip p50, normal wait (ms)", 1e3, False),
    ("rt_normal_p99", "round trip p99, normal wait (ms)", 1e3, False),
    ("rt_poll_p50", "round trip p50, polling 1 ms (ms)", 1e3, False),
    ("rt_poll_p99", "round trip p99, polling 1 ms (ms)", 1e3, False),
    ("rss", "worker peak RSS (MiB)", 1, False),
]


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _summary(samples: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for key, _, scale, _ in METRICS:
        vals = [s[key] * scale for s in samples if key in s]
        if vals:
            out[key] = (statistics.median(vals), min(vals), max(vals))
    return out


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), load average {load} at start"


def report(
    summ: dict[str, dict[str, tuple[float, float, float]]],
    args: argparse.Namespace,
    server_version: str,
) -> list[str]:
    names = list(summ)
    lines = []
    pinned = f", all pinned to cpu {args.cpu}" if args.cpu is not None else ", not pinned"
    lines.append(
        f"python {platform.python_version()}, redis-server {server_version}, {_machine()}{pinned}"
    )
    for name in names:
        lines.append(f"  {name}: {LIBRARIES[name].versions()}")
    lines.append(
        f"{args.tasks} tasks, {args.rounds} round trips, worker concurrency {CONCURRENCY}, "
        f"median of {args.repeat} [min-max]"
    )
    width = 26
    lines.append(f"{'metric':<40}" + "".join(f"{n:>{width}}" for n in names))
    for key, label, _, _ in METRICS:
        if not any(key in summ[n] for n in names):
            continue
        row = f"{label:<40}"
        for n in names:
            if key in summ[n]:
                med, lo, hi = summ[n][key]
                cell = f"{_fmt(med)} [{_fmt(lo)}-{_fmt(hi)}]"
            else:
                cell = "-"
            row += f"{cell:>{width}}"
        lines.append(row)
    lines.append("ways used:")
    for n in names:
        lib = LIBRARIES[n]
        poll = f"; polling: {lib.poll_wait}" if lib.poll_wait else ""
        lines.append(f"  {n}: batch: {lib.batch_way}; wait: {lib.normal_wait}{poll}")
    if "trio-bus" in summ:
        o = summ["trio-bus"]
        for n in names:
            if n == "trio-bus":
                continue
            p = summ[n]
            parts = []
            for key, short in (
                ("enq_seq", "enqueue seq"),
                ("enq_inflight", f"{INFLIGHT} in flight"),
                ("enq_batch", "batch"),
                ("proc", "proc"),
            ):
                if key in o and key in p:
                    parts.append(f"{short} {o[key][0] / p[key][0]:.2f}x")
            if "rt_normal_p50" in o:
                for key, short in (("rt_normal_p50", "rt p50"), ("rt_poll_p50", "rt p50 vs poll")):
                    if key in p:
                        parts.append(f"{short} {p[key][0] / o['rt_normal_p50'][0]:.1f}x faster")
            if "rss" in o and "rss" in p:
                parts.append(f"RSS {o['rss'][0] / p['rss'][0]:.2f}x")
            lines.append(f"ratio trio-bus/{n}: " + ", ".join(parts))
        lines.extend(_targets(summ))
    return lines


def _targets(summ: dict[str, dict[str, tuple[float, float, float]]]) -> list[str]:
    o = summ["trio-bus"]
    peers = {n: s for n, s in summ.items() if n != "trio-bus"}
    out = ["targets (issue #10):"]

    def best(key: str, higher: bool) -> tuple[str, float] | None:
        cands = [(n, s[key][0]) for n, s in peers.items() if key in s]
        if not cands:
            return None
        return (max if higher else min)(cands, key=lambda c: c[1])

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    for key, what, factor in (
        ("enq_seq", "sequential kiq >= 2x the best peer", 2),
        ("enq_inflight", f"{INFLIGHT} kiq in flight >= 3x the best peer", 3),
        ("proc", "processing, one worker process, >= 3x the best peer", 3),
        ("enq_batch", "batched enqueue >= 2x the best peer's batch", 2),
    ):
        b = best(key, True)
        if key not in o:
            out.append(f"  {what}: not measured")
        elif b is None:
            out.append(f"  {what}: no peer measured")
        else:
            r = o[key][0] / b[1]
            out.append(f"  {what}: {verdict(r >= factor)} ({r:.2f}x {b[0]})")
    if "enq_seq" in o:
        v = o["enq_seq"][0]
        out.append(f"  sequential kiq >= 15,000/s (the goal): {verdict(v >= 15000)} ({v:,.0f}/s)")
    if "rt_normal_p50" in o:
        p50, p99 = o["rt_normal_p50"][0], o["rt_normal_p99"][0]
        out.append(f"  round-trip p50 < 1 ms, results pushed: {verdict(p50 < 1)} ({p50:.2f} ms)")
        out.append(f"  round-trip p99 < 2 ms: {verdict(p99 < 2)} ({p99:.2f} ms)")
    b = best("rss", False)
    if "rss" in o and b is not None:
        ok = o["rss"][0] <= b[1]
        out.append(
            f"  worker RSS <= lightest peer's: {verdict(ok)} "
            f"({o['rss'][0]:.1f} MiB vs {b[0]} {b[1]:.1f} MiB)"
        )
    b = best("enq_seq", True)
    if "enq_seq" in o and "enq_wire" in o and b is not None:
        out.append("the wire (issue #22):")
        seq, wire = o["enq_seq"][0], o["enq_wire"][0]
        out.append(
            f"  sequential send at the wire: ours {seq / wire:.2f}x the bare socket's "
            f"{wire:,.0f}/s; 3x the best peer ({b[0]}) would be {3 * b[1]:,.0f}/s, "
            f"{3 * b[1] / wire:.2f}x the wire"
        )
    return out


def chart(summ: dict[str, dict[str, tuple[float, float, float]]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart drawn")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("enq_seq", "enqueue, sequential\ntasks/s (higher is better)", None),
        ("enq_inflight", f"enqueue, {INFLIGHT} in flight\ntasks/s (higher is better)", None),
        ("enq_batch", "enqueue, batched\ntasks/s (higher is better)", None),
        ("proc", "processing, 1 worker process\ntasks/s (higher is better)", None),
        ("rt_normal_p50", "round trip p50\nms, log scale (lower is better)", "rt_poll_p50"),
        ("rss", "worker peak RSS\nMiB (lower is better)", None),
    ]
    colors = {"trio-bus": "#2b6cb0", "streaq": "#dd6b20", "taskiq": "#718096"}
    names = list(summ)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2))
    for ax, (key, label, alt) in zip(axes, panels, strict=True):
        xs, meds, errs, cols, hatches, ticks = [], [], [[], []], [], [], []
        for n in names:
            for k, suffix, hatch in ((key, "", ""), (alt, "\npoll 1 ms", "//")):
                if k is None or k not in summ[n]:
                    continue
                med, lo, hi = summ[n][k]
                xs.append(len(xs))
                meds.append(med)
                errs[0].append(med - lo)
                errs[1].append(hi - med)
                cols.append(colors.get(n, "#999999"))
                hatches.append(hatch)
                ticks.append(n + suffix)
        bars = ax.bar(xs, meds, yerr=errs, color=cols, capsize=3)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
            if hatch:
                bar.set_alpha(0.6)
        for x, m, up in zip(xs, meds, errs[1], strict=True):
            ax.annotate(
                _fmt(m),
                (x, m + up),  # above the whisker
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        if key == "rt_normal_p50":
            ax.set_yscale("log")
        ax.set_xticks(xs, ticks, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- main


#: What a worker process runs (``python -c``): this script imported as a module.
# ``-c`` puts the working directory first on sys.path: replaced by this script's
# directory, so that the worker imports ``bus`` from its ``PYTHONPATH`` (the checkout
# measured by ``--against``) or the installed project, never from the cwd (this tree).
_WORKER_MAIN = (
    "import sys; "
    f"sys.path[0] = {str(Path(__file__).resolve().parent)!r}; "
    "import bench_redis; "
    "raise SystemExit(bench_redis.main(sys.argv[1:]))"
)


def _compile_ours() -> None:
    """Compile the ``bus`` and ``actors`` the workers import, as pip compiles a package
    it installs (the peers were): without it, a fresh checkout, or any tree under
    ``PYTHONDONTWRITEBYTECODE``, compiles them again at every worker start (about
    40 ms here), counted in the processing rate."""
    import compileall
    import importlib.util

    for package in ("bus", "actors"):
        spec = importlib.util.find_spec(package)
        for where in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(where, quiet=1)


def _worker_main(args: argparse.Namespace) -> int:
    url = f"redis://127.0.0.1:{args.port}/0"
    with contextlib.suppress(KeyboardInterrupt):
        WORKERS[args._worker](url, args.queue, args.concurrency)
    return 0


def _run_checkout(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """One repetition of ours on the code of the checkout at ``path``, in a fresh process
    of this script (its worker process inherits the ``PYTHONPATH``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "trio-bus", "--_samples"]
    cmd += ["--repeat", "1", "--tasks", str(args.tasks), "--rounds", str(args.rounds)]
    if args.cpu is not None:
        cmd += ["--cpu", str(args.cpu)]
    paths = [str(path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    sample: dict[str, float] = json.loads(done.stdout.splitlines()[-1])["trio-bus"][0]
    return sample


def _against(args: argparse.Namespace) -> int:
    """Ours at this checkout ("trio-bus") against ours at ``--against REV`` ("rev SHA")."""
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    with checkout(args.against) as (rev, rev_dir):
        name = f"rev {rev}"
        samples: dict[str, list[dict[str, float]]] = {"trio-bus": [], name: []}
        for rep in range(args.repeat):
            order = [("trio-bus", ROOT), (name, rev_dir)][:: -1 if rep % 2 else 1]
            for lib, path in order:
                t = time.perf_counter()
                print(f"[{rep + 1}/{args.repeat}] {lib} ...", end=" ", flush=True)
                samples[lib].append(_run_checkout(path, args))
                print(f"{time.perf_counter() - t:.1f} s", flush=True)
    LIBRARIES[name] = LIBRARIES["trio-bus"]  # the same harness code, the other checkout's bus
    lines = report({n: _summary(s) for n, s in samples.items()}, args, redis_server_version(binary))
    if "targets (issue #10):" in lines:  # against peers only
        lines = lines[: lines.index("targets (issue #10):")]
    print("\n" + "\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="runs per library; medians shown")
    ap.add_argument("--only", default=",".join(LIBS), help="comma-separated: " + ",".join(LIBS))
    ap.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks-redis.png"))
    ap.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="pin everything (this process, redis-server, the worker processes) to this core",
    )
    ap.add_argument(
        "--against", metavar="REV", help="ours at this git revision instead of the peers"
    )
    ap.add_argument("--_samples", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_worker", choices=LIBS, help=argparse.SUPPRESS)
    ap.add_argument("--queue", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker_main(args)
    import py_compile

    py_compile.compile(__file__)  # the workers import this script: compiled once, now
    _compile_ours()
    if args.against:
        return _against(args)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # redis-server and the workers inherit it

    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in LIBRARIES]
    if unknown:
        ap.error(f"unknown library {', '.join(unknown)}; choose from {', '.join(LIBS)}")
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    libs: list[Lib] = []
    for name in wanted:
        why = LIBRARIES[name].missing()
        if why is None:
            libs.append(LIBRARIES[name])
        elif name == "trio-bus":
            print(f"trio-bus FAILED to import: {why}; measuring the peers", flush=True)
        else:
            print(f"{name} is not installed ({why}): pip install -e '.[bench]'; skipping it")
    if not libs:
        print("no library to measure")
        return 1

    samples: dict[str, list[dict[str, float]]] = {lib.name: [] for lib in libs}
    failed: dict[str, str] = {}
    server = RedisServer(binary)
    server.start()
    try:
        harness = Harness(server, args)
        for rep in range(args.repeat):
            order = libs[rep % len(libs) :] + libs[: rep % len(libs)]  # alternate
            for lib in order:
                t = time.perf_counter()
                print(f"[{rep + 1}/{args.repeat}] {lib.name} ...", end=" ", flush=True)
                try:
                    samples[lib.name].append(harness.measure(lib))
                except Exception as exc:
                    print("FAILED")
                    traceback.print_exc()
                    failed.setdefault(lib.name, f"{type(exc).__name__}: {exc}")
                    harness.flush()
                else:
                    print(f"{time.perf_counter() - t:.1f} s", flush=True)
    finally:
        server.stop()

    if args._samples:  # for --against: the one repetition's figures, read by the parent
        print(json.dumps(samples))
        return 1 if failed else 0
    summ = {n: _summary(s) for n, s in samples.items() if s}
    print()
    lines = report(summ, args, redis_server_version(binary))
    for name, why in failed.items():
        lines.append(f"FAILED: {name}: {why}")
    print("\n".join(lines))
    if summ and args.chart:
        title = (
            f"Redis task queues, {args.tasks} no-op tasks, median of {args.repeat} "
            f"(whiskers: min-max); python {platform.python_version()}, {os.cpu_count()} cores"
        )
        chart(summ, Path(args.chart), title)
        print(f"chart: {args.chart}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
