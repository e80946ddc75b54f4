"""A Trio web service that embeds the bus and mounts its dashboard.

The service is a Starlette application served by hypercorn in Trio mode: its own
route ``/thumbnails/{width}`` hands work to an in-memory broker, and the bus dashboard
is mounted at ``/bus/`` (read-only: no ``allow_actions``). The broker carries an
``ActivityMiddleware``, so the dashboard shows the tasks running now and recent
failures. Try it with::

    python examples/dashboard_service.py 8000      # or BUS_EXAMPLE_PORT=8000
    curl http://127.0.0.1:8000/thumbnails/64
    # and open http://127.0.0.1:8000/bus/ in a browser

Port 0 (the default) lets the system pick a free port; the service prints its URL.
Needs the extra ``trio-bus[dashboard]``. Stop it with Ctrl+C.
"""

from __future__ import annotations

import os
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import bus
import bus.dashboard
from bus.activity import ActivityMiddleware

broker = bus.InMemoryBroker(concurrency=4).with_middlewares(ActivityMiddleware())


@broker.task(name="images.thumbnail", timeout=5)
async def thumbnail(width: int, ctx: bus.Context = bus.CONTEXT) -> str:
    for step in range(1, 4):
        await ctx.set_progress(step / 3)
        await trio.sleep(0.01)  # stands for real work
    if width <= 0:
        raise ValueError(f"width must be positive, not {width}")
    return f"thumbnail {width}px"


async def make_thumbnail(request: Request) -> JSONResponse:
    handle = await thumbnail.kiq(int(request.path_params["width"]))
    result = await handle.wait_result(timeout=10)
    if result.is_err:
        return JSONResponse({"error": str(result.error)}, status_code=422)
    return JSONResponse({"thumbnail": result.return_value, "task_id": handle.task_id})


web = Starlette(
    routes=[
        Route("/thumbnails/{width:int}", make_thumbnail),
        Mount("/bus", app=bus.dashboard.app(broker)),
    ]
)


async def main(
    port: int | None = None, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the service's URL."""
    if port is None:
        port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("BUS_EXAMPLE_PORT", 0))
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with broker, trio.open_nursery() as nursery:
        urls = await nursery.start(serve, web, config)  # type: ignore[arg-type]
        print(f"listening on {urls[0]} (dashboard: {urls[0]}/bus/)", flush=True)
        task_status.started(urls[0])


if __name__ == "__main__":
    trio.run(main)
