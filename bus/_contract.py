"""The broker contract: checks every broker must pass, unchanged.

Run them against a broker of your own with :func:`bus.testing.check_broker`; this
project's test suite runs each one against every broker it ships. They run on the
real clock (a distributed broker does real I/O), with short times, and each has a
``trio.fail_after`` deadline.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
import trio
import trio.testing

import bus
from bus.protocol import Send
from bus.testing import ContractError, run_broker

__all__ = ["CHECKS", "BrokerFactory"]

#: Builds a fresh, isolated broker from keyword options (``concurrency``,
#: ``shutdown_timeout``, ...).
BrokerFactory = Callable[..., bus.Broker]


def _expect(ok: object, what: str, detail: object = None) -> None:
    """``assert ok``, also under ``python -O``: raise :class:`ContractError` saying
    what was expected (``what``: the condition as written)."""
    if not ok:
        raise ContractError(f"expected {what}" + ("" if detail is None else f" ({detail})"))


def _expect_equal(got: object, want: object, what: str, detail: object = None) -> None:
    """``assert got == want``, also under ``python -O``: ``what`` names ``got``."""
    if got != want:
        message = f"{what} is {_short(got)}, expected {_short(want)}"
        raise ContractError(message + ("" if detail is None else f" ({detail})"))


def _short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _raises(kind: type[BaseException], match: str | None = None) -> Iterator[None]:
    try:
        yield
    except kind as exc:
        if match is not None and not re.search(match, str(exc)):
            raise ContractError(f"{kind.__name__} raised, but {str(exc)!r} !~ {match!r}") from exc
    else:
        raise ContractError(f"{kind.__name__} was not raised")


DEADLINE = 10


async def check_kiq_then_wait_result(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await add.kiq(1, 2)
            result = await handle.wait_result(timeout=5)
            _expect_equal(result.return_value, 3, "result.return_value")
            _expect(not result.is_err, "not result.is_err")
            _expect(
                result.status is bus.TaskStatus.SUCCESS, "result.status is bus.TaskStatus.SUCCESS"
            )
            _expect_equal(result.task_id, handle.task_id, "result.task_id")
            _expect(await handle.is_ready(), "await handle.is_ready()")
            _expect_equal(await handle.get_result(), result, "await handle.get_result()")
            _expect_equal(result.unwrap(), 3, "result.unwrap()")


async def check_calling_a_task_runs_the_function_directly(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def double(x: int) -> int:
        return 2 * x

    @broker.task
    def triple(x: int) -> int:
        return 3 * x

    _expect_equal(await double(4), 8, "await double(4)")
    _expect_equal(triple(4), 12, "triple(4)")


async def check_sync_task_runs_in_a_thread(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    import threading

    main = threading.get_ident()

    @broker.task(name="contract.thread")
    def where() -> bool:
        return threading.get_ident() != main

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await where.kiq()).wait_result(timeout=5)
    _expect(result.return_value is True, "result.return_value is True")


async def check_failure_is_reported_as_text(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def boom(x: int) -> None:
        raise ValueError(f"bad value {x}")

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await boom.kiq(7)).wait_result(timeout=5)
    _expect(
        result.is_err and result.status is bus.TaskStatus.FAILURE,
        "result.is_err and result.status is bus.TaskStatus.FAILURE",
    )
    if result.error is None:
        raise ContractError("expected result.error is not None")
    _expect_equal(result.error.type_name, "ValueError", "result.error.type_name")
    _expect_equal(result.error.message, "bad value 7", "result.error.message")
    _expect(
        "raise ValueError" in result.error.traceback, '"raise ValueError" in result.error.traceback'
    )
    with _raises(bus.TaskFailed, match="bad value 7"):
        result.unwrap()


async def check_timeout_reports_timeout(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task(timeout=0.05)
    async def slow() -> None:
        await trio.sleep(30)

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await slow.kiq()).wait_result(timeout=5)
    _expect(result.status is bus.TaskStatus.TIMEOUT, "result.status is bus.TaskStatus.TIMEOUT")
    _expect(result.is_err, "result.is_err")


async def check_retries_keep_the_task_id(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    attempts: list[int] = []

    @broker.task(retries=3, retry_backoff=0.01)
    async def flaky(ctx: bus.Context = bus.CONTEXT) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return ctx.attempt

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await flaky.kiq()
            result = await handle.wait_result(timeout=5)
    _expect_equal(result.task_id, handle.task_id, "result.task_id")
    _expect_equal(result.return_value, 3, "result.return_value")
    _expect_equal(attempts, [1, 2, 3], "attempts")


async def check_retries_run_out(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    calls = 0

    @broker.task(retries=2, retry_backoff=0)
    async def always() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("nope")

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await always.kiq()).wait_result(timeout=5)
    _expect_equal(calls, 3, "calls")
    _expect(result.status is bus.TaskStatus.FAILURE, "result.status is bus.TaskStatus.FAILURE")


async def check_retry_on_limits_what_is_retried(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    calls = 0

    @broker.task(retries=5, retry_backoff=0, retry_on=(ConnectionError,))
    async def picky() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not retried")

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await picky.kiq()).wait_result(timeout=5)
    _expect_equal(calls, 1, "calls")
    if not (result.error is not None and result.error.type_name == "KeyError"):
        raise ContractError(
            'expected result.error is not None and result.error.type_name == "KeyError"'
        )


async def check_cancel_a_running_task(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    started = trio.Event()
    finished = False

    @broker.task
    async def long() -> None:
        nonlocal finished
        started.set()
        await trio.sleep(30)
        finished = True

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await long.kiq()
            await started.wait()
            await handle.cancel()
            result = await handle.wait_result(timeout=5)
    _expect(result.status is bus.TaskStatus.CANCELLED, "result.status is bus.TaskStatus.CANCELLED")
    _expect(not finished, "not finished")
    with _raises(bus.TaskCancelled):
        result.unwrap()


async def check_cancel_a_queued_task_it_never_starts(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=1)
    gate = trio.Event()
    ran: list[str] = []

    @broker.task
    async def blocker() -> None:
        await gate.wait()

    @broker.task
    async def victim() -> None:
        ran.append("victim")

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            first = await blocker.kiq()
            queued = await victim.kiq()
            await queued.cancel()
            gate.set()
            _expect(
                (await first.wait_result(timeout=5)).status is bus.TaskStatus.SUCCESS,
                "(await first.wait_result(timeout=5)).status is bus.TaskStatus.SUCCESS",
            )
            result = await queued.wait_result(timeout=5)
            after = await victim.kiq()  # the worker is still healthy
            await after.wait_result(timeout=5)
    _expect(result.status is bus.TaskStatus.CANCELLED, "result.status is bus.TaskStatus.CANCELLED")
    _expect_equal(ran, ["victim"], "ran")


async def check_delay_is_honoured(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    ran_at: list[float] = []

    @broker.task
    async def stamp() -> None:
        ran_at.append(trio.current_time())

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            sent = trio.current_time()
            handle = await stamp.kicker().with_delay(0.3).kiq()
            _expect(not await handle.is_ready(), "not await handle.is_ready()")
            await handle.wait_result(timeout=5)
    _expect(ran_at[0] - sent >= 0.25, "ran_at[0] - sent >= 0.25")


async def check_concurrency_is_a_real_limit(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=3)
    now = peak = 0

    @broker.task
    async def work() -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await trio.sleep(0.02)
        now -= 1

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handles = [await work.kiq() for _ in range(12)]
            await bus.gather(*handles, timeout=5)
    _expect_equal(peak, 3, "peak")


async def check_labels_and_task_id_travel(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    seen: dict[str, Any] = {}

    @broker.task
    async def echo(ctx: bus.Context = bus.CONTEXT) -> str:
        seen.update(ctx.labels)
        return str(ctx.task_id)

    tid = bus.TaskID.new()
    labels = {"n": 1, "f": 1.5, "s": "x", "b": True, "none": None, "l": [1, "2"], "d": {"k": 2}}
    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await echo.kicker().with_labels(**labels).with_task_id(tid).kiq()
            _expect_equal(handle.task_id, tid, "handle.task_id")
            result = await handle.wait_result(timeout=5)
    _expect_equal(result.return_value, tid, "result.return_value")
    _expect_equal(seen, labels, "seen")
    _expect_equal(result.labels, labels, "result.labels")


async def check_progress_is_visible(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    reported = trio.Event()
    go_on = trio.Event()

    @broker.task
    async def job(ctx: bus.Context = bus.CONTEXT) -> None:
        await ctx.set_progress({"done": 1, "of": 2})
        reported.set()
        await go_on.wait()

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await job.kiq()
            await reported.wait()
            _expect_equal(
                await handle.get_progress(), {"done": 1, "of": 2}, "await handle.get_progress()"
            )
            go_on.set()
            await handle.wait_result(timeout=5)


async def check_middleware_hook_order(make_broker: BrokerFactory) -> None:
    calls: list[str] = []
    saved = trio.Event()

    class Recorder(bus.Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        def startup(self) -> None:
            calls.append(f"{self.name}.startup")

        async def shutdown(self) -> None:
            calls.append(f"{self.name}.shutdown")

        def pre_send(self, message: bus.TaskMessage) -> bus.TaskMessage:
            calls.append(f"{self.name}.pre_send")
            return message

        async def post_send(self, message: bus.TaskMessage) -> None:
            calls.append(f"{self.name}.post_send")

        async def pre_execute(self, message: bus.TaskMessage) -> bus.TaskMessage:
            calls.append(f"{self.name}.pre_execute")
            return message

        def post_execute(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
            calls.append(f"{self.name}.post_execute")

        def post_save(self, message: bus.TaskMessage, result: bus.TaskResult[Any]) -> None:
            calls.append(f"{self.name}.post_save")
            if self.name == "a":
                saved.set()

    broker = make_broker().with_middlewares(Recorder("a"), Recorder("b"))

    @broker.task
    async def noop() -> None:
        pass

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await noop.kiq()
            await handle.wait_result(timeout=5)
            await saved.wait()  # post_save runs right after the store
    _expect_equal(
        calls,
        [
            "a.startup",
            "b.startup",
            "a.pre_send",
            "b.pre_send",
            "b.post_send",
            "a.post_send",
            "a.pre_execute",
            "b.pre_execute",
            "b.post_execute",
            "a.post_execute",
            "b.post_save",
            "a.post_save",
            "b.shutdown",
            "a.shutdown",
        ],
        "calls",
    )


async def check_unknown_task_name_is_refused(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    with trio.fail_after(DEADLINE):
        async with broker:
            msg = bus.TaskMessage(
                task_id=bus.TaskID.new(), task_name="no.such", args=(), kwargs={}, labels={}
            )
            with _raises(bus.UnknownTaskError, match=r"no\.such"):
                await broker.kick(msg)


async def check_unencodable_arguments_fail_at_kiq(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def takes(x: object) -> None:
        pass

    with trio.fail_after(DEADLINE):
        async with broker:
            with _raises(bus.SendError, match="cannot encode"):
                await takes.kiq(object())


async def check_kiq_checks_arguments_at_the_sender(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            with _raises(TypeError, match="'b'"):
                await add.kiq(1)  # type: ignore[call-arg]
            with _raises(TypeError, match="'c'"):
                await add.kicker().kiq(1, 2, c=3)  # type: ignore[call-arg]
            handle = await add.kiq(1, 2)
            _expect_equal((await handle.wait_result(timeout=5)).return_value, 3, "1 + 2")


async def check_store_result_false_stores_nothing(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=1)
    ran: list[str] = []

    @broker.task(store_result=False)
    async def fire(x: str) -> str:
        ran.append(x)
        return x

    @broker.task
    async def kept(x: str) -> str:
        return x

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            quiet = await fire.kiq("a")
            once = await kept.kicker().with_store_result(False).kiq("b")
            # One at a time: when this result is in, the two before it are done.
            last = await kept.kiq("c")
            _expect_equal((await last.wait_result(timeout=5)).return_value, "c", "last result")
            _expect_equal(ran, ["a"], "the tasks that ran")
            for handle in (quiet, once):
                with trio.fail_after(1), _raises(bus.ResultNotFound, match="store_result"):
                    await handle.wait_result(timeout=5)
                with _raises(bus.ResultNotFound):
                    await broker.result_backend.get_result(handle.task_id)
                _expect(
                    not await broker.result_backend.is_ready(handle.task_id),
                    "no result stored for a task with store_result=False",
                )


async def check_bad_messages_are_rejected_and_the_worker_goes_on(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker()

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    with trio.fail_after(DEADLINE), structlog.testing.capture_logs() as logs:
        async with run_broker(broker):
            good = add.kicker().message(1, 2)
            await broker.ref.tell(Send(good, b"\x00not json at all"))
            wrong_args = add.kicker().message(1, 2)
            data = broker.codec.encode_message(wrong_args).replace(b"[1,2]", b"[1,2,3]")
            await broker.ref.tell(Send(wrong_args, data))
            handle = await add.kiq(20, 22)
            _expect_equal(
                (await handle.wait_result(timeout=5)).return_value,
                42,
                "(await handle.wait_result(timeout=5)).return_value",
            )
            rejected = await bus.TaskHandle[Any](wrong_args.task_id, broker).wait_result(timeout=5)
    _expect(rejected.status is bus.TaskStatus.FAILURE, "rejected.status is bus.TaskStatus.FAILURE")
    if not (rejected.error is not None and rejected.error.type_name == "bus.Rejected"):
        raise ContractError(
            'expected rejected.error is not None and rejected.error.type_name == "bus.Rejected"'
        )
    reasons = [e["reason"] for e in logs if e["event"] == "task.rejected"]
    _expect(any("undecodable" in r for r in reasons), 'any("undecodable" in r for r in reasons)')
    _expect(any("arguments" in r for r in reasons), 'any("arguments" in r for r in reasons)')


async def check_wait_result_timeout(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def forever() -> None:
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handle = await forever.kiq()
            with _raises(bus.ResultTimeout):
                await handle.wait_result(timeout=0.05)
            await handle.cancel()


async def check_gather_returns_results_in_order(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def ident(x: int) -> int:
        await trio.sleep(0.001 * (5 - x))
        return x

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handles = [await ident.kiq(i) for i in range(5)]
            results = await bus.gather(*handles, timeout=5)
    _expect_equal(
        [r.return_value for r in results], [0, 1, 2, 3, 4], "[r.return_value for r in results]"
    )


async def check_lifecycle_events(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    seen: list[str] = []

    @broker.on_event(bus.BusEvent.CLIENT_STARTUP, bus.BusEvent.WORKER_STARTUP)
    async def up(state: bus.BrokerState) -> None:
        seen.append("up")
        state.ready = True

    @broker.on_event(bus.BusEvent.CLIENT_SHUTDOWN, bus.BusEvent.WORKER_SHUTDOWN)
    def down(state: bus.BrokerState) -> None:
        seen.append("down")

    @broker.task
    async def uses_state(ctx: bus.Context = bus.CONTEXT) -> bool:
        return bool(ctx.broker.state.ready)

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            result = await (await uses_state.kiq()).wait_result(timeout=5)
    _expect(result.return_value is True, "result.return_value is True")
    _expect(
        seen.count("up") == 2 and seen.count("down") == 2,
        'seen.count("up") == 2 and seen.count("down") == 2',
    )


async def check_trio_cancellation_of_the_worker_is_not_a_task_failure(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker()
    started = trio.Event()

    @broker.task
    async def long() -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        with trio.CancelScope() as scope:
            async with run_broker(broker):
                await long.kiq()
                await started.wait()
                scope.cancel()  # Trio cancels everything, the worker included
    _expect(scope.cancelled_caught, "scope.cancelled_caught")
    _expect(
        broker.stats.failed == 0 and broker.stats.cancelled == 0,
        "broker.stats.failed == 0 and broker.stats.cancelled == 0",
    )
    _expect_equal(broker.stats.succeeded, 0, "broker.stats.succeeded")


async def check_results_pass_through_the_codec(make_broker: BrokerFactory) -> None:
    """What a shared backend could not store fails on every broker the same way, and
    what it changes (tuples become lists) comes back changed on every broker."""
    broker = make_broker()

    @broker.task
    async def a_set() -> object:
        return {1, 2}

    @broker.task
    async def a_tuple() -> object:
        return (1, (2, "x"))

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            unencodable = await (await a_set.kiq()).wait_result(timeout=5)
            shaped = await (await a_tuple.kiq()).wait_result(timeout=5)
    _expect(
        unencodable.status is bus.TaskStatus.FAILURE, "unencodable.status is bus.TaskStatus.FAILURE"
    )
    if unencodable.error is None:
        raise ContractError("expected unencodable.error is not None")
    _expect_equal(
        unencodable.error.type_name, "bus.UnencodableResult", "unencodable.error.type_name"
    )
    _expect_equal(shaped.return_value, [1, [2, "x"]], "shaped.return_value")


async def check_unique_jobs_run_once_while_queued_or_running(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker()
    runs: list[str] = []
    gate = trio.Event()

    @broker.task(unique=True)
    async def report(day: str) -> str:
        runs.append(day)
        await gate.wait()
        return f"report {day}"

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            first = [await report.kiq("mon") for _ in range(5)]
            # one job: every handle on it
            _expect_equal(len({h.task_id for h in first}), 1, "len({h.task_id for h in first})")
            many = await report.kiq_many([("mon",), ("mon",)])  # in bulk too
            _expect_equal(
                {h.task_id for h in many}, {first[0].task_id}, "{h.task_id for h in many}"
            )
            other = await report.kiq("tue")  # other arguments: another job
            _expect(other.task_id != first[0].task_id, "other.task_id != first[0].task_id")
            keyed = [await report.kicker().with_unique(key="k").kiq(d) for d in ("a", "b")]
            # one key of the caller's
            _expect_equal(keyed[0].task_id, keyed[1].task_id, "keyed[0].task_id")
            gate.set()
            results = await bus.gather(*first, other, keyed[1], timeout=5)
            _expect_equal(
                [r.return_value for r in results[-3:]],
                [
                    "report mon",
                    "report tue",
                    "report a",
                ],
                "[r.return_value for r in results[-3:]]",
            )
            # Its result is stored: the key is free, the same job runs again.
            again = await report.kiq("mon")
            _expect(again.task_id != first[0].task_id, "again.task_id != first[0].task_id")
            _expect_equal(
                (await again.wait_result(timeout=5)).return_value,
                "report mon",
                "(await again.wait_result(timeout=5)).return_value",
            )
    _expect_equal(sorted(runs), ["a", "mon", "mon", "tue"], "sorted(runs)")


async def check_schedules_fire_each_tick_once(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    ticks: list[float] = []
    greeted: list[tuple[str, float]] = []

    @broker.task(name="contract.tick", schedule=bus.every(0.2))
    async def tick(ctx: bus.Context = bus.CONTEXT) -> None:
        ticks.append(ctx.labels["tick"])

    @broker.task(name="contract.greet")
    async def greet(who: str, ctx: bus.Context = bus.CONTEXT) -> None:
        greeted.append((who, ctx.labels["tick"]))

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            await broker.schedule(greet, bus.every(0.25), args=["ada"], name="contract.hello")
            while len(ticks) < 5 or len(greeted) < 3:  # noqa: ASYNC110 (a clock, not an event)
                await trio.sleep(0.05)
            infos = {i.spec.name: i for i in await broker.schedules()}
            _expect_equal(infos["contract.tick"].source, "task", 'infos["contract.tick"].source')
            _expect_equal(
                infos["contract.hello"].source, "runtime", 'infos["contract.hello"].source'
            )
            _expect(
                infos["contract.hello"].state.fires >= 3, 'infos["contract.hello"].state.fires >= 3'
            )
            last_tick = infos["contract.tick"].state.last_tick
            if last_tick is None:
                raise ContractError("expected last_tick is not None")
            _expect(
                infos["contract.tick"].next_fire > last_tick,
                'infos["contract.tick"].next_fire > last_tick',
            )
            _expect(
                await broker.unschedule("contract.hello"),
                'await broker.unschedule("contract.hello")',
            )
            _expect(
                not await broker.unschedule("contract.hello"),
                'not await broker.unschedule("contract.hello")',
            )
            _expect(
                "contract.hello" not in {i.spec.name for i in await broker.schedules()},
                '"contract.hello" not in {i.spec.name for i in await broker.schedules()}',
            )
    _expect_equal(len(set(ticks)), len(ticks), "len(set(ticks))", "a tick was sent twice")
    # In order, on the 0.2 s grid (a scheduler woken late fires the latest tick only).
    gaps = [round((b - a) / 0.2, 3) for a, b in itertools.pairwise(ticks)]
    _expect(
        all(g >= 1 and g == int(g) for g in gaps), "all(g >= 1 and g == int(g) for g in gaps)", gaps
    )
    _expect_equal({who for who, _ in greeted}, {"ada"}, "{who for who, _ in greeted}")
    _expect_equal(len({t for _, t in greeted}), len(greeted), "len({t for _, t in greeted})")


async def check_kiq_many_sends_in_bulk(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task
    async def combine(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handles = await combine.kiq_many((i, i) for i in range(20))
            handles += await combine.kiq_many([((1, 2), {"scale": 10})])
            results = await bus.gather(*handles, timeout=5)
    _expect_equal(
        [r.return_value for r in results],
        [2 * i for i in range(20)] + [30],
        "[r.return_value for r in results]",
    )
    _expect_equal(broker.stats.sent, 21, "broker.stats.sent")


def _most_in_a_window(times: list[float], width: float) -> int:
    ts = sorted(times)
    return max((sum(1 for u in ts[i:] if u < t + width) for i, t in enumerate(ts)), default=0)


async def check_named_queues_route_tasks(make_broker: BrokerFactory) -> None:
    broker = make_broker()

    @broker.task(name="contract.in_a", queue="contract-a")
    async def in_a(ctx: bus.Context = bus.CONTEXT) -> str | None:
        return ctx.message.queue

    @broker.task(name="contract.plain")
    async def plain(ctx: bus.Context = bus.CONTEXT) -> str | None:
        return ctx.message.queue

    with trio.fail_after(DEADLINE):
        async with broker, trio.open_nursery() as nursery:
            workers = []
            if not broker.embedded_worker:  # a worker of queue contract-a only
                workers.append(
                    await nursery.start(
                        lambda task_status: broker.run_worker(
                            2, queues=["contract-a"], task_status=task_status
                        )
                    )
                )
            waiting = await plain.kiq()
            _expect_equal(
                (await (await in_a.kiq()).wait_result(timeout=5)).return_value,
                "contract-a",
                "(await (await in_a.kiq()).wait_result(timeout=5)).return_value",
            )
            moved = await plain.kicker().with_queue("contract-a").kiq()
            _expect_equal(
                (await moved.wait_result(timeout=5)).return_value,
                "contract-a",
                "(await moved.wait_result(timeout=5)).return_value",
            )
            if workers:
                with _raises(bus.ResultTimeout):  # nobody consumes the default queue yet
                    await waiting.wait_result(timeout=0.3)
                workers.append(await nursery.start(broker.run_worker, 2))
            _expect(
                (await waiting.wait_result(timeout=5)).return_value is None,
                "(await waiting.wait_result(timeout=5)).return_value is None",
            )
            for w in workers:
                w.stop()


async def check_priorities_take_the_most_urgent_first(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=1)
    busy, gate = trio.Event(), trio.Event()
    started: list[str] = []

    @broker.task(name="contract.block")
    async def block() -> None:
        busy.set()
        await gate.wait()

    @broker.task(name="contract.job")
    async def job(kind: str) -> None:
        started.append(kind)

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            await block.kiq()
            await busy.wait()
            handles = [await job.kiq("low") for _ in range(6)]
            handles += [await job.kicker().with_priority(9).kiq("high") for _ in range(3)]
            handles.append(await job.kicker().with_priority(5).kiq("mid"))
            gate.set()
            await bus.gather(*handles, timeout=5)
    _expect_equal(started, ["high"] * 3 + ["mid"] + ["low"] * 6, "started")


async def check_rate_limit_spreads_starts_without_holding_a_runner(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker(concurrency=2)
    starts: list[float] = []

    @broker.task(name="contract.limited", rate_limit="10/s")
    async def limited() -> None:
        starts.append(trio.current_time())

    @broker.task(name="contract.free")
    async def free() -> None:
        pass

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handles = [await limited.kiq() for _ in range(8)]
            await (await free.kiq()).wait_result(timeout=5)
            when_free_ran = len(starts)
            results = await bus.gather(*handles, timeout=5)
    _expect(all(not r.is_err for r in results), "all(not r.is_err for r in results)")
    # two runners, eight waiting for the limit: it ran anyway
    _expect(when_free_ran < 8, "when_free_ran < 8")
    # 7 intervals of 0.1 s
    _expect(max(starts) - min(starts) >= 0.6, "max(starts) - min(starts) >= 0.6")
    # the rate, plus the burst of 1
    _expect(_most_in_a_window(starts, 0.5) <= 5 + 1, "_most_in_a_window(starts, 0.5) <= 5 + 1")


async def check_max_running_is_a_limit(make_broker: BrokerFactory) -> None:
    broker = make_broker(concurrency=6)
    now = peak = 0

    @broker.task(name="contract.capped", max_running=2)
    async def capped() -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await trio.sleep(0.05)
        now -= 1

    @broker.task(name="contract.free")
    async def free() -> None:
        pass

    with trio.fail_after(DEADLINE):
        async with run_broker(broker):
            handles = [await capped.kiq() for _ in range(8)]
            await (await free.kiq()).wait_result(timeout=5)
            results = await bus.gather(*handles, timeout=5)
    _expect(all(not r.is_err for r in results), "all(not r.is_err for r in results)")
    _expect_equal(peak, 2, "peak")


async def check_a_drain_never_drops_a_delivery_it_meets(make_broker: BrokerFactory) -> None:
    """A runner waiting for work may be handed a delivery in the very scheduler pass in
    which a drain stops intake: that delivery is run or handed back, never recorded as
    interrupted without running. (A broker with an embedded worker is made with
    ``start_worker=False`` here, so that only the check's workers run.)"""
    broker = make_broker()
    if broker.embedded_worker:
        broker = make_broker(start_worker=False)
    runs: list[int] = []

    @broker.task(name="contract.drained")
    async def job(i: int) -> int:
        runs.append(i)
        await trio.lowlevel.checkpoint()
        return i

    async def drain_then_stop(w: bus.Worker) -> None:
        await w.drain(5)
        w.stop()

    n = 24
    with trio.fail_after(3 * DEADLINE):
        async with broker:
            handles = []
            for i in range(n):
                async with trio.open_nursery() as nursery:
                    worker = await nursery.start(
                        lambda task_status: broker.run_worker(
                            1, scheduler=False, task_status=task_status
                        )
                    )
                    await trio.testing.wait_all_tasks_blocked(0.01)  # the runner waits
                    nursery.start_soon(drain_then_stop, worker)
                    # Send a few scheduler passes later each time, so that some sends
                    # meet the pass in which intake stops.
                    for _ in range(i % 6):
                        await trio.lowlevel.checkpoint()
                    handles.append(await job.kiq(i))
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(broker.run_worker, 4)
                results = [await h.wait_result(timeout=5) for h in handles]
                worker.stop()
    _expect_equal(
        [(r.status, r.return_value) for r in results],
        [(bus.TaskStatus.SUCCESS, i) for i in range(n)],
        "[(r.status, r.return_value) for r in results]",
    )
    _expect_equal(sorted(runs), list(range(n)), "sorted(runs)")


#: Every check, in the order they run.
CHECKS: tuple[Callable[[BrokerFactory], Awaitable[None]], ...] = (
    check_kiq_then_wait_result,
    check_calling_a_task_runs_the_function_directly,
    check_sync_task_runs_in_a_thread,
    check_failure_is_reported_as_text,
    check_timeout_reports_timeout,
    check_retries_keep_the_task_id,
    check_retries_run_out,
    check_retry_on_limits_what_is_retried,
    check_cancel_a_running_task,
    check_cancel_a_queued_task_it_never_starts,
    check_delay_is_honoured,
    check_concurrency_is_a_real_limit,
    check_labels_and_task_id_travel,
    check_progress_is_visible,
    check_middleware_hook_order,
    check_unknown_task_name_is_refused,
    check_unencodable_arguments_fail_at_kiq,
    check_kiq_checks_arguments_at_the_sender,
    check_store_result_false_stores_nothing,
    check_bad_messages_are_rejected_and_the_worker_goes_on,
    check_wait_result_timeout,
    check_gather_returns_results_in_order,
    check_lifecycle_events,
    check_trio_cancellation_of_the_worker_is_not_a_task_failure,
    check_a_drain_never_drops_a_delivery_it_meets,
    check_kiq_many_sends_in_bulk,
    check_results_pass_through_the_codec,
    check_schedules_fire_each_tick_once,
    check_unique_jobs_run_once_while_queued_or_running,
    check_named_queues_route_tasks,
    check_priorities_take_the_most_urgent_first,
    check_rate_limit_spreads_starts_without_holding_a_runner,
    check_max_running_is_a_limit,
)
