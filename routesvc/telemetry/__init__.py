"""Tracing, metrics and logging set-up, and the per-request instrumentation the router calls.

``Telemetry`` (one per server) owns the tracer and meter providers, their exporters, the
instruments and the ``RoutingStats`` window behind ``GetStats``. ``RequestTelemetry`` (one per
RPC, opened by the handler wrapper in ``rpc_tracing`` and kept in a context variable) owns the RPC's server
span, its routing span and the request's totals. The module-level functions act on the RPC in
progress and do nothing outside one, so the router, strategies and ``routesvc simulate`` call
them unconditionally::

    start_routing(request, settings)              the routing span opens, under the router's settings
    record_stage_latency(stage, seconds)          each policy stage's own time (policy)
    record_decision(decision)                     the decision's routesvc.* attributes (service)
    close_routing()                               later classifier calls not in the RPC's totals (router)
    record_late_charge(cost)                      such a call's cost, for GetStats (router)
    observed_stream(provider, model, call, mode, purpose="answer")
                                                  provider.stream(call) in a "chat {model}" client span
    record_fallback(from_model, to_model, reason) a span event and a metric (router)
    record_retry(model, reason, delay_seconds)    a span event as a retry on the same model starts (router)
    record_escalation(from_model, to_model, reason, score=None)   (cascade)
    record_cascade(released, score=None)          the cascade's verdict on a cheap answer
    record_answer(model, usage)                   the completion the caller gets (router)
    record_first_chunk_sent()                     time to first token ends (service)
    record_operator_failure(reason)               the server span is an error (service)
    record_client_stalled()                       the caller stopped reading: an event, a metric (service)
    record_feedback(model, score, decision_id="", tenant="")      from an RPC receiving feedback

The span tree of a Complete is ``RouterService/Complete`` (server) -> ``route`` (internal) ->
``chat {model}`` (client, one per upstream attempt). Prompt and completion text are recorded
only with ``telemetry.capture_content``; log events never carry them.
"""

from __future__ import annotations

from routesvc.telemetry._logging import add_trace_context, configure_logging
from routesvc.telemetry._request import (
    CAPTURE_MAX_CHARS,
    RequestTelemetry,
    close_routing,
    current_request,
    observed_stream,
    record_answer,
    record_cascade,
    record_client_stalled,
    record_decision,
    record_escalation,
    record_fallback,
    record_feedback,
    record_first_chunk_sent,
    record_late_charge,
    record_operator_failure,
    record_retry,
    record_stage_latency,
    start_routing,
)
from routesvc.telemetry._setup import Telemetry

__all__ = [
    "CAPTURE_MAX_CHARS",
    "RequestTelemetry",
    "Telemetry",
    "add_trace_context",
    "close_routing",
    "configure_logging",
    "current_request",
    "observed_stream",
    "record_answer",
    "record_cascade",
    "record_client_stalled",
    "record_decision",
    "record_escalation",
    "record_fallback",
    "record_feedback",
    "record_first_chunk_sent",
    "record_late_charge",
    "record_operator_failure",
    "record_retry",
    "record_stage_latency",
    "start_routing",
]
