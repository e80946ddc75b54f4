"""Redis clients on one connection: ours against coredis, redis-py and the bare wire.

    .venv/bin/python benchmarks/bench_client.py [--count 5000] [--repeat 3]
        [--inflight 32] [--cpu 0] [--against REV]

Starts its own redis-server (127.0.0.1, a free port, no persistence) and measures, in
the same run, ``GET`` of a small key:
  * sequential: ``--count`` commands one after the other (microseconds per command),
    for our client (bus/redis/_client.py) on Trio, coredis on Trio, redis-py's
    synchronous client, and two bare ``trio.open_tcp_stream`` + ``hiredis.Reader``
    loops (no client at all): one task writing and reading (the floor, "bare trio +
    hiredis"), and a second task reading and waking the caller ("bare, reader task",
    the shape of a client whose reader hands every reply over);
  * in flight: ``--inflight`` tasks each sending ``--count / inflight`` commands on
    one shared connection (ours, coredis), microseconds per command of wall time.
Repetitions alternate the clients; medians (min-max) and ratios to ours are printed,
and the sequential ratio ours / bare one-task (issue #22 asks for at most 1.2x).
The same three (ours and the bare loops) are also measured in one process, alternating
blocks of ``--block`` commands: a machine busy with other work then slows them alike,
so that ratio holds where separate runs scatter.
``--against REV`` adds to the sequential table our client as of git revision REV
(checked out in a worktree under /tmp, as bench_drain.py does) and this tree's, each
run in a process of its own every repetition, and prints their ratio.

Round trips depend on where the scheduler puts this process and redis-server: on a
VM, waking an idle virtual CPU on the other core can cost tens of microseconds per
round trip, in some runs and not others. ``--cpu N`` pins both to core N, which
gives steady figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _redis_server import RedisServer, redis_server_version  # noqa: E402
from _worktree import checkout  # noqa: E402

KEY = "bench:key"
OURS = "ours (trio)"
BARE = "bare trio + hiredis"
READER = "bare, reader task"
WARMUP = 200


async def ours_sequential(url: str, count: int) -> float:
    from bus.redis._client import open_connection

    async with open_connection(url) as conn:
        for _ in range(WARMUP):
            await conn.execute("GET", KEY)
        t0 = time.perf_counter()
        for _ in range(count):
            await conn.execute("GET", KEY)
        return time.perf_counter() - t0


async def ours_inflight(url: str, count: int, inflight: int) -> float:
    from bus.redis._client import open_connection

    async with open_connection(url) as conn:

        async def loop(n: int) -> None:
            for _ in range(n):
                await conn.execute("GET", KEY)

        await loop(WARMUP)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(inflight):
                nursery.start_soon(loop, count // inflight)
        return time.perf_counter() - t0


def _coredis(url: str):  # type: ignore[no-untyped-def]
    import coredis
    from coredis.retry import NoRetryPolicy

    return coredis.Redis.from_url(url, decode_responses=False, retry_policy=NoRetryPolicy())


async def coredis_sequential(url: str, count: int) -> float:
    client = _coredis(url)
    async with client:
        for _ in range(WARMUP):
            await client.get(KEY)
        t0 = time.perf_counter()
        for _ in range(count):
            await client.get(KEY)
        return time.perf_counter() - t0


async def coredis_inflight(url: str, count: int, inflight: int) -> float:
    client = _coredis(url)
    async with client:

        async def loop(n: int) -> None:
            for _ in range(n):
                await client.get(KEY)

        await loop(WARMUP)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(inflight):
                nursery.start_soon(loop, count // inflight)
        return time.perf_counter() - t0


def redispy_sequential(url: str, count: int) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for _ in range(WARMUP):
            client.get(KEY)
        t0 = time.perf_counter()
        for _ in range(count):
            client.get(KEY)
        return time.perf_counter() - t0
    finally:
        client.close()


_MORE = object()
_GET = b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(KEY), KEY.encode())


Loop = Callable[[], Awaitable[object]]


async def _timed(one: Loop, count: int) -> float:
    for _ in range(WARMUP):
        await one()
    t0 = time.perf_counter()
    for _ in range(count):
        await one()
    return time.perf_counter() - t0


@asynccontextmanager
async def _bare_one_task(port: int) -> AsyncIterator[Loop]:
    """The floor: one task writes each command and reads its reply itself
    (``send_all`` / ``receive_some``, ``hiredis.Reader``), no client at all."""
    import hiredis

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        reader = hiredis.Reader(notEnoughData=_MORE)

        async def one() -> None:
            await stream.send_all(_GET)
            while True:
                reader.feed(await stream.receive_some(65536))
                if reader.gets() is not _MORE:
                    return

        yield one


@asynccontextmanager
async def _bare_reader_task(port: int) -> AsyncIterator[Loop]:
    """The same wire, the shape of a client with a reader task: the caller writes and
    parks; a second task reads the reply and wakes the caller (one more scheduler
    pass between the reply and the caller than the one-task loop)."""
    import hiredis

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        parser = hiredis.Reader(notEnoughData=_MORE)
        parked: list[trio.lowlevel.Task] = []  # the caller, while it waits
        replies: list[object] = []

        async def read() -> None:
            while True:
                parser.feed(await stream.receive_some(65536))
                while (reply := parser.gets()) is not _MORE:
                    replies.append(reply)
                    if parked:
                        # trio.lowlevel: wake the parked caller, as a client's reader does.
                        trio.lowlevel.reschedule(parked.pop())

        def abort(_: object) -> trio.lowlevel.Abort:
            parked.clear()
            return trio.lowlevel.Abort.SUCCEEDED  # interrupted: the run is over

        async def one() -> None:
            await stream.send_all(_GET)
            if not replies:
                parked.append(trio.lowlevel.current_task())
                await trio.lowlevel.wait_task_rescheduled(abort)
            replies.pop()

        nursery.start_soon(read)
        yield one
        nursery.cancel_scope.cancel()


async def bare_sequential(port: int, count: int) -> float:
    async with _bare_one_task(port) as one:
        return await _timed(one, count)


async def bare_reader_task(port: int, count: int) -> float:
    async with _bare_reader_task(port) as one:
        return await _timed(one, count)


async def interleaved(url: str, port: int, count: int, block: int) -> dict[str, list[float]]:
    """Ours and both bare loops in one process, alternating blocks of ``block``
    sequential GETs (``count`` each in all): microseconds per command of each block.
    A machine busy with other work slows all three alike, so their ratio holds."""
    from bus.redis._client import open_connection

    async with (
        open_connection(url) as conn,
        _bare_one_task(port) as bare,
        _bare_reader_task(port) as reader,
    ):
        loops: dict[str, Loop] = {
            OURS: lambda: conn.execute("GET", KEY),
            BARE: bare,
            READER: reader,
        }
        results: dict[str, list[float]] = {name: [] for name in loops}
        for one in loops.values():
            await _timed(one, 0)
        for round_ in range(max(1, count // block)):
            names = list(loops)
            if round_ % 2:
                names.reverse()
            for name in names:
                one = loops[name]
                t0 = time.perf_counter()
                for _ in range(block):
                    await one()
                results[name].append((time.perf_counter() - t0) / block * 1e6)
        return results


_AT_REV = """
import sys, time, trio
tree, url, count, warmup, key = sys.argv[1:]
sys.path.insert(0, tree)
from bus.redis._client import open_connection

async def main():
    async with open_connection(url) as conn:
        for _ in range(int(warmup)):
            await conn.execute("GET", key)
        t0 = time.perf_counter()
        for _ in range(int(count)):
            await conn.execute("GET", key)
        return time.perf_counter() - t0

print(trio.run(main))
"""


def ours_at(tree: Path, url: str, count: int) -> float:
    """:func:`ours_sequential` with the client of another checkout (a process of its own)."""
    out = subprocess.run(
        [sys.executable, "-c", _AT_REV, str(tree), url, str(count), str(WARMUP), KEY],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[-1])


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--cpu", type=int, default=None, help="pin this and the server to it")
    parser.add_argument("--against", metavar="REV", help="also our client at this git revision")
    parser.add_argument(
        "--block", type=int, default=250, help="commands a block in the interleaved table"
    )
    options = parser.parse_args()
    count, inflight = options.count, options.inflight
    if options.cpu is not None:
        os.sched_setaffinity(0, {options.cpu})  # redis-server, started below, inherits it

    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(checkout(options.against))[1] if options.against else None
        _main(options, count, inflight, tree)


def _main(options: argparse.Namespace, count: int, inflight: int, tree: Path | None) -> None:
    with RedisServer() as server:
        import redis

        redis.Redis.from_url(server.url).set(KEY, b"x" * 16)
        runs: dict[str, Callable[[], float]] = {
            OURS: lambda: trio.run(ours_sequential, server.url, count),
            BARE: lambda: trio.run(bare_sequential, server.port, count),
            READER: lambda: trio.run(bare_reader_task, server.port, count),
            "redis-py (sync)": lambda: redispy_sequential(server.url, count),
        }
        if _available("coredis"):
            runs["coredis (trio)"] = lambda: trio.run(coredis_sequential, server.url, count)
        if tree is not None:
            runs["ours, own process"] = lambda: ours_at(ROOT, server.url, count)
            runs[f"ours at {options.against}"] = lambda: ours_at(tree, server.url, count)
        inflight_runs: dict[str, Callable[[], float]] = {
            OURS: lambda: trio.run(ours_inflight, server.url, count, inflight),
        }
        if _available("coredis"):
            inflight_runs["coredis (trio)"] = lambda: trio.run(
                coredis_inflight, server.url, count, inflight
            )
        seq: dict[str, list[float]] = {name: [] for name in runs}
        par: dict[str, list[float]] = {name: [] for name in inflight_runs}
        mixed: dict[str, list[float]] = {}
        for _ in range(options.repeat):
            for name, run in runs.items():
                seq[name].append(run() / count * 1e6)
            for name, run in inflight_runs.items():
                par[name].append(run() / (count // inflight * inflight) * 1e6)
            blocks = trio.run(interleaved, server.url, server.port, count, options.block)
            for name, values in blocks.items():
                mixed.setdefault(name, []).extend(values)
        version = redis_server_version(server.binary)

    pinned = f"pinned to cpu {options.cpu}" if options.cpu is not None else "not pinned"
    print(
        f"redis-server {version}, python {sys.version.split()[0]}, trio {trio.__version__}, "
        f"{count} commands x {options.repeat} repetitions, {pinned}"
    )
    _table("sequential GET (us/command)", seq)
    goal = statistics.median(seq[OURS]) / statistics.median(seq[BARE])
    print(f"  ours / bare one-task (issue #22 goal: <= 1.20x): {goal:.2f}x")
    if options.against:
        now = statistics.median(seq["ours, own process"])
        then = statistics.median(seq[f"ours at {options.against}"])
        print(
            f"  ours / ours at {options.against} (each in a process of its own): {now / then:.2f}x"
        )
    _table(f"sequential GET interleaved in blocks of {options.block} (us/command)", mixed)
    goal = statistics.median(mixed[OURS]) / statistics.median(mixed[BARE])
    print(f"  ours / bare one-task, interleaved (steadier on a busy machine): {goal:.2f}x")
    _table(f"{inflight} in flight on one connection (us/command, wall)", par)


def _table(title: str, results: dict[str, list[float]]) -> None:
    ours = statistics.median(results[OURS])
    print(f"\n{title}")
    print(f"  {'client':<22}{'median':>9}{'min-max':>18}{'vs ours':>10}")
    for name, values in results.items():
        median = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"  {name:<22}{median:>9.1f}{spread:>18}{median / ours:>9.2f}x")


if __name__ == "__main__":
    main()
