"""The broker contract's workflow checks (``bus.testing.WORKFLOW_CHECKS``): chains,
groups, chords, nesting, failure with ``on_error``, cancel and status, each step's
successors sent once. ``bus.testing.check_broker`` runs them after
``bus._contract.CHECKS``, whose helpers they use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

import bus
from bus._contract import DEADLINE, BrokerFactory, _expect, _expect_equal, _raises
from bus.testing import run_broker

__all__ = ["WORKFLOW_CHECK_FUNCS"]


async def check_workflow_chain_passes_results_on(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task(name="contract.wf.add")
    async def add(a: int, b: int) -> int:
        return a + b

    @broker.task(name="contract.wf.const")
    async def const(x: int) -> int:
        return x

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            h = await (add.s(1, 2) | add.s(10) | const.si(7) | add.s(100)).kiq()
            _expect(isinstance(h, bus.WorkflowHandle), "isinstance(h, bus.WorkflowHandle)")
            _expect(isinstance(h.workflow_id, bus.TaskID), "isinstance(h.workflow_id, TaskID)")
            r = await h.wait_result(timeout=5)
            st = await h.status()
    _expect_equal((r.status, r.return_value), (bus.TaskStatus.SUCCESS, 107), "the chain's result")
    _expect_equal(st.state, "succeeded", "status().state")
    _expect_equal([s.state for s in st.steps], ["succeeded"] * 4, "the steps' states")
    _expect_equal(
        [s.task_name for s in st.steps],
        ["contract.wf.add", "contract.wf.add", "contract.wf.const", "contract.wf.add"],
        "the steps' task names",
    )


async def check_workflow_group_and_chord_keep_order(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=8)
    bodies: list[list[int]] = []

    @broker.task(name="contract.wf.slow_square")
    async def square(x: int) -> int:
        await trio.sleep(0.001 * ((7 * x) % 5))  # finish out of order
        return x * x

    @broker.task(name="contract.wf.total")
    async def total(xs: list[int]) -> int:
        bodies.append(list(xs))
        return sum(xs)

    @broker.task(name="contract.wf.pair")
    async def pair(xs: list[Any], tag: str) -> list[Any]:
        return [tag, xs]

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            g = await bus.group(square.s(i) for i in range(12)).kiq()
            c = await bus.chord(bus.group(square.s(i) for i in range(20)), total.s()).kiq()
            nested = bus.chord([bus.chain(square.s(i), square.s()) for i in range(3)], pair.s("t"))
            n = await nested.kiq()
            rg = await g.wait_result(timeout=5)
            rc = await c.wait_result(timeout=5)
            rn = await n.wait_result(timeout=5)
    _expect_equal(rg.return_value, [i * i for i in range(12)], "a group's result")
    _expect_equal(rc.return_value, sum(i * i for i in range(20)), "a chord's result")
    _expect_equal(bodies, [[i * i for i in range(20)]], "the chord bodies that ran")
    _expect_equal(rn.return_value, ["t", [0, 1, 16]], "a chord of chains' result")


async def check_workflow_arity_is_checked_at_kiq(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    ran: list[int] = []

    @broker.task(name="contract.wf.one")
    async def one(x: int) -> int:
        ran.append(x)
        return x

    @broker.task(name="contract.wf.two")
    async def two(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            with _raises(TypeError, "step 1 .*contract.wf.one"):
                await (two.s(1, 2) | one.s(5)).kiq()  # one gets the result and 5
            with _raises(TypeError, "step 0 .*contract.wf.two"):
                await bus.chain(two.s(1), one.s()).kiq()
            h = await (two.s(1, 2) | one.s()).kiq()
            r = await h.wait_result(timeout=5)
    _expect_equal(ran, [3], "the steps that ran (none of the refused workflows)")
    _expect_equal(r.return_value, 3, "the valid chain's result")


async def check_workflow_failure_skips_downstream_and_runs_on_error_once(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker()
    ran: list[str] = []
    alerts: list[bus.TaskResult[Any]] = []
    alerted = trio.Event()

    @broker.task(name="contract.wf.step")
    async def step(x: int) -> int:
        ran.append(f"step{x}")
        return x

    @broker.task(name="contract.wf.boom")
    async def boom(x: int) -> int:
        ran.append("boom")
        raise ValueError(f"boom after {x}")

    @broker.task(name="contract.wf.alert")
    async def alert(failed: bus.TaskResult[Any]) -> None:
        alerts.append(failed)
        alerted.set()

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            wf = bus.chain(step.si(1), boom.s(), step.si(3), step.si(4), on_error=alert.s())
            h = await wf.kiq()
            r = await h.wait_result(timeout=5)
            await alerted.wait()
            st = await h.status()
    _expect_equal(r.status, bus.TaskStatus.FAILURE, "the workflow's status")
    _expect(r.error is not None and "boom after 1" in r.error.message, "the step's error", r.error)
    _expect_equal(r.labels.get("failed_task"), "contract.wf.boom", "the failing step named")
    _expect_equal(ran, ["step1", "boom"], "the steps that ran")
    _expect_equal(len(alerts), 1, "on_error runs")
    _expect(isinstance(alerts[0], bus.TaskResult), "on_error gets a TaskResult", alerts[0])
    _expect_equal(alerts[0].status, bus.TaskStatus.FAILURE, "on_error's argument's status")
    _expect(
        alerts[0].error is not None and "boom after 1" in alerts[0].error.message,
        "on_error's argument is the failing step's result",
        alerts[0],
    )
    _expect_equal(
        [s.state for s in st.steps], ["succeeded", "failed", "skipped", "skipped"], "step states"
    )
    _expect_equal((st.state, st.failed_step), ("failed", 1), "status() of a failed workflow")


async def check_workflow_cancel_stops_queued_and_running_steps(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=4)
    started = 0
    all_started = trio.Event()
    after: list[int] = []

    @broker.task(name="contract.wf.sleeper")
    async def sleeper(i: int) -> int:
        nonlocal started
        started += 1
        if started == 4:
            all_started.set()
        await trio.sleep(30)
        return i

    @broker.task(name="contract.wf.after")
    async def later(xs: list[int]) -> None:
        after.append(len(xs))

    with trio.fail_after(DEADLINE):
        async with run_broker(broker, concurrency=4):
            wf = bus.chord(bus.group(sleeper.s(i) for i in range(6)), later.s())
            h = await wf.kiq()
            await all_started.wait()  # four run, two wait in the queue
            before = [s.state for s in (await h.status()).steps]
            _expect(await h.cancel(), "cancel() of a running workflow is True")
            r = await h.wait_result(timeout=5)
            st = await h.status()
            _expect(not await h.cancel(), "cancel() of an ended workflow is False")
            for s in st.steps[:6]:
                sr = await broker.result_backend.wait_result(s.task_id, timeout=5)
                _expect_equal(sr.status, bus.TaskStatus.CANCELLED, f"step {s.index}'s result")
    _expect(
        set(before[:6]) <= {"running", "queued"},
        "the sent steps' states are 'running' or 'queued' (where a broker cannot tell)",
        before,
    )
    _expect_equal(before[6], "pending", "the body's state before the cancel")
    _expect_equal(r.status, bus.TaskStatus.CANCELLED, "the cancelled workflow's status")
    _expect_equal(started, 4, "steps started")
    _expect_equal(after, [], "the body that ran")
    _expect_equal(st.state, "cancelled", "status().state")
    _expect_equal(st.steps[6].state, "skipped", "the body's state")


async def check_workflow_step_reported_twice_sends_once(make_broker: BrokerFactory) -> None:
    """A step run twice (at-least-once delivery) reports its completion twice: the
    second report sends nothing and changes nothing."""
    broker = make_broker(concurrency=1)
    bodies: list[list[int]] = []

    @broker.task(name="contract.wf.ident")
    async def ident(x: int) -> int:
        return x

    @broker.task(name="contract.wf.collect")
    async def collect(xs: list[int]) -> int:
        bodies.append(list(xs))
        return len(xs)

    with trio.fail_after(DEADLINE):
        async with run_broker(broker, concurrency=1):
            h = await bus.chord([ident.s(i) for i in range(3)], collect.s()).kiq()
            r = await h.wait_result(timeout=5)
            st = await h.status()
            for s in st.steps[:3]:
                msg = bus.TaskMessage(
                    task_id=s.task_id,
                    task_name=s.task_name,
                    args=(),
                    kwargs={},
                    labels={"workflow": str(h.workflow_id), "workflow_step": s.index},
                )
                again = bus.TaskResult(s.task_id, bus.TaskStatus.SUCCESS, 99)
                await broker.workflows.step_done(msg, again)
            # One runner, first in first out: a body sent again would run before this.
            await (await collect.kiq([-1])).wait_result(timeout=5)
            st2 = await h.status()
            r2 = await h.wait_result(timeout=5)
    _expect_equal(r.return_value, 3, "the chord's result")
    _expect_equal(bodies, [[0, 1, 2], [-1]], "the bodies that ran")
    _expect_equal(st2, st, "status() after repeated reports")
    _expect_equal(r2.return_value, 3, "the result after repeated reports")


async def check_workflow_counted_while_running(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    gate = trio.Event()
    started = trio.Event()

    @broker.task(name="contract.wf.gated")
    async def gated() -> int:
        started.set()
        await gate.wait()
        return 1

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            h = await bus.chain(gated.si()).kiq()
            await started.wait()
            running = await broker.workflows.running()
            inspected = (await broker.inspect())["workflows"]
            gate.set()
            await h.wait_result(timeout=5)
            after = await broker.workflows.running()
    _expect_equal((running, after), (1, 0), "running workflows while one runs, and after")
    _expect_equal(inspected, 1, 'inspect()["workflows"] while one runs')


WORKFLOW_CHECK_FUNCS: tuple[Callable[[BrokerFactory], Awaitable[None]], ...] = (
    check_workflow_chain_passes_results_on,
    check_workflow_group_and_chord_keep_order,
    check_workflow_arity_is_checked_at_kiq,
    check_workflow_failure_skips_downstream_and_runs_on_error_once,
    check_workflow_cancel_stops_queued_and_running_steps,
    check_workflow_step_reported_twice_sends_once,
    check_workflow_counted_while_running,
)
