"""Every python block of the docs runs (the pages are found on disk: ``tests/docs_pages.py``).

Plain blocks are programs: each is executed on its own, in this process. Blocks marked
``<!-- pytest -->`` are pytest test modules: they are written to a temporary directory
and run together by one pytest subprocess (trio mode, warnings as errors). Pages whose
blocks need more (a Redis server) are run by the test that ``RUN_BY`` names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_pages import DOCS, ROOT, RUN_BY, blocks, pages

PAGES = [page for page in pages() if page not in RUN_BY]
PROGRAMS = [
    (page, i) for page in PAGES for i, (is_test, _) in enumerate(blocks(page)) if not is_test
]
TESTS = [(page, i) for page in PAGES for i, (is_test, _) in enumerate(blocks(page)) if is_test]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_is_found(page: str) -> None:
    text = (DOCS / page).read_text()
    assert text.count("```python") == len(blocks(page))
    assert text.count("<!-- pytest -->") == sum(is_test for is_test, _ in blocks(page))


@pytest.mark.parametrize(("page", "index"), PROGRAMS, ids=[f"{p}:{i}" for p, i in PROGRAMS])
def test_program_block(page: str, index: int) -> None:
    _, code = blocks(page)[index]
    exec(compile(code, f"{DOCS / page}:block{index}", "exec"), {"__name__": "__docs__"})


def test_pytest_blocks(tmp_path: Path) -> None:
    assert TESTS, "the testing page has pytest blocks"
    for page, index in TESTS:
        name = f"test_{page.removesuffix('.md').replace('/', '_')}_block{index}.py"
        (tmp_path / name).write_text(blocks(page)[index][1])
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntrio_mode = true\naddopts = -W error -p no:cacheprovider\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    assert "failed" not in done.stdout
