"""The python block of docs/redis-client.md runs against the test server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.redis.server import RedisServer

pytestmark = pytest.mark.redis

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis-client.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


async def test_the_example_runs(redis_server: RedisServer) -> None:
    [code] = _blocks()
    namespace: dict[str, Any] = {"__name__": "docs_redis_client"}
    exec(compile(code, str(DOC), "exec"), namespace)
    with trio.fail_after(10):
        await namespace["main"](redis_server.url)
