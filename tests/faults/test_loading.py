"""Redis answering "not now" (``-LOADING``: loading its data after a restart) to the
writes that finish a delivery.

A redis-server started again after a stop accepts connections while it loads its
append-only file and answers every command with ``-LOADING`` until it is done: a
worker whose connection comes back in that window writes the acks and the retries it
kept through the outage into it. Those writes were logged as refused and their entries
forgotten by the reader, still pending in Redis: read again, they ran a second time (a
task whose ack was refused: two successful runs, once in a full run of the 60 s stop
of tests/faults/test_outages.py; a retry refused: its failed attempt ran again).

Here the window is made on purpose and long: ``DEBUG RELOAD`` with a delay per key
loaded, while the finished task waits in a middleware hook between its result and its
ack (or its retry), so that the ack (or the retry) is written while Redis loads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import bus
from bus.redis import RedisBroker
from bus.redis._client import Connection, ReplyError
from tests.redis.server import RedisServer, start_server

pytestmark = pytest.mark.redis

#: Keys loaded at KEY_DELAY_US each: Redis answers LOADING for about 4 s.
FILLER = 400
KEY_DELAY_US = 10_000


@pytest.fixture
def debug_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path, extra_args=("--enable-debug-command", "yes"))
    try:
        yield server
    finally:
        server.stop()


async def _loading(url: str, nursery: trio.Nursery) -> trio.Event:
    """Make Redis load its data again, slowly (``DEBUG RELOAD``, ``key-load-delay``);
    returns once it answers LOADING. The event is set when the reload is over."""
    conn = await Connection.connect(url, name="test-reload")
    await nursery.start(conn.run)
    await conn.pipeline(
        [
            ("CONFIG", "SET", "key-load-delay", KEY_DELAY_US),
            # Clients are answered (LOADING) every KiB loaded, not every 2 MB.
            ("CONFIG", "SET", "loading-process-events-interval-bytes", 1024),
            ("MSET", *(x for i in range(FILLER) for x in (f"filler:{i}", "x"))),
        ]
    )
    over = trio.Event()

    async def reload() -> None:
        await conn.execute("DEBUG", "RELOAD", timeout=120)
        await conn.execute("CONFIG", "SET", "key-load-delay", 0)
        await conn.aclose()
        over.set()

    nursery.start_soon(reload)
    probe = await Connection.connect(url, name="test-probe")
    await nursery.start(probe.run)
    while True:
        try:
            await probe.execute("PING", timeout=30)
        except ReplyError as exc:
            if exc.code == "LOADING":
                await probe.aclose()
                return over
            raise
        await trio.sleep(0.005)


@pytest.mark.parametrize("finish", ["ack", "retry"])
async def test_a_finishing_write_refused_while_redis_loads_is_written_again(
    debug_server: RedisServer, finish: str
) -> None:
    """The ack of a finished task (``ack``) or the retry of a failed attempt
    (``retry``) written while Redis loads: written again once it answers, and nothing
    runs twice (each attempt once, the task's success once)."""
    url = debug_server.url
    attempts: list[int] = []
    runs: Counter[str] = Counter()
    held, hold = trio.Event(), trio.Event()

    class WaitBeforeFinish(bus.Middleware):
        """Holds the first finished attempt between its result and its ack (``ack``:
        post_save), or between its failure and its retry (``retry``: on_error)."""

        async def _hold(self) -> None:
            if not held.is_set():
                held.set()
                await hold.wait()

        async def post_save(self, message: bus.TaskMessage, result: Any) -> None:
            if finish == "ack":
                await self._hold()

        async def on_error(self, message: bus.TaskMessage, result: Any, error: Any) -> None:
            if finish == "retry":
                await self._hold()

    async def job(token: str, ctx: bus.Context) -> str:
        attempts.append(ctx.attempt)
        if finish == "retry" and ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        runs[token] += 1
        return token

    # A short visibility timeout: an entry the reader forgot is reclaimed within a
    # second, and runs again, unless its ack (or its retry) is written meanwhile.
    options: dict[str, Any] = {
        "prefix": f"f{bus.TaskID.new()[-12:]}",
        "queue": "q",
        "visibility_timeout": 1.0,
    }
    producer, worker = RedisBroker(url, **options), RedisBroker(url, **options)
    worker.with_middlewares(WaitBeforeFinish())
    task = producer.register_task(job, name="f.job", retries=3, retry_backoff=0.05)
    worker.register_task(job, name="f.job", retries=3, retry_backoff=0.05)

    async def pending() -> int:
        reply = await producer.client.execute("XPENDING", producer.keys.stream, producer.group)
        return int(reply[0] or 0)

    with trio.fail_after(60):
        async with producer, trio.open_nursery() as nursery:
            w = await nursery.start(worker.run_worker, 4)
            handle = await task.kiq("a")
            await held.wait()  # stored (ack) or failed (retry): not finished in Redis yet
            over = await _loading(url, nursery)
            hold.set()  # the ack (or the retry) is written now: Redis answers LOADING
            await over.wait()
            result = await handle.wait_result(timeout=30)
            assert result.return_value == "a"
            # Done when nothing is pending any more: the ack of the run that stored the
            # result is written (a forgotten entry stays pending until it ran again).
            while await pending():  # noqa: ASYNC110 (watching Redis)
                await trio.sleep(0.05)
            w.stop()
    assert runs == {"a": 1}
    assert attempts == ([1] if finish == "ack" else [1, 2])
