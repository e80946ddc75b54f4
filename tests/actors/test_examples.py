"""The actor examples run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import trio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_counter_example() -> None:
    with trio.fail_after(10):
        assert await _load("actors_counter").main() == 1000


async def test_supervision_example() -> None:
    with trio.fail_after(10):
        lines = await _load("actors_supervision").main()
    assert lines[0] == "job 1 -> 10"
    assert lines[2].startswith("job 3 failed")
    assert lines[3] == "job 4 -> 40"
    assert len(lines) == 6
