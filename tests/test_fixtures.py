"""The test suite's own shape: no async fixture that is only ``autouse``. pytest-trio
runs an async fixture only when a test (or a fixture it uses) asks for it by name
(python-trio/pytest-trio#123): an autouse one is silently skipped, its teardown with
it (one such fixture left every client of tests/faults/test_proxy.py open)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _autouse(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and any(
        k.arg == "autouse" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in decorator.keywords
    )


def _async_autouse_fixtures(source: str) -> list[str]:
    return [
        node.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AsyncFunctionDef) and any(map(_autouse, node.decorator_list))
    ]


def test_no_async_fixture_is_only_autouse() -> None:
    found = {
        str(path.relative_to(TESTS)): names
        for path in sorted(TESTS.rglob("*.py"))
        if (names := _async_autouse_fixtures(path.read_text(encoding="utf-8")))
    }
    assert found == {}, f"async autouse fixtures never run under pytest-trio: {found}"


def test_the_check_finds_one() -> None:
    source = "import pytest\n@pytest.fixture(autouse=True)\nasync def f():\n    yield\n"
    assert _async_autouse_fixtures(source) == ["f"]
    assert _async_autouse_fixtures(source.replace("async def", "def")) == []
