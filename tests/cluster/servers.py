"""Sentinel and cluster topologies of private redis-servers for the tests (no Trio:
plain subprocesses and sockets, like ``tests.redis.server``)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from tests.redis.server import RedisServer, _binary, free_port, start_server

__all__ = [
    "ClusterSetup",
    "SentinelSetup",
    "command",
    "start_cluster",
    "start_sentinels",
    "wait_until",
]

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
    down after 500 ms); returns once the sentinels know the replica and each other."""
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
            f"sentinel down-after-milliseconds {SERVICE} 500\n"
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


@attrs.define
class ClusterSetup:
    """Three masters and three replicas on 127.0.0.1."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def masters(self) -> list[int]:
        """The ports of the masters now (from the first node that answers)."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                reply = command(node.port, "CLUSTER", "NODES")
            except OSError:
                continue
            ports = []
            for line in reply.decode(errors="replace").splitlines():
                fields = line.split()
                if len(fields) > 2 and "master" in fields[2] and "fail" not in fields[2]:
                    ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
            return sorted(ports)
        return []

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)


def start_cluster(directory: Path) -> ClusterSetup:
    """Six ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create
    --cluster-replicas 1``; returns once every node says the cluster is ok."""
    nodes: list[RedisServer] = []
    setup = ClusterSetup(nodes)
    try:
        for i in range(6):
            (directory / f"n{i}").mkdir()
            nodes.append(
                start_server(
                    directory / f"n{i}",
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "1000",
                        "--repl-diskless-sync-delay", "0",
                        # The bus port (else port + 10000, past 65535 for a high port).
                        "--cluster-port", str(free_port()),
                    ),
                )
            )  # fmt: skip
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        for node in nodes:
            wait_until(
                lambda node=node: b"cluster_state:ok" in command(node.port, "CLUSTER", "INFO"),  # type: ignore[misc]
                f"node {node.port} sees the cluster ok",
            )
    except BaseException:
        setup.stop()
        raise
    return setup
