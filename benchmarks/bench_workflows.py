"""Workflows on Redis: this project against Celery 5 (Redis broker and result backend),
and against plain tasks of ours, in one run.

    .venv/bin/pip install -e '.[redis,bench]'      # hiredis; celery[redis]
    .venv/bin/python benchmarks/bench_workflows.py [--chord 1000] [--chain 100]
        [--repeat 5] [--only trio-bus,celery] [--celery-pool prefork] [--celery-concurrency 2]

Starts its own redis-server (127.0.0.1, a free port, no persistence) and, per library,
one worker process (started, then warmed up with a small chord and chain before any
timing). Measured from the producer, each repetition:

  * chord: a group of ``--chord`` no-op steps and a body that gets their list of
    results; from sending it to the body's result (end to end);
  * chain: ``--chain`` steps, each getting the previous one's value; from sending it
    to the last step's result;
  * ours only, the same work as plain tasks: ``--chord`` no-op tasks sent in bulk
    (``kiq_many``) and all their results waited for (``bus.gather``), and ``--chain``
    round trips one after the other (``kiq`` then ``wait_result``): what a step costs
    beside a plain task.

Ours: one ``bus worker``-like process (``run_worker(concurrency=32)``), results
pushed. Celery: its worker with the pool and concurrency given (default: prefork, 2
processes, one per core here, which was the fastest of solo, threads x32 and prefork
x2 tried on this machine), ``worker_prefetch_multiplier=64``, no gossip, mingle or
heartbeat, JSON; chords use the Redis backend's native join (a counter, no
``chord_unlock`` polling), results read with ``AsyncResult.get()`` (pub/sub).
Medians over the repetitions, spread (min-max), and our ratios are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _redis_server import RedisServer, redis_server_binary, redis_server_version

ROOT = Path(__file__).resolve().parent.parent
LIBS = ("trio-bus", "celery")
CONCURRENCY = 32  # our worker's
CELERY_PREFETCH = 64
TIMEOUT = 300.0


def _quiet_structlog() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# ----------------------------------------------------------------- trio-bus


def _ours(url: str) -> tuple[Any, dict[str, Any]]:
    from bus.redis import RedisBroker, RedisResultBackend

    broker = RedisBroker(url, queue="bench-wf").with_result_backend(RedisResultBackend(url))

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    @broker.task(name="step")
    async def step(x: int = 0) -> int:
        return x + 1

    @broker.task(name="body")
    async def body(values: list[Any]) -> int:
        return len(values)

    return broker, {"noop": noop, "step": step, "body": body}


def _ours_worker(url: str, args: argparse.Namespace) -> None:
    import trio

    _quiet_structlog()
    broker, _ = _ours(url)
    trio.run(broker.run_worker, CONCURRENCY)


async def _ours_measure(url: str, n_chord: int, n_chain: int, plain: bool) -> dict[str, float]:
    import bus

    broker, t = _ours(url)
    out: dict[str, float] = {}
    async with broker:

        async def chord(n: int) -> float:
            t0 = time.perf_counter()
            wf = bus.chord(bus.group(t["noop"].s() for _ in range(n)), t["body"].s())
            result = await (await wf.kiq()).wait_result(timeout=TIMEOUT)
            elapsed = time.perf_counter() - t0
            if result.return_value != n:
                raise RuntimeError(f"the chord's body got {result.return_value!r}, not {n}")
            return elapsed

        async def chain(n: int) -> float:
            t0 = time.perf_counter()
            wf = bus.chain(t["step"].s(0), *(t["step"].s() for _ in range(n - 1)))
            result = await (await wf.kiq()).wait_result(timeout=TIMEOUT)
            elapsed = time.perf_counter() - t0
            if result.return_value != n:
                raise RuntimeError(f"the chain ended with {result.return_value!r}, not {n}")
            return elapsed

        gc.collect()
        out["chord"] = await chord(n_chord)
        out["chain"] = await chain(n_chain)
        if plain:
            t0 = time.perf_counter()
            handles = await t["noop"].kiq_many(() for _ in range(n_chord))
            results = await bus.gather(*handles, timeout=TIMEOUT)
            out["plain_fanout"] = time.perf_counter() - t0
            if any(r.is_err for r in results):
                raise RuntimeError("a plain task failed")
            t0 = time.perf_counter()
            x = 0
            for _ in range(n_chain):
                x = (await (await t["step"].kiq(x)).wait_result(timeout=TIMEOUT)).return_value
            out["plain_sequential"] = time.perf_counter() - t0
            if x != n_chain:
                raise RuntimeError(f"the round trips ended with {x!r}")
    return out


def _ours_run(url: str, n_chord: int, n_chain: int, plain: bool) -> dict[str, float]:
    import trio

    _quiet_structlog()
    return trio.run(_ours_measure, url, n_chord, n_chain, plain)


# ------------------------------------------------------------------- Celery


_APPS: dict[str, Any] = {}


def _celery(url: str) -> Any:
    """The Celery app for ``url`` (one per process: its tasks register once)."""
    if url in _APPS:
        return _APPS[url]
    from celery import Celery  # type: ignore[import-untyped]

    app = _APPS[url] = Celery("bench_workflows", broker=url, backend=url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=CELERY_PREFETCH,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_default_queue="bench-wf",
    )

    @app.task(name="noop")
    def noop() -> None:
        return None

    @app.task(name="step")
    def step(x: int = 0) -> int:
        return x + 1

    @app.task(name="body")
    def body(values: list[Any]) -> int:
        return len(values)

    return app


def _celery_worker(url: str, args: argparse.Namespace) -> None:
    app = _celery(url)
    argv = [
        "worker",
        f"--pool={args.celery_pool}",
        f"--concurrency={args.celery_concurrency}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-Q",
        "bench-wf",
    ]
    if args.celery_pool == "prefork":
        argv.append("-Ofair")  # its chord median was better with it here
    app.worker_main(argv)


def _celery_run(url: str, n_chord: int, n_chain: int, plain: bool) -> dict[str, float]:
    from celery import chain, chord, group

    app = _celery(url)
    t = app.tasks
    out: dict[str, float] = {}
    gc.collect()
    t0 = time.perf_counter()
    value = chord(group(t["noop"].s() for _ in range(n_chord)))(t["body"].s()).get(timeout=TIMEOUT)
    out["chord"] = time.perf_counter() - t0
    if value != n_chord:
        raise RuntimeError(f"celery's chord body got {value!r}, not {n_chord}")
    t0 = time.perf_counter()
    steps = [t["step"].s(0), *(t["step"].s() for _ in range(n_chain - 1))]
    value = chain(*steps).apply_async().get(timeout=TIMEOUT)
    out["chain"] = time.perf_counter() - t0
    if value != n_chain:
        raise RuntimeError(f"celery's chain ended with {value!r}, not {n_chain}")
    return out


# ------------------------------------------------------------------ harness

RUNS: dict[str, Callable[[str, int, int, bool], dict[str, float]]] = {
    "trio-bus": _ours_run,
    "celery": _celery_run,
}
WORKERS: dict[str, Callable[[str, argparse.Namespace], None]] = {
    "trio-bus": _ours_worker,
    "celery": _celery_worker,
}
DISTS = {"trio-bus": ("trio-bus", "trio", "hiredis"), "celery": ("celery", "kombu", "redis")}


def _missing(lib: str) -> str | None:
    module = {"trio-bus": "bus.redis", "celery": "celery"}[lib]
    try:
        __import__(module)
        if lib == "celery":
            __import__("redis")
    except ImportError as exc:
        return str(exc)
    return None


def _versions(lib: str) -> str:
    parts = []
    for d in DISTS[lib]:
        try:
            parts.append(f"{d} {importlib.metadata.version(d)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{d} ?")
    return ", ".join(parts)


def _spawn(lib: str, port: int, args: argparse.Namespace, log: Any) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        lib,
        "--port",
        str(port),
        "--celery-pool",
        args.celery_pool,
        "--celery-concurrency",
        str(args.celery_concurrency),
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
    # A prefork pool's children: gone with their parent's TERM (or orphaned and idle).


def measure(lib: str, server: RedisServer, args: argparse.Namespace) -> list[dict[str, float]]:
    """Start ``lib``'s worker, warm it up, time ``args.repeat`` runs, stop it."""
    import redis

    redis.Redis(host="127.0.0.1", port=server.port).flushall()
    run = RUNS[lib]
    samples = []
    with tempfile.TemporaryFile() as log:
        proc = _spawn(lib, server.port, args, log)
        try:
            run(server.url, min(10, args.chord), min(5, args.chain), False)  # warm-up
            for rep in range(args.repeat):
                samples.append(run(server.url, args.chord, args.chain, lib == "trio-bus"))
                print(f"  {lib} [{rep + 1}/{args.repeat}] " + _brief(samples[-1]), flush=True)
        except BaseException:
            _stop(proc)
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            if tail.strip():
                print(f"--- {lib} worker output (tail) ---\n{tail}---", flush=True)
            raise
        _stop(proc)
    return samples


def _brief(sample: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sample.items())


def _median(samples: list[dict[str, float]], key: str) -> tuple[float, float, float] | None:
    vals = [s[key] for s in samples if key in s]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def _machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), load average {load} at start"


def report(
    results: dict[str, list[dict[str, float]]], args: argparse.Namespace, server: str
) -> list[str]:
    lines = [
        f"Workflows on Redis {server}: a chord of {args.chord} no-op steps + body, a chain "
        f"of {args.chain}; median of {args.repeat} (min-max); python "
        f"{platform.python_version()}; {_machine()}",
    ]
    for lib in results:
        lines.append(f"  {lib}: {_versions(lib)}")
    lines.append(
        f"  workers: trio-bus 1 process, run_worker(concurrency={CONCURRENCY}); celery "
        f"--pool={args.celery_pool} --concurrency={args.celery_concurrency}, "
        f"prefetch multiplier {CELERY_PREFETCH}"
    )
    lines.append("")
    rows = [
        ("chord", f"chord {args.chord} + body, end to end", args.chord + 1),
        ("chain", f"chain of {args.chain}, end to end", args.chain),
        ("plain_fanout", f"plain: {args.chord} tasks in bulk, all results", args.chord),
        ("plain_sequential", f"plain: {args.chain} round trips in a row", args.chain),
    ]
    head = f"{'':44}" + "".join(f"{lib:>26}" for lib in results)
    lines.append(head)
    med: dict[tuple[str, str], float] = {}
    for key, label, steps in rows:
        cells = []
        for lib, samples in results.items():
            m = _median(samples, key)
            if m is None:
                cells.append(f"{'-':>26}")
                continue
            med[(lib, key)] = m[0]
            cell = f"{m[0] * 1e3:,.0f} ms ({m[1] * 1e3:,.0f}-{m[2] * 1e3:,.0f})"
            cells.append(f"{cell:>26}")
        lines.append(f"{label:44}" + "".join(cells))
        per = [
            f"{med[(lib, key)] / steps * 1e6:,.0f} us/step" if (lib, key) in med else "-"
            for lib in results
        ]
        lines.append(f"{'':44}" + "".join(f"{p:>26}" for p in per))
    lines.append("")

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        return med[b] / med[a] if a in med and b in med else None

    for key, what in (("chord", "chord"), ("chain", "chain")):
        r = ratio(("trio-bus", key), ("celery", key))
        if r is not None:
            verdict = "met" if r >= 3 else "MISSED"
            best = min(s[key] for s in results["celery"]) / min(s[key] for s in results["trio-bus"])
            lines.append(
                f"{what}: trio-bus is {r:.2f}x as fast as celery (goal >= 3x: {verdict}); "
                f"best run against best run: {best:.2f}x"
            )
    for key, plain, what in (
        ("chord", "plain_fanout", "a chord step"),
        ("chain", "plain_sequential", "a chain step"),
    ):
        r = ratio(("trio-bus", plain), ("trio-bus", key))
        if r is not None:
            verdict = "met" if r <= 1.5 else "MISSED"
            lines.append(f"{what} costs {r:.2f}x a plain task of ours (goal <= 1.5x: {verdict})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--chord", type=int, default=1000, help="steps in the chord's group")
    ap.add_argument("--chain", type=int, default=100, help="steps in the chain")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default=",".join(LIBS), help="comma-separated: " + ",".join(LIBS))
    ap.add_argument("--celery-pool", default="prefork", choices=("prefork", "solo", "threads"))
    ap.add_argument("--celery-concurrency", type=int, default=2)
    ap.add_argument("--_worker", choices=LIBS, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.chord < 1 or args.chain < 1 or args.repeat < 1:
        ap.error("--chord, --chain and --repeat must be at least 1")
    if args._worker:
        with contextlib.suppress(KeyboardInterrupt):
            WORKERS[args._worker](f"redis://127.0.0.1:{args.port}/0", args)
        return 0

    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in LIBS]
    if unknown:
        ap.error(f"unknown library {', '.join(unknown)}; choose from {', '.join(LIBS)}")
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    libs = []
    for lib in wanted:
        why = _missing(lib)
        if why is None:
            libs.append(lib)
        else:
            print(f"{lib} is not installed ({why}): pip install -e '.[bench]'; skipping it")
    if not libs:
        print("no library to measure")
        return 1
    results: dict[str, list[dict[str, float]]] = {}
    with RedisServer(binary) as server:
        for lib in libs:
            print(f"{lib} ...", flush=True)
            results[lib] = measure(lib, server, args)
    print()
    print("\n".join(report(results, args, redis_server_version(binary))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
