"""The ``Provider`` protocol: one way of calling a family of model APIs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Literal, Protocol

from routesvc.models import (
    ChatRequest,
    Message,
    ProviderEvent,
    ResponseFormat,
    ResponseFormatType,
    ToolChoice,
    ToolSpec,
)

# The HTTP transport under an SDK client: the SDKs' aiohttp one (``DefaultAioHttpClient``, wrapped
# by ``_aiohttp.keeping_buffered`` so a cut loses nothing; routesvc's default) or their own default,
# httpx. Same requests and headers; aiohttp costs less CPU per stream. docs/performance.md lists
# the differences.
HttpClientKind = Literal["aiohttp", "httpx"]


# Anthropic's vision limit: an image over this many pixels on either side is refused.
_ANTHROPIC_MAX_IMAGE_SIDE = 8000


# JSON Schema keywords Anthropic's structured outputs refuse (their grammar has no bounds, but
# for ``minItems`` 0 or 1), and every object there must close itself with
# ``additionalProperties: false``.
_ANTHROPIC_REFUSED_KEYWORDS = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
    }
)


def _schema_problem(
    schema: object, *, refused: frozenset[str], all_required: bool, min_items_at_most: int | None = None
) -> str:
    """What in ``schema`` a strict structured-output mode refuses, or "": a keyword of ``refused``,
    a ``minItems`` over ``min_items_at_most``, an object not closed by ``additionalProperties:
    false``, or (``all_required``) one whose ``required`` does not list every property. Only
    subschemas are read: property names, enums and defaults are data."""
    if not isinstance(schema, Mapping):
        return ""
    found = sorted(refused.intersection(schema))
    if found:
        return f"keyword {found[0]!r}"
    min_items = schema.get("minItems", 0)
    if min_items_at_most is not None and isinstance(min_items, int) and min_items > min_items_at_most:
        return f"minItems {min_items} (at most {min_items_at_most})"
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and schema.get("additionalProperties") is not False:
        return "an object without additionalProperties false"
    properties = schema.get("properties")
    if all_required and isinstance(properties, Mapping):
        required = schema.get("required")
        if not isinstance(required, list) or set(required) != set(properties):
            return "an object whose required does not list every property"
    children: list[object] = []
    for key in ("items", "not", "additionalProperties"):
        children.append(schema.get(key))
    for key in ("prefixItems", "anyOf", "allOf", "oneOf"):
        value = schema.get(key)
        children.extend(value if isinstance(value, list) else [])
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        value = schema.get(key)
        children.extend(value.values() if isinstance(value, Mapping) else [])
    return next(
        (
            problem
            for child in children
            if (
                problem := _schema_problem(
                    child, refused=refused, all_required=all_required, min_items_at_most=min_items_at_most
                )
            )
        ),
        "",
    )


def refusal(kind: str, chat: ChatRequest) -> str:
    """Why an API of ``kind`` (``providers.<name>.kind``) refuses ``chat`` as asked, or "" when it
    takes it: routing passes over its models, so the request goes to a model that can serve it
    instead of failing upstream (and counting against that model's breaker)."""
    if kind not in ("anthropic", "openai"):
        return ""
    if root := _non_object_root(chat):
        return f"provider kind {kind} takes only an object root ({root})"
    if kind == "anthropic":
        return _anthropic_refusal(chat)
    return _openai_refusal(chat)


def _non_object_root(chat: ChatRequest) -> str:
    """The request field whose JSON Schema root is not an object (a ``type`` set otherwise), or
    "": OpenAI and Anthropic take no other root for a tool's parameters or a structured answer
    (an ``openai_compatible`` server may: vLLM, llama.cpp and Ollama take an array or a string)."""
    for index, tool in enumerate(chat.tools):
        if tool.parameters.get("type", "object") != "object":
            return f"chat.tools[{index}].parameters_json"
    response_format = chat.response_format
    if response_format is not None and response_format.schema.get("type", "object") != "object":
        return "chat.response_format.schema_json"
    return ""


def _anthropic_refusal(chat: ChatRequest) -> str:
    if any(not sequence.strip() for sequence in chat.stop):
        return "provider kind anthropic refuses a stop sequence of whitespace only"
    response_format = chat.response_format
    if response_format is not None and response_format.type is ResponseFormatType.JSON_OBJECT:
        return "provider kind anthropic has no JSON object mode (it takes RESPONSE_FORMAT_TYPE_JSON_SCHEMA)"
    if response_format is not None and response_format.schema:
        problem = _schema_problem(
            response_format.schema, refused=_ANTHROPIC_REFUSED_KEYWORDS, all_required=False, min_items_at_most=1
        )
        if problem:
            return f"provider kind anthropic's structured outputs refuse this schema ({problem})"
    images = (image for message in chat.messages for image in message.images)
    if any(max(image.width, image.height) > _ANTHROPIC_MAX_IMAGE_SIDE for image in images):
        return f"provider kind anthropic refuses images over {_ANTHROPIC_MAX_IMAGE_SIDE} px on a side"
    return ""


def _openai_refusal(chat: ChatRequest) -> str:
    response_format = chat.response_format
    if response_format is None:
        return ""
    if response_format.type is ResponseFormatType.JSON_OBJECT and not any(
        "json" in message.content.lower() for message in chat.messages
    ):
        return "provider kind openai takes a JSON object format only when a message asks for JSON (says 'json')"
    if response_format.strict and response_format.schema:
        problem = _schema_problem(response_format.schema, refused=frozenset(), all_required=True)
        if problem:
            return f"provider kind openai's strict mode refuses this schema ({problem})"
    return ""


class ModelRequest(Protocol):
    """What one request to a model says, streamed (``ProviderCall``) or in a provider batch
    (``providers.batch.BatchItem``): the adapters build both kinds of body from it."""

    @property
    def model(self) -> str: ...
    @property
    def provider_model(self) -> str: ...
    @property
    def messages(self) -> tuple[Message, ...]: ...
    @property
    def max_output_tokens(self) -> int: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def tools(self) -> tuple[ToolSpec, ...]: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def tool_choice(self) -> ToolChoice | None: ...
    @property
    def parallel_tool_calls(self) -> bool | None: ...
    @property
    def response_format(self) -> ResponseFormat | None: ...


class RequestSent:
    """Whether a call's request went out to the provider: set by the adapter's HTTP transport once
    the request's headers are written on an open connection (the body follows at once). A call
    cut before then (its connection never made, or a wait for a pooled one) never reached the
    provider, which therefore bills nothing for it."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent = False

    def set(self) -> None:
        """The request went out."""
        self._sent = True

    def is_set(self) -> bool:
        """Whether the request went out."""
        return self._sent


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One call to a model: what to send, and how long it may take.

    ``timeout`` is the seconds left before the caller's deadline (None: no deadline); the
    adapter bounds the whole HTTP exchange by it. ``headers`` are extra HTTP headers to send
    upstream (for example ``traceparent``); never the client's own credentials. ``sent`` is set
    once the request went out (``RequestSent``): what a call cut short is charged on.
    ``image_token_scale`` is the model's (``ModelSpec``): an input the provider does not report is
    estimated as the model bills it (``cost.billed_input_of_chat``).
    """

    model: str
    provider_model: str
    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int = 512
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    timeout: float | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sent: RequestSent = field(default_factory=RequestSent, compare=False, repr=False)
    image_token_scale: Decimal = Decimal(1)

    @property
    def texts(self) -> tuple[str, ...]:
        """Each message's text, in order: what an error code or a reported model name is checked
        against (``safe_code``, ``safe_model``) so that an echo of the prompt is never copied out."""
        return tuple(message.content for message in self.messages)

    def as_chat(self) -> ChatRequest:
        """What the call puts in the prompt, as a ``ChatRequest``: what its input is estimated
        from (``cost.billed_input_of_chat``) wherever the provider reports none."""
        return ChatRequest(messages=self.messages, tools=self.tools, response_format=self.response_format)


class Provider(Protocol):
    """A model API family (OpenAI, Anthropic, OpenAI-compatible).

    ``stream`` yields ``TextDelta``s in order and then exactly one ``ProviderFinish``; every SDK
    exception is translated to a ``routesvc.errors.ProviderError`` subclass inside the adapter.
    Closing the iterator early (``aclose``, or cancelling the task that iterates it) closes the
    upstream HTTP request. ``call.sent`` is set once the request went out.
    """

    @property
    def name(self) -> str:
        """The configured provider name, for example "openai"."""
        ...

    @property
    def base_url(self) -> str:
        """Where its calls go: the configured base URL, else the SDK's default, in one form for
        each server (no trailing slash, lower case, no default port: ``_http.server_url``).
        Another URL under the same name (a reload) is another server, whose answers may differ."""
        ...

    def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """Call the model and stream its answer."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


async def close_stream(stream: AsyncIterator[object]) -> None:
    """Close a provider's stream early, which closes its upstream HTTP response: ``aclose`` when it
    has one (a generator, as every adapter's and wrapper's stream is), else nothing to close."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class ProviderWrapper:
    """A provider seen through a wrapper that changes only its streams (``stream`` is the
    subclass's): its name and base URL are the provider's, and it has nothing of its own to close
    (the provider is closed by whoever opened it)."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    @property
    def name(self) -> str:
        """The provider's name."""
        return self._provider.name

    @property
    def base_url(self) -> str:
        """The provider's base URL."""
        return self._provider.base_url

    async def aclose(self) -> None:
        """Nothing of its own: the provider is closed by whoever opened it."""
