"""``bus workflows MODULE:BROKER show ID``: a workflow as a text tree with each step's
state (``--json``: the same as JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bus._broker import Broker
from bus._ids import TaskID

__all__ = ["add_workflows_parser", "show"]


def add_workflows_parser(sub: Any) -> None:
    w = sub.add_parser("workflows", help="show a workflow's steps and their states")
    w.add_argument("broker", metavar="MODULE:BROKER")
    w.add_argument("action", choices=["show"])
    w.add_argument("workflow_id", metavar="ID", help="the workflow's id (handle.workflow_id)")
    w.add_argument("--json", action="store_true")
    w.add_argument("--log-level", default="error")


def parse_id(args: argparse.Namespace) -> TaskID:
    """The ``ID`` argument; ``ValueError`` naming it when it is not a workflow id."""
    return TaskID.parse(args.workflow_id)


async def show(broker: Broker, workflow_id: TaskID, as_json: bool) -> int:
    """Print the workflow (exit 0); an unknown or expired one raises ``ResultNotFound``."""
    async with broker:
        status = await broker.workflows.status(workflow_id)
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(status.render())
    return 0
