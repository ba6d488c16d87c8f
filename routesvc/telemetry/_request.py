"""Per-RPC instrumentation: ``RequestTelemetry``, the hooks routing code calls, and the client span of
each upstream attempt."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from routesvc.catalog import ModelSpec
from routesvc.config import Settings
from routesvc.cost import cost_of_usage, estimated_cost, format_usd, interrupted_usage
from routesvc.errors import ProviderError, ProviderStalled, ProviderTimedOut, RouteSvcError
from routesvc.models import (
    ChatRequest,
    FinishReason,
    Heartbeat,
    Image,
    InputReported,
    Mode,
    ProviderEvent,
    ProviderFinish,
    RouteDecision,
    RoutingRequest,
    TextDelta,
    ToolCall,
    Usage,
)
from routesvc.providers.base import ProviderCall, close_stream
from routesvc.stats import FeedbackOutcome, LateCharge, RequestOutcome

if TYPE_CHECKING:
    from routesvc.telemetry._setup import Telemetry

_PROPAGATOR = TraceContextTextMapPropagator()
_GEN_AI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}
# Where the SDKs send calls when the provider names no base URL.
_SDK_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
# OTel's gRPC conventions: a server span is an error only for these codes (not for a caller's
# bad request, cancellation or a missing credential).
_SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

log = structlog.get_logger("routesvc.telemetry")


@dataclass
class _AttemptRecord:
    model: str
    cost: Decimal
    usage: Usage | None  # None unless the attempt answered (what the caller saw of it was its)
    estimated: bool
    purpose: str = "answer"
    billed: Usage = field(default_factory=Usage)  # what it is charged for, answered or not


@dataclass
class RequestTelemetry:
    """The instrumentation state of one RPC: its spans and the request's totals."""

    telemetry: Telemetry
    span: trace.Span
    method: str
    full_method: str = ""  # "routesvc.v1.RouterService/Complete"
    # The configuration the RPC is served under (its router's, once routing starts; before that
    # the latest): its providers' names and addresses, and the baseline model its costs are
    # compared with, at that configuration's prices, whatever a reload swaps in meanwhile.
    settings: Settings | None = None
    started: float = field(default_factory=time.monotonic)
    routing_span: trace.Span | None = None
    routing_started: float = 0.0
    tenant: str = ""
    decision: RouteDecision | None = None
    attempts: list[_AttemptRecord] = field(default_factory=list)
    escalations: int = 0
    fallbacks: int = 0
    cascade_released: bool | None = None
    cascade_score: float | None = None
    # The model and usage of the completion the caller got (``record_answer``): a cascade may
    # release an answer in hand after a later model's attempt (an empty answer, a failure).
    answer: tuple[str, Usage] | None = None
    first_chunk_at: float | None = None
    code: str = "OK"
    operator_failure: bool = False  # failed for a reason only the operator can end
    # Its routing ended (decided or refused): a classifier call it made that ends later (left when
    # its deadline cut the wait) is not in its totals, as not in its decision (``close_routing``).
    routing_closed: bool = False
    # What such calls were charged before ``close`` (for GetStats, not its span or rpc_finished).
    late_cost: Decimal = Decimal(0)
    closed: bool = False

    @property
    def cost(self) -> Decimal:
        """What every upstream attempt of this request cost, estimated ones included."""
        return sum((attempt.cost for attempt in self.attempts), Decimal(0))

    @property
    def usage(self) -> Usage:
        """The tokens every upstream attempt of this request is charged for, as its ``cost``."""
        return Usage(
            input_tokens=sum(attempt.billed.input_tokens for attempt in self.attempts),
            output_tokens=sum(attempt.billed.output_tokens for attempt in self.attempts),
        )

    @property
    def served_under(self) -> Settings:
        """The configuration the RPC is served under."""
        return self.settings or self.telemetry.settings

    @property
    def answered(self) -> tuple[str, Usage] | None:
        """The model that answered the caller and its answer's usage: the completion's
        (``record_answer``), else the last measured answer attempt's (a call that failed after
        text was sent), else None."""
        if self.answer is not None:
            return self.answer
        for attempt in reversed(self.attempts):
            if attempt.usage is not None and attempt.purpose == "answer":
                return attempt.model, attempt.usage
        return None

    @property
    def baseline_cost(self) -> Decimal:
        """The answering attempt's usage (``answered``) priced on the baseline model."""
        answered = self.answered
        if answered is None:
            return Decimal(0)
        return cost_of_usage(baseline_model(self.served_under), answered[1])

    def event_span(self) -> trace.Span:
        """Where fallback and escalation events go: the routing span, else the server span."""
        return self.routing_span or self.span

    def finish(self, code_name: str, code_value: int) -> None:
        """Record the RPC's gRPC status on the server span."""
        self.code = code_name
        conventions = self.telemetry.config.rpc_conventions
        if "old" in conventions:
            self.span.set_attribute("rpc.grpc.status_code", code_value)
        if "stable" in conventions:
            self.span.set_attribute("rpc.response.status_code", code_name)
        if code_name in _SERVER_ERROR_CODES:
            self.span.set_status(Status(StatusCode.ERROR, code_name))
        if (code_name in _SERVER_ERROR_CODES or self.operator_failure) and "stable" in conventions:
            # Every error span names its code (an operator's failure keeps its reason as the description).
            self.span.set_attribute("error.type", code_name)

    def close(self) -> None:
        """End the routing span, put the totals on the server span, record metrics and stats."""
        duration = time.monotonic() - self.started
        telemetry = self.telemetry
        self.closed = True
        if self.routing_span is not None:
            self.routing_span.end()
        cost, baseline = self.cost, self.baseline_cost
        if self.method == "Complete":
            self.span.set_attributes(
                {
                    "routesvc.cost_usd": float(cost),
                    "routesvc.baseline_cost_usd": float(baseline),
                    "routesvc.attempts": len(self.attempts),
                    "routesvc.escalations": self.escalations,
                    "routesvc.fallbacks": self.fallbacks,
                }
            )
        elif self.attempts:
            # A Route that paid to decide (an LLM classifier's call): what that cost.
            self.span.set_attributes({"routesvc.cost_usd": float(cost), "routesvc.attempts": len(self.attempts)})
        if self.decision is not None:
            self.span.set_attribute("routesvc.decision_id", self.decision.decision_id)
            self.span.set_attribute("routesvc.selected_model", self.decision.model)
        # The stable RPC conventions' names: the method fully qualified, the status code's name.
        telemetry.instruments.rpc_duration.record(
            duration,
            {"rpc.system.name": "grpc", "rpc.method": self.full_method, "rpc.response.status_code": self.code},
        )
        if self.decision is None:
            return
        decision = self.decision
        labels = {
            "routesvc.selected_model": decision.model,
            "routesvc.strategy": decision.strategy,
            "rpc.method": self.full_method,  # as rpc.server.call.duration names it
        }
        telemetry.instruments.requests.add(1, labels)
        if self.method != "Complete":
            return
        answered = decision.model if self.answered is None else self.answered[0]
        if cost or baseline:
            model_label = {"routesvc.model": answered}
            telemetry.instruments.baseline_cost.add(float(baseline), model_label)
            telemetry.instruments.savings.add(float(baseline - cost), model_label)
        estimated_baseline = estimated_cost(baseline_model(self.served_under), decision, decision.mode)
        telemetry.stats.add(
            RequestOutcome(
                at=time.monotonic(),
                tenant=self.tenant,
                model=answered,
                selected_model=decision.model,
                strategy=decision.strategy,
                ok=self.code in ("OK", "CANCELLED"),  # a caller that gave up is not a failure
                cost_usd=cost + self.late_cost,  # as the ledger: a call it left, charged later, too
                baseline_cost_usd=baseline,
                estimated_cost_usd=decision.estimated_cost_usd,
                estimated_baseline_cost_usd=estimated_baseline,
                latency_seconds=duration,
                time_to_first_chunk_seconds=(
                    None if self.first_chunk_at is None else self.first_chunk_at - self.started
                ),
                escalations=self.escalations,
                fallbacks=self.fallbacks,
                cascade_released=self.cascade_released,
                cascade_score=self.cascade_score,
                baseline_model=self.served_under.telemetry.baseline_model,
            )
        )


_CURRENT: contextvars.ContextVar[RequestTelemetry | None] = contextvars.ContextVar("routesvc_request", default=None)


def current_request() -> RequestTelemetry | None:
    """The instrumentation of the RPC in progress, or None outside one."""
    return _CURRENT.get()


def baseline_model(settings: Settings) -> ModelSpec:
    """The model ``settings`` compare costs with (``telemetry.baseline_model``, resolved in their
    catalog), at their prices."""
    return settings.catalog.get(settings.telemetry.baseline_model)


def start_routing(request: RoutingRequest, settings: Settings | None = None) -> None:
    """Open the routing span of the RPC in progress (once; later calls keep the first); the RPC is
    served under ``settings`` (the deciding router's) from here on."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.tenant = request.context.tenant
    if settings is not None:
        rpc.settings = settings
    # An RPC that is not sampled (or not traced at all) gets no routing span: its attributes
    # would be dropped anyway, and building them is a good part of a Route's own time.
    if rpc.routing_span is None and rpc.span.is_recording():
        rpc.routing_started = time.monotonic()
        rpc.routing_span = rpc.telemetry.tracer.start_span(
            "route", context=trace.set_span_in_context(rpc.span), kind=SpanKind.INTERNAL
        )
        if request.context.tenant:
            rpc.routing_span.set_attribute("routesvc.tenant", request.context.tenant)


def close_routing() -> None:
    """The RPC in progress has its decision (or was refused one): a classifier call it made that
    ends after this (one its deadline cut its wait on) is charged to the ledger and the tenant's
    budget, and logged ``classifier_charged``, but not counted in its totals, as not in the decision."""
    rpc = _CURRENT.get()
    if rpc is not None:
        rpc.routing_closed = True


def record_late_charge(cost: Decimal) -> None:
    """A classifier call the RPC in progress made and left (``close_routing``) was charged
    ``cost``: GetStats counts it with a Complete's cost (folded in at ``close``, or after as a
    ``LateCharge``), as the ledger and the tenant's budget do; its span and rpc_finished do not."""
    rpc = _CURRENT.get()
    if rpc is None or rpc.method != "Complete":
        return
    if not rpc.closed:
        rpc.late_cost += cost
    elif rpc.decision is not None:
        answered = rpc.decision.model if rpc.answered is None else rpc.answered[0]
        rpc.telemetry.stats.add_late_charge(LateCharge(time.monotonic(), rpc.tenant, answered, cost))


def record_decision(decision: RouteDecision) -> None:
    """Put a decision on the routing span: model, strategy, rule, reasons, candidates, estimate."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.decision = decision
    span = rpc.routing_span or rpc.span
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "routesvc.decision_id": decision.decision_id,
            "routesvc.selected_model": decision.model,
            "routesvc.strategy": decision.strategy,
            "routesvc.rule": decision.rule,
            "routesvc.mode": decision.mode.value,
            "routesvc.task": decision.task,
            "routesvc.reasons": list(decision.reasons),
            "routesvc.candidates": [c.model for c in decision.candidates if c.eligible],
            "routesvc.excluded": [f"{c.model}: {c.excluded_reason}" for c in decision.candidates if not c.eligible],
            "routesvc.estimated_input_tokens": decision.estimated_input_tokens,
            "routesvc.estimated_output_tokens": decision.estimated_output_tokens,
            "routesvc.estimated_cost_usd": float(decision.estimated_cost_usd),
            "routesvc.baseline_model": rpc.served_under.telemetry.baseline_model,
        }
    )
    if rpc.routing_started:
        span.set_attribute("routesvc.decision_ms", round((time.monotonic() - rpc.routing_started) * 1000, 3))


def record_feedback(model: str, score: float, *, decision_id: str = "", tenant: str = "") -> None:
    """A feedback score in [0, 1] for a past decision, counted per model in ``GetStats``.

    Called by the RPC that receives feedback; the score also goes on that RPC's server span
    while it is open (a score recorded after its call ended, cancelled, is counted all the same).
    """
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.telemetry.stats.add_feedback(FeedbackOutcome(time.monotonic(), tenant, model, score, decision_id))
    if not rpc.span.is_recording():
        return
    rpc.span.set_attributes(
        {"routesvc.feedback.model": model, "routesvc.feedback.score": score, "routesvc.decision_id": decision_id}
    )


def record_first_chunk_sent() -> None:
    """The first text chunk went to the caller: the request's time to first token ends here.

    (A cascade buffers a cheap answer while scoring it, so a provider's first chunk is not it.)
    """
    rpc = _CURRENT.get()
    if rpc is not None and rpc.first_chunk_at is None:
        rpc.first_chunk_at = time.monotonic()
        rpc.span.set_attribute("routesvc.time_to_first_token_ms", round((rpc.first_chunk_at - rpc.started) * 1000, 3))


def record_operator_failure(reason: str) -> None:
    """The RPC fails for a reason only the operator can end (``RouteSvcError.operator_must_act``):
    its server span is an error, whatever its gRPC status."""
    rpc = _CURRENT.get()
    if rpc is not None:
        rpc.operator_failure = True
        rpc.span.set_status(Status(StatusCode.ERROR, reason))


def record_client_stalled() -> None:
    """The RPC's caller read nothing for ``client_write_timeout_seconds``, and the server ended
    the call (reason ``CLIENT_STALLED``): a span event and a metric."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.span.add_event("routesvc.client_stalled")
    rpc.telemetry.instruments.client_stalls.add(1, {"rpc.method": rpc.full_method})


def record_stage_latency(stage: str, seconds: float) -> None:
    """How long one policy stage took on its own (classifier, embedding, scorer, rules, ...)."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    span = rpc.routing_span or rpc.span
    if span.is_recording():
        span.set_attribute(f"routesvc.stage.{stage}_ms", round(seconds * 1000, 3))
    rpc.telemetry.instruments.stage_duration.record(seconds, {"routesvc.stage": stage})


def record_fallback(from_model: str, to_model: str, reason: str) -> None:
    """A fallback from ``from_model`` to ``to_model`` after a failure: a span event, not an error.

    ``reason`` is a stable error reason (for example ``PROVIDER_UNAVAILABLE``), never content.
    """
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.fallbacks += 1
    rpc.event_span().add_event(
        "routesvc.fallback",
        {"routesvc.from_model": from_model, "routesvc.to_model": to_model, "routesvc.reason": reason},
    )
    rpc.telemetry.instruments.fallbacks.add(
        1, {"routesvc.from_model": from_model, "routesvc.to_model": to_model, "routesvc.reason": reason}
    )


def record_retry(model: str, reason: str, delay_seconds: float) -> None:
    """A retry on ``model`` after a failure of stable ``reason`` starts, after waiting
    ``delay_seconds`` (the backoff, or the provider's longer wait): a span event, not an error.
    Recorded as the retry starts, so a retry refused after its wait is no event."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.event_span().add_event(
        "routesvc.retry",
        {"routesvc.model": model, "routesvc.reason": reason, "routesvc.retry_delay_seconds": delay_seconds},
    )


def record_escalation(from_model: str, to_model: str, reason: str, score: float | None = None) -> None:
    """An escalation from a cheaper to a stronger model (a cascade whose answer scored too low).

    ``reason`` says why in a few words (for example ``score below threshold``), never content;
    ``score`` is the quality score that triggered it, when there is one.
    """
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.escalations += 1
    attributes: dict[str, str | float] = {
        "routesvc.from_model": from_model,
        "routesvc.to_model": to_model,
        "routesvc.reason": reason,
    }
    if score is not None:
        attributes["routesvc.score"] = score
    rpc.event_span().add_event("routesvc.escalation", attributes)
    rpc.telemetry.instruments.escalations.add(1, {"routesvc.from_model": from_model, "routesvc.to_model": to_model})


def record_answer(model: str, usage: Usage) -> None:
    """The completion the caller gets: ``model`` answered it, with ``usage`` (GetStats and the
    savings metrics credit it, not a later attempt a cascade gave up)."""
    rpc = _CURRENT.get()
    if rpc is not None:
        rpc.answer = (model, usage)


def record_cascade(released: bool, score: float | None = None) -> None:
    """A cascade's verdict on the cheap answer: released to the caller or not, and its score."""
    rpc = _CURRENT.get()
    if rpc is None:
        return
    rpc.cascade_released = released
    rpc.cascade_score = score
    span = rpc.event_span()
    span.set_attribute("routesvc.cascade.released", released)
    if score is not None:
        span.set_attribute("routesvc.cascade.score", score)


class _Streaming(Protocol):
    def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]: ...


# The GenAI output message's finish reasons where ours are spelt otherwise.
_OUTPUT_FINISH_REASONS = {FinishReason.TOOL_CALLS: "tool_call"}


def _parts(text: str, calls: Sequence[ToolCall] = (), call_id: str = "") -> list[dict[str, object]]:
    """A message's parts as the GenAI conventions write them: a tool result, text, tool calls."""
    if call_id:
        return [{"type": "tool_call_response", "id": call_id, "response": text}]
    parts: list[dict[str, object]] = [{"type": "text", "content": text}] if text or not calls else []
    parts += [{"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments_json} for c in calls]
    return parts


def _content_part(part: str | Image) -> dict[str, object]:
    """A user turn's text or image as the GenAI conventions write it, an image never with its
    bytes (a ``blob`` without ``content``) nor its URL's query (signed URLs carry credentials)."""
    if isinstance(part, str):
        return {"type": "text", "content": part}
    if part.url:
        url = urlsplit(part.url)
        # Credentials ride in a signed URL's query and in a URL's user:password@.
        uri = url._replace(netloc=url.netloc.rpartition("@")[2], query="", fragment="").geturl()
        return {"type": "uri", "modality": "image", "mime_type": part.media_type, "uri": uri}
    return {"type": "blob", "modality": "image", "mime_type": part.media_type, "size_bytes": len(part.data)}


# Captured messages are span attributes, exported in batches: one attribute holds at most this
# many characters of text (the latest messages first), so a 4 MiB prompt cannot make a span, or
# the export batch it rides in, too large for a collector.
CAPTURE_MAX_CHARS = 32_768


def gen_ai_labels(settings: Settings, model: ModelSpec) -> dict[str, str]:
    """The GenAI attributes of every call to ``model``, on its span and its metrics: the operation,
    ``gen_ai.provider.name`` (the well-known name of its provider's kind in ``settings``, else the
    configured provider name) and the model."""
    provider_settings = settings.providers.get(model.provider)
    kind = provider_settings.kind if provider_settings is not None else ""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _GEN_AI_PROVIDERS.get(kind, model.provider),
        "gen_ai.request.model": model.provider_model,
    }


def record_usage(
    telemetry: Telemetry, labels: dict[str, str], model_id: str, usage: Usage | None, cost: Decimal
) -> None:
    """One upstream call's tokens (``usage``; None when unknown, which the conventions say not to
    report) and cost in the metrics; ``labels`` are its GenAI labels with the response model."""
    instruments = telemetry.instruments
    if usage is not None:
        instruments.token_usage.record(usage.input_tokens, {**labels, "gen_ai.token.type": "input"})
        instruments.token_usage.record(usage.output_tokens, {**labels, "gen_ai.token.type": "output"})
    instruments.cost.add(float(cost), {"routesvc.model": model_id})


def _bounded_json(messages: list[dict[str, Any]]) -> str:
    """``messages`` as JSON, their texts (contents, tool results, call arguments) cut to
    ``CAPTURE_MAX_CHARS`` in all, from the last message back, each cut text saying so."""
    left = CAPTURE_MAX_CHARS
    for message in reversed(messages):
        for part in message["parts"]:
            for key in ("content", "response", "arguments"):
                value = part.get(key)
                if isinstance(value, str):
                    kept = value[: max(left, 0)]
                    left -= len(kept)
                    if len(kept) < len(value):
                        part[key] = f"{kept}[... {len(value) - len(kept)} characters not captured]"
    return json.dumps(messages)


def _messages_json(chat: ChatRequest) -> str:
    return _bounded_json(
        [
            {
                "role": m.role.value,
                "parts": [_content_part(p) for p in m.parts]
                if m.parts
                else _parts(m.content, m.tool_calls, m.tool_call_id),
            }
            for m in chat.messages
        ]
    )


async def observed_stream(
    provider: _Streaming, model: ModelSpec, call: ProviderCall, mode: Mode = Mode.REALTIME, *, purpose: str = "answer"
) -> AsyncIterator[ProviderEvent]:
    """``provider.stream(call)`` inside a ``chat {model}`` client span of the RPC in progress.

    ``purpose`` is ``answer`` for calls whose answer may reach the caller, or for example
    ``judge`` for a cascade's scoring call: every call's cost counts, only answers set the
    baseline and the answering model.

    The span carries the GenAI attributes, time to first chunk, usage and cost; the call goes
    upstream with a ``traceparent`` naming this span. Outside an RPC it is the plain stream.
    """
    rpc = _CURRENT.get()
    if rpc is None:
        async for event in provider.stream(call):
            yield event
        return
    telemetry = rpc.telemetry
    settings = rpc.served_under
    metric_labels = gen_ai_labels(settings, model)
    provider_settings = settings.providers.get(model.provider)
    attributes: dict[str, Any] = {
        **metric_labels,
        "gen_ai.request.max_tokens": call.max_output_tokens,
        "routesvc.model": model.id,
        "routesvc.attempt": len(rpc.attempts) + 1,
        "routesvc.purpose": purpose,
    }
    if call.temperature is not None:
        attributes["gen_ai.request.temperature"] = call.temperature
    if call.stop:
        attributes["gen_ai.request.stop_sequences"] = list(call.stop)
    if call.response_format is not None:
        attributes["gen_ai.output.type"] = "json"
    if provider_settings is not None:
        # No base URL: the SDK's own (only an OpenAI or Anthropic provider may leave it out).
        url = urlsplit(provider_settings.base_url or _SDK_BASE_URLS.get(provider_settings.kind, ""))
        if url.hostname:
            attributes["server.address"] = url.hostname
            attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
    parent = trace.set_span_in_context(rpc.routing_span or rpc.span)
    span = telemetry.tracer.start_span(f"chat {model.provider_model}", context=parent, kind=SpanKind.CLIENT)
    span.set_attributes(attributes)
    chat = call.as_chat()
    if telemetry.capture_content:
        span.set_attribute("gen_ai.input.messages", _messages_json(chat))
    headers = dict(call.headers)
    headers.pop("traceparent", None)
    headers.pop("tracestate", None)
    _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span, Context()))
    started = time.monotonic()
    first_chunk: float | None = None
    texts: list[str] = []
    # What every chunk carried, in order: answer text, reasoning, tool-call pieces (an interrupted
    # attempt's output is estimated from them joined, as the ledger does).
    produced: list[str] = []
    finish: ProviderFinish | None = None
    reported: Usage | None = None  # the input the provider said it bills, before any output
    error_type = ""
    stopped = False  # the router's stream timers or the call's deadline ended it
    stream = provider.stream(replace(call, headers=MappingProxyType(headers)))
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                if first_chunk is None:
                    first_chunk = time.monotonic()
                    span.set_attribute("routesvc.time_to_first_chunk_ms", round((first_chunk - started) * 1000, 3))
                    telemetry.instruments.time_to_first_chunk.record(first_chunk - started, metric_labels)
                texts.append(event.text)
                produced.append(event.text)
            elif isinstance(event, Heartbeat):
                produced.append(event.text)
            elif isinstance(event, InputReported):
                reported = event.usage
            else:
                finish = event
            yield event
    except ProviderError as error:
        error_type = error.reason
        stopped = isinstance(error, ProviderStalled | ProviderTimedOut)
        span.set_status(Status(StatusCode.ERROR, error.reason))
        if error.status is not None:
            span.set_attribute("http.response.status_code", error.status)
        raise
    except RouteSvcError as error:
        error_type = error.reason
        span.set_status(Status(StatusCode.ERROR, error.reason))
        raise
    except BaseException as error:
        # Cancelled by the caller, timed out by the router, or closed early: not our failure.
        error_type = "_OTHER" if isinstance(error, Exception) else "cancelled"
        raise
    finally:
        # Closing the provider's generator closes the upstream HTTP response.
        try:
            await close_stream(stream)
        finally:
            _end_attempt(
                rpc,
                span,
                model,
                mode,
                chat,
                finish,
                reported,
                texts,
                produced,
                error_type,
                stopped,
                call.sent.is_set(),
                started,
                metric_labels,
                purpose,
            )


def _end_attempt(
    rpc: RequestTelemetry,
    span: trace.Span,
    model: ModelSpec,
    mode: Mode,
    chat: ChatRequest,
    finish: ProviderFinish | None,
    reported: Usage | None,
    texts: list[str],
    produced: list[str],
    error_type: str,
    stopped: bool,
    sent: bool,
    started: float,
    metric_labels: dict[str, str],
    purpose: str,
) -> None:
    telemetry = rpc.telemetry
    duration = time.monotonic() - started
    # As in the ledger: an attempt the provider ended with an error before any output is charged
    # nothing, and so is one ended from our side before its request went out; one ended from our
    # side once the provider had it (a cancellation, the router's stream timers, the call's
    # deadline), or cut after output, an estimate.
    ended_by_us = (error_type in ("cancelled", "_OTHER") or stopped) and sent
    interrupted = finish is None and (bool(produced) or ended_by_us)
    estimated = interrupted or (finish is not None and finish.estimated)
    if finish is not None:
        usage = finish.usage
        if finish.estimated:
            # The provider reported no usage: the adapter estimated it.
            span.set_attribute("routesvc.usage_estimated", True)
        span.set_attribute("gen_ai.response.model", finish.provider_model or model.provider_model)
        span.set_attribute("gen_ai.response.finish_reasons", [finish.finish_reason.value])
    elif interrupted:
        # Interrupted after the provider had the call: usage is estimated from what was sent
        # (what the provider reported of it, when it did) and received, and flagged.
        usage = interrupted_usage(model, chat, produced, reported)
        span.set_attribute("routesvc.usage_estimated", True)
    else:
        # Refused before any content (an error status or event): nothing to bill.
        usage = Usage()
    if finish is None:
        span.set_attribute("routesvc.outcome", error_type or "interrupted")
    cost = cost_of_usage(model, usage, mode)
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cached_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_input_tokens,
            "gen_ai.usage.cost.amount": float(cost),
            "gen_ai.usage.cost.currency": "USD",
            "routesvc.cost_usd": float(cost),
            "routesvc.chunks": len(texts),
        }
    )
    if error_type:
        span.set_attribute("error.type", error_type)
    calls = finish.tool_calls if finish is not None else ()
    if telemetry.capture_content and (texts or calls):
        output = {
            "role": "assistant",
            "parts": _parts("".join(texts), calls),
            "finish_reason": _OUTPUT_FINISH_REASONS.get(finish.finish_reason, finish.finish_reason.value)
            if finish is not None
            else "error",
        }
        span.set_attribute("gen_ai.output.messages", _bounded_json([output]))
    span.end()
    # An attempt cut after its text came counts as an answer too (its usage estimated): what the
    # caller saw of it is that model's, for the stats and the baseline.
    answered = finish is not None or (interrupted and bool(texts))
    if purpose != "classifier" or not rpc.routing_closed:
        rpc.attempts.append(_AttemptRecord(model.id, cost, usage if answered else None, estimated, purpose, usage))
    response_model = telemetry.response_model(model, finish.provider_model if finish else "")
    labels = {**metric_labels, "gen_ai.response.model": response_model}
    duration_labels = {**labels, "error.type": error_type} if error_type else labels
    telemetry.instruments.operation_duration.record(duration, duration_labels)
    # An attempt that ended before any output has no usage to report.
    record_usage(telemetry, labels, model.id, usage if finish is not None or interrupted else None, cost)
    log.debug(
        "provider_attempt_finished",
        model=model.id,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=format_usd(cost),
        estimated=estimated,
        error_type=error_type,
        duration_ms=round(duration * 1000, 3),
    )
