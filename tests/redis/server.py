"""Start and stop a private redis-server for tests (no Trio: plain subprocess + socket)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import attrs
import pytest

__all__ = ["RedisServer", "free_port", "start_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("BUS_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BUS_REQUIRE_REDIS=1 requires it")
        pytest.skip("redis-server is not installed (set BUS_REQUIRE_REDIS=1 to fail instead)")
    return path


@attrs.define
class RedisServer:
    """A running redis-server; ``url`` to reach it, ``restart()`` / ``stop()`` to control it."""

    directory: Path
    port: int
    appendonly: bool
    process: subprocess.Popen[bytes] | None = None
    #: More redis-server arguments (TLS, unix socket, requirepass ...).
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            _binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always" if self.appendonly else "everysec",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        p, self.process = self.process, None
        if p is None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_server(
    directory: Path, *, appendonly: bool = False, extra_args: tuple[str, ...] = ()
) -> RedisServer:
    server = RedisServer(directory, free_port(), appendonly, extra_args=extra_args)
    server.start()
    return server
