"""Sphinx configuration of the documentation site (``sh scripts/docs.sh`` builds it).

The guide's pages stay Markdown (MyST-Parser reads them as they are, so they read the same
on a forge); the API reference under ``reference/`` is generated from the docstrings.
CI builds with ``-W -n --keep-going``: every warning and every unresolved reference fails.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sphinx.errors import PycodeError  # noqa: E402
from sphinx.pycode import ModuleAnalyzer  # noqa: E402
from sphinx.util import logging  # noqa: E402

import bus  # noqa: E402

logger = logging.getLogger(__name__)

project = "trio-bus"
author = "the trio-bus authors"
copyright = "the trio-bus authors"
release = bus.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinxcontrib_trio",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_templates", "Thumbs.db", ".DS_Store"]

# MyST: `[text](page.md#a-heading)` links work as on a forge (anchors from headings
# down to level 4); fenced ```{directive} blocks are how the reference pages call autodoc.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"trio-bus {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# The API reference: members in the order of each module's ``__all__``, signatures with
# their types (unqualified names, full names in the links).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Every name in ``__all__`` is listed, with a docstring or not; they are defined in
# private modules, hence ``imported-members``.
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "imported-members": True,
    "show-inheritance": True,
}
python_use_unqualified_type_names = True
add_module_names = False

# Nitpicky references: ours must all resolve. Intersphinx cannot be used (the build runs
# where there is no network), so the third-party and standard-library types that our
# signatures and docstrings name (trio, attrs, structlog, the Python standard library,
# starlette, hypercorn, prometheus_client, opentelemetry) cannot be linked: they are
# listed here by their module, and only those.
EXTERNAL_MODULES = (
    "trio",
    "attrs",
    "attr",
    "structlog",
    "starlette",
    "hypercorn",
    "prometheus_client",
    "opentelemetry",
    "cronsim",
    "collections",
    "contextlib",
    "contextvars",
    "datetime",
    "enum",
    "logging",
    "pathlib",
    "ssl",
    "types",
    "typing",
    "typing_extensions",
    "zoneinfo",
    "abc",
    "_contextvars",
)
# Third-party types that docstrings or annotations name without their module.
nitpick_ignore = [("py:class", "ReceiveChannel"), ("py:class", "CollectorRegistry")]
nitpick_ignore_regex = [
    (role, rf"{module}(\..+)?")
    for role in ("py:class", "py:obj", "py:exc", "py:func", "py:data")
    for module in EXTERNAL_MODULES
]

# The public modules: one page each under reference/, ``.. automodule:: NAME`` in it.
REFERENCE = Path(__file__).resolve().parent / "reference"
PUBLIC_MODULES = [
    match.group(1)
    for page in sorted(REFERENCE.glob("*.md"))
    if (match := re.search(r"^\.\. automodule:: ([\w.]+)$", page.read_text(), re.M))
]


def _public_names() -> dict[str, str]:
    """Map each public object's defining path (``bus._task.TaskHandle``) to its public one."""
    public: dict[str, str] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            defined_in = getattr(obj, "__module__", None) or ""
            if defined_in.partition(".")[0] not in ("actors", "bus"):
                continue  # a constant, or an alias of another library's type (ReplyFn)
            defined = f"{defined_in}.{getattr(obj, '__qualname__', name)}"
            public.setdefault(defined, f"{module_name}.{name}")
    return public


def _private_modules() -> list[Any]:
    return [
        module
        for name, module in sorted(sys.modules.items())
        if name.partition(".")[0] in ("actors", "bus") and "._" in f".{name}"
    ]


def _inherited(node: Any, target: str, public_names: dict[str, str]) -> str | None:
    """``run_worker`` in ``InMemoryBroker``'s docstring: the base class that defines it."""
    module, cls_name = node.get("py:module"), node.get("py:class")
    if not (module and cls_name) or "." in target:
        return None
    cls = getattr(importlib.import_module(module), cls_name.split(".")[0], None)
    for base in getattr(cls, "__mro__", ())[1:]:
        defined = f"{base.__module__}.{base.__qualname__}"
        if target in vars(base) or target in getattr(base, "__annotations__", {}):
            return f"{public_names[defined]}.{target}" if defined in public_names else ""
    return None


def _resolve_private(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve what the Python domain could not, or let it go unlinked on purpose.

    - ``bus._task.TaskHandle`` (how a signature names a public object): through its
      public name, ``bus.TaskHandle``.
    - A short name in a docstring (``ResultTimeout`` in ``bus.redis``,
      ``Broker.inspect``): through the one public name it can mean; a method a class
      inherits (``run_worker`` in ``InMemoryBroker``): through the base that defines it,
      or plain text if that base is private.
    - A type variable (``R``, ``bus._task.P``), a private member (``_open``) or a name
      that only a private module defines (``MAX_TIMEOUT``, ``Placement``): plain text.
    """
    if node.get("refdomain") != "py":
        return None
    target: str = node.get("reftarget", "")
    public_names: dict[str, str] = app.config.bus_public_names
    public = public_names.get(target)
    if public is None and target:
        head, _, rest = target.partition(".")
        found = {p for p in public_names.values() if p.rsplit(".", 1)[-1] == head}
        if len(found) == 1:
            public = found.pop() + (f".{rest}" if rest else "")
        else:
            public = _inherited(node, target, public_names)
    if public == "":  # a member of a private base class (``bus.redis._logic.Keys``)
        return contnode
    if public is not None:
        domain = env.get_domain("py")
        return domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
        )
    last = target.rsplit(".", 1)[-1]
    if TYPE_VARIABLE.fullmatch(last) or last.startswith("_"):
        return contnode
    if "." not in target and any(hasattr(m, target) for m in _private_modules()):
        return contnode
    return None


# Single capitals are the type variables of our generics (R, P, M, B, F).
TYPE_VARIABLE = re.compile(r"[A-Z]")

# Types of private modules that public signatures name (``bus._limits.Rate``): shown as
# text, not linked (they are not part of the reference).
nitpick_ignore_regex += [
    (role, pattern)
    for role in ("py:class", "py:obj", "py:func", "py:data", "py:meth")
    # ... and as a private module's alias where it is imported lazily (``_ops.Client``:
    # under TYPE_CHECKING only, so autodoc cannot resolve it to its full name).
    for pattern in (r"(actors|bus)(\.\w+)*\._\w+(\.\w+)*", r"_\w+(\.\w+)+")
]


def _skip_builtin_docstrings(
    app: Any, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Skip an undocumented override of a builtin's method (``FrozenDict.pop``): autodoc
    would show ``dict.pop``'s docstring and read its text as a signature."""
    builtins = (dict, list, tuple, set, frozenset, str)
    if what == "class" and getattr(obj, "__doc__", "") is None:
        return any(hasattr(base, name) for base in builtins) or None
    return None


def _is_data(obj: Any) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


def _data_doc(module_name: str, name: str, obj: Any) -> list[str]:
    """The ``#:`` comment of a constant, from the private module that assigns it."""
    for module in _private_modules():
        if not module.__name__.startswith(module_name.partition(".")[0]):
            continue
        if getattr(module, name, _MISSING) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return list(docs["", name])
    return []


_MISSING = object()


def _add_data(app: Any, docname: str, source: list[str]) -> None:
    """Document a reference page's constants (``actors.STOP``, ``bus.CONTEXT``).

    ``automodule`` lists only the classes and functions of ``__all__`` that are defined
    elsewhere: a constant imported from a private module has no docstring autodoc can
    find. So each one gets an ``autodata`` at the end of its page, with the ``#:``
    comment from where it is assigned.
    """
    if not docname.startswith("reference/"):
        return
    match = re.search(r"^\.\. automodule:: ([\w.]+)$", source[0], re.M)
    if match is None:
        return
    module_name = match.group(1)
    module = importlib.import_module(module_name)
    try:  # the constants the module assigns itself: automodule lists those
        own = {name for _, name in ModuleAnalyzer.for_module(module_name).find_attr_docs()}
    except PycodeError:
        own = set()
    own |= set(getattr(module, "__annotations__", {}))
    own = {name for name in own if not name.startswith("__")}  # autodoc skips dunders
    lines = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if name in own or not _is_data(obj):
            continue
        lines += [f".. autodata:: {name}", ""]
        lines += [f"   {line}" if line else "" for line in _data_doc(module_name, name, obj)]
        lines.append("")
    if lines:
        block = "\n".join([f".. currentmodule:: {module_name}", "", *lines])
        source[0] += f"\n```{{eval-rst}}\n{block}\n```\n"


def _no_type_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """A constant without a doc comment gets no docstring, not its type's (``int``'s)."""
    if what in ("data", "attribute") and not inspect.isclass(obj):
        type_doc = inspect.cleandoc(type(obj).__doc__ or "")
        if type_doc and "\n".join(lines).strip() == type_doc:
            lines[:] = []


def _check_reference(app: Any, env: Any) -> None:
    """Every name in a public module's ``__all__`` is in the reference (a warning if not,
    so CI's ``-W`` build fails when a new public name is not documented)."""
    documented = env.get_domain("py").objects
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if f"{module_name}.{name}" not in documented:
                logger.warning(
                    "%s.%s is public but not in the API reference (docs/reference/%s.md)",
                    module_name,
                    name,
                    module_name,
                )


def setup(app: Any) -> None:
    app.add_config_value("bus_public_names", {}, "env")
    app.config.bus_public_names = _public_names()
    app.connect("missing-reference", _resolve_private)
    app.connect("autodoc-skip-member", _skip_builtin_docstrings)
    app.connect("env-check-consistency", _check_reference)
    app.connect("source-read", _add_data)
    app.connect("autodoc-process-docstring", _no_type_docstring)
