"""Plain frozen dataclasses of the routing domain: no protobuf, no SDK types."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType


class Role(enum.Enum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


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


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: str
    description: str = ""
    parameters: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What would be sent to a model."""

    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int | None = None
    temperature: float | None = None

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


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """A chat request with its routing context: the input of Route and Complete."""

    chat: ChatRequest
    context: RoutingContext = RoutingContext()


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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the provider reported it; ``input_tokens`` includes cached ones."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of an answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ProviderFinish:
    """The end of a provider stream: usage, why it stopped, the model that answered."""

    usage: Usage
    finish_reason: FinishReason
    provider_model: str


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of a successful Complete: who answered, usage and exact cost."""

    model: str
    provider: str
    provider_model: str
    usage: Usage
    cost_usd: Decimal
    finish_reason: FinishReason


ProviderEvent = TextDelta | ProviderFinish
"""What a provider stream yields: text deltas, then exactly one ``ProviderFinish``."""

CompleteEvent = RouteDecision | TextDelta | Completion
"""What Complete yields: the decision, text deltas, then one ``Completion``."""
