"""The Redis broker actor restarted after a bug: nothing accepted is lost, nothing
running is handed out again, and the worker goes on."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import bus
from bus.protocol import Inspect
from bus.redis._broker import RedisBrokerActor
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = pytest.mark.redis


class Boom(Exception):
    pass


async def test_a_broker_actor_restart_runs_nothing_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RedisBrokerActor._actor_handlers[Inspect]
    crashed: list[int] = []

    async def crash_once(actor: Any, message: Any) -> Any:
        if not crashed:
            crashed.append(1)
            raise Boom("a bug in a handler")
        return await real(actor, message)

    monkeypatch.setitem(RedisBrokerActor._actor_handlers, Inspect, crash_once)
    broker = make_redis_broker(redis_server.url)
    runs: dict[int, int] = {}
    release = trio.Event()

    @broker.task(name="restart.work")
    async def work(i: int) -> int:
        runs[i] = runs.get(i, 0) + 1
        if i < 4:
            await release.wait()
        return i

    with trio.fail_after(30):
        async with broker, trio.open_nursery() as nursery:
            worker = await nursery.start(broker.run_worker, 8)
            first = [await work.kiq(i) for i in range(4)]
            while len(runs) < 4:  # noqa: ASYNC110 (the runners start them)
                await trio.sleep(0.01)
            with pytest.raises(Boom):
                await broker.ref.ask(Inspect())
            await trio.testing.wait_all_tasks_blocked()
            assert broker.ref.restart_count == 1
            release.set()  # the running tasks finish after the restart
            more = [await work.kiq(i) for i in range(4, 12)]
            results = await bus.gather(*first, *more, timeout=10)
            info = await broker.inspect()  # works again
            assert info.pending == 0 or info.pending <= 12
            worker.stop()
    assert [r.return_value for r in results] == list(range(12))
    assert runs == dict.fromkeys(range(12), 1)
