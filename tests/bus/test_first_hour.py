"""A newcomer's first hour (issue 21, section 4): what the library itself does."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

import bus
from bus._results import DEFAULT_MAX_STORED_RESULTS
from tests.docs_pages import DOCS, blocks, pages


def test_the_in_memory_result_store_is_bounded_by_default() -> None:
    broker = bus.InMemoryBroker()
    assert isinstance(broker.result_backend, bus.InMemoryResultBackend)
    assert broker.result_backend.max_stored_results == DEFAULT_MAX_STORED_RESULTS == 10_000
    assert bus.InMemoryResultBackend().max_stored_results == 10_000
    unbounded = bus.InMemoryBroker(max_stored_results=None).result_backend
    assert isinstance(unbounded, bus.InMemoryResultBackend)
    assert unbounded.max_stored_results is None


async def test_kiq_names_the_missing_parameter_and_sends_nothing() -> None:
    broker = bus.InMemoryBroker(start_worker=False)

    @broker.task(name="jobs.add")
    async def add(a: int, b: int, ctx: bus.Context = bus.CONTEXT) -> int:
        return a + b

    with trio.fail_after(5):
        async with broker:
            missing = r"jobs\.add\(a, b\): missing a required argument: 'b'"
            with pytest.raises(TypeError, match=missing):
                await add.kiq(1)  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="'b'"):
                add.kiq_nowait(1)  # type: ignore[call-arg]
            assert (await broker.inspect())["queued"] == 0


def test_store_result_is_a_bool() -> None:
    broker = bus.InMemoryBroker()
    with pytest.raises(TypeError, match="store_result"):

        @broker.task(store_result="no")
        async def bad() -> None:
            pass

    @broker.task
    async def good() -> None:
        pass

    with pytest.raises(TypeError, match="store_result"):
        good.kicker().with_store_result("no")  # type: ignore[arg-type]


# ------------------------------------------------------------ logging, docs, extras

ROOT = Path(__file__).resolve().parents[2]

UNCONFIGURED = """
import trio
import bus

broker = bus.InMemoryBroker()


@broker.task(name="boom")
async def boom() -> None:
    raise ValueError("no")


async def main() -> None:
    async with broker:
        await (await boom.kiq()).wait_result(timeout=5)
    print("done")


trio.run(main)
"""


def test_unconfigured_logs_go_to_stderr_warnings_only_as_the_quickstart_says() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", UNCONFIGURED], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"  # nothing of the bus on stdout
    assert "task.failed" in proc.stderr and "[warning" in proc.stderr
    assert "worker.started" not in proc.stderr  # an info event: dropped
    quickstart = (DOCS / "quickstart.md").read_text()
    assert "go to standard error, one line each" in quickstart
    assert "info and debug events (such as `worker.started`) are dropped" in quickstart


def test_a_block_that_uses_trio_testing_imports_it() -> None:
    for page in pages():
        for i, (_, code) in enumerate(blocks(page)):
            if "trio.testing." in code:
                assert "import trio.testing" in code, f"{page} block {i}"


def test_the_extras_hold_what_the_docs_import() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    observability = (DOCS / "observability.md").read_text()
    assert "from opentelemetry.sdk" in observability
    assert any(d.startswith("opentelemetry-sdk==") for d in extras["tracing"])
    assert "import httpx" in observability
    assert any(d.startswith("httpx==") for d in extras["dashboard"])
    # Pinned as in dev.
    for extra in ("tracing", "dashboard"):
        assert set(extras[extra]) <= set(extras["dev"]), extra


#: What a docs block may import beyond the core, and what installs it: an extra of
#: ours (``trio-bus[EXTRA]``) or a package of its own (``pip install ... NAME``).
NEEDS = {
    "bus.redis": ("extra", "redis"),
    "bus.interop.taskiq": ("extra", "redis"),
    "bus.metrics": ("extra", "metrics"),
    "bus.tracing": ("extra", "tracing"),
    "bus.dashboard": ("extra", "dashboard"),
    "prometheus_client": ("extra", "metrics"),
    "opentelemetry.sdk": ("extra", "tracing"),
    "opentelemetry": ("extra", "tracing"),
    "httpx": ("extra", "dashboard"),
    "starlette": ("extra", "dashboard"),
    "taskiq_redis": ("package", "taskiq-redis"),
    "taskiq": ("package", "taskiq"),
}
CORE = {"bus", "actors", "trio", "attrs", "structlog", "cronsim", "pytest", "tasks"}


def _imports(code: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("page", pages())
def test_a_page_names_the_extras_its_blocks_need(page: str) -> None:
    """Each page's blocks run with the core and what the page says to install: every
    import outside the core and the standard library is installed by an extra the page
    names (``trio-bus[redis]``), or a package it names (``pip install ... taskiq``)."""
    text = (DOCS / page).read_text()
    named: set[str] = set()
    for m in re.finditer(r"trio-bus\[([a-z,\- ]+)\]", text):
        named |= {e.strip() for e in m.group(1).split(",")}
    installs = " ".join(re.findall(r"pip install [^`\n]*", text))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for _, code in blocks(page):
        for module in sorted(_imports(code)):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or (top in CORE and not module.startswith("bus.")):
                continue
            need = next(
                (NEEDS[k] for k in NEEDS if module == k or module.startswith(k + ".")), None
            )
            if need is None:
                assert top in CORE, f"{page}: what installs {module}?"
                continue
            kind, name = need
            if kind == "extra":
                assert name in named, f"{page} imports {module}: name trio-bus[{name}]"
                dist = {"opentelemetry.sdk": "opentelemetry-sdk", "httpx": "httpx"}.get(
                    module.split(".trace")[0]
                )
                if dist is not None:
                    assert any(d.startswith(dist + "==") for d in extras[name]), module
            else:
                assert name in installs.split(), f"{page} imports {module}: say pip install {name}"


async def test_in_memory_dead_letters_by_queue() -> None:
    broker = bus.InMemoryBroker()

    @broker.task(name="two", queue="other")
    async def two(a: int, b: int) -> int:
        return a + b

    @broker.task(name="one")
    async def one(a: int) -> int:
        return a

    with trio.fail_after(5):
        async with broker:
            # Arguments that do not fit (sent as they are, past kiq's check): rejected.
            await broker.kick(two.kicker().message(1))  # type: ignore[call-arg]
            await broker.kick(one.kicker().message(1, 2))  # type: ignore[call-arg]
            await broker.wait_all()
            assert [d["task_name"] for d in await broker.dead_letters(queue="other")] == ["two"]
            assert [d["task_name"] for d in await broker.dead_letters(queue="default")] == ["one"]
            assert len(await broker.dead_letters()) == 2
            assert await broker.purge_dead_letters(queue="other") == 1
            assert [d["task_name"] for d in await broker.dead_letters()] == ["one"]
