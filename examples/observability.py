"""Metrics, traces and worker activity of an embedded broker, printed.

The broker gets three middlewares: ``PrometheusMiddleware`` (counters, durations,
queue gauges), ``OpenTelemetryMiddleware`` (a span per send and per attempt, linked
through the message labels) and ``ActivityMiddleware`` (what runs now, recent
failures: what the dashboard shows). A web request is played by a span of our own,
``GET /thumbnail``: the send and every attempt of the task land in its trace.

Needs the extras ``trio-bus[metrics,tracing]`` and, to print spans, the OpenTelemetry
SDK (``opentelemetry-sdk``: an application picks its SDK and exporter; the bus needs
the API only). Run it with ``python examples/observability.py``.
"""

from __future__ import annotations

import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

import bus
from bus.activity import ActivityMiddleware, read_activity
from bus.metrics import PrometheusMiddleware
from bus.tracing import OpenTelemetryMiddleware

spans = InMemorySpanExporter()  # a real service exports to a collector instead
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
metrics = PrometheusMiddleware(inspect_interval=1.0)
broker = bus.InMemoryBroker(concurrency=8).with_middlewares(
    metrics, OpenTelemetryMiddleware(tracer_provider=provider), ActivityMiddleware()
)


@broker.task(name="images.thumbnail", retries=1, retry_backoff=0.01)
async def thumbnail(width: int, ctx: bus.Context = bus.CONTEXT) -> str:
    await trio.sleep(0.01)
    if ctx.attempt == 1:
        raise ConnectionError("the image store hung up")
    return f"thumbnail {width}px"


@broker.task(name="images.corrupt")
async def corrupt() -> None:
    raise ValueError("not an image")


async def main() -> dict[str, object]:
    tracer = provider.get_tracer("example.web")
    async with broker:
        with tracer.start_as_current_span("GET /thumbnail"):
            handle = await thumbnail.kiq(128)
        result = await handle.wait_result(timeout=5)
        await (await corrupt.kiq()).wait_result(timeout=5)
        activity = await read_activity(broker)
    print(result.return_value)

    text = generate_latest(metrics.registry).decode()
    lines = [x for x in text.splitlines() if x.startswith("bus_tasks_") and "_total{" in x]
    print("\n".join(lines))

    finished = spans.get_finished_spans()
    trace_ids = {s.context.trace_id for s in finished if "thumbnail" in s.name}
    for s in finished:
        print(f"span {s.name!r} ({s.kind.name.lower()}) in trace {s.context.trace_id:032x}")
    assert activity is not None
    for f in activity.failures:
        again = " (retrying)" if f["retrying"] else ""
        print(f"failure: {f['task_name']} #{f['attempt']}{again}: {f['error_type']}: {f['error']}")
    return {"result": result, "metrics": lines, "traces": trace_ids, "activity": activity}


if __name__ == "__main__":
    trio.run(main)
