"""A dead letter that cannot be decoded is still listed, raw; requeue skips it with a
reason; the dashboard shows it (issue 18, item 3). Before, one such letter made
``bus dead list`` and requeue fail and the dashboard answer 503 until a purge."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import bus
from bus.dashboard._data import DashboardData
from bus.redis import RedisBroker
from tests.security.support import until

pytestmark = pytest.mark.redis

DEEP = b'{"id":"%s","name":"letters.add","args":[%s],"kwargs":{}}' % (
    str(bus.TaskID.new()).encode(),
    b"[" * 900 + b"]" * 900,
)
GARBAGE = [DEEP, b"\xff\xfe not utf-8", b"[1, 2]", b'{"id": 5}', b"{" * 100_000]


async def test_undecodable_dead_letters_are_listed_raw_and_skipped_by_requeue(
    make_broker: Callable[..., RedisBroker],
) -> None:
    broker = make_broker()

    @broker.task(name="letters.add")
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(30):
        async with broker:
            client, keys = broker.client, broker.keys
            for data in GARBAGE:
                await client.execute("XADD", keys.stream, "*", "d", data)
            # And a letter written by hand whose own fields are nonsense.
            await client.execute(
                "XADD", keys.dead, "*", "data", DEEP, "reason", "hand", "deliveries",
                "9" * 5000, "time", "nan", "id", "x",
            )  # fmt: skip
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 2)
                assert (await (await add.kiq(1, 2)).wait_result(timeout=10)).return_value == 3

                async def all_dead() -> bool:
                    return bool(await client.execute("XLEN", keys.dead) == len(GARBAGE) + 1)

                await until(all_dead)
                worker.stop()

            letters = await broker.dead_letters()
            assert len(letters) == len(GARBAGE) + 1
            assert sorted(d["data"] for d in letters) == sorted([*GARBAGE, DEEP])
            for letter in letters:
                assert letter["task_name"] is None and letter["task_id"] is None
                assert letter["undecodable"], letter["reason"]
                assert isinstance(letter["deliveries"], int)
                assert isinstance(letter["time"], float)
            by_reason = {d["reason"] for d in letters}
            assert "hand" in by_reason
            assert all(r == "hand" or r.startswith("undecodable message") for r in by_reason)

            report = await broker.requeue_dead()
            assert len(report) == len(letters)
            for r in report:
                assert r["outcome"].startswith("skipped: undecodable, it cannot run"), r
            assert await broker.requeue_dead_letters() == 0
            assert await client.execute("XLEN", keys.stream) == 0  # nothing went back
            assert len(await broker.dead_letters()) == len(letters)  # nor was lost

            # The dashboard lists them (with payloads shown: raw).
            dashboard = DashboardData(broker, show_payloads=True)
            shown = (await dashboard.overview())["dead_letters"]
            assert shown["supported"] and len(shown["items"]) == len(letters)
            for item in shown["items"]:
                assert item["task_name"] is None
                assert item["payload"] is None or "undecodable" in item["payload"]


async def test_the_dashboard_reads_past_poison_in_the_activity_keys(
    make_broker: Callable[..., RedisBroker],
) -> None:
    from bus.activity import ActivityMiddleware, read_activity
    from bus.redis._activity import RedisActivityStore

    broker = make_broker().with_middlewares(ActivityMiddleware())
    with trio.fail_after(30):
        async with broker:
            store = RedisActivityStore(broker)
            client = broker.client
            for name, raw in ((b"deep", b"[" * 100_000), (b"list", b"[1]"), (b"bad", b"\xff")):
                await client.execute("ZADD", store.index, 1e10, name)
                await client.execute("SET", store.record_key(name.decode()), raw)
            for raw in (b"{" * 100_000, b'{"a":' * 2000 + b"1" + b"}" * 2000, b"7"):
                await client.execute("XADD", store.failures, "*", "f", raw)
            activity = await read_activity(broker)
            assert activity is not None
            assert activity.workers == [] and activity.failures == []
            overview = await DashboardData(broker).overview()
            assert overview["workers"] == [] and overview["failures"] == []
