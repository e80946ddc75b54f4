"""Workflows: signatures (``task.s(...)``, ``task.si(...)``) composed with
:func:`chain`, :func:`group` and :func:`chord` (or ``|``), sent with ``await
workflow.kiq()``, followed with a :class:`WorkflowHandle`.

Composing is plain values; ``kiq`` compiles the workflow to a
:class:`~bus._workflow_plan.Plan` (checking every step's arguments against its
task's signature) and hands it to the broker's workflow backend, which sends the
first steps. From then on each step's completion is one atomic transition that sends
what it unblocks (see bus/_workflow_plan.py, bus/_workflow_actor.py and
bus/redis/_workflows.py).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from bus._frozen import FrozenDict, freeze_args, freeze_mapping
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult
from bus._options import check_queue_name
from bus._priority import check_priority
from bus._workflow_plan import (
    STEP_LABEL,
    WORKFLOW_LABEL,
    Expr,
    Plan,
    StepPlan,
    expr_steps,
    successors_of,
)

if TYPE_CHECKING:
    from bus._broker import Broker
    from bus._task import Task

__all__ = [
    "Chain",
    "Group",
    "Signature",
    "StepStatus",
    "WorkflowBackend",
    "WorkflowHandle",
    "WorkflowStatus",
    "chain",
    "chord",
    "group",
]

R = TypeVar("R")


class _Node:
    """What can be composed: a signature, a chain or a group."""

    def __or__(self, other: _Node) -> Chain:
        if not isinstance(other, _Node):
            return NotImplemented
        left = self.nodes if isinstance(self, Chain) and self.on_error is None else (self,)
        return Chain((*left, other))

    def _broker(self) -> Broker:
        for sig in self._signatures():
            return sig.task.broker
        raise ValueError("an empty workflow has nothing to send")

    def _signatures(self) -> Iterable[Signature]:
        raise NotImplementedError

    async def kiq(self) -> WorkflowHandle[Any]:
        """Send the workflow: check every step's arguments (a wrong arity is a
        ``TypeError`` here, naming the step), then start it. Returns its handle.

        Raises as ``task.kiq`` does (``SendError``, ``BrokerClosed``,
        ``BrokerUnavailable``). Cancellation: if cancelled before the broker took the
        workflow, nothing was sent."""
        broker = self._broker()
        plan = compile_plan(self, broker)
        for step in plan.steps:
            broker._encode(step.message)  # SendError now, not a step that never runs
        await broker.workflows.start(plan)
        return WorkflowHandle(plan.workflow_id, broker)


@attrs.frozen(eq=False)
class Signature(_Node):
    """A task with its arguments and options, to run as a step of a workflow: frozen
    (task name, args, kwargs, options). ``immutable`` (``task.si``): the step does not
    get the previous step's result."""

    task_name: str
    args: tuple[Any, ...] = attrs.field(converter=freeze_args, default=())
    kwargs: FrozenDict = attrs.field(converter=freeze_mapping, factory=FrozenDict)
    options: FrozenDict = attrs.field(converter=freeze_mapping, factory=FrozenDict)
    immutable: bool = False
    task: Task[Any, Any] = attrs.field(default=None, repr=False, kw_only=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return (self.task_name, self.args, self.kwargs, self.options, self.immutable) == (
            other.task_name,
            other.args,
            other.kwargs,
            other.options,
            other.immutable,
        )

    def __hash__(self) -> int:
        return hash((self.task_name, self.args, self.kwargs, self.options, self.immutable))

    def set(self, **options: Any) -> Signature:
        """A copy with these options, as a kicker takes them: ``queue``, ``priority``,
        ``task_id``, ``labels`` (a dict), and any option label (``timeout``,
        ``retries``, ``delay``, ...). A bad queue or priority raises at once."""
        if "queue" in options:
            check_queue_name(options["queue"])
        if "priority" in options:
            check_priority(options["priority"])
        if "task_id" in options:
            options["task_id"] = str(TaskID.parse(options["task_id"]))
        return attrs.evolve(self, options={**self.options, **options})

    def _signatures(self) -> Iterable[Signature]:
        yield self


@attrs.frozen
class Chain(_Node):
    """Steps one after another: each ``.s`` step gets the previous one's result first
    (after a group: the list of its results, in order)."""

    nodes: tuple[_Node, ...]
    on_error: Signature | None = None
    kind: str = "chain"

    def _signatures(self) -> Iterable[Signature]:
        for n in self.nodes:
            yield from n._signatures()
        if self.on_error is not None:
            yield self.on_error


@attrs.frozen
class Group(_Node):
    """Steps side by side; its value is the list of theirs, in order."""

    nodes: tuple[_Node, ...]
    on_error: Signature | None = None

    def _signatures(self) -> Iterable[Signature]:
        for n in self.nodes:
            yield from n._signatures()
        if self.on_error is not None:
            yield self.on_error


def _nodes(items: tuple[Any, ...]) -> tuple[_Node, ...]:
    if len(items) == 1 and not isinstance(items[0], _Node):
        items = tuple(items[0])
    for n in items:
        if not isinstance(n, _Node):
            raise TypeError(f"a workflow is made of signatures (task.s(...)), not {n!r}")
    return items


def _on_error(on_error: Any) -> Signature | None:
    if on_error is not None and not isinstance(on_error, Signature):
        raise TypeError(f"on_error must be a signature (task.s(...)), not {on_error!r}")
    return on_error


def chain(*steps: Any, on_error: Signature | None = None) -> Chain:
    """Run ``steps`` one after another (``a.s() | b.s()`` is ``chain(a.s(), b.s())``)."""
    return Chain(_nodes(steps), _on_error(on_error))


def group(*steps: Any, on_error: Signature | None = None) -> Group:
    """Run ``steps`` (signatures, or one iterable of them) side by side."""
    return Group(_nodes(steps), _on_error(on_error))


def chord(header: Any, body: Signature, *, on_error: Signature | None = None) -> Chain:
    """``chain(group(header), body)``: ``body`` gets the list of the header's results,
    sent by the transition that finishes the header's last step."""
    head = header if isinstance(header, Group) else group(header)
    if not isinstance(body, _Node):
        raise TypeError(f"a chord's body is a signature, not {body!r}")
    return Chain((head, body), _on_error(on_error), kind="chord")


# ----------------------------------------------------------------------- compiling


class _Compiler:
    def __init__(self, broker: Broker, workflow_id: TaskID) -> None:
        self.broker = broker
        self.wid = workflow_id
        self.sigs: list[tuple[Signature, Expr | None, tuple[int, ...], str]] = []
        self.on_error: Signature | None = None

    def node(self, node: _Node, incoming: Expr | None, position: str) -> tuple[Expr, Any]:
        """Compile ``node`` fed by ``incoming``; its output expression and its tree."""
        if isinstance(node, Signature):
            index = len(self.sigs)
            deps = tuple(dict.fromkeys(expr_steps(incoming)))
            self.sigs.append((node, None if node.immutable else incoming, deps, position))
            return index, index
        assert isinstance(node, Chain | Group)
        if node.on_error is not None:
            if self.on_error is not None and self.on_error != node.on_error:
                raise TypeError("a workflow takes one on_error= (give it to the outer one)")
            self.on_error = node.on_error
        if not node.nodes:
            raise ValueError(f"an empty {type(node).__name__.lower()} has nothing to run")
        prefix = f"{position}." if position else ""
        if isinstance(node, Chain):
            tree: list[Any] = []
            out = incoming
            for i, n in enumerate(node.nodes):
                out, sub = self.node(n, out, f"{prefix}{i}")
                tree.append(sub)
            assert out is not None
            return out, {node.kind: tree}
        outs: list[Any] = []
        tree = []
        for i, n in enumerate(node.nodes):
            out, sub = self.node(n, incoming, f"{prefix}{i}")
            outs.append(out)
            tree.append(sub)
        return outs, {"group": tree}

    def message(
        self, index: int, sig: Signature, takes_input: bool, extra: dict[str, Any]
    ) -> TaskMessage:
        task: Task[Any, Any] | None = self.broker.tasks.get(sig.task_name) or sig.task
        if task is None:
            from bus._errors import UnknownTaskError

            raise UnknownTaskError(sig.task_name)
        check_arity(task, sig, takes_input, index)
        opts = dict(sig.options)
        labels = dict(opts.pop("labels", None) or {})
        queue = opts.pop("queue", None)
        priority = opts.pop("priority", None)
        task_id = opts.pop("task_id", None)
        labels.update(opts)
        labels.update(extra)
        return task._message(
            tuple(sig.args),
            dict(sig.kwargs),
            labels,
            TaskID.parse(task_id) if task_id else TaskID.new(),
            None,
            queue,
            priority,
        )


def check_arity(task: Task[Any, Any], sig: Signature, takes_input: bool, index: int) -> None:
    """Raise ``TypeError`` naming the step when its arguments do not fit its task."""
    params = task._call_signature  # the one that kiq checks
    if params is None:
        return
    args = (None, *sig.args) if takes_input else tuple(sig.args)
    try:
        params.bind(*args, **dict(sig.kwargs))
    except TypeError as exc:
        got = "the previous result and " if takes_input else ""
        raise TypeError(
            f"workflow step {index} ({sig.task_name}{'.si' if sig.immutable else '.s'}) "
            f"does not fit its task's signature {params}: {exc} (it gets {got}"
            f"{len(sig.args)} positional argument(s))"
        ) from None


def compile_plan(node: _Node, broker: Broker, workflow_id: TaskID | None = None) -> Plan:
    """Compile a workflow for ``broker``: every step gets a task id and the labels
    naming its workflow and index; arities are checked (``TypeError``)."""
    wid = workflow_id or TaskID.new()
    c = _Compiler(broker, wid)
    output, tree = c.node(node, None, "")
    deps = [d for _, _, d, _ in c.sigs]
    succ = successors_of(deps)
    steps = []
    for i, (sig, inp, dps, pos) in enumerate(c.sigs):
        if sig.task is not None and sig.task.broker is not broker:
            raise ValueError(f"workflow step {i} ({sig.task_name}) belongs to another broker")
        extra = {WORKFLOW_LABEL: str(wid), STEP_LABEL: i}
        msg = c.message(i, sig, inp is not None, extra)
        steps.append(StepPlan(i, msg, inp, dps, succ[i], pos))
    on_error = None
    on_error_input = True
    if c.on_error is not None:
        on_error_input = not c.on_error.immutable
        on_error = c.message(len(steps), c.on_error, on_error_input, {"workflow_of": str(wid)})
    return Plan(wid, tuple(steps), output, tree, on_error, on_error_input)


# ---------------------------------------------------------------------- following


@attrs.frozen
class StepStatus:
    """One step of a workflow: its index, task id, task name, position in the tree
    (``"1.0"``: the first step of the second element) and state (``pending``,
    ``queued``, ``running``, ``succeeded``, ``failed``, ``skipped``, ``cancelled``)."""

    index: int
    task_id: TaskID
    task_name: str
    position: str
    state: str


@attrs.frozen
class WorkflowStatus:
    """A workflow's state (``running``, ``succeeded``, ``failed``, ``cancelled``), its
    steps, the tree it was written as, and the step that failed it (if any)."""

    workflow_id: TaskID
    state: str
    steps: tuple[StepStatus, ...]
    tree: Any = None
    failed_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_id": str(self.workflow_id),
            "state": self.state,
            "failed_step": self.failed_step,
            "tree": self.tree,
            "steps": [
                {
                    "index": s.index,
                    "task_id": str(s.task_id),
                    "task_name": s.task_name,
                    "position": s.position,
                    "state": s.state,
                }
                for s in self.steps
            ],
        }

    def render(self) -> str:
        """The workflow as a text tree, each step with its state."""
        lines = [f"workflow {self.workflow_id}  {self.state}"]

        def walk(node: Any, indent: str, last: bool) -> None:
            branch = "└── " if last else "├── "
            if isinstance(node, int):
                s = self.steps[node]
                lines.append(f"{indent}{branch}{s.task_name}  {s.state}  {s.task_id}")
                return
            ((kind, children),) = node.items()
            lines.append(f"{indent}{branch}{kind}")
            inner = indent + ("    " if last else "│   ")
            for i, child in enumerate(children):
                walk(child, inner, i == len(children) - 1)

        if self.tree is not None:
            walk(self.tree, "", True)
        return "\n".join(lines)


class WorkflowBackend(abc.ABC):
    """Where a broker keeps its workflows' state and runs their transitions: an actor
    in memory, Lua scripts on Redis."""

    @abc.abstractmethod
    async def start(self, plan: Plan) -> None:
        """Record the workflow and send its first steps, in one step."""

    @abc.abstractmethod
    async def step_done(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        """A step's final result is stored: run its transition (once per step)."""

    @abc.abstractmethod
    async def cancel(self, workflow_id: TaskID) -> bool:
        """Cancel the workflow and its queued and running steps; False if it had ended."""

    @abc.abstractmethod
    async def status(self, workflow_id: TaskID) -> WorkflowStatus:
        """Its state; :class:`~bus.ResultNotFound` for an unknown (or expired) one."""

    @abc.abstractmethod
    async def running(self) -> int:
        """How many workflows run now."""


class WorkflowHandle(Generic[R]):
    """A sent workflow: wait for its result (pushed, like a task's), cancel it, ask
    for its status."""

    __slots__ = ("broker", "workflow_id")

    def __init__(self, workflow_id: TaskID, broker: Broker) -> None:
        self.workflow_id = workflow_id
        self.broker = broker

    async def wait_result(self, timeout: float | None = None) -> TaskResult[R]:
        """Wait for the workflow's result: a chain's is its last step's, a group's the
        list of its steps' values, a chord's its body's; FAILURE with the failing
        step's error (its labels name the step), or CANCELLED. Woken when it is
        stored; :class:`~bus.ResultTimeout` after ``timeout`` seconds (the workflow
        goes on). Cancellation: only the wait is abandoned."""
        return await self.broker.result_backend.wait_result(self.workflow_id, timeout)

    async def get_result(self) -> TaskResult[R]:
        """The stored result; :class:`~bus.ResultNotFound` while it runs."""
        return await self.broker.result_backend.get_result(self.workflow_id)

    async def cancel(self) -> bool:
        """Cancel every queued and running step (on every worker); nothing downstream
        runs and the result is CANCELLED. False if the workflow had ended already."""
        return await self.broker.workflows.cancel(self.workflow_id)

    async def status(self) -> WorkflowStatus:
        """The workflow's state and each step's."""
        return await self.broker.workflows.status(self.workflow_id)

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.workflow_id}>"
