"""Plain frozen dataclasses of the routing domain: no protobuf, no SDK types."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Literal

# The request parameters a model may refuse (``ModelConfig.unsupported_parameters``); "prefill"
# is a conversation that ends in an assistant turn, for the model to continue (system messages
# after it aside: ``ChatRequest.is_prefill``).
RequestParameter = Literal["temperature", "stop", "tool_choice", "parallel_tool_calls", "prefill"]

# What a catalog model can take (``ModelConfig.capabilities``): a request with tools needs "tools",
# one with images "vision", one with a JSON response_format "json" (``Router``'s eligibility).
Capability = Literal["tools", "vision", "json"]

# The APIs a provider speaks (``ProviderConfig.kind``): each has its own image formula.
ProviderKind = Literal["openai", "anthropic", "openai_compatible"]


class Role(enum.Enum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Mode(enum.Enum):
    """How the chosen model is called."""

    REALTIME = "realtime"
    BATCH = "batch"


class FinishReason(enum.Enum):
    """Why the model stopped, normalised across providers."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


class CacheTtl(enum.Enum):
    """How long a provider keeps the prompt prefix that a cache breakpoint ends (Anthropic's
    ``cache_control.ttl``; OpenAI caches by itself and is sent nothing)."""

    FIVE_MINUTES = "5m"
    ONE_HOUR = "1h"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool that a model made: the provider's id for it, the tool's name, and the
    arguments as the JSON object text the model produced ("" means ``{}``)."""

    id: str
    name: str
    arguments_json: str = ""


class ImageDetail(enum.Enum):
    """How closely an OpenAI model looks at an image (OpenAI's ``detail``). Anthropic has no such
    parameter: its models see the image as it is."""

    AUTO = "auto"  # not set: nothing is sent, the model chooses (estimated as high)
    LOW = "low"  # a 512 x 512 version, at a flat 85 tokens
    HIGH = "high"  # 512-px tiles


@dataclass(frozen=True, slots=True)
class Image:
    """An image of a user turn: an https ``url`` the provider fetches, or the file's bytes in
    ``data`` (then ``media_type``, for example "image/png", says their format). ``width`` and
    ``height`` are what the file's header says (0 when unknown, as for a URL). ``data`` is left
    out of the repr, so that no log line can carry it."""

    media_type: str = ""
    url: str = ""
    data: bytes = field(default=b"", repr=False)
    width: int = 0
    height: int = 0
    detail: ImageDetail = ImageDetail.AUTO


@dataclass(frozen=True, slots=True)
class ImageEstimate:
    """A request's images in input tokens, under each provider kind's formula
    (``routesvc.images``): ``openai``'s, ``anthropic``'s, and for an ``openai_compatible``
    server, whose formula is unknown, ``larger``: the larger of the two, image by image."""

    openai: int = 0
    anthropic: int = 0
    larger: int = 0

    def __add__(self, other: ImageEstimate) -> ImageEstimate:
        """Both estimates' images together."""
        return ImageEstimate(self.openai + other.openai, self.anthropic + other.anthropic, self.larger + other.larger)

    def for_kind(self, kind: ProviderKind) -> int:
        """The tokens of the images on a model of a provider of ``kind``."""
        if kind == "openai":
            return self.openai
        if kind == "anthropic":
            return self.anthropic
        return self.larger


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation.

    An assistant turn may carry the ``tool_calls`` it made (its ``content`` may then be empty); a
    ``Role.TOOL`` turn is the result of the call of an earlier assistant turn named by ``tool_call_id``.
    A user turn with images has ``parts``: its texts and images in order; its ``content`` is then
    its texts alone, joined by newlines (what every reader of text, the classifier, the token
    counter or a judge, sees). A turn without images has no ``parts``.
    ``cache_breakpoint`` marks the end of a prompt prefix to cache (None: no breakpoint).
    ``tool_error`` says a ``Role.TOOL`` turn's call failed and ``content`` is its error.
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    parts: tuple[str | Image, ...] = ()
    cache_breakpoint: CacheTtl | None = None
    tool_error: bool = False

    @property
    def images(self) -> tuple[Image, ...]:
        """The turn's images, in order."""
        return tuple(part for part in self.parts if isinstance(part, Image))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is a JSON Schema object. ``cache_breakpoint``
    marks the end of a prompt prefix to cache after its definition (None: no breakpoint)."""

    name: str
    description: str = ""
    parameters: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    cache_breakpoint: CacheTtl | None = None


class ToolChoiceMode(enum.Enum):
    """What a model must do about the tools a request offers."""

    AUTO = "auto"  # the model decides
    NONE = "none"  # it calls no tool
    REQUIRED = "required"  # it calls at least one
    TOOL = "tool"  # it calls the tool ``ToolChoice.name``


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether, and which, tool the model must call; ``name`` only with ``ToolChoiceMode.TOOL``."""

    mode: ToolChoiceMode
    name: str = ""


class ResponseFormatType(enum.Enum):
    """The form a JSON answer must take (text needs no ``ResponseFormat``)."""

    JSON_OBJECT = "json_object"  # any JSON object (OpenAI's JSON mode)
    JSON_SCHEMA = "json_schema"  # a JSON object matching ``ResponseFormat.schema``


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The form a JSON answer must take; ``name``, ``schema`` and ``strict`` only with ``JSON_SCHEMA``."""

    type: ResponseFormatType
    name: str = ""
    schema: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What would be sent to a model."""

    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    # None: the provider's default (the model decides; it may make several calls in a turn).
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # None: text.
    response_format: ResponseFormat | None = None

    @property
    def uses_tools(self) -> bool:
        """Whether the request offers tools or carries tool calls or results in its turns."""
        return bool(self.tools) or any(m.tool_calls or m.role is Role.TOOL for m in self.messages)

    @property
    def uses_images(self) -> bool:
        """Whether any turn carries an image (only a model with the "vision" capability takes it)."""
        return any(m.images for m in self.messages)

    @property
    def parameters_set(self) -> tuple[RequestParameter, ...]:
        """The optional parameters this request sets, in ``RequestParameter``'s order."""
        given: tuple[tuple[RequestParameter, bool], ...] = (
            ("temperature", self.temperature is not None),
            ("stop", bool(self.stop)),
            ("tool_choice", self.tool_choice is not None),
            ("parallel_tool_calls", self.parallel_tool_calls is not None),
            ("prefill", self.is_prefill),
        )
        return tuple(name for name, is_set in given if is_set)

    @property
    def is_prefill(self) -> bool:
        """Whether the conversation ends in an assistant turn for the model to continue: its last
        turn other than system messages is an assistant turn (Anthropic takes the system messages
        out of the turns, so a system message after the assistant turn leaves it the last turn)."""
        turns = [message for message in self.messages if message.role is not Role.SYSTEM]
        return bool(turns) and turns[-1].role is Role.ASSISTANT

    @property
    def last_user_message(self) -> str:
        """The text of the last user message, or "" when there is none."""
        for message in reversed(self.messages):
            if message.role is Role.USER:
                return message.content
        return ""


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """What the router knows about a request besides its text."""

    tenant: str = ""
    user_tier: str = ""
    task_hint: str = ""
    realtime: bool = True
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_cost_usd: Decimal | None = None
    model: str = ""
    cascade: bool | None = None


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """A chat request with its routing context: the input of Route and Complete."""

    chat: ChatRequest
    context: RoutingContext = RoutingContext()


@dataclass(frozen=True, slots=True)
class AllowList:
    """The models a request's tenant may use: its ``tenants.NAME.allowed_models`` (``models`` None:
    every model). It binds every model the request reaches, the ones that decide or judge it
    included: an allow-list is often where a tenant's data may go."""

    tenant: str = ""
    models: frozenset[str] | None = None

    def refuses(self, model_id: str) -> str:
        """Why the tenant may not use ``model_id``, or "" when it may."""
        if self.models is None or model_id in self.models:
            return ""
        return f"not allowed for tenant {self.tenant!r}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A catalog model considered for a request."""

    model: str
    eligible: bool
    excluded_reason: str = ""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which model serves a request, why, and at what estimated cost."""

    decision_id: str
    model: str
    provider: str
    strategy: str
    rule: str
    reasons: tuple[str, ...]
    estimated_input_tokens: int
    estimated_output_tokens: int
    estimated_cost_usd: Decimal
    mode: Mode
    candidates: tuple[Candidate, ...]
    task: str = ""
    cascade_models: tuple[str, ...] = ()
    cascade_thresholds: tuple[float, ...] = ()
    cascade_scorer: str = ""
    # Provider calls made to decide (an LLM classifier's), already in the ledger and the budget.
    routing_attempts: tuple[AttemptSummary, ...] = ()
    # The decision's estimate is ``model``'s: ``estimated_input_tokens`` counts the images by the
    # formula of its provider's kind, and ``estimated_image_tokens`` is the part they make up
    # (before its ``image_token_scale``). ``image_estimate`` has them by every kind, for the
    # other models a request may reach (fallbacks, cascade steps): ``cost.estimated_cost``.
    estimated_image_tokens: int = 0
    image_estimate: ImageEstimate = ImageEstimate()

    @property
    def routing_cost_usd(self) -> Decimal:
        """What deciding cost: the sum of ``routing_attempts``."""
        return sum((attempt.cost_usd for attempt in self.routing_attempts), Decimal(0))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the provider reported it.

    ``input_tokens`` includes every input token: those read from the prompt cache
    (``cached_input_tokens``) and those written to it (``cache_write_input_tokens``, Anthropic's
    ``cache_creation_input_tokens``), of which ``cache_write_1h_input_tokens`` went to the 1-hour
    cache (the rest to the 5-minute one).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        """The two usages summed field by field (a request's attempts together)."""
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            cache_write_input_tokens=self.cache_write_input_tokens + other.cache_write_input_tokens,
            cache_write_1h_input_tokens=self.cache_write_1h_input_tokens + other.cache_write_1h_input_tokens,
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of an answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """An upstream chunk without answer text (reasoning, a piece of a tool call, the first half
    of a character held back): the model is alive. Never forwarded; ``text`` is what the chunk
    carried, counted only to estimate the output of an attempt that is cut short; ``reasoning``
    says the chunk was the model's reasoning (set by the adapters), the one kind that spends the
    output limit on something other than the answer."""

    text: str = ""
    reasoning: bool = False


@dataclass(frozen=True, slots=True)
class InputReported:
    """The input the provider says it bills for the call, told before any output (Anthropic's
    ``message_start``: the input, the cache reads and the cache writes). An attempt cut short
    after it is charged this input, and only its output is estimated. Never forwarded, and not a
    sign the model is answering (the first-chunk timer still runs)."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class ProviderFinish:
    """The end of a provider stream: usage, why it stopped, the model that answered, and the
    tool calls it made (assembled from the stream, in order). ``estimated`` is True when the
    provider reported no usage (or a malformed one) and the adapter estimated it."""

    usage: Usage
    finish_reason: FinishReason
    provider_model: str
    tool_calls: tuple[ToolCall, ...] = ()
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class QualityScore:
    """A scorer's verdict on one answer: ``score`` in [0, 1], who gave it, and why (never content)."""

    score: float
    scorer: str
    reason: str


class AttemptResult(enum.Enum):
    """How one upstream call of a request ended, as the caller sees it."""

    COMPLETED = "completed"  # answered, and the answer was sent
    ESCALATED = "escalated"  # answered, scored too low, not sent
    FAILED = "failed"  # failed before any text was sent
    JUDGE = "judge"  # a quality-judge call that scored an answer
    CLASSIFIER = "classifier"  # an LLM classifier call that labelled the request's task


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """A provider call made for a request besides its answer (a quality judge's, an LLM
    classifier's), to be charged to the request.

    ``estimated`` is True when its usage is estimated (it did not finish, or the provider
    reported none); ``finished`` when the provider answered it to the end; ``cancelled`` when the
    request was cancelled during it (with nothing to bill when its request had not gone out);
    ``refused`` when it failed with nothing to bill: the provider refused it before any output (an
    error status), or it was cut (not by a cancellation) before its request went out.
    """

    model: str
    usage: Usage
    estimated: bool = False
    refused: bool = False
    finished: bool = False
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class AttemptSummary:
    """One upstream call of a request: model, how it ended, usage and cost."""

    model: str
    result: AttemptResult
    usage: Usage
    cost_usd: Decimal


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of a successful Complete: who answered, usage and exact cost.

    ``usage`` is the answering attempt's; ``cost_usd`` and ``total_usage`` sum every attempt in
    ``attempts`` (failed, escalated, judge and classifier calls). ``quality`` is set when a cascade scored it.
    ``tool_calls`` are the answering model's.
    """

    model: str
    provider: str
    provider_model: str
    usage: Usage
    cost_usd: Decimal
    finish_reason: FinishReason
    attempts: tuple[AttemptSummary, ...] = ()
    total_usage: Usage | None = None
    quality: QualityScore | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Escalation:
    """A cascade step's answer scored below ``threshold``; ``to_model`` is called next.

    ``cost_usd`` and ``usage`` are the rejected attempt's (its judge call included in the cost).
    """

    from_model: str
    to_model: str
    quality: QualityScore
    threshold: float
    cost_usd: Decimal
    usage: Usage


class BatchState(enum.Enum):
    """Where a batch job is in its life."""

    QUEUED = "queued"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """Whether the job can change no more."""
        return self not in (BatchState.QUEUED, BatchState.SUBMITTED)


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A request sent through a provider's batch API. Times are Unix seconds."""

    batch_id: str
    tenant: str
    state: BatchState
    model: str
    provider: str
    estimated_cost_usd: Decimal
    created_at: float
    updated_at: float
    decision_id: str = ""
    # The decision's estimate of the request's input tokens as the model bills them (images at
    # its image_token_scale), charged when the provider's result reports none; None in jobs
    # stored before it was kept.
    estimated_input_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The answer of a succeeded batch job (its text and tool calls), with its cost at the batch price."""

    text: str
    usage: Usage
    cost_usd: Decimal
    finish_reason: FinishReason
    provider_model: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """A batch job with its result once it succeeded, or why it failed or expired."""

    job: BatchJob
    result: BatchResult | None = None
    error: str = ""


ProviderEvent = TextDelta | Heartbeat | InputReported | ProviderFinish
"""What a provider stream yields: text deltas (and a ``Heartbeat`` for every other chunk that
carries something, an ``InputReported`` when the provider tells its input first), then exactly
one ``ProviderFinish``."""

CompleteEvent = RouteDecision | TextDelta | Completion | Escalation | BatchJob
"""What Complete yields: the decision, then text deltas (an ``Escalation`` before each stronger
model's answer in a cascade) and one ``Completion``; or, in batch mode, one ``BatchJob``."""
