"""Workflows on Redis: each step's completion is one Lua call.

Keys, all under the workflow's own hash tag ``{prefix:wf:<id>}`` (so one node of a
Redis Cluster holds them all):

- ``{prefix:wf:<id>}`` (a hash): ``plan`` (the compiled workflow, signed with the
  secret), ``state`` (``running``, ``succeeded``, ``failed``, ``cancelled``), ``n``
  (its number of steps), ``t:<i>`` (step ``i`` was sent), ``o:<i>`` (step ``i``'s
  outcome: its encoded, signed result), ``result`` (the workflow's, once it ended),
  ``failed`` (the step that failed it);
- ``{prefix:wf:<id>}:done``: the set of the steps that finished;
- ``{prefix:wf:<id>}:j:<i>``: for a step waiting for several (a chord's body, a
  step after a group), the set of those that finished. Sets, never counters: a step
  reported twice is one member.

Besides, ``{prefix}:workflows`` is the set of running workflows (for ``inspect``),
written beside the scripts, not by them.

The transition (``TRANSITION``, bus/redis/_workflow_scripts.py) checks the state,
stores the outcome, marks the step done and sends the steps it makes runnable,
atomically. The messages it sends are built and signed here beforehand (Lua cannot
sign): from a snapshot of the joins, the caller builds the message of every
successor that this completion may make runnable; the script checks, before writing
anything, that every successor that *is* runnable now came with its message, and
answers ``retry`` otherwise (a sibling finished since the snapshot): the caller
reads again. So the completion that finishes a chord's last header step sends its
body, exactly once; a step that runs again (a worker killed after the transition and
before its ack) finds ``o:<i>`` and sends nothing (``dup``).

Redis Cluster: the script writes to the queues' streams, whose keys have their
queue's hash tag, so on a cluster it would span slots. There the same scripts send
to the workflow's outbox in its own slot (``{prefix:wf:<id>}:outbox`` and
``:outbox:delayed``), and whoever ran the script forwards each entry to its queue
with ``SET {prefix:queue}:fwd:<task id> NX`` first (in the queue's slot, so a
forward repeated after a crash is dropped), then deletes it from the outbox (see
bus/redis/_outbox.py). A single Redis has no slots, so it sends directly; nothing
else changes.
"""

from __future__ import annotations

import collections
import hmac
import time
from typing import TYPE_CHECKING, Any

from actors._log import get_logger
from bus._errors import ResultNotFound
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult, TaskStatus
from bus._workflow import StepStatus, WorkflowBackend, WorkflowStatus
from bus._workflow_actor import workflow_event
from bus._workflow_plan import Plan, StepPlan, step_of, step_state
from bus.redis._client import Connection, Script
from bus.redis._logic import SIG_VERSION, _mac, sign_entry
from bus.redis._outbox import forward, outbox_keys
from bus.redis._workflow_scripts import CANCEL, SNAPSHOT, START, TRANSITION

if TYPE_CHECKING:
    from bus.redis._broker import RedisBroker

__all__ = ["RedisWorkflowBackend"]

log = get_logger("bus.redis")

_KINDS = {TaskStatus.SUCCESS: "ok", TaskStatus.CANCELLED: "cancel"}
_PLANS = 256
_PLAN_STEPS = 20_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWorkflowBackend(WorkflowBackend):
    """A Redis broker's workflows (see the module docstring). Keeps a small cache of
    plans (they never change once recorded)."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self._plans: collections.OrderedDict[TaskID, Plan] = collections.OrderedDict()
        self._cached_steps = 0

    # ------------------------------------------------------------------- keys

    def key(self, wid: TaskID) -> bytes:
        return ("{" + f"{self.broker.keys.prefix}:wf:{wid}" + "}").encode()

    def running_key(self) -> bytes:
        return f"{self.broker.keys.prefix}:workflows".encode()

    def joins(self, plan: Plan) -> list[int]:
        return [s.index for s in plan.steps if len(s.deps) > 1]

    def _ttl_ms(self) -> int:
        ttl = getattr(self.broker.result_backend, "ttl", None)
        return max(1, int((ttl if isinstance(ttl, int | float) else 86_400.0) * 1000))

    # ------------------------------------------------------------------ trust

    def _sign(self, h: bytes, field: bytes, blob: bytes) -> bytes:
        secret = self.broker.settings.secret
        if secret is None:
            return blob
        return SIG_VERSION + b"." + _mac(secret, b"workflow", h, field, blob) + b"\n" + blob

    def _check(self, h: bytes, field: bytes, value: bytes | None) -> bytes | None:
        """The blob of a signed value, or ``None`` (logged) when it is not signed
        with the secret for this field of this workflow."""
        secret = self.broker.settings.secret
        if value is None or secret is None:
            return value
        head, nl, blob = value.partition(b"\n")
        if (
            nl
            and head.startswith(SIG_VERSION + b".")
            and hmac.compare_digest(
                head[len(SIG_VERSION) + 1 :], _mac(secret, b"workflow", h, field, blob)
            )
        ):
            return blob
        log.warning("workflow.refused", key=h.decode(errors="replace"), field=field.decode())
        return None

    # -------------------------------------------------------------------- I/O

    async def _call(self, what: str, script: Script, keys: list[Any], args: list[Any]) -> Any:
        async def run(conn: Connection) -> Any:
            return await script.run(conn, keys=keys, args=args)

        return await self.broker._connection_call(what, run)

    async def _forward(self, h: bytes) -> None:
        """On a Redis Cluster: move what the scripts put in the workflow's outbox."""
        if not self.broker.settings.url.is_cluster:
            return
        ttl_ms = self._ttl_ms()

        async def run(conn: Connection) -> Any:
            return await forward(conn, self.broker, h, ttl_ms)

        await self.broker._connection_call("forwarding a workflow's sends", run)

    async def _execute(self, what: str, *command: Any) -> Any:
        async def run(conn: Connection) -> Any:
            return await conn.execute(*command)

        return await self.broker._connection_call(what, run)

    def _send_args(self, message: TaskMessage, h: bytes) -> tuple[list[bytes], list[Any]]:
        """The keys (stream, delayed set) and the data, signature and due time of a
        message sent as the broker's own sends are; on a Redis Cluster the keys are
        the outbox of the workflow ``h`` (see bus/redis/_outbox.py)."""
        broker = self.broker
        target = broker.keys_of_queue(message.queue)
        stream = target.level_stream(message.priority)
        data = broker._encode(message)
        eta = message.eta
        due = int(eta * 1000) if eta is not None and eta > time.time() else 0
        keys = [stream, target.level_delayed(message.priority)]
        if broker.settings.url.is_cluster:
            keys = outbox_keys(h)
        return keys, [
            data,
            sign_entry(broker.settings.secret, stream, data),
            due,
        ]

    async def _plan(self, wid: TaskID) -> Plan | None:
        plan = self._plans.get(wid)
        if plan is not None:
            return plan
        h = self.key(wid)
        blob = self._check(h, b"plan", await self._execute("reading a workflow", "HGET", h, "plan"))
        if blob is None:
            return None
        try:
            plan = Plan.loads(blob, self.broker.codec)
        except ValueError:
            log.warning("workflow.bad_plan", workflow_id=wid)
            return None
        if plan.workflow_id != wid:
            return None
        self._remember(plan)
        return plan

    def _remember(self, plan: Plan) -> None:
        """Cache ``plan``: at most ``_PLANS`` plans of ``_PLAN_STEPS`` steps in all (the
        oldest go first; the newest is kept whatever its size)."""
        plans = self._plans
        if plan.workflow_id in plans:
            return
        plans[plan.workflow_id] = plan
        self._cached_steps += len(plan.steps)
        while len(plans) > 1 and (len(plans) > _PLANS or self._cached_steps > _PLAN_STEPS):
            _, old = plans.popitem(last=False)
            self._cached_steps -= len(old.steps)

    # ----------------------------------------------------------------- the API

    async def start(self, plan: Plan) -> None:
        broker = self.broker
        for s in plan.steps:
            broker._check_send(s.message)
        h = self.key(plan.workflow_id)
        keys: list[Any] = [h]
        args: list[Any] = [
            self._sign(h, b"plan", plan.dumps(broker.codec)),
            len(plan.steps),
            broker.settings.maxlen or 0,
        ]
        first = [await self._prepare(plan.steps[i].message) for i in plan.first]
        for i, message in zip(plan.first, first, strict=True):
            k, a = self._send_args(message, h)
            keys += k
            args += [i, *a]
        await self._call(f"cannot send workflow {plan.workflow_id}", START, keys, args)
        await self._forward(h)
        await self._sent(first)
        await self._execute("recording a workflow", "SADD", self.running_key(), plan.workflow_id)
        self._remember(plan)
        await workflow_event(broker, "started", plan.workflow_id)

    async def _outcomes(self, h: bytes, steps: list[int]) -> dict[int, Any] | None:
        """The return values of ``steps`` (``None`` if one is missing or refused)."""
        if not steps:
            return {}
        fields = [f"o:{i}" for i in steps]
        raw = await self._execute("reading a workflow", "HMGET", h, *fields)
        out: dict[int, Any] = {}
        for i, value in zip(steps, raw, strict=True):
            blob = self._check(h, f"o:{i}".encode(), value)
            if blob is None:
                return None
            out[i] = self.broker.codec.decode_result(blob).return_value
        return out

    async def step_done(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        step = step_of(message.labels)
        if step is None:
            return
        wid, index = step
        plan = await self._plan(wid)
        if plan is None or not 0 <= index < len(plan.steps):
            log.warning("workflow.unknown_step", workflow_id=wid, step=index)
            return
        for _ in range(1000):
            reply = await self._transition(plan, index, result)
            if reply is not None:
                break
        else:  # pragma: no cover - a thousand siblings finishing at once, each time
            raise RuntimeError(f"workflow {wid}: step {index}'s transition kept conflicting")
        kind = _text(reply[0])
        if kind == "ended" or (kind == "dup" and len(reply) > 2 and reply[2]):
            await self._store_end(plan, reply[2], _text(reply[1]), fresh=kind == "ended")

    async def _transition(
        self, plan: Plan, index: int, result: TaskResult[Any]
    ) -> list[Any] | None:
        """One try of the transition; ``None``: read again and retry."""
        broker = self.broker
        codec = broker.codec
        wid = plan.workflow_id
        h = self.key(wid)
        step = plan.steps[index]
        joins = self.joins(plan)
        join_keys = [h + b":j:%d" % j for j in joins]
        kind = _KINDS.get(result.status, "fail")
        # The snapshot: how many steps finished, and each join's members.
        snap = await self._call(
            "reading a workflow",
            SNAPSHOT,
            [h + b":done", *[h + b":j:%d" % s for s in step.successors]],
            [index],
        )
        again, ndone, joined = bool(int(snap[0])), int(snap[1]), [int(x) for x in snap[2:]]
        values: dict[int, Any] = {index: result.return_value}
        wf_result = b""
        err_data: list[Any] = [b"", b"", 0]
        err_keys: list[Any] = [h, h]
        on_error: TaskMessage | None = None
        successors: list[TaskMessage] = []
        now = time.time()
        if kind == "fail":
            failed = plan.result("failed", {}, (index, result), now)
            wf_result = self._sign(h, b"result", codec.encode_result(failed))
            msg = plan.on_error_message(result)
            if msg is not None:
                on_error = await self._prepare(msg)
                err_keys, err_data = self._send_args(on_error, h)
        elif kind == "cancel":
            wf_result = self._sign(h, b"result", codec.encode_result(plan.result("cancelled", {})))
        elif again:
            pass  # reported before: the script answers dup and sends nothing
        elif ndone + 1 >= len(plan.steps):
            others = await self._outcomes(h, [i for i in range(len(plan.steps)) if i != index])
            if others is None:
                raise RuntimeError(f"workflow {wid}: a step's outcome is missing or refused")
            values.update(others)
            ended = plan.result("succeeded", values, None, now)
            wf_result = self._sign(h, b"result", codec.encode_result(ended))
        keys: list[Any] = [h, h + b":done", *err_keys, *join_keys]
        args: list[Any] = [
            index,
            self._sign(h, b"o:%d" % index, codec.encode_result(result)),
            kind,
            len(plan.steps),
            self._ttl_ms(),
            wf_result,
            broker.settings.maxlen or 0,
            *err_data,
            len(joins),
        ]
        if kind == "ok" and again:
            keys += [h, h] * len(step.successors)
            args += [x for s in step.successors for x in (s, 0, 1, b"", b"", 0)]
        elif kind == "ok":
            for s, have in zip(step.successors, joined, strict=True):
                succ = plan.steps[s]
                need = len(succ.deps)
                join = 0 if need == 1 else 5 + joins.index(s)
                data: list[Any] = [b"", b"", 0]
                skeys: list[Any] = [h, h]
                if need == 1 or have + 1 >= need:
                    missing = [d for d in succ.deps if d not in values]
                    got = await self._outcomes(h, missing)
                    if got is None:  # done (the join says so) but missing or forged
                        raise RuntimeError(f"workflow {wid}: an outcome of step {s}'s input")
                    values.update(got)
                    message = await self._prepare(succ.build(values))
                    successors.append(message)
                    skeys, data = self._send_args(message, h)
                keys += skeys
                args += [s, join, need, *data]
        reply = await self._call(f"workflow {wid}: step {index}", TRANSITION, keys, args)
        if _text(reply[0]) in ("ok", "ended", "dup"):
            await self._forward(h)
        if _text(reply[0]) == "retry":
            return None
        if _text(reply[0]) == "unknown":
            log.warning("workflow.unknown", workflow_id=wid)
        if _text(reply[0]) in ("ok", "ended"):
            # What the script sent: the successors it found runnable (those the
            # snapshot foresaw, else it answers retry), on_error when it failed the
            # workflow.
            failing = on_error is not None and _text(reply[1]) == "failed"
            await self._sent([*successors, *((on_error,) if failing else ())])
        return list(reply)

    async def _prepare(self, message: TaskMessage) -> TaskMessage:
        """A step's message through the middlewares' ``pre_send``, as a send's."""
        hooks = self.broker.hooks
        if "pre_send" in hooks.has:
            message = await hooks.transform("pre_send", message)
        return message

    async def _sent(self, messages: list[TaskMessage]) -> None:
        """Count what a script sent and run the middlewares' ``post_send``."""
        self.broker.stats.sent += len(messages)
        hooks = self.broker.hooks
        if "post_send" in hooks.has:
            for message in messages:
                await hooks.run_all("post_send", message)

    async def _store_end(self, plan: Plan, blob: Any, state: str, *, fresh: bool) -> None:
        h = self.key(plan.workflow_id)
        data = self._check(h, b"result", blob if isinstance(blob, bytes) else None)
        if data is None:
            return
        result = self.broker.codec.decode_result(data)
        # Not running any more before the result wakes its waiters (on a cluster the
        # two are on different nodes: in the other order a waiter could count it).
        await self._execute("recording a workflow", "SREM", self.running_key(), plan.workflow_id)
        await self.broker.result_backend.set_result(plan.workflow_id, result)
        if fresh:
            await workflow_event(self.broker, state, plan.workflow_id)

    async def cancel(self, workflow_id: TaskID) -> bool:
        wid = TaskID.parse(workflow_id)
        plan = await self._plan(wid)
        if plan is None:
            raise ResultNotFound(wid, "no such workflow")
        h = self.key(wid)
        blob = self._sign(
            h, b"result", self.broker.codec.encode_result(plan.result("cancelled", {}))
        )
        keys = [h, h + b":done", *[h + b":j:%d" % j for j in self.joins(plan)]]
        reply = await self._call(
            f"cannot cancel workflow {wid}", CANCEL, keys, [blob, self._ttl_ms(), len(plan.steps)]
        )
        if not int(reply[0]):
            return False
        for i in reversed(reply[1:]):  # the last sent first: the queued before the running
            await self.broker.cancel_task(plan.steps[int(i)].message.task_id)
        await self._store_end(plan, blob, "cancelled", fresh=True)
        return True

    async def status(self, workflow_id: TaskID) -> WorkflowStatus:
        wid = TaskID.parse(workflow_id)
        plan = await self._plan(wid)
        if plan is None:
            raise ResultNotFound(wid, "no such workflow (or it expired)")
        h = self.key(wid)
        flat = await self._execute("reading a workflow", "HGETALL", h)
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat or ()) - 1, 2)}
        state = _text(fields.get("state", b"running"))
        codec = self.broker.codec
        states: list[str] = []
        for s in plan.steps:
            outcome = None
            blob = self._check(h, b"o:%d" % s.index, fields.get(f"o:{s.index}"))
            if blob is not None:
                outcome = codec.decode_result(blob).status
            states.append(step_state(outcome, f"t:{s.index}" in fields, state))
        if state == "running":
            for i in await self._started([s for s in plan.steps if states[s.index] == "queued"]):
                states[i] = "running"
        steps = [
            StepStatus(s.index, s.message.task_id, s.message.task_name, s.position, states[s.index])
            for s in plan.steps
        ]
        failed = fields.get("failed")
        return WorkflowStatus(
            wid, state, tuple(steps), plan.tree, None if failed is None else int(failed)
        )

    async def _started(self, steps: list[StepPlan]) -> list[int]:
        """Those of ``steps`` a worker took: their first attempt's claim (``Keys.ran``)
        is there (one MGET per queue: the keys of a queue share its hash tag)."""
        by_queue: dict[str | None, list[StepPlan]] = {}
        for s in steps:
            by_queue.setdefault(s.message.queue, []).append(s)
        out: list[int] = []
        for queue, group in by_queue.items():
            keys = self.broker.keys_of_queue(queue)
            claims = await self._execute(
                "reading a workflow", "MGET", *(keys.ran(s.message.task_id, 1) for s in group)
            )
            out += [s.index for s, c in zip(group, claims, strict=True) if c is not None]
        return out

    async def running(self) -> int:
        n = await self._execute("counting workflows", "SCARD", self.running_key())
        return int(n or 0)
