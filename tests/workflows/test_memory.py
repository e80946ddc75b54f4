"""Workflows in memory: the workflow actor comes back after a bug with its state, the
metrics count workflows, and the text tree and JSON of ``status()``."""

from __future__ import annotations

import pytest
import trio

import bus
import bus._workflow_actor


async def test_the_workflow_actor_restarts_with_its_workflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = bus.InMemoryBroker()
    gate = trio.Event()

    @broker.task(name="m.wait")
    async def wait(x: int) -> int:
        await gate.wait()
        return x

    @broker.task(name="m.inc")
    async def inc(x: int) -> int:
        return x + 1

    def broken(run: object) -> bus.WorkflowStatus:
        raise RuntimeError("a bug")

    with trio.fail_after(5):
        async with broker:
            h = await (wait.s(1) | inc.s()).kiq()
            ref = broker.system.actors["workflows"]  # type: ignore[union-attr]
            with monkeypatch.context() as m:
                m.setattr(bus._workflow_actor, "status_of", broken)
                with pytest.raises(RuntimeError, match="a bug"):
                    await h.status()
            assert await broker.workflows.running() == 1  # a fresh instance, same state
            gate.set()
            result = await h.wait_result(timeout=5)
            assert broker.system.actors["workflows"] is ref  # type: ignore[union-attr]
            st = await h.status()
    assert result.return_value == 2 and st.state == "succeeded"


async def test_prometheus_counts_workflows() -> None:
    pytest.importorskip("prometheus_client")
    from bus.metrics import PrometheusMiddleware

    mw = PrometheusMiddleware(inspect_interval=None)
    broker = bus.InMemoryBroker(middlewares=(mw,))

    @broker.task(name="m.ok")
    async def ok(x: int) -> int:
        return x

    @broker.task(name="m.fail")
    async def fail(x: int) -> int:
        raise ValueError(x)

    @broker.task(name="m.block")
    async def block() -> None:
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with broker:
            await (await (ok.s(1) | ok.s()).kiq()).wait_result(timeout=5)
            await (await (ok.s(1) | fail.s()).kiq()).wait_result(timeout=5)
            h = await bus.chain(block.si()).kiq()
            await h.cancel()
            await h.wait_result(timeout=5)

    def value(name: str) -> float | None:
        return mw.registry.get_sample_value(name)

    assert value("bus_workflows_started_total") == 3
    assert value("bus_workflows_succeeded_total") == 1
    assert value("bus_workflows_failed_total") == 1
    assert value("bus_workflows_cancelled_total") == 1


async def test_status_renders_a_tree_and_json() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(name="m.id")
    async def ident(x: int) -> int:
        return x

    @broker.task(name="m.sum")
    async def total(xs: list[int]) -> int:
        return sum(xs)

    with trio.fail_after(5):
        async with broker:
            h = await bus.chord([ident.s(1), bus.chain(ident.s(2), ident.s())], total.s()).kiq()
            await h.wait_result(timeout=5)
            st = await h.status()
    lines = st.render().splitlines()
    assert lines[0] == f"workflow {h.workflow_id}  succeeded"
    assert [line.rsplit("  ", 2)[0] if "m." in line else line for line in lines[1:]] == [
        "└── chord",
        "    ├── group",
        "    │   ├── m.id",
        "    │   └── chain",
        "    │       ├── m.id",
        "    │       └── m.id",
        "    └── m.sum",
    ]
    doc = st.to_json()
    assert doc["state"] == "succeeded" and len(doc["steps"]) == 4
    assert doc["steps"][3] == {
        "index": 3,
        "task_id": str(st.steps[3].task_id),
        "task_name": "m.sum",
        "position": "1",
        "state": "succeeded",
    }
    with pytest.raises(bus.ResultNotFound):
        async with broker:
            await broker.workflows.status(bus.TaskID.new())


async def test_unencodable_arguments_fail_at_kiq_and_nothing_runs() -> None:
    broker = bus.InMemoryBroker()
    ran: list[object] = []

    @broker.task(name="m.take")
    async def take(x: object) -> None:
        ran.append(x)

    with trio.fail_after(5):
        async with broker:
            with pytest.raises(bus.SendError, match=r"m\.take"):
                await (take.s(1) | take.si(object())).kiq()
            await broker.wait_all()
            assert await broker.workflows.running() == 0
    assert ran == []


async def test_status_tells_running_from_queued_steps() -> None:
    broker = bus.InMemoryBroker(concurrency=2)
    two = trio.Event()
    started: list[int] = []

    @broker.task(name="m.hold")
    async def hold(i: int) -> None:
        started.append(i)
        if len(started) == 2:
            two.set()
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with broker:
            h = await bus.chain(bus.group(hold.s(i) for i in range(4)), hold.si(9)).kiq()
            await two.wait()
            st = await h.status()
            await h.cancel()
    assert [s.state for s in st.steps] == ["running"] * 2 + ["queued"] * 2 + ["pending"]
