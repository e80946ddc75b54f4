"""What the observability modules share: the queue of a message, and a sampler actor
that reads ``broker.inspect()`` periodically inside the broker's lifetime.

Metrics scrapes are synchronous and the dashboard's chart needs a history, so neither
can ask Redis at the moment it needs a number. A :class:`SamplerActor` runs in the
broker's actor system (``broker.system``: it stops with the broker at the latest),
asks the broker actor for its ``Inspect`` answer every ``interval`` seconds and keeps
the latest samples in a :class:`Samples` value that readers look at without waiting.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

import actors
from actors._log import get_logger
from bus._ids import TaskID
from bus._message import TaskMessage

if TYPE_CHECKING:
    from bus._broker import Broker

__all__ = ["Sample", "SamplerActor", "Samples", "actor_restarts", "start_sampler"]

log = get_logger("bus.observe")

_SUFFIX = re.compile(r"[- ][0-9a-f]{8}$")


def _queue_of(message: TaskMessage | None, broker: Broker) -> str:
    """The queue a message was sent to: its ``queue``, else the broker's default queue
    (``RedisBroker.queue``, ``InMemoryBroker.queue``), else ``"default"``."""
    if message is not None and message.queue:
        return message.queue
    q = getattr(broker, "queue", None)
    return q if isinstance(q, str) and q else "default"


def queue_readings(info: Mapping[str, Any], default: str) -> list[tuple[str, dict[str, Any]]]:
    """Per queue, the numbers of an ``inspect()`` answer: the default queue first, its
    entry under ``queues`` over the top-level numbers (which some brokers give for the
    whole broker), then every other named queue, by name."""
    named = info.get("queues")
    named = named if isinstance(named, Mapping) else {}
    top = {k: v for k, v in info.items() if k != "queues"}
    own = named.get(default)
    out = [(default, {**top, **own} if isinstance(own, Mapping) else top)]
    for name in sorted(named):
        q = named[name]
        if name != default and isinstance(q, Mapping):
            out.append((str(name), dict(q)))
    return out


@attrs.frozen
class Sample:
    """One reading: the Unix ``time``, the broker's ``inspect()`` answer, the restart
    counts of the actors of this process, and ``extra`` numbers a reader asked for."""

    time: float
    info: Mapping[str, Any]
    restarts: Mapping[str, int]
    extra: Mapping[str, Any] = attrs.field(factory=dict)


class Samples:
    """The latest samples (at most ``keep``), oldest first; ``error`` says why the last
    reading failed (``None`` when it worked). Written by the sampler actor only; each
    new sample replaces ``latest`` in one assignment, so a reader in another thread
    (a metrics server of prometheus-client's own) sees a whole sample or the one before."""

    def __init__(self, keep: int = 1) -> None:
        self.history: collections.deque[Sample] = collections.deque(maxlen=max(1, keep))
        self.latest: Sample | None = None
        self.error: str | None = None
        self._added = trio.Event()

    def add(self, sample: Sample) -> None:
        self.history.append(sample)
        self.latest = sample
        self.error = None
        self._added.set()
        self._added = trio.Event()

    async def next(self) -> Sample:
        """Wait for the next sample (from the Trio thread) and return it."""
        await self._added.wait()
        assert self.latest is not None
        return self.latest


def actor_restarts(system: actors.ActorSystem | None) -> dict[str, int]:
    """Restart counts of every running actor of ``system``, by path (``broker/reader``).
    Random name suffixes (``worker-1a2b3c4d``) are dropped, so paths are stable across
    processes; actors that share a path add up."""
    out: dict[str, int] = {}
    if system is None:
        return out

    def walk(refs: Mapping[str, actors.ActorRef], prefix: str) -> None:
        for name, ref in refs.items():
            path = prefix + _SUFFIX.sub("", name)
            out[path] = out.get(path, 0) + ref.restart_count
            walk(ref.children, path + "/")

    walk(system.actors, "")
    return out


class SamplerActor(actors.Actor):
    """Reads ``broker.inspect()`` (and ``extra()``, when given) every ``interval``
    seconds into ``samples``. A failed reading is kept as ``samples.error`` and logged
    once until readings work again; the actor goes on."""

    def __init__(
        self,
        broker: Broker,
        samples: Samples,
        interval: float,
        extra: Callable[[], Any] | None = None,
    ) -> None:
        self.broker = broker
        self.samples = samples
        self.interval = interval
        self.extra = extra

    async def on_start(self) -> None:
        self.nursery.start_soon(self._sample_forever)

    async def sample_once(self) -> None:
        broker, samples = self.broker, self.samples
        try:
            with trio.fail_after(max(5.0, 2 * self.interval)):
                info = await broker.inspect()
                extra = {}
                if self.extra is not None:
                    extra = self.extra()
                    if hasattr(extra, "__await__"):
                        extra = await extra
        except (Exception, trio.TooSlowError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if samples.error is None:
                log.warning("observe.inspect_failed", error=why, actor=self.name)
            samples.error = why
            return
        samples.add(Sample(time.time(), info, actor_restarts(broker.system), extra))

    async def _sample_forever(self) -> None:
        while True:
            await self.sample_once()
            await trio.sleep(self.interval)


async def start_sampler(
    broker: Broker,
    samples: Samples,
    interval: float,
    *,
    name: str,
    extra: Callable[[], Any] | None = None,
) -> actors.ActorRef:
    """Spawn a :class:`SamplerActor` in the running broker's actor system; stop it with
    ``await ref.stop()`` (it stops with the broker at the latest)."""
    if not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"a sampling interval must be a positive number, not {interval!r}")
    system = broker.system
    if system is None:
        raise RuntimeError("the broker is not running: start the sampler inside it")
    return await system.spawn(
        lambda: SamplerActor(broker, samples, interval, extra),
        name=f"{name}-{TaskID.new()[-8:]}",
        on_failure=actors.RESTART,
        max_restarts=None,
        backoff=actors.Backoff(initial=1.0, cap=30.0),
    )
