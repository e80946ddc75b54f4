"""The check that a docs page's blocks run with only what the page names
(``tests/docs_extras.py``): it fails a page that uses an extra it does not name, and the
pages whose blocks run elsewhere (``RUN_BY``: a Redis server of the tests' own) and the
examples (run by their own tests, some of them servers) import what they use with only
what they name (an example names what it needs in its text, as a page does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs_extras import allowed, hidden, named, run_blocks
from tests.docs_pages import DOCS, ROOT, RUN_BY, blocks

EXAMPLES = sorted(path.name for path in (ROOT / "examples").glob("*.py"))

TRACES = """\
import opentelemetry.sdk.trace

provider = opentelemetry.sdk.trace.TracerProvider()
"""


def test_a_page_that_uses_an_extra_it_does_not_name_fails(tmp_path: Path) -> None:
    page = "# Traces\n\nSpans go to the SDK's provider.\n"
    done = run_blocks(page, [("page.md:block0", TRACES)], tmp_path)
    assert done.returncode == 1, done.stderr
    assert "No module named 'opentelemetry'" in done.stderr, done.stderr
    assert "trio-bus[tracing]" in done.stderr, done.stderr


def test_the_same_page_naming_the_extra_runs(tmp_path: Path) -> None:
    page = "# Traces\n\n`pip install 'trio-bus[tracing]'`, then:\n"
    done = run_blocks(page, [("page.md:block0", TRACES)], tmp_path)
    assert done.returncode == 0, done.stderr


def test_our_module_of_an_extra_fails_without_it(tmp_path: Path) -> None:
    """bus.redis is ours, so it is never hidden; hiredis, which it needs, is."""
    code = "from bus.redis import RedisBroker\n"
    done = run_blocks("# Redis\n", [("page.md:block0", code)], tmp_path, imports_only=True)
    assert done.returncode == 1, done.stderr
    assert "hiredis" in done.stderr and "trio-bus[redis]" in done.stderr, done.stderr
    named_page = "pip install 'trio-bus[redis]'\n"
    assert run_blocks(named_page, [("page.md:block0", code)], tmp_path).returncode == 0


def test_what_a_page_names() -> None:
    text = "`trio-bus[metrics]`, `pip install 'trio-bus[redis, tracing]' taskiq taskiq-redis`"
    extras, packages = named(text)
    assert extras == {"metrics", "redis", "tracing"}
    assert {"taskiq", "taskiq-redis"} <= packages
    assert {"pytest", "pytest-trio"} <= named("", has_pytest_blocks=True)[1]
    core = allowed(set(), set())
    assert {"trio-bus", "trio", "attrs", "structlog"} <= core
    assert "hiredis" not in core and "pytest" not in core
    assert "hiredis" in hidden(core)
    # A namespace package shared with an allowed distribution: its own part is hidden.
    api_only = hidden(allowed(set(), {"opentelemetry-api"}))
    assert "opentelemetry" not in api_only
    assert "opentelemetry.sdk" in api_only


@pytest.mark.parametrize("page", sorted(RUN_BY))
def test_pages_run_elsewhere_import_only_what_they_name(page: str, tmp_path: Path) -> None:
    """Their blocks run where RUN_BY says (with every extra installed); here their imports
    run with only what the page names, and, where that test needs no Redis server
    (actors.md), the program blocks run whole."""
    text = (DOCS / page).read_text()
    code = [(f"{DOCS / page}:block{i}", c) for i, (_, c) in enumerate(blocks(page))]
    done = run_blocks(text, code, tmp_path, imports_only=True)
    assert done.returncode == 0, done.stdout + done.stderr
    if "pytest.mark.redis" not in (ROOT / RUN_BY[page]).read_text():
        programs = [
            (f"{DOCS / page}:block{i}", c)
            for i, (is_test, c) in enumerate(blocks(page))
            if not is_test
        ]
        done = run_blocks(text, programs, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_import_only_what_they_name(example: str, tmp_path: Path) -> None:
    """An example's modules of its own (``redis_producer.py`` imports ``redis_worker``)
    run as they are imported; the rest of the example is run by its own test."""
    text = (ROOT / "examples" / example).read_text()
    done = run_blocks(text, [(example, text)], tmp_path, imports_only=True, path=ROOT / "examples")
    assert done.returncode == 0, done.stdout + done.stderr
