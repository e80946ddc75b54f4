"""OpenTelemetryMiddleware with the SDK's in-memory exporter."""

from __future__ import annotations

import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id

import bus
from bus.tracing import OpenTelemetryMiddleware


def traced() -> tuple[bus.InMemoryBroker, TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = bus.InMemoryBroker().with_middlewares(
        OpenTelemetryMiddleware(tracer_provider=provider)
    )
    return broker, provider, exporter


async def test_one_trace_from_the_request_through_every_attempt() -> None:
    broker, provider, exporter = traced()
    tracer = provider.get_tracer("the-app")

    @broker.task(name="charge", retries=2, retry_backoff=0)
    async def charge(amount: int, ctx: bus.Context = bus.CONTEXT) -> int:
        with tracer.start_as_current_span("inside the task"):
            if ctx.attempt < 3:
                raise ConnectionError(f"attempt {ctx.attempt} fails")
        return amount

    with trio.fail_after(5):
        async with broker:
            with tracer.start_as_current_span("POST /pay"):
                handle = await charge.kiq(5)
            result = await handle.wait_result()
    assert result.return_value == 5
    assert result.labels["traceparent"].startswith("00-")

    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    (request,) = spans["POST /pay"]
    (send,) = spans["send charge"]
    runs = sorted(spans["run charge"], key=lambda s: s.attributes["bus.attempt"])  # type: ignore[index]
    inner = spans["inside the task"]
    assert len(runs) == 3 and len(inner) == 3
    every = [request, send, *runs, *inner]
    assert len({s.context.trace_id for s in every}) == 1  # one trace
    assert send.parent is not None and send.parent.span_id == request.context.span_id
    assert send.kind is SpanKind.PRODUCER
    for run in runs:  # each attempt is a child of the send
        assert run.parent is not None and run.parent.span_id == send.context.span_id
        assert run.kind is SpanKind.CONSUMER
        assert run.attributes is not None
        assert run.attributes["messaging.message.id"] == str(handle.task_id)
    assert {s.parent.span_id for s in inner if s.parent} == {r.context.span_id for r in runs}
    assert [r.status.status_code for r in runs] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [r.attributes.get("bus.retrying") for r in runs] == [True, True, None]  # type: ignore[union-attr]
    assert runs[0].events[0].name == "exception"
    assert format_span_id(send.context.span_id) in result.labels["traceparent"]


async def test_timeouts_rejections_and_unsent_messages_end_their_spans() -> None:
    broker, _, exporter = traced()

    @broker.task(name="slow", timeout=0.01)
    async def slow() -> None:
        await trio.sleep(10)

    @broker.task(name="one")
    async def one(x: int) -> int:
        return x

    with trio.fail_after(5):
        async with broker:
            timed_out = await (await slow.kiq()).wait_result()
            # Arguments that do not fit, sent past the sender's check: rejected.
            tid = await broker.kick(one.kicker().message())  # type: ignore[call-arg]
            await bus.TaskHandle(tid, broker).wait_result()
            mw = broker.middlewares[0]
            assert isinstance(mw, OpenTelemetryMiddleware)
            mw.pre_send(one.kicker().message(1))  # as if the broker refused it next
    assert timed_out.status is bus.TaskStatus.TIMEOUT
    by_name = {s.name: s for s in exporter.get_finished_spans() if s.name.startswith("run")}
    assert by_name["run slow"].status.status_code is StatusCode.ERROR
    assert by_name["run slow"].attributes["bus.status"] == "timeout"  # type: ignore[index]
    assert by_name["run one"].attributes["bus.status"] == "rejected"  # type: ignore[index]
    sends = [s for s in exporter.get_finished_spans() if s.name == "send one"]
    assert [s.status.status_code for s in sends] == [StatusCode.UNSET, StatusCode.ERROR]
