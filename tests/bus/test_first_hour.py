"""A newcomer's first hour (issue 21, section 4): what the library itself does."""

from __future__ import annotations

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
