"""A worker's drain of many queued tasks is batched (issue #22): the acks of a drain are
one XACK and one XDEL per stream, the results of the runners that finish together go
out in one write, and reads serve many runners at once. Counted (Redis's own command
statistics, the client's writes), so a change that goes back to a command or a write
per task fails here, whatever the machine's speed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import bus
from bus.redis import RedisBroker, RedisResultBackend, _reader
from bus.redis._pool import lend
from bus.redis._results import _FIRST_RUNS_MAX
from tests.redis.support import commandstats

N = 256  # tasks drained
CONCURRENCY = 32


async def _drain(broker: RedisBroker) -> tuple[dict[str, int], int]:
    """Queue N no-op tasks, drain them with one worker; the commands the drain issued
    and the writes of the process's shared connection."""

    @broker.task(name="noop")
    async def noop() -> None:
        return None

    async with broker:
        kicker = noop.kicker()
        handles = [kicker.message() for _ in range(N)]
        await broker.kick_many(handles)
        assert broker._conn_ref is not None
        conn = (await lend(broker._conn_ref)).conn  # the process's shared connection
        writes = conn.stats.writes
        before = await commandstats(broker)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run_worker, CONCURRENCY)
            with trio.fail_after(30):
                # Every entry acked and deleted (results are stored before acks): a
                # state of Redis, polled; no in-process event says it.
                while await broker.client.execute("XLEN", broker.keys.stream):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        after = await commandstats(broker)
        writes = conn.stats.writes - writes
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in delta.items() if v > 0}, writes


async def test_a_drain_acks_reads_and_stores_in_batches(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    commands, writes = await _drain(broker)
    # Each task: its result (SET) and the claim of its attempt (SET NX).
    assert commands.get("set", 0) == 2 * N
    # The results stored together are announced together: one PUBLISH for a batch
    # (was one a task). How many results a batch has depends on how the runners'
    # ends fall into scheduler passes: about three here, two on a loaded machine.
    # (Exactly one for a pass's stores: test_announcements.py.)
    assert 0 < commands.get("publish", 0) <= 3 * N // 4, commands
    # No DEL of a progress key: none of these first runs stored progress (was one a task).
    assert commands.get("del", 0) == 0, commands
    # Acks: one XACK and one XDEL for all the acks of a drain (was one each per task).
    assert commands.get("xack", 0) <= N // 4, commands
    assert commands.get("xdel", 0) <= N // 4, commands
    # Reads: each serves many runners (a read of 32 when they come back together).
    assert commands.get("xreadgroup", 0) <= N // 4, commands
    # Cancel markers are read once a read (MGET).
    assert commands.get("mget", 0) <= N // 4, commands
    # Writes on the shared connection (results, claims, acks; a write is what costs
    # here, more than a command): one for each of those per read of 32, and the
    # worker's start. One a task would be 256; the old way, about 60.
    assert writes <= N // 5, (writes, commands)


async def _progress_after_result(broker: RedisBroker, write_progress: str) -> object:
    """Run a task that reports progress on its first attempt, then fails once (retried)
    and succeeds on the second; the progress readable once the result is stored.
    ``write_progress``: "ctx" (``ctx.set_progress``, this process) or "raw" (a SET of
    the key, as another process's run of the first attempt leaves it)."""

    backend = broker.result_backend
    assert isinstance(backend, RedisResultBackend)

    @broker.task(name="progressing", retries=1, retry_backoff=0)
    async def progressing(ctx: bus.Context) -> int:
        if ctx.attempt == 1:
            if write_progress == "ctx":
                await ctx.set_progress({"done": 1})
            else:
                await broker.client.execute(
                    "SET", backend.progress_key(ctx.task_id), b'{"done":1}', "PX", 60_000
                )
            raise RuntimeError("once more")
        return ctx.attempt

    async with broker, trio.open_nursery() as nursery:
        await nursery.start(broker.run_worker, 4)
        handle = await progressing.kiq()
        result = await handle.wait_result(timeout=10)
        assert result.return_value == 2
        progress = await handle.get_progress()
        nursery.cancel_scope.cancel()
    return progress


async def test_no_progress_is_left_after_a_result(make_broker: Callable[..., RedisBroker]) -> None:
    """The DEL of a progress key is left out only for a first attempt's first run that
    stored none: progress of an earlier attempt, stored here or by another process,
    is gone once the result is stored."""
    assert await _progress_after_result(make_broker(), "ctx") is None
    assert await _progress_after_result(make_broker(), "raw") is None


async def test_progress_of_a_first_run_is_deleted_with_its_result(
    make_broker: Callable[..., RedisBroker],
) -> None:

    broker = make_broker()

    @broker.task(name="reporting")
    async def reporting(ctx: bus.Context) -> None:
        await ctx.set_progress({"half": True})

    async with broker, trio.open_nursery() as nursery:
        await nursery.start(broker.run_worker, 4)
        handle = await reporting.kiq()
        await handle.wait_result(timeout=10)
        assert await handle.get_progress() is None
        nursery.cancel_scope.cancel()


def test_first_run_marks_are_bounded() -> None:
    backend = RedisResultBackend()
    for i in range(_FIRST_RUNS_MAX + 10):
        backend.mark_first_run(str(i), True)
    assert len(backend._first_runs) <= _FIRST_RUNS_MAX
    backend.mark_first_run("9", True)
    backend.mark_first_run("9", False)  # delivered again: its result deletes
    assert "9" not in backend._first_runs


async def _pending(broker: RedisBroker) -> int:
    """Entries of the stream read by a consumer and not acknowledged."""
    summary = await broker.client.execute("XPENDING", broker.keys.stream, "workers")
    assert isinstance(summary, list)
    return int(summary[0])


async def test_entries_are_read_ahead_for_short_tasks_and_handed_back_when_unused(
    make_broker: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While runners of short tasks are all busy, the next entries are read (at most as
    many as there are runners); read ahead and not taken by a runner within the hold
    time, they go back to the queue. Every task runs once."""
    # What counts as short and the hold, long enough for a loaded machine.
    monkeypatch.setattr(_reader, "_QUICK", 1.0)
    monkeypatch.setattr(_reader, "_AHEAD_HOLD", 0.5)
    broker = make_broker()
    gate = trio.Event()
    runs: list[int] = []

    @broker.task(name="quick")
    async def quick(i: int) -> None:
        runs.append(i)

    @broker.task(name="gated")
    async def gated(i: int) -> None:
        runs.append(i)
        await gate.wait()

    async with broker:
        messages = [quick.kicker().message(i) for i in range(4 * CONCURRENCY)]
        messages += [gated.kicker().message(1000 + i) for i in range(3 * CONCURRENCY)]
        await broker.kick_many(messages)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run_worker, CONCURRENCY)
            reader = broker.ref._cell.children["reader"].instance  # type: ignore[attr-defined]
            most = 0
            with trio.fail_after(10):
                # Every runner busy with a gated task, and entries read ahead (held by
                # the reader: pending, not handed to a runner).
                while len(runs) < 5 * CONCURRENCY or not most:
                    most = max(most, len(reader.held))
                    await trio.sleep(0.001)
            # Never more held than the runners.
            assert 0 < most <= CONCURRENCY, most
            await trio.sleep(1.0)
            assert await _pending(broker) == CONCURRENCY  # the others went back
            gate.set()
            with trio.fail_after(10):
                while await broker.client.execute("XLEN", broker.keys.stream):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert sorted(runs) == sorted([*range(4 * CONCURRENCY), *range(1000, 1000 + 3 * CONCURRENCY)])
