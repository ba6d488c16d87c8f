"""What the fake is told to do (``Script``, ``Fault``) and what it saw (``RecordedRequest``)."""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

DEFAULT_TEXT = "Hello from the fake provider."


class Fault(enum.Enum):
    """What goes wrong in a response, after ``Script.fault_after`` content chunks.

    ``CUT``, ``RESET``, ``HANG`` and ``BAD_FRAMING`` end the exchange early and leave the stream
    unterminated (a ``HANG`` with ``Script.hang_seconds`` resumes after that stall instead); the
    others inject one bad event and then finish the stream normally.
    """

    NONE = "none"
    CUT = "cut"  # close the connection (FIN) without finishing the chunked body
    RESET = "reset"  # abort the connection with a TCP RST
    HANG = "hang"  # stop sending, socket open: until the client leaves, or for ``hang_seconds``
    HANG_BEFORE_HEADERS = "hang_before_headers"  # read the request, never answer
    ERROR_EVENT = "error_event"  # an in-band error event, then the end of the body
    MALFORMED_LINE = "malformed_line"  # a ``data:`` line that is not JSON
    OVERSIZED_LINE = "oversized_line"  # a valid event padded to ``oversized_bytes``
    NON_UTF8 = "non_utf8"  # a ``data:`` line with bytes that are not UTF-8
    UNKNOWN_EVENT = "unknown_event"  # an event type the SDKs do not know
    INCOMPLETE_EVENT = "incomplete_event"  # valid JSON without the fields its type requires
    WRONG_TYPES = "wrong_types"  # an event whose known fields hold values of the wrong JSON type
    NOT_AN_OBJECT = "not_an_object"  # a ``data:`` line that is valid JSON but not an object (OpenAI: null)
    MISSING_TERMINATOR = "missing_terminator"  # end the body without finish, usage, [DONE] or message_stop
    BAD_FRAMING = "bad_framing"  # a chunk-size line that is not hex (HTTP framing), then silence, socket open
    # Every event but the OpenAI format's ``data: [DONE]`` (the Anthropic format's through its
    # ``message_stop``), then silence, socket open: until the client leaves, or for ``hang_seconds``.
    HANG_AT_END = "hang_at_end"
    # The same events as ``HANG_AT_END``, then (after ``hang_seconds``, when set) a TCP RST: a
    # connection reset once the answer, its finish and usage were sent.
    RESET_AT_END = "reset_at_end"


@dataclass(frozen=True, slots=True)
class FakeToolCall:
    """A tool call the fake makes: the tool's ``name`` and its ``arguments`` (JSON text), streamed
    in ``pieces`` pieces; ``id`` defaults to ``call_fake_N`` (OpenAI) or ``toolu_fake_N`` (Anthropic)."""

    name: str
    arguments: str = "{}"
    id: str = ""
    pieces: int = 3

    def argument_pieces(self) -> tuple[str, ...]:
        """``arguments`` cut into ``pieces`` pieces (fewer when it is shorter), in order."""
        size = -(-len(self.arguments) // max(self.pieces, 1)) or 1
        return tuple(self.arguments[start : start + size] for start in range(0, len(self.arguments), size))

    def call_id(self, index: int, prefix: str) -> str:
        """The call's id: ``id``, else ``{prefix}_fake_{index}``."""
        return self.id or f"{prefix}_fake_{index}"


@dataclass(frozen=True, slots=True)
class Script:
    """How the fake answers one request.

    Content: ``chunks`` if given, else ``chunk_count`` chunks ``"chunk-0 "``, ``"chunk-1 "``...,
    else ``text`` split after each run of whitespace. Usage: ``input_tokens`` defaults to the number
    of whitespace-separated words in every message (and the system prompt) received, and includes
    ``cached_input_tokens`` and ``cache_creation_input_tokens`` (the Anthropic wire format reports
    them apart, as Anthropic does, with ``cache_creation_1h_input_tokens`` of the cache writes
    in ``cache_creation.ephemeral_1h_input_tokens``); ``output_tokens`` defaults to the number of chunks.
    ``finish_reason`` uses OpenAI names and is translated for Anthropic (stop -> end_turn, ...);
    an unknown name is sent as is.

    ``reasoning`` pieces stream before the text as reasoning (OpenAI-compatible ``reasoning_content``,
    an Anthropic ``thinking`` block), each after ``chunk_delay`` (the first after
    ``first_chunk_delay``), as content chunks do. ``tool_calls`` are made when the request offers
    tools: after the text (``chunks=()`` for none), in parallel, each in its pieces (OpenAI
    ``delta.tool_calls`` by index, Anthropic ``tool_use`` blocks with ``input_json_delta``), and the
    finish reason is then ``tool_calls`` (``tool_use``) unless ``tool_calls_finish_reason`` says
    otherwise; a request without tools gets the text only. A call whose ``name`` is empty is sent so
    (an empty placeholder some servers send).
    Both count as chunks for ``fault_after`` and, with the text, for the default ``output_tokens``.

    An error ``status`` answers with a provider-shaped JSON error (or ``error_body`` verbatim),
    ``Retry-After: retry_after`` and ``retry-after-ms`` when set. With ``echo_prompt`` the error
    message and in-band error events repeat the prompt and the API key received, as careless
    providers do, so that tests prove nothing is copied from them.
    """

    text: str = DEFAULT_TEXT
    chunks: tuple[str, ...] | None = None
    chunk_count: int | None = None
    chunk_delay: float = 0.0
    first_chunk_delay: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    omit_usage: bool = False
    finish_reason: str = "stop"
    model: str | None = None
    status: int = 200
    # Of an HTTP error or an in-band error event (default by status), or of an errored Anthropic
    # batch request (default invalid_request_error).
    error_type: str | None = None
    error_body: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fault: Fault = Fault.NONE
    fault_after: int = 0
    hang_seconds: float | None = None
    oversized_bytes: int = 1024 * 1024
    echo_prompt: bool = True
    reasoning: tuple[str, ...] = ()
    tool_calls: tuple[FakeToolCall, ...] = ()
    # How the OpenAI format keys tool-call pieces: "each" call its own index (OpenAI), "zero"
    # every call at index 0 (Ollama), "none" no index at all (older Ollama).
    tool_call_indexes: str = "each"
    # The text is the model's refusal: the OpenAI format streams it in ``delta.refusal`` (and a
    # whole answer's ``message.refusal``, ``content`` null), as OpenAI's structured outputs do.
    refusal: bool = False
    # The OpenAI format's calls come without an ``id`` (vLLM, NVIDIA NIM, LM Studio).
    omit_tool_call_ids: bool = False
    # A whole OpenAI-format answer (non-streamed, or a batch result) gives each call's
    # ``arguments`` as the object, not its JSON text, as some OpenAI-compatible servers do.
    tool_arguments_as_objects: bool = False
    # The finish reason of an answer that makes tool calls (OpenAI's names, translated for
    # Anthropic); None as each API: OpenAI "stop" when ``tool_choice`` named the tool, else
    # "tool_calls"; Anthropic "tool_use".
    tool_calls_finish_reason: str | None = None
    # The ``code`` of an OpenAI-format error (an HTTP error's body, an in-band error event); None by
    # type as OpenAI: ``insufficient_quota``, ``rate_limit_exceeded`` on a 429, else null. vLLM
    # sends the HTTP status as a number (400), LiteLLM as text ("429").
    error_code: str | int | None = None
    # Usage without the output count (a proxy that passes the input on only): Anthropic's
    # ``output_tokens`` (``message_start``, ``message_delta``), OpenAI's ``completion_tokens``.
    omit_output_tokens: bool = False
    # The Anthropic format's ``message_delta`` carries no ``usage`` (an Anthropic-compatible
    # gateway): only ``message_start``'s placeholder ``output_tokens`` (1) is sent.
    omit_delta_usage: bool = False
    # The Anthropic stream has no ``message_delta`` at all (no stop reason, no output count):
    # ``message_stop`` follows the last block.
    omit_message_delta: bool = False
    # The Anthropic format sends each tool call's whole ``input`` in its ``content_block_start``
    # and no ``input_json_delta`` (a gateway re-streaming a finished message).
    tool_input_in_start: bool = False
    # The OpenAI format streams ``delta.content`` as a list of typed parts, as Mistral's Magistral
    # models do: each text piece ``[{"type": "text", "text": ...}]``, each ``reasoning`` piece
    # ``[{"type": "thinking", "thinking": [{"type": "text", "text": ...}]}]`` (no ``reasoning_content``).
    content_parts: bool = False
    # The OpenAI format's streamed choices carry their piece under ``message``, not ``delta``.
    choice_message: bool = False
    # The ``finish_reason`` of the OpenAI format's chunks before the last (null as OpenAI): ""
    # as Ollama, SGLang and KoboldCpp send on every unfinished chunk.
    unfinished_finish_reason: str | None = None
    # The OpenAI format puts the usage so far on every chunk when the client asked for usage
    # (vLLM's ``continuous_usage_stats``): the prompt tokens and the text chunks sent; the usage
    # chunk after the finish has the whole usage.
    continuous_usage: bool = False
    # The OpenAI format's usage chunk (and ``[DONE]`` after it) comes this long after the finish chunk.
    usage_delay: float = 0.0
    # The OpenAI format's finish chunk has ``"delta": null`` and the whole answer under
    # ``message`` (a gateway closing a stream with the finished message).
    whole_message_at_end: bool = False
    # The Anthropic format sends the whole text in its text block's ``content_block_start`` and no
    # ``text_delta`` (a gateway re-streaming a finished message).
    text_in_start: bool = False
    # Each streamed event ends with "\n" and then this blank line: "\r\n" is a server mixing line
    # endings, a blank line all the same to the SSE spec and the openai SDK.
    event_blank_line: str = "\n"
    # The stream is sent gzip-compressed (``content-encoding: gzip``), whatever the request's
    # ``accept-encoding`` asked.
    gzip_stream: bool = False
    # ``fault`` comes once the answer, its finish and its usage were sent, before the stream's last
    # event (the OpenAI format's ``data: [DONE]``, the Anthropic format's ``message_stop``), instead
    # of after ``fault_after`` content chunks.
    fault_at_end: bool = False
    # The OpenAI format's usage is on the finish chunk itself, and no usage-only chunk follows
    # (Gemini's OpenAI-compatible endpoint, some gateways).
    usage_on_finish: bool = False

    def content_chunks(self) -> tuple[str, ...]:
        """The text pieces this script streams, in order."""
        if self.chunks is not None:
            return self.chunks
        if self.chunk_count is not None:
            return tuple(f"chunk-{index} " for index in range(self.chunk_count))
        return tuple(re.findall(r"\S+\s*|\s+", self.text))

    def to_json(self) -> dict[str, Any]:
        """This script as JSON-ready values (for ``POST /_fake/script``)."""
        # Field by field, not ``asdict``: it deep-copies each value, and the default ``headers``
        # (a ``MappingProxyType``) cannot be copied.
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["fault"] = self.fault.value
        data["headers"] = dict(self.headers)
        if self.chunks is not None:
            data["chunks"] = list(self.chunks)
        data["reasoning"] = list(self.reasoning)
        data["tool_calls"] = [asdict(call) for call in self.tool_calls]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Script:
        """A script from JSON values; unknown keys are an error (``ValueError``)."""
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown script fields: {sorted(unknown)}")
        values = dict(data)
        if "fault" in values:
            values["fault"] = Fault(values["fault"])
        if values.get("chunks") is not None:
            values["chunks"] = tuple(str(chunk) for chunk in values["chunks"])
        if "headers" in values:
            values["headers"] = MappingProxyType({str(k): str(v) for k, v in dict(values["headers"]).items()})
        if "reasoning" in values:
            values["reasoning"] = tuple(str(piece) for piece in values["reasoning"])
        if "tool_calls" in values:
            values["tool_calls"] = tuple(FakeToolCall(**dict(call)) for call in values["tool_calls"])
        return cls(**values)

    def calls_for(self, body: Any) -> tuple[FakeToolCall, ...]:
        """The tool calls to make for a request ``body``: the script's, when it offers tools."""
        offered = isinstance(body, dict) and bool(body.get("tools"))
        return self.tool_calls if offered else ()


@dataclass(eq=False, slots=True)
class RecordedRequest:
    """One request the fake received, and how its response ended.

    ``aborted`` is True when the client closed the connection before the response was complete;
    ``aborted_at`` is then the ``time.monotonic()`` at which the fake noticed. ``completed`` is True
    when the whole response was written; a fake-made ``CUT`` or ``RESET`` is neither. ``ended`` is
    set once the exchange is over, however it ended. ``connection`` numbers the TCP connection the
    request came on (1, 2, ...), so tests can see keep-alive reuse. ``headers`` have lower-case
    names; ``body`` is the parsed JSON (None if it was not JSON).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    received_at: float
    script: Script | None = None
    connection: int = 0
    chunks_sent: int = 0
    completed: bool = False
    aborted: bool = False
    aborted_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def model(self) -> str:
        """The ``model`` field of the JSON body, or ""."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else ""

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed response."""
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def api_key(self) -> str | None:
        """The key sent as ``x-api-key`` or ``Authorization: Bearer``."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        authorization = self.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:]
        return None

    async def wait_ended(self, timeout: float) -> None:
        """Wait until the exchange is over; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self.ended.wait()

    def to_json(self) -> dict[str, Any]:
        """This record as JSON-ready values (for ``GET /_fake/requests``)."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": dict(self.headers),
            "body": self.body,
            "received_at": self.received_at,
            "connection": self.connection,
            "chunks_sent": self.chunks_sent,
            "completed": self.completed,
            "aborted": self.aborted,
            "aborted_at": self.aborted_at,
            "ended": self.ended.is_set(),
        }


def received_text(body: Any) -> str:
    """All message and system text of an OpenAI or Anthropic request body, space-joined."""
    texts: list[str] = []

    def collect(content: Any) -> None:
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif isinstance(part, dict) and isinstance(part.get("content"), str):  # a tool_result
                    texts.append(part["content"])

    if isinstance(body, dict):
        collect(body.get("system"))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                collect(message.get("content"))
    return " ".join(texts)


def usage_numbers(record: RecordedRequest, script: Script) -> tuple[int, int]:
    """Input and output tokens to report: the script's, else words received and chunks sent."""
    input_tokens = script.input_tokens
    if input_tokens is None:
        input_tokens = len(received_text(record.body).split())
    output_tokens = script.output_tokens
    if output_tokens is None:
        pieces = sum(len(call.argument_pieces()) for call in script.calls_for(record.body))
        output_tokens = len(script.reasoning) + len(script.content_chunks()) + pieces
    return input_tokens, output_tokens


def error_message(record: RecordedRequest, script: Script, what: str) -> str:
    """An error message that, with ``echo_prompt``, repeats the prompt and key as careless providers do."""
    if not script.echo_prompt:
        return what
    return f"{what} for prompt {received_text(record.body)!r} with key {record.api_key!r}"
