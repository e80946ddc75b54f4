"""Helpers of the security tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

#: A secret long enough (32 bytes at least) for the tests that sign.
SECRET = "issue-18-test-secret-0123456789abcdef"


async def until(check: Callable[[], Awaitable[bool]], interval: float = 0.02) -> None:
    """Poll ``check`` (another process's or actor's state in Redis) until it holds; the
    caller's ``trio.fail_after`` is the deadline."""
    while not await check():  # noqa: ASYNC110 (state in Redis: nothing to wait on)
        await trio.sleep(interval)
