"""The pages of docs/ and their code blocks, found on disk (no hand-written list).

Every Markdown page under docs/ is a page of the site (``tests/test_docs_site.py`` checks
that each is reachable from the index). Every ``python`` block of a page is run:

- by ``tests/bus/test_docs.py``, unless the page is in ``RUN_BY``: in a subprocess a page
  in which only what the page names is installed (``tests/docs_extras.py`` says how a page
  names an extra of ours or a package, and how the rest is hidden);
- by the test module that ``RUN_BY`` names, for a page whose blocks need something that
  run does not have (a ``redis-server`` of the tests' own) or belong to another package's
  tests (the actor runtime's); ``tests/test_docs_extras.py`` then runs their imports with
  only what the page names.

A block marked ``<!-- pytest -->`` on the line before it is a pytest test module.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Folders of docs/ that hold no pages: Sphinx's output and its templates.
NOT_PAGES = ("_build", "_templates", "_static")

# page -> the test module that runs its python blocks (relative to the repository).
RUN_BY = {
    "actors.md": "tests/actors/test_docs.py",
    "quickstart.md": "tests/redis/test_docs.py",
    "redis.md": "tests/redis/test_docs.py",
    "redis-client.md": "tests/redisclient/test_docs.py",
    "taskiq.md": "tests/interop/test_docs.py",
}

BLOCK = re.compile(r"(<!-- pytest -->\n)?```python\n(.*?)```", re.DOTALL)


def pages() -> list[str]:
    """Every page under docs/, as a path relative to it (``reference/bus.md``)."""
    return sorted(
        path.relative_to(DOCS).as_posix()
        for path in DOCS.rglob("*.md")
        if not any(part in NOT_PAGES for part in path.relative_to(DOCS).parts)
    )


def blocks(page: str) -> list[tuple[bool, str]]:
    """The page's python blocks, in order: (is a pytest module, code)."""
    text = (DOCS / page).read_text()
    return [(bool(m.group(1)), m.group(2)) for m in BLOCK.finditer(text)]
