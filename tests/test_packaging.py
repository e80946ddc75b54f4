"""The installed package as a user's project sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bus

pytestmark = pytest.mark.slow

USER_CODE = """
import bus

broker = bus.InMemoryBroker()


@broker.task
async def add(a: int, b: int) -> int:
    return a + b


async def main() -> None:
    async with broker:
        await add.kiq(1, "two")
"""


def test_mypy_in_a_users_project_sees_bus_and_rejects_a_wrong_kiq(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(USER_CODE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / ".cache"),
         "app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "Cannot find implementation or library stub" not in proc.stdout, proc.stdout
    assert 'Argument 2 to "kiq" of "Task" has incompatible type "str"' in proc.stdout
    assert proc.returncode == 1


def test_the_version_is_the_distributions() -> None:
    from importlib.metadata import version

    assert bus.__version__ == version("trio-bus")
