"""Sentinel and cluster topologies of private redis-servers for the tests (no Trio:
plain subprocesses and sockets, like ``tests.redis.server``)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from tests.redis.server import RedisServer, _binary, free_port, start_server

__all__ = ["SentinelSetup", "command", "start_sentinels", "wait_until"]

SERVICE = "busmaster"


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command to ``127.0.0.1:port`` (inline protocol); the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\r\n"):
                s.settimeout(0.05)  # more of a multi-line reply?
                try:
                    more = s.recv(65536)
                except TimeoutError:
                    break
                if not more:
                    break
                data += more
        return data


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``check`` (a condition on the servers, not a guess at a duration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not within {timeout} s: {what}")


@attrs.define
class SentinelSetup:
    master: RedisServer
    replica: RedisServer
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        reply = command(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply.split(b"\r\n")[4])

    def stop(self) -> None:
        for p in self.sentinels:
            p.kill()
            p.wait()
        self.replica.stop()
        self.master.stop()


def start_sentinels(directory: Path) -> SentinelSetup:
    """A master, its replica, and three sentinels watching it (quick failover:
    down after 300 ms); returns once the sentinels know the replica and each other."""
    (directory / "m").mkdir()
    (directory / "r").mkdir()
    fast = ("--repl-diskless-sync-delay", "0")  # a replica syncs at once, not in 5 s
    master = start_server(directory / "m", extra_args=fast)
    replica = start_server(
        directory / "r", extra_args=(*fast, "--replicaof", "127.0.0.1", str(master.port))
    )
    wait_until(
        lambda: b"master_link_status:up" in command(replica.port, "INFO", "replication"),
        "the replica is in sync",
    )
    ports = [free_port() for _ in range(3)]
    ids = {port: f"{port:040x}" for port in ports}
    procs: list[subprocess.Popen[bytes]] = []
    for port in ports:
        conf = directory / f"sentinel-{port}.conf"
        # Each sentinel is told of the replica and of the others up front (their
        # discovery by hello messages and INFO takes seconds).
        others = "".join(
            f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other} {ids[other]}\n"
            for other in ports
            if other != port
        )
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\nsentinel myid {ids[port]}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 300\n"
            f"sentinel failover-timeout {SERVICE} 2000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            f"sentinel known-replica {SERVICE} 127.0.0.1 {replica.port}\n{others}"
        )
        procs.append(
            subprocess.Popen(
                [_binary(), str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=directory,
            )
        )
    setup = SentinelSetup(master, replica, ports, procs)
    try:
        for port in ports:
            wait_until(
                lambda port=port: _knows_all(port),  # type: ignore[misc]
                f"sentinel {port} knows the replica and the other sentinels",
            )
    except BaseException:
        setup.stop()
        raise
    return setup


def _knows_all(port: int) -> bool:
    reply = command(port, "SENTINEL", "MASTER", SERVICE)
    return _field(reply, b"num-other-sentinels") == b"2" and _field(reply, b"num-slaves") == b"1"


def _field(reply: bytes, name: bytes) -> bytes | None:
    """A field of a ``SENTINEL MASTER`` reply (a flat array of bulk strings)."""
    lines = reply.split(b"\r\n")
    for i, line in enumerate(lines):
        if line == name and i + 2 < len(lines):
            return lines[i + 2]
    return None
