"""A git revision checked out beside this tree, for the A/B benchmarks (``--against REV``).

One helper for every benchmark: the revision is checked out in a temporary git worktree,
measured in processes of its own (``PYTHONPATH`` pointing at it), and removed at the end,
so nothing is left under /tmp or in ``git worktree list``.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def short_sha(rev: str) -> str:
    """``rev`` as a short commit id (raises CalledProcessError for an unknown one)."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@contextmanager
def checkout(rev: str) -> Iterator[tuple[str, Path]]:
    """Check ``rev`` out in a temporary worktree; yield its short id and its path.
    The worktree is removed on exit, also after an error or Ctrl-C."""
    sha = short_sha(rev)
    with tempfile.TemporaryDirectory(prefix=f"bench-{sha}-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha],
            check=True,
            capture_output=True,
        )
        try:
            yield sha, path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                check=False,
                capture_output=True,
            )
