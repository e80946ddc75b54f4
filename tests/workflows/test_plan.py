"""Workflows without I/O: composing, compiling (arity, nesting, positions) and the
transition rules of one run (bus/_workflow_plan.py), with no Trio."""

from __future__ import annotations

from typing import Any

import pytest

import bus
from bus._workflow import compile_plan
from bus._workflow_plan import Plan, WorkflowRun, evaluate, step_of

broker = bus.InMemoryBroker()


@broker.task(name="t.add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(name="t.total")
async def total(xs: list[int]) -> int:
    return sum(xs)


@broker.task(name="t.ctx")
async def with_ctx(x: int, ctx: bus.Context) -> int:
    return x


def ok(run: WorkflowRun, i: int, value: Any) -> Any:
    tid = run.plan.steps[i].message.task_id
    return run.complete(i, bus.TaskResult(tid, bus.TaskStatus.SUCCESS, value))


def test_signatures_are_frozen_values() -> None:
    s = add.s(1, k=2)
    assert s == bus.Signature("t.add", (1,), {"k": 2})
    assert hash(s) == hash(add.s(1, k=2))
    assert add.si(1) != add.s(1) and add.si(1).immutable
    t = s.set(queue="io", priority=7, timeout=30)
    assert t.options == {"queue": "io", "priority": 7, "timeout": 30} and s.options == {}
    with pytest.raises(AttributeError):
        s.args = ()  # type: ignore[misc]
    with pytest.raises(ValueError, match="priority"):
        s.set(priority=99)


def test_pipes_build_chains() -> None:
    wf = add.s(1, 2) | add.s(3) | add.s(4)
    assert isinstance(wf, bus.Chain) and len(wf.nodes) == 3
    g = bus.group(add.s(i, i) for i in range(3))
    assert isinstance(g | total.s(), bus.Chain) and (g | total.s()).nodes[0] is g
    assert bus.chord(g, total.s()).kind == "chord"


def test_compile_chain_of_group_gives_deps_inputs_and_positions() -> None:
    wf = bus.chain(add.s(1, 2), bus.group(add.s(10), bus.chain(add.s(20), add.s(1))), total.s())
    plan = compile_plan(wf, broker)
    assert [s.deps for s in plan.steps] == [(), (0,), (0,), (2,), (1, 3)]
    assert [s.successors for s in plan.steps] == [(1, 2), (4,), (3,), (4,), ()]
    assert [s.position for s in plan.steps] == ["0", "1.0", "1.1.0", "1.1.1", "2"]
    assert plan.steps[4].input == [1, 3] and plan.output == 4 and plan.first == [0]
    assert step_of(plan.steps[2].message.labels) == (plan.workflow_id, 2)
    assert plan.tree == {"chain": [0, {"group": [1, {"chain": [2, 3]}]}, 4]}


def test_arity_is_checked_at_compile_time_naming_the_step() -> None:
    with pytest.raises(TypeError, match=r"step 1 \(t.add.s\).*too many positional"):
        compile_plan(add.s(1, 2) | add.s(1, 2), broker)
    with pytest.raises(TypeError, match=r"step 0 \(t.add.s\).*missing a required argument"):
        compile_plan(bus.chain(add.s(1)), broker)
    with pytest.raises(TypeError, match=r"step 1 \(t.add.si\)"):
        compile_plan(add.s(1, 2) | add.si(1), broker)
    compile_plan(add.s(1, 2) | with_ctx.s(), broker)  # the Context is not an argument
    with pytest.raises(ValueError, match="empty group"):
        compile_plan(bus.group(), broker)


def test_a_chain_passes_values_and_ends_once() -> None:
    run = WorkflowRun(compile_plan(add.s(1, 2) | add.s(10) | add.si(0, 0), broker))
    assert run.start() == [0]
    t = ok(run, 0, 3)
    assert t.send == (1,) and run.plan.steps[1].build(run.values()).args == (3, 10)
    assert ok(run, 0, 3).dup  # reported twice: nothing happens
    assert ok(run, 1, 13).send == (2,)
    assert run.plan.steps[2].build(run.values()).args == (0, 0)  # .si: no input
    end = ok(run, 2, 0)
    assert end.ended and end.result is not None and end.result.return_value == 0
    again = ok(run, 2, 0)
    assert again.dup and again.ended and not again.send


def test_a_chord_joins_with_a_set_and_sends_its_body_once() -> None:
    plan = compile_plan(bus.chord([add.s(i, 0) for i in range(4)], total.s()), broker)
    run = WorkflowRun(plan)
    assert run.start() == [0, 1, 2, 3]
    sends = [ok(run, i, i).send for i in (3, 1, 1, 3, 0)]  # repeats change nothing
    assert sends == [(), (), (), (), ()]
    t = ok(run, 2, 2)
    assert t.send == (4,) and plan.steps[4].build(run.values()).args == ([0, 1, 2, 3],)
    assert ok(run, 2, 2).send == ()
    assert ok(run, 4, 6).result.return_value == 6  # type: ignore[union-attr]


def test_a_failure_ends_the_workflow_once_and_skips_downstream() -> None:
    plan = compile_plan(
        bus.chain(bus.group(add.s(1, 1), add.s(2, 2)), total.s(), on_error=total.s()), broker
    )
    run = WorkflowRun(plan)
    run.start()
    err = bus.RemoteError("ValueError", "no")
    failed = bus.TaskResult(plan.steps[0].message.task_id, bus.TaskStatus.FAILURE, None, err)
    t = run.complete(0, failed)
    assert t.ended and t.on_error and t.result is not None
    assert t.result.status is bus.TaskStatus.FAILURE and t.result.error == err
    assert t.result.labels["failed_task"] == "t.add" and t.result.labels["failed_step"] == 0
    late = ok(run, 1, 4)  # a sibling that was running: kept, sends nothing
    assert late == type(late)() and run.step_state(1) == "succeeded"
    assert [run.step_state(i) for i in range(3)] == ["failed", "succeeded", "skipped"]
    assert run.complete(0, failed).dup
    msg = plan.on_error_message(failed)
    assert msg is not None and msg.args[0]["error"]["message"] == "no"


def test_cancel_names_the_steps_to_cancel_once() -> None:
    run = WorkflowRun(compile_plan(bus.chord([add.s(i, 0) for i in range(3)], total.s()), broker))
    run.start()
    ok(run, 0, 0)
    assert run.cancel() == [1, 2]
    assert run.cancel() is None
    assert run.result is not None and run.result.status is bus.TaskStatus.CANCELLED
    assert [run.step_state(i) for i in range(4)] == [
        "succeeded",
        "cancelled",
        "cancelled",
        "skipped",
    ]


def test_a_plan_survives_its_serialised_form() -> None:
    wf = bus.chord([add.s(i, 0).set(queue="io", timeout=5) for i in range(2)], total.s())
    plan = compile_plan(bus.chain(wf, on_error=total.si([1])), broker)
    back = Plan.loads(plan.dumps(broker.codec), broker.codec)
    assert back == plan
    assert back.steps[0].message.queue == "io" and back.steps[0].message.labels["timeout"] == 5
    with pytest.raises(ValueError, match="not a workflow plan"):
        Plan.loads(b"{}", broker.codec)


def test_evaluate_nested_outputs() -> None:
    assert evaluate([0, [1, 2]], {0: "a", 1: "b", 2: "c"}) == ["a", ["b", "c"]]


def test_a_delay_counts_from_when_the_step_becomes_runnable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = compile_plan(add.s(1, 2) | add.s(1).set(delay=30), broker)
    monkeypatch.setattr("time.time", lambda: 1_000_000.0)
    assert plan.steps[1].build({0: 3}).eta == 1_000_030.0
