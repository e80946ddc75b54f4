"""examples/observability.py and examples/dashboard_service.py run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"obs_examples_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_observability_example() -> None:
    with trio.fail_after(10):
        out = await _load("observability").main()
    assert out["result"].return_value == "thumbnail 128px"
    assert (
        'bus_tasks_retried_total{queue="default",task_name="images.thumbnail"} 1.0'
        in out["metrics"]
    )
    assert len(out["traces"]) == 1  # the request, the send and both attempts: one trace
    assert [f["error_type"] for f in out["activity"].failures] == ["ValueError", "ConnectionError"]


async def test_dashboard_service_example() -> None:
    service = _load("dashboard_service")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(service.main, 0)
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                made = (await http.get("/thumbnails/64")).json()
                assert made["thumbnail"] == "thumbnail 64px"
                assert (await http.get("/thumbnails/0")).status_code == 422
                page = await http.get("/bus/")
                assert page.status_code == 200 and '<base href="/bus/">' in page.text
                assert (await http.get("/bus/static/dashboard.js")).status_code == 200
                overview = (await http.get("/bus/api/overview")).json()
                assert overview["broker"]["type"] == "InMemoryBroker"
                assert overview["failures"][0]["error"] == "width must be positive, not 0"
                lookup = (await http.get(f"/bus/api/tasks/{made['task_id']}")).json()
                assert lookup["result"]["status"] == "success"
                refused = await http.post("/bus/api/dead/purge", json={"confirm": True})
                assert refused.status_code == 403
            nursery.cancel_scope.cancel()
