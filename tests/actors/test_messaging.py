"""Messaging: ordering, backpressure, ask, stop, unhandled messages, routing."""

from __future__ import annotations

import attrs
import pytest
import structlog
import trio
import trio.testing

import actors
from tests.actors.actor_test_kit import Counter, Fail, Get, Incr


@attrs.frozen
class Item:
    n: int


@attrs.frozen
class Seen:
    pass


class Gated(actors.Actor):
    """Records items; each item waits for the shared gate to open."""

    def __init__(self, gate: trio.Event, seen: list[int]) -> None:
        self.gate = gate
        self.seen = seen

    @actors.handles(Item)
    async def item(self, msg: Item) -> None:
        await self.gate.wait()
        self.seen.append(msg.n)

    @actors.handles(Seen)
    async def get_seen(self, msg: Seen) -> list[int]:
        return list(self.seen)


async def test_messages_are_handled_in_order(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        gate.set()
        seen: list[int] = []
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Gated(gate, seen), name="gated", mailbox_size=8)
            for n in range(100):
                await ref.tell(Item(n))
            assert await ref.ask(Seen()) == list(range(100))


async def test_design_example() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="counter", mailbox_size=64)
            await ref.tell(Incr(2))
            ref.tell_nowait(Incr(1))
            assert await ref.ask(Get(), timeout=1) == 3
            await ref.stop()
            assert not ref.is_alive


async def test_tell_waits_while_mailbox_full(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        seen: list[int] = []
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Gated(gate, seen), name="gated", mailbox_size=2)
            await ref.tell(Item(0))
            await trio.testing.wait_all_tasks_blocked()  # the actor holds item 0
            await ref.tell(Item(1))
            await ref.tell(Item(2))  # the mailbox is now full
            with pytest.raises(actors.MailboxFull, match="gated"):
                ref.tell_nowait(Item(99))
            delivered = trio.Event()

            async def blocked_sender() -> None:
                await ref.tell(Item(3))
                delivered.set()

            system_nursery_tasks: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_sender)
                await trio.testing.wait_all_tasks_blocked()
                assert not delivered.is_set(), "tell returned while the mailbox was full"
                system_nursery_tasks.append("checked")
                gate.set()  # the actor drains, which releases the sender
                await delivered.wait()
            assert await ref.ask(Seen()) == [0, 1, 2, 3]
            assert system_nursery_tasks == ["checked"]


async def test_ask_timeout(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Gated(gate, []), name="slow")
            await ref.tell(Item(0))
            start = trio.current_time()
            with pytest.raises(actors.AskTimeout, match="slow") as info:
                await ref.ask(Seen(), timeout=2)
            assert isinstance(info.value, TimeoutError)
            assert trio.current_time() - start == pytest.approx(2)
            gate.set()
            # the timed-out ask was still handled; the actor keeps working
            assert await ref.ask(Seen(), timeout=2) == [0]


async def test_ask_returns_handler_exception() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c", on_failure=actors.RESTART)
            with pytest.raises(ValueError, match="nope"):
                await ref.ask(Fail("nope"))


async def test_ask_and_tell_to_stopped_actor() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="gone")
            await ref.stop()
            assert not ref.is_alive
            with pytest.raises(actors.ActorStopped, match="'gone'"):
                await ref.ask(Get())
            with pytest.raises(actors.ActorStopped, match="'gone'"):
                await ref.tell(Incr())
            with pytest.raises(actors.ActorStopped, match="'gone'"):
                ref.tell_nowait(Incr())
            await ref.stop()  # idempotent


async def test_stop_drains_the_mailbox() -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        seen: list[int] = []
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Gated(gate, seen), name="g", mailbox_size=10)
            for n in range(5):
                ref.tell_nowait(Item(n))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ref.stop)
                await trio.testing.wait_all_tasks_blocked()
                assert ref.is_alive
                with pytest.raises(actors.ActorStopped):
                    ref.tell_nowait(Item(99))  # no new messages once stopping
                gate.set()
            assert seen == [0, 1, 2, 3, 4]
            assert not ref.is_alive


class Stopper(actors.Actor):
    @actors.handles(Get)
    async def get(self, msg: Get) -> str:
        await self.ref.stop()  # from its own handler: requests the stop, returns
        return "stopping"


async def test_stop_from_own_handler() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Stopper, name="s")
            assert await ref.ask(Get()) == "stopping"
            await ref.stop()
            assert not ref.is_alive


async def test_asks_waiting_for_room_get_actor_stopped_on_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        seen: list[int] = []
        results: list[BaseException] = []
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Gated(gate, seen), name="q", mailbox_size=1)
            await ref.tell(Item(0))  # holds the actor at the gate
            await trio.testing.wait_all_tasks_blocked()
            await ref.tell(Item(1))  # fills the mailbox

            async def asker() -> None:
                try:
                    await ref.ask(Seen())
                except actors.ActorStopped as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(asker)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(ref.stop)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert seen == [0, 1]  # what was in the mailbox was handled
        assert len(results) == 3
        assert all("'q'" in str(exc) for exc in results)


class Failing(actors.Actor):
    def __init__(self, gate: trio.Event) -> None:
        self.gate = gate

    @actors.handles(Item)
    async def item(self, msg: Item) -> None:
        await self.gate.wait()
        raise RuntimeError("handler failed")

    @actors.handles(Seen)
    async def seen(self, msg: Seen) -> None:
        return None


async def test_queued_asks_get_actor_stopped_on_failure(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(5):
        gate = trio.Event()
        results: list[BaseException] = []
        async with actors.open_system() as system:
            ref = await system.spawn(lambda: Failing(gate), name="q", on_failure=actors.STOP)
            await ref.tell(Item(0))

            async def asker() -> None:
                try:
                    await ref.ask(Seen())
                except actors.ActorStopped as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(asker)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert not ref.is_alive
        assert len(results) == 3
        assert all("'q'" in str(exc) and "Seen" in str(exc) for exc in results)


@attrs.frozen
class Unknown:
    pass


async def test_unhandled_ask_raises_and_actor_survives() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c", on_failure=actors.ESCALATE)
            with pytest.raises(actors.UnhandledMessage, match="Unknown"):
                await ref.ask(Unknown())
            assert ref.is_alive
            assert await ref.ask(Get()) == 0


async def test_unhandled_tell_is_logged_and_counted() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Counter, name="c", on_failure=actors.ESCALATE)
            with structlog.testing.capture_logs() as logs:
                await ref.tell(Unknown())
                await ref.tell(Unknown())
                assert await ref.ask(Get()) == 0  # not a failure: still alive
            assert ref.unhandled_count == 2
            events = [e for e in logs if e["event"] == "actor.unhandled_message"]
            assert len(events) == 2
            assert events[0]["log_level"] == "error"
            assert events[0]["message_type"] == "Unknown"
            assert events[0]["actor"] == "c"


@attrs.frozen
class Base:
    pass


@attrs.frozen
class Derived(Base):
    pass


@attrs.frozen
class MoreDerived(Derived):
    pass


class Router(actors.Actor):
    @actors.handles(Base)
    async def base(self, msg: Base) -> str:
        return "base"

    @actors.handles(Derived)
    def derived(self, msg: Derived) -> str:  # a sync handler
        return "derived"


class SubRouter(Router):
    @actors.handles(Get, Incr)
    async def get(self, msg: Get | Incr) -> str:
        return "sub"

    async def base(self, msg: Base) -> str:  # overriding keeps the routing
        return "base-overridden"


async def test_routing_by_mro_and_inheritance() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Router, name="r")
            assert await ref.ask(Base()) == "base"
            assert await ref.ask(Derived()) == "derived"
            assert await ref.ask(MoreDerived()) == "derived"
            assert await ref.ask(MoreDerived()) == "derived"  # cached
            with pytest.raises(actors.UnhandledMessage):
                await ref.ask(Get())
            sub = await system.spawn(SubRouter, name="sub")
            assert await sub.ask(Get()) == "sub"
            assert await sub.ask(Incr()) == "sub"
            assert await sub.ask(Base()) == "base-overridden"
            assert await sub.ask(MoreDerived()) == "derived"


async def test_duplicate_name_and_bad_factory() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            await system.spawn(Counter, name="c")
            with pytest.raises(ValueError, match="'c'"):
                await system.spawn(Counter, name="c")
            with pytest.raises(TypeError, match="not an Actor"):
                await system.spawn(object, name="o")  # type: ignore[arg-type]
            assert set(system.actors) == {"c"}
        with pytest.raises(actors.ActorError):
            await system.spawn(Counter, name="late")


async def test_system_used_from_another_task() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            ready = trio.Event()
            box: list[actors.ActorSystem] = []
            release = trio.Event()

            async def owner() -> None:
                async with actors.open_system() as system:
                    box.append(system)
                    ready.set()
                    await release.wait()

            outer.start_soon(owner)
            await ready.wait()
            ref = await box[0].spawn(Counter, name="c")
            await ref.tell(Incr(5))
            assert await ref.ask(Get()) == 5
            release.set()
        assert not ref.is_alive


def test_actor_outside_system() -> None:
    with pytest.raises(actors.ActorError, match="not running"):
        _ = Counter().ref
