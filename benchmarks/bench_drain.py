"""Redis: how fast one worker drains queued tasks, in-process (no interpreter start).

    .venv/bin/python benchmarks/bench_drain.py [--tasks 20000] [--concurrency 32]
        [--repeat 3] [--cpu N] [--counts] [--profile] [--against REV] [--secret]

Starts its own redis-server (benchmarks/_redis_server.py), and for each repetition, in
a fresh Python process: queues N no-op tasks with ``kick_many``, enters the broker, then
times ``run_worker(concurrency)`` from its start until every entry is acknowledged and
deleted (the stream is empty: results are stored before acks), and prints tasks/s.

- always: the worker process's CPU time per task (user + system, ``process_time``),
  steadier than wall time when other programs share the machine.
- ``--counts``: per task, the Redis commands the drain issued (``INFO commandstats``
  before and after, the harness's own ``XLEN`` polls and ``INFO`` taken off), the
  writes to sockets (``os.write`` and ``SocketStream.send_all`` counted in the
  process: one pipeline is one write) and Trio scheduler steps (a
  ``trio.abc.Instrument``). These hardly depend on the machine.
- ``--profile``: a cProfile summary of the drain (top functions by own time).
- ``--against REV``: the same measurement of git revision REV (checked out in a
  worktree under /tmp), alternating with this tree, and the ratio of medians.
- ``--secret``: the broker signs and checks with a secret (the other hot path).

Wall-clock figures are noisy on a shared machine: alternate (``--against``), pin
(``--cpu``), and read the counts first.
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
from _redis_server import RedisServer, redis_server_binary
from _worktree import checkout

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "drain"
SECRET = "s" * 32
POLL = 0.005  # how often the drain checks whether the stream is empty


# ------------------------------------------------------------- the child


def _info_commandstats(port: int) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}, over a plain socket (blocking)."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"INFO commandstats\r\n")
        buf = b""
        while True:
            buf += s.recv(65536)
            head, sep, rest = buf.partition(b"\r\n")
            if sep and len(rest) >= int(head[1:]):
                break
    out: dict[str, int] = {}
    for line in rest.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_") :].partition(":")
            fields = dict(kv.split("=") for kv in stats.split(","))
            out[name] = int(fields["calls"])
    return out


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import structlog
    import trio

    from bus.redis import RedisBroker

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    url = f"redis://127.0.0.1:{args.port}/0"
    options: dict[str, Any] = {"queue": QUEUE}
    if args.secret:
        options["secret"] = SECRET
    n = args.tasks

    def make() -> Any:
        broker = RedisBroker(url, **options)

        @broker.task(name="noop")
        async def noop() -> None:
            return None

        return broker, noop

    async def enqueue() -> None:
        broker, noop = make()
        async with broker:
            kicker = noop.kicker()
            for i in range(0, n, 500):
                await broker.kick_many([kicker.message() for _ in range(min(500, n - i))])

    if args.phase in ("both", "enqueue"):
        trio.run(enqueue)
    if args.phase == "enqueue":
        return {}
    stream = RedisBroker(url, **options).keys.stream

    class Steps(trio.abc.Instrument):
        def __init__(self) -> None:
            self.steps = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.steps += 1

    out: dict[str, Any] = {}

    async def drain() -> None:
        broker, _ = make()
        poll = await trio.open_tcp_stream("127.0.0.1", args.port)
        xlen = b"*2\r\n$4\r\nXLEN\r\n$%d\r\n%s\r\n" % (len(stream), stream)

        async def left() -> int:
            await poll.send_all(xlen)
            reply = await poll.receive_some(64)
            return int(reply[1:].split(b"\r\n")[0])

        writes = 0
        if args.counts:
            # Count the writes to sockets: the client writes with os.write (and
            # SocketStream.send_all for the rest of a large write, or TLS); the
            # harness's own polls are taken off below.
            original_write = os.write
            original_send_all = trio.SocketStream.send_all

            def counted_write(fd: int, data: Any) -> int:
                nonlocal writes
                writes += 1
                return original_write(fd, data)

            async def counted_send_all(self: trio.SocketStream, data: Any) -> None:
                nonlocal writes
                writes += 1
                await original_send_all(self, data)

            os.write = counted_write
            trio.SocketStream.send_all = counted_send_all  # type: ignore[method-assign]
        async with broker:
            steps = Steps()
            profile = None
            before = _info_commandstats(args.port) if args.counts else {}
            polls = 0
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
            async with trio.open_nursery() as nursery:
                if args.counts:
                    trio.lowlevel.add_instrument(steps)
                writes = 0
                if profile is not None:
                    profile.enable()
                t0 = time.perf_counter()
                c0 = time.process_time()
                worker = await nursery.start(broker.run_worker, args.concurrency)
                while await left():
                    polls += 1
                    await trio.sleep(POLL)
                elapsed = time.perf_counter() - t0
                cpu = time.process_time() - c0
                if profile is not None:
                    profile.disable()
                if args.counts:
                    trio.lowlevel.remove_instrument(steps)
                worker_writes = writes - polls - 1
                worker.stop()
            after = _info_commandstats(args.port) if args.counts else {}
        await poll.aclose()
        out["tasks_per_s"] = n / elapsed
        out["cpu_us_per_task"] = cpu / n * 1e6
        if args.counts:
            delta = {k: v - before.get(k, 0) for k, v in after.items()}
            delta["xlen"] = delta.get("xlen", 0) - polls - 1
            delta["info"] = delta.get("info", 0) - 1
            delta = {k: v for k, v in delta.items() if v > 0}
            out["commands"] = delta
            out["commands_per_task"] = sum(delta.values()) / n
            out["writes_per_task"] = worker_writes / n
            out["steps_per_task"] = steps.steps / n
        if profile is not None:
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
            out["profile"] = text.getvalue()

    trio.run(drain)
    return out


# ------------------------------------------------------------- the parent


def _flushall(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(64)


def _run(tree: Path, server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process importing ``bus`` from ``tree``."""
    _flushall(server.port)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--port", str(server.port)]
    cmd += ["--tasks", str(args.tasks), "--concurrency", str(args.concurrency)]
    cmd += ["--top", str(args.top)]
    cmd += ["--counts"] * args.counts + ["--profile"] * args.profile + ["--secret"] * args.secret
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the drain failed ({tree}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _show(name: str, runs: list[dict[str, Any]], n: int) -> float:
    rates = [r["tasks_per_s"] for r in runs]
    med = statistics.median(rates)
    print(
        f"{name}: {med:,.0f} tasks/s median [{min(rates):,.0f}-{max(rates):,.0f}], {len(runs)} runs"
    )
    cpu = [r["cpu_us_per_task"] for r in runs]
    print(
        f"  CPU time of the worker process: {statistics.median(cpu):.1f} us a task "
        f"median [{min(cpu):.1f}-{max(cpu):.1f}] (less noisy than wall time)"
    )
    last = runs[-1]
    if "commands" in last:
        counts = sorted(last["commands"].items())
        per = ", ".join(f"{k} {v / n:.2f}" for k, v in counts if v / n >= 0.005)
        rare = sum(v for _, v in counts if v / n < 0.005) / n
        per += f", others {rare:.3f}"
        print(
            f"  per task: {last['commands_per_task']:.2f} Redis commands ({per}); "
            f"{last['writes_per_task']:.3f} socket writes; "
            f"{last['steps_per_task']:.2f} scheduler steps"
        )
    if "profile" in last:
        print(last["profile"])
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=None, help="pin everything to this core")
    ap.add_argument("--counts", action="store_true", help="commands, writes, steps per task")
    ap.add_argument("--profile", action="store_true", help="a cProfile summary of the drain")
    ap.add_argument("--top", type=int, default=30, help="functions in the profile summary")
    ap.add_argument("--secret", action="store_true", help="sign with a secret")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    # A child's phases, for a profiler run by hand on the drain alone: ``--_child
    # --phase enqueue``, then ``py-spy record -- python ... --_child --phase drain``.
    ap.add_argument("--phase", choices=("both", "enqueue", "drain"), default="both")
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(_child(args)))
        return 0
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # redis-server and the children inherit it
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    trees = {"this tree": ROOT}
    with contextlib.ExitStack() as stack:
        if args.against:
            trees[args.against] = stack.enter_context(checkout(args.against))[1]
        return _compare(trees, binary, args)


def _compare(trees: dict[str, Path], binary: str, args: argparse.Namespace) -> int:
    """Measure each tree ``args.repeat`` times, alternating; print medians and the ratio."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with RedisServer(binary) as server:
        for rep in range(args.repeat):
            names = list(trees)
            if rep % 2:
                names.reverse()  # alternate which goes first
            for name in names:
                runs[name].append(_run(trees[name], server, args))
                print(f"[{rep + 1}/{args.repeat}] {name}: {runs[name][-1]['tasks_per_s']:,.0f}/s")
    print(
        f"{args.tasks} tasks, concurrency {args.concurrency}, secret {args.secret}, "
        f"cpu {args.cpu if args.cpu is not None else 'not pinned'}"
    )
    meds = {name: _show(name, r, args.tasks) for name, r in runs.items()}
    if args.against:
        print(f"ratio this tree / {args.against}: {meds['this tree'] / meds[args.against]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
