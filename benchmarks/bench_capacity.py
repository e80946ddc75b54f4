"""How far one Redis goes: what each task costs Redis, measured, and the ceiling it gives.

    .venv/bin/python benchmarks/bench_capacity.py [--tasks 5000] [--repeat 3]
        [--check-tasks 20000] [--workers 2] [--connections 8] [--fanout 4] [--idle 3]
        [--link-gbit 1,10] [--json]

Starts its own redis-server (127.0.0.1, a free port, no persistence) and stops it at the
end. Every figure is a difference of the server's own counters (``INFO stats``,
``INFO commandstats``, ``INFO cpu``) across one phase; the harness's own commands (the
``INFO`` calls, an ``XLEN`` to see the acks are in) are subtracted.

1. Phases, one at a time, on one no-op task, a producer process (this one) and one
   worker process (concurrency 32): a producer opening its broker; a worker starting on
   an empty queue, idling, stopping; **send** (N ``kiq`` with 32 in flight, no worker
   running); **run** (a worker drains the N while the producer waits for every result,
   until the last ack is in; the worker start measured before is taken out). Run
   ``--repeat`` times straight to Redis (the CPU and the counts; the run of median CPU
   counts) and once through a small recording proxy in this process, which tells each
   command's path by its name and key (a ``SET`` of a ``:ran:`` key is the delivery's
   claim, a ``SET`` of a ``:result:`` key the result...) and counts the bytes of each
   request and reply. The direct run's calls and CPU (commandstats) of each command
   name are split between the paths that share the name in proportion to the calls the
   proxy saw.
2. Saturation: the commands recorded in the send and run phases, replayed at once on
   several connections (each in a database of its own with a subscriber of its own,
   ``XADD *`` given the id it got, blocking reads made non-blocking), as fast as Redis
   takes them: the commands/s one Redis process carries with this mix and its CPU per
   command and per task (three rounds, the median CPU counts); alternating with rounds
   of ``--fanout`` subscribers a channel (more processes waiting for results): what
   each one more costs.
3. The model: tasks/s one Redis core carries = 1 / (Redis CPU-seconds per task), at the
   batching of the real run and at saturation; and the bound a network link puts on it.
4. The check: ``--workers`` worker processes and the producer (32 ``kiq`` in flight,
   waiting every result) on M tasks; throughput, the CPU Redis used, the CPU the others
   used, against the model.

Commands and bytes per task do not depend on the machine's load; CPU-seconds per task
somewhat (they rise when other processes share the cores); rates a lot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _redis_server import RedisServer, redis_server_binary, redis_server_version

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "capacity"
CONCURRENCY = 32
INFLIGHT = 32
PATHS = ("send", "delivery", "ack", "result", "announcement", "wait", "other")
PATH_NOTES = {
    "send": "XADD of the entry",
    "delivery": "XREADGROUP/XAUTOCLAIM/XPENDING, cancel-marker MGET, SET NX GET claim",
    "ack": "XACK + XDEL",
    "result": "SET of the result, DEL of its progress key",
    "announcement": "PUBLISH of the result, and its copy pushed to each subscriber",
    "wait": "the caller's wait_result: SUBSCRIBE, MGET/GET of result keys",
    "other": "heartbeats, presence, scripts, connection setup",
}
_NOT_REPLAYED = frozenset(
    {
        b"SELECT",
        b"SUBSCRIBE",
        b"UNSUBSCRIBE",
        b"PSUBSCRIBE",
        b"PUNSUBSCRIBE",
        b"SSUBSCRIBE",
        b"SUNSUBSCRIBE",
        b"QUIT",
        b"RESET",
        b"MONITOR",
        b"WAIT",
        b"INFO",
    }
)
_PUSH_KINDS = frozenset({b"message", b"pmessage", b"smessage"})
_SUB_KINDS = frozenset(
    {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe", b"pong"}
)


# -------------------------------------------------------------------- RESP


class Incomplete(Exception):
    """The buffer ends inside a value."""


@attrs.frozen
class RespError:
    message: bytes


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One RESP2/RESP3 value at ``pos``: (value, end). Raises :class:`Incomplete`."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        raise Incomplete
    kind, line, nxt = buf[pos : pos + 1], bytes(buf[pos + 1 : eol]), eol + 2
    if kind in (b"+", b"(", b","):
        return line, nxt
    if kind == b"-":
        return RespError(line), nxt
    if kind == b":":
        return int(line), nxt
    if kind == b"_":
        return None, nxt
    if kind == b"#":
        return line == b"t", nxt
    if kind in (b"$", b"=", b"!"):
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buf) < nxt + size + 2:
            raise Incomplete
        return bytes(buf[nxt : nxt + size]), nxt + size + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(line)
        if count < 0:
            return None, nxt
        if kind in (b"%", b"|"):
            count *= 2
        items = []
        for _ in range(count):
            item, nxt = parse(buf, nxt)
            items.append(item)
        return items, nxt
    raise ValueError(f"not RESP: {bytes(buf[pos : pos + 40])!r}")


def encode(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


# ------------------------------------------------------------------- probe


@attrs.frozen
class Counters:
    """The server's counters at a time (a snapshot: ``wall`` is the time it was taken),
    or what it did in a phase (a difference: ``wall`` is its length); the harness's own
    commands are not in them."""

    calls: dict[str, int]
    usec: dict[str, int]
    commands: int
    net_in: int
    net_out: int
    cpu: float
    wall: float

    def __sub__(self, other: Counters) -> Counters:
        return self._plus(other, -1)

    def __add__(self, other: Counters) -> Counters:
        return self._plus(other, 1)

    def _plus(self, other: Counters, sign: int) -> Counters:
        calls, usec = Counter(self.calls), Counter(self.usec)
        for k, v in other.calls.items():
            calls[k] += sign * v
        for k, v in other.usec.items():
            usec[k] += sign * v
        return Counters(
            {k: v for k, v in calls.items() if v > 0 and k != "info"},
            {k: v for k, v in usec.items() if calls[k] > 0 and k != "info"},
            self.commands + sign * other.commands,
            self.net_in + sign * other.net_in,
            self.net_out + sign * other.net_out,
            self.cpu + sign * other.cpu,
            self.wall + sign * other.wall,
        )

    def per(self, n: int) -> dict[str, Any]:
        return {
            "commands": self.commands / n,
            "bytes_in": self.net_in / n,
            "bytes_out": self.net_out / n,
            "redis_cpu_us": self.cpu * 1e6 / n,
            "commandstats_us": sum(self.usec.values()) / n,
            "calls": {k: v / n for k, v in sorted(self.calls.items())},
        }


class Probe:
    """A plain socket to the server for ``INFO`` and a few reads; it counts its own
    traffic so that a phase's figures can leave it out."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = bytearray()
        self.calls: Counter[str] = Counter()
        self.bytes_in = 0  # what the server read from the probe
        self.bytes_out = 0  # what it wrote to it

    def _send(self, *args: Any) -> int:
        req = encode(*args)
        self.sock.sendall(req)
        return len(req)

    def _reply(self) -> tuple[Any, int]:
        while True:
            try:
                value, end = parse(self.buf)
            except Incomplete:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("redis-server closed the probe") from None
                self.buf += chunk
                continue
            del self.buf[:end]
            return value, end

    def command(self, *args: Any) -> Any:
        self.bytes_in += self._send(*args)
        value, size = self._reply()
        self.bytes_out += size
        self.calls[str(args[0]).lower()] += 1
        return value

    def snapshot(self) -> Counters:
        # The server counts an INFO's request before it answers and its reply after:
        # the probe's own figures are taken the same way (request in, reply not yet).
        self.bytes_in += self._send("INFO", "stats", "commandstats", "cpu")
        at = time.perf_counter()
        value, size = self._reply()
        info: dict[str, str] = {}
        for line in value.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                info[k] = v
        calls, usec = {}, {}
        for k, v in info.items():
            if k.startswith("cmdstat_"):
                fields = dict(kv.split("=") for kv in v.split(","))
                calls[k[8:]] = int(fields["calls"]) - self.calls[k[8:]]
                usec[k[8:]] = int(fields["usec"])
        snap = Counters(
            calls,
            usec,
            int(info["total_commands_processed"]) - sum(self.calls.values()),
            int(info["total_net_input_bytes"]) - self.bytes_in,
            int(info["total_net_output_bytes"]) - self.bytes_out,
            float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            at,
        )
        self.bytes_out += size
        self.calls["info"] += 1
        return snap

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------- proxy


@attrs.define
class Record:
    """One command through the proxy: its words, its path, the bytes each way."""

    conn: int
    args: list[bytes]
    path: str
    bytes_in: int
    bytes_out: int = 0
    reply: Any = None

    @property
    def name(self) -> str:
        return self.args[0].decode().lower() if self.args else "push"


def path_of(args: list[bytes]) -> str:
    """Which path a command serves, by its name and its first key."""
    name = args[0].upper()
    key = args[1] if len(args) > 1 else b""
    if name in (b"XADD", b"ZADD") and (b":stream" in key or b":delayed" in key):
        return "send"
    if name in (b"XREADGROUP", b"XAUTOCLAIM", b"XPENDING", b"XCLAIM"):
        return "delivery"
    if name in (b"XACK", b"XDEL"):
        return "ack"
    if name in (b"MGET", b"GET", b"EXISTS"):
        if b":cancelled:" in key:
            return "delivery"
        if b":result:" in key:
            return "wait"
    if name == b"SET":
        if b":ran:" in key:
            return "delivery"
        if b":result:" in key:
            return "result"
    if name == b"DEL" and b":progress:" in key:
        return "result"
    if name == b"PUBLISH" and key.endswith(b":results"):
        return "announcement"
    if name in (b"SUBSCRIBE", b"PSUBSCRIBE"):
        return "wait"
    return "other"


class Proxy:
    """A TCP proxy in a thread of its own: every request and reply parsed, each command
    recorded with the bytes it took each way (pushes to a subscriber on their own)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.port = 0
        self._ready = threading.Event()
        self._token: Any = None
        self._cancel: Any = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._conns = 0

    def __enter__(self) -> Proxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)

    def mark(self) -> int:
        with self.lock:
            return len(self.records)

    def _main(self) -> None:
        import trio

        async def serve() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._cancel:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                self._ready.set()
                await trio.serve_listeners(self._handle, listeners)

        trio.run(serve)

    async def _handle(self, client: Any) -> None:
        import trio

        self._conns += 1
        conn = self._conns
        pending: deque[Record] = deque()  # awaiting a reply, in order
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.upstream)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:

            async def up() -> None:
                buf = bytearray()
                while data := await client.receive_some(1 << 16):
                    # Recorded before it is passed on: a phase's mark, taken once Redis
                    # has answered, then counts every command of the phase.
                    buf += data
                    self._requests(conn, buf, pending)
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                buf = bytearray()
                while data := await server.receive_some(1 << 16):
                    await client.send_all(data)
                    buf += data
                    self._replies(conn, buf, pending)
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)

    def _requests(self, conn: int, buf: bytearray, pending: deque[Record]) -> None:
        pos = 0
        with self.lock:
            while pos < len(buf):
                try:
                    args, end = parse(buf, pos)
                except Incomplete:
                    break
                rec = Record(conn, args, path_of(args), end - pos)
                self.records.append(rec)
                # A SUBSCRIBE is answered once per channel.
                confirms = len(args) - 1 if args[0].upper() in (b"SUBSCRIBE", b"PSUBSCRIBE") else 1
                pending.extend([rec] * max(1, confirms))
                pos = end
        del buf[:pos]

    def _replies(self, conn: int, buf: bytearray, pending: deque[Record]) -> None:
        pos = 0
        with self.lock:
            while pos < len(buf):
                try:
                    value, end = parse(buf, pos)
                except Incomplete:
                    break
                size, pos = end - pos, end
                kind = value[0] if isinstance(value, list) and value else None
                kind = kind if isinstance(kind, bytes) else None
                if kind in _PUSH_KINDS and not (pending and _is_sub(pending[0], kind)):
                    self.records.append(Record(conn, [], "announcement", 0, size))
                    continue
                if not pending:
                    continue
                rec = pending.popleft()
                rec.bytes_out += size
                rec.reply = value if rec.args[0].upper() == b"XADD" else None
        del buf[:pos]


def _is_sub(rec: Record, kind: bytes) -> bool:
    return rec.args[0].lower() in _SUB_KINDS and kind not in _PUSH_KINDS


# ----------------------------------------------------------------- the bus


def _broker(url: str) -> tuple[Any, Any]:
    from bus.redis import RedisBroker, RedisResultBackend

    broker = RedisBroker(url, queue=QUEUE).with_result_backend(RedisResultBackend(url))

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    return broker, noop


def _quiet() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _worker_main(url: str, concurrency: int) -> int:
    """A worker process: says ``ready`` on stdout once its worker runs."""
    import trio

    _quiet()
    broker, _ = _broker(url)

    async def run() -> None:
        # Stops as a deployed worker does: the signal cancels it, it drains and leaves.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run_worker, concurrency)
                print("ready", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0


class Workers:
    """Worker processes of this script, stopped with SIGINT (killed after 10 s)."""

    def __init__(self, url: str, count: int) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", url]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.procs = [
            subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log)
            for _ in range(count)
        ]

    async def ready(self) -> None:
        """Every worker process has said it runs."""
        import trio

        with trio.fail_after(120):
            for p in self.procs:
                assert p.stdout is not None
                line = await trio.to_thread.run_sync(p.stdout.readline, abandon_on_cancel=True)
                if line.strip() != b"ready":
                    self.check()
                    raise RuntimeError(f"a worker said {line!r}, not ready")

    def cpu(self) -> float:
        """CPU-seconds the processes used so far (Linux /proc; 0 elsewhere)."""
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"a worker exited with {p.returncode}:\n{err}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        self.log.close()


async def _until(probe: Probe, ok: Callable[[], bool], what: str, workers: Workers) -> None:
    import trio

    deadline = trio.current_time() + 120
    while not ok():
        workers.check()
        if trio.current_time() > deadline:
            raise TimeoutError(f"waited 120 s for {what}")
        await trio.sleep(0.02)


async def _send_and_wait(noop: Any, n: int, workers: Workers | None) -> list[Any]:
    """``n`` kiq, 32 in flight; with ``workers`` running, then every result."""
    import trio

    handles: list[Any] = []

    async def sender(count: int) -> None:
        for _ in range(count):
            handles.append(await noop.kiq())

    async with trio.open_nursery() as nursery:
        for i in range(INFLIGHT):
            nursery.start_soon(sender, n // INFLIGHT + (i < n % INFLIGHT))
    if workers is not None:
        await _wait_all(handles, workers)
    return handles


async def _wait_all(handles: list[Any], workers: Workers | None = None) -> None:
    """Every result; a worker process that exits meanwhile is an error at once."""
    import trio

    async def one(h: Any) -> None:
        result = await h.wait_result(timeout=300)
        if result.is_err:
            raise RuntimeError(f"the task failed: {result.error}")

    async def watch() -> None:
        while workers is not None:
            workers.check()
            await trio.sleep(0.1)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for h in handles:
                nursery.start_soon(one, h)
        outer.cancel_scope.cancel()


async def phases(
    url: str, probe: Probe, n: int, idle: float, marks: dict[str, int] | None, proxy: Proxy | None
) -> dict[str, Counters]:
    """The phases one after the other; ``marks`` gets the proxy's record index at each
    phase boundary."""
    import trio

    out: dict[str, Counters] = {}
    broker, noop = _broker(url)
    stream = broker.keys.stream

    def mark(name: str) -> Counters:
        if marks is not None and proxy is not None:
            marks[name] = proxy.mark()
        return probe.snapshot()

    s0 = mark("open")
    async with broker:
        s1 = mark("opened")
        out["producer open"] = s1 - s0
        workers = Workers(url, 1)
        try:
            await workers.ready()
            s2 = mark("idle")
            out["worker start"] = s2 - s1
            await trio.sleep(idle)
            s3 = mark("idle end")
            out["worker idle"] = s3 - s2
        finally:
            workers.stop()
        s4 = mark("send")
        out["worker stop"] = s4 - s3
        handles = await _send_and_wait(noop, n, None)
        s5 = mark("run")
        out["send"] = s5 - s4
        workers = Workers(url, 1)
        try:
            await _wait_all(handles, workers)
            await _until(probe, lambda: probe.command("XLEN", stream) == 0, "the acks", workers)
            s6 = mark("run end")
            # The run includes the start of its worker: the start measured above (on
            # the same empty queue) is taken out.
            out["run"] = (s6 - s5) - out["worker start"]
        finally:
            workers.stop()
    return out


async def check(url: str, probe: Probe, m: int, workers_n: int) -> dict[str, Any]:
    """Two worker processes and the producer on ``m`` tasks."""
    broker, noop = _broker(url)
    stream = broker.keys.stream
    async with broker:
        workers = Workers(url, workers_n)
        try:
            await workers.ready()
            a = probe.snapshot()
            cpu_w, cpu_p = workers.cpu(), _own_cpu()
            await _send_and_wait(noop, m, workers)
            await _until(probe, lambda: probe.command("XLEN", stream) == 0, "the acks", workers)
            b = probe.snapshot()
            cpu_w, cpu_p = workers.cpu() - cpu_w, _own_cpu() - cpu_p
        finally:
            workers.stop()
    d = b - a
    return {
        "tasks": m,
        "workers": workers_n,
        "wall_s": d.wall,
        "tasks_per_s": m / d.wall,
        "redis_cpu_s": d.cpu,
        "redis_cpu_us_per_task": d.cpu * 1e6 / m,
        "redis_busy": d.cpu / d.wall,
        "workers_cpu_s": cpu_w,
        "producer_cpu_s": cpu_p,
        "commands_per_task": d.commands / m,
        "bytes_in_per_task": d.net_in / m,
        "bytes_out_per_task": d.net_out / m,
        "calls_per_task": {k: v / m for k, v in sorted(d.calls.items())},
    }


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------ attribution


def attribute(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per path: commands, bytes in and out; per (path, command name): calls."""
    out: dict[str, dict[str, Any]] = {
        p: {"commands": 0, "bytes_in": 0, "bytes_out": 0, "calls": Counter()} for p in PATHS
    }
    for r in records:
        row = out[r.path]
        if r.args:
            row["commands"] += 1
            row["calls"][r.name] += 1
        row["bytes_in"] += r.bytes_in
        row["bytes_out"] += r.bytes_out
    return out


def attribute_minus(
    a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    out = {}
    for p in PATHS:
        calls = Counter(a[p]["calls"])
        calls.subtract(b[p]["calls"])
        out[p] = {k: a[p][k] - b[p][k] for k in ("commands", "bytes_in", "bytes_out")}
        out[p]["calls"] = Counter({k: v for k, v in calls.items() if v > 0})
    return out


def by_path(values: dict[str, int], paths: dict[str, dict[str, Any]]) -> dict[str, Counter[str]]:
    """Per path, the part of each command name's figure (calls, usec of the direct run)
    that is the path's: split by the calls the proxy saw of that name on each path. A
    name the proxy did not see (a command run inside a script) is "other"."""
    out: dict[str, Counter[str]] = {p: Counter() for p in PATHS}
    for name, value in values.items():
        base = name.split("|", 1)[0]  # commandstats names subcommands "xgroup|create"
        shares = {p: paths[p]["calls"].get(base, 0) for p in PATHS}
        total = sum(shares.values())
        if not total:
            out["other"][name] += value
            continue
        for p, c in shares.items():
            if c:
                out[p][name] += value * c / total
    return out


# ------------------------------------------------------------------ saturation


Script = list[bytes | list[bytes]]  # encoded commands; a PUBLISH is left as its words


def replay_script(records: list[Record]) -> Script:
    """The recorded commands, ready to be sent again (see :func:`saturate`)."""
    out: Script = []
    for r in records:
        if not r.args or r.args[0].upper() in _NOT_REPLAYED:
            continue
        args = list(r.args)
        name = args[0].upper()
        if name == b"XADD" and isinstance(r.reply, bytes) and b"*" in args:
            args[args.index(b"*")] = r.reply
        if name == b"XREADGROUP":
            upper = [a.upper() for a in args]
            if b"BLOCK" in upper:
                i = upper.index(b"BLOCK")
                del args[i : i + 2]
        out.append(args if name == b"PUBLISH" else encode(*args))
    return out


def _blob(script: Script, i: int) -> tuple[bytes, set[bytes]]:
    """Connection ``i``'s bytes (in database ``i``, its announcements on channels of its
    own) and those channels."""
    parts, channels = [encode("SELECT", i)], set()
    for p in script:
        if isinstance(p, bytes):
            parts.append(p)
        else:
            channel = p[1] + b":%d" % i
            channels.add(channel)
            parts.append(encode(p[0], channel, *p[2:]))
    parts.append(encode("ECHO", END))
    return b"".join(parts), channels


END = b"bench-capacity-end"


def _errors(probe: Probe) -> Counter[str]:
    """Error replies the server sent so far, by their first word (INFO errorstats)."""
    out: Counter[str] = Counter()
    for line in probe.command("INFO", "errorstats").decode().splitlines():
        if line.startswith("errorstat_"):
            kind, fields = line[10:].split(":", 1)
            out[kind] = int(fields.split("=", 1)[1])
    return out


def _drain(s: socket.socket, until: bytes | None = None) -> None:
    """Read and drop what comes, until ``until`` ends it (or the socket is closed)."""
    tail = b""
    with contextlib.suppress(OSError):
        while until is None or not tail.endswith(until):
            data = s.recv(1 << 20)
            if not data:
                if until is None:
                    return
                raise ConnectionError("redis-server closed a replay connection")
            if until is not None:
                tail = (tail + data)[-len(until) :]


def saturate(
    port: int, probe: Probe, script: Script, conns: int, subscribers: int = 1
) -> dict[str, Any]:
    """``conns`` connections, each in a database of its own with ``subscribers`` of its
    own (the run had one, the producer), send the whole script at once and read the
    replies as they come (unparsed: the last is an ``ECHO`` of a marker), so that the
    server runs flat out. Afterwards each database is checked: its stream is empty and
    nothing is pending (the replay did the work, not errors)."""
    probe.command("FLUSHALL")
    blobs = [_blob(script, i + 1) for i in range(conns)]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    subs = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns * subscribers)]
    for sub, (_, channels) in zip(subs, blobs * subscribers, strict=True):
        if channels:
            sub.sendall(encode("SUBSCRIBE", *sorted(channels)))
            _drain(sub, b":%d\r\n" % len(channels))
    end = b"$%d\r\n%s\r\n" % (len(END), END)
    draining = [threading.Thread(target=_drain, args=(sub,)) for sub in subs]
    for t in draining:
        t.start()
    errors = _errors(probe)
    before = probe.snapshot()
    threads = []
    for s, (blob, _) in zip(socks, blobs, strict=True):
        threads.append(threading.Thread(target=_drain, args=(s, end)))
        threads.append(threading.Thread(target=s.sendall, args=(blob,)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = probe.snapshot()
    errors = _errors(probe) - errors
    for s in socks + subs:
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread in recv(), as close() does not
        s.close()
    for t in draining:
        t.join()
    left = 0
    for i in range(conns):
        probe.command("SELECT", i + 1)
        left += sum(probe.command("XLEN", k) for k in probe.command("KEYS", "*:stream*"))
    probe.command("SELECT", 0)
    probe.command("FLUSHALL")
    d = after - before
    return {
        "connections": conns,
        "subscribers": subscribers,
        "commands": d.commands,
        "wall_s": wall,
        "commands_per_s": d.commands / wall,
        "redis_cpu_s": d.cpu,
        "redis_busy": d.cpu / wall,
        "redis_cpu_us_per_command": d.cpu * 1e6 / max(1, d.commands),
        "bytes_in": d.net_in,
        "bytes_out": d.net_out,
        "errors": dict(errors),
        "entries_left": left,
    }


# -------------------------------------------------------------------- report


def build(args: argparse.Namespace, server: RedisServer) -> dict[str, Any]:
    import trio

    n = args.tasks
    probe = Probe(server.port)
    try:
        runs = []
        for i in range(args.repeat):
            print(
                f"phases, straight to Redis ({n} tasks) [{i + 1}/{args.repeat}] ...",
                file=sys.stderr,
                flush=True,
            )
            runs.append(trio.run(phases, server.url, probe, n, args.idle, None, None))
            probe.command("FLUSHALL")
        # The run of median Redis CPU counts; the others give the spread.
        runs.sort(key=lambda r: (r["send"] + r["run"]).cpu)
        direct = runs[len(runs) // 2]
        spread = [(r["send"] + r["run"]).cpu * 1e6 / n for r in runs]
        print(f"phases, through the recording proxy ({n} tasks) ...", file=sys.stderr, flush=True)
        marks: dict[str, int] = {}
        with Proxy(server.port) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            via = trio.run(phases, url, probe, n, args.idle, marks, proxy)
            with proxy.lock:
                records = list(proxy.records)
        probe.command("FLUSHALL")
        window = records[marks["send"] : marks["run end"]]
        paths = attribute(window)
        fixed = {
            name: attribute(records[marks[a] : marks[b]])
            for name, a, b in (
                ("producer open", "open", "opened"),
                ("worker start", "opened", "idle"),
                ("worker idle", "idle", "idle end"),
                ("worker stop", "idle end", "send"),
            )
        }
        paths = attribute_minus(paths, fixed["worker start"])
        print(
            f"saturation: the recorded commands on {args.connections} connections ...",
            file=sys.stderr,
            flush=True,
        )
        script = replay_script(window)
        # Three rounds; the one that kept Redis busiest (the least disturbed) counts.
        # Three rounds with a subscriber a connection, three with --fanout, alternating.
        rounds, fans = [], []
        for _ in range(3):
            rounds.append(saturate(server.port, probe, script, args.connections))
            fans.append(saturate(server.port, probe, script, args.connections, args.fanout))
        sat = max(rounds, key=lambda r: r["redis_busy"])
        sat["rounds_cpu_us_per_command"] = [r["redis_cpu_us_per_command"] for r in rounds]
        sat["tasks"] = n * args.connections
        sat["rounds_cpu_us_per_task"] = sorted(
            r["redis_cpu_s"] * 1e6 / sat["tasks"] for r in rounds
        )
        base = statistics.median(r["redis_cpu_s"] for r in rounds) * 1e6 / sat["tasks"]
        fan = statistics.median(r["redis_cpu_s"] for r in fans) * 1e6 / sat["tasks"]
        extra = max(1, args.fanout - 1)
        out_1 = statistics.median(r["bytes_out"] for r in rounds)
        out_k = statistics.median(r["bytes_out"] for r in fans)
        sat["fanout"] = {
            "subscribers": args.fanout,
            "redis_cpu_us_per_task": fan,
            "per_extra_subscriber_us": (fan - base) / extra,
            "per_extra_subscriber_bytes_out": (out_k - out_1) / sat["tasks"] / extra,
        }
        # The median round's CPU (the steady figure); the busiest round's wall rate.
        sat["redis_cpu_us_per_task"] = base
        sat["redis_cpu_us_per_command"] = statistics.median(sat["rounds_cpu_us_per_command"])
        sat["tasks_per_s"] = sat["tasks"] / sat["wall_s"]
        print(
            f"check: {args.workers} worker processes + the producer, {args.check_tasks} tasks ...",
            file=sys.stderr,
            flush=True,
        )
        chk = trio.run(check, server.url, probe, args.check_tasks, args.workers)
    finally:
        probe.close()
    res = _results(args, direct, via, paths, fixed, sat, chk)
    res["model"]["redis_cpu_us_per_task_runs"] = spread
    return res


def _results(
    args: argparse.Namespace,
    direct: dict[str, Counters],
    via: dict[str, Counters],
    paths: dict[str, dict[str, Any]],
    fixed: dict[str, dict[str, dict[str, Any]]],
    sat: dict[str, Any],
    chk: dict[str, Any],
) -> dict[str, Any]:
    n = args.tasks
    send, run = direct["send"], direct["run"]
    both = send + run

    usec, calls = by_path(both.usec, paths), by_path(both.calls, paths)
    table = {
        p: {
            "commands": sum(calls[p].values()) / n,
            "bytes_in": paths[p]["bytes_in"] / n,
            "bytes_out": paths[p]["bytes_out"] / n,
            "commandstats_us": sum(usec[p].values()) / n,
            "calls": {k: v / n for k, v in sorted(calls[p].items())},
            "proxied_calls": {k: v / n for k, v in sorted(paths[p]["calls"].items())},
        }
        for p in PATHS
    }
    proxied = {
        "commands": sum(paths[p]["commands"] for p in PATHS) / n,
        "bytes_in": sum(paths[p]["bytes_in"] for p in PATHS) / n,
        "bytes_out": sum(paths[p]["bytes_out"] for p in PATHS) / n,
    }
    cpu_task = both.cpu / n
    bytes_task = max(both.net_in, both.net_out) / n
    model = {
        "redis_cpu_us_per_task_run": cpu_task * 1e6,
        "tasks_per_s_at_run_batching": 1 / cpu_task if cpu_task else None,
        "redis_cpu_us_per_task_saturated": sat["redis_cpu_us_per_task"],
        "tasks_per_s_saturated": 1e6 / sat["redis_cpu_us_per_task"],
        "bytes_per_task_busier_direction": bytes_task,
        "tasks_per_s_by_link": {f"{g:g} Gbit/s": g * 1e9 / 8 / bytes_task for g in args.link_gbit},
    }
    chk["model_redis_busy"] = chk["tasks_per_s"] * cpu_task
    return {
        "commit": _commit(),
        "machine": _machine(),
        "python": platform.python_version(),
        "redis": redis_server_version(redis_server_binary() or "redis-server"),
        "tasks": n,
        "concurrency": CONCURRENCY,
        "paths": table,
        "paths_total_proxied": proxied,
        "phases": {k: d.per(n) | {"wall_s": d.wall} for k, d in direct.items()},
        "phases_fixed": {
            k: {
                "commands": d.commands,
                "bytes_in": d.net_in,
                "bytes_out": d.net_out,
                "redis_cpu_us": d.cpu * 1e6,
                "wall_s": d.wall,
                "calls": dict(sorted(d.calls.items())),
            }
            for k, d in direct.items()
            if k not in ("send", "run")
        },
        "send_and_run": both.per(n),
        "proxied_phases": {k: d.per(n) for k, d in via.items() if k in ("send", "run")},
        "fixed_paths": {
            k: {p: v["commands"] for p, v in f.items() if v["commands"]} for k, f in fixed.items()
        },
        "saturation": sat,
        "model": model,
        "check": chk,
    }


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "bus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() + (" (bus/ modified)" if dirty.stdout.strip() else "")


def _machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), load average {load} at start"


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _per_read(phase: dict[str, Any]) -> str:
    reads = phase.get("calls", phase.get("calls_per_task", {})).get("xreadgroup", 0)
    return f"{1 / reads:.1f}" if reads else "-"


def report(res: dict[str, Any]) -> list[str]:
    n = res["tasks"]
    lines = [
        f"python {res['python']}, redis-server {res['redis']}, {res['machine']}",
        f"commit {res['commit']}; {n} no-op tasks, 1 worker process (concurrency "
        f"{res['concurrency']}), kiq {INFLIGHT} in flight, every result waited for",
        "",
        "per task, by path (the send and run phases): commands and Redis usec from the "
        "commandstats of the direct run,",
        "each command name split over the paths by the calls the proxy saw; bytes in (to "
        "Redis) and out (from it) through the proxy",
        f"{'path':<13}{'cmds':>7}{'bytes in':>10}{'bytes out':>11}{'usec':>8}  commands",
    ]
    for p, row in res["paths"].items():
        calls = ", ".join(f"{k} {v:.3g}" for k, v in row["calls"].items())
        lines.append(
            f"{p:<13}{row['commands']:>7.3f}{row['bytes_in']:>10.1f}{row['bytes_out']:>11.1f}"
            f"{row['commandstats_us']:>8.2f}  {calls}"
        )
    tot = res["paths_total_proxied"]
    sr = res["send_and_run"]
    lines.append(
        f"{'total':<13}{sr['commands']:>7.3f}{tot['bytes_in']:>10.1f}"
        f"{tot['bytes_out']:>11.1f}{sr['commandstats_us']:>8.2f}"
    )
    lines.append(
        f"(through the proxy: {tot['commands']:.3f} commands a task, "
        f"{_per_read(res['proxied_phases']['run'])} tasks a read, straight "
        f"{_per_read(res['phases']['run'])}; commands a script runs are counted by Redis, "
        "not seen by the proxy)"
    )
    lines.append("")
    lines.append("per task, by phase (INFO counters of the direct run):")
    lines.append(
        f"{'phase':<13}{'cmds':>7}{'bytes in':>10}{'bytes out':>11}{'cmdstat us':>11}"
        f"{'Redis CPU us':>13}"
    )
    for name in ("send", "run"):
        ph = res["phases"][name]
        lines.append(
            f"{name:<13}{ph['commands']:>7.3f}{ph['bytes_in']:>10.1f}{ph['bytes_out']:>11.1f}"
            f"{ph['commandstats_us']:>11.2f}{ph['redis_cpu_us']:>13.2f}"
        )
    lines.append(
        f"{'send + run':<13}{sr['commands']:>7.3f}{sr['bytes_in']:>10.1f}{sr['bytes_out']:>11.1f}"
        f"{sr['commandstats_us']:>11.2f}{sr['redis_cpu_us']:>13.2f}"
    )
    for name in ("send", "run"):
        calls = res["phases"][name]["calls"]
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in calls.items()))
    lines.append("fixed costs (not per task):")
    for name, f in res["phases_fixed"].items():
        lines.append(
            f"  {name}: {f['commands']} commands, {f['bytes_in']:,} B in, {f['bytes_out']:,} B "
            f"out, Redis CPU {f['redis_cpu_us']:,.0f} us in {f['wall_s']:.2f} s"
        )
    s = res["saturation"]
    lines += [
        "",
        f"saturation: the {s['commands']:,} recorded commands of {s['tasks']:,} tasks replayed "
        f"on {s['connections']} pipelined connections, three rounds:",
        f"  Redis CPU (median round): {s['redis_cpu_us_per_command']:.2f} us a command, "
        f"{s['redis_cpu_us_per_task']:.1f} us a task",
        f"  by the wall clock (busiest round, {s['wall_s']:.2f} s): {s['commands_per_s']:,.0f} "
        f"commands/s = {s['tasks_per_s']:,.0f} tasks/s, Redis busy {s['redis_busy']:.0%} of "
        "one core"
        + (f"; errors {s['errors']}" if s["errors"] else "")
        + (f"; {s['entries_left']} entries left unacked" if s["entries_left"] else ""),
        f"  one core's worth of this mix: {1e6 / s['redis_cpu_us_per_command']:,.0f} commands/s "
        f"(1 / CPU a command); CPU a command in the three rounds: "
        + ", ".join(f"{v:.2f}" for v in s["rounds_cpu_us_per_command"])
        + " us",
        f"  with {s['fanout']['subscribers']} subscribers a channel (processes waiting results): "
        f"{s['fanout']['redis_cpu_us_per_task']:.1f} us a task; each subscribed process more "
        f"costs {s['fanout']['per_extra_subscriber_us']:.2f} us and "
        f"{s['fanout']['per_extra_subscriber_bytes_out']:.0f} B out a task (medians of three)",
    ]
    m = res["model"]
    runs = m.get("redis_cpu_us_per_task_runs", [m["redis_cpu_us_per_task_run"]])
    links = ", ".join(f"{k}: {v:,.0f} tasks/s" for k, v in m["tasks_per_s_by_link"].items())
    lines += [
        "",
        "model: tasks/s one Redis core carries = 1 / (Redis CPU-seconds a task)",
        f"  at the batching of the run above: {m['redis_cpu_us_per_task_run']:.1f} us a task "
        f"-> {m['tasks_per_s_at_run_batching']:,.0f} tasks/s (the median of "
        f"{len(runs)} runs: {_span(runs)} us)",
        f"  fully pipelined (saturation):     {m['redis_cpu_us_per_task_saturated']:.1f} us a "
        f"task -> {m['tasks_per_s_saturated']:,.0f} tasks/s (three rounds: "
        f"{_span(res['saturation']['rounds_cpu_us_per_task'])} us)",
        f"  network: {m['bytes_per_task_busier_direction']:.0f} B a task in the busier "
        f"direction -> {links}",
    ]
    c = res["check"]
    used = c["workers_cpu_s"] + c["producer_cpu_s"] + c["redis_cpu_s"]
    cpu_tasks = (c["workers_cpu_s"] + c["producer_cpu_s"]) * 1e6 / c["tasks"]
    lines += [
        "",
        f"check: {c['workers']} worker processes + the producer, {c['tasks']:,} tasks in "
        f"{c['wall_s']:.2f} s = {c['tasks_per_s']:,.0f} tasks/s",
        f"  Redis CPU {c['redis_cpu_s']:.2f} s = {c['redis_cpu_us_per_task']:.1f} us a task, "
        f"busy {c['redis_busy']:.0%} of one core (the model says "
        f"{c['model_redis_busy']:.0%} at this rate)",
        f"  workers CPU {c['workers_cpu_s']:.2f} s, producer CPU {c['producer_cpu_s']:.2f} s, "
        f"Redis {c['redis_cpu_s']:.2f} s: {used / c['wall_s']:.2f} of {os.cpu_count()} cores",
        f"  {c['commands_per_task']:.2f} commands, {c['bytes_in_per_task']:.0f} B in, "
        f"{c['bytes_out_per_task']:.0f} B out a task, {_per_read(c)} tasks a read; the "
        f"workers and the producer used {cpu_tasks:.0f} us of CPU a task, "
        f"{cpu_tasks / c['redis_cpu_us_per_task']:.1f}x Redis's",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5000, help="tasks of the measured phases")
    ap.add_argument("--check-tasks", type=int, default=20_000, help="tasks of the check run")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the check run")
    ap.add_argument("--connections", type=int, default=8, help="connections of the saturation")
    ap.add_argument(
        "--fanout", type=int, default=4, help="subscribers a channel in the fan-out round"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of the direct phases (the median counts)"
    )
    ap.add_argument("--idle", type=float, default=3.0, help="seconds a worker idles (measured)")
    ap.add_argument(
        "--link-gbit",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[1.0, 10.0],
        help="network links to bound by, Gbit/s, comma-separated",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    ap.add_argument("--_worker", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker_main(args._worker, CONCURRENCY)
    binary = redis_server_binary()
    if binary is None:
        print("redis-server is not installed (not on PATH): nothing to measure")
        return 2
    _quiet()
    with RedisServer(binary) as server:
        res = build(args, server)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print()
        print("\n".join(report(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
