"""Hides installed modules from this process, for the docs' blocks (``tests/docs_extras.py``).

Python imports ``sitecustomize`` at start-up when it is on the path: ``tests/docs_extras.py``
puts this folder first on ``PYTHONPATH`` and names the modules to hide, with the reason,
in ``BUS_DOCS_HIDDEN`` (JSON: module -> reason). Importing one of them, or a submodule,
raises ``ModuleNotFoundError`` with that reason, as if it were not installed. Processes
started from this one inherit both variables, so they hide the same modules.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

_HIDDEN: dict[str, str] = json.loads(os.environ.get("BUS_DOCS_HIDDEN", "{}"))


class _Hider:
    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> None:
        parts = fullname.split(".")
        for i in range(1, len(parts) + 1):
            reason = _HIDDEN.get(".".join(parts[:i]))
            if reason is not None:
                raise ModuleNotFoundError(f"No module named {fullname!r} ({reason})", name=fullname)


if _HIDDEN:
    sys.meta_path.insert(0, _Hider())
