"""Smoke test for the Jaeger test harness: a span sent over OTLP/gRPC comes back from the query API."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.jaeger import running_jaeger, span_tags, spans_of

pytestmark = pytest.mark.slow


def test_span_exported_over_otlp_grpc_is_returned_by_jaeger_query_api() -> None:
    """A span exported with the OTel SDK's OTLP gRPC exporter is stored by a real Jaeger and its
    query API returns it under the service name, with its operation name and attribute intact."""
    service = f"routesvc-smoke-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex

    with running_jaeger() as jaeger:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=jaeger.otlp_endpoint, insecure=True)))
        try:
            with provider.get_tracer("tests.jaeger_smoke").start_as_current_span("smoke-span") as span:
                span.set_attribute("routesvc.smoke_marker", marker)
                span.set_attribute("routesvc.cost_usd", 0.0125)
        finally:
            provider.shutdown()

        traces = jaeger.traces(service, timeout=20)

    spans = spans_of(traces)
    assert len(traces) == 1
    assert [s["operationName"] for s in spans] == ["smoke-span"]
    assert spans[0]["serviceName"] == service
    tags = span_tags(spans[0])
    assert tags["routesvc.smoke_marker"] == marker
    assert tags["routesvc.cost_usd"] == pytest.approx(0.0125)
    assert jaeger.process.returncode is not None, "jaeger process must be stopped after the block"
