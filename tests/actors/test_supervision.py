"""Supervision, children, background work, lifecycle hooks and cancellation."""

from __future__ import annotations

import attrs
import pytest
import structlog
import trio
import trio.testing

import actors
from tests.actors.actor_test_kit import Counter, Fail, Get, Incr


async def test_restart_gives_fresh_state_and_same_ref() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c", on_failure=actors.RESTART)
            await ref.tell(Incr(5))
            assert await ref.ask(Get()) == 5
            with structlog.testing.capture_logs() as logs:
                await ref.tell(Fail())
                assert await ref.ask(Get()) == 0  # fresh instance, same ref
            assert ref.is_alive
            assert ref.restart_count == 1
            events = [e["event"] for e in logs]
            assert "actor.failed" in events
            assert "actor.restarted" in events
            await ref.tell(Incr(1))
            assert await ref.ask(Get()) == 1


async def test_restart_limit_escalates(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):

        async def scenario() -> None:
            async with actors.open_system() as system:
                ref = await system.spawn(
                    Counter, name="c", on_failure=actors.RESTART, max_restarts=2, restart_window=10
                )
                # failures spread wider than the window never hit the limit
                for _ in range(4):
                    with pytest.raises(ValueError, match="boom"):
                        await ref.ask(Fail())
                    await trio.sleep(11)
                assert ref.restart_count == 4
                # three quick failures: two restarts, then escalation
                for _ in range(3):
                    await ref.tell(Fail())
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed, match="'c'") as info:
            await scenario()
        assert isinstance(info.value.__cause__, ValueError)


async def test_stop_policy() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c", on_failure=actors.STOP)
            with structlog.testing.capture_logs() as logs:
                with pytest.raises(ValueError, match="boom"):
                    await ref.ask(Fail())
                await ref.stop()  # returns once it has fully stopped
            assert not ref.is_alive
            with pytest.raises(actors.ActorStopped):
                await ref.ask(Get())
            failed = [e for e in logs if e["event"] == "actor.failed"]
            assert failed
            assert failed[0]["actor"] == "c"
            assert failed[0]["policy"] == "stop"
            assert "c" not in system.actors


async def test_default_policy_is_stop() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c")
            await ref.tell(Fail())
            await ref.stop()
            assert ref.restart_count == 0
            assert not ref.is_alive


async def test_escalate_fails_the_system_with_a_plain_exception() -> None:
    with trio.fail_after(5):

        async def scenario() -> None:
            async with actors.open_system() as system:
                ref = await system.spawn(Counter, name="esc", on_failure=actors.ESCALATE)
                await ref.tell(Fail("kaput"))
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed) as info:
            await scenario()
        assert type(info.value) is actors.ActorFailed
        assert "esc" in str(info.value)
        assert isinstance(info.value.__cause__, ValueError)
        assert str(info.value.__cause__) == "kaput"


async def test_block_exception_comes_out_as_itself() -> None:
    with trio.fail_after(5):

        async def scenario() -> None:
            async with actors.open_system() as system:
                await system.spawn(Counter, name="c")
                raise KeyError("mine")

        with pytest.raises(KeyError):
            await scenario()


class Ticker(actors.Actor):
    """Runs a background task that fails on the third tick; counts its starts."""

    starts = 0
    cancelled_tickers = 0

    def __init__(self) -> None:
        self.ticks = 0

    async def on_start(self) -> None:
        type(self).starts += 1
        self.nursery.start_soon(self.tick)

    async def tick(self) -> None:
        try:
            while True:
                await trio.sleep(1)
                self.ticks += 1
                if self.ticks == 3 and type(self).starts == 1:
                    raise OSError("background failure")
        finally:
            type(self).cancelled_tickers += 1

    @actors.handles(Get)
    async def get(self, msg: Get) -> int:
        return self.ticks


async def test_background_task_failure_restarts_actor(autojump_clock: trio.abc.Clock) -> None:
    Ticker.starts = Ticker.cancelled_tickers = 0
    with trio.fail_after(30):
        async with actors.open_system() as system:
            ref = await system.spawn(Ticker, name="t", on_failure=actors.RESTART)
            await trio.sleep(3.5)
            assert Ticker.starts == 2
            assert ref.restart_count == 1
            assert await ref.ask(Get()) == 0  # the fresh instance's ticker just started
            await trio.sleep(2)
            assert await ref.ask(Get()) == 2
        assert Ticker.cancelled_tickers == 2  # the failed one and the stopped one


async def test_background_failure_escalates(autojump_clock: trio.abc.Clock) -> None:
    Ticker.starts = 0
    with trio.fail_after(30):

        async def scenario() -> None:
            async with actors.open_system() as system:
                await system.spawn(Ticker, name="t", on_failure=actors.ESCALATE)
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed) as info:
            await scenario()
        assert isinstance(info.value.__cause__, OSError)


class BadStart(actors.Actor):
    async def on_start(self) -> None:
        raise RuntimeError("cannot start")


async def test_on_start_failure_is_a_failure() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(BadStart, name="b", on_failure=actors.STOP)
            await ref.stop()
            assert not ref.is_alive

        async def scenario() -> None:
            async with actors.open_system() as system:
                await system.spawn(BadStart, name="b", on_failure=actors.ESCALATE)
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed) as info:
            await scenario()
        assert isinstance(info.value.__cause__, RuntimeError)


@attrs.frozen
class SpawnChild:
    policy: actors.Policy


@attrs.frozen
class ChildRef:
    pass


class Parent(actors.Actor):
    """Spawns a counter child in on_start; logs lifecycle events to a shared list."""

    def __init__(self, log: list[str], child_policy: actors.Policy = actors.STOP) -> None:
        self.log = log
        self.child_policy = child_policy
        self.child: actors.ActorRef | None = None

    async def on_start(self) -> None:
        self.log.append("parent.start")
        self.child = await self.spawn(
            lambda: Child(self.log), name="child", on_failure=self.child_policy
        )

    async def on_stop(self) -> None:
        assert self.child is not None
        self.log.append(f"parent.stop child_alive={self.child.is_alive}")

    @actors.handles(ChildRef)
    async def child_ref(self, msg: ChildRef) -> actors.ActorRef | None:
        return self.child


class Child(Counter):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def on_start(self) -> None:
        self.log.append("child.start")
        self.nursery.start_soon(self.grandchild)

    async def grandchild(self) -> None:
        await self.spawn(lambda: GrandChild(self.log), name="grandchild")

    async def on_stop(self) -> None:
        self.log.append("child.stop")


class GrandChild(actors.Actor):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def on_stop(self) -> None:
        self.log.append("grandchild.stop")


async def test_stopping_a_parent_stops_children_first() -> None:
    with trio.fail_after(5):
        log: list[str] = []
        async with actors.open_system() as system:
            parent = await system.spawn(lambda: Parent(log), name="parent")
            child = await parent.ask(ChildRef())
            assert isinstance(child, actors.ActorRef)
            assert child.name == "child"
            await child.ask(Get())
            await parent.stop()
            assert not child.is_alive
            assert not parent.is_alive
        assert log == [
            "parent.start",
            "child.start",
            "grandchild.stop",
            "child.stop",
            "parent.stop child_alive=False",
        ]


async def test_system_exit_stops_children_first() -> None:
    with trio.fail_after(5):
        log: list[str] = []
        async with actors.open_system() as system:
            parent = await system.spawn(lambda: Parent(log), name="parent")
            await parent.ask(ChildRef())
        assert log[-3:] == ["grandchild.stop", "child.stop", "parent.stop child_alive=False"]


async def test_child_escalation_is_a_failure_of_the_parent() -> None:
    with trio.fail_after(5):
        log: list[str] = []
        async with actors.open_system() as system:
            parent = await system.spawn(
                lambda: Parent(log, child_policy=actors.ESCALATE),
                name="parent",
                on_failure=actors.RESTART,
            )
            old_child = await parent.ask(ChildRef())
            await old_child.tell(Incr(3))
            await old_child.tell(Fail())
            await trio.testing.wait_all_tasks_blocked()  # let the failure reach the parent
            new_child = await parent.ask(ChildRef())
            assert parent.restart_count == 1
            assert not old_child.is_alive  # children of the failed instance are gone
            assert new_child is not old_child
            assert new_child.is_alive
            assert await new_child.ask(Get()) == 0
        assert log.count("parent.start") == 2


async def test_child_escalation_chain_reaches_the_system() -> None:
    with trio.fail_after(5):

        async def scenario() -> None:
            async with actors.open_system() as system:
                parent = await system.spawn(
                    lambda: Parent([], child_policy=actors.ESCALATE),
                    name="parent",
                    on_failure=actors.ESCALATE,
                )
                child = await parent.ask(ChildRef())
                await child.tell(Fail())
                await trio.sleep_forever()

        with pytest.raises(actors.ActorFailed, match="'parent'") as info:
            await scenario()
        cause = info.value.__cause__
        assert isinstance(cause, actors.ActorFailed)
        assert "'child'" in str(cause)
        assert isinstance(cause.__cause__, ValueError)


def _count_tasks(nursery_owner: trio.lowlevel.Task) -> int:
    total = 0
    for nursery in nursery_owner.child_nurseries:
        for task in nursery.child_tasks:
            total += 1 + _count_tasks(task)
    return total


class Sleeper(actors.Actor):
    finished = 0

    async def on_start(self) -> None:
        self.nursery.start_soon(self.forever)
        await self.spawn(Sleeper.Inner, name="inner")

    async def forever(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            Sleeper.finished += 1

    class Inner(actors.Actor):
        @actors.handles(Get)
        async def get(self, msg: Get) -> None:
            try:
                await trio.sleep_forever()
            finally:
                Sleeper.finished += 1


async def test_cancelling_the_enclosing_scope_leaves_nothing_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    Sleeper.finished = 0
    with trio.fail_after(10):
        root = trio.lowlevel.current_root_task()
        before = _count_tasks(root)
        stopped_errors: list[BaseException] = []
        inner_box: list[actors.ActorRef] = []

        async def outside_asker(ref: actors.ActorRef) -> None:
            try:
                await ref.ask(Get())
            except actors.ActorStopped as exc:
                stopped_errors.append(exc)

        async with trio.open_nursery() as outside:
            with trio.CancelScope() as scope:
                async with actors.open_system() as system:
                    refs = [
                        await system.spawn(Sleeper, name=f"s{i}", on_failure=actors.ESCALATE)
                        for i in range(3)
                    ]
                    assert _count_tasks(root) > before
                    inner = refs[0]._cell.children["inner"].ref
                    inner_box.append(inner)
                    await inner.tell(Get())  # blocks the inner actor forever
                    outside.start_soon(outside_asker, inner)  # queued behind it
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
                    await trio.sleep_forever()
            assert scope.cancelled_caught
        assert _count_tasks(root) == before
        assert Sleeper.finished == 4  # three background tasks, one handler
        assert all(not ref.is_alive for ref in refs)
        assert not inner_box[0].is_alive
        assert len(stopped_errors) == 1
        assert "'inner'" in str(stopped_errors[0])


async def test_cancellation_is_not_a_failure() -> None:
    with trio.fail_after(5):
        with structlog.testing.capture_logs() as logs:
            with trio.move_on_after(0.01):
                async with actors.open_system() as system:
                    await system.spawn(Sleeper, name="s", on_failure=actors.ESCALATE)
                    await trio.sleep_forever()
        assert not [e for e in logs if e["event"] in ("actor.failed", "actor.escalated")]


async def test_lifecycle_logging() -> None:
    with trio.fail_after(5):
        with structlog.testing.capture_logs() as logs:
            async with actors.open_system() as system:
                await system.spawn(Counter, name="c")
        started = [e for e in logs if e["event"] == "actor.started"]
        stopped = [e for e in logs if e["event"] == "actor.stopped"]
        assert started[0]["actor"] == "c"
        assert stopped[0]["actor"] == "c"
        assert stopped[0]["how"] == "stopped"


async def test_join_waits_for_the_actor_to_stop_for_any_reason() -> None:
    with trio.fail_after(5), structlog.testing.capture_logs():
        async with actors.open_system() as system:
            failing = await system.spawn(Counter, name="failing", on_failure=actors.STOP)
            stopped = await system.spawn(Counter, name="stopped")
            joined: list[str] = []

            async def join(ref: actors.ActorRef) -> None:
                await ref.join()
                joined.append(ref.name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(join, failing)
                nursery.start_soon(join, stopped)
                await trio.testing.wait_all_tasks_blocked()
                assert joined == []
                await failing.tell(Fail())
                await stopped.stop()
            assert sorted(joined) == ["failing", "stopped"]
            await failing.join()  # already stopped: returns at once
