"""Headless Chromium driven over the DevTools protocol (a websocket), for the
dashboard's browser test and the screenshot in docs/.

Debian's ``chromium`` package is the browser (``.ci/run`` installs it). No driver
package is needed: the protocol is JSON messages with ids over one websocket, spoken
here with trio-websocket. A fresh ``--user-data-dir`` per run; the browser listens
on a free port of 127.0.0.1 only and is closed (killed if need be) on the way out.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_or_skip() -> str:
    """The Chromium binary; skips the test when there is none (fails instead when
    BUS_REQUIRE_BROWSER=1, as in CI)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("BUS_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed, and BUS_REQUIRE_BROWSER=1 requires it")
        pytest.skip("chromium is not installed (apt-get install chromium; CI installs it)")
    return path


class ProtocolError(Exception):
    pass


class Page:
    """One tab, attached with a flat session on the browser's websocket."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, session=self.session, **params)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise ProtocolError(json.dumps(reply["exceptionDetails"])[:2000])
        return reply["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def wait_for(self, expression: str, interval: float = 0.05) -> Any:
        """Evaluate ``expression`` until its JSON value is truthy in Python (so a DOM
        node, which comes back as ``{}``, needs ``!!``); return it. The caller's
        fail_after is the deadline: the page changes as it polls its server."""
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            await trio.sleep(interval)

    async def click(self, selector: str) -> None:
        """A real click (mouse events at the element's centre), like a person's."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise ProtocolError(f"no element matches {selector!r}")
        x, y = box
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def type(self, selector: str, text: str) -> None:
        """Click into ``selector`` and type ``text`` there."""
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, width: int = 1280, height: int = 1000) -> bytes:
        """A PNG of the viewport at ``width`` x ``height``."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        reply = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        return base64.b64decode(reply["data"])


class Browser:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}

    async def _read(self) -> None:
        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                chan = self._waiting.pop(msg.get("id", -1), None)
                if chan is not None:
                    chan.send_nowait(msg)
        except ConnectionClosed:
            for chan in self._waiting.values():
                chan.close()  # their senders learn the browser went away

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[mid] = send
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        await self.ws.send_message(json.dumps(msg))
        try:
            reply = await recv.receive()
        except trio.EndOfChannel:
            raise ProtocolError(f"{method}: the browser closed the connection") from None
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        return page


@asynccontextmanager
async def open_browser(profile: Path) -> AsyncIterator[Browser]:
    """Start headless Chromium with a fresh profile in ``profile``; close it after."""
    binary = chromium_or_skip()
    proc = await trio.lowlevel.open_process(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        seen = b""
        url = None
        while url is None:
            chunk = await proc.stderr.receive_some()
            if not chunk:
                raise RuntimeError("chromium exited before it listened:\n" + seen.decode()[-3000:])
            seen += chunk
            found = re.search(rb"DevTools listening on (ws://\S+)", seen)
            url = found[1].decode() if found else None
        async with trio.open_nursery() as nursery:

            async def drain() -> None:  # keep its stderr pipe from filling up
                assert proc.stderr is not None
                while await proc.stderr.receive_some():
                    pass

            nursery.start_soon(drain)
            async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
                browser = Browser(ws)
                nursery.start_soon(browser._read)
                try:
                    yield browser
                finally:
                    with trio.move_on_after(5) as scope, contextlib.suppress(Exception):
                        scope.shield = True
                        await browser.send("Browser.close")
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stderr is not None:
                await proc.stderr.aclose()
