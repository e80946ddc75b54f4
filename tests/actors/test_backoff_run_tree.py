"""Restart backoff, actors run in the caller's task, the tree view, ``on_drained``."""

from __future__ import annotations

import itertools
import math

import attrs
import pytest
import trio
import trio.testing

import actors
from tests.actors.actor_test_kit import Counter, Fail, Get, Incr

# ------------------------------------------------------------------ backoff values


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    b = actors.Backoff(initial=0.1, factor=2, cap=1.0, jitter=0)
    assert [b.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay(10_000) == 1.0  # no overflow for huge attempt numbers


def test_backoff_jitter_stays_within_its_share() -> None:
    b = actors.Backoff(initial=1.0, factor=1, cap=1.0, jitter=0.5)
    assert b.delay(1, rand=0.0) == 1.0
    assert b.delay(1, rand=0.999) == pytest.approx(0.5005)
    for _ in range(200):
        assert 0.5 <= b.delay(1) <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1}, {"cap": float("nan")}, {"jitter": 2}, {"factor": 0.5}, {"initial": "1"}],
)
def test_backoff_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        actors.Backoff(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------- restarts with backoff


class Starts(actors.Actor):
    """Records the Trio time of each start and fails on demand."""

    def __init__(self, log: list[float]) -> None:
        self.log = log

    async def on_start(self) -> None:
        self.log.append(trio.current_time())

    @actors.handles(Fail)
    async def fail(self, msg: Fail) -> None:
        raise ValueError(msg.reason)

    @actors.handles(Get)
    async def get(self, msg: Get) -> int:
        return len(self.log)


async def test_restarts_wait_longer_each_time(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    backoff = actors.Backoff(initial=1.0, factor=2.0, cap=4.0, jitter=0)
    with trio.fail_after(100):
        async with actors.open_system() as system:
            ref = await system.spawn(
                lambda: Starts(starts),
                name="s",
                on_failure=actors.RESTART,
                max_restarts=None,
                restart_window=1000,
                backoff=backoff,
            )
            for _ in range(4):
                await ref.tell(Fail())
                # the ask is queued during the backoff and answered by the new instance
                assert await ref.ask(Get()) == len(starts)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0, 4.0]


async def test_unlimited_restarts_never_escalate(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    with trio.fail_after(1000):
        async with actors.open_system() as system:
            ref = await system.spawn(
                lambda: Starts(starts),
                name="s",
                on_failure=actors.RESTART,
                max_restarts=None,
                backoff=actors.Backoff(initial=0.01, cap=0.05),
            )
            for _ in range(50):
                with pytest.raises(ValueError, match="boom"):
                    await ref.ask(Fail())
            assert await ref.ask(Get()) == 51  # answered by the 51st instance
            assert ref.is_alive and ref.restart_count == 50


async def test_stop_during_backoff_ends_the_wait(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    with trio.fail_after(10):
        async with actors.open_system() as system:
            ref = await system.spawn(
                lambda: Starts(starts),
                name="s",
                on_failure=actors.RESTART,
                backoff=actors.Backoff(initial=3600, cap=3600, jitter=0),
            )
            await ref.tell(Fail())
            await trio.sleep(1)  # now in the hour-long backoff
            t0 = trio.current_time()
            await ref.stop()
            assert trio.current_time() - t0 < 1
            assert not ref.is_alive
    assert len(starts) == 1  # it stopped without restarting


# ------------------------------------------------------------------ run in caller


async def test_run_returns_the_ref_through_nursery_start() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system, trio.open_nursery() as nursery:
            ref = await nursery.start(
                lambda task_status: system.run(Counter, name="c", task_status=task_status)
            )
            assert isinstance(ref, actors.ActorRef)
            assert "c" in system.actors
            await ref.tell(Incr(2))
            assert await ref.ask(Get()) == 2
            await ref.stop()
        assert "c" not in system.actors


async def test_cancelling_the_caller_cancels_the_actor() -> None:
    stopped_hooks: list[str] = []

    class Hooked(Counter):
        async def on_stop(self) -> None:
            stopped_hooks.append("on_stop")

    with trio.fail_after(5):
        async with actors.open_system() as system:
            async with trio.open_nursery() as nursery:
                ref = await nursery.start(
                    lambda task_status: system.run(Hooked, name="h", task_status=task_status)
                )
                await ref.tell(Incr())
                nursery.cancel_scope.cancel()
            assert not ref.is_alive
            assert "h" not in system.actors
            with pytest.raises(actors.ActorStopped):
                await ref.ask(Get())
    assert stopped_hooks == []  # cancellation skips on_stop


async def test_run_actor_is_stopped_when_the_system_closes() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            async with trio.open_nursery() as nursery:
                ref = await nursery.start(
                    lambda task_status: system.run(Counter, name="c", task_status=task_status)
                )
                await system._stop_all()  # what the system does on a clean exit
            assert not ref.is_alive


# --------------------------------------------------------------------------- tree


class Parent(actors.Actor):
    async def on_start(self) -> None:
        await self.spawn(Counter, name="child-a")
        await self.spawn(Counter, name="child-b", mailbox_size=math.inf)


async def test_tree_shows_every_running_actor() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            await system.spawn(Parent, name="parent", mailbox_size=8)
            await system.spawn(Counter, name="solo")
            tree = system.tree()
            print(tree)
            assert tree.splitlines() == [
                "actors",
                "├── parent (Parent, mailbox 0/8)",
                "│   ├── child-a (Counter, mailbox 0/100)",
                "│   └── child-b (Counter, mailbox 0/inf)",
                "└── solo (Counter, mailbox 0/100)",
            ]
            parent = system.actors["parent"]
            assert sorted(parent.children) == ["child-a", "child-b"]
            assert parent.actor_type == "Parent"


# ---------------------------------------------------------------------- on_drained


@attrs.frozen
class Item:
    n: int


class Batcher(actors.Actor):
    """Gathers items and flushes them once per mailbox batch."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.current: list[int] = []

    @actors.handles(Item)
    def item(self, msg: Item) -> None:
        self.current.append(msg.n)

    async def on_drained(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.current:
            self.batches.append(self.current)
            self.current = []


async def test_on_drained_runs_once_per_batch() -> None:
    batches: list[list[int]] = []
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Batcher(batches), name="b", mailbox_size=100)
            for n in range(10):
                ref.tell_nowait(Item(n))  # no checkpoint: one batch
            await trio.testing.wait_all_tasks_blocked()
            ref.tell_nowait(Item(10))
            ref.tell_nowait(Item(11))
            await ref.stop()  # the last batch is flushed before the actor stops
    assert batches == [list(range(10)), [10, 11]]


async def test_actors_without_on_drained_pay_nothing() -> None:
    assert not Counter._actor_wants_drained
    assert Batcher._actor_wants_drained


# ---------------------------------------------------------------- inline handlers


@attrs.frozen
class Peek:
    pass


class InlineCounter(actors.Actor):
    def __init__(self, tasks: list[str]) -> None:
        self.n = 0
        self.tasks = tasks
        self.gate = trio.Event()

    @actors.handles(Incr, inline=True)
    def incr(self, msg: Incr) -> None:
        self.n += msg.by
        self.tasks.append(trio.lowlevel.current_task().name)

    @actors.handles(Peek, inline=True)
    def peek(self, msg: Peek) -> int:
        return self.n

    @actors.handles(Fail, inline=True)
    def fail(self, msg: Fail) -> None:
        raise ValueError(msg.reason)

    @actors.handles(Get)
    async def get(self, msg: Get) -> int:
        await self.gate.wait()
        return self.n


async def test_an_idle_actor_runs_inline_handlers_in_the_senders_task() -> None:
    tasks: list[str] = []
    counter = InlineCounter(tasks)
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: counter, name="c")
            await trio.testing.wait_all_tasks_blocked()
            ref.tell_nowait(Incr(2))  # handled before tell_nowait returns
            assert await ref.ask(Peek()) == 2  # an inline ask is answered at once
            assert tasks == [trio.lowlevel.current_task().name]
            # A busy actor queues the message: its own task handles it, in order.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ref.ask, Get())
                await trio.testing.wait_all_tasks_blocked()  # the actor waits in `get`
                ref.tell_nowait(Incr(3))
                assert len(tasks) == 1
                counter.gate.set()
            assert await ref.ask(Peek()) == 5
            assert len(tasks) == 2 and tasks[1] != tasks[0]


async def test_an_inline_ask_raises_in_the_asker_and_fails_the_actor() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: InlineCounter([]), name="c", on_failure=actors.RESTART)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ValueError, match="boom"):
                await ref.ask(Fail())
            await trio.testing.wait_all_tasks_blocked()
            assert ref.restart_count == 1


def test_an_inline_handler_must_be_a_plain_function() -> None:
    with pytest.raises(TypeError, match="plain def"):

        class Bad(actors.Actor):
            @actors.handles(Incr, inline=True)
            async def incr(self, msg: Incr) -> None:
                pass
