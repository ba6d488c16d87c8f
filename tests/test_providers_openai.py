"""The OpenAI adapter, through the real ``openai`` SDK, over HTTP to the fake provider."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import replace
from types import MappingProxyType

import aiohttp
import httpx2
import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from httpx2._decoders import SUPPORTED_DECODERS
from structlog.testing import capture_logs

from routesvc.errors import (
    ConfigError,
    ProviderAuthFailed,
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimedOut,
    ProviderUnavailable,
)
from routesvc.models import (
    ChatRequest,
    FinishReason,
    Heartbeat,
    Message,
    ProviderEvent,
    ProviderFinish,
    Role,
    TextDelta,
    ToolSpec,
    Usage,
)
from routesvc.providers._aiohttp import _KeepingStream, unread_bytes
from routesvc.providers._event_size import DECODED_CODINGS
from routesvc.providers._http import count_field, object_field, safe_code, text_field, transport_error
from routesvc.providers.base import HttpClientKind, ProviderCall
from routesvc.providers.openai import OpenAIProvider
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.tokens import count_text_tokens, estimate_input_tokens
from tests.provider_statuses import STATUS_ERRORS

CANARY_PROMPT = "canary-prompt-4f9c2e please repeat this"
CANARY_KEY = "sk-canary-key-8d1b77"


def make_call(**overrides: object) -> ProviderCall:
    """A call carrying the canary prompt, as the router would build it."""
    values: dict[str, object] = {
        "model": "gpt-4o-mini",
        "provider_model": "gpt-4o-mini-2024-07-18",
        "messages": (Message(Role.SYSTEM, "You are terse."), Message(Role.USER, CANARY_PROMPT)),
    }
    values.update(overrides)
    return ProviderCall(**values)  # type: ignore[arg-type]


async def collect(provider: OpenAIProvider, call: ProviderCall) -> list[ProviderEvent]:
    """Every event of a stream that must succeed."""
    return [event async for event in provider.stream(call)]


async def collect_until_error(provider: OpenAIProvider, call: ProviderCall) -> tuple[list[str], ProviderError]:
    """The text deltas received before the stream failed, and the error it failed with."""
    texts: list[str] = []

    async def drain() -> None:
        async for event in provider.stream(call):
            assert isinstance(event, TextDelta)
            texts.append(event.text)

    with pytest.raises(ProviderError) as info:
        await drain()
    return texts, info.value


def assert_sanitized(error: ProviderError) -> None:
    """Neither the prompt nor the key appear in what the error says."""
    for text in (str(error), error.message, repr(error.args)):
        assert "canary" not in text


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (a generous cap: a loaded machine is only slower)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  # the fake's counters are plain attributes, polled
            await asyncio.sleep(0.005)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    """A fake provider on a free loopback port."""
    async with FakeProvider() as running:
        yield running


@pytest.fixture
async def provider(fake: FakeProvider, http_client: HttpClientKind) -> AsyncIterator[OpenAIProvider]:
    """An ``openai`` kind adapter pointed at the fake."""
    adapter = OpenAIProvider("openai", CANARY_KEY, fake.openai_base_url, "openai", http_client=http_client)
    yield adapter
    await adapter.aclose()


@pytest.fixture
async def compatible(fake: FakeProvider, http_client: HttpClientKind) -> AsyncIterator[OpenAIProvider]:
    """An ``openai_compatible`` kind adapter (vLLM, Ollama, llama.cpp) pointed at the fake."""
    adapter = OpenAIProvider("local", "", fake.openai_base_url, "openai_compatible", http_client=http_client)
    yield adapter
    await adapter.aclose()


class TestChunkFields:
    def test_counts_are_non_negative_integers_or_integral_floats(self) -> None:
        """A token count read from a chunk: 7 and 7.0 are 7; 7.5, -1, true, "7" and null are missing."""
        values = (7, 7.0, 0, 7.5, -1, True, "7", None)
        assert [count_field(v) for v in values] == [7, 7, 0, None, None, None, None, None]

    def test_text_and_object_fields_read_anything_else_as_empty(self) -> None:
        """Only a string is text and only a JSON object is an object."""
        assert [text_field(v) for v in ("a", 5, None, ["a"])] == ["a", "", "", ""]
        assert [object_field(v) for v in ({"a": 1}, [1], "x", None)] == [{"a": 1}, {}, {}, {}]


class TestSafeCode:
    @pytest.mark.parametrize(
        "code",
        ["rate_limit_exceeded", "insufficient_quota", "context_length_exceeded", "invalid_request_error", "http_429"],
    )
    def test_machine_codes_pass(self, code: str) -> None:
        """The short codes providers send are kept as they are."""
        assert safe_code(code) == code

    @pytest.mark.parametrize(
        "code",
        ["sk-proj-abc123", "SK-ANT-api03-xyz", "a" * 41, "two words", "", None, 429],
    )
    def test_credentials_long_strings_and_non_codes_are_dropped(self, code: object) -> None:
        """A code that looks like a key (``sk-``), is over 40 characters, or is no word is not copied."""
        assert safe_code(code) == ""

    def test_a_code_that_echoes_the_key_is_dropped(self) -> None:
        """A code that holds the key, is held in it, or has 8 characters of it is not copied."""
        key = "plain-key-77-4c1d9e"
        codes = [key, f"err_{key}", "plain-key", "x_key-77-4c1d9", "server_error"]
        kept = [safe_code(code, messages=["the prompt"], key=key) for code in codes]
        assert kept == ["", "", "", "", "server_error"]

    def test_a_code_that_echoes_the_prompt_is_dropped(self) -> None:
        """An unknown code that is a whole message, however short, holds one, is held in one, or
        has 12 characters of one is not copied: a server echoing the prompt into its code. One
        the messages do not hold is kept."""
        messages = ["throttled", "ok", "Look up alpha-bravo-7731 in the report"]
        codes = ["throttled", "not_ok_at_all", "report", "ticket_alpha-bravo-7731", "server_busy"]
        assert [safe_code(code, messages=messages) for code in codes] == ["", "", "", "", "server_busy"]

    def test_a_code_the_adapters_read_is_kept_whatever_the_prompt_says(self) -> None:
        """Finish reasons and error codes the adapters map are kept though a message holds them,
        or is them (they were dropped: a prompt asking about ``insufficient_quota`` made a spent
        quota a retried outage); a credential-shaped code is dropped whatever."""
        messages = [
            "Why do I get insufficient_quota from OpenAI?",
            "What is the length of the Nile?",
            "invalid_request_error",
            "content_filter",
        ]
        codes = ["insufficient_quota", "length", "invalid_request_error", "content_filter", "overloaded_error"]
        assert [safe_code(code, messages=messages) for code in codes] == codes
        assert safe_code("sk-live-1", messages=messages) == ""

    def test_an_unknown_code_any_message_holds_is_dropped_however_short(self) -> None:
        """An unknown code found anywhere inside a message, however short, is dropped: it may be
        the prompt's text echoed (a code of 11 characters inside a longer message was kept and
        shown in the error's details). A number of at most three digits (an HTTP status) is
        kept, and so is a code an adapter reads, whatever the messages say."""
        prompt = ["Sum 1429, 4020, 2401 and 1400.", "my pin is Zq7-Wx9-Kp2, keep it safe", "insufficient_quota?"]
        codes = ["429", "400", "1429", "Zq7-Wx9-Kp2", "insufficient_quota", "throttled"]
        kept = [safe_code(code, messages=prompt) for code in codes]
        assert kept == ["429", "400", "", "", "insufficient_quota", "throttled"]


class TestTransportErrors:
    def test_an_aiohttp_error_the_sdk_transport_does_not_translate_is_a_broken_stream(self) -> None:
        """The SDKs' aiohttp transport maps most aiohttp errors to httpx ones, not all: any other
        aiohttp error is a transport failure (ProviderUnavailable), not our bug."""
        error = transport_error(aiohttp.ServerFingerprintMismatch(b"a", b"b", "h", 443), provider="p", model="m")
        assert isinstance(error, ProviderUnavailable)
        assert "connection failed" in error.message
        assert transport_error(KeyError("x"), provider="p", model="m") is None

    async def test_a_request_body_that_cannot_be_encoded_is_our_bug_not_the_providers(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """A message with a lone surrogate has no UTF-8 form: the call fails before it is sent
        with the UnicodeEncodeError itself (a bug of ours, logged as such), not as the provider's
        "malformed stream" (ProviderUnavailable, counted against its breaker)."""
        with pytest.raises(UnicodeEncodeError):
            await collect(provider, make_call(messages=(Message(Role.USER, "answer: Paris \ud83d"),)))
        assert fake.requests == []


class TestAiohttpDetails:
    """The aiohttp behaviours ``_aiohttp.keeping_buffered`` works around, on aiohttp's own objects.
    First what it relies on: aiohttp keeps what it read in a failed reader's buffer. If a new
    aiohttp moves it, this fails here (and nothing is recovered, as before the wrapper) rather
    than somewhere less clear."""

    async def test_a_failed_reader_still_holds_what_it_read(self) -> None:
        protocol = BaseProtocol(asyncio.get_running_loop())
        reader = aiohttp.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
        reader.feed_data(b"data: one\n\n")
        reader.feed_data(b"data: two\n\n")
        assert await reader.read(4) == b"data"
        reader.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
        with pytest.raises(aiohttp.ClientPayloadError):
            await reader.read(1024)
        assert unread_bytes(reader) == b": one\n\ndata: two\n\n"

    def test_anything_else_holds_nothing(self) -> None:
        assert [unread_bytes(value) for value in (object(), None, b"bytes")] == [b"", b"", b""]

    async def test_a_parse_error_before_the_body_was_handed_over_fails_the_body(self) -> None:
        """Under load a malformed chunk line can be parsed before the wrapper sees the response:
        aiohttp's protocol then holds the error already, and the body is failed at once (the
        soak found two such streams ending INTERNAL before this)."""
        loop = asyncio.get_running_loop()
        protocol = ResponseHandler(loop)
        protocol.set_exception(HttpProcessingError(message="bad chunk size"))
        reader = aiohttp.StreamReader(protocol, 2**16, loop=loop)
        _KeepingStream(httpx2.ByteStream(b""), reader, protocol)
        assert isinstance(reader.exception(), aiohttp.ClientPayloadError)

    async def test_a_body_closed_late_leaves_the_next_bodys_relay_in_place(self) -> None:
        """aiohttp may hand a kept-alive connection to the next request before the previous body
        is closed: closing the earlier body must not remove the later body's parse-error relay,
        and the last one closed leaves the protocol as it found it."""
        loop = asyncio.get_running_loop()
        protocol = ResponseHandler(loop)
        first = aiohttp.StreamReader(protocol, 2**16, loop=loop)
        second = aiohttp.StreamReader(protocol, 2**16, loop=loop)
        earlier = _KeepingStream(httpx2.ByteStream(b""), first, protocol)
        later = _KeepingStream(httpx2.ByteStream(b""), second, protocol)
        await earlier.aclose()
        protocol.set_exception(HttpProcessingError(message="bad chunk size"))
        assert (first.exception(), type(second.exception())) == (None, aiohttp.ClientPayloadError)
        await later.aclose()
        assert "set_exception" not in vars(protocol)

    async def test_bodies_left_unclosed_neither_chain_relays_nor_form_cycles(self) -> None:
        """Bodies dropped without being closed on a kept-alive connection: the newest relay alone
        answers (no chain to grow over thousands of requests), and each body is freed as soon as
        it is dropped, without the cycle collector (whose late finalization of the SDK's async
        generators printed "async generator already executing" in a property test)."""
        loop = asyncio.get_running_loop()
        protocol = ResponseHandler(loop)
        readers = [aiohttp.StreamReader(protocol, 2**16, loop=loop) for _ in range(3)]
        bodies = [_KeepingStream(httpx2.ByteStream(b""), reader, protocol) for reader in readers]
        protocol.set_exception(HttpProcessingError(message="bad chunk size"))
        assert [type(reader.exception()) for reader in readers] == [type(None), type(None), aiohttp.ClientPayloadError]
        gone = weakref.ref(bodies[0])
        gc.disable()
        try:
            del bodies[0]
            assert gone() is None
        finally:
            gc.enable()

    async def test_a_read_on_a_connection_closed_unannounced_is_a_read_error(self) -> None:
        """aiohttp's reader raises a bare RuntimeError when it would wait on a closed connection
        whose body was never failed; the wrapper makes it the transport error it is."""
        loop = asyncio.get_running_loop()
        protocol = ResponseHandler(loop)  # never connected
        reader = aiohttp.StreamReader(protocol, 2**16, loop=loop)

        class Body(httpx2.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield await reader.read(16)

        with pytest.raises(httpx2.ReadError):
            async for _ in _KeepingStream(Body(), reader, protocol):
                pass


class TestConstruction:
    def test_unknown_kind_is_a_config_error(self) -> None:
        """A kind other than openai / openai_compatible fails at construction, naming the field."""
        with pytest.raises(ConfigError, match=r"providers\.x\.kind"):
            OpenAIProvider("x", "key", None, "anthropic")

    def test_name_and_kind(self) -> None:
        """The adapter reports its configured name and kind."""
        adapter = OpenAIProvider("vllm", None, "http://127.0.0.1:1/v1", "openai_compatible")
        assert (adapter.name, adapter.kind) == ("vllm", "openai_compatible")


class TestStreaming:
    async def test_default_answer_streams_word_chunks_then_usage(self, provider: OpenAIProvider) -> None:
        """The default script's words arrive as deltas in order, then one finish with usage."""
        events = await collect(provider, make_call())
        words = ["Hello ", "from ", "the ", "fake ", "provider."]
        assert events[:-1] == [TextDelta(word) for word in words]
        assert events[-1] == ProviderFinish(
            usage=Usage(input_tokens=len(f"You are terse. {CANARY_PROMPT}".split()), output_tokens=5),
            finish_reason=FinishReason.STOP,
            provider_model="gpt-4o-mini-2024-07-18",
        )

    async def test_sixty_chunks_arrive_exactly_once_in_order(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """N chunks are neither lost, duplicated nor reordered."""
        script = Script(chunk_count=60)
        fake.enqueue(script)
        events = await collect(provider, make_call())
        assert events[:-1] == [TextDelta(chunk) for chunk in script.content_chunks()]
        assert len(events) - 1 == 60

    async def test_usage_and_cached_tokens_come_from_the_usage_chunk(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """``prompt_tokens``, ``completion_tokens`` and ``prompt_tokens_details.cached_tokens`` are reported."""
        fake.enqueue(Script(input_tokens=1200, output_tokens=34, cached_input_tokens=1024))
        finish = (await collect(provider, make_call()))[-1]
        assert finish.usage == Usage(input_tokens=1200, output_tokens=34, cached_input_tokens=1024)  # type: ignore[union-attr]

    async def test_the_model_that_answered_is_reported(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """``provider_model`` is the ``model`` of the chunks, not the one requested."""
        fake.enqueue(Script(model="gpt-4o-mini-2099-01-01"))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.provider_model == "gpt-4o-mini-2099-01-01"

    @pytest.mark.parametrize(
        ("wire", "expected"),
        [
            ("stop", FinishReason.STOP),
            ("length", FinishReason.LENGTH),
            # No call came (the request offers no tools): not TOOL_CALLS (test_tool_calls.py).
            ("tool_calls", FinishReason.OTHER),
            ("function_call", FinishReason.OTHER),
            ("content_filter", FinishReason.CONTENT_FILTER),
            ("something_new", FinishReason.OTHER),
            # OpenAI-compatible servers' names for a natural stop: TGI's, Together's.
            ("eos_token", FinishReason.STOP),
            ("eos", FinishReason.STOP),
            ("stop_sequence", FinishReason.STOP),
        ],
    )
    async def test_finish_reasons_are_normalised(
        self, fake: FakeProvider, provider: OpenAIProvider, wire: str, expected: FinishReason
    ) -> None:
        """Each OpenAI ``finish_reason`` maps to one domain ``FinishReason``."""
        fake.enqueue(Script(finish_reason=wire))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.finish_reason == expected

    async def test_a_refusal_is_the_answer_and_finishes_as_content_filter(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """A model refusing (structured outputs) streams its words in ``delta.refusal`` and ends with
        ``stop``: they are the answer's text (they were dropped: an empty answer finished STOP), and
        the answer finishes CONTENT_FILTER, as Anthropic's ``refusal`` stop does."""
        fake.enqueue(Script(text="I'm sorry, I can't help with that.", refusal=True, output_tokens=9))
        events = await collect(provider, make_call())
        finish = events[-1]
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "I'm sorry, I can't help with that."
        assert isinstance(finish, ProviderFinish)
        assert (finish.finish_reason, finish.usage.output_tokens) == (FinishReason.CONTENT_FILTER, 9)

    async def test_unknown_chunks_and_oversized_lines_are_tolerated(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """An unknown object, a chunk missing its fields, or a 1 MiB chunk do not break the stream."""
        fake.enqueue(
            Script(fault=Fault.UNKNOWN_EVENT, fault_after=2),
            Script(fault=Fault.OVERSIZED_LINE, fault_after=1),
            Script(fault=Fault.INCOMPLETE_EVENT, fault_after=3),
        )
        for _ in range(3):
            events = await collect(provider, make_call())
            assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."

    async def test_fields_of_the_wrong_type_are_ignored(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A chunk whose model, content, choices and usage hold the wrong JSON types adds nothing
        (chunks arrive as plain JSON objects, unvalidated); the stream and its usage are intact."""
        fake.enqueue(Script(fault=Fault.WRONG_TYPES, fault_after=2, input_tokens=4))
        events = await collect(provider, make_call())
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        usage = (finish.usage.input_tokens, finish.usage.output_tokens)
        assert (usage, finish.provider_model) == ((4, 5), "gpt-4o-mini-2024-07-18")

    async def test_content_sent_as_a_list_of_parts_is_read_as_text_and_reasoning(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A server that streams ``delta.content`` as typed parts (Mistral's Magistral models:
        ``thinking`` parts, then ``text`` parts) has its text parts read as the answer and its
        thinking as reasoning (the whole answer was dropped: an empty answer finished STOP, billed)."""
        fake.enqueue(Script(content_parts=True, reasoning=("Six ", "times seven."), text="The answer is 42."))
        with capture_logs() as logs:
            events = await collect(compatible, make_call())
        assert events[:-1] == [
            Heartbeat("Six ", reasoning=True),
            Heartbeat("times seven.", reasoning=True),
            TextDelta("The "),
            TextDelta("answer "),
            TextDelta("is "),
            TextDelta("42."),
        ]
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.finish_reason == FinishReason.STOP
        assert [entry["event"] for entry in logs] == []

    async def test_chunks_that_carry_message_instead_of_delta_are_read(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A server whose streamed choices carry their piece in ``message`` rather than ``delta``
        has it read as a delta (it was dropped: an empty answer finished STOP, billed)."""
        fake.enqueue(Script(choice_message=True))
        events = await collect(compatible, make_call())
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."

    async def test_an_answer_with_output_tokens_but_nothing_readable_is_warned_of(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A stream that finished reporting output tokens but gave no text, reasoning or tool call
        (its answer in a shape not read) ends as it came, but is logged at warning with its counts,
        never its text; an empty answer that reports no output tokens is not."""
        fake.enqueue(Script(chunks=(), output_tokens=40), Script(chunks=(), output_tokens=0))
        with capture_logs() as logs:
            first = await collect(compatible, make_call())
            await collect(compatible, make_call())
        assert [type(event) for event in first] == [ProviderFinish]
        warned = [entry for entry in logs if entry["event"] == "provider_output_unread"]
        assert warned == [
            {
                "event": "provider_output_unread",
                "log_level": "warning",
                "provider": "local",
                "model": "gpt-4o-mini",
                "output_tokens": 40,
                "finish_reason": "stop",
            }
        ]

    async def test_the_unread_warning_never_logs_an_echoed_prompt_nor_fires_on_a_filtered_answer(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A finish reason that echoes a word of the prompt is dropped from the warning, as every
        code a provider sends is (it was logged); an answer the provider filtered
        (``content_filter``, empty, output tokens billed) is not a shape left unread: no warning
        (it warned)."""
        echoed = CANARY_PROMPT.split()[0]
        fake.enqueue(
            Script(chunks=(), output_tokens=40, finish_reason=echoed),
            Script(chunks=(), output_tokens=40, finish_reason="content_filter"),
        )
        with capture_logs() as logs:
            await collect(compatible, make_call())
            filtered = await collect(compatible, make_call())
        assert isinstance(filtered[-1], ProviderFinish)
        assert filtered[-1].finish_reason == FinishReason.CONTENT_FILTER
        warned = [entry for entry in logs if entry["event"] == "provider_output_unread"]
        assert [entry["finish_reason"] for entry in warned] == [""]
        assert echoed not in str(logs)

    async def test_a_finish_reason_the_prompt_mentions_reaches_the_finish_and_the_warning(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A finish ``length`` under a prompt asking for the length of the Nile is LENGTH and is
        logged as ``length``: a finish reason the adapter maps is no echo (it was logged as "")."""
        fake.enqueue(Script(chunks=(), output_tokens=40, finish_reason="length"))
        call = make_call(messages=(Message(Role.USER, "What is the length of the Nile?"),))
        with capture_logs() as logs:
            events = await collect(compatible, call)
        assert isinstance(events[-1], ProviderFinish)
        assert events[-1].finish_reason == FinishReason.LENGTH
        warned = [entry for entry in logs if entry["event"] == "provider_output_unread"]
        assert [entry["finish_reason"] for entry in warned] == ["length"]

    async def test_a_whole_message_closing_a_stream_of_deltas_is_not_read_again(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A stream of deltas whose finish chunk carries ``"delta": null`` and the whole answer
        under ``message`` (a gateway closing the stream with the finished message) has its answer
        once (it was doubled)."""
        fake.enqueue(Script(whole_message_at_end=True))
        events = await collect(compatible, make_call())
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."
        assert isinstance(events[-1], ProviderFinish)
        assert events[-1].finish_reason == FinishReason.STOP


class TestRequestShape:
    async def test_openai_kind_sends_max_completion_tokens_and_asks_for_usage(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """The body has the messages by role, ``max_completion_tokens``, streaming with usage."""
        await collect(provider, make_call(max_output_tokens=77, temperature=0.25))
        body = fake.requests[-1].body
        assert body == {
            "model": "gpt-4o-mini-2024-07-18",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": CANARY_PROMPT},
            ],
            "max_completion_tokens": 77,
            "temperature": 0.25,
        }

    async def test_compatible_kind_sends_max_tokens(self, fake: FakeProvider, compatible: OpenAIProvider) -> None:
        """vLLM, Ollama and llama.cpp get ``max_tokens``, never ``max_completion_tokens``."""
        await collect(compatible, make_call(max_output_tokens=64))
        body = fake.requests[-1].body
        assert (body["max_tokens"], "max_completion_tokens" in body) == (64, False)

    async def test_tools_are_sent_as_function_tools(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """Each ``ToolSpec`` becomes a function tool; an empty description or schema is left out."""
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        tool = ToolSpec(name="get_weather", description="Weather for a city", parameters=MappingProxyType(schema))
        await collect(provider, make_call(tools=(tool, ToolSpec(name="now"))))
        assert fake.requests[-1].body["tools"] == [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather for a city", "parameters": schema},
            },
            {"type": "function", "function": {"name": "now"}},
        ]

    async def test_extra_headers_and_the_key_are_sent(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """``ProviderCall.headers`` (e.g. traceparent) go upstream; the key goes as a Bearer token."""
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await collect(provider, make_call(headers=MappingProxyType({"traceparent": traceparent})))
        record = fake.requests[-1]
        assert (record.headers["traceparent"], record.api_key) == (traceparent, CANARY_KEY)

    async def test_no_sdk_retries(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A 503 is not retried by the SDK: exactly one upstream request (our retry loop decides)."""
        fake.enqueue(Script(status=503))
        await collect_until_error(provider, make_call())
        assert len(fake.requests) == 1


class TestMissingUsage:
    async def test_compatible_server_without_usage_gets_an_estimate(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """A server that sends no usage chunk still yields a finish, with estimated usage, logged."""
        fake.enqueue(Script(omit_usage=True))
        with capture_logs() as logs:
            events = await collect(compatible, make_call())
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.usage.input_tokens > 0
        assert finish.usage.output_tokens > 0
        assert [entry["event"] for entry in logs] == ["provider_usage_estimated"]
        assert all(CANARY_PROMPT not in str(entry) for entry in logs)

    async def test_a_usage_chunk_that_came_with_the_finish_inside_the_deadlines_margin_is_read(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """The finish and the usage chunk arrive together about 40 ms before the call's deadline,
        inside the 50 ms margin kept before it: the usage already there is read and billed (the
        stream was ended unread, and the call billed a tokenizer estimate)."""
        fake.enqueue(Script(first_chunk_delay=0.31, chunk_count=1, input_tokens=111, output_tokens=222))
        events = await collect(provider, make_call(timeout=0.35))
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (111, 222, False)

    async def test_a_finished_answer_without_usage_whose_body_is_held_open_ends_with_an_estimate(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """After the finish reason, a usage chunk asked for (``include_usage``) is waited for a
        second (``_USAGE_WAIT_SECONDS``), not as long as the body stays open: a server that sends
        none and holds the body open without ``[DONE]`` gets its answer finished with an estimate
        (it was read until the router's idle timer failed it)."""
        fake.enqueue(Script(fault=Fault.HANG_AT_END, omit_usage=True))
        started = time.monotonic()
        async with asyncio.timeout(10):
            events = await collect(provider, make_call())
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.finish_reason, finish.estimated) == (FinishReason.STOP, True)
        assert time.monotonic() - started < 5
        await fake.requests[0].wait_ended(timeout=5.0)
        assert fake.requests[0].aborted

    async def test_a_server_that_never_reports_usage_warns_once_per_model(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """Many OpenAI-compatible servers never report usage: the first estimate of a model is a
        warning, the next ones are at debug (every request warned)."""
        fake.set_default(Script(omit_usage=True))
        with capture_logs() as logs:
            for _ in range(3):
                await collect(compatible, make_call())
        levels = [entry["log_level"] for entry in logs if entry["event"] == "provider_usage_estimated"]
        assert levels == ["warning", "debug", "debug"]

    async def test_the_estimate_is_flagged_and_covers_the_whole_request(
        self, fake: FakeProvider, compatible: OpenAIProvider
    ) -> None:
        """The finish says the usage is estimated, and the input estimate is the router's own
        (message framing and tool definitions included), not the message text alone."""
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
        tools = (ToolSpec(name="fill", description="Fill a form", parameters=MappingProxyType(schema)),)
        call = make_call(tools=tools)
        fake.enqueue(Script(omit_usage=True))
        finish = (await collect(compatible, call))[-1]
        assert isinstance(finish, ProviderFinish)
        expected = estimate_input_tokens(ChatRequest(messages=call.messages, tools=tools))
        assert (finish.estimated, finish.usage.input_tokens) == (True, expected)

    async def test_reported_usage_is_not_flagged(self, fake: FakeProvider, compatible: OpenAIProvider) -> None:
        """A server that reports usage gets a finish whose usage is not estimated."""
        finish = (await collect(compatible, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.estimated is False


# An error of the stream after the finish chunk, before ``[DONE]``: an error event, or a reset.
_AN_ERROR_BEFORE_DONE = pytest.mark.parametrize(
    "fault",
    [
        Script(fault=Fault.ERROR_EVENT, fault_at_end=True, error_type="server_error"),
        Script(fault=Fault.RESET_AT_END, hang_seconds=0.05),
    ],
    ids=["error_event", "reset"],
)


class TestAfterTheFinish:
    """What follows an answer whose finish reason came: its usage, ``[DONE]``, the body's end."""

    async def test_a_reset_after_the_usage_ends_the_answer_ok_with_its_usage(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """The finish and the usage came, then the connection is reset before ``[DONE]``: the
        answer ends OK with the usage reported (it failed the attempt ProviderUnavailable, the
        whole answer sent), and the reset is logged by its code, without the prompt."""
        fake.enqueue(Script(fault=Fault.RESET_AT_END, hang_seconds=0.05, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            events = await collect(provider, make_call())
        _assert_whole_with_the_error_logged(events, logs)

    async def test_a_reset_after_the_finish_ends_the_answer_ok_when_no_usage_was_asked_for(
        self, fake: FakeProvider, http_client: HttpClientKind
    ) -> None:
        """Without ``include_usage`` (``stream_usage: false``) the drain starts at the finish: a
        reset then ends the answer OK, its usage estimated (it failed the attempt)."""
        adapter = OpenAIProvider(
            "local", "", fake.openai_base_url, "openai_compatible", http_client=http_client, stream_usage=False
        )
        try:
            fake.enqueue(Script(fault=Fault.RESET_AT_END, hang_seconds=0.05))
            finish = (await collect(adapter, make_call()))[-1]
        finally:
            await adapter.aclose()
        assert isinstance(finish, ProviderFinish)
        assert (finish.finish_reason, finish.estimated) == (FinishReason.STOP, True)

    async def test_an_event_not_an_object_after_the_usage_ends_the_answer_ok_with_its_usage(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """After the finish and the usage chunk, ``data: null`` (JSON, not an object) before
        ``[DONE]`` is an error of the stream as any other there: the answer ends OK with the usage
        reported, logged (it failed the attempt "stream event is not a JSON object", the whole
        answer sent, and an estimate was billed)."""
        fake.enqueue(Script(fault=Fault.NOT_AN_OBJECT, fault_at_end=True, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.finish_reason, finish.usage.input_tokens, finish.usage.output_tokens) == (
            FinishReason.STOP,
            11,
            7,
        )
        assert not finish.estimated
        warnings = [entry["reason"] for entry in logs if entry["event"] == "provider_error_after_finish"]
        assert warnings == ["PROVIDER_UNAVAILABLE"]

    @_AN_ERROR_BEFORE_DONE
    async def test_an_error_after_a_finish_chunk_carrying_the_usage_ends_the_answer_ok_with_it(
        self, fake: FakeProvider, provider: OpenAIProvider, fault: Script
    ) -> None:
        """A server that puts the whole usage on the finish chunk and sends no usage-only chunk
        (Gemini's OpenAI-compatible endpoint, some gateways), then an error of the stream before
        ``[DONE]``: the answer and its usage came, it ends OK with that usage, the error logged by
        its code (it failed the attempt while the usage chunk was waited for, and an estimate was
        billed)."""
        fake.enqueue(replace(fault, usage_on_finish=True, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            events = await collect(provider, make_call())
        _assert_whole_with_the_error_logged(events, logs)

    async def test_a_finish_chunk_carrying_the_usage_ends_at_done_with_it(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """The usage on the finish chunk, then ``[DONE]``: that usage, reported, no warning."""
        fake.enqueue(Script(usage_on_finish=True, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (11, 7, False)
        assert not [entry for entry in logs if entry["event"] == "provider_error_after_finish"]

    @_AN_ERROR_BEFORE_DONE
    async def test_an_error_after_a_finish_chunk_carrying_zero_counts_fails_the_attempt(
        self, fake: FakeProvider, provider: OpenAIProvider, fault: Script
    ) -> None:
        """Zero counts on the finish chunk of an answer with text are a placeholder, no usage: an
        error of the stream before ``[DONE]`` fails the attempt after the text, as while the usage
        is waited for (it ended OK billed 0 tokens, not estimated)."""
        fake.enqueue(replace(fault, usage_on_finish=True, input_tokens=0, output_tokens=0))
        texts, error = await collect_until_error(provider, make_call())
        assert ("".join(texts), type(error)) == ("Hello from the fake provider.", ProviderUnavailable)

    async def test_zero_counts_on_the_finish_chunk_of_an_answer_with_text_are_estimated(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """Zero counts on the finish chunk, then ``[DONE]``: the answer has text, so they are no
        count; the usage is estimated and marked so, as when none came (it was billed 0 tokens)."""
        fake.enqueue(Script(usage_on_finish=True, input_tokens=0, output_tokens=0))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        estimate = (estimate_input_tokens(make_call().as_chat()), count_text_tokens("Hello from the fake provider."))
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (*estimate, True)

    async def test_a_reset_while_the_usage_is_waited_for_still_fails_the_attempt(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """The usage was asked for and has not come when the connection is reset: the attempt
        fails ProviderUnavailable after the text, as a cut stream does (its usage unknown)."""
        fake.enqueue(Script(fault=Fault.RESET_AT_END, hang_seconds=0.05, omit_usage=True))
        texts, error = await collect_until_error(provider, make_call())
        assert ("".join(texts), type(error)) == ("Hello from the fake provider.", ProviderUnavailable)


class TestErrorTranslation:
    @pytest.mark.parametrize(("status", "error_class"), STATUS_ERRORS)
    async def test_status_maps_to_one_error_class_with_a_sanitized_message(
        self, fake: FakeProvider, provider: OpenAIProvider, status: int, error_class: type[ProviderError]
    ) -> None:
        """Each HTTP status becomes its documented error; the echoed prompt and key are not copied."""
        fake.enqueue(Script(status=status))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error), error.status) == ([], error_class, status)
        assert (error.provider, error.model) == ("openai", "gpt-4o-mini")
        assert f"HTTP {status}" in error.message
        assert_sanitized(error)

    @pytest.mark.parametrize("status", [405, 410, 415, 418, 451])
    async def test_a_compatible_servers_other_4xx_is_a_rejection(
        self, fake: FakeProvider, compatible: OpenAIProvider, status: int
    ) -> None:
        """An ``openai_compatible`` server (a gateway) answering a 4xx outside the ones handled by
        name refuses the request: ``ProviderRejected``, final, as for the ``openai`` kind."""
        fake.enqueue(Script(status=status))
        texts, error = await collect_until_error(compatible, make_call())
        assert (texts, type(error), error.status) == ([], ProviderRejected, status)

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({"retry_after": "7"}, 7.0),
            ({"retry_after": "1.5"}, 1.5),
            ({"retry_after_ms": "250"}, 0.25),
            ({"retry_after": "7", "retry_after_ms": "2500"}, 2.5),
        ],
    )
    async def test_rate_limit_carries_retry_after(
        self, fake: FakeProvider, provider: OpenAIProvider, headers: dict[str, str], expected: float
    ) -> None:
        """``retry-after-ms`` wins over ``Retry-After`` seconds; both become ``retry_after`` seconds."""
        fake.enqueue(Script(status=429, **headers))  # type: ignore[arg-type]
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderRateLimited)
        assert error.retry_after == expected

    async def test_rate_limit_retry_after_as_http_date(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A ``Retry-After`` HTTP date becomes the seconds left until then."""
        fake.enqueue(Script(status=429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True)))
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderRateLimited)
        assert error.retry_after is not None
        assert 25 <= error.retry_after <= 31

    async def test_rate_limit_without_retry_after(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A 429 that says nothing about when to retry has ``retry_after`` None."""
        fake.enqueue(Script(status=429))
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderRateLimited)
        assert error.retry_after is None

    async def test_insufficient_quota_is_quota_exhausted_not_a_rate_limit(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """A 429 whose code is ``insufficient_quota`` (billing exhausted) is ``ProviderQuotaExhausted``:
        no retry helps, so it carries no ``retry_after`` even when the provider sent one."""
        fake.enqueue(Script(status=429, error_type="insufficient_quota", retry_after="20"))
        _, error = await collect_until_error(provider, make_call())
        assert (type(error), error.status, error.retry_after) == (ProviderQuotaExhausted, 429, None)
        assert error.message == "provider openai model gpt-4o-mini: HTTP 429 (insufficient_quota)"

    async def test_the_key_echoed_as_the_error_type_is_not_copied(
        self, fake: FakeProvider, http_client: HttpClientKind
    ) -> None:
        """A server that puts our key in its error type gets no part of it into the message, even a
        key that does not look like one."""
        key = "plain-canary-key-5e2a"
        adapter = OpenAIProvider("openai", key, fake.openai_base_url, "openai", http_client=http_client)
        try:
            fake.enqueue(Script(status=401, error_type=key))
            _, error = await collect_until_error(adapter, make_call())
        finally:
            await adapter.aclose()
        assert (type(error), error.message) == (ProviderAuthFailed, "provider openai model gpt-4o-mini: HTTP 401")

    async def test_non_json_error_body(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """An HTML error page from a proxy still maps by status and is not copied."""
        fake.enqueue(Script(status=502, error_body=f"<html>bad gateway {CANARY_PROMPT}</html>"))
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderUnavailable)
        assert_sanitized(error)

    async def test_connection_refused_is_unavailable(self, http_client: HttpClientKind) -> None:
        """Nothing listening: ProviderUnavailable, no status, said as a connection failure."""
        adapter = OpenAIProvider("openai", CANARY_KEY, "http://127.0.0.1:1/v1", http_client=http_client)
        try:
            texts, error = await collect_until_error(adapter, make_call())
        finally:
            await adapter.aclose()
        assert (texts, type(error), error.status) == ([], ProviderUnavailable, None)
        assert "connection failed" in error.message  # not "timed out", over either transport
        assert_sanitized(error)


class TestMidStreamFailures:
    async def test_cut_after_40_of_60_chunks(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A connection closed mid-body gives exactly the 40 chunks sent, then ProviderUnavailable."""
        script = Script(chunk_count=60, fault=Fault.CUT, fault_after=40)
        fake.enqueue(script)
        texts, error = await collect_until_error(provider, make_call())
        assert texts == list(script.content_chunks()[:40])
        assert isinstance(error, ProviderUnavailable)

    async def test_connection_reset_mid_stream(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A TCP reset after 3 chunks gives those 3, then ProviderUnavailable."""
        fake.enqueue(Script(chunk_count=10, fault=Fault.RESET, fault_after=3))
        texts, error = await collect_until_error(provider, make_call())
        assert (len(texts), type(error)) == (3, ProviderUnavailable)

    @pytest.mark.parametrize(
        ("error_type", "error_class"),
        [
            ("server_error", ProviderUnavailable),
            ("rate_limit_error", ProviderRateLimited),
            ("invalid_request_error", ProviderRejected),
            ("context_length_exceeded", ProviderRejected),
            ("BadRequestError", ProviderRejected),  # vLLM's: the exception's class name
            ("NotFoundError", ProviderRejected),
            ("RateLimitError", ProviderRateLimited),
            ("AuthenticationError", ProviderAuthFailed),
        ],
    )
    async def test_in_band_error_chunk(
        self, fake: FakeProvider, provider: OpenAIProvider, error_type: str, error_class: type[ProviderError]
    ) -> None:
        """An ``{"error": ...}`` chunk inside a 200 stream is a ProviderError by its type, sanitized."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=2, error_type=error_type))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == (["Hello ", "from "], error_class)
        assert_sanitized(error)

    @pytest.mark.parametrize(
        ("error_type", "code", "error_class"),
        [
            ("BadRequestError", 400, ProviderRejected),  # vLLM: the HTTP status as a number
            ("NotFoundError", 404, ProviderRejected),
            ("InternalServerError", 500, ProviderUnavailable),
            ("throttled", "429", ProviderRateLimited),  # LiteLLM: the status as text
            ("BadRequestError", "unknown_word", ProviderRejected),  # a code not known: the type
            ("server_error", "rate_limit_exceeded", ProviderRateLimited),  # a code known: the code
            ("insufficient_quota", 429, ProviderQuotaExhausted),
        ],
    )
    async def test_in_band_error_chunk_by_its_code(
        self,
        fake: FakeProvider,
        compatible: OpenAIProvider,
        error_type: str,
        code: str | int,
        error_class: type[ProviderError],
    ) -> None:
        """An error chunk's code that is an HTTP status is read as that status (vLLM's 400 was
        read as an unknown word: unavailable, retried); a code word not known gives way to the type."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, error_type=error_type, error_code=code))
        _, error = await collect_until_error(compatible, make_call())
        assert (type(error), error.status) == (error_class, None)

    @pytest.mark.parametrize(
        ("code", "error_class"),
        [
            ("429", ProviderRateLimited),
            (402, ProviderQuotaExhausted),
            (401, ProviderAuthFailed),
            (400, ProviderRejected),
        ],
    )
    async def test_an_in_band_status_code_is_read_whatever_numbers_the_prompt_holds(
        self, fake: FakeProvider, compatible: OpenAIProvider, code: str | int, error_class: type[ProviderError]
    ) -> None:
        """An error chunk whose code is an HTTP status, under a prompt holding those digits inside
        other numbers: read as that status, as without them. (The code was dropped as an echo of
        the prompt, and LiteLLM's type "None" then made it unavailable.)"""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, error_type="None", error_code=code))
        call = make_call(messages=(Message(Role.USER, "Sum 1429, 4020, 2401 and 1400."),))
        _, error = await collect_until_error(compatible, call)
        assert (type(error), error.message) == (
            error_class,
            f"provider local model gpt-4o-mini: error event in stream ({code})",
        )

    @pytest.mark.parametrize(
        ("error_type", "error_class"),
        [("insufficient_quota", ProviderQuotaExhausted), ("invalid_request_error", ProviderRejected)],
    )
    @pytest.mark.parametrize(
        "prompt", ["hello", "Why do I get insufficient_quota, or invalid_request_error, from OpenAI?"]
    )
    async def test_an_in_band_error_is_read_alike_whatever_the_prompt_says_of_its_type(
        self,
        fake: FakeProvider,
        provider: OpenAIProvider,
        prompt: str,
        error_type: str,
        error_class: type[ProviderError],
    ) -> None:
        """An error chunk typed ``insufficient_quota`` or ``invalid_request_error`` is a spent
        quota or a rejection, the type named, under a prompt that mentions the type as under one
        that does not (the type was dropped as an echo: unavailable, retried and fallen back)."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0, error_type=error_type))
        _, error = await collect_until_error(provider, make_call(messages=(Message(Role.USER, prompt),)))
        assert (type(error), error.message) == (
            error_class,
            f"provider openai model gpt-4o-mini: error event in stream ({error_type})",
        )

    async def test_an_http_errors_code_the_prompt_mentions_is_named(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """A 400 typed ``invalid_request_error`` under a prompt asking about that type names it in
        the error (it was dropped as an echo); one that is the whole one-word prompt is not."""
        fake.enqueue(Script(status=400, error_type="invalid_request_error"), Script(status=400, error_type="Nile"))
        mentions = make_call(messages=(Message(Role.USER, "What does invalid_request_error mean?"),))
        _, named = await collect_until_error(provider, mentions)
        _, echoed = await collect_until_error(provider, make_call(messages=(Message(Role.USER, "Nile"),)))
        assert named.message == "provider openai model gpt-4o-mini: HTTP 400 (invalid_request_error)"
        assert echoed.message == "provider openai model gpt-4o-mini: HTTP 400"

    async def test_in_band_error_before_content(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """An error chunk before any text is an error with nothing yielded (retryable pre-commit)."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == ([], ProviderUnavailable)

    async def test_events_whose_blank_line_is_a_crlf_after_a_lf_are_bounded_one_by_one(
        self, fake: FakeProvider, http_client: HttpClientKind
    ) -> None:
        """A server ending each event with ``\\n`` then ``\\r\\n`` (a blank line to the SSE spec and
        the openai SDK): a stream of 200 small events, 30 kB in all, is read whole under an 8 kB
        ``max_event_bytes`` (the bound took the stream for one event and failed it)."""
        adapter = OpenAIProvider(
            "openai", CANARY_KEY, fake.openai_base_url, "openai", http_client=http_client, max_event_bytes=8192
        )
        try:
            fake.enqueue(Script(chunk_count=200, event_blank_line="\r\n"))
            events = await collect(adapter, make_call())
            text = "".join(e.text for e in events if isinstance(e, TextDelta))
            assert text == "".join(f"chunk-{index} " for index in range(200))
        finally:
            await adapter.aclose()

    def test_every_coding_the_http_stack_decodes_is_one_a_stream_is_refused_in(self) -> None:
        """The codings refused on a stream cover httpx2's decoders (aiohttp's transport passes
        bodies on undecoded): a coding it learns to decode fails here first."""
        assert set(SUPPORTED_DECODERS) - {"identity"} <= DECODED_CODINGS

    @pytest.mark.parametrize(
        "fault", [Fault.MALFORMED_LINE, Fault.NON_UTF8, Fault.MISSING_TERMINATOR, Fault.NOT_AN_OBJECT]
    )
    async def test_broken_streams_are_unavailable(
        self, fake: FakeProvider, provider: OpenAIProvider, fault: Fault
    ) -> None:
        """Malformed JSON, non-UTF-8 bytes, a body that ends without finishing, or a chunk that is
        JSON but not an object: ProviderUnavailable."""
        fake.enqueue(Script(fault=fault, fault_after=1))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert_sanitized(error)

    async def test_a_null_chunk_is_a_broken_stream_not_its_end(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """``data: null`` is reported as what it is (a chunk that is not an object), not read as the
        end of the stream."""
        fake.enqueue(Script(fault=Fault.NOT_AN_OBJECT, fault_after=1))
        _, error = await collect_until_error(provider, make_call())
        assert "not a JSON object" in error.message


class TestCancellation:
    async def test_cancel_mid_stream_aborts_upstream_within_a_second(
        self, fake: FakeProvider, provider: OpenAIProvider
    ) -> None:
        """Cancelling the consuming task closes the HTTP response; the fake sees the abort at once."""
        fake.enqueue(Script(chunk_count=1000, chunk_delay=0.01))

        async def consume() -> None:
            async for _ in provider.stream(make_call()):
                pass

        task = asyncio.create_task(consume())
        await eventually(lambda: bool(fake.requests) and fake.requests[-1].chunks_sent >= 10)
        cancelled_at = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert record.aborted
        assert record.aborted_at is not None
        assert record.aborted_at - cancelled_at < 1.0

    async def test_cancel_before_the_first_token(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A cancel while the provider has not answered at all still closes the request."""
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        task = asyncio.create_task(collect(provider, make_call()))
        await eventually(lambda: bool(fake.requests))
        cancelled_at = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert record.aborted
        assert record.aborted_at is not None
        assert record.aborted_at - cancelled_at < 1.0

    async def test_closing_the_iterator_aborts_upstream(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """``aclose()`` after a few deltas closes the HTTP response before the answer is complete."""
        fake.enqueue(Script(chunk_count=50, fault=Fault.HANG, fault_after=5))
        stream = provider.stream(make_call())
        received = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # type: ignore[attr-defined]
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert (len(received), record.aborted, record.completed) == (3, True, False)


class TestTimeout:
    async def test_no_answer_within_the_timeout(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A provider that never answers fails with ProviderTimedOut (a ProviderUnavailable) at
        ``call.timeout``, upstream closed."""
        # A whole answer first opens the connection: cold, on a loaded machine, reaching the fake
        # can take a good part of a short deadline (0.3 s was the deadline).
        await collect(provider, make_call())
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        started = time.monotonic()
        texts, error = await collect_until_error(provider, make_call(timeout=1.0))
        elapsed = time.monotonic() - started
        assert (texts, type(error)) == ([], ProviderTimedOut)
        # At the timeout: not before it (less a timer's tolerance), after it only by a loaded
        # machine's slack (nothing else would end the call).
        assert 0.95 <= elapsed < 1.0 + 1.5
        assert len(fake.requests) == 2
        record = fake.requests[-1]
        await record.wait_ended(5.0)
        assert record.aborted

    async def test_timeout_bounds_the_whole_stream(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """Chunks that keep coming slowly do not extend the deadline: the total is bounded."""
        # A whole answer first opens the connection: cold, on a loaded machine, reaching the fake
        # can take a good part of a short deadline (0.4 s was the deadline).
        await collect(provider, make_call())
        fake.enqueue(Script(chunk_count=100, chunk_delay=0.05))
        started = time.monotonic()
        texts, error = await collect_until_error(provider, make_call(timeout=1.0))
        assert isinstance(error, ProviderUnavailable)
        assert 0 < len(texts) < 100
        # The deadline, not the 5 s stream, ends it; the slack is for a loaded machine.
        assert time.monotonic() - started < 1.0 + 1.5


class TestLogging:
    async def test_debug_logging_does_not_record_the_prompt_or_key(
        self, fake: FakeProvider, provider: OpenAIProvider, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With every logger at DEBUG, neither the SDK nor the adapter logs the prompt or the key."""
        fake.enqueue(Script(status=400), Script())
        with caplog.at_level(logging.DEBUG):
            await collect_until_error(provider, make_call())
            await collect(provider, make_call())
        assert caplog.records
        assert "canary" not in caplog.text


class TestConnectionReuse:
    async def test_sequential_streams_share_one_connection(self, fake: FakeProvider, provider: OpenAIProvider) -> None:
        """A finished stream hands its connection back: the next call reuses it."""
        for _ in range(3):
            await collect(provider, make_call())
        assert [record.connection for record in fake.requests] == [1, 1, 1]
        assert fake.connections_accepted == 1


def _assert_whole_with_the_error_logged(events: list[ProviderEvent], logs: list[MutableMapping[str, object]]) -> None:
    """The whole default answer, STOP, at the usage the fake reported (11 in, 7 out), and the error
    that came after it logged once by its code, at warning, without the prompt."""
    finish = events[-1]
    assert isinstance(finish, ProviderFinish)
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert (text, finish.finish_reason) == ("Hello from the fake provider.", FinishReason.STOP)
    assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (11, 7, False)
    warnings = [entry for entry in logs if entry["event"] == "provider_error_after_finish"]
    assert [(entry["log_level"], entry["reason"]) for entry in warnings] == [("warning", "PROVIDER_UNAVAILABLE")]
    assert all("canary" not in str(entry) for entry in logs)
