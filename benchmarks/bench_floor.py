"""The round trip on Redis against its floor: the same commands over bare sockets.

Starts its own redis-server (127.0.0.1, a free port, no persistence) and measures, in
alternation, the round trip p50 and p99 of a no-op task (send one, wait for its
result, send the next) with:

  * trio-bus: ``kiq()`` + ``wait_result()`` in one process, a worker process
    (``broker.run_worker(32)``) beside, as ``bench_redis.py`` measures it (with
    ``--against REV``, also ours at REV, checked out in a temporary worktree);
  * the floor: the commands a round trip of ours sends, in the same order and of about
    the same sizes, written with blocking sockets and parsed with hiredis in two bare
    processes, no framework: the producer ``XADD`` s the task and waits for its reply,
    then for the announcement on a subscribed connection; the worker's blocking
    ``XREADGROUP`` returns the entry, its claim (``MGET`` of the cancel marker, ``SET
    NX GET PX`` of the attempt) goes out in one write, then the result (``SET PX``),
    the announcement (``PUBLISH``) and the acks of the entry (``XACK``, ``XDEL``) in
    another, then the next blocking read.

Three trips between processes (producer to Redis to worker, the claim, worker to
Redis to producer) and the writes themselves make the floor: what this machine
allows any library keeping our guarantees (no run twice: the claim before the run).
The ratio ours / floor is what our own code adds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_redis
from _redis_server import RedisServer, redis_server_binary, redis_server_version
from _worktree import checkout

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20
STREAM = b"{floor}:stream"
GROUP = b"workers"
CHANNEL = b"floor:results"
TTL_MS = b"86400000"
ENTRY = b"x" * 180  # about our message's size in its stream entry
RESULT = b"r" * 160  # about our result's size (stored, and announced)


class Conn:
    """A blocking socket to Redis with a hiredis reader."""

    def __init__(self, port: int) -> None:
        import hiredis

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.pack = hiredis.pack_command

    def send(self, *commands: tuple[Any, ...]) -> None:
        self.sock.sendall(b"".join(self.pack(c) for c in commands))

    def read(self) -> Any:
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)

    def call(self, *args: Any) -> Any:
        self.send(args)
        return self.read()


def _bare_worker(port: int) -> None:
    """The worker of the floor: read, claim, store and announce, acknowledge; until
    killed."""
    blocking, shared = Conn(port), Conn(port)
    blocking.send((b"XREADGROUP", b"GROUP", GROUP, b"w1", b"COUNT", b"32", b"BLOCK", b"0",
                   b"STREAMS", STREAM, b">"))  # fmt: skip
    while True:
        reply = blocking.read()
        for _, entries in reply:
            for eid, _fields in entries:
                task = eid.replace(b"-", b"")
                shared.send(
                    (b"MGET", b"{floor}:cancelled:" + task),
                    (b"SET", b"{floor}:ran:" + task + b":1", eid, b"NX", b"GET", b"PX", TTL_MS),
                )
                shared.read(), shared.read()
                shared.send(
                    (b"SET", b"floor:result:" + task, RESULT, b"PX", TTL_MS),
                    (b"PUBLISH", CHANNEL, task + b" " + RESULT),
                    (b"XACK", STREAM, GROUP, eid),
                    (b"XDEL", STREAM, eid),
                )
                blocking.send((b"XREADGROUP", b"GROUP", GROUP, b"w1", b"COUNT", b"32",
                               b"BLOCK", b"0", b"STREAMS", STREAM, b">"))  # fmt: skip
                for _ in range(4):
                    shared.read()


def _bare_round_trips(port: int, rounds: int) -> list[float]:
    producer, sub = Conn(port), Conn(port)
    sub.call(b"SUBSCRIBE", CHANNEL)
    lat: list[float] = []
    for i in range(WARMUP + rounds):
        t = time.perf_counter()
        producer.call(b"XADD", STREAM, b"*", b"m", ENTRY)
        message = sub.read()
        if i >= WARMUP:
            lat.append(time.perf_counter() - t)
        assert message[0] == b"message", message
    return lat


def _spawn(args: list[str], tree: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """A process of ``args`` importing ``bus`` from ``tree`` (this checkout or REV's)."""
    paths = [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    kw.setdefault("stdout", subprocess.DEVNULL)
    return subprocess.Popen(args, stderr=subprocess.DEVNULL, env=env, cwd=tree, **kw)


def _ours_client(port: int, rounds: int) -> None:
    """Our side of a run, in a process of its own: the round trips, printed."""
    url = f"redis://127.0.0.1:{port}/0"
    out = bench_redis._run_ours(bench_redis._ours_round_trips, url, "floor", rounds)
    print(" ".join(f"{x:.9f}" for x in out["normal"]))


def _measure(tree: Path | None, server: RedisServer, rounds: int) -> list[float]:
    """One run: the floor (``tree`` None), or ours at ``tree``."""
    admin = Conn(server.port)
    admin.call(b"FLUSHALL")
    me = str(Path(__file__).resolve())
    port = str(server.port)
    if tree is None:
        admin.call(b"XGROUP", b"CREATE", STREAM, GROUP, b"$", b"MKSTREAM")
        proc = _spawn([sys.executable, me, "--_bare-worker", port], ROOT)
    else:
        # -c: the worker imports this directory's bench_redis, and bus from ``tree``.
        main = bench_redis._WORKER_MAIN
        proc = _spawn([sys.executable, "-c", main, "--_worker", "trio-bus", "--queue", "floor",
                       "--port", port, "--concurrency", str(bench_redis.CONCURRENCY)],
                      tree)  # fmt: skip
    try:
        if tree is None:
            return _bare_round_trips(server.port, rounds)
        client = _spawn([sys.executable, me, "--_ours-client", port, str(rounds)], tree,
                        stdout=subprocess.PIPE)  # fmt: skip
        out, _ = client.communicate()
        if client.returncode:
            raise RuntimeError(f"our client exited with {client.returncode}")
        return [float(x) for x in out.split()]
    finally:
        proc.kill()
        proc.wait()
        admin.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="round trips a run")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each, alternating")
    parser.add_argument("--against", metavar="REV", help="also ours at this git revision")
    parser.add_argument("--_bare-worker", dest="bare_worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_ours-client", dest="ours_client", nargs=2, type=int,
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.ours_client is not None:
        _ours_client(*args.ours_client)
        return 0
    if args.bare_worker is not None:
        with contextlib.suppress(ConnectionError, KeyboardInterrupt):
            _bare_worker(args.bare_worker)
        return 0
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, redis-server {redis_server_version(binary)}, "
          f"{os.cpu_count()} cores, load average {load} at start")  # fmt: skip
    print(f"{args.rounds} round trips a run, {args.repeat} runs of each, alternating")
    with contextlib.ExitStack() as stack:
        trees: dict[str, Path | None] = {"trio-bus": ROOT, "floor": None}
        if args.against:
            rev, rev_dir = stack.enter_context(checkout(args.against))
            trees[f"rev {rev}"] = rev_dir
        server = stack.enter_context(RedisServer(binary))
        runs: dict[str, list[tuple[float, float]]] = {lib: [] for lib in trees}
        for rep in range(args.repeat):
            for lib in list(trees)[:: -1 if rep % 2 else 1]:
                lat = sorted(_measure(trees[lib], server, args.rounds))
                p50, p99 = bench_redis._pct(lat, 0.50), bench_redis._pct(lat, 0.99)
                runs[lib].append((p50, p99))
                print(f"[{rep + 1}/{args.repeat}] {lib:12s} p50 {p50 * 1e6:6.0f} us  "
                      f"p99 {p99 * 1e6:6.0f} us", flush=True)  # fmt: skip
    print("round trip, median of the runs [min-max]:")
    med: dict[str, float] = {}
    for lib, rs in runs.items():
        p50s, p99s = [r[0] * 1e6 for r in rs], [r[1] * 1e6 for r in rs]
        med[lib] = statistics.median(p50s)
        name = "the floor (the same commands, bare sockets)" if lib == "floor" else lib
        print(f"  {name:45s} p50 {med[lib]:5.0f} us [{min(p50s):.0f}-{max(p50s):.0f}]"
              f"  p99 {statistics.median(p99s):5.0f} us")  # fmt: skip
    for lib in med:
        if lib != "floor":
            print(f"ratio {lib} / floor, p50: {med[lib] / med['floor']:.2f}x "
                  f"({lib} adds {med[lib] - med['floor']:.0f} us)")  # fmt: skip
    if args.against:
        rev = next(lib for lib in med if lib.startswith("rev "))
        print(f"ratio trio-bus / {rev}, p50: {med['trio-bus'] / med[rev]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
