"""Anthropic messages streaming via ``AsyncAnthropic``.

The request goes through the SDK's own client (``AsyncAnthropic.post``, its documented way to call
an endpoint with a body of your own): its headers, key, base URL, timeout, SSE decoding, ``event:
error`` detection and exceptions. Each event comes back as the decoded JSON object rather than a
pydantic model (about a fifth of the SDK's CPU per stream, measured side by side), read field by
field with a check of each field's type, so a malformed event cannot fail the request as our bug.

Every SDK exception is translated here, most specific first:

    anthropic.APIStatusError     by HTTP status (529 overloaded: ProviderUnavailable); an in-band
                                 ``event: error`` arrives as a status error on the 200 response and
                                 is mapped by its ``error.type`` instead
    anthropic.APITimeoutError    ProviderUnavailable
    anthropic.APIConnectionError ProviderUnavailable
    anthropic.APIError           invalid response: ProviderUnavailable
    httpx2 / aiohttp / decoding errors  ProviderUnavailable (this SDK does not wrap errors raised mid-stream)
    deadline (call.timeout)      ProviderTimedOut (a ProviderUnavailable)

Anthropic reports cache reads and cache writes apart from ``input_tokens``; our ``Usage`` counts
all three as input, cache reads as ``cached_input_tokens`` and cache writes as
``cache_write_input_tokens`` (``usage.cache_creation.ephemeral_1h_input_tokens`` of them as
``cache_write_1h_input_tokens``), each billed at its own price.

``request_params`` builds the request the Messages API and the Message Batches API share. It
adapts what Anthropic refuses but the other providers take: a ``temperature`` above 1 (Anthropic's
range is 0-1) is sent as 1; a final assistant turn (a prefill) is sent without trailing
whitespace; a history with tool calls in a request that offers no tools declares the called tools
(an object schema, ``tool_choice`` none), since Anthropic refuses ``tool_use`` blocks otherwise; a
JSON schema response format is ``output_config.format`` (structured outputs). A cache breakpoint
is ``cache_control`` on the marked turn's last block (a marked turn's text becomes one text block;
marked system messages make ``system`` a list of blocks) or on the marked tool's definition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Literal, TypeVar, cast

import anthropic
import structlog
from anthropic.types import (
    AssistantMessageParam,
    CacheControlEphemeralParam,
    ImageBlockParam,
    MessageParam,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
    UserMessageParam,
)

from routesvc.cost import billed_input_of_chat
from routesvc.errors import ProviderError, ProviderUnavailable
from routesvc.models import (
    CacheTtl,
    FinishReason,
    Heartbeat,
    Image,
    InputReported,
    Message,
    ProviderEvent,
    ProviderFinish,
    ResponseFormatType,
    Role,
    TextDelta,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
    Usage,
)
from routesvc.providers._adapter import SdkAdapter
from routesvc.providers._aiohttp import keeping_buffered
from routesvc.providers._event_size import DEFAULT_MAX_EVENT_BYTES, AnthropicEventEnds, EventBound, streaming
from routesvc.providers._http import (
    DRAIN_SECONDS,
    END_OF_STREAM,
    EstimatedUsageLog,
    aiohttp_connection_failure,
    count_field,
    describe,
    error_for_event,
    error_for_status,
    event_object,
    known_codes,
    next_event,
    object_field,
    quota_exhausted,
    request_options,
    safe_code,
    safe_model,
    text_field,
    tokens_asked,
    transport_error,
)
from routesvc.providers._sending import direct_to_loopback, sending, traced
from routesvc.providers._tool_calls import SentCallIds, ToolCallParts, anthropic_call_id
from routesvc.providers.base import HttpClientKind, ModelRequest, ProviderCall
from routesvc.tokens import count_text_tokens

DEFAULT_BASE_URL = "https://api.anthropic.com"

# What ``_next_within`` returns once the answer is whole and no event came in its short wait:
# the body is held open. It ends the answer OK, as the body's end without ``message_stop`` does
# then (``END_OF_STREAM``); before the answer is whole, that end fails it.
_HELD = object()

_FINISH_REASONS = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}
known_codes(_FINISH_REASONS)


# The Messages API's highest temperature (OpenAI's, which our API accepts, is 2).
MAX_TEMPERATURE = 1.0

# A tool that a request's history called, declared when the request offers no tools.
_ANY_INPUT: dict[str, object] = {"type": "object"}

# A content block of a turn this adapter builds.
_Block = TextBlockParam | ImageBlockParam | ToolUseBlockParam | ToolResultBlockParam

_C = TypeVar("_C", int, int | None)

log = structlog.get_logger(__name__)


class _DropRequestOptions(logging.Filter):
    """Drops the SDK's DEBUG record of each request's options: it holds the whole prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Request options"))


# Installed once on import, as the OpenAI SDK installs its own header filter: prompts must stay out
# of logs even when an operator turns on DEBUG for every logger.
logging.getLogger("anthropic._base_client").addFilter(_DropRequestOptions())


def map_stop_reason(reason: str | None, *, made_calls: bool) -> FinishReason:
    """The domain finish reason for an Anthropic ``stop_reason``, of an answer that ``made_calls``
    or not, by the OpenAI adapter's rule: such an answer that stopped of itself (``end_turn``,
    which Anthropic-compatible servers send after calls) is TOOL_CALLS, a cut stays what it is;
    ``tool_use`` without a call (its blocks named no tool) is OTHER, not TOOL_CALLS."""
    if reason is None:
        return FinishReason.UNSPECIFIED
    finish = _FINISH_REASONS.get(reason, FinishReason.OTHER)
    if finish is FinishReason.TOOL_CALLS and not made_calls:
        return FinishReason.OTHER
    return FinishReason.TOOL_CALLS if made_calls and finish is FinishReason.STOP else finish


def _cache_control(ttl: CacheTtl) -> CacheControlEphemeralParam:
    """The ``cache_control`` of a breakpoint: five minutes is Anthropic's default (sent without a
    ``ttl``), one hour is ``"ttl": "1h"`` (generally available: no beta header)."""
    if ttl is CacheTtl.ONE_HOUR:
        return CacheControlEphemeralParam(type="ephemeral", ttl="1h")
    return CacheControlEphemeralParam(type="ephemeral")


def _marked(blocks: list[_Block], ttl: CacheTtl | None) -> list[_Block]:
    """``blocks`` (one turn's, never empty) with the turn's cache breakpoint on the last one."""
    if ttl is not None:
        blocks[-1]["cache_control"] = _cache_control(ttl)
    return blocks


def _text(text: str, ttl: CacheTtl | None) -> str | list[TextBlockParam]:
    """A turn's text: a string, or one text block carrying the breakpoint when it has one (a
    string cannot carry ``cache_control``)."""
    if ttl is None:
        return text
    return [TextBlockParam(type="text", text=text, cache_control=_cache_control(ttl))]


def _system(messages: Iterable[Message]) -> str | list[TextBlockParam]:
    """The system messages: one string (joined by blank lines), or, when any of them marks a
    cache breakpoint, one text block each, the marked ones carrying ``cache_control``; Anthropic
    joins blocks with nothing between them, so each but the last ends in the same blank line (the
    model reads the same text either way)."""
    system = [message for message in messages if message.role is Role.SYSTEM]
    if not any(message.cache_breakpoint for message in system):
        return "\n\n".join(message.content for message in system)
    blocks: list[TextBlockParam] = []
    for index, message in enumerate(system):
        separator = "\n\n" if index < len(system) - 1 else ""
        block = TextBlockParam(type="text", text=message.content + separator)
        if message.cache_breakpoint is not None:
            block["cache_control"] = _cache_control(message.cache_breakpoint)
        blocks.append(block)
    return blocks


def _messages(messages: Iterable[Message]) -> list[MessageParam]:
    """The turns in Anthropic's shape: an assistant turn's tool calls as ``tool_use`` blocks after
    its text; tool results as ``tool_result`` blocks of one user turn (consecutive ones merged, a
    user text right after them joining that turn after them). A turn's cache breakpoint goes on
    its own last block, wherever the turn was merged."""
    result: list[MessageParam] = []
    ids = SentCallIds(anthropic_call_id)
    # The blocks of the user turn that tool results opened, while more may join it.
    results: list[_Block] | None = None
    for message in messages:
        ttl = message.cache_breakpoint
        if message.role is Role.TOOL:
            block = ToolResultBlockParam(
                type="tool_result", tool_use_id=ids.result(message.tool_call_id), content=message.content
            )
            if message.tool_error:
                block["is_error"] = True
            if results is None:
                results = _marked([block], ttl)
                result.append(UserMessageParam(role="user", content=results))
            else:
                results.extend(_marked([block], ttl))
            continue
        if message.role is Role.USER and results is not None:
            results.extend(_marked(_user_blocks(message), ttl))
        elif message.role is Role.ASSISTANT and message.tool_calls:
            blocks: list[_Block] = []
            if message.content.strip():
                blocks.append(TextBlockParam(type="text", text=message.content))
            blocks.extend(
                ToolUseBlockParam(
                    type="tool_use",
                    id=ids.call(call.id),
                    name=call.name,
                    input=json.loads(call.arguments_json or "{}"),
                )
                for call in message.tool_calls
            )
            result.append(AssistantMessageParam(role="assistant", content=_marked(blocks, ttl)))
        elif message.role is Role.ASSISTANT:
            result.append(AssistantMessageParam(role="assistant", content=_text(message.content, ttl)))
        elif message.role is Role.USER and message.parts:
            result.append(UserMessageParam(role="user", content=_marked(_user_blocks(message), ttl)))
        elif message.role is Role.USER:
            result.append(UserMessageParam(role="user", content=_text(message.content, ttl)))
        if message.role is not Role.SYSTEM:
            results = None
    if result and result[-1]["role"] == "assistant":
        # A final assistant turn is a prefill, which Anthropic refuses when it ends in whitespace.
        content = result[-1]["content"]
        if isinstance(content, str):
            result[-1] = AssistantMessageParam(role="assistant", content=content.rstrip())
        elif isinstance(content, list) and len(content) == 1 and content[0]["type"] == "text":
            content[0]["text"] = content[0]["text"].rstrip()
    return result


def _user_blocks(message: Message) -> list[_Block]:
    """A user turn's text and images as content blocks (a text-only turn is one text block)."""
    blocks: list[_Block] = []
    for part in message.parts or (message.content,):
        if isinstance(part, str):
            blocks.append(TextBlockParam(type="text", text=part))
        else:
            blocks.append(_image_block(part))
    return blocks


def _image_block(image: Image) -> ImageBlockParam:
    """An image block; ``image.detail`` is OpenAI's alone (Anthropic has no such parameter), so
    the image goes as it is."""
    if image.url:
        return ImageBlockParam(type="image", source={"type": "url", "url": image.url})
    data = base64.b64encode(image.data).decode("ascii")
    # wire.py takes only the four media types this literal names.
    media_type = cast(Literal["image/jpeg", "image/png", "image/gif", "image/webp"], image.media_type)
    return ImageBlockParam(type="image", source={"type": "base64", "media_type": media_type, "data": data})


def request_params(provider: str, request: ModelRequest) -> dict[str, object]:
    """The Messages API parameters of one request, streamed or in a batch, as ``messages.create``
    would send them (see the module docstring for what is adapted)."""
    messages, temperature = request.messages, request.temperature
    params: dict[str, object] = {
        "model": request.provider_model,
        "max_tokens": request.max_output_tokens,
        "messages": _messages(messages),
    }
    system = _system(messages)
    if system:
        params["system"] = system
    if request.tools:
        params["tools"] = _tools(request.tools)
        choice = _tool_choice(request.tool_choice, request.parallel_tool_calls)
        if choice is not None:
            params["tool_choice"] = choice
    else:
        called = _called_tools(messages)
        if called:
            params["tools"] = called
            params["tool_choice"] = {"type": "none"}
    if temperature is not None:
        if temperature > MAX_TEMPERATURE:
            log.debug(
                "temperature_clamped",
                provider=provider,
                model=request.model,
                requested=temperature,
                sent=MAX_TEMPERATURE,
            )
        params["temperature"] = min(temperature, MAX_TEMPERATURE)
    if request.stop:
        params["stop_sequences"] = list(request.stop)
    response_format = request.response_format
    if response_format is not None and response_format.type is ResponseFormatType.JSON_SCHEMA:
        # Structured outputs (GA, no beta header): the answer's text is JSON matching the schema,
        # always strictly. There is no name, and no JSON mode without a schema: routing never
        # sends a JSON_OBJECT request here (``providers.base.refusal``).
        params["output_config"] = {"format": {"type": "json_schema", "schema": dict(response_format.schema)}}
    return params


def _body(provider: str, call: ProviderCall) -> dict[str, object]:
    """The streamed messages request."""
    params = request_params(provider, call)
    return {**params, "stream": True}


_CHOICE_TYPES = {
    ToolChoiceMode.AUTO: "auto",
    ToolChoiceMode.NONE: "none",
    ToolChoiceMode.REQUIRED: "any",
    ToolChoiceMode.TOOL: "tool",
}


def _tool_choice(choice: ToolChoice | None, parallel_tool_calls: bool | None) -> dict[str, object] | None:
    """``tool_choice`` for a request that offers tools; None for Anthropic's default (auto, parallel
    calls allowed). No parallel calls is ``disable_parallel_tool_use`` inside it (with ``auto``
    when no mode is given); ``none`` has no such field, and makes no calls anyway."""
    mode = ToolChoiceMode.AUTO if choice is None else choice.mode
    if choice is None and parallel_tool_calls is not False:
        return None
    param: dict[str, object] = {"type": _CHOICE_TYPES[mode]}
    if mode is ToolChoiceMode.TOOL and choice is not None:
        param["name"] = choice.name
    if parallel_tool_calls is False and mode is not ToolChoiceMode.NONE:
        param["disable_parallel_tool_use"] = True
    return param


def _called_tools(messages: Iterable[Message]) -> list[ToolParam]:
    """Each tool the history's assistant turns called, once, in order, with any object as input."""
    names = dict.fromkeys(call.name for message in messages for call in message.tool_calls)
    return [ToolParam(name=name, input_schema=_ANY_INPUT) for name in names]


def _tools(tools: Iterable[ToolSpec]) -> list[ToolParam]:
    result: list[ToolParam] = []
    for tool in tools:
        schema: dict[str, object] = {"type": "object", **dict(tool.parameters)}
        param: ToolParam = {"name": tool.name, "input_schema": schema}
        if tool.description:
            param["description"] = tool.description
        if tool.cache_breakpoint is not None:
            param["cache_control"] = _cache_control(tool.cache_breakpoint)
        result.append(param)
    return result


class _Tally:
    """What the stream has said so far about usage, the model and why it stopped."""

    def __init__(self) -> None:
        self.input_tokens: int | None = None
        self.cache_read: int = 0
        self.cache_write: int = 0
        self.cache_write_1h: int = 0
        self.output_tokens: int | None = None
        self.stop_reason: str | None = None
        self.provider_model = ""
        self.stopped = False
        self.output: list[str] = []
        self.tool_calls = ToolCallParts()


def _input_usage(tally: _Tally) -> Usage:
    """The input the stream reported (``tally.input_tokens`` is known): every input token, the
    cache reads and writes among them."""
    assert tally.input_tokens is not None
    return Usage(
        input_tokens=tally.input_tokens + tally.cache_read + tally.cache_write,
        cached_input_tokens=tally.cache_read,
        cache_write_input_tokens=tally.cache_write,
        cache_write_1h_input_tokens=min(tally.cache_write_1h, tally.cache_write),
    )


def quota_spent(exc: anthropic.APIStatusError) -> bool:
    """Whether an Anthropic error says the account's credit is spent, streamed or in a batch: a
    ``billing_error``, or the 400 ``invalid_request_error`` "credit balance is too low" that only
    its message tells apart from a bad request (read here, never copied into our messages)."""
    error = exc.body.get("error") if isinstance(exc.body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return quota_exhausted(exc.type) or (isinstance(message, str) and "credit balance is too low" in message.lower())


class AnthropicProvider(SdkAdapter[anthropic.AsyncAnthropic]):
    """Streams messages through the official SDK, with no SDK retries (ours come later)."""

    def __init__(
        self,
        name: str,
        api_key: str | None,
        base_url: str | None = None,
        *,
        http_client: HttpClientKind = "aiohttp",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self._usage_log = EstimatedUsageLog()
        # Explicit base_url and key so the SDK reads no environment variables (config.py owns them). The SDK's
        # own spans and trace propagation are off: routesvc makes one client span per attempt and sends
        # ``traceparent`` itself through ``ProviderCall.headers``, and content never goes into spans.
        client = anthropic.AsyncAnthropic(
            api_key=api_key or "",
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=0,
            open_telemetry={"traces": False, "propagation": False},
            http_client=direct_to_loopback(
                keeping_buffered(anthropic.DefaultAioHttpClient, EventBound(max_event_bytes, AnthropicEventEnds))
                if http_client == "aiohttp"
                else traced(anthropic.DefaultAsyncHttpxClient, EventBound(max_event_bytes, AnthropicEventEnds)),
                base_url or DEFAULT_BASE_URL,
            ),
        )
        super().__init__(name, client, http_client)
        # Kept only so that an error code echoing it is never copied into a message.
        self._api_key = api_key or ""

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """Stream the answer: ``TextDelta``s, then one ``ProviderFinish``; errors are ``ProviderError``s."""
        deadline = None if call.timeout is None else asyncio.get_running_loop().time() + call.timeout
        request = self._client.post(
            "/v1/messages",
            body=_body(self._name, call),
            cast_to=object,
            options=cast(anthropic.RequestOptions, request_options(call)),
            stream=True,
            stream_cls=anthropic.AsyncStream[object],
        )
        with sending(call.sent), streaming():
            sdk_stream = await self._guard(call, deadline, request)
        try:
            tally = _Tally()
            while True:
                # ``message_delta`` brought the stop reason and the output count (the input
                # came with ``message_start``): only ``message_stop``, the terminator, is
                # missing, and the answer is whole.
                whole = None not in (tally.stop_reason, tally.input_tokens, tally.output_tokens)
                try:
                    if whole:
                        event = await self._next_within(call, deadline, sdk_stream, DRAIN_SECONDS, none_came=_HELD)
                        # Held open, or ended cleanly without ``message_stop``: whole, OK.
                        if event is _HELD or event is END_OF_STREAM:
                            tally.stopped = True
                            break
                    else:
                        event = await self._guard(call, deadline, next_event(sdk_stream))
                    if event is END_OF_STREAM:
                        break
                    carried = self._apply(tally, event_object(event, provider=self._name, model=call.model))
                except ProviderError as exc:
                    if not self._ends_whole(call, exc, whole=whole):
                        raise
                    tally.stopped = True
                    break
                if isinstance(carried, TextDelta | Heartbeat):
                    tally.output.append(carried.text)
                if carried is not None:
                    yield carried
                if tally.stopped:
                    await self._drain(call, sdk_stream, deadline)
                    break
            if not tally.stopped:
                raise ProviderUnavailable(
                    describe(self._name, call.model, "stream ended without message_stop"),
                    provider=self._name,
                    model=call.model,
                )
            if tally.stop_reason is None:
                # As the OpenAI adapter's stream without a finish reason: its end (a
                # ``message_delta``) was lost, the answer may be cut anywhere.
                raise ProviderUnavailable(
                    describe(self._name, call.model, "stream ended without a stop reason"),
                    provider=self._name,
                    model=call.model,
                )
            usage, estimated = self._usage(call, tally)
            calls = tally.tool_calls.calls()
            yield ProviderFinish(
                usage=usage,
                finish_reason=map_stop_reason(tally.stop_reason, made_calls=bool(calls)),
                provider_model=(
                    safe_model(
                        tally.provider_model,
                        asked=call.provider_model,
                        messages=call.texts,
                        key=self._api_key,
                    )
                    or call.provider_model
                ),
                tool_calls=calls,
                estimated=estimated,
            )
        finally:
            # Closing the SDK stream closes the HTTP response, so the upstream sees the abort.
            with contextlib.suppress(Exception):
                await sdk_stream.close()

    async def _drain(self, call: ProviderCall, stream: anthropic.AsyncStream[object], deadline: float | None) -> None:
        """Read what follows ``message_stop`` (the end of the chunked body) so the connection is reused.

        Closing a response before its end closes the connection, and the next call would pay for a
        new TCP and TLS handshake. A server that sends more, or stalls, gets ``DRAIN_SECONDS`` in
        all (not each event: one that keeps sending must not hold the answer), each event waited
        for as ``_next_within`` waits, never past the call's ``deadline`` less
        ``DEADLINE_MARGIN_SECONDS`` (the OpenAI adapter's drain): the answer is whole, and must not
        reach the caller after its deadline. An error of the stream meanwhile (a reset) is no
        failure: the answer and its usage came (logged, ``_ends_whole``).
        """
        clock = asyncio.get_running_loop()
        ends = clock.time() + DRAIN_SECONDS
        try:
            while (wait := ends - clock.time()) > 0:
                if await self._next_within(call, deadline, stream, wait, none_came=END_OF_STREAM) is END_OF_STREAM:
                    return
        except ProviderError as exc:
            self._ends_whole(call, exc, whole=True)

    @staticmethod
    def _apply(tally: _Tally, event: dict[str, object]) -> TextDelta | Heartbeat | InputReported | None:
        """Fold one event into ``tally``: the answer text it carries, a ``Heartbeat`` for anything
        else the model produced (thinking, a tool call's name or arguments), the billed input
        ``message_start`` tells (``InputReported``), or None."""
        kind = event.get("type")
        if kind == "message_start":
            message = object_field(event.get("message"))
            tally.provider_model = text_field(message.get("model")) or tally.provider_model
            usage = object_field(message.get("usage"))
            if usage:
                tally.input_tokens = count_field(usage.get("input_tokens"))
                tally.cache_read = count_field(usage.get("cache_read_input_tokens")) or 0
                tally.cache_write = count_field(usage.get("cache_creation_input_tokens")) or 0
                tally.cache_write_1h = _cache_write_1h(usage, 0)
                # Its ``output_tokens`` is a placeholder (Anthropic sends 1): only
                # ``message_delta``'s count is the answer's, and without one it is estimated.
                if tally.input_tokens is not None:
                    return InputReported(_input_usage(tally))
        elif kind == "content_block_start":
            block = object_field(event.get("content_block"))
            index = count_field(event.get("index"))
            if block.get("type") == "tool_use" and index is not None:
                name = text_field(block.get("name"))
                # Anthropic sends ``{}`` here and the input in ``input_json_delta``s; a server
                # re-streaming a finished message may send it whole here and no delta, written
                # again with its characters as they are (no ``\uXXXX`` escapes), as deltas carry it.
                given = object_field(block.get("input"))
                whole = json.dumps(given, ensure_ascii=False) if given else ""
                tally.tool_calls.add(index, call_id=text_field(block.get("id")), name=name, whole_arguments=whole)
                return Heartbeat(name + whole)
            if block.get("type") == "text":
                # Anthropic starts a text block with "" and sends the text in ``text_delta``s; a
                # server re-streaming a finished message may send it whole here (as a tool call's
                # input above), which the SDK's own accumulator keeps.
                text = text_field(block.get("text"))
                return TextDelta(text) if text else None
            if block.get("type") in ("thinking", "redacted_thinking"):
                return Heartbeat(text_field(block.get("thinking")), reasoning=True)
        elif kind == "content_block_delta":
            block_delta = object_field(event.get("delta"))
            delta_kind = block_delta.get("type")
            if delta_kind == "text_delta":
                text = text_field(block_delta.get("text"))
                return TextDelta(text) if text else None
            if delta_kind == "input_json_delta":
                index = count_field(event.get("index"))
                piece = text_field(block_delta.get("partial_json"))
                if index is not None:
                    tally.tool_calls.add(index, arguments=piece)
                return Heartbeat(piece)
            if delta_kind == "thinking_delta":
                return Heartbeat(text_field(block_delta.get("thinking")), reasoning=True)
            if delta_kind == "signature_delta":  # the end of a thinking block
                return Heartbeat(reasoning=True)
        elif kind == "message_delta":
            reason = object_field(event.get("delta")).get("stop_reason")
            if reason is not None:
                # A stop reason that is not text is still an end: an unknown one.
                tally.stop_reason = text_field(reason) or "other"
            usage = object_field(event.get("usage"))
            # Cumulative counts: the last one wins.
            tally.output_tokens = _latest(usage.get("output_tokens"), tally.output_tokens)
            tally.input_tokens = _latest(usage.get("input_tokens"), tally.input_tokens)
            tally.cache_read = _latest(usage.get("cache_read_input_tokens"), tally.cache_read)
            tally.cache_write = _latest(usage.get("cache_creation_input_tokens"), tally.cache_write)
            tally.cache_write_1h = _cache_write_1h(usage, tally.cache_write_1h)
        elif kind == "message_stop":
            tally.stopped = True
        return None

    def _usage(self, call: ProviderCall, tally: _Tally) -> tuple[Usage, bool]:
        """The reported usage, and whether it is estimated: a count the stream did not report (or
        reported malformed) is estimated with the offline tokenizer (the input over the whole
        request, tools included), and the estimate logged; a reported input keeps its cache
        reads and writes."""
        estimated = tally.input_tokens is None or tally.output_tokens is None
        if estimated:
            self._usage_log.estimated(self._name, call.model)
        if tally.input_tokens is None:
            usage = Usage(input_tokens=billed_input_of_chat(call.as_chat(), "anthropic", call.image_token_scale))
        else:
            usage = _input_usage(tally)
        output_tokens = count_text_tokens("".join(tally.output)) if tally.output_tokens is None else tally.output_tokens
        return replace(usage, output_tokens=output_tokens), estimated

    def _translate(self, call: ProviderCall, exc: Exception) -> ProviderError | None:
        """The ``ProviderError`` for an SDK or transport exception; None for anything else (our bug)."""
        name, model = self._name, call.model
        if isinstance(exc, anthropic.APIStatusError):
            code = safe_code(exc.type, messages=call.texts, key=self._api_key)
            if 200 <= exc.status_code < 300:
                # ``event: error`` inside a 200 stream: the SDK raises it with the stream's status.
                # A 3xx it did not follow (no Location, a 304) is an HTTP status like any other.
                return error_for_event("", code, provider=name, model=model)
            return error_for_status(
                exc.status_code,
                provider=name,
                model=model,
                code=code,
                headers=exc.response.headers,
                quota=quota_spent(exc),
                # Which of a 429's limits refused: one below what the request takes of it.
                asked=tokens_asked(call, "anthropic") if exc.status_code == 429 else None,
            )
        if isinstance(exc, anthropic.APITimeoutError) and not aiohttp_connection_failure(exc):
            return ProviderUnavailable(describe(name, model, "request timed out"), provider=name, model=model)
        if isinstance(exc, anthropic.APIConnectionError):
            return ProviderUnavailable(describe(name, model, "connection failed"), provider=name, model=model)
        if isinstance(exc, anthropic.APIError):
            return ProviderUnavailable(describe(name, model, "invalid response"), provider=name, model=model)
        return transport_error(exc, provider=name, model=model)


def _latest(value: object, previous: _C) -> int | _C:
    """A cumulative count from an event, or ``previous`` when the event has none (or a malformed one)."""
    count = count_field(value)
    return previous if count is None else count


def _cache_write_1h(usage: dict[str, object], previous: int) -> int:
    """The 1-hour cache writes of a usage object (``cache_creation.ephemeral_1h_input_tokens``),
    or ``previous`` when it has none."""
    return _latest(object_field(usage.get("cache_creation")).get("ephemeral_1h_input_tokens"), previous)
