"""The actors.testing helpers."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.lowlevel

import actors
from actors.testing import Probe, run_actor, spawn_probe
from tests.actors.actor_test_kit import Counter, Get, Incr


@attrs.frozen
class Ping:
    n: int


@attrs.frozen
class Notify:
    target: actors.ActorRef
    n: int


class Forwarder(actors.Actor):
    @actors.handles(Notify)
    async def notify(self, msg: Notify) -> None:
        await trio.sleep(1)
        await msg.target.tell(Ping(msg.n))
        answer = await msg.target.ask(Get())
        await msg.target.tell(Incr(answer))


async def test_probe_records_and_expects(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        async with actors.open_system() as system:
            probe = await spawn_probe(system, name="probe", reply=lambda msg: 41)
            assert isinstance(probe, actors.ActorRef)
            assert isinstance(probe, Probe)
            fwd = await system.spawn(Forwarder, name="fwd")
            await fwd.tell(Notify(probe, 1))
            ping = await probe.expect(Ping, within=5)
            assert ping == Ping(1)
            assert await probe.expect(Incr, within=5) == Incr(41)
            assert probe.messages == [Ping(1), Get(), Incr(41)]
            assert probe.expect_nowait(Get) == Get()
            with pytest.raises(AssertionError, match="no Ping"):
                probe.expect_nowait(Ping)  # already expected


async def test_probe_expect_times_out_with_a_helpful_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(10):
        async with actors.open_system() as system:
            probe = await spawn_probe(system)
            await probe.tell(Incr(1))
            probe.tell_nowait(Get())
            start = trio.current_time()
            with pytest.raises(AssertionError) as info:
                await probe.expect(Ping, within=2)
            assert trio.current_time() - start == pytest.approx(2)
            text = str(info.value)
            assert "'probe'" in text
            assert "Ping" in text
            assert "within 2s" in text
            assert "Incr(by=1)" in text
            assert "Get()" in text
            empty = await spawn_probe(system, name="empty")
            with pytest.raises(AssertionError, match="received nothing"):
                empty.expect_nowait(Ping)


async def test_probe_replies() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            probe = await spawn_probe(system)
            assert await probe.ask(Get()) is None

            async def double(msg: Incr) -> int:
                await trio.lowlevel.checkpoint()
                return msg.by * 2

            probe.reply_with(double)
            assert await probe.ask(Incr(4)) == 8
            probe.reply_with(lambda msg: msg.by + 1)
            assert await probe.ask(Incr(4)) == 5
            await probe.stop()
            with pytest.raises(actors.ActorStopped):
                await probe.ask(Get())
            with pytest.raises(actors.ActorStopped):
                await probe.tell(Get())
            assert probe.messages == [Get(), Incr(4), Incr(4)]
            probe.clear()
            assert probe.messages == []


async def test_run_actor() -> None:
    with trio.fail_after(5):
        async with run_actor(Counter) as ref:
            assert ref.name == "actor-under-test"
            await ref.tell(Incr(2))
            assert await ref.ask(Get()) == 2
        assert not ref.is_alive


async def test_run_actor_escalate() -> None:
    from tests.actors.actor_test_kit import Fail

    with trio.fail_after(5):

        async def scenario() -> None:
            async with run_actor(Counter, on_failure=actors.ESCALATE) as ref:
                await ref.tell(Fail())
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed):
            await scenario()
