"""The python blocks of docs/redis.md compile, and the one full program runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_blocks_compile() -> None:
    blocks = _blocks()
    assert blocks
    for b in blocks:
        compile(b, str(DOC), "exec")


async def test_first_block_runs(redis_server: RedisServer) -> None:
    code = _blocks()[0].replace("redis://127.0.0.1:6379", redis_server.url)
    code = code.replace('queue="emails"', 'queue="docs-emails"')
    ns: dict[str, Any] = {"__name__": "docs_redis"}
    exec(compile(code, str(DOC), "exec"), ns)
    broker = ns["broker"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, broker:
            w = await nursery.start(broker.run_worker, 2)
            handle = await ns["send_email"].kiq("ada@example.com")
            assert (await handle.wait_result(timeout=5)).return_value == "sent to ada@example.com"
            w.stop()
