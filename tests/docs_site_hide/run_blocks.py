"""Runs a docs page's program blocks, each on its own, in this process; or with ``--imports``
only their import statements. Usage: ``run_blocks.py BLOCKS.json [--imports] [DIR]``, the
file holding ``[[name, code], ...]``, DIR a folder to import the blocks' own modules from.
Prints each failure's traceback and exits 1 if any failed."""

from __future__ import annotations

import ast
import json
import sys
import traceback


def _imports(code: str, local: set[str]) -> str:
    """The block's imports (at any depth), minus those of the page's own files."""
    lines = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] not in local]
            lines += [f"import {name}" for name in names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            lines += [f"import {node.module}"] if node.module.split(".")[0] not in local else []
    return "\n".join(lines)


def main() -> int:
    with open(sys.argv[1]) as f:
        blocks: list[tuple[str, str]] = json.load(f)
    imports_only = "--imports" in sys.argv[2:]
    sys.path[0:1] = [a for a in sys.argv[2:] if a != "--imports"]  # not this script's folder
    # The page's own files: blocks whose first line is ``# NAME.py``.
    local = {
        first[2:-3]
        for _, code in blocks
        if (first := code.split("\n", 1)[0]).startswith("# ") and first.endswith(".py")
    }
    failed = 0
    for name, code in blocks:
        source = _imports(code, local) if imports_only else code
        try:
            exec(compile(source, name, "exec"), {"__name__": "__docs__"})
        except BaseException:
            failed += 1
            print(f"--- {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
