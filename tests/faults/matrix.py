"""The operation matrix: every public call of the Redis bus, started concurrently and in
a loop, while Redis goes away and comes back.

A :class:`Bench` holds a producer broker and a worker broker (two objects, as two
processes would have; one Redis, one key prefix) with the tasks the operations need.
:meth:`Bench.run_outage` starts one loop per operation, waits until each has
succeeded once, cuts Redis (a callable given by the test), waits for the outage's
length, restores Redis, then waits until each operation succeeded again with the
same objects. Every public call is recorded (:class:`Call`) with its outcome and time;
:meth:`Bench.check` then asserts the contract:

- each call returned, or raised ``bus.BrokerUnavailable`` within its bound
  (``send_timeout`` for sends, ``command_timeout`` for everything else), and no
  other error came out of it (``actors.ActorStopped``, ``MailboxFull``, an
  ExceptionGroup ...);
- ``wait_result(timeout=t)`` waited through the outage: it returned, or raised
  ``ResultTimeout`` at ``t``;
- every operation worked again within about a second of Redis answering;
- every send that returned ran, exactly once (nothing lost, nothing finished runs
  again), and each cancel that returned ended its task CANCELLED.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import trio

import bus
from bus.redis import RedisBroker, RedisSettings

__all__ = ["OPS", "Bench", "Call", "has_command_timeout"]

#: Scheduling noise allowed on top of a bound (a 2-core machine running Redis, the
#: proxy, a producer and a worker).
SLACK = 1.0
#: A call still running this long after its bound is recorded as hung and cancelled.
HANG = 5.0
#: Redis answering again -> every operation has worked again (the contract says
#: "within about a second").
RECOVERY = 2.0
#: Pause between two calls of one loop.
PACE = 0.1


def has_command_timeout() -> bool:
    return "command_timeout" in attrs.fields_dict(RedisSettings)


@attrs.define
class Call:
    op: str
    bound: float
    start: float
    end: float
    outcome: str  # ok, unavailable, result_timeout, leak, hang
    error: str = ""

    @property
    def took(self) -> float:
        return self.end - self.start

    def __str__(self) -> str:
        err = f" {self.error}" if self.error else ""
        return f"{self.op}: {self.outcome} after {self.took:.2f}s (bound {self.bound:g}s){err}"


def _bound(seconds: float | None) -> float:
    return math.inf if seconds is None else float(seconds)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        inner = "; ".join(_describe(e) for e in exc.exceptions)
        text += f" [{inner}]"
    return text[:400]


# Every operation the loops run; the test's figures are per operation.
OPS = (
    "kiq",  # send
    "kiq_many",  # batch send
    "run",  # send + receive, run, store result, ack (worker) + wait_result
    "retry",  # a task failing its first attempt: nack and retry
    "delayed",  # a task sent with a delay: the delayed mover
    "unique",  # with_unique: the unique claim
    "rate_limited",  # rate_limit=: the worker's token take
    "get_result",  # a stored result read back
    "is_ready",
    "get_progress",
    "client",  # broker.client.execute(...): the client given to tasks and tools
    "wait_timeout",  # wait_result(timeout=t) on a task that never ends: ResultTimeout at t
    "cancel",  # handle.cancel() of a running task
    "inspect",
    "dead_letters",
    "requeue",  # requeue_dead_letters
    "schedule",  # broker.schedule(...)
    "unschedule",
    "schedules",
)


class Bench:
    def __init__(
        self,
        url: str,
        *,
        send_timeout: float | None = 2.0,
        command_timeout: float | None = 2.0,
        visibility_timeout: float = 60.0,
        wait_timeout: float = 1.5,
    ) -> None:
        """``None`` for a timeout: the broker's default (the defaults test)."""
        prefix = f"f{bus.TaskID.new()[-12:]}"
        options: dict[str, Any] = {"prefix": prefix, "queue": "q"}
        if send_timeout is not None:
            options["send_timeout"] = send_timeout
        if command_timeout is not None and has_command_timeout():
            options["command_timeout"] = command_timeout
        options["visibility_timeout"] = visibility_timeout
        self.producer = RedisBroker(url, **options)
        self.worker_broker = RedisBroker(url, **options)
        settings = self.producer.settings
        #: The bounds the contract gives calls (``None``: no bound, wait for ever).
        self.send_bound = _bound(settings.send_timeout)
        self.command_bound = _bound(getattr(settings, "command_timeout", 10.0))
        self.wait_timeout = wait_timeout
        self.calls: list[Call] = []
        self.runs: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.gates: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.started: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        #: Handles of sends that returned, with the token their task returns.
        self.accepted: list[tuple[bus.TaskHandle[Any], str]] = []
        #: Tokens of sends that raised BrokerUnavailable (they may run once, or not).
        self.maybe: set[str] = set()
        #: Tasks whose cancel returned: they must end CANCELLED (their gate stays shut).
        self.cancelled: list[tuple[bus.TaskHandle[Any], str]] = []
        #: Tasks whose cancel raised BrokerUnavailable: they end either way, but end.
        self.maybe_cancelled: list[tuple[bus.TaskHandle[Any], str]] = []
        #: Results of the accepted tasks, by token (filled by :meth:`settle`).
        self.results: dict[str, bus.TaskResult[Any]] = {}
        #: Schedules added (the add returned) and not asked to be removed since.
        self.schedule_names: list[str] = []
        #: Schedules removed (the removal returned).
        self.unscheduled: set[str] = set()
        self.finished: list[bus.TaskHandle[Any]] = []
        self._tokens = itertools.count()
        self._stopping = False
        self._ok_since: dict[str, float] = {}
        self._ok_changed = trio.Event()
        self._register()

    # ------------------------------------------------------------------ tasks

    def _register(self) -> None:
        runs, attempts, gates, started = self.runs, self.attempts, self.gates, self.started

        async def add(token: str) -> str:
            runs[token] += 1
            return token

        async def flaky(token: str, ctx: bus.Context) -> str:
            attempts[token] += 1
            if ctx.attempt <= 1 and attempts[token] == 1:
                raise RuntimeError("first attempt fails")
            runs[token] += 1
            return token

        async def gated(token: str) -> str:
            started[token].set()
            await gates[token].wait()
            runs[token] += 1
            return token

        async def slow(token: str) -> str:
            await trio.sleep(0.2)
            runs[token] += 1
            return token

        for b in (self.producer, self.worker_broker):
            self.add = b.register_task(add, name="f.add")
            self.slow = b.register_task(slow, name="f.slow")
            self.flaky = b.register_task(flaky, name="f.flaky", retries=3, retry_backoff=0.1)
            self.gated = b.register_task(gated, name="f.gated")
            self.limited = b.register_task(add, name="f.limited", rate_limit="1000/s")
        # Known to the producer only: the worker dead-letters it (unknown task).
        self.ghost = self.producer.register_task(add, name="f.ghost")
        # The producer's handles (the worker's objects are for the worker).
        self.add = self.producer.find_task("f.add")  # type: ignore[assignment]
        self.flaky = self.producer.find_task("f.flaky")  # type: ignore[assignment]
        self.gated = self.producer.find_task("f.gated")  # type: ignore[assignment]
        self.limited = self.producer.find_task("f.limited")  # type: ignore[assignment]
        self.slow = self.producer.find_task("f.slow")  # type: ignore[assignment]

    def token(self, op: str) -> str:
        return f"{op}-{next(self._tokens)}"

    # --------------------------------------------------------------- running

    @contextlib.asynccontextmanager
    async def running(self, concurrency: int = 64) -> AsyncIterator[None]:
        """Both brokers open, a worker running (what their exits raise, the test sees)."""
        async with self.producer, trio.open_nursery() as nursery:
            worker = await nursery.start(self.worker_broker.run_worker, concurrency)
            try:
                yield
            finally:
                self._stopping = True
                for gate in list(self.gates.values()):
                    gate.set()
                worker.stop()

    async def call(
        self, op: str, bound: float, fn: Callable[..., Awaitable[Any]], *args: Any
    ) -> tuple[str, Any]:
        """Make one public call, record it; returns (outcome, value)."""
        start = trio.current_time()
        value: Any = None
        error = ""
        with trio.move_on_after(bound + HANG) as hung:
            try:
                value = await fn(*args)
                outcome = "ok"
            except bus.BrokerUnavailable as exc:
                outcome, error = "unavailable", str(exc)[:200]
            except bus.ResultTimeout as exc:
                outcome, error = "result_timeout", str(exc)[:200]
            except BaseException as exc:
                if self._stopping or isinstance(exc, trio.Cancelled | KeyboardInterrupt):
                    raise
                outcome, error = "leak", _describe(exc)
        if hung.cancelled_caught:
            outcome = "hang"
        end = trio.current_time()
        self.calls.append(Call(op, bound, start, end, outcome, error))
        if outcome == "ok" and op in OPS:
            self._ok_since.setdefault(op, end)
            self._ok_changed.set()
            self._ok_changed = trio.Event()
        return outcome, value

    async def _send(self, op: str, kicker: Callable[[str], Awaitable[Any]]) -> str | None:
        """A send; a returned handle is accepted and must run once."""
        token = self.token(op)
        outcome, handle = await self.call(
            op if op in ("kiq",) else f"{op}.kiq", self.send_bound, kicker, token
        )
        if outcome == "ok":
            self.accepted.append((handle, token))
            return token
        self.maybe.add(token)
        return None

    async def _send_and_wait(self, op: str, kicker: Callable[[str], Awaitable[Any]]) -> None:
        token = self.token(op)
        outcome, handle = await self.call(f"{op}.kiq", self.send_bound, kicker, token)
        if outcome != "ok":
            self.maybe.add(token)
            return
        self.accepted.append((handle, token))
        # Waits through an outage: only the test's own limit bounds it.
        await self.call(op, 300.0, handle.wait_result, 300.0)

    # One coroutine per operation: one public call (or a send and its wait).

    async def op_kiq(self) -> None:
        await self._send("kiq", self.add.kiq)

    async def op_kiq_many(self) -> None:
        a, b = self.token("kiq_many"), self.token("kiq_many")
        outcome, handles = await self.call(
            "kiq_many", self.send_bound, self.add.kiq_many, [(a,), (b,)]
        )
        if outcome == "ok":
            self.accepted += list(zip(handles, (a, b), strict=True))
        else:
            self.maybe |= {a, b}

    async def op_run(self) -> None:
        await self._send_and_wait("run", self.add.kiq)

    async def op_retry(self) -> None:
        await self._send_and_wait("retry", self.flaky.kiq)

    async def op_delayed(self) -> None:
        await self._send_and_wait("delayed", lambda t: self.add.kicker().with_delay(0.3).kiq(t))

    async def op_unique(self) -> None:
        await self._send_and_wait(
            "unique", lambda t: self.add.kicker().with_unique(key=f"u-{t}", ttl=600).kiq(t)
        )

    async def op_rate_limited(self) -> None:
        await self._send_and_wait("rate_limited", self.limited.kiq)

    async def op_get_result(self) -> None:
        if self.finished:
            await self.call("get_result", self.command_bound, self.finished[-1].get_result)

    async def op_is_ready(self) -> None:
        if self.finished:
            await self.call("is_ready", self.command_bound, self.finished[-1].is_ready)

    async def op_get_progress(self) -> None:
        if self.finished:
            await self.call("get_progress", self.command_bound, self.finished[-1].get_progress)

    async def op_client(self) -> None:
        await self.call("client", self.command_bound, self.producer.client.execute, "PING")

    async def op_wait_timeout(self) -> None:
        handle: bus.TaskHandle[Any] = bus.TaskHandle(bus.TaskID.new(), self.producer)
        outcome, _ = await self.call(
            "wait_timeout", self.wait_timeout, handle.wait_result, self.wait_timeout
        )
        if outcome == "result_timeout":  # the expected end: counts as working
            self._ok_since.setdefault("wait_timeout", trio.current_time())
            self._ok_changed.set()
            self._ok_changed = trio.Event()

    async def op_cancel(self) -> None:
        token = self.token("cancel")
        outcome, handle = await self.call("cancel.kiq", self.send_bound, self.gated.kiq, token)
        if outcome != "ok":
            self.maybe.add(token)
            return
        outcome, _ = await self.call("cancel", self.command_bound, handle.cancel)
        if outcome == "ok":
            self.cancelled.append((handle, token))
        else:  # maybe cancelled: it must end, run once or CANCELLED (its gate opens)
            self.maybe_cancelled.append((handle, token))

    async def op_inspect(self) -> None:
        await self.call("inspect", self.command_bound, self.producer.inspect)

    async def op_dead_letters(self) -> None:
        await self.call("dead_letters", self.command_bound, self.producer.dead_letters, 10)

    async def op_requeue(self) -> None:
        # Only the letters this operation is about (the unknown task's): requeueing
        # the letters of the other operations would run their tasks again on purpose.
        await self.call(
            "requeue",
            self.command_bound,
            functools.partial(self.producer.requeue_dead_letters, 1, task="f.ghost"),
        )

    async def op_schedule(self) -> None:
        name = self.token("sched")
        outcome, _ = await self.call(
            "schedule",
            self.command_bound,
            lambda: self.producer.schedule(
                "f.add", bus.every(86_400), args=("scheduled",), name=name
            ),
        )
        if outcome == "ok":
            self.schedule_names.append(name)

    async def op_unschedule(self) -> None:
        name = self.schedule_names.pop(0) if self.schedule_names else "absent"
        outcome, _ = await self.call(
            "unschedule", self.command_bound, self.producer.unschedule, name
        )
        if outcome == "ok":
            self.unscheduled.add(name)

    async def op_schedules(self) -> None:
        await self.call("schedules", self.command_bound, self.producer.schedules)

    # ------------------------------------------------------------------ phases

    async def prepare(self) -> None:
        """What some operations need before the loops start: a finished task, a dead
        letter."""
        h = await self.add.kiq("first")
        self.accepted.append((h, "first"))
        await h.wait_result(timeout=10)
        self.finished.append(h)
        await self.ghost.kiq("ghost")
        self.runs["ghost"] = 0
        while not await self.producer.dead_letters(1):  # noqa: ASYNC110 (watching Redis)
            await trio.sleep(0.05)

    async def _loop(self, op: str, stop: trio.Event) -> None:
        fn = getattr(self, f"op_{op}")
        while not stop.is_set():
            await fn()
            await trio.sleep(0.5 if op == "requeue" else PACE)

    async def _all_ok_since(self, t: float) -> None:
        while True:
            if all(self._ok_since.get(op, -math.inf) >= t for op in OPS):
                return
            await self._ok_changed.wait()

    async def run_outage(
        self,
        cut: Callable[[], Awaitable[None]],
        restore: Callable[[], Awaitable[None]],
        length: float,
        *,
        waiting: bool = True,
    ) -> dict[str, float]:
        """Run every operation in a loop through one outage; returns, per operation,
        the seconds from Redis answering again to its first success."""
        await self.prepare()
        # A task running through the outage, and a wait for its result: it must
        # return (not raise) once the task ends after the outage.
        g = "gated-wait"
        gh = await self.gated.kiq(g)
        self.accepted.append((gh, g))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            if waiting:
                await self.started[g].wait()

                async def wait_through() -> None:
                    await self.call("wait_through", 600.0, gh.wait_result, 600.0)

                nursery.start_soon(wait_through)
            for op in OPS:
                nursery.start_soon(self._loop, op, stop)
            with trio.fail_after(30):
                await self._all_ok_since(-math.inf)
            # Work in flight at the cut: tasks being read, run, stored and acked.
            burst = [self.token("burst") for _ in range(40)]
            outcome, handles = await self.call(
                "burst", self.send_bound, self.slow.kiq_many, [(t,) for t in burst]
            )
            assert outcome == "ok", self.calls[-1]
            self.accepted += list(zip(handles, burst, strict=True))

            async def wait_burst() -> None:
                await self.call("wait_burst", 600.0, lambda: bus.gather(*handles, timeout=600.0))

            nursery.start_soon(wait_burst)
            t_cut = trio.current_time()
            await cut()
            self.cut_at = t_cut
            await trio.sleep(length)  # the outage's length is what is tested
            await restore()
            t_back = trio.current_time()
            self.back_at = t_back
            self._ok_since = {}
            bound = max(self.send_bound, self.command_bound) + HANG + RECOVERY
            with trio.move_on_after(bound):
                await self._all_ok_since(t_back)
            recovered = {op: self._ok_since.get(op, math.inf) - t_back for op in OPS}
            self.gates[g].set()
            stop.set()
        return recovered

    async def settle(self, timeout: float = 30.0) -> None:
        """Let every accepted task end (gates open, but for the cancelled tasks') and
        collect the results; a task without a result within ``timeout`` is reported by
        :meth:`run_problems`."""
        shut = {t for _, t in self.cancelled}
        for token, gate in list(self.gates.items()):
            if token not in shut:
                gate.set()

        async def one(handle: bus.TaskHandle[Any], token: str) -> None:
            outcome, result = await self.call("settle", timeout, handle.wait_result, timeout)
            if outcome == "ok":
                self.results[token] = result

        async with trio.open_nursery() as nursery:
            for handle, token in self.accepted + self.maybe_cancelled:
                nursery.start_soon(one, handle, token)

    # ------------------------------------------------------------------ checks

    def problems(self, recovered: dict[str, float] | None = None) -> list[str]:
        out: list[str] = []
        for c in self.calls:
            if c.outcome in ("leak", "hang"):
                out.append(f"{c.outcome}: {c}")
            elif c.outcome == "result_timeout" and c.op == "settle":
                pass  # reported by run_problems, with the task
            elif c.outcome == "result_timeout" and not c.op.startswith("wait_timeout"):
                out.append(f"ResultTimeout from a wait that should return: {c}")
            elif c.op == "wait_timeout" and c.outcome == "ok":
                out.append(f"wait for a task never sent returned: {c}")
            elif c.op == "wait_timeout" and c.outcome == "unavailable":
                out.append(f"wait_result raised instead of waiting through: {c}")
            elif c.op == "wait_timeout" and abs(c.took - c.bound) > SLACK:
                out.append(f"ResultTimeout not at its timeout: {c}")
            elif c.outcome == "unavailable" and c.op in (
                "wait_burst",
                "run",
                "retry",
                "delayed",
                "unique",
                "rate_limited",
                "wait_through",
                "settle",
            ):
                out.append(f"a wait for a result raised instead of waiting through: {c}")
            elif c.took > c.bound + SLACK:
                out.append(f"over its bound: {c}")
            elif c.outcome == "unavailable" and c.took < c.bound - SLACK:
                out.append(f"gave up before its bound: {c}")
        if recovered is not None:
            for op, t in recovered.items():
                # wait_timeout's calls last its timeout whatever happens: no figure.
                if t > RECOVERY and op != "wait_timeout":
                    out.append(
                        f"not working again {RECOVERY:g}s after Redis answered: {op} "
                        f"({'never' if math.isinf(t) else f'{t:.2f}s'})"
                    )
        return out

    def run_problems(self) -> list[str]:
        """Nothing accepted lost, nothing finished run twice, cancels honoured."""
        out = []
        for handle, token in self.accepted:
            result = self.results.get(token)
            if result is None:
                out.append(
                    f"accepted task {token} ({handle.task_id}) has no result, "
                    f"ran {self.runs[token]} times"
                )
            elif self.runs[token] != 1 or result.return_value != token:
                out.append(
                    f"accepted task {token} ({handle.task_id}) ran {self.runs[token]} "
                    f"times, result {result.status.value} {result.return_value!r}"
                )
        for handle, token in self.maybe_cancelled:
            result = self.results.get(token)
            cancelled = result is not None and result.status is bus.TaskStatus.CANCELLED
            if result is None or self.runs[token] != (0 if cancelled else 1):
                status = result.status.value if result else "no result"
                out.append(
                    f"task {token} ({handle.task_id}), its cancel failed: {status}, "
                    f"ran {self.runs[token]} times"
                )
        for token in self.maybe:
            if self.runs[token] > 1:
                out.append(f"task {token} (send failed) ran {self.runs[token]} times")
        return out

    async def schedule_problems(self) -> list[str]:
        """Every schedule added is listed, every one removed is not."""
        outcome, infos = await self.call("schedules.check", 10, self.producer.schedules)
        if outcome != "ok":
            return [f"schedules() after the outage: {self.calls[-1]}"]
        listed = {info.spec.name for info in infos}
        lost = [n for n in self.schedule_names if n not in listed]
        out = [f"schedule {n} was added and is lost" for n in lost]
        out += [f"schedule {n} was removed and is back" for n in self.unscheduled & listed]
        return out

    async def cancel_problems(self) -> list[str]:
        out = []
        for h, _ in self.cancelled:
            outcome, r = await self.call("cancel.check", 10, h.wait_result, 10)
            if outcome != "ok" or r.status is not bus.TaskStatus.CANCELLED:
                out.append(f"cancelled task {h.task_id}: {outcome} {getattr(r, 'status', '')}")
        return out


def summary(calls: list[Call]) -> str:
    """Per operation: calls, outcomes, longest time."""
    by: dict[str, list[Call]] = defaultdict(list)
    for c in calls:
        by[c.op].append(c)
    lines = []
    for op, cs in sorted(by.items()):
        outcomes = Counter(c.outcome for c in cs)
        longest = max(c.took for c in cs)
        lines.append(f"  {op:22} {dict(outcomes)} longest {longest:.2f}s")
    return "\n".join(lines)
