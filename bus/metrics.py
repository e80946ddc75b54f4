"""Prometheus metrics for the bus (install the ``trio-bus[metrics]`` extra).

``PrometheusMiddleware`` counts what producers send and what workers run, by task name
and queue, times each attempt and its wait in the queue, and exports the queue's depth,
delayed, pending and dead-letter counts as gauges read at scrape time from numbers a
small sampler actor refreshes inside the broker's lifetime. ``serve_metrics`` serves a
registry at ``/metrics`` over a tiny Trio HTTP server (what ``bus worker
--metrics-port`` runs). See docs/observability.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import trio

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "bus.metrics needs the metrics extra: pip install 'trio-bus[metrics]'"
    ) from exc

import actors
from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._observe import Samples, _queue_of, queue_readings, start_sampler

__all__ = ["SENT_AT", "PrometheusMiddleware", "serve_metrics"]

#: The label ``pre_send`` stamps on each message: the Unix time it was sent.
SENT_AT = "bus.sent_at"

#: Seconds: from a millisecond no-op to a long job.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

_LABELS = ("task_name", "queue")
_GAUGES = {
    # inspect() key: (metric name, help)
    "queued": ("queue_depth", "Messages waiting in the queue (not yet delivered)."),
    "delayed": ("queue_delayed", "Messages not due yet (delays, ETAs, retry backoff)."),
    "pending": ("queue_pending", "Messages delivered to a worker and not yet acknowledged."),
    "dead_letters": ("dead_letters", "Messages in the dead-letter store."),
    "live_workers": ("workers_live", "Workers that sent a heartbeat lately."),
}


def _reason_kind(reason: str) -> str:
    """A rejection reason as a label value of few distinct values."""
    if reason.startswith("undecodable"):
        return "undecodable"
    if reason.startswith("unknown task"):
        return "unknown_task"
    if reason.startswith("invalid option labels"):
        return "invalid_labels"
    if "signature" in reason:
        return "bad_arguments"
    return "other"


class _InspectCollector(Collector):
    """Gauges computed at scrape time from the sampler's latest reading: no I/O here,
    since prometheus-client scrapes synchronously."""

    def __init__(self, middleware: PrometheusMiddleware) -> None:
        self.mw = middleware

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic families: no name clash check at registration

    def collect(self) -> Iterator[Metric]:
        mw = self.mw
        ns = mw.namespace
        sample = mw.samples.latest
        restarts = GaugeMetricFamily(
            f"{ns}_worker_restarts",
            "Times `bus worker --processes` restarted this worker slot before this process.",
            labels=["slot"],
        )
        restarts.add_metric([os.environ.get("BUS_WORKER_SLOT", "0")], mw.process_restarts)
        yield restarts
        if sample is None:
            return
        queue = str(sample.info.get("queue") or _queue_of(None, mw.broker))
        readings = queue_readings(sample.info, queue)
        for key, (name, doc) in _GAUGES.items():
            g = GaugeMetricFamily(f"{ns}_{name}", doc, labels=["queue"])
            for q_name, info in readings:
                value = info.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    g.add_metric([q_name], float(value))
            if g.samples:
                yield g
        age = GaugeMetricFamily(
            f"{ns}_inspect_age_seconds",
            "Seconds since the queue gauges were read from the broker.",
            labels=["queue"],
        )
        age.add_metric([queue], max(0.0, time.time() - sample.time))
        yield age
        c = CounterMetricFamily(
            f"{ns}_actor_restarts",
            "Restarts of this process's actors after failures (reconnects, mostly).",
            labels=["actor"],
        )
        for path, n in sorted(sample.restarts.items()):
            c.add_metric([path], n)
        yield c


@attrs.define
class _Running:
    children: _Children
    count: int = 1


class PrometheusMiddleware(Middleware):
    """Counts, times and gauges for Prometheus.

    Counters (by ``task_name`` and ``queue``), each attempt ending in exactly one of the
    outcome counters, so ``started = succeeded + failed + retried + timed_out +
    cancelled`` (plus what a shutdown hands back unfinished, and deliveries rejected
    once started because their arguments do not fit the function):

    - ``bus_tasks_sent_total``: messages sent by this process (``post_send``);
    - ``bus_tasks_started_total``: attempts started by this process's workers;
    - ``bus_tasks_succeeded_total``, ``bus_tasks_cancelled_total``;
    - ``bus_tasks_retried_total``: failed or timed-out attempts that run again;
    - ``bus_tasks_failed_total``, ``bus_tasks_timed_out_total``: attempts that failed
      or timed out for good (no retry follows);
    - ``bus_tasks_rejected_total`` (also by ``reason``): deliveries refused unrun.

    Histograms: ``bus_task_duration_seconds`` (each attempt) and
    ``bus_task_queue_wait_seconds`` (first attempts: from the send, or the ETA when
    later, to the start; the send time is the task id's creation time, or the
    ``bus.sent_at`` label that ``pre_send`` stamps when the id was made earlier than
    the send, as with ``kicker().with_task_id(...)``).

    Gauges: ``bus_tasks_running``; read from ``broker.inspect()`` every
    ``inspect_interval`` seconds by a sampler actor: ``bus_queue_depth``,
    ``bus_queue_delayed``, ``bus_queue_pending``, ``bus_dead_letters``,
    ``bus_workers_live`` (by ``queue``), ``bus_inspect_age_seconds``; restarts:
    ``bus_actor_restarts_total`` (by actor path) and ``bus_worker_restarts`` (restarts
    of this ``--processes`` slot by ``bus worker``). ``inspect_interval=None`` turns
    the sampler off.

    Metrics go to ``registry`` (default: a registry of this middleware's own,
    ``self.registry``, with the process collector in it); pass
    ``prometheus_client.REGISTRY`` to use the global one.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "bus",
        inspect_interval: float | None = 5.0,
        stamp_sent_at: bool = True,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
    ) -> None:
        if inspect_interval is not None and not (
            inspect_interval > 0 and math.isfinite(inspect_interval)
        ):
            raise ValueError(f"inspect_interval must be > 0 seconds or None: {inspect_interval}")
        own = registry is None
        self.registry: CollectorRegistry = CollectorRegistry() if registry is None else registry
        self.namespace = namespace
        self.inspect_interval = inspect_interval
        self.stamp_sent_at = stamp_sent_at
        self.samples = Samples()
        #: Restarts of this worker slot before this process, as ``bus worker`` says.
        self.process_restarts = _int_env("BUS_WORKER_RESTARTS")
        self._sampler: actors.ActorRef | None = None
        self._running: dict[TaskID, _Running] = {}
        self._children: dict[tuple[str, Any], _Children] = {}
        reg = self.registry

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, (*_LABELS, *extra), namespace=namespace, registry=reg)

        self.sent = counter("tasks_sent", "Messages sent by this process.")
        self.started = counter("tasks_started", "Attempts started by this process's workers.")
        self.succeeded = counter("tasks_succeeded", "Attempts that succeeded.")
        self.failed = counter("tasks_failed", "Attempts that failed for good (no retry follows).")
        self.retried = counter("tasks_retried", "Failed or timed-out attempts that run again.")
        self.cancelled = counter("tasks_cancelled", "Attempts cancelled while they ran.")
        self.timed_out = counter("tasks_timed_out", "Attempts that timed out for good.")
        self.rejected = counter("tasks_rejected", "Deliveries refused without running.", "reason")
        self.running = Gauge(
            "tasks_running",
            "Attempts running now in this process.",
            _LABELS,
            namespace=namespace,
            registry=reg,
        )
        self.duration = Histogram(
            "task_duration_seconds",
            "Run time of each attempt.",
            _LABELS,
            namespace=namespace,
            registry=reg,
            buckets=tuple(duration_buckets),
        )
        self.queue_wait = Histogram(
            "task_queue_wait_seconds",
            "Time from the send (or the ETA) to the start of a first attempt.",
            _LABELS,
            namespace=namespace,
            registry=reg,
            buckets=tuple(wait_buckets),
        )
        #: Workflows (issue 19): started where they are sent, ended where the
        #: transition that ends them runs.
        self.workflows = {
            event: Counter(
                f"workflows_{event}",
                f"Workflows {event} (counted by the process that saw it happen).",
                namespace=namespace,
                registry=reg,
            )
            for event in ("started", "succeeded", "failed", "cancelled")
        }
        reg.register(_InspectCollector(self))
        if own:
            ProcessCollector(registry=reg)

    # --------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        if self.inspect_interval is not None:
            self._sampler = await start_sampler(
                self.broker, self.samples, self.inspect_interval, name="metrics-sampler"
            )

    async def shutdown(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None and sampler.is_alive:
            await sampler.stop()
        # Attempts a shutdown handed back unfinished (they run again elsewhere) no
        # longer run here.
        for r in self._running.values():
            r.children.running.dec(r.count)
        self._running.clear()

    # ----------------------------------------------------------------- hooks

    def _labels(self, message: TaskMessage | None) -> tuple[str, str]:
        name = "(unregistered)"
        if message is not None and message.task_name in self.broker.tasks:
            name = message.task_name
        return name, _queue_of(message, self.broker)

    def _of(self, message: TaskMessage) -> _Children:
        """The labelled children of one (task name, queue), made once: looking a child
        up through ``labels()`` costs more than the increment itself."""
        key = (message.task_name, message.queue)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(self, self._labels(message))
        return children

    def pre_send(self, message: TaskMessage) -> TaskMessage:
        # The task id says when it was made, which is when it was sent unless it was
        # made earlier (``with_task_id``): only then is the send time stamped.
        if not self.stamp_sent_at or SENT_AT in message.labels:
            return message
        now = time.time()
        if now - message.task_id.timestamp < _ID_IS_SEND_TIME:
            return message
        return attrs.evolve(message, labels={**message.labels, SENT_AT: now})

    def post_send(self, message: TaskMessage) -> None:
        self._of(message).sent.inc()

    def pre_execute(self, message: TaskMessage) -> TaskMessage:
        c = self._of(message)
        c.started.inc()
        c.running.inc()
        r = self._running.get(message.task_id)
        if r is None:
            self._running[message.task_id] = _Running(c)
        else:
            r.count += 1
        if message.attempt == 1:
            sent = message.labels.get(SENT_AT)
            if (
                not isinstance(sent, int | float)
                or isinstance(sent, bool)
                or not -1e12 < sent < 1e12  # a label anyone could write: any number
            ):
                sent = message.task_id.timestamp
            due = max(float(sent), message.eta or 0.0)
            c.queue_wait.observe(max(0.0, time.time() - due))
        return message

    def _not_running(self, task_id: TaskID) -> _Children | None:
        r = self._running.get(task_id)
        if r is None:
            return None
        r.count -= 1
        if r.count <= 0:
            del self._running[task_id]
        r.children.running.dec()
        return r.children

    def post_execute(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        c = self._not_running(message.task_id) or self._of(message)
        status = result.status
        if status is TaskStatus.SUCCESS:
            c.succeeded.inc()
        elif status is TaskStatus.CANCELLED:
            c.cancelled.inc()
        elif result.error is None:  # a failed attempt that will be retried
            c.retried.inc()
        elif status is TaskStatus.TIMEOUT:
            c.timed_out.inc()
        else:
            c.failed.inc()
        c.duration.observe(result.execution_time)

    def on_reject(self, message: TaskMessage | None, reason: str) -> None:
        if message is not None:
            self._not_running(message.task_id)
        self.rejected.labels(*self._labels(message), _reason_kind(reason)).inc()

    def on_workflow(self, event: str, workflow_id: TaskID) -> None:
        counter = self.workflows.get(event)
        if counter is not None:
            counter.inc()


#: Seconds: a task id made less long ago than this at send time was made for the send.
_ID_IS_SEND_TIME = 0.05


class _Children:
    """The labelled metrics of one (task name, queue)."""

    __slots__ = (
        "cancelled",
        "duration",
        "failed",
        "queue_wait",
        "retried",
        "running",
        "sent",
        "started",
        "succeeded",
        "timed_out",
    )

    def __init__(self, mw: PrometheusMiddleware, labels: tuple[str, str]) -> None:
        self.sent = mw.sent.labels(*labels)
        self.started = mw.started.labels(*labels)
        self.succeeded = mw.succeeded.labels(*labels)
        self.failed = mw.failed.labels(*labels)
        self.retried = mw.retried.labels(*labels)
        self.cancelled = mw.cancelled.labels(*labels)
        self.timed_out = mw.timed_out.labels(*labels)
        self.running = mw.running.labels(*labels)
        self.duration = mw.duration.labels(*labels)
        self.queue_wait = mw.queue_wait.labels(*labels)


def _int_env(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


# ------------------------------------------------------------------ exposition


_MAX_HEAD = 16 * 1024


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > _MAX_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return data or None
        data += chunk
    return data


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def _serve_one(registry: CollectorRegistry, stream: trio.abc.Stream) -> None:
    async with stream:
        with trio.move_on_after(10):
            head = await _read_head(stream)
            if head is None:
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            text = "text/plain; charset=utf-8"
            if method not in (b"GET", b"HEAD"):
                reply = _response("405 Method Not Allowed", b"GET only\n", text)
            elif path not in (b"/metrics", b"/"):
                reply = _response("404 Not Found", b"see /metrics\n", text)
            else:
                reply = _response(
                    "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST, method == b"HEAD"
                )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(reply)


async def serve_metrics(
    registry: CollectorRegistry,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    listeners: Sequence[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://host:port/metrics`` until cancelled (a small
    HTTP/1.1 server: one request per connection, 10 seconds each), or on
    ``listeners`` you opened. With ``nursery.start`` it returns the port it listens on
    (useful with ``port=0``)."""
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(registry, stream)

    await trio.serve_listeners(handler, list(listeners))


def _registry_of(middlewares: Iterable[Middleware]) -> CollectorRegistry | None:
    """The registry of the first :class:`PrometheusMiddleware` among ``middlewares``."""
    for mw in middlewares:
        if isinstance(mw, PrometheusMiddleware):
            return mw.registry
    return None
