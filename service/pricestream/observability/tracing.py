"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` environment variables.

Off (a no-op tracer) unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. Spans go out through the OTLP gRPC exporter
in batches; the service name comes from ``OTEL_SERVICE_NAME`` (default ``pricestream``) and
the sampler from ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``, both read by the SDK.
A W3C ``traceparent`` in incoming gRPC metadata continues the caller's trace.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "pricestream"
_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_requested() -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class Tracing:
    """Owns a tracer provider of its own (never the global one) and flushes it at close."""

    def __init__(self, pod: str) -> None:
        self._provider = None
        if not tracing_requested():
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "pricestream"),
                "service.instance.id": pod,
            }
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def close(self) -> None:
        if self._provider is not None:
            self._provider.force_flush(5_000)
            self._provider.shutdown()


def caller_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context a caller sent in ``traceparent``/``tracestate`` metadata."""
    carrier = {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in (metadata or ())
        if key in ("traceparent", "tracestate")
    }
    return _PROPAGATOR.extract(carrier)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the active span as hex, or None."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"
