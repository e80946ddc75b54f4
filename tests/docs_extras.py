"""What a docs page's blocks may import: the core and what the page names, nothing else.

A page's python blocks run (``tests/bus/test_docs.py``, ``tests/test_docs_extras.py``) in a
subprocess that hides every installed distribution the page does not name, as if it were
not installed, so that a page that uses a package of an extra it does not name fails
instead of passing because the tests install every extra.

How a page names what it needs (the way the pages tell a reader what to install):

- an extra of ours: ``trio-bus[EXTRA]`` anywhere in the page (``pip install
  'trio-bus[redis]'``, or a table cell `` `trio-bus[tracing]` ``); ``trio-bus[a,b]`` names
  both;
- a package of its own: a word after ``pip install`` (``pip install 'trio-bus[redis]'
  taskiq taskiq-redis``);
- a page with ``<!-- pytest -->`` blocks is about testing with pytest: pytest and
  pytest-trio, which run those blocks, are named by them.

What may be imported: trio-bus's base dependencies, the named extras' and packages', and
everything those depend on, as the installed metadata says (``importlib.metadata``); plus
pip, setuptools and wheel, which every environment has. Every other installed distribution
is hidden (``tests/docs_site_hide/sitecustomize.py``): its top-level modules, or, where it
shares a namespace package with an allowed one (``opentelemetry``), its own submodules.
``bus.redis`` then fails to import on a page that does not name ``trio-bus[redis]``,
because hiredis is hidden.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.docs_pages import ROOT

HIDE_DIR = Path(__file__).resolve().parent / "docs_site_hide"
RUN_BLOCKS = HIDE_DIR / "run_blocks.py"
PROJECT = "trio-bus"
ALWAYS = {"pip", "setuptools", "wheel"}
PYTEST_RUNNER = {"pytest", "pytest-trio"}

_EXTRA = re.compile(r"trio-bus\[([a-z0-9,\- ]+)\]")
_PIP = re.compile(r"pip install ([^`\n]*)")


def named(text: str, *, has_pytest_blocks: bool = False) -> tuple[set[str], set[str]]:
    """The extras of ours and the other distributions a page's text names."""
    extras = {e.strip() for m in _EXTRA.finditer(text) for e in m.group(1).split(",")}
    packages = set()
    for m in _PIP.finditer(text):
        for word in m.group(1).split():
            word = word.strip("'\"")
            if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*(\[[a-z0-9,\-]+\])?", word):
                packages.add(word)
    if has_pytest_blocks:
        packages |= PYTEST_RUNNER
    return extras - {""}, packages


def allowed(extras: set[str], packages: set[str]) -> set[str]:
    """The installed distributions (canonical names) that the core, these extras of ours
    and these packages bring, with everything they depend on."""
    roots = [(PROJECT, frozenset(extras))]
    for spec in packages:
        req = Requirement(spec)
        roots.append((req.name, frozenset(req.extras)))
    found = {canonicalize_name(n) for n in ALWAYS}
    seen: set[tuple[str, frozenset[str]]] = set()
    while roots:
        name, wanted = roots.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed: nothing to allow
        found.add(key[0])
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (wanted or {""})
            ):
                continue
            roots.append((req.name, frozenset(req.extras)))
    return found


@functools.cache
def _installed() -> dict[str, tuple[set[str], set[str]]]:
    """Each installed distribution's top-level modules and their submodules (one level)."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for dist in importlib.metadata.distributions():
        tops: set[str] = set()
        subs: set[str] = set()
        for file in dist.files or []:
            parts = list(file.parts)
            if parts[0] == ".." or "__pycache__" in parts or parts[0].endswith(".dist-info"):
                continue
            if not parts[-1].endswith((".py", ".so", ".pyd")):
                continue
            stem = parts[-1].split(".")[0]
            parts = parts[:-1] if stem == "__init__" else [*parts[:-1], stem]
            if parts and parts[0].isidentifier():
                tops.add(parts[0])
                if len(parts) > 1:
                    subs.add(f"{parts[0]}.{parts[1]}")
        name = canonicalize_name(dist.metadata["Name"])
        old = out.setdefault(name, (set(), set()))
        old[0].update(tops)
        old[1].update(subs)
    return out


@functools.cache
def _brought_by() -> dict[str, str]:
    """Each distribution that an extra of ours brings beyond the core: the first such extra."""
    core = allowed(set(), set())
    extras = importlib.metadata.metadata(PROJECT).get_all("Provides-Extra") or []
    out: dict[str, str] = {}
    for extra in extras:
        if extra in ("dev", "docs", "bench"):
            continue
        for name in allowed({extra}, set()) - core:
            out.setdefault(name, extra)
    return out


def hidden(allow: set[str]) -> dict[str, str]:
    """The modules to hide so that only the allowed distributions can be imported, each
    with the reason said when it is imported."""
    installed = _installed()
    open_tops = {t for n in allow if n in installed for t in installed[n][0]}
    open_subs = {s for n in allow if n in installed for s in installed[n][1]}
    out: dict[str, str] = {}
    for name, (tops, subs) in sorted(installed.items()):
        if name in allow:
            continue
        extra = _brought_by().get(name)
        how = f"trio-bus[{extra}]" if extra else f"pip install {name}"
        reason = f"hidden by the docs check: {name} is not named by this page ({how})"
        for top in tops - open_tops:
            out.setdefault(top, reason)
        for sub in subs - open_subs:
            if sub.split(".")[0] in open_tops:
                out.setdefault(sub, reason)
    return out


def env_for(text: str, *, has_pytest_blocks: bool = False) -> dict[str, str]:
    """The environment of a process that runs a page's blocks with only what it names.

    For pytest (``has_pytest_blocks``): pytest loads only the plugins of the allowed
    distributions, as it would where only they are installed (a hidden one's plugin would
    fail to import)."""
    allow = allowed(*named(text, has_pytest_blocks=has_pytest_blocks))
    path = os.pathsep.join([str(HIDE_DIR), str(ROOT)])
    env = dict(os.environ, PYTHONPATH=path, BUS_DOCS_HIDDEN=json.dumps(hidden(allow)))
    if has_pytest_blocks:
        plugins = sorted(
            ep.module
            for ep in importlib.metadata.entry_points(group="pytest11")
            if ep.dist is not None and canonicalize_name(ep.dist.name) in allow
        )
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        env["PYTEST_ADDOPTS"] = " ".join(f"-p {module}" for module in plugins)
    return env


def run_blocks(
    text: str,
    blocks: list[tuple[str, str]],
    tmp: Path,
    *,
    imports_only: bool = False,
    path: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run these blocks (name, code) of a page with its text in a subprocess that has only
    what the text names, warnings as errors (``imports_only``: only their import
    statements; ``path``: where the modules they import of their own are)."""
    spec = tmp / "blocks.json"
    spec.write_text(json.dumps(blocks))
    options = (["--imports"] if imports_only else []) + ([str(path)] if path else [])
    return subprocess.run(
        [sys.executable, "-W", "error", str(RUN_BLOCKS), str(spec), *options],
        cwd=tmp,
        env=env_for(text),
        capture_output=True,
        text=True,
        timeout=120,
    )
