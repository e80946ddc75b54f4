"""The dashboard's workflows: listed in the overview (running and recent), one read by
id with its graph (SVG, escaped, coloured by state), on the in-memory broker and on
Redis."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import bus
from bus.dashboard import Dashboard, serve
from bus.dashboard._graph import STATE_COLORS, workflow_graph
from tests.observability.browser import chromium_or_skip, open_browser
from tests.observability.redis_app import make_broker
from tests.redis.server import RedisServer


def q(selector: str) -> str:
    """A script expression: the trimmed text of the first match of ``selector``."""
    return f"document.querySelector({json.dumps(selector)})?.textContent.trim() ?? null"


@asynccontextmanager
async def client(broker: bus.Broker) -> AsyncIterator[httpx.AsyncClient]:
    dashboard = Dashboard(broker, sample_interval=0.2)
    transport = httpx.ASGITransport(app=dashboard)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield http
    await dashboard.data.stop()


def memory_broker() -> tuple[bus.InMemoryBroker, trio.Event]:
    broker = bus.InMemoryBroker(concurrency=4)
    gate = trio.Event()

    @broker.task(name="add<b>")  # a name that must be escaped
    async def add(a: int, b: int = 1) -> int:
        return a + b

    @broker.task(name="wait")
    async def wait(a: int) -> int:
        await gate.wait()
        return a

    @broker.task(name="boom")
    async def boom(a: int) -> int:
        raise ValueError("boom")

    @broker.task(name="total")
    async def total(values: list[int]) -> int:
        return sum(values)

    return broker, gate


async def test_the_overview_lists_workflows_and_the_api_draws_one() -> None:
    broker, gate = memory_broker()
    t = broker.tasks
    with trio.fail_after(20):
        async with broker, client(broker) as http:
            done = await bus.chord(
                bus.group(t["add<b>"].s(i) for i in range(3)), t["total"].s()
            ).kiq()
            assert (await done.wait_result()).return_value == 6
            failed = await bus.chain(t["boom"].s(1), t["add<b>"].s()).kiq()
            assert (await failed.wait_result()).is_err
            held = await bus.chain(t["wait"].s(5), t["add<b>"].s()).kiq()

            d = (await http.get("/api/overview")).json()
            wf = d["workflows"]
            assert wf["running"] == 1
            by_id = {w["workflow_id"]: w for w in wf["items"]}
            assert [w["workflow_id"] for w in wf["items"]] == sorted(by_id, reverse=True)
            assert by_id[str(done.workflow_id)]["state"] == "succeeded"
            assert by_id[str(done.workflow_id)]["step_states"] == {"succeeded": 4}
            assert by_id[str(failed.workflow_id)]["state"] == "failed"
            assert by_id[str(failed.workflow_id)]["step_states"] == {"failed": 1, "skipped": 1}
            assert by_id[str(held.workflow_id)]["state"] == "running"

            one = (await http.get(f"/api/workflows/{failed.workflow_id}")).json()
            assert one["state"] == "failed" and one["failed_step"] == 0
            assert [s["state"] for s in one["steps"]] == ["failed", "skipped"]
            graph = one["graph"]
            assert graph.startswith("<svg") and "<script" not in graph
            assert "add&lt;b&gt;" in graph and "add<b>" not in graph
            assert 'data-state="failed"' in graph and 'data-state="skipped"' in graph
            assert STATE_COLORS["failed"][0] in graph
            assert graph.count("marker-end=") == 1  # boom -> add

            chord = (await http.get(f"/api/workflows/{done.workflow_id}")).json()
            assert chord["graph"].count("marker-end=") == 3  # each header step -> total

            page = (await http.get("/")).text
            assert 'id="workflows"' in page and 'id="workflow-graph"' in page

            assert (await http.get("/api/workflows/nonsense")).status_code == 400
            missing = await http.get(f"/api/workflows/{bus.TaskID.new()}")
            assert missing.status_code == 404 and "no workflow" in missing.json()["error"]

            gate.set()
            assert (await held.wait_result()).return_value == 6


def test_a_large_group_is_drawn_in_part() -> None:
    n = 1000
    status: dict[str, Any] = {
        "workflow_id": "x",
        "state": "running",
        "tree": {"chain": [{"group": list(range(n))}, n]},
        "steps": [
            {
                "index": i,
                "task_id": f"id{i}",
                "task_name": "body" if i == n else "step",
                "position": str(i),
                "state": "succeeded" if i % 2 else ("pending" if i == n else "running"),
            }
            for i in range(n + 1)
        ],
    }
    graph = workflow_graph(status)
    assert graph.count('<g class="step"') == 12  # 5 first, one "more", 5 last, the body
    assert "\u2026 990 more" in graph
    assert len(graph) < 20_000
    assert re.search(r'data-step="1000" data-state="pending"', graph)


@pytest.mark.redis
async def test_workflows_on_redis(redis_server: RedisServer) -> None:
    prefix = f"w{bus.TaskID.new()[-12:]}"
    broker = make_broker(redis_server.url, prefix)
    worker = make_broker(redis_server.url, prefix)
    t = broker.tasks
    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            held = await bus.chain(t["hold"].s(1), t["ok"].si(2)).kiq()
            async with client(broker) as http:
                d = (await http.get("/api/overview")).json()
                assert d["workflows"]["running"] == 1
                [item] = d["workflows"]["items"]
                assert item["workflow_id"] == str(held.workflow_id)
                assert item["step_states"] == {"pending": 1, "queued": 1}

                await nursery.start(worker.run_worker, 2)
                done = await bus.chain(t["ok"].s(1), t["ok"].si(2)).kiq()
                assert (await done.wait_result(timeout=10)).return_value == 2
                await held.cancel()
                d = (await http.get("/api/overview")).json()
                # Neither runs now: the dashboard remembers the ones it saw.
                assert d["workflows"]["running"] == 0
                states = {w["workflow_id"]: w["state"] for w in d["workflows"]["items"]}
                assert states[str(held.workflow_id)] == "cancelled"

                one = (await http.get(f"/api/workflows/{done.workflow_id}")).json()
                assert [s["state"] for s in one["steps"]] == ["succeeded", "succeeded"]
                assert one["graph"].count('data-state="succeeded"') == 2
            nursery.cancel_scope.cancel()


async def test_the_page_draws_a_workflow_in_a_browser(tmp_path: Path) -> None:
    chromium_or_skip()
    broker, gate = memory_broker()
    t = broker.tasks
    gate.set()
    with trio.fail_after(60):
        async with broker, trio.open_nursery() as nursery:
            failed = await bus.chain(t["boom"].s(1), t["add<b>"].s()).kiq()
            assert (await failed.wait_result()).is_err
            urls = await nursery.start(
                lambda task_status: serve(
                    broker, port=0, sample_interval=0.5, token=None, task_status=task_status
                )
            )
            async with open_browser(tmp_path / "profile") as browser:
                page = await browser.new_page()
                await page.goto(urls[0] + "/")
                wid = str(failed.workflow_id)
                row = f"#workflows tr[data-workflow-id='{wid}']"
                await page.wait_for(f"!!document.querySelector({json.dumps(row)})")
                assert await page.evaluate(q(row + " [data-field=state]")) == "failed"
                await page.click(row + " code.id")
                graph = "#workflow-graph svg g[data-state=skipped]"
                await page.wait_for(f"!!document.querySelector({json.dumps(graph)})")
                title = await page.evaluate(q("#workflow-title"))
                assert title == f"workflow {wid}: failed (step 0 failed)"
                names = "[...document.querySelectorAll('#workflow-graph g.step text')]"
                texts = await page.evaluate(names + ".map(t => t.textContent).join('|')")
                assert texts == "boom|failed|add<b>|skipped"
            nursery.cancel_scope.cancel()
