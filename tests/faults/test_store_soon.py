"""``RedisResultBackend.set_result_soon``: the worker's way of storing a result in the
background. The stores told in one scheduler pass go out in one write; each store's
``stored`` is called exactly once, with ``None`` once Redis has the result, or with
the error ``set_result`` would raise (Redis unreachable past ``write_timeout``, the
backend stopped); a Redis that comes back in time gets the result, unchanged. The
results of one write are announced with one ``PUBLISH``."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import actors
import bus
from bus.redis import RedisBroker, RedisResultBackend
from bus.redis._client import RedisError
from bus.redis._pool import lend
from tests.faults.proxy import FaultProxy
from tests.redis.server import RedisServer
from tests.redis.support import commandstats

pytestmark = pytest.mark.redis


def _broker(url: str, **backend_options: Any) -> tuple[RedisBroker, RedisResultBackend]:
    prefix = f"t{bus.TaskID.new()[-12:]}"
    backend = RedisResultBackend(url, prefix=prefix, **backend_options)
    return RedisBroker(url, prefix=prefix, queue="q", result_backend=backend), backend


class Confirmations:
    """The ``stored`` callbacks of some stores, and what each was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, BaseException | None]] = []
        self.changed = trio.Event()

    def stored(self, n: int) -> Any:
        def stored(error: BaseException | None) -> None:
            self.calls.append((n, error))
            self.changed.set()
            self.changed = trio.Event()

        return stored

    async def wait(self, count: int) -> None:
        while len(self.calls) < count:
            await self.changed.wait()


def _result(tid: bus.TaskID, n: int) -> bus.TaskResult[Any]:
    return bus.TaskResult(task_id=tid, status=bus.TaskStatus.SUCCESS, return_value=n)


async def test_stores_of_one_pass_are_one_write_and_confirmed_in_order(
    redis_server: RedisServer,
) -> None:
    broker, backend = _broker(redis_server.url)
    seen = Confirmations()
    ids = [bus.TaskID.new() for _ in range(20)]
    with trio.fail_after(20):
        async with broker:
            assert broker._conn_ref is not None
            conn = (await lend(broker._conn_ref)).conn
            # Read before the writes are counted: INFO is a write on this connection.
            publishes = (await commandstats(broker)).get("publish", 0)
            writes = conn.stats.writes
            for n, tid in enumerate(ids):  # one scheduler pass: no checkpoint here
                assert backend.set_result_soon(tid, _result(tid, n), seen.stored(n))
            await seen.wait(len(ids))
            # One write for the 20 (the broker's other actors may write meanwhile).
            assert conn.stats.writes - writes <= 3
            # And one announcement for the 20 (see tests/redis/test_announcements.py).
            assert (await commandstats(broker)).get("publish", 0) - publishes == 1
            assert seen.calls == [(n, None) for n in range(len(ids))]
            for n, tid in enumerate(ids):
                assert (await backend.get_result(tid)).return_value == n


async def test_stores_that_come_one_at_a_time_are_written_at_once(
    redis_server: RedisServer,
) -> None:
    """A worker running one task after another: once its stores came alone, each is
    written before ``set_result_soon`` returns (not a scheduler pass later); when many
    come in one pass again, they are gathered into one write again."""
    broker, backend = _broker(redis_server.url)
    seen = Confirmations()
    with trio.fail_after(20):
        async with broker:
            assert broker._conn_ref is not None
            conn = (await lend(broker._conn_ref)).conn
            for n in range(3):  # alone: the first is gathered (none came before it)
                tid = bus.TaskID.new()
                writes = conn.stats.writes
                assert backend.set_result_soon(tid, _result(tid, n), seen.stored(n))
                if n:
                    assert conn.stats.writes == writes + 1  # written: no checkpoint yet
                await seen.wait(n + 1)
            ids = [bus.TaskID.new() for _ in range(10)]
            for n, tid in enumerate(ids, start=3):  # many in one pass
                assert backend.set_result_soon(tid, _result(tid, n), seen.stored(n))
            await seen.wait(13)
            tid = bus.TaskID.new()
            writes = conn.stats.writes
            assert backend.set_result_soon(tid, _result(tid, 13), seen.stored(13))
            assert conn.stats.writes == writes  # gathered: the last ones came together
            await seen.wait(14)
            assert seen.calls == [(n, None) for n in range(14)]
            for n, tid in enumerate(ids, start=3):
                assert (await backend.get_result(tid)).return_value == n


async def test_not_taken_when_it_cannot_be_done_in_the_background(
    redis_server: RedisServer,
) -> None:
    broker, backend = _broker(redis_server.url, min_replicas_ack=1)
    tid = bus.TaskID.new()
    never = Confirmations()
    # Not running yet, then min_replicas_ack (a WAIT loop): False, nothing done.
    assert not backend.set_result_soon(tid, _result(tid, 1), never.stored(0))
    with trio.fail_after(20):
        async with broker:
            assert not backend.set_result_soon(tid, _result(tid, 1), never.stored(0))
            with pytest.raises(bus.ResultNotFound):
                await backend.get_result(tid)
    assert never.calls == []


async def test_a_store_in_flight_when_the_backend_stops_is_confirmed_or_refused(
    redis_server: RedisServer,
) -> None:
    """Never dropped in silence (a worker's drain waits for it): stored, or told the
    store stopped."""
    broker, backend = _broker(redis_server.url)
    seen = Confirmations()
    tid = bus.TaskID.new()
    with trio.fail_after(20):
        async with broker:
            assert backend.set_result_soon(tid, _result(tid, 1), seen.stored(0))
        assert len(seen.calls) == 1
        error = seen.calls[0][1]
        # Stored; or refused as set_result would be: the store (or the connection
        # under it) stopped first.
        assert error is None or isinstance(
            error, actors.ActorStopped | bus.BusError | RedisError
        ), repr(error)


async def test_a_store_waits_out_an_outage_shorter_than_write_timeout(
    proxy: FaultProxy,
) -> None:
    broker, backend = _broker(proxy.url, write_timeout=30)
    seen = Confirmations()
    ids = [bus.TaskID.new() for _ in range(5)]
    with trio.fail_after(30):
        async with broker:
            await proxy.outage()
            for n, tid in enumerate(ids):
                assert backend.set_result_soon(tid, _result(tid, n), seen.stored(n))
            await trio.sleep(1.0)
            assert seen.calls == []  # not confirmed while Redis is away
            proxy.heal()
            await seen.wait(len(ids))
            assert sorted(seen.calls, key=lambda c: c[0]) == [(n, None) for n in range(5)]
            for n, tid in enumerate(ids):
                assert (await backend.get_result(tid)).return_value == n


async def test_a_store_gives_up_at_write_timeout(proxy: FaultProxy) -> None:
    broker, backend = _broker(proxy.url, write_timeout=1.0)
    seen = Confirmations()
    tid = bus.TaskID.new()
    with trio.fail_after(30):
        async with broker:
            await proxy.outage()
            start = trio.current_time()
            assert backend.set_result_soon(tid, _result(tid, 1), seen.stored(0))
            await seen.wait(1)
            waited = trio.current_time() - start
            proxy.heal()
    [(_, error)] = seen.calls
    assert isinstance(error, bus.BrokerUnavailable | ConnectionError | bus.BusError), error
    assert 1.0 <= waited < 5.0


async def test_an_outage_as_the_broker_starts_does_not_stall_the_process(
    proxy: FaultProxy,
) -> None:
    """Cut while the actors that keep the shared connection prepare it (scripts are
    loaded as the broker starts): a connection that broke, not yet marked lost,
    failed each of them at once, and the keeper tried it again without yielding: the
    process spun and nothing else ran (the outage below never returned)."""
    broker, _ = _broker(proxy.url, write_timeout=30)

    @broker.task(name="one")
    async def one() -> int:
        return 1

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            await proxy.outage()
            await trio.sleep(0.5)
            proxy.heal()
            await nursery.start(broker.run_worker, 1)
            assert (await (await one.kiq()).wait_result(timeout=10)).return_value == 1
            nursery.cancel_scope.cancel()
