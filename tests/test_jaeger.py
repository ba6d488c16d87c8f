"""End to end in a real Jaeger: a Complete that escalates (a cascade) or falls back shows as one
trace, server span -> routing span -> two client spans, with GenAI attributes, the escalation or
fallback event, and per-span cost adding up to the total on the server span (issue 4's "done
when")."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from routesvc.client import RouterClient
from routesvc.server import Server
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat
from tests.jaeger import running_jaeger, span_tags, spans_of

pytestmark = pytest.mark.slow

TRACE_ID = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{TRACE_ID}-eee19b7ec3c1b174-01"


def _config(service: str, endpoint: str) -> dict[str, object]:
    config = default_config()
    routing = config["routing"]
    assert isinstance(routing, dict)
    routing["fallbacks"] = {"gpt-4o-mini": ["gpt-4o"]}
    # The first attempt is abandoned when its first chunk is late: usage is estimated and billed,
    # so both client spans carry a cost; then the fallback answers. 1 s, not 0.3: the fallback's
    # first chunk must come within it too, however loaded the machine (its first is 2 s late).
    config["reliability"] = {"retries_per_model": 0, "first_token_timeout_seconds": 1.0}
    config["telemetry"] = {"service_name": service, "tracing": {"exporter": "otlp", "otlp_endpoint": endpoint}}
    return config


def _by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named = {span["operationName"]: span for span in spans}
    assert len(named) == len(spans), [span["operationName"] for span in spans]
    return named


def _parent_id(span: dict[str, Any]) -> str | None:
    return next((ref["spanID"] for ref in span.get("references", []) if ref["refType"] == "CHILD_OF"), None)


class TestJaeger:
    async def test_an_escalating_complete_is_one_trace_with_costs_that_add_up(self, fake: FakeProvider) -> None:
        """A cascade whose cheap answer is a refusal (scored 0.1 locally, no judge call): Jaeger shows
        server -> route -> chat gpt-4o-mini and chat gpt-4o, the escalation event with its score,
        and the two attempts' costs summing to the server span's total and the completion's cost."""
        service = f"routesvc-e2e-{uuid.uuid4().hex[:8]}"
        fake.enqueue(
            Script(text="I'm sorry, but I can't help with that.", input_tokens=40, output_tokens=9), model="gpt-4o-mini"
        )
        fake.enqueue(Script(input_tokens=40, output_tokens=120), model="gpt-4o")
        config = default_config()
        config["telemetry"] = {"service_name": service, "tracing": {"exporter": "otlp"}}
        async with running_jaeger() as jaeger:
            environ = {**live_environ(fake), "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint}
            settings = settings_from(config, environ)
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                messages = [
                    m
                    async for m in client.complete(
                        user_chat("What is the capital of France?"),
                        pb.RoutingContext(cascade=True),
                        metadata={"traceparent": TRACEPARENT},
                    )
                ]
            traces = await jaeger.atraces(service, min_spans=4, timeout=30)

        assert [m.WhichOneof("event") for m in messages][:2] == ["decision", "escalation"]
        completion = messages[-1].completion
        assert completion.model == "gpt-4o"
        assert [trace["traceID"] for trace in traces] == [TRACE_ID]
        spans = _by_name(spans_of(traces))
        assert set(spans) == {"routesvc.v1.RouterService/Complete", "route", "chat gpt-4o-mini", "chat gpt-4o"}
        server_span, route = spans["routesvc.v1.RouterService/Complete"], spans["route"]
        cheap, strong = spans["chat gpt-4o-mini"], spans["chat gpt-4o"]
        assert _parent_id(route) == server_span["spanID"]
        assert _parent_id(cheap) == _parent_id(strong) == route["spanID"]
        assert cheap["startTime"] < strong["startTime"]
        (event,) = route["logs"]
        fields = {field["key"]: field["value"] for field in event["fields"]}
        assert fields["event"] == "routesvc.escalation"
        assert (fields["routesvc.from_model"], fields["routesvc.to_model"]) == ("gpt-4o-mini", "gpt-4o")
        assert fields["routesvc.score"] == pytest.approx(0.1)
        server_tags, cheap_tags, strong_tags = span_tags(server_span), span_tags(cheap), span_tags(strong)
        assert (server_tags["routesvc.escalations"], server_tags["routesvc.attempts"]) == (1, 2)
        assert span_tags(route)["routesvc.cascade.released"] is False
        assert (cheap_tags["gen_ai.usage.output_tokens"], strong_tags["gen_ai.usage.output_tokens"]) == (9, 120)
        assert cheap_tags["routesvc.cost_usd"] + strong_tags["routesvc.cost_usd"] == pytest.approx(
            server_tags["routesvc.cost_usd"]
        )
        assert server_tags["routesvc.cost_usd"] == pytest.approx(float(Decimal(completion.cost_usd)))
        assert "error" not in cheap_tags

    async def test_a_fallback_complete_is_one_trace_with_costs_that_add_up(self, fake: FakeProvider) -> None:
        """Jaeger returns the server span (continuing the caller's trace), the route span under it and
        a chat span per attempt under that; GenAI attributes, the fallback event, and the cost of
        the two attempts summing to the server span's total."""
        service = f"routesvc-e2e-{uuid.uuid4().hex[:8]}"
        fake.enqueue(Script(first_chunk_delay=2.0), model="gpt-4o-mini")
        fake.enqueue(Script(input_tokens=900, output_tokens=60), model="gpt-4o")
        async with running_jaeger() as jaeger:
            settings = settings_from(_config(service, jaeger.otlp_endpoint), live_environ(fake))
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                messages = [
                    m async for m in client.complete(user_chat("Say hello"), metadata={"traceparent": TRACEPARENT})
                ]
            # Leaving the server flushed the exporter.
            traces = await jaeger.atraces(service, min_spans=4, timeout=30)

        completion = messages[-1].completion
        assert completion.model == "gpt-4o"
        assert [trace["traceID"] for trace in traces] == [TRACE_ID]
        spans = _by_name(spans_of(traces))
        assert set(spans) == {"routesvc.v1.RouterService/Complete", "route", "chat gpt-4o-mini", "chat gpt-4o"}
        server_span = spans["routesvc.v1.RouterService/Complete"]
        route, first, second = spans["route"], spans["chat gpt-4o-mini"], spans["chat gpt-4o"]
        assert _parent_id(server_span) == "eee19b7ec3c1b174"
        assert _parent_id(route) == server_span["spanID"]
        assert _parent_id(first) == _parent_id(second) == route["spanID"]

        server_tags, route_tags = span_tags(server_span), span_tags(route)
        first_tags, second_tags = span_tags(first), span_tags(second)
        assert (server_tags["span.kind"], first_tags["span.kind"]) == ("server", "client")
        assert (server_tags["rpc.method"], server_tags["rpc.grpc.status_code"]) == ("Complete", 0)
        assert route_tags["routesvc.selected_model"] == "gpt-4o-mini"
        assert route_tags["routesvc.strategy"] == "default"
        assert second_tags["gen_ai.operation.name"] == "chat"
        assert second_tags["gen_ai.provider.name"] == "openai"
        assert (second_tags["gen_ai.request.model"], second_tags["gen_ai.response.model"]) == ("gpt-4o", "gpt-4o")
        assert (second_tags["gen_ai.usage.input_tokens"], second_tags["gen_ai.usage.output_tokens"]) == (900, 60)
        assert second_tags["gen_ai.usage.cost.currency"] == "USD"
        # The stalled first attempt is charged its prompt's estimate, in its span as in the
        # caller's total: the two attempts add up to what the caller is told.
        assert first_tags["routesvc.usage_estimated"] is True
        assert first_tags["routesvc.cost_usd"] > 0
        assert first_tags["gen_ai.usage.cost.amount"] + second_tags["gen_ai.usage.cost.amount"] == pytest.approx(
            float(Decimal(completion.cost_usd))
        )

        (event,) = route["logs"]
        fields = {field["key"]: field["value"] for field in event["fields"]}
        assert fields == {
            "event": "routesvc.fallback",
            "routesvc.from_model": "gpt-4o-mini",
            "routesvc.to_model": "gpt-4o",
            "routesvc.reason": "PROVIDER_UNAVAILABLE",
        }
        assert (server_tags["routesvc.fallbacks"], server_tags["routesvc.attempts"]) == (1, 2)
        assert first_tags["routesvc.cost_usd"] + second_tags["routesvc.cost_usd"] == pytest.approx(
            server_tags["routesvc.cost_usd"]
        )
        assert "error" not in route_tags
        assert "gen_ai.input.messages" not in first_tags
