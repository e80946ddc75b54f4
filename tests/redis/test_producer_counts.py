"""What a producer costs on Redis, counted (issue #22): a sequential kiq is one command
in one write read by its own caller; a round trip's producer commands are the XADD
alone (the waiter registered after its own send needs no read of the result key: the
announcement wakes it), and a waiter that may have missed the announcement still reads
the stored result. Counts, not times: they do not depend on the machine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import actors
import bus
from bus._results import encode_result_checked
from bus.redis import RedisBroker
from bus.redis._client import Connection, open_connection
from bus.redis._pool import lend
from bus.redis._results import RedisResultBackend, Sent

pytestmark = pytest.mark.redis


class _Steps(trio.abc.Instrument):
    """Scheduler steps, all tasks and those of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.all = 0
        self.mine = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.all += 1
        if task is self.task:
            self.mine += 1


@asynccontextmanager
async def _producer(
    make_broker: Callable[..., RedisBroker],
) -> AsyncIterator[tuple[RedisBroker, bus.Task[[], int], Connection]]:
    broker = make_broker(prefix=f"t{bus.TaskID.new()[-12:]}")

    @broker.task(name="x.one")
    async def one() -> int:
        return 1

    async with broker:
        assert broker._conn_ref is not None
        conn = (await lend(broker._conn_ref)).conn
        yield broker, one, conn


def _result(tid: bus.TaskID) -> bus.TaskResult[Any]:
    return bus.TaskResult(task_id=tid, status=bus.TaskStatus.SUCCESS, return_value=1)


async def _store(
    raw: Connection, backend: RedisResultBackend, tid: bus.TaskID, announce: bool = True
) -> None:
    """Store ``tid``'s result as a worker does (SET, PUBLISH ...), from a connection of
    its own; without the announcement when ``announce`` is false (one that was lost)."""
    data = encode_result_checked(backend.codec, tid, _result(tid))
    commands = backend.store_commands(tid, data, only_new=False)
    replies = await raw.pipeline(commands if announce else commands[:1])
    assert not any(isinstance(r, Exception) for r in replies)


@asynccontextmanager
async def _subscribed(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> AsyncIterator[tuple[RedisResultBackend, bus.Task[[], int], Connection, Connection]]:
    """A producer after one round trip (its first waiter subscribed, and read its key),
    and a connection of its own to store results as a worker does."""
    async with _producer(make_broker) as (broker, one, conn), open_connection(redis_url) as raw:
        backend = broker.result_backend
        assert isinstance(backend, RedisResultBackend)
        h = await one.kiq()
        await _store(raw, backend, h.task_id)
        assert (await h.wait_result(timeout=10)).return_value == 1
        yield backend, one, conn, raw


async def test_a_sequential_kiq_is_one_write_read_by_its_caller(
    make_broker: Callable[..., RedisBroker],
) -> None:
    n = 50
    async with _producer(make_broker) as (_, one, conn):
        for _ in range(5):
            await one.kiq()
        steps = _Steps(trio.lowlevel.current_task())
        before = (conn.stats.commands, conn.stats.writes, conn.stats.own_reads)
        trio.lowlevel.add_instrument(steps)  # trio.lowlevel: count scheduler steps
        try:
            for _ in range(n):
                await one.kiq()
        finally:
            trio.lowlevel.remove_instrument(steps)
        after = (conn.stats.commands, conn.stats.writes, conn.stats.own_reads)
    commands, writes, own_reads = (a - b for a, b in zip(after, before, strict=True))
    assert commands == n and writes == n  # the XADD, written alone, nothing else
    assert own_reads >= n - 2  # the caller reads its own reply
    # The caller: one step a kiq (woken by its reply); the reader one more, while the
    # server works. No actor hop, no extra pass.
    assert steps.mine <= n + 2, steps.mine
    assert steps.all <= 2 * n + 5, steps.all


async def test_a_producer_tells_its_store_of_sends_only_once_it_is_subscribed(
    make_broker: Callable[..., RedisBroker], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any waiter of the process subscribed, the result store would ignore a
    ``Sent``: a send does not tell it (a tell a send, about 5 % of its CPU). Once
    subscribed, each new send is told, so its waiter needs no read (the test below)."""
    told: list[bus.TaskID] = []
    tell = actors.ActorRef.tell_nowait

    def spy(ref: actors.ActorRef, msg: Any) -> None:
        if isinstance(msg, Sent):
            told.append(msg.task_id)
        tell(ref, msg)

    monkeypatch.setattr(actors.ActorRef, "tell_nowait", spy)
    async with _producer(make_broker) as (_, one, _conn):
        for _ in range(5):
            await one.kiq()
    assert told == []
    async with _subscribed(make_broker, redis_url) as (_, one, _conn, _raw):
        told.clear()
        handles = [await one.kiq() for _ in range(3)]
    assert told == [h.task_id for h in handles]


async def test_a_round_trip_sends_one_command_from_the_producer(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> None:
    async with _subscribed(make_broker, redis_url) as (backend, one, conn, raw):
        for _ in range(5):
            before = conn.stats.commands
            h = await one.kiq()
            got: list[bus.TaskResult[Any]] = []
            async with trio.open_nursery() as nursery:

                async def wait(
                    h: bus.TaskHandle[int] = h, got: list[bus.TaskResult[Any]] = got
                ) -> None:
                    got.append(await h.wait_result(timeout=10))

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await _store(raw, backend, h.task_id)
                steps = _Steps(trio.lowlevel.current_task())
                trio.lowlevel.add_instrument(steps)  # trio.lowlevel: count scheduler steps
            trio.lowlevel.remove_instrument(steps)
            assert got[0].return_value == 1
            assert conn.stats.commands - before == 1  # the XADD; no MGET
            # From the store's reply to the waiter's result: the subscription's reader
            # (it reads the announcement and the store wakes the waiter in that step),
            # the waiter, this task (the nursery's end). No task in between.
            assert steps.all <= 3, steps.all


async def test_an_announcement_seen_before_the_waiter_is_read(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> None:
    async with _subscribed(make_broker, redis_url) as (backend, one, conn, raw):
        h = await one.kiq()
        await _store(raw, backend, h.task_id)
        await trio.sleep(0.2)  # the announcement arrives while nobody waits
        before = conn.stats.commands
        with trio.fail_after(10):
            assert (await h.wait_result()).return_value == 1
        assert conn.stats.commands - before == 1  # read: the announcement was gone


async def test_a_result_whose_announcement_was_lost_is_read_after_resubscribing(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> None:
    async with _subscribed(make_broker, redis_url) as (backend, one, _, raw):
        waiting = await one.kiq()  # its waiter will not read
        later = await one.kiq()  # its waiter comes after the reconnect: reads
        got: list[bus.TaskResult[Any]] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    got.append(await waiting.wait_result())

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                # The subscription drops; both results are stored meanwhile, unannounced.
                await raw.execute("CLIENT", "KILL", "TYPE", "pubsub")
                await _store(raw, backend, waiting.task_id, announce=False)
                await _store(raw, backend, later.task_id, announce=False)
            assert got[0].return_value == 1
            assert (await later.wait_result()).return_value == 1


async def test_a_task_id_sent_again_is_read(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A task id sent again (its result stored: a worker drops the repeat and announces
    nothing) is read; so is one made before other ids."""
    async with _subscribed(make_broker, redis_url) as (backend, one, _, raw):
        tid = bus.TaskID.new()
        h = await one.kicker().with_task_id(tid).kiq()
        await _store(raw, backend, tid)
        assert (await h.wait_result(timeout=10)).return_value == 1
        with trio.fail_after(10):
            h = await one.kicker().with_task_id(tid).kiq()
            assert (await h.wait_result()).return_value == 1
            early = bus.TaskID.new()
            bus.TaskID.new()
            h = await one.kicker().with_task_id(early).kiq()
            await _store(raw, backend, early, announce=False)  # as if stored before
            assert (await h.wait_result()).return_value == 1


async def test_a_waiter_that_skipped_its_read_reads_once_if_no_announcement_comes(
    make_broker: Callable[..., RedisBroker], redis_url: str
) -> None:
    """The safety net: an id made here last, run and stored elsewhere before this
    process sends it (the worker drops the repeat and announces nothing), is still
    found by one late read of the waiter that skipped its read."""
    async with _subscribed(make_broker, redis_url) as (backend, one, _, raw):
        tid = bus.TaskID.new()
        await _store(raw, backend, tid, announce=False)  # as another process did
        h = await one.kicker().with_task_id(tid).kiq()
        start = trio.current_time()
        with trio.fail_after(10):
            assert (await h.wait_result()).return_value == 1
        assert trio.current_time() - start >= 0.9  # found by the late read, not at once
