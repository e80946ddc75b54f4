"""The dashboard's workflows: the running and recent ones, and one by id with its
graph. What the broker can answer cheaply: in memory, the ids the workflow actor
keeps; on Redis, one ``SSCAN`` of the set of running workflows (never a ``SCAN`` of
the keyspace); besides, the ids the dashboard saw before (ended ones), until they
expire. Each listed workflow costs one status read."""

from __future__ import annotations

import collections
import itertools
from typing import TYPE_CHECKING, Any

from bus._errors import ResultNotFound
from bus._ids import TaskID
from bus.dashboard._graph import workflow_graph

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["list_workflows", "one_workflow"]

#: Workflows listed per overview (the newest first), the running ones' ids read from
#: the broker at most, and the ids remembered.
WORKFLOWS_SHOWN = 20
WORKFLOW_IDS_READ = 200
WORKFLOWS_REMEMBERED = 50

Seen = collections.OrderedDict[TaskID, None]


async def workflow_ids(broker: Broker) -> list[TaskID]:
    """The ids of workflows the broker holds, at most ``WORKFLOW_IDS_READ``."""
    backend: Any = broker.workflows
    runs = getattr(getattr(backend, "kept", None), "runs", None)
    if isinstance(runs, dict):  # in memory: running and lately ended, the newest last
        return list(itertools.islice(reversed(runs), WORKFLOW_IDS_READ))
    if hasattr(backend, "running_key") and hasattr(backend, "_execute"):  # Redis
        reply = await backend._execute(
            "listing workflows", "SSCAN", backend.running_key(), 0, "COUNT", WORKFLOW_IDS_READ
        )
        ids = []
        for raw in (reply[1] if reply else ())[:WORKFLOW_IDS_READ]:
            try:
                ids.append(TaskID.parse(raw.decode() if isinstance(raw, bytes) else raw))
            except (ValueError, UnicodeDecodeError):
                continue
        return ids
    return []


def _remember(seen: Seen, wid: TaskID) -> None:
    seen[wid] = None
    while len(seen) > WORKFLOWS_REMEMBERED:
        seen.popitem(last=False)


async def list_workflows(broker: Broker, seen: Seen, running: Any) -> dict[str, Any]:
    """Running and recent workflows, the newest first, each with its state and its
    steps counted by state; ``running`` is ``inspect()``'s count."""
    for wid in await workflow_ids(broker):
        _remember(seen, wid)
    items: list[dict[str, Any]] = []
    for wid in sorted(seen, reverse=True)[:WORKFLOWS_SHOWN]:
        try:
            st = await broker.workflows.status(wid)
        except ResultNotFound:
            seen.pop(wid, None)  # expired (or never ours)
            continue
        counts = collections.Counter(s.state for s in st.steps)
        items.append(
            {
                "workflow_id": str(wid),
                "state": st.state,
                "steps": len(st.steps),
                "step_states": dict(sorted(counts.items())),
                "failed_step": st.failed_step,
                "first_task": st.steps[0].task_name if st.steps else None,
            }
        )
    return {"running": running if isinstance(running, int) else None, "items": items}


async def one_workflow(broker: Broker, seen: Seen, workflow_id: str) -> dict[str, Any]:
    """``WorkflowStatus.to_json()`` and ``graph`` (SVG); ``ValueError`` for a bad id,
    :class:`~bus.ResultNotFound` for an unknown or expired one."""
    wid = TaskID.parse(workflow_id.strip())
    st = await broker.workflows.status(wid)
    _remember(seen, wid)
    out = st.to_json()
    out["graph"] = workflow_graph(out)
    return out
