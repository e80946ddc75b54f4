"""One bad entry cannot stall a Redis queue nor stop its broker (issue 18, item 3).

On a real redis-server: an entry nested 900 levels deep is dead-lettered at its first
delivery while other tasks keep flowing (the reader crashed on it, re-read it and
crashed again, forever); an option label out of its bounds is refused at ``kiq`` and
rejected by the worker when written by hand (a 1e308 backoff stopped the broker actor);
the broker's nack takes any delay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

import bus
from bus._protocol import Nack, Receive, Send
from bus.redis import RedisBroker
from tests.security.support import SECRET, until

pytestmark = pytest.mark.redis


def _poison(task_id: bus.TaskID, depth: int = 900) -> bytes:
    nested = b"[" * depth + b"1" + b"]" * depth
    return b'{"id":"%s","name":"poison.add","args":[%s,2],"kwargs":{}}' % (
        str(task_id).encode(),
        nested,
    )


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
async def test_a_deep_json_entry_is_dead_lettered_at_once_while_tasks_flow(
    make_broker: Callable[..., RedisBroker], secret: str | None
) -> None:
    # max_deliveries is high: the entry must go on its first delivery, not be retried.
    broker = make_broker(secret=secret, max_deliveries=1000)

    @broker.task(name="poison.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker:
            client, keys = broker.client, broker.keys
            # Written by the broker itself: signed with the secret when there is one,
            # so the bytes, not the signature, are what the reader meets.
            message = add.kicker().message(1, 2)
            await broker.ref.tell(Send(message, _poison(message.task_id)))
            expected = 1
            if secret is not None:
                # And a copy an attacker without the secret wrote: dead-lettered for
                # its missing signature, then listed like any letter.
                await client.execute("XADD", keys.stream, "*", "d", _poison(bus.TaskID.new()))
                expected = 2
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 4)
                handles = [await add.kiq(i, 1) for i in range(20)]
                results = await bus.gather(*handles, timeout=20)
                assert [r.return_value for r in results] == [i + 1 for i in range(20)]

                async def all_dead() -> bool:
                    return bool(await client.execute("XLEN", keys.dead) >= expected)

                await until(all_dead)
                letters = await broker.dead_letters()
                assert len(letters) == expected
                reasons = sorted(d["reason"] for d in letters)
                assert any("nested more than 64 levels" in r for r in reasons), reasons
                if secret is not None:
                    assert any("not signed" in r for r in reasons), reasons
                for letter in letters:
                    assert letter["deliveries"] == 1  # at once, not after retries
                    assert letter["task_name"] is None and letter["undecodable"]
                    assert letter["data"].count(b"[") > 900  # kept raw, whole
                # Neither the reader nor the broker actor ever failed.
                reader = broker.ref.children["reader"]
                assert reader.restart_count == 0
                assert broker.ref.is_alive and broker.ref.restart_count == 0
                pending = await client.execute("XPENDING", keys.stream, "workers")
                assert pending[0] == 0
                worker.stop()


async def test_a_huge_backoff_label_is_refused_at_send_and_rejected_when_received(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()
    runs = 0

    @broker.task(name="bounds.fail", retries=2, retry_backoff=0.01)
    async def fail() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("boom")

    @broker.task(name="bounds.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker:
            # Refused when sent, however it is sent.
            with pytest.raises(bus.SendError, match="retry_backoff must be at most 86400"):
                await fail.kicker().with_labels(retry_backoff=1e308).kiq()
            hand_made = attrs.evolve(fail.kicker().message(), labels={"retry_backoff": 1e308})
            with pytest.raises(bus.SendError, match="retry_backoff"):
                await broker.kick(hand_made)
            with pytest.raises(bus.SendError, match="retry_backoff"):
                await broker.kick_many([hand_made])
            for bad in ({"retries": 10**6}, {"timeout": math.inf}, {"delay": 1e308}):
                with pytest.raises(bus.SendError, match=next(iter(bad))):
                    await fail.kicker().with_labels(**bad).kiq()
            with pytest.raises(bus.SendError, match="eta"):
                await broker.kick(attrs.evolve(fail.kicker().message(), eta=1e308))

            # Written into the stream by hand: the worker rejects it, the broker goes on.
            data = broker.codec.encode_message(hand_made)
            await broker.client.execute("XADD", broker.keys.stream, "*", "d", data)
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                handle = bus.TaskHandle[Any](hand_made.task_id, broker)
                result = await handle.wait_result(timeout=10)
                assert result.status is bus.TaskStatus.FAILURE
                assert result.error is not None and result.error.type_name == "bus.Rejected"
                assert "retry_backoff must be at most 86400" in result.error.message
                assert runs == 0
                # The broker actor still works: sends, runs, retries.
                assert (await (await add.kiq(1, 2)).wait_result(timeout=10)).return_value == 3
                failed = await (await fail.kiq()).wait_result(timeout=10)
                assert failed.status is bus.TaskStatus.FAILURE and runs == 3
                letters = await broker.dead_letters()
                assert [d["task_id"] for d in letters] == [str(hand_made.task_id)]
                assert "invalid option labels" in letters[0]["reason"]
                assert broker.ref.is_alive and broker.ref.restart_count == 0
                worker.stop()


async def test_the_redis_nack_takes_any_delay(make_broker: Callable[..., RedisBroker]) -> None:
    broker = make_broker()

    @broker.task(name="nack.add")
    async def add(a: int, b: int) -> int:
        return a + b

    delays = [1e308, math.inf, math.nan, -5.0, 0.0]
    with trio.fail_after(30):
        async with broker:
            for i in range(len(delays)):
                await add.kiq(i, 1)
            lease = await broker.ref.ask(Receive(max_messages=len(delays)))
            before = time.time()
            now: list[bus.TaskID] = []
            later: list[bus.TaskID] = []
            for delay in delays:
                d = await lease.receive()
                message = d.message or broker.codec.decode_message(d.data)
                (later if delay > 1 else now).append(message.task_id)
                retry = attrs.evolve(message, attempt=2)
                await broker.ref.tell(Nack(d, "retry", requeue=retry, delay=delay))
            lease.close()
            client, keys = broker.client, broker.keys

            async def two_delayed() -> bool:
                return bool(await client.execute("ZCARD", keys.delayed) == 2)

            await until(two_delayed)
            scores = await client.execute("ZRANGE", keys.delayed, 0, -1, "WITHSCORES")
            for score in scores[1::2]:  # the two huge delays: a day, no more
                due = float(score) / 1000
                assert before + 86_400 - 5 <= due <= time.time() + 86_400
            # NaN, negative and zero delays mean now: those run.
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                for tid in now:
                    result = await bus.TaskHandle[int](tid, broker).wait_result(timeout=10)
                    assert result.status is bus.TaskStatus.SUCCESS
                for tid in later:
                    assert not await bus.TaskHandle[int](tid, broker).is_ready()
                assert (await (await add.kiq(1, 2)).wait_result(timeout=10)).return_value == 3
                assert broker.ref.is_alive and broker.ref.restart_count == 0
                worker.stop()
