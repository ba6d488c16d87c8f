"""OpenAI chat completions, and OpenAI-compatible servers (vLLM, Ollama, llama.cpp), via ``AsyncOpenAI``.

The request goes through the SDK's own client (``AsyncOpenAI.post``, its documented way to call an
endpoint with a body of your own): its headers, key, base URL, timeout, SSE decoding, in-band error
detection and exceptions. Each chunk comes back as the decoded JSON object rather than a pydantic
``ChatCompletionChunk``: building those models took more than half of the SDK's CPU per stream
(3.3 against 1.5 ms for 20 chunks, measured side by side), and this adapter reads five fields.

Every SDK exception is translated here, most specific first:

    openai.APIStatusError       by HTTP status (see ``routesvc.providers._http.error_for_status``)
    openai.APITimeoutError      ProviderUnavailable
    openai.APIConnectionError   ProviderUnavailable
    openai.APIError             in-band ``{"error": ...}`` chunk or an invalid response: by its type
    httpx2 / aiohttp / decoding errors  ProviderUnavailable (cut, reset, malformed or non-UTF-8 stream)
    deadline (call.timeout)     ProviderTimedOut (a ProviderUnavailable)

Cache breakpoints (``Message.cache_breakpoint``, ``ToolSpec.cache_breakpoint``) are not sent:
OpenAI caches a long prompt's prefix by itself and reports the reads as ``cached_tokens``, and the
compatible servers take no such field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Literal, cast

import openai
import structlog
from openai._streaming import ServerSentEvent
from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)
from openai.types.chat.chat_completion_content_part_image_param import ImageURL
from openai.types.shared_params import FunctionDefinition

from routesvc.cost import billed_input_of_chat
from routesvc.errors import ConfigError, ProviderError, ProviderUnavailable
from routesvc.models import (
    FinishReason,
    Heartbeat,
    Image,
    ImageDetail,
    Message,
    ProviderEvent,
    ProviderFinish,
    ResponseFormat,
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
from routesvc.providers._event_size import DEFAULT_MAX_EVENT_BYTES, EventBound, OpenAIEventEnds, streaming
from routesvc.providers._http import (
    DRAIN_SECONDS,
    END_OF_STREAM,
    EstimatedUsageLog,
    aiohttp_connection_failure,
    arguments_field,
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
from routesvc.providers._tool_calls import SentCallIds, ToolCallParts, openai_call_id
from routesvc.providers.base import HttpClientKind, ModelRequest, ProviderCall
from routesvc.tokens import count_text_tokens

OpenAIKind = Literal["openai", "openai_compatible"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"

_KINDS = frozenset({"openai", "openai_compatible"})

_log = structlog.get_logger("routesvc.providers")

# After the finish reason: how long the rest of the stream (the usage chunk that
# ``stream_options.include_usage`` makes last, then ``[DONE]`` and the body's end) is waited for,
# rather than ``stream_idle_timeout_seconds``: a server (a proxy) that holds a finished answer's
# body open must not turn it into a stall. Once the usage chunk came (the one with no choices:
# a server that puts the usage so far on every chunk, vLLM's ``continuous_usage_stats``, still
# sends it last) or was not asked for, the rest is drained for as long as the Anthropic adapter
# drains after ``message_stop``; until then each next chunk gets a second, then the usage is
# estimated as when a server sends none (or the last chunk's usage so far is taken). Neither wait
# runs past the call's deadline, less ``DEADLINE_MARGIN_SECONDS``: the answer is whole, so it
# ends with an estimate rather than the deadline failing it. Within that margin what has come
# already is still read, for up to ``BUFFERED_READ_SECONDS`` (at most half the time left). An
# error of the stream in that drain (a reset) ends the answer OK as well; one while the usage is
# waited for fails the attempt.
_USAGE_WAIT_SECONDS = 1.0

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    # OpenAI-compatible servers' names for a natural stop: TGI (before 2.2.1) "eos_token" and
    # "stop_sequence", Together "eos".
    "eos_token": FinishReason.STOP,
    "eos": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
}
known_codes(_FINISH_REASONS)


def map_finish_reason(reason: str | None, *, made_calls: bool = False) -> FinishReason:
    """The domain finish reason for an OpenAI ``finish_reason``, of an answer that ``made_calls``
    or not. Such an answer that stopped of itself is TOOL_CALLS: OpenAI says "stop" when
    ``tool_choice`` named the tool, and some compatible servers do even in auto mode (a cut by
    length or filter stays what it is). One that made no call (its pieces named no tool) is not
    TOOL_CALLS whatever the server said, which would leave the caller nothing to run: OTHER."""
    if reason is None:
        return FinishReason.UNSPECIFIED
    finish = _FINISH_REASONS.get(reason, FinishReason.OTHER)
    if finish is FinishReason.TOOL_CALLS and not made_calls:
        return FinishReason.OTHER
    return FinishReason.TOOL_CALLS if made_calls and finish is FinishReason.STOP else finish


def _messages(messages: Iterable[Message]) -> list[ChatCompletionMessageParam]:
    result: list[ChatCompletionMessageParam] = []
    ids = SentCallIds(openai_call_id)
    for message in messages:
        if message.role is Role.SYSTEM:
            result.append({"role": "system", "content": message.content})
        elif message.role is Role.ASSISTANT and message.tool_calls:
            result.append(
                {
                    "role": "assistant",
                    # Null rather than empty beside tool calls, as the API itself answers them.
                    "content": message.content or None,
                    "tool_calls": [
                        {
                            "id": ids.call(call.id),
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
                        }
                        for call in message.tool_calls
                    ],
                }
            )
        elif message.role is Role.ASSISTANT:
            result.append({"role": "assistant", "content": message.content})
        elif message.role is Role.TOOL:
            call_id = ids.result(message.tool_call_id)
            result.append({"role": "tool", "tool_call_id": call_id, "content": message.content})
        elif message.parts:
            result.append({"role": "user", "content": [_part(part) for part in message.parts]})
        else:
            result.append({"role": "user", "content": message.content})
    return result


# The ``detail`` sent for an image; none for ``ImageDetail.AUTO`` (OpenAI's default).
_DETAILS: dict[ImageDetail, Literal["low", "high"]] = {ImageDetail.LOW: "low", ImageDetail.HIGH: "high"}


def _part(part: str | Image) -> ChatCompletionContentPartParam:
    """A user turn's text or image; an inline image goes as a ``data:`` URL, with its ``detail``
    when the request set one (never null: vLLM refuses ``"detail": null``, and logs that it
    ignores a value it does not use)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    url = part.url or f"data:{part.media_type};base64,{base64.b64encode(part.data).decode('ascii')}"
    image: ImageURL = {"url": url}
    if part.detail in _DETAILS:
        image["detail"] = _DETAILS[part.detail]
    return {"type": "image_url", "image_url": image}


def _tools(tools: Iterable[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    result: list[ChatCompletionFunctionToolParam] = []
    for tool in tools:
        function: FunctionDefinition = {"name": tool.name}
        # Omitted rather than empty: some OpenAI-compatible servers reject an empty schema.
        if tool.description:
            function["description"] = tool.description
        if tool.parameters:
            function["parameters"] = dict(tool.parameters)
        result.append({"type": "function", "function": function})
    return result


def _tool_choice(choice: ToolChoice) -> object:
    """``tool_choice`` as the chat completions API takes it."""
    if choice.mode is ToolChoiceMode.TOOL:
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode.value  # "auto", "none", "required"


def _response_format(response_format: ResponseFormat) -> dict[str, object]:
    """``response_format`` as the chat completions API takes it."""
    if response_format.type is ResponseFormatType.JSON_OBJECT:
        return {"type": "json_object"}
    schema = {"name": response_format.name, "schema": dict(response_format.schema), "strict": response_format.strict}
    return {"type": "json_schema", "json_schema": schema}


def chat_params(request: ModelRequest) -> dict[str, object]:
    """The optional parameters of one chat completions request, streamed or in a batch: only those
    the request sets. ``tool_choice`` and ``parallel_tool_calls`` go only with tools, as OpenAI
    refuses them otherwise (validation allows only TOOL_CHOICE_MODE_NONE without tools, which
    then has nothing to say)."""
    params: dict[str, object] = {}
    if request.tools:
        params["tools"] = _tools(request.tools)
        if request.tool_choice is not None:
            params["tool_choice"] = _tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = request.parallel_tool_calls
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.stop:
        params["stop"] = list(request.stop)
    if request.response_format is not None:
        params["response_format"] = _response_format(request.response_format)
    return params


def quota_spent(exc: openai.APIStatusError) -> bool:
    """Whether an OpenAI error says the account's quota is spent (``insufficient_quota``, its code
    or its type), streamed or in a batch."""
    return quota_exhausted(exc.code, exc.type)


def _reasoning(delta: Mapping[str, object]) -> str:
    """The reasoning a delta carries: ``reasoning_content`` (vLLM, DeepSeek, llama.cpp) or ``reasoning``
    (Ollama, OpenRouter); not part of the answer."""
    return text_field(delta.get("reasoning_content")) or text_field(delta.get("reasoning"))


def _content(value: object) -> tuple[str, str]:
    """A delta's ``content``: its answer text and its reasoning. A string is text; a list of typed
    parts (Mistral's Magistral models) gives the text of its ``text`` parts as text, and of its
    ``thinking`` parts (``thinking``: a string or a list of ``text`` parts) as reasoning, read as
    ``reasoning_content`` is; other parts, and other values, are nothing."""
    if isinstance(value, str):
        return value, ""
    texts: list[str] = []
    thoughts: list[str] = []
    for part in value if isinstance(value, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            texts.append(text_field(part.get("text")))
        elif part.get("type") == "thinking":
            thoughts.append(_content(part.get("thinking"))[0])
    return "".join(texts), "".join(thoughts)


def _warn_if_unread(
    provider: str, model: str, usage: Mapping[str, object], finish: str, *, messages: Iterable[str], key: str
) -> None:
    """Warn (``provider_output_unread``) when a stream that gave nothing readable (no text, no
    reasoning, no tool call) reports output tokens beyond its reasoning tokens: its answer came in
    a shape this adapter does not read, and the caller pays for an empty answer; not when it
    finished ``content_filter`` (the provider withheld the answer). Counts and the finish reason
    only (dropped when it echoes the prompt or the key: ``safe_code``), never the answer."""
    if finish == "content_filter":
        return
    output_tokens = count_field(usage.get("completion_tokens")) or 0
    details = object_field(usage.get("completion_tokens_details"))
    answer_tokens = output_tokens - (count_field(details.get("reasoning_tokens")) or 0)
    if answer_tokens > 0:
        _log.warning(
            "provider_output_unread",
            provider=provider,
            model=model,
            output_tokens=output_tokens,
            finish_reason=safe_code(finish, messages=messages, key=key),
        )


def _counts(usage: Mapping[str, object], *, answered: bool) -> tuple[int | None, int | None]:
    """A ``usage`` object's prompt and completion counts, each None when it is not reported,
    malformed, or a placeholder: a zero for what is never empty, the prompt, or the completion of
    a stream that ``answered`` (gave text, reasoning or a tool call). A server (a gateway) that
    puts zeros on its finish chunk has counted nothing: the count is estimated, as when none came."""
    prompt = count_field(usage.get("prompt_tokens"))
    completion = count_field(usage.get("completion_tokens"))
    return (prompt or None, None if completion == 0 and answered else completion)


def _counted(value: object, *, answered: bool) -> bool:
    """Whether a chunk's ``usage`` holds both counts, prompt and completion (``_counts``)."""
    return None not in _counts(object_field(value), answered=answered)


def _add_tool_calls(parts: ToolCallParts, pieces: object) -> str:
    """Fold a delta's ``tool_calls`` pieces into ``parts``; their text (names, arguments)."""
    texts: list[str] = []
    for piece in pieces if isinstance(pieces, list) else ():
        if not isinstance(piece, dict):
            continue
        # Without an index (older Ollama) the piece goes by its id: ``ToolCallParts``.
        index = count_field(piece.get("index"))
        function = object_field(piece.get("function"))
        arguments = arguments_field(function.get("arguments"))
        name = text_field(function.get("name"))
        parts.add(index, call_id=text_field(piece.get("id")), name=name, arguments=arguments)
        texts.append(name + arguments)
    return "".join(texts)


class _EventStream(openai.AsyncStream[object]):
    """The SDK's stream of chunks, without the events whose data is empty (``data:`` with nothing
    after it, or only ``event:``, ``id:``, ``retry:`` fields: a keep-alive some servers send),
    which the SSE spec does not dispatch and the SDK parsed as JSON, failing the stream."""

    async def _iter_events(self) -> AsyncIterator[ServerSentEvent]:
        async for sse in super()._iter_events():
            if sse.data:
                yield sse


class OpenAIProvider(SdkAdapter[openai.AsyncOpenAI]):
    """Streams chat completions through the official SDK, with no SDK retries (ours come later).

    ``kind="openai"`` sends ``max_completion_tokens``; ``kind="openai_compatible"`` sends
    ``max_tokens``, which vLLM, Ollama and llama.cpp understand. A server that reports no usage
    gets it estimated with the offline tokenizer (logged as ``provider_usage_estimated``).
    """

    def __init__(
        self,
        name: str,
        api_key: str | None,
        base_url: str | None = None,
        kind: str = "openai",
        *,
        http_client: HttpClientKind = "aiohttp",
        stream_usage: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        if kind not in _KINDS:
            raise ConfigError(f"providers.{name}.kind: {kind!r} is not one of {sorted(_KINDS)}")
        self._stream_usage = stream_usage
        self._usage_log = EstimatedUsageLog()
        self._kind: OpenAIKind = "openai" if kind == "openai" else "openai_compatible"
        # Kept only so that an error code echoing it is never copied into a message.
        self._api_key = api_key or ""
        # Passed explicitly so that the SDK never falls back to environment variables: config.py owns them.
        # Local OpenAI-compatible servers often need no key, but the SDK refuses an empty one.
        client = openai.AsyncOpenAI(
            api_key=api_key or "unused",
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=0,
            http_client=direct_to_loopback(
                keeping_buffered(openai.DefaultAioHttpClient, EventBound(max_event_bytes, OpenAIEventEnds))
                if http_client == "aiohttp"
                else traced(openai.DefaultAsyncHttpxClient, EventBound(max_event_bytes, OpenAIEventEnds)),
                base_url or DEFAULT_BASE_URL,
            ),
        )
        super().__init__(name, client, http_client)

    @property
    def kind(self) -> OpenAIKind:
        """``openai`` or ``openai_compatible``."""
        return self._kind

    def _body(self, call: ProviderCall) -> dict[str, object]:
        """The chat completions request, as ``chat.completions.create`` would send it."""
        body: dict[str, object] = {
            "model": call.provider_model,
            "messages": _messages(call.messages),
            "stream": True,
        }
        if self._stream_usage:
            body["stream_options"] = {"include_usage": True}
        body |= chat_params(call)
        body["max_completion_tokens" if self._kind == "openai" else "max_tokens"] = call.max_output_tokens
        return body

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """Stream the answer: ``TextDelta``s, then one ``ProviderFinish``; errors are ``ProviderError``s."""
        deadline = None if call.timeout is None else asyncio.get_running_loop().time() + call.timeout
        request = self._client.post(
            "/chat/completions",
            body=self._body(call),
            cast_to=object,
            # As ``chat.completions.create`` authenticates: the API key as bearer token, never an admin key.
            options=cast(openai.RequestOptions, request_options(call) | {"security": {"bearer_auth": True}}),
            stream=True,
            stream_cls=_EventStream,
        )
        with sending(call.sent), streaming():
            sdk_stream = await self._guard(call, deadline, request)
        try:
            usage: dict[str, object] = {}
            finish: str | None = None
            provider_model = ""
            checked_model: object = None  # the last reported ``model`` safe_model looked at
            output: list[str] = []
            refused = False
            tool_calls = ToolCallParts()
            usage_chunk = False  # the usage-only chunk (no choices) came
            # The finish chunk (or one after it) carried the usage, both counts (real ones, no
            # placeholder zeros: ``_counts``): a server that sends no usage-only chunk (Gemini's
            # OpenAI-compatible endpoint, some gateways).
            finish_usage = False
            deltas = False  # the stream sends ``delta``s (a ``message`` beside one is not read)
            while True:
                # All that is left is ``[DONE]`` and the body's end (the usage came or was not asked for).
                draining = usage_chunk or not self._stream_usage
                try:
                    if finish is None:
                        event = await self._guard(call, deadline, next_event(sdk_stream))
                    else:
                        wait = DRAIN_SECONDS if draining else _USAGE_WAIT_SECONDS
                        event = await self._next_within(call, deadline, sdk_stream, wait, none_came=END_OF_STREAM)
                    if event is END_OF_STREAM:
                        break
                    chunk = event_object(event, provider=self._name, model=call.model)
                except ProviderError as exc:
                    # A usage-only chunk may still come after a finish chunk's usage (and is
                    # waited for), but the answer and a usage of it came: the error ends it whole.
                    if not self._ends_whole(call, exc, whole=finish is not None and (draining or finish_usage)):
                        raise
                    break
                reported_model = chunk.get("model")
                if not provider_model and reported_model != checked_model:
                    # Checked once per name: OpenAI-compatible servers (Ollama, vLLM) repeat it in
                    # every chunk, and a check of a rejected name searches every message.
                    checked_model = reported_model
                    provider_model = safe_model(
                        reported_model,
                        asked=call.provider_model,
                        messages=call.texts,
                        key=self._api_key,
                    )
                usage = object_field(chunk.get("usage")) or usage
                choices = chunk.get("choices")
                usage_chunk = usage_chunk or (bool(object_field(chunk.get("usage"))) and not choices)
                for choice in choices if isinstance(choices, list) else ():
                    if not isinstance(choice, dict) or choice.get("index") not in (0, None):
                        continue
                    # A server that streams whole-message shapes puts the piece in ``message``; in
                    # a stream of deltas a ``message`` (the whole answer, beside ``"delta": null``
                    # at the end) repeats them.
                    piece = choice.get("delta")
                    deltas = deltas or isinstance(piece, dict)
                    delta = object_field(piece if deltas else choice.get("message"))
                    # A refusal (structured outputs) comes in its own field: it is the answer,
                    # and the answer was filtered.
                    refusal = text_field(delta.get("refusal"))
                    refused = refused or bool(refusal)
                    content, thinking = _content(delta.get("content"))
                    text = content + refusal
                    if text:
                        output.append(text)
                        yield TextDelta(text)
                    reasoning = _reasoning(delta) + thinking
                    other = reasoning + _add_tool_calls(tool_calls, delta.get("tool_calls"))
                    if other:
                        output.append(other)
                        yield Heartbeat(other, reasoning=bool(reasoning))
                    # An empty finish reason ("" on every unfinished chunk: Ollama, SGLang,
                    # KoboldCpp) is none; any other value, even not text, is the finish.
                    reason = choice.get("finish_reason")
                    if reason is not None and not (isinstance(reason, str) and not reason.strip()):
                        finish = text_field(reason).strip() or "other"
                finish_usage = finish_usage or (
                    finish is not None and bool(choices) and _counted(chunk.get("usage"), answered=bool(output))
                )
            if finish is None:
                raise ProviderUnavailable(
                    describe(self._name, call.model, "stream ended without a finish reason"),
                    provider=self._name,
                    model=call.model,
                )
            reported, estimated = self._usage(call, usage, output)
            if not output:
                _warn_if_unread(self._name, call.model, usage, finish, messages=call.texts, key=self._api_key)
            calls = tool_calls.calls()
            yield ProviderFinish(
                usage=reported,
                finish_reason=(
                    FinishReason.CONTENT_FILTER if refused else map_finish_reason(finish, made_calls=bool(calls))
                ),
                provider_model=provider_model or call.provider_model,
                tool_calls=calls,
                estimated=estimated,
            )
        finally:
            # Closing the SDK stream closes the HTTP response, so the upstream sees the abort.
            with contextlib.suppress(Exception):
                await sdk_stream.close()

    def _usage(self, call: ProviderCall, usage: Mapping[str, object], output: list[str]) -> tuple[Usage, bool]:
        """The reported usage (the last usage object of the stream, empty when none came), and
        whether part of it is estimated: a count the server did not report (or reported
        malformed, or as a placeholder zero: ``_counts``) is estimated with the offline tokenizer
        (the input over the whole request, tools included), and the estimate logged."""
        input_tokens, output_tokens = _counts(usage, answered=bool(output))
        estimated = input_tokens is None or output_tokens is None
        if estimated:
            self._usage_log.estimated(self._name, call.model, kind=self._kind)
        if input_tokens is None:
            input_tokens = billed_input_of_chat(call.as_chat(), self._kind, call.image_token_scale)
        if output_tokens is None:
            output_tokens = count_text_tokens("".join(output))
        details = object_field(usage.get("prompt_tokens_details"))
        reported = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=count_field(details.get("cached_tokens")) or 0,
        )
        return reported, estimated

    def _translate(self, call: ProviderCall, exc: Exception) -> ProviderError | None:
        """The ``ProviderError`` for an SDK or transport exception; None for anything else (our bug)."""
        name, model = self._name, call.model
        messages, key = call.texts, self._api_key
        code = error_type = ""
        if isinstance(exc, openai.APIError):
            # The SDK gives a numeric code (vLLM's 400) as its text.
            code = safe_code(exc.code, messages=messages, key=key)
            error_type = safe_code(exc.type, messages=messages, key=key)
        if isinstance(exc, openai.APIStatusError):
            return error_for_status(
                exc.status_code,
                provider=name,
                model=model,
                code=code or error_type,
                headers=exc.response.headers,
                quota=quota_spent(exc),
                # Which of a 429's limits refused: one below what the request takes of it.
                asked=tokens_asked(call, self._kind) if exc.status_code == 429 else None,
            )
        if isinstance(exc, openai.APITimeoutError) and not aiohttp_connection_failure(exc):
            return ProviderUnavailable(describe(name, model, "request timed out"), provider=name, model=model)
        if isinstance(exc, openai.APIConnectionError):
            return ProviderUnavailable(describe(name, model, "connection failed"), provider=name, model=model)
        if isinstance(exc, openai.APIResponseValidationError):
            return ProviderUnavailable(describe(name, model, "invalid response"), provider=name, model=model)
        if isinstance(exc, openai.APIError):
            # An ``{"error": ...}`` chunk inside a 200 stream.
            return error_for_event(code, error_type, provider=name, model=model)
        return transport_error(exc, provider=name, model=model)
