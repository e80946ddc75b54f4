"""The documentation site's structure: every page of docs/ is reachable from the index, the
index's table of pages and its toctree agree, every public module has a reference page,
and the pages whose code runs elsewhere are run there.

The site itself is built (warnings as errors, nitpicky references) by ``scripts/docs.sh``,
which ``scripts/test.sh`` runs; these checks need no Sphinx.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

import pytest

from tests.docs_pages import DOCS, ROOT, RUN_BY, blocks, pages

TOCTREE = re.compile(r"^```\{toctree\}\n(.*?)^```", re.DOTALL | re.MULTILINE)
AUTOMODULE = re.compile(r"^\.\. automodule:: ([\w.]+)$", re.MULTILINE)
# Importable modules that are not part of the API reference, and why.
NOT_IN_REFERENCE = {
    "bus.pytest_plugin": "a pytest plugin (its fixtures are in docs/testing.md)",
    "bus.interop": "a namespace for bus.interop.*",
}


def _toctree(page: str) -> list[str]:
    """The pages a page's toctrees list, relative to docs/, in order."""
    entries = []
    for body in TOCTREE.findall((DOCS / page).read_text()):
        for line in body.splitlines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            target = m.group(1) if (m := re.fullmatch(r".*<(.+)>", line)) else line
            if target.startswith("/"):
                name = target.lstrip("/")
            else:
                name = posixpath.normpath(posixpath.join(posixpath.dirname(page), target))
            entries.append(f"{name.removesuffix('.md')}.md")
    return entries


def _reachable() -> dict[str, str]:
    """Each page reachable from index.md, with the page whose toctree lists it."""
    seen = {"index.md": ""}
    todo = ["index.md"]
    while todo:
        page = todo.pop()
        for entry in _toctree(page):
            assert (DOCS / entry).is_file(), f"{page}'s toctree lists {entry}, which is missing"
            if entry not in seen:
                seen[entry] = page
                todo.append(entry)
    return seen


def test_pages_are_found() -> None:
    found = pages()
    assert {"index.md", "quickstart.md", "reference/bus.md"} <= set(found)
    assert not [p for p in found if p.startswith("_build/")]


def test_every_page_is_reachable_from_the_index() -> None:
    reachable = _reachable()
    unreachable = sorted(set(pages()) - set(reachable))
    assert not unreachable, f"pages in no toctree (add them to index.md's): {unreachable}"


def test_no_page_is_listed_twice() -> None:
    listed = [entry for page in pages() for entry in _toctree(page)]
    assert sorted(listed) == sorted(set(listed))


def test_the_index_table_and_its_toctree_list_the_same_pages() -> None:
    """On a forge the index's table is the way in; on the site, its toctree."""
    text = (DOCS / "index.md").read_text()
    table = text[text.index("## Pages") :].split("\n\n")[1]
    linked = re.findall(r"^\| \[[^]]+\]\(([\w./-]+\.md)\)", table, flags=re.MULTILINE)
    assert linked
    in_toctree = [p for p in _toctree("index.md") if not p.startswith("reference/")]
    assert linked == in_toctree, (
        "index.md's table of pages and its toctree differ: list each guide page in both, "
        "in the same order"
    )


def _public_modules() -> set[str]:
    """Modules of actors/ and bus/ with no private part in their name and an ``__all__``."""
    found = set()
    for package in ("actors", "bus"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if any(part.startswith("_") for part in parts):
                continue
            if "__all__" in path.read_text():
                found.add(".".join(parts))
    return found - set(NOT_IN_REFERENCE)


def test_every_public_module_has_a_reference_page() -> None:
    documented = {
        m
        for page in pages()
        if page.startswith("reference/")
        for m in AUTOMODULE.findall((DOCS / page).read_text())
    }
    missing = sorted(_public_modules() - documented)
    assert not missing, (
        f"public modules without a page in docs/reference/: {missing} "
        "(add docs/reference/<module>.md with '.. automodule:: <module>' and list it in "
        "docs/reference/index.md)"
    )
    for module in documented:
        assert (DOCS / "reference" / f"{module}.md").is_file(), module


@pytest.mark.parametrize("page", sorted(RUN_BY))
def test_pages_run_elsewhere_are_run_there(page: str) -> None:
    assert page in pages()
    assert blocks(page), f"{page} has no python block to run"
    test = Path(ROOT / RUN_BY[page])
    assert test.is_file(), RUN_BY[page]
    assert page in test.read_text(), f"{RUN_BY[page]} does not name {page}"
