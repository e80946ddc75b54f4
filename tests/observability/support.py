"""Helpers of the observability tests: ``bus`` subprocesses under Trio, waiting for a
condition another process makes true, and a small HTTP GET."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.observability.redis_app:broker"
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], interval: float = 0.05) -> T:
    """Call ``check`` until it returns something true (or stops raising
    AssertionError) and return that; the caller's ``trio.fail_after`` is the deadline.
    For state another process changes: there is nothing to wait on here."""
    while True:
        try:
            got = await check()
        except AssertionError:
            got = None
        if got:
            return got
        await trio.sleep(interval)


class BusProcess:
    """A ``python -m bus ...`` subprocess whose stderr lines are collected."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        buf = b""
        async for chunk in self.proc.stderr:
            buf += chunk
            *done, buf = buf.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in done]
            self._changed.set()
            self._changed = trio.Event()
        if buf:
            self.lines.append(buf.decode(errors="replace"))
        self._changed.set()

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in stderr lines, once seen."""
        rx = re.compile(pattern)
        while True:
            found = [m for m in map(rx.search, self.lines) if m]
            if len(found) >= count:
                return found[:count]
            if self.proc.returncode is not None and self._changed.is_set():
                raise AssertionError(f"bus exited ({self.proc.returncode}):\n" + self.output)
            await self._changed.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def run_bus(env: dict[str, str], *args: str) -> AsyncIterator[BusProcess]:
    """Run ``bus ARGS`` until the block ends, then SIGTERM it (SIGKILL after 15 s)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bus", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    bp = BusProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bp._read)
            try:
                yield bp
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    finally:
        if proc.stderr is not None:
            await proc.stderr.aclose()


def bus_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BUS_TEST_URL": url,
        "BUS_TEST_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
        **extra,
    }


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url, **kwargs)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, val = line.rpartition(" ")
        if head.split("{", 1)[0] != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(val)
    return None
