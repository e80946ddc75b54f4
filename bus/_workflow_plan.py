"""Workflows without I/O: a compiled workflow (:class:`Plan`) and the state machine of
one run (:class:`WorkflowRun`).

A workflow compiles to a DAG of steps. Each step knows the steps it waits for
(``deps``), the steps that wait for it (``successors``) and where its input comes
from (``input``: an *expression*, an ``int`` naming a step or a list of
expressions, evaluated over the steps' return values). A step is runnable when all
its deps succeeded; the workflow succeeds when every step did (each step is
upstream of, or part of, the workflow's output), fails at the first step whose final
outcome is FAILURE or TIMEOUT, and is cancelled at the first CANCELLED one.

The in-memory workflow actor drives :class:`WorkflowRun` directly; the Redis
backend runs the same rules in one Lua call per transition (bus/redis/_workflows.py)
and uses the helpers here to build what the call sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from bus._codec import Codec
from bus._ids import TaskID
from bus._message import RemoteError, TaskMessage, TaskResult, TaskStatus
from bus._options import resolve_eta

__all__ = [
    "ENDED",
    "STEP_LABEL",
    "WORKFLOW_LABEL",
    "Expr",
    "Plan",
    "StepPlan",
    "Transition",
    "WorkflowRun",
    "evaluate",
    "expr_steps",
    "step_of",
]

#: The labels that carry a step's identity: the workflow's id and the step's index.
WORKFLOW_LABEL = "workflow"
STEP_LABEL = "workflow_step"
#: The states a workflow ends in.
ENDED = frozenset({"succeeded", "failed", "cancelled"})
_ERRORS = (TaskStatus.FAILURE, TaskStatus.TIMEOUT)

#: An input expression: a step's index, or a list of expressions (a group's values).
Expr = int | list[Any]


def expr_steps(expr: Expr | None) -> list[int]:
    """The steps an expression reads, in order."""
    if expr is None:
        return []
    if isinstance(expr, int):
        return [expr]
    out: list[int] = []
    for e in expr:
        out += expr_steps(e)
    return out


def evaluate(expr: Expr, values: Mapping[int, Any]) -> Any:
    """The value of ``expr`` over the steps' return values."""
    if isinstance(expr, int):
        return values[expr]
    return [evaluate(e, values) for e in expr]


def step_of(labels: Mapping[str, Any] | None) -> tuple[TaskID, int] | None:
    """The (workflow id, step index) a message's labels name, or ``None``."""
    if not labels or WORKFLOW_LABEL not in labels:
        return None
    wid, index = labels.get(WORKFLOW_LABEL), labels.get(STEP_LABEL)
    if not isinstance(wid, str) or isinstance(index, bool) or not isinstance(index, int):
        return None
    try:
        return TaskID.parse(wid), index
    except ValueError:
        return None


@attrs.frozen
class StepPlan:
    """One step: its message (arguments without the input), where its input comes from
    (``None``: none; an immutable ``.si`` step waits for ``deps`` but takes no value),
    the steps it waits for and those that wait for it, and its place in the tree."""

    index: int
    message: TaskMessage
    input: Expr | None
    deps: tuple[int, ...]
    successors: tuple[int, ...]
    position: str

    def build(self, values: Mapping[int, Any]) -> TaskMessage:
        """The message to send when the step becomes runnable, with the input (the
        previous result) first; a ``delay`` option counts from now."""
        message = self.message
        if "delay" in message.labels:
            message = attrs.evolve(message, eta=resolve_eta({"delay": message.labels["delay"]}))
        if self.input is None:
            return message
        return attrs.evolve(message, args=(evaluate(self.input, values), *message.args))


@attrs.frozen
class Plan:
    """A compiled workflow: its steps, its output expression, the tree it was written
    as (for ``bus workflows show``), and the ``on_error`` message (the failing step's
    result goes first in its arguments unless ``on_error_input`` is False)."""

    workflow_id: TaskID
    steps: tuple[StepPlan, ...]
    output: Expr
    tree: Any
    on_error: TaskMessage | None = None
    on_error_input: bool = True
    started: float = attrs.field(factory=time.time)

    @property
    def first(self) -> list[int]:
        """The steps runnable at once."""
        return [s.index for s in self.steps if not s.deps]

    def on_error_message(self, failed: TaskResult[Any]) -> TaskMessage | None:
        if self.on_error is None:
            return None
        if not self.on_error_input:
            return self.on_error
        arg = result_dict(failed)
        return attrs.evolve(
            self.on_error,
            args=(arg, *self.on_error.args),
            labels={**self.on_error.labels, ON_ERROR_LABEL: True},
        )

    def result(
        self,
        state: str,
        values: Mapping[int, Any],
        failed: tuple[int, TaskResult[Any]] | None = None,
        now: float | None = None,
    ) -> TaskResult[Any]:
        """The workflow's own result once it ended in ``state``."""
        elapsed = max(0.0, (time.time() if now is None else now) - self.started)
        labels: dict[str, Any] = {WORKFLOW_LABEL: str(self.workflow_id)}
        wid = self.workflow_id
        if state == "succeeded":
            value = evaluate(self.output, values)
            return TaskResult(wid, TaskStatus.SUCCESS, value, None, elapsed, labels)
        if state == "failed" and failed is not None:
            index, step_result = failed
            step = self.steps[index]
            labels.update(
                failed_step=index,
                failed_task=step.message.task_name,
                failed_task_id=str(step.message.task_id),
                failed_position=step.position,
            )
            status = step_result.status
            if status not in _ERRORS:
                status = TaskStatus.FAILURE
            error = step_result.error or RemoteError("bus.Failed", "step failed")
            return TaskResult(wid, status, None, error, elapsed, labels)
        error = RemoteError("bus.Cancelled", "workflow cancelled")
        return TaskResult(wid, TaskStatus.CANCELLED, None, error, elapsed, labels)

    # ------------------------------------------------------------- serialised form

    def dumps(self, codec: Codec) -> bytes:
        """The plan as bytes (the steps' messages through ``codec``)."""
        doc = {
            "v": 1,
            "id": str(self.workflow_id),
            "out": self.output,
            "tree": self.tree,
            "started": self.started,
            "err": None if self.on_error is None else codec.encode_message(self.on_error).decode(),
            "err_in": self.on_error_input,
            "steps": [
                [
                    codec.encode_message(s.message).decode(),
                    s.input,
                    list(s.deps),
                    list(s.successors),
                    s.position,
                ]
                for s in self.steps
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes, codec: Codec) -> Plan:
        """The plan :meth:`dumps` made; ``ValueError`` when it is not one."""
        try:
            doc = json.loads(data)
            steps = tuple(
                StepPlan(
                    i,
                    codec.decode_message(m.encode()),
                    inp,
                    tuple(int(d) for d in deps),
                    tuple(int(s) for s in succ),
                    str(pos),
                )
                for i, (m, inp, deps, succ, pos) in enumerate(doc["steps"])
            )
            err = doc["err"]
            return cls(
                TaskID.parse(doc["id"]),
                steps,
                doc["out"],
                doc["tree"],
                None if err is None else codec.decode_message(err.encode()),
                bool(doc["err_in"]),
                float(doc["started"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not a workflow plan: {exc}") from None


def result_dict(result: TaskResult[Any]) -> dict[str, Any]:
    """A step's result as the JSON value ``on_error`` receives: ``task_id``,
    ``status``, ``return_value``, ``error`` (``type_name``, ``message``,
    ``traceback``), ``execution_time`` and ``labels``
    (``bus.workflow_result(value)`` turns it back into a :class:`TaskResult`)."""
    err = result.error
    return {
        "task_id": str(result.task_id),
        "status": result.status.name,
        "return_value": result.return_value,
        "error": None
        if err is None
        else {"type_name": err.type_name, "message": err.message, "traceback": err.traceback},
        "execution_time": result.execution_time,
        "labels": dict(result.labels),
    }


#: The label of an ``on_error`` message whose first argument is the failing step's
#: result: the worker turns that JSON value back into a :class:`TaskResult`.
ON_ERROR_LABEL = "workflow_failed_result"


def failed_step_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` of an ``on_error`` call, the first one a :class:`TaskResult` again (left
    as it is when it is not a result's JSON value)."""
    if not args or not isinstance(args[0], Mapping):
        return args
    try:
        return (task_result(args[0]), *args[1:])
    except (KeyError, TypeError, ValueError):
        return args


def task_result(value: Mapping[str, Any]) -> TaskResult[Any]:
    """The :class:`TaskResult` that :func:`result_dict` made ``value`` of."""
    err = value.get("error")
    return TaskResult(
        TaskID.parse(value["task_id"]),
        TaskStatus[value["status"]],
        value.get("return_value"),
        None if err is None else RemoteError(err["type_name"], err["message"], err["traceback"]),
        float(value.get("execution_time", 0.0)),
        dict(value.get("labels") or {}),
    )


@attrs.frozen
class Transition:
    """What one step's completion does: the steps to send now, whether it ended the
    workflow (then ``result`` is the workflow's result), whether ``on_error`` goes
    out, and ``dup`` when the step had completed before (nothing happens twice)."""

    send: tuple[int, ...] = ()
    ended: bool = False
    on_error: bool = False
    dup: bool = False
    result: TaskResult[Any] | None = None


@attrs.define
class WorkflowRun:
    """The state of one running workflow, as its owner (the in-memory workflow actor)
    keeps it. Each call is one atomic transition; a step's completion is keyed by its
    index, so one reported twice changes nothing the second time, and a join records
    the deps that finished in a set, never a counter."""

    plan: Plan
    state: str = "running"
    outcomes: dict[int, TaskResult[Any]] = attrs.Factory(dict)
    sent: set[int] = attrs.Factory(set)
    joined: dict[int, set[int]] = attrs.Factory(dict)
    result: TaskResult[Any] | None = None
    failed: int | None = None

    def start(self) -> list[int]:
        """The steps to send when the workflow starts."""
        first = self.plan.first
        self.sent.update(first)
        return first

    def values(self) -> dict[int, Any]:
        return {i: r.return_value for i, r in self.outcomes.items()}

    def complete(self, index: int, result: TaskResult[Any], now: float | None = None) -> Transition:
        """Step ``index`` ended with ``result`` (its final outcome)."""
        if not 0 <= index < len(self.plan.steps):
            return Transition(dup=True)
        if index in self.outcomes:
            return Transition(dup=True, ended=self.state in ENDED, result=self.result)
        self.outcomes[index] = result
        if self.state != "running":
            return Transition()  # a sibling that was running when the workflow ended
        status = result.status
        if status is not TaskStatus.SUCCESS:
            self.state = "failed" if status in _ERRORS else "cancelled"
            self.failed = index if self.state == "failed" else None
            failed = (index, result) if self.state == "failed" else None
            self.result = self.plan.result(self.state, {}, failed, now)
            return Transition(
                ended=True,
                on_error=self.state == "failed" and self.plan.on_error is not None,
                result=self.result,
            )
        send = []
        steps = self.plan.steps
        for s in steps[index].successors:
            need = steps[s].deps
            if len(need) == 1:
                send.append(s)
                continue
            done = self.joined.setdefault(s, set())
            done.add(index)
            if len(done) == len(need):
                send.append(s)
                del self.joined[s]
        self.sent.update(send)
        if len(self.outcomes) == len(steps):
            self.state = "succeeded"
            self.result = self.plan.result(self.state, self.values(), None, now)
            return Transition(tuple(send), ended=True, result=self.result)
        return Transition(tuple(send))

    def cancel(self, now: float | None = None) -> list[int] | None:
        """Cancel the workflow: the steps sent and not finished (to cancel where they
        are), or ``None`` when it had ended already."""
        if self.state != "running":
            return None
        self.state = "cancelled"
        self.result = self.plan.result("cancelled", {}, None, now)
        return sorted(i for i in self.sent if i not in self.outcomes)

    def step_state(self, index: int) -> str:
        """``pending``, ``queued``, ``succeeded``, ``failed``, ``cancelled`` or
        ``skipped`` (never sent, and the workflow ended)."""
        return step_state(
            self.outcomes[index].status if index in self.outcomes else None,
            index in self.sent,
            self.state,
        )


def step_state(outcome: TaskStatus | None, sent: bool, workflow_state: str) -> str:
    """A step's state from its outcome, whether it was sent, and the workflow's state."""
    if outcome is TaskStatus.SUCCESS:
        return "succeeded"
    if outcome in _ERRORS:
        return "failed"
    if outcome is TaskStatus.CANCELLED:
        return "cancelled"
    if sent:
        return "cancelled" if workflow_state == "cancelled" else "queued"
    return "skipped" if workflow_state in ENDED else "pending"


def successors_of(deps: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Each step's successors, from each step's deps."""
    out: list[list[int]] = [[] for _ in deps]
    for i, need in enumerate(deps):
        for d in dict.fromkeys(need):
            out[d].append(i)
    return [tuple(s) for s in out]
