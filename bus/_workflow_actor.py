"""Workflows in memory: one actor owns every workflow's state.

The :class:`WorkflowActor` handles one message at a time, so each step's completion
(``StepDone``) is one atomic transition of :class:`~bus._workflow_plan.WorkflowRun`:
the step is marked done and what it unblocks is sent in the same handler, and a
completion reported twice changes nothing. It is spawned with RESTART; its state
lives in a :class:`Kept` that the broker's workflow backend holds, so a restarted
instance takes the same workflows over.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._errors import BrokerClosed, ResultNotFound
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult
from bus._workflow import StepStatus, WorkflowBackend, WorkflowStatus
from bus._workflow_plan import Plan, WorkflowRun, step_of

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["MemoryWorkflowBackend", "WorkflowActor"]

log = get_logger("bus.workflows")

#: Ended workflows kept for ``status()`` (their results live in the result store).
KEEP_ENDED = 1000


@attrs.frozen
class StartWorkflow:
    """Ask: record ``plan`` and send its first steps."""

    plan: Plan


@attrs.frozen
class StepDone:
    """Tell: step ``index`` of ``workflow_id`` ended with ``result`` (final)."""

    workflow_id: TaskID
    index: int
    result: TaskResult[Any]


@attrs.frozen
class CancelWorkflow:
    """Ask: cancel a workflow; the answer says whether it was running."""

    workflow_id: TaskID


@attrs.frozen
class GetWorkflow:
    """Ask: a workflow's :class:`WorkflowStatus`, or ``None``."""

    workflow_id: TaskID


@attrs.frozen
class CountRunning:
    """Ask: how many workflows run."""


@attrs.define
class Kept:
    """The workflows, kept across restarts of the actor."""

    runs: dict[TaskID, WorkflowRun] = attrs.Factory(dict)
    ended: collections.OrderedDict[TaskID, None] = attrs.Factory(collections.OrderedDict)


def status_of(run: WorkflowRun) -> WorkflowStatus:
    plan = run.plan
    steps = tuple(
        StepStatus(s.index, s.message.task_id, s.message.task_name, s.position, run.step_state(i))
        for i, s in enumerate(plan.steps)
    )
    return WorkflowStatus(plan.workflow_id, run.state, steps, plan.tree, run.failed)


class WorkflowActor(actors.Actor):
    """Owns the workflows of an in-memory broker (see the module docstring)."""

    def __init__(self, broker: Broker, kept: Kept) -> None:
        self.broker = broker
        self.kept = kept

    async def _send(self, messages: list[TaskMessage]) -> None:
        for m in messages:
            try:
                await self.broker.kick(m)
            except Exception as exc:  # the broker is closing: logged, not a bug
                log.warning("workflow.send_failed", task_id=m.task_id, error=repr(exc))

    async def _ended(self, run: WorkflowRun, failed_result: TaskResult[Any] | None) -> None:
        kept = self.kept
        wid = run.plan.workflow_id
        kept.ended[wid] = None
        while len(kept.ended) > KEEP_ENDED:
            old, _ = kept.ended.popitem(last=False)
            kept.runs.pop(old, None)
        if failed_result is not None:
            msg = run.plan.on_error_message(failed_result)
            if msg is not None:
                await self._send([msg])
        assert run.result is not None
        try:
            await self.broker.result_backend.set_result(wid, run.result)
        except Exception:
            log.exception("workflow.store_failed", workflow_id=wid)
        await workflow_event(self.broker, run.state, wid)

    @actors.handles(StartWorkflow)
    async def start(self, msg: StartWorkflow) -> None:
        plan = msg.plan
        run = WorkflowRun(plan)
        self.kept.runs[plan.workflow_id] = run
        first = run.start()
        await self._send([plan.steps[i].message for i in first])

    @actors.handles(StepDone)
    async def step_done(self, msg: StepDone) -> None:
        run = self.kept.runs.get(msg.workflow_id)
        if run is None:
            return
        t = run.complete(msg.index, msg.result)
        if t.send:
            values = run.values()
            await self._send([run.plan.steps[i].build(values) for i in t.send])
        if t.ended and not t.dup:
            await self._ended(run, msg.result if t.on_error else None)

    @actors.handles(CancelWorkflow)
    async def cancel(self, msg: CancelWorkflow) -> bool:
        run = self.kept.runs.get(msg.workflow_id)
        if run is None:
            raise ResultNotFound(msg.workflow_id)
        steps = run.cancel()
        if steps is None:
            return False
        for i in reversed(steps):  # the last sent first: the queued before the running
            try:
                await self.broker.cancel_task(run.plan.steps[i].message.task_id)
            except BrokerClosed:
                break
        await self._ended(run, None)
        return True

    @actors.handles(GetWorkflow, inline=True)
    def get(self, msg: GetWorkflow) -> WorkflowStatus | None:
        run = self.kept.runs.get(msg.workflow_id)
        return None if run is None else status_of(run)

    @actors.handles(CountRunning, inline=True)
    def count(self, msg: CountRunning) -> int:
        return sum(1 for r in self.kept.runs.values() if r.state == "running")


async def workflow_event(broker: Broker, event: str, workflow_id: TaskID) -> None:
    """Tell the middlewares (``on_workflow``: metrics) that a workflow started or
    ended (``succeeded``, ``failed``, ``cancelled``)."""
    hooks = broker.hooks
    if "on_workflow" in hooks.has:
        await hooks.run_all("on_workflow", event, workflow_id)


class MemoryWorkflowBackend(WorkflowBackend):
    """The in-memory broker's workflows: the :class:`WorkflowActor`, spawned in the
    broker's actor system on first use (RESTART, no restart limit)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.kept = Kept()
        self._lock = trio.Lock()

    async def _ref(self) -> actors.ActorRef:
        system = self.broker.system
        if system is None or not self.broker.is_running:
            raise BrokerClosed("the broker is not running: use it inside `async with broker`")
        ref = system.actors.get("workflows")
        if ref is not None:
            return ref
        async with self._lock:
            ref = system.actors.get("workflows")
            if ref is None:
                broker, kept = self.broker, self.kept
                ref = await system.spawn(
                    lambda: WorkflowActor(broker, kept),
                    name="workflows",
                    mailbox_size=math.inf,
                    on_failure=actors.RESTART,
                    max_restarts=None,
                    backoff=actors.Backoff(initial=0.01, factor=2.0, cap=1.0, jitter=0.5),
                )
            return ref

    async def _ask(self, msg: object) -> Any:
        ref = await self._ref()
        try:
            return await ref.ask(msg)
        except actors.ActorStopped:
            raise BrokerClosed("the broker is not running or shutting down") from None

    async def start(self, plan: Plan) -> None:
        for s in plan.steps:
            self.broker._check_send(s.message)
        await self._ask(StartWorkflow(plan))
        await workflow_event(self.broker, "started", plan.workflow_id)

    async def step_done(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        step = step_of(message.labels)
        if step is None:
            return
        ref = await self._ref()
        try:
            ref.tell_nowait(StepDone(step[0], step[1], result))
        except actors.ActorStopped:
            raise BrokerClosed("the broker is shutting down") from None

    async def cancel(self, workflow_id: TaskID) -> bool:
        done: bool = await self._ask(CancelWorkflow(TaskID.parse(workflow_id)))
        return done

    async def status(self, workflow_id: TaskID) -> WorkflowStatus:
        st = await self._ask(GetWorkflow(TaskID.parse(workflow_id)))
        if st is None:
            raise ResultNotFound(workflow_id)
        assert isinstance(st, WorkflowStatus)
        queued = tuple(s.task_id for s in st.steps if s.state == "queued")
        if not queued:
            return st
        from bus._memory_messages import TakenIds

        try:  # the in-memory broker actor knows which a worker took
            taken = set(await self.broker.ref.ask(TakenIds(queued)))
        except (actors.ActorError, BrokerClosed):
            return st  # another broker: they stay "queued"
        steps = tuple(
            attrs.evolve(s, state="running") if s.task_id in taken else s for s in st.steps
        )
        return attrs.evolve(st, steps=steps)

    async def running(self) -> int:
        if self.broker.system is None or self.broker.system.actors.get("workflows") is None:
            return 0
        n: int = await self._ask(CountRunning())
        return n
