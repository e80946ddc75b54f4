"""A Trio TCP service that embeds the bus: each request line becomes a task.

The server listens on 127.0.0.1. For each line a client sends, it sends a task to an
in-memory broker, waits for the result (at most 5 seconds, then cancels the task), and
writes one line back: ``ok <json>`` or ``error <reason>``. Try it with::

    python examples/embedded_service.py 8765      # or BUS_EXAMPLE_PORT=8765
    printf 'hello big world\\n' | nc 127.0.0.1 8765

Port 0 (the default) lets the system pick a free port; the server prints it.
Stop it with Ctrl+C: the broker then cancels whatever runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import trio

import bus

broker = bus.InMemoryBroker(concurrency=16, shutdown_timeout=5)


@broker.task(name="text.analyse", timeout=2)
async def analyse(text: str) -> dict[str, object]:
    await trio.sleep(0.01)  # stands for real work: a database, an HTTP call
    if not text.strip():
        raise ValueError("empty line")
    words = text.split()
    return {"words": len(words), "longest": max(words, key=len), "upper": text.upper()}


async def handle_line(line: str) -> str:
    """Offload one request to the bus and turn its result into a reply line."""
    handle = await analyse.kiq(line)
    try:
        result = await handle.wait_result(timeout=5)
    except bus.ResultTimeout:
        await handle.cancel()
        return "error timeout"
    if result.is_err:
        return f"error {result.error}"
    return "ok " + json.dumps(result.return_value, sort_keys=True)


async def serve_client(stream: trio.SocketStream) -> None:
    buffer = b""
    async with stream:
        async for chunk in stream:
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                reply = await handle_line(raw.decode("utf-8", errors="replace"))
                await stream.send_all(reply.encode() + b"\n")


def port_from_command_line() -> int:
    if len(sys.argv) > 1:
        return int(sys.argv[1])
    return int(os.environ.get("BUS_EXAMPLE_PORT", "0"))


async def main(
    port: int | None = None, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the port actually used."""
    if port is None:
        port = port_from_command_line()
    async with broker, trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, serve_client, port, host="127.0.0.1")
        listeners = await nursery.start(serve)
        bound = listeners[0].socket.getsockname()[1]
        print(f"listening on 127.0.0.1:{bound}", flush=True)
        task_status.started(bound)


if __name__ == "__main__":
    trio.run(main)
