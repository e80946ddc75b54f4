"""A worker's drain of many queued tasks is batched (issue #22): the acks of a drain are
one XACK and one XDEL per stream, the results of the runners that finish together go
out in one write, and reads serve many runners at once. Counted (Redis's own command
statistics, the client's writes), so a change that goes back to a command or a write
per task fails here, whatever the machine's speed."""

from __future__ import annotations

from collections.abc import Callable

import trio

from bus.redis import RedisBroker
from bus.redis._pool import lend

N = 256  # tasks drained
CONCURRENCY = 32


async def _commandstats(broker: RedisBroker) -> dict[str, int]:
    """{command: calls} from Redis's ``INFO commandstats``."""
    info = await broker.client.execute("INFO", "commandstats")
    assert isinstance(info, bytes)
    out: dict[str, int] = {}
    for line in info.decode().splitlines():
        name, sep, stats = line.removeprefix("cmdstat_").partition(":")
        if line.startswith("cmdstat_") and sep:
            out[name] = int(dict(kv.split("=") for kv in stats.split(","))["calls"])
    return out


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
        before = await _commandstats(broker)
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run_worker, CONCURRENCY)
            with trio.fail_after(30):
                # Every entry acked and deleted (results are stored before acks): a
                # state of Redis, polled; no in-process event says it.
                while await broker.client.execute("XLEN", broker.keys.stream):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        after = await _commandstats(broker)
        writes = conn.stats.writes - writes
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in delta.items() if v > 0}, writes


async def test_a_drain_acks_reads_and_stores_in_batches(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    commands, writes = await _drain(broker)
    # Each task: its result (SET, PUBLISH, DEL of its progress) and the claim of its
    # attempt (SET NX): per task, as before.
    assert commands.get("publish", 0) == N
    assert commands.get("set", 0) == 2 * N
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
