"""Every python block of the docs runs (the pages are found on disk: ``tests/docs_pages.py``),
with only what its page names installed (``tests/docs_extras.py``).

Plain blocks are programs: each is executed on its own, one subprocess a page, in which
the installed distributions the page does not name (an extra of ours, a package) are
hidden. Blocks marked ``<!-- pytest -->`` are pytest test modules: they are written to a
temporary directory and run by one pytest subprocess a page (trio mode, warnings as
errors), likewise hidden. Pages whose blocks need more (a Redis server) are run by the
test that ``RUN_BY`` names; ``tests/test_docs_extras.py`` imports theirs with only what
they name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_extras import env_for, run_blocks
from tests.docs_pages import DOCS, RUN_BY, blocks, pages

PAGES = [page for page in pages() if page not in RUN_BY]
WITH_PROGRAMS = [page for page in PAGES if any(not t for t, _ in blocks(page))]
WITH_TESTS = [page for page in PAGES if any(t for t, _ in blocks(page))]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_is_found(page: str) -> None:
    text = (DOCS / page).read_text()
    assert text.count("```python") == len(blocks(page))
    assert text.count("<!-- pytest -->") == sum(is_test for is_test, _ in blocks(page))


@pytest.mark.parametrize("page", WITH_PROGRAMS)
def test_program_blocks(page: str, tmp_path: Path) -> None:
    programs = [
        (f"{DOCS / page}:block{i}", code)
        for i, (is_test, code) in enumerate(blocks(page))
        if not is_test
    ]
    done = run_blocks((DOCS / page).read_text(), programs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("page", WITH_TESTS)
def test_pytest_blocks(page: str, tmp_path: Path) -> None:
    for index, (is_test, code) in enumerate(blocks(page)):
        if is_test:
            name = f"test_{page.removesuffix('.md').replace('/', '_')}_block{index}.py"
            (tmp_path / name).write_text(code)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntrio_mode = true\naddopts = -W error -p no:cacheprovider\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=env_for((DOCS / page).read_text(), has_pytest_blocks=True),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    assert "failed" not in done.stdout


def test_the_testing_page_has_pytest_blocks() -> None:
    assert "testing.md" in WITH_TESTS
