"""Make docs/dashboard.png: a private redis-server, two ``bus worker`` processes of
tests/observability/demo_app.py, a producer sending work for about a minute, the
dashboard, and headless Chromium taking the picture.

    .venv/bin/python -m tests.observability.screenshot docs/dashboard.png

Not part of the test suite (it takes a minute on purpose: the charts need history).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import trio

import bus
from bus.dashboard import serve
from tests.observability.browser import open_browser
from tests.observability.support import bus_env, run_bus
from tests.redis.server import start_server

SECONDS = 70


async def scene(url: str, broker: bus.Broker) -> bytes:
    env = bus_env(url, "demo")
    args = ["worker", "tests.observability.demo_app:broker", "--processes", "2"]
    async with run_bus(env, *args, "--log-level", "error") as workers:
        await workers.wait_for(r"bus worker:", count=2)
        async with broker, trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve(
                    broker, port=0, allow_actions=True, sample_interval=2.0,
                    history=SECONDS, task_status=task_status,
                )
            )  # fmt: skip
            t = broker.tasks
            for day in ("2026-11-29", "2026-11-30", "2026-12-01"):
                await t["reports.build"].kiq(day)
            end = trio.current_time() + SECONDS - 10
            i = 0
            while trio.current_time() < end:
                i += 1
                for _ in range(random.randint(2, 12)):
                    await t["emails.send"].kiq(f"user{i}@example.com")
                await t["images.resize"].kiq(f"photo{i}.jpg", 5000 if i % 9 == 0 else 800)
                if i % 15 == 0:
                    await t["reports.build"].kiq(f"2026-12-{i // 15:02d}")
                await trio.sleep(0.5)
            for n in range(40):  # a backlog for the queue chart's last points
                await t["emails.send"].kiq(f"late{n}@example.com")
            await trio.sleep(4)
            with tempfile.TemporaryDirectory() as profile:
                async with open_browser(Path(profile)) as browser:
                    page = await browser.new_page()
                    await page.goto(urls[0] + "/")
                    await page.wait_for("!!document.querySelector('#running tr[data-task-id]')")
                    png = await page.screenshot(1280, 1000)
            nursery.cancel_scope.cancel()
    return png


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            os.environ.update(BUS_TEST_URL=server.url, BUS_TEST_PREFIX="demo")
            from tests.observability import demo_app

            png = trio.run(scene, server.url, demo_app.broker)
        finally:
            server.stop()
    out.write_bytes(png)
    print(f"wrote {out} ({len(png)} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
