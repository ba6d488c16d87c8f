"""Tracing, metrics and logging set-up, and the per-request instrumentation the router calls.

``Telemetry`` (one per server) owns the tracer and meter providers, their exporters, the
instruments and the ``RoutingStats`` window behind ``GetStats``. ``RequestTelemetry`` (one per
RPC, opened by the server interceptor and kept in a context variable) owns the RPC's server
span, its routing span and the request's totals. The module-level functions act on the RPC in
progress and do nothing outside one, so the router, strategies and ``routesvc simulate`` call
them unconditionally::

    start_routing(request)                       routing span opens (router.route)
    record_decision(decision)                    its routesvc.* attributes (service)
    observed_stream(provider, model, call, mode) one "chat {model}" client span per attempt
    record_fallback(from_model, to_model, reason)
    record_stage_latency(stage, seconds)         per policy stage, on the routing span
    record_feedback(model, score, decision_id=, tenant=)   from the RPC that receives feedback
    record_escalation(from_model, to_model, reason, score=None)
    record_cascade(released, score=None)

The span tree of a Complete is ``RouterService/Complete`` (server) -> ``route`` (internal) ->
``chat {model}`` (client, one per upstream attempt). Prompt and completion text are recorded
only with ``telemetry.capture_content``; log events never carry them.
"""

from __future__ import annotations

from routesvc.telemetry._logging import add_trace_context, configure_logging
from routesvc.telemetry._request import (
    RequestTelemetry,
    current_request,
    observed_stream,
    record_cascade,
    record_decision,
    record_escalation,
    record_fallback,
    record_feedback,
    record_first_chunk_sent,
    record_stage_latency,
    start_routing,
)
from routesvc.telemetry._setup import Telemetry

__all__ = [
    "RequestTelemetry",
    "Telemetry",
    "add_trace_context",
    "configure_logging",
    "current_request",
    "observed_stream",
    "record_cascade",
    "record_decision",
    "record_escalation",
    "record_fallback",
    "record_feedback",
    "record_first_chunk_sent",
    "record_stage_latency",
    "start_routing",
]
