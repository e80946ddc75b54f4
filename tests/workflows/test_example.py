"""examples/workflows.py runs and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import trio

import bus

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "workflows.py"


async def test_the_workflows_example() -> None:
    spec = importlib.util.spec_from_file_location("bus_examples_workflows", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with trio.fail_after(20):
        out = await module.main()
    assert out["words"] == 10
    assert out["failed"] is bus.TaskStatus.FAILURE and out["alerts"] == 1
    assert out["cancelled"] is bus.TaskStatus.CANCELLED
    assert out["crawl_states"] == ["cancelled"] * 6 + ["skipped"]
