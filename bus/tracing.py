"""OpenTelemetry traces for the bus (install the ``trio-bus[tracing]`` extra: the API
only; your application picks and configures the SDK and its exporters).

``OpenTelemetryMiddleware`` makes a span around each send (kind PRODUCER, a child of
whatever span is current in the sending task) and a span around each run of a task
(kind CONSUMER, one per attempt). The send span's context travels in the message's
labels as W3C trace context (``traceparent``, ``tracestate``), and retries are copies
of the message with its labels, so one trace holds the producer's request, the send and
every attempt. Inside a run, the run span is the current span: spans your task makes
are its children. See docs/observability.md.
"""

from __future__ import annotations

import collections
import contextvars
import importlib.metadata
from typing import Any

import attrs

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.propagate import get_global_textmap
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "bus.tracing needs the tracing extra: pip install 'trio-bus[tracing]'"
    ) from exc

from bus._ids import TaskID
from bus._message import TaskMessage, TaskResult, TaskStatus
from bus._middleware import Middleware
from bus._observe import _queue_of

__all__ = ["OpenTelemetryMiddleware"]

_SCOPE = "trio-bus"


@attrs.define
class _Run:
    span: Span
    token: contextvars.Token[Context]


class OpenTelemetryMiddleware(Middleware):
    """Spans around sends and runs, linked through the message labels.

    ``tracer_provider``: where spans go (default: the global provider, set by your
    application with ``opentelemetry.trace.set_tracer_provider``); ``propagator``: how
    the context is written into labels (default: the global one, W3C trace context
    and baggage unless your application set another).

    Span attributes: ``messaging.system`` (``trio-bus``), ``messaging.destination.name``
    (the queue), ``messaging.message.id`` (the task id), ``bus.task_name`` and
    ``bus.attempt``; a run span also gets ``bus.status`` and, for a failed attempt that
    will be retried, ``bus.retrying``. Failures and timeouts set the span's status to
    ERROR and record the exception.

    A send that fails after ``pre_send`` (the broker refused it) cannot be seen by a
    middleware: its span is ended, as an error, when ``max_open_sends`` sends are open
    or when the broker stops.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        max_open_sends: int = 10_000,
    ) -> None:
        self.tracer = trace.get_tracer(_SCOPE, _version(), tracer_provider=tracer_provider)
        self._propagator = propagator
        self.max_open_sends = max_open_sends
        self._sending: collections.OrderedDict[TaskID, Span] = collections.OrderedDict()
        self._runs: dict[TaskID, list[_Run]] = {}

    @property
    def propagator(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else get_global_textmap()

    def _attributes(self, message: TaskMessage) -> dict[str, Any]:
        return {
            "messaging.system": "trio-bus",
            "messaging.destination.name": _queue_of(message, self.broker),
            "messaging.message.id": str(message.task_id),
            "bus.task_name": message.task_name,
            "bus.attempt": message.attempt,
        }

    # ------------------------------------------------------------------ sending

    def pre_send(self, message: TaskMessage) -> TaskMessage:
        span = self.tracer.start_span(
            f"send {message.task_name}",
            kind=SpanKind.PRODUCER,
            attributes=self._attributes(message),
        )
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        sending = self._sending
        old = sending.pop(message.task_id, None)
        if old is not None:
            _end_unsent(old)
        sending[message.task_id] = span
        while len(sending) > self.max_open_sends:
            _end_unsent(sending.popitem(last=False)[1])
        if not carrier:
            return message
        return attrs.evolve(message, labels={**message.labels, **carrier})

    def post_send(self, message: TaskMessage) -> None:
        span = self._sending.pop(message.task_id, None)
        if span is not None:
            span.end()

    async def shutdown(self) -> None:
        while self._sending:
            _end_unsent(self._sending.popitem(last=False)[1])
        for runs in self._runs.values():
            for run in runs:
                run.span.set_attribute("bus.status", "interrupted")
                run.span.end()
        self._runs.clear()

    # ------------------------------------------------------------------ running

    def pre_execute(self, message: TaskMessage) -> TaskMessage:
        parent = self.propagator.extract(_text_labels(message.labels))
        span = self.tracer.start_span(
            f"run {message.task_name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=self._attributes(message),
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._runs.setdefault(message.task_id, []).append(_Run(span, token))
        return message

    def _take(self, task_id: TaskID) -> _Run | None:
        runs = self._runs.get(task_id)
        if not runs:
            return None
        run = runs.pop()
        if not runs:
            del self._runs[task_id]
        return run

    def _peek(self, task_id: TaskID) -> _Run | None:
        runs = self._runs.get(task_id)
        return runs[-1] if runs else None

    def _finish(self, run: _Run) -> None:
        run.span.end()
        otel_context.detach(run.token)

    def post_execute(self, message: TaskMessage, result: TaskResult[Any]) -> None:
        run = self._peek(message.task_id)
        if run is None:
            return
        span = run.span
        span.set_attribute("bus.status", result.status.value)
        if result.status in (TaskStatus.FAILURE, TaskStatus.TIMEOUT):
            span.set_attribute("bus.retrying", result.error is None)
            span.set_status(Status(StatusCode.ERROR, str(result.error or result.status.value)))
            return  # on_error comes next: it records the exception and ends the span
        self._take(message.task_id)
        self._finish(run)

    def on_error(self, message: TaskMessage, result: TaskResult[Any], error: BaseException) -> None:
        run = self._take(message.task_id)
        if run is None:
            return
        run.span.record_exception(error)
        self._finish(run)

    def on_reject(self, message: TaskMessage | None, reason: str) -> None:
        run = None if message is None else self._take(message.task_id)
        if run is None:
            return
        run.span.set_attribute("bus.status", "rejected")
        run.span.set_status(Status(StatusCode.ERROR, reason))
        self._finish(run)


def _version() -> str | None:
    try:
        return importlib.metadata.version("trio-bus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return None


def _text_labels(labels: Any) -> dict[str, str]:
    return {k: v for k, v in labels.items() if isinstance(v, str)}


def _end_unsent(span: Span) -> None:
    span.set_status(Status(StatusCode.ERROR, "the send was not confirmed"))
    span.end()
