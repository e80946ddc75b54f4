"""The Redis transition script on its own (no worker runs the steps here): a stale
snapshot is answered with a retry and writes nothing; a completion reported again
sends nothing; the last header step of a chord sends the body once."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import bus
from bus._workflow import compile_plan
from bus.redis._workflow_scripts import SNAPSHOT
from bus.redis._workflows import RedisWorkflowBackend
from tests.redis.server import RedisServer
from tests.workflows.wf_app import build

pytestmark = [pytest.mark.redis]


async def test_a_stale_snapshot_is_retried_and_the_body_sent_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"w{bus.TaskID.new()[-12:]}"
    broker = build(redis_server.url, prefix, 2.0)
    step, body = broker.find_task("wf.step"), broker.find_task("wf.body")
    assert step is not None and body is not None
    with trio.fail_after(10):
        async with broker:  # no worker: the test reports the steps' completions itself
            backend = broker.workflows
            assert isinstance(backend, RedisWorkflowBackend)
            plan = compile_plan(bus.chord([step.s(0), step.s(1)], body.s()), broker)
            await backend.start(plan)
            stream = broker.keys.stream
            assert await broker.client.execute("XLEN", stream) == 2

            def done(i: int, value: int) -> bus.TaskResult[Any]:
                return bus.TaskResult(plan.steps[i].message.task_id, bus.TaskStatus.SUCCESS, value)

            real_call = backend._call

            async def stale(what: str, script: Any, keys: list[Any], args: list[Any]) -> Any:
                reply = await real_call(what, script, keys, args)
                return [0 for _ in reply] if script is SNAPSHOT else reply

            monkeypatch.setattr(backend, "_call", stale)
            assert await backend._transition(plan, 0, done(0, 0)) == [b"ok"]
            # Step 1 saw no member of the join: the script finds it runnable and no
            # message for it, so it answers retry and writes nothing.
            assert await backend._transition(plan, 1, done(1, 1)) is None
            monkeypatch.undo()
            assert await broker.client.execute("XLEN", stream) == 2
            await backend.step_done(plan.steps[1].message, done(1, 1))
            await backend.step_done(plan.steps[1].message, done(1, 1))  # again: nothing
            await backend.step_done(plan.steps[0].message, done(0, 0))
            assert await broker.client.execute("XLEN", stream) == 3  # the body, once
            entries = await broker.client.execute("XRANGE", stream, "-", "+")
            fields = entries[-1][1]
            sent = broker.codec.decode_message(fields[fields.index(b"d") + 1])
            assert sent.task_name == "wf.body" and sent.args == ([0, 1],)
            status = await backend.status(plan.workflow_id)
    assert [s.state for s in status.steps] == ["succeeded", "succeeded", "queued"]


async def test_steps_go_through_the_send_middlewares(redis_server: RedisServer) -> None:
    seen: list[tuple[str, int]] = []

    class Sends(bus.Middleware):
        def post_send(self, message: bus.TaskMessage) -> None:
            seen.append((message.task_name, message.labels.get("workflow_step", -1)))

    prefix = f"w{bus.TaskID.new()[-12:]}"
    broker = build(redis_server.url, prefix, 2.0)
    broker.with_middlewares(Sends())
    step, boom, alert = (broker.find_task(n) for n in ("wf.step", "wf.boom", "wf.alert"))
    assert step is not None and boom is not None and alert is not None
    with trio.fail_after(10):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 4)
            h = await bus.chain(step.si(1), step.si(2), boom.s(), on_error=alert.s()).kiq()
            await h.wait_result(timeout=5)
            worker.stop()
    assert seen[:3] == [("wf.step", 0), ("wf.step", 1), ("wf.boom", 2)]
    assert [name for name, _ in seen[3:]] == ["wf.alert"]
