"""Every python block of docs/actors.md runs: programs directly, pytest blocks via pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_pages import DOCS, ROOT, blocks

PAGE = "actors.md"  # tests/docs_pages.py's RUN_BY sends this page here
DOC = DOCS / PAGE


def _blocks() -> list[tuple[bool, str]]:
    return blocks(PAGE)


def test_doc_has_blocks() -> None:
    blocks = _blocks()
    assert len(blocks) >= 4
    assert any(is_test for is_test, _ in blocks)
    # every fenced block is a python block we run
    assert DOC.read_text().count("```python") == len(blocks)


@pytest.mark.parametrize("index", [i for i, (is_test, _) in enumerate(_blocks()) if not is_test])
def test_program_block(index: int) -> None:
    _, code = _blocks()[index]
    exec(compile(code, f"{DOC}:block{index}", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("index", [i for i, (is_test, _) in enumerate(_blocks()) if is_test])
def test_pytest_block(index: int, tmp_path: Path) -> None:
    _, code = _blocks()[index]
    (tmp_path / f"test_doc_block{index}.py").write_text(code)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntrio_mode = true\naddopts = -W error -p no:cacheprovider\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    assert "failed" not in done.stdout
