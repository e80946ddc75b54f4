"""Errors that are answers, and answers that come later (``replied_errors``, ``later``)."""

from __future__ import annotations

import attrs
import pytest
import structlog
import trio
import trio.testing

import actors


class Unreachable(Exception):
    """An I/O failure: an answer to the asker, not the actor's death."""


@attrs.frozen
class Fetch:
    ok: bool


@attrs.frozen
class FetchInline:
    ok: bool


@attrs.frozen
class Slow:
    seconds: float
    value: int


@attrs.frozen
class Count:
    pass


@attrs.frozen
class Bug:
    pass


class Fetcher(actors.Actor):
    replied_errors = (Unreachable,)

    def __init__(self) -> None:
        self.handled = 0

    @actors.handles(Fetch)
    async def fetch(self, msg: Fetch) -> str:
        self.handled += 1
        if not msg.ok:
            raise Unreachable("the server is away")
        return "data"

    @actors.handles(FetchInline, inline=True)
    def fetch_inline(self, msg: FetchInline) -> str:
        self.handled += 1
        if not msg.ok:
            raise Unreachable("the server is away")
        return "data"

    @actors.handles(Slow)
    def slow(self, msg: Slow) -> actors.Later:
        self.handled += 1
        return actors.later(self._slow, msg)

    async def _slow(self, msg: Slow) -> int:
        await trio.sleep(msg.seconds)
        if msg.value < 0:
            raise Unreachable("negative")
        if msg.value == 0:
            raise ZeroDivisionError("a bug")
        return msg.value

    @actors.handles(Count)
    def count(self, msg: Count) -> int:
        return self.handled

    @actors.handles(Bug)
    def bug(self, msg: Bug) -> None:
        raise KeyError("a bug")


async def test_a_replied_error_is_an_answer_and_the_actor_keeps_its_state() -> None:
    with trio.fail_after(5):
        async with actors.open_system() as system:
            ref = await system.spawn(Fetcher, name="f", on_failure=actors.RESTART)
            assert await ref.ask(Fetch(True)) == "data"
            with pytest.raises(Unreachable):
                await ref.ask(Fetch(False))
            with pytest.raises(Unreachable):
                await ref.ask(FetchInline(False))  # inline: same rule
            assert await ref.ask(Count()) == 3  # same instance: not restarted
            assert ref.restart_count == 0
            with structlog.testing.capture_logs() as logs:
                await ref.tell(Fetch(False))  # no asker: logged, the actor goes on
                ref.tell_nowait(FetchInline(False))
                assert await ref.ask(Count()) == 5
            assert [e["event"] for e in logs].count("actor.told_error") == 2
            assert ref.restart_count == 0
            # Anything else is a bug: the asker gets it and the actor restarts.
            with pytest.raises(KeyError):
                await ref.ask(Bug())
            assert await ref.ask(Count()) == 0
            assert ref.restart_count == 1


async def test_later_answers_while_the_actor_goes_on(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        async with actors.open_system() as system:
            ref = await system.spawn(Fetcher, name="f", on_failure=actors.RESTART)
            answers: list[int] = []

            async def ask_slow(seconds: float, value: int) -> None:
                answers.append(await ref.ask(Slow(seconds, value)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_slow, 10, 1)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                # The actor is not blocked by the slow answer.
                assert await ref.ask(Count()) == 1
                assert trio.current_time() == start
                nursery.start_soon(ask_slow, 1, 2)
            assert answers == [2, 1]
            with pytest.raises(Unreachable):
                await ref.ask(Slow(1, -1))
            assert ref.restart_count == 0
            with pytest.raises(ZeroDivisionError):
                await ref.ask(Slow(1, 0))
            assert await ref.ask(Count()) == 0
            assert ref.restart_count == 1


async def test_a_later_answer_cut_by_a_restart_is_actor_stopped(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(100):
        async with actors.open_system() as system:
            ref = await system.spawn(Fetcher, name="f", on_failure=actors.RESTART)
            async with trio.open_nursery() as nursery:
                errors: list[BaseException] = []

                async def ask_slow() -> None:
                    try:
                        await ref.ask(Slow(10, 1))
                    except actors.ActorStopped as exc:
                        errors.append(exc)

                nursery.start_soon(ask_slow)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(KeyError):
                    await ref.ask(Bug())
            assert len(errors) == 1
            assert ref.is_alive
