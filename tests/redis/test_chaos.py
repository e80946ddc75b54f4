"""The chaos loop: producers and two ``bus worker`` processes for a minute while
Redis is stopped and started at random five times (0.2 s to 15 s) and one worker is
SIGKILLed. Nothing accepted is lost, every result is right, only the killed worker's
in-flight tasks run twice, and every process that was not killed exits 0.

``BUS_CHAOS_SECONDS`` sets the length (default 60), ``BUS_CHAOS_SEED`` the seed.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import trio

import bus
from tests.redis.server import RedisServer
from tests.redis.support import make_redis_broker

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 8


async def _reap_on_failure(procs: list[trio.Process]) -> None:
    """Kill the worker processes if the test ends without stopping them (a failure):
    none may outlive it."""
    try:
        await trio.sleep_forever()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()


async def test_chaos_loses_nothing(aof_server: RedisServer, tmp_path: Path) -> None:
    seconds = float(os.environ.get("BUS_CHAOS_SECONDS", "60"))
    seed = int(os.environ.get("BUS_CHAOS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    print(f"chaos: seed {seed}, {seconds:g} s")
    prefix = f"t{bus.TaskID.new()[-12:]}"
    runlog = tmp_path / "runs"
    runlog.mkdir()
    env = dict(
        os.environ,
        BUS_TEST_URL=aof_server.url,
        BUS_TEST_PREFIX=prefix,
        BUS_TEST_VT="20",
        BUS_TEST_RUNLOG=str(runlog),
        PYTHONPATH=str(ROOT),
    )
    broker = make_redis_broker(aof_server.url, prefix=prefix, send_timeout=2)
    work = broker.register_task(lambda i: i * 2, name="chaos.work")  # the producer's view
    accepted: dict[int, bus.TaskHandle[int]] = {}
    refused = 0
    maybe = 0
    outages: list[tuple[float, float]] = []

    def worker() -> list[str]:
        return [
            sys.executable, "-m", "bus", "worker", "tests.redis.chaos_app:broker",
            "--concurrency", str(CONCURRENCY), "--shutdown-timeout", "10",
            "--connect-timeout", "60", "--log-level", "error",
        ]  # fmt: skip

    with trio.fail_after(seconds + 240):
        async with broker, trio.open_nursery() as nursery:
            procs = [
                await trio.lowlevel.open_process(worker(), env=env, cwd=ROOT) for _ in range(2)
            ]
            nursery.start_soon(_reap_on_failure, procs)
            stop = trio.current_time() + seconds

            async def produce(first: int, step: int) -> None:
                nonlocal refused, maybe
                i = first
                while trio.current_time() < stop:
                    try:
                        accepted[i] = await work.kiq(i)
                    except bus.BrokerUnavailable as exc:
                        refused += 1
                        maybe += exc.maybe_stored
                    i += step
                    await trio.sleep(0.004)

            async def chaos() -> None:
                # Five outages spread over the run, one SIGKILL of a worker between.
                slots = sorted(rng.uniform(0, seconds * 0.8) for _ in range(5))
                kill_at = rng.uniform(seconds * 0.2, seconds * 0.7)
                start = trio.current_time()
                killed = False
                for at in slots:
                    now = trio.current_time() - start
                    if not killed and kill_at < at:
                        await trio.sleep(max(0.0, kill_at - now))
                        procs[0].send_signal(signal.SIGKILL)
                        killed = True
                        now = trio.current_time() - start
                    await trio.sleep(max(0.0, at - now))
                    down = rng.uniform(0.2, min(15.0, seconds / 5))
                    await trio.to_thread.run_sync(aof_server.stop)
                    outages.append((round(trio.current_time() - start, 1), round(down, 1)))
                    await trio.sleep(down)
                    await trio.to_thread.run_sync(aof_server.start)
                if not killed:
                    procs[0].send_signal(signal.SIGKILL)

            async with trio.open_nursery() as inner:
                inner.start_soon(produce, 0, 2)
                inner.start_soon(produce, 1, 2)
                inner.start_soon(chaos)
            print(f"chaos: outages (at s, for s) {outages}")
            try:
                results = await bus.gather(*accepted.values(), timeout=120)
            except bus.ResultTimeout:
                missing = [i for i, h in accepted.items() if not await h.is_ready()]
                print(f"chaos: no result for {len(missing)} tasks, e.g. {missing[:10]}")
                raise
            procs[1].send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await procs[1].wait()
            await procs[0].wait()
            nursery.cancel_scope.cancel()

    runs: collections.Counter[int] = collections.Counter()
    per_process: dict[str, int] = {}
    for log in runlog.iterdir():
        lines = [int(x) for x in log.read_text().split()]
        per_process[log.name] = len(lines)
        runs.update(lines)
    twice = sorted(i for i, n in runs.items() if n > 1)
    print(
        f"chaos: {len(accepted)} accepted, {refused} refused ({maybe} maybe stored), "
        f"{sum(runs.values())} runs, {len(twice)} ran twice, per process {per_process}"
    )
    assert code == 0
    assert procs[0].returncode == -signal.SIGKILL
    assert all(r.status is bus.TaskStatus.SUCCESS for r in results)
    assert [r.return_value for r in results] == [i * 2 for i in accepted]
    assert all(runs[i] >= 1 for i in accepted)
    # Only what the killed worker had in flight (at most its runners, plus what it
    # had read ahead for them) runs again.
    assert len(twice) <= 2 * CONCURRENCY, twice
