"""Periodic tasks: the scheduler actor, and where schedules and their state live.

A :class:`SchedulerActor` runs beside a worker (``bus worker``, the in-memory
broker's own worker). For each schedule it asks the pure :func:`bus._schedule.plan`
what is due, and fires a due tick through its broker's :class:`ScheduleBackend`,
which *claims* the tick first: with Redis, every scheduler of a deployment computes
the same ticks and tries to claim each one with ``SET NX`` in the same Lua call that
sends the task, so each tick is sent exactly once, however many schedulers run. The
task id of a tick is derived from the schedule's name and the tick
(:func:`bus._schedule.tick_task_id`), the same in every process.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._message import TaskMessage
from bus._schedule import ScheduleSpec, Trigger, plan, tick_task_id

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["ScheduleBackend", "ScheduleInfo", "SchedulerActor", "TickState", "WakeScheduler"]

log = get_logger("bus.scheduler")

#: How often a scheduler re-reads the schedules added at run time (seconds), at most.
RELOAD_INTERVAL = 2.0


@attrs.frozen
class TickState:
    """What is known of a schedule's ticks, shared by every scheduler."""

    last_tick: float | None = None
    """The latest tick fired or skipped (ticks up to it are handled)."""
    fires: int = 0
    """Ticks fired."""
    misses: int = 0
    """Ticks skipped: missed while no scheduler ran, later than the misfire grace."""
    last_fire: float | None = None
    """The latest tick fired."""


@attrs.frozen
class ScheduleInfo:
    """A schedule as ``broker.schedules()`` and ``bus schedules list`` show it."""

    spec: ScheduleSpec
    """The schedule."""
    source: str
    """``"task"`` (declared with ``schedule=``) or ``"runtime"`` (``broker.schedule``)."""
    next_fire: float
    """The next tick (Unix time)."""
    state: TickState
    """Fires, misses, the last fire."""


class ScheduleBackend(abc.ABC):
    """Where a broker keeps its run-time schedules and their tick state, and how a
    tick is claimed and sent in one step. Stateless adapters: the state lives in the
    broker actor (in memory) or in Redis."""

    @abc.abstractmethod
    async def runtime(self) -> dict[str, ScheduleSpec]:
        """The schedules added at run time, by name."""

    @abc.abstractmethod
    async def put(self, spec: ScheduleSpec) -> None:
        """Add or replace a run-time schedule."""

    @abc.abstractmethod
    async def drop(self, name: str) -> bool:
        """Remove a run-time schedule; True if there was one."""

    @abc.abstractmethod
    async def state(self, names: list[str]) -> dict[str, TickState]:
        """The tick state of these schedules."""

    @abc.abstractmethod
    async def fire(
        self, spec: ScheduleSpec, tick: float, message: TaskMessage, data: bytes, missed: int
    ) -> bool:
        """Claim ``tick`` and send ``message`` if the claim succeeded (and count the
        ``missed`` older ticks of its backlog); True if this call sent it (False:
        another scheduler did)."""

    @abc.abstractmethod
    async def miss(self, spec: ScheduleSpec, tick: float, missed: int) -> bool:
        """Claim ``tick`` as skipped and count ``missed`` ticks (once, whoever claims)."""


@attrs.frozen
class WakeScheduler:
    """Tell: the schedules changed; look again now."""


def tick_message(
    spec: ScheduleSpec, tick: float, queue: str | None = None, priority: int = 0
) -> TaskMessage:
    """The message one tick of ``spec`` sends (the same in every process), to ``queue``
    at ``priority`` (the task's own)."""
    labels = {**spec.labels, "schedule": spec.name, "tick": tick}
    return TaskMessage(
        task_id=tick_task_id(spec.name, tick),
        task_name=spec.task_name,
        args=spec.args,
        kwargs=spec.kwargs,
        labels=labels,
        queue=queue,
        priority=priority,
    )


def describe_trigger(trigger: Trigger) -> str:
    from bus._schedule import Cron

    if isinstance(trigger, Cron):
        return f"cron {trigger.expr!r}" + (f" {trigger.tz}" if trigger.tz else " UTC")
    return f"every {trigger.seconds:g}s"


class SchedulerActor(actors.Actor):
    """Fires the due ticks of its broker's schedules (see the module docstring).

    ``clock`` gives the time in Unix seconds (the in-memory broker's follows Trio's
    clock, so ``autojump_clock`` tests cost no real time).
    """

    def __init__(
        self, broker: Broker, backend: ScheduleBackend, clock: Callable[[], float]
    ) -> None:
        self.broker = broker
        self.backend = backend
        self.clock = clock
        self._last: dict[str, float | None] = {}
        self._wake = trio.Event()

    async def on_start(self) -> None:
        self.nursery.start_soon(self._run)

    @actors.handles(WakeScheduler, inline=True)
    def wake(self, msg: WakeScheduler) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                wait = await self._round()
            except Exception as exc:  # a lost connection: the next round tries again
                # Redis away is said once by its connection; anything else is worth a line.
                (log.debug if isinstance(exc, ConnectionError | TimeoutError) else log.warning)(
                    "scheduler.round_failed", error=repr(exc), actor=self.name
                )
                wait = 1.0
            with trio.move_on_after(max(0.0, wait)):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _round(self) -> float:
        specs = {**await self.backend.runtime(), **self.broker.static_schedules}
        if not specs:
            self._last.clear()
            return RELOAD_INTERVAL
        fresh = [name for name in specs if name not in self._last]
        if fresh:
            known = await self.backend.state(fresh)
            for name in fresh:
                state = known.get(name)
                self._last[name] = state.last_tick if state is not None else None
        for gone in set(self._last) - set(specs):
            del self._last[gone]
        now = self.clock()
        next_wake = now + RELOAD_INTERVAL
        for name, spec in specs.items():
            decision = plan(spec, self._last[name], now)
            for tick in decision.fire:
                await self._fire(spec, tick, decision.missed)
            missed = decision.missed and not decision.fire
            if missed and await self.backend.miss(spec, decision.last_tick, decision.missed):
                log.warning(
                    "schedule.missed",
                    schedule=name,
                    ticks=decision.missed,
                    actor=self.name,
                )
            self._last[name] = decision.last_tick
            if not math.isinf(decision.next_tick):
                next_wake = min(next_wake, decision.next_tick)
        return next_wake - self.clock()

    async def _fire(self, spec: ScheduleSpec, tick: float, missed: int) -> None:
        task = self.broker.tasks.get(spec.task_name)
        if task is None:
            log.error("schedule.unknown_task", schedule=spec.name, task_name=spec.task_name)
            return
        message = tick_message(spec, tick, task.queue, task.priority)
        data = self.broker.codec.encode_message(message)
        if await self.backend.fire(spec, tick, message, data, missed):
            log.info(
                "schedule.fired",
                schedule=spec.name,
                task_id=message.task_id,
                task_name=spec.task_name,
                tick=tick,
                actor=self.name,
            )


def make_spec(
    task_name: str,
    trigger: Trigger,
    *,
    name: str | None,
    args: Any,
    kwargs: Any,
    labels: Any,
    misfire_grace: float,
) -> ScheduleSpec:
    return ScheduleSpec(
        name=name or task_name,
        task_name=task_name,
        trigger=trigger,
        args=tuple(args or ()),
        kwargs=dict(kwargs or {}),
        labels=dict(labels or {}),
        misfire_grace=misfire_grace,
    )
