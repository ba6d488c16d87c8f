"""The Anthropic adapter, through the real ``anthropic`` SDK, over HTTP to the fake provider."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import MappingProxyType

import httpx2
import pytest
from anthropic._streaming import SSEDecoder
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from routesvc.errors import (
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
    InputReported,
    Message,
    ProviderEvent,
    ProviderFinish,
    Role,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
)
from routesvc.providers._event_size import (
    DEFAULT_MAX_EVENT_BYTES,
    AnthropicEventEnds,
    EventBound,
    _BoundedEvents,
)
from routesvc.providers.anthropic import AnthropicProvider
from routesvc.providers.base import HttpClientKind, ProviderCall, close_stream
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.tokens import count_text_tokens, estimate_input_tokens
from tests.provider_statuses import STATUS_ERRORS
from tests.raw_upstream import RawUpstream, Reply, anthropic_event, anthropic_stream

CANARY_PROMPT = "canary-prompt-0b7e11 please repeat this"
CANARY_KEY = "sk-ant-canary-key-3c5a90"


def make_call(**overrides: object) -> ProviderCall:
    """A call carrying the canary prompt, as the router would build it."""
    values: dict[str, object] = {
        "model": "claude-sonnet",
        "provider_model": "claude-sonnet-test",
        "messages": (
            Message(Role.SYSTEM, "You are terse."),
            Message(Role.USER, CANARY_PROMPT),
            Message(Role.ASSISTANT, "Sure."),
            Message(Role.USER, "Go on."),
        ),
    }
    values.update(overrides)
    return ProviderCall(**values)  # type: ignore[arg-type]


async def collect(provider: AnthropicProvider, call: ProviderCall) -> list[ProviderEvent]:
    """Every event of a stream that must succeed."""
    return [event async for event in provider.stream(call)]


async def collect_until_error(provider: AnthropicProvider, call: ProviderCall) -> tuple[list[str], ProviderError]:
    """The text deltas received before the stream failed, and the error it failed with."""
    texts: list[str] = []

    async def drain() -> None:
        async for event in provider.stream(call):
            if isinstance(event, InputReported):
                continue
            assert isinstance(event, TextDelta)
            texts.append(event.text)

    with pytest.raises(ProviderError) as info:
        await drain()
    return texts, info.value


def assert_sanitized(error: ProviderError) -> None:
    """Neither the prompt nor the key appear in what the error says."""
    for text in (str(error), error.message, repr(error.args)):
        assert "canary" not in text


def assert_whole_with_the_usage_reported(events: list[ProviderEvent]) -> None:
    """The fake's whole answer, stopped, with the usage it reported (11 in, 7 out), not estimated."""
    finish = events[-1]
    assert isinstance(finish, ProviderFinish)
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert (text, finish.finish_reason) == ("Hello from the fake provider.", FinishReason.STOP)
    assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (11, 7, False)


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
async def provider(fake: FakeProvider, http_client: HttpClientKind) -> AsyncIterator[AnthropicProvider]:
    """An adapter pointed at the fake."""
    adapter = AnthropicProvider("anthropic", CANARY_KEY, fake.anthropic_base_url, http_client=http_client)
    yield adapter
    await adapter.aclose()


class TestStreaming:
    async def test_default_answer_streams_word_chunks_then_usage(self, provider: AnthropicProvider) -> None:
        """The input message_start reports comes first, then the default script's words as deltas
        in order, then one finish with usage."""
        events = await collect(provider, make_call())
        words = ["Hello ", "from ", "the ", "fake ", "provider."]
        input_tokens = len(f"You are terse. {CANARY_PROMPT} Sure. Go on.".split())
        assert events[0] == InputReported(Usage(input_tokens=input_tokens))
        assert events[1:-1] == [TextDelta(word) for word in words]
        assert events[-1] == ProviderFinish(
            usage=Usage(input_tokens=input_tokens, output_tokens=5),
            finish_reason=FinishReason.STOP,
            provider_model="claude-sonnet-test",
        )

    async def test_a_thinking_block_comes_as_reasoning(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A thinking block's start, deltas and signature are chunks without answer text that say
        they are reasoning (a cascade's output-limit rule tells a model that reasoned by them)."""
        fake.enqueue(Script(reasoning=("Let me think. ", "France. "), text="Paris."))
        events = await collect(provider, make_call())
        beats = [event for event in events if isinstance(event, Heartbeat)]
        assert [beat.text for beat in beats if beat.text] == ["Let me think. ", "France. "]
        assert all(beat.reasoning for beat in beats)
        assert [event for event in events if isinstance(event, TextDelta)] == [TextDelta("Paris.")]

    @pytest.mark.parametrize("reasoning", [(), ("Let me think. ",)])
    async def test_text_sent_whole_in_its_blocks_start_is_the_answer(
        self, fake: FakeProvider, provider: AnthropicProvider, reasoning: tuple[str, ...]
    ) -> None:
        """A text block whose whole text comes in ``content_block_start`` and no ``text_delta`` (a
        gateway re-streaming a finished message), first block or after thinking, is the answer: it
        was dropped (OK, STOP, an empty answer, billed), while the SDK's own accumulator kept it."""
        fake.enqueue(Script(text="Paris is the capital.", text_in_start=True, reasoning=reasoning))
        events = await collect(provider, make_call())
        assert [event for event in events if isinstance(event, TextDelta)] == [TextDelta("Paris is the capital.")]
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.finish_reason == FinishReason.STOP

    async def test_sixty_chunks_arrive_exactly_once_in_order(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """N chunks are neither lost, duplicated nor reordered."""
        script = Script(chunk_count=60)
        fake.enqueue(script)
        events = await collect(provider, make_call())
        assert events[1:-1] == [TextDelta(chunk) for chunk in script.content_chunks()]

    async def test_input_includes_cache_reads_and_writes(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """Anthropic reports cached input apart; ``input_tokens`` sums all three, cached = cache reads,
        cache writes counted apart too, with those of the 1-hour cache."""
        fake.enqueue(
            Script(
                input_tokens=5000,
                cached_input_tokens=4000,
                cache_creation_input_tokens=600,
                cache_creation_1h_input_tokens=200,
            )
        )
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.usage == Usage(
            input_tokens=5000,
            output_tokens=5,
            cached_input_tokens=4000,
            cache_write_input_tokens=600,
            cache_write_1h_input_tokens=200,
        )

    async def test_output_tokens_are_the_last_cumulative_count(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """``message_delta`` carries the cumulative output count, which wins over ``message_start``'s."""
        fake.enqueue(Script(output_tokens=321))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.usage.output_tokens == 321

    @pytest.mark.parametrize(
        ("wire", "expected"),
        [
            ("end_turn", FinishReason.STOP),
            ("stop_sequence", FinishReason.STOP),
            ("max_tokens", FinishReason.LENGTH),
            ("model_context_window_exceeded", FinishReason.LENGTH),
            # No call came (the request offers no tools): not TOOL_CALLS (test_tool_calls.py).
            ("tool_use", FinishReason.OTHER),
            ("refusal", FinishReason.CONTENT_FILTER),
            ("pause_turn", FinishReason.OTHER),
        ],
    )
    async def test_stop_reasons_are_normalised(
        self, fake: FakeProvider, provider: AnthropicProvider, wire: str, expected: FinishReason
    ) -> None:
        """Each Anthropic ``stop_reason`` maps to one domain ``FinishReason``."""
        fake.enqueue(Script(finish_reason=wire))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.finish_reason == expected

    async def test_unknown_events_and_oversized_pings_are_tolerated(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """An unknown event type, a delta missing its fields, or a 1 MiB ping do not break the stream."""
        fake.enqueue(
            Script(fault=Fault.UNKNOWN_EVENT, fault_after=2),
            Script(fault=Fault.OVERSIZED_LINE, fault_after=1),
            Script(fault=Fault.INCOMPLETE_EVENT, fault_after=3),
        )
        for _ in range(3):
            events = await collect(provider, make_call())
            assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."

    async def test_a_delta_of_the_wrong_type_is_ignored(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A text delta whose text is a number adds nothing; the rest of the stream is intact."""
        fake.enqueue(Script(fault=Fault.WRONG_TYPES, fault_after=2))
        events = await collect(provider, make_call())
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello from the fake provider."

    async def test_missing_usage_is_estimated(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A stream without usage still finishes, with estimated usage, logged without content."""
        fake.enqueue(Script(omit_usage=True))
        with capture_logs() as logs:
            finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.usage.input_tokens > 0
        assert finish.usage.output_tokens > 0
        assert [entry["event"] for entry in logs] == ["provider_usage_estimated"]
        assert all(CANARY_PROMPT not in str(entry) for entry in logs)

    async def test_a_missing_output_count_is_estimated_and_the_reported_input_kept(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """A stream that reports its input (with cache reads and writes) but no output count (a
        proxy): only the output is estimated; the cache tokens reported are kept (they were
        dropped, the input billed as the uncached part alone)."""
        script = Script(input_tokens=5000, cached_input_tokens=4000, cache_creation_input_tokens=600)
        fake.enqueue(replace(script, omit_output_tokens=True))
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        output = count_text_tokens("Hello from the fake provider.")
        assert finish.usage == Usage(
            input_tokens=5000, output_tokens=output, cached_input_tokens=4000, cache_write_input_tokens=600
        )
        assert finish.estimated is True

    async def test_message_starts_placeholder_output_count_is_not_billed(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """A ``message_delta`` without usage (an Anthropic-compatible gateway) leaves only
        ``message_start``'s placeholder ``output_tokens`` (1): the output is estimated from the
        answer, flagged and logged, the reported input kept (the answer was billed 1 output token,
        not flagged)."""
        fake.enqueue(Script(input_tokens=40, omit_delta_usage=True))
        with capture_logs() as logs:
            finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        output = count_text_tokens("Hello from the fake provider.")
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (40, output, True)
        assert [entry["event"] for entry in logs] == ["provider_usage_estimated"]

    async def test_the_estimate_is_flagged_and_covers_the_whole_request(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """The finish says the usage is estimated, and the input estimate is the router's own
        (message framing and tool definitions included), not the message text alone."""
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
        tools = (ToolSpec(name="fill", description="Fill a form", parameters=MappingProxyType(schema)),)
        call = make_call(tools=tools)
        fake.enqueue(Script(omit_usage=True))
        finish = (await collect(provider, call))[-1]
        assert isinstance(finish, ProviderFinish)
        expected = estimate_input_tokens(ChatRequest(messages=call.messages, tools=tools))
        assert (finish.estimated, finish.usage.input_tokens) == (True, expected)

    async def test_reported_usage_is_not_flagged(self, provider: AnthropicProvider) -> None:
        """A stream that reports usage ends with a finish whose usage is not estimated."""
        finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert finish.estimated is False


class TestRequestShape:
    async def test_system_messages_go_to_the_system_parameter(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """System text is sent as ``system``; the other turns keep their order and roles."""
        await collect(provider, make_call(max_output_tokens=99, temperature=0.5))
        body = fake.requests[-1].body
        assert body == {
            "model": "claude-sonnet-test",
            "max_tokens": 99,
            "stream": True,
            "system": "You are terse.",
            "messages": [
                {"role": "user", "content": CANARY_PROMPT},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "Go on."},
            ],
            "temperature": 0.5,
        }

    async def test_no_system_parameter_without_system_messages(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """A conversation with no system message sends no ``system`` field."""
        await collect(provider, make_call(messages=(Message(Role.USER, "hi"),)))
        assert "system" not in fake.requests[-1].body

    async def test_tools_carry_an_object_input_schema(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """Each ``ToolSpec`` becomes ``{"name", "description", "input_schema"}``; an empty schema is an object."""
        schema = {"type": "object", "properties": {"q": {"type": "string"}}}
        tools = (
            ToolSpec(name="search", description="Search the web", parameters=MappingProxyType(schema)),
            ToolSpec(name="now"),
        )
        await collect(provider, make_call(tools=tools))
        assert fake.requests[-1].body["tools"] == [
            {"name": "search", "description": "Search the web", "input_schema": schema},
            {"name": "now", "input_schema": {"type": "object"}},
        ]

    @pytest.mark.parametrize(("requested", "sent"), [(1.5, 1.0), (2.0, 1.0), (1.0, 1.0), (0.3, 0.3)])
    async def test_temperature_is_sent_within_anthropics_range(
        self, fake: FakeProvider, provider: AnthropicProvider, requested: float, sent: float
    ) -> None:
        """Anthropic takes temperatures 0-1 (our API, as OpenAI's, up to 2): a higher one is sent as
        1, logged once at debug."""
        with capture_logs() as logs:
            await collect(provider, make_call(temperature=requested))
        assert fake.requests[-1].body["temperature"] == sent
        clamped = [entry for entry in logs if entry["event"] == "temperature_clamped"]
        expected = [{"requested": requested, "sent": 1.0, "log_level": "debug"}] if requested > 1 else []
        assert [{k: e[k] for k in ("requested", "sent", "log_level")} for e in clamped] == expected

    async def test_a_final_assistant_prefill_is_sent_without_trailing_whitespace(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """Anthropic refuses a final assistant turn that ends in whitespace: it is right-stripped;
        an earlier assistant turn is sent as it is."""
        messages = (
            Message(Role.USER, "Give me JSON"),
            Message(Role.ASSISTANT, "Sure. \n"),
            Message(Role.USER, "Now"),
            Message(Role.ASSISTANT, "Here it is:\n "),
        )
        await collect(provider, make_call(messages=messages))
        assert fake.requests[-1].body["messages"] == [
            {"role": "user", "content": "Give me JSON"},
            {"role": "assistant", "content": "Sure. \n"},
            {"role": "user", "content": "Now"},
            {"role": "assistant", "content": "Here it is:"},
        ]

    async def test_a_history_of_tool_calls_without_tools_declares_the_called_tools(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """Anthropic refuses ``tool_use`` blocks in a request that defines no tools: each tool the
        history called is declared once, taking any object, and ``tool_choice`` none keeps the model
        from calling it."""
        calls = (ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'), ToolCall("toolu_2", "get_time"))
        messages = (
            Message(Role.USER, "Weather and time in Paris?"),
            Message(Role.ASSISTANT, "", tool_calls=calls),
            Message(Role.TOOL, "18 C", tool_call_id="toolu_1"),
            Message(Role.TOOL, "14:00", tool_call_id="toolu_2"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("toolu_3", "get_weather", "{}"),)),
            Message(Role.TOOL, "19 C", tool_call_id="toolu_3"),
        )
        await collect(provider, make_call(messages=messages))
        body = fake.requests[-1].body
        assert (body["tools"], body["tool_choice"]) == (
            [
                {"name": "get_weather", "input_schema": {"type": "object"}},
                {"name": "get_time", "input_schema": {"type": "object"}},
            ],
            {"type": "none"},
        )

    async def test_offered_tools_are_sent_as_they_are_with_no_tool_choice(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """A request that offers tools sends those, whatever its history called, and no ``tool_choice``."""
        messages = (
            Message(Role.USER, "Weather?"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("toolu_1", "get_weather"),)),
            Message(Role.TOOL, "18 C", tool_call_id="toolu_1"),
        )
        await collect(provider, make_call(messages=messages, tools=(ToolSpec(name="now"),)))
        body = fake.requests[-1].body
        assert (body["tools"], "tool_choice" in body) == ([{"name": "now", "input_schema": {"type": "object"}}], False)

    async def test_key_and_extra_headers_are_sent(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """The key goes upstream (this SDK sends it as a Bearer token); ``ProviderCall.headers`` go too."""
        await collect(provider, make_call(headers=MappingProxyType({"x-request-id": "r-1"})))
        record = fake.requests[-1]
        assert (record.api_key, record.headers["x-request-id"]) == (CANARY_KEY, "r-1")

    async def test_no_sdk_retries(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A 529 is not retried by the SDK: exactly one upstream request."""
        fake.enqueue(Script(status=529))
        await collect_until_error(provider, make_call())
        assert len(fake.requests) == 1


class TestErrorTranslation:
    @pytest.mark.parametrize(("status", "error_class"), STATUS_ERRORS)
    async def test_status_maps_to_one_error_class_with_a_sanitized_message(
        self, fake: FakeProvider, provider: AnthropicProvider, status: int, error_class: type[ProviderError]
    ) -> None:
        """Each HTTP status becomes its documented error; the echoed prompt and key are not copied."""
        fake.enqueue(Script(status=status))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error), error.status) == ([], error_class, status)
        assert (error.provider, error.model) == ("anthropic", "claude-sonnet")
        assert f"HTTP {status}" in error.message
        assert_sanitized(error)

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({"retry_after": "12"}, 12.0),
            ({"retry_after_ms": "1500"}, 1.5),
            ({"retry_after": "not a number or date"}, None),
        ],
    )
    async def test_rate_limit_carries_retry_after(
        self, fake: FakeProvider, provider: AnthropicProvider, headers: dict[str, str], expected: float | None
    ) -> None:
        """``Retry-After`` / ``retry-after-ms`` become ``retry_after`` seconds; garbage becomes None."""
        fake.enqueue(Script(status=429, **headers))  # type: ignore[arg-type]
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderRateLimited)
        assert error.retry_after == expected

    async def test_rate_limit_retry_after_as_http_date(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A ``Retry-After`` HTTP date becomes the seconds left until then."""
        fake.enqueue(Script(status=429, retry_after=email.utils.formatdate(time.time() + 60, usegmt=True)))
        _, error = await collect_until_error(provider, make_call())
        assert isinstance(error, ProviderRateLimited)
        assert error.retry_after is not None
        assert 55 <= error.retry_after <= 61

    async def test_billing_error_is_quota_exhausted(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A ``billing_error`` (the account's credit is spent) is ``ProviderQuotaExhausted``, whatever its status."""
        fake.enqueue(Script(status=402, error_type="billing_error"))
        _, error = await collect_until_error(provider, make_call())
        assert (type(error), error.message) == (
            ProviderQuotaExhausted,
            "provider anthropic model claude-sonnet: HTTP 402 (billing_error)",
        )

    async def test_a_credit_balance_too_low_is_quota_exhausted(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """Anthropic says an unpaid account's credit is too low with a plain 400
        ``invalid_request_error``: that one, told apart by its message, is ``ProviderQuotaExhausted``
        (not PROVIDER_REJECTED); the message is not copied; another 400 stays rejected."""
        body = (
            '{"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is'
            ' too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}'
        )
        fake.enqueue(Script(status=400, error_body=body), Script(status=400))
        _, error = await collect_until_error(provider, make_call())
        assert (type(error), error.message) == (
            ProviderQuotaExhausted,
            "provider anthropic model claude-sonnet: HTTP 400 (invalid_request_error)",
        )
        _, other = await collect_until_error(provider, make_call())
        assert type(other) is ProviderRejected

    async def test_the_key_echoed_as_the_error_type_is_not_copied(
        self, fake: FakeProvider, http_client: HttpClientKind
    ) -> None:
        """A server that puts our key in its error type gets no part of it into the message, even a
        key that does not look like one."""
        key = "plain-canary-key-9b41"
        adapter = AnthropicProvider("anthropic", key, fake.anthropic_base_url, http_client=http_client)
        try:
            fake.enqueue(Script(status=401, error_type=key))
            _, error = await collect_until_error(adapter, make_call())
        finally:
            await adapter.aclose()
        assert (type(error), error.message) == (ProviderAuthFailed, "provider anthropic model claude-sonnet: HTTP 401")

    async def test_connection_refused_is_unavailable(self, http_client: HttpClientKind) -> None:
        """Nothing listening: ProviderUnavailable, no status, said as a connection failure."""
        adapter = AnthropicProvider("anthropic", CANARY_KEY, "http://127.0.0.1:1", http_client=http_client)
        try:
            texts, error = await collect_until_error(adapter, make_call())
        finally:
            await adapter.aclose()
        assert (texts, type(error), error.status) == ([], ProviderUnavailable, None)
        assert "connection failed" in error.message  # not "timed out", over either transport
        assert_sanitized(error)


class TestMidStreamFailures:
    async def test_cut_after_40_of_60_chunks(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A connection closed mid-body gives exactly the 40 chunks sent, then ProviderUnavailable."""
        script = Script(chunk_count=60, fault=Fault.CUT, fault_after=40)
        fake.enqueue(script)
        texts, error = await collect_until_error(provider, make_call())
        assert texts == list(script.content_chunks()[:40])
        assert isinstance(error, ProviderUnavailable)

    async def test_connection_reset_mid_stream(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A TCP reset after 3 chunks gives those 3, then ProviderUnavailable."""
        fake.enqueue(Script(chunk_count=10, fault=Fault.RESET, fault_after=3))
        texts, error = await collect_until_error(provider, make_call())
        assert (len(texts), type(error)) == (3, ProviderUnavailable)

    @pytest.mark.parametrize(
        ("error_type", "error_class"),
        [
            ("overloaded_error", ProviderUnavailable),
            ("api_error", ProviderUnavailable),
            ("rate_limit_error", ProviderRateLimited),
            ("invalid_request_error", ProviderRejected),
            ("authentication_error", ProviderAuthFailed),
        ],
    )
    async def test_in_band_error_event(
        self, fake: FakeProvider, provider: AnthropicProvider, error_type: str, error_class: type[ProviderError]
    ) -> None:
        """An ``event: error`` inside a 200 stream is a ProviderError by its ``error.type``, sanitized."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=2, error_type=error_type))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == (["Hello ", "from "], error_class)
        assert error_type in error.message
        assert_sanitized(error)

    @pytest.mark.parametrize(
        ("error_type", "error_class"),
        [("billing_error", ProviderQuotaExhausted), ("invalid_request_error", ProviderRejected)],
    )
    @pytest.mark.parametrize("prompt", ["hello", "Why does Claude answer invalid_request_error or billing_error?"])
    async def test_an_in_band_error_is_read_alike_whatever_the_prompt_says_of_its_type(
        self,
        fake: FakeProvider,
        provider: AnthropicProvider,
        prompt: str,
        error_type: str,
        error_class: type[ProviderError],
    ) -> None:
        """An ``event: error`` typed ``billing_error`` or ``invalid_request_error`` is a spent
        quota or a rejection, the type named, under a prompt that mentions the type as under one
        that does not (the type was dropped as an echo: unavailable, retried and fallen back)."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0, error_type=error_type))
        _, error = await collect_until_error(provider, make_call(messages=(Message(Role.USER, prompt),)))
        assert (type(error), error.message) == (
            error_class,
            f"provider anthropic model claude-sonnet: error event in stream ({error_type})",
        )

    async def test_in_band_error_before_content(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """An error event before any text is an error with nothing yielded (retryable pre-commit)."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == ([], ProviderUnavailable)

    async def test_events_the_sdk_holds_as_one_are_bounded_as_one(
        self, fake: FakeProvider, http_client: HttpClientKind
    ) -> None:
        """A server ending each event with ``\n`` then ``\r\r\n``: the anthropic SDK ends an event
        only where its bytes end with ``\r\r``, ``\n\n`` or ``\r\n\r\n`` after a line, so it holds
        the whole stream as one event, and a stream of 200 small events, 30 kB in all, fails an
        8 kB ``max_event_bytes`` (it was counted as 200 events, the SDK holding any size)."""
        adapter = AnthropicProvider(
            "anthropic", CANARY_KEY, fake.anthropic_base_url, http_client=http_client, max_event_bytes=8192
        )
        try:
            fake.enqueue(Script(chunk_count=200, event_blank_line="\r\r\n"))
            _, error = await collect_until_error(adapter, make_call())
            assert type(error) is ProviderUnavailable
            assert "stream event over 8192 bytes (reliability.max_event_bytes) (event_too_large)" in error.message
        finally:
            await adapter.aclose()

    @settings(max_examples=500, deadline=None)
    @given(
        pieces=st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n"]), max_size=40),
        cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=6),
    )
    def test_the_bound_ends_events_exactly_where_the_sdk_decoder_does(
        self, pieces: list[bytes], cuts: list[int]
    ) -> None:
        """Streams of line ends and text, cut into chunks anywhere (between ``\r`` and ``\n``
        too): the bound's event ends are the offsets where the SDK's own
        ``SSEDecoder._aiter_chunks`` hands an event on."""
        stream = b"".join(pieces)
        bounds = sorted({cut for cut in cuts if cut < len(stream)})
        chunks = [stream[start:end] for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True)]

        async def sdk_ends() -> list[int]:
            async def chunks_of() -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            # The SDK hands on what is left at the stream's end too: not an event's end.
            ends, offset = [], 0
            async for event in SSEDecoder()._aiter_chunks(chunks_of()):
                offset += len(event)
                if event.endswith((b"\r\r", b"\n\n", b"\r\n\r\n")):
                    ends.append(offset)
            return ends

        ends, offset, bound = [], 0, AnthropicEventEnds()
        for chunk in chunks:
            ends.extend(offset + end for end in bound.find(chunk))
            offset += len(chunk)
        assert ends == asyncio.run(sdk_ends())

    @settings(max_examples=500, deadline=None)
    @given(
        pieces=st.lists(st.sampled_from([b"a", b"b", b"\r", b"\n", b"\r\n"]), max_size=40),
        cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=10),
    )
    def test_the_sdk_decodes_the_lines_handed_on_as_it_decodes_the_chunks_read(
        self, pieces: list[bytes], cuts: list[int]
    ) -> None:
        """Streams of line ends and text, cut into chunks anywhere (between ``\r`` and ``\n``
        too): the SDK's ``SSEDecoder._aiter_chunks`` hands on the same events from the whole lines
        the bound hands it as from the chunks as read, and each of those ends in a line end but
        the stream's last."""
        stream = b"".join(pieces)
        bounds = sorted({cut for cut in cuts if cut < len(stream)})
        chunks = [stream[start:end] for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True)]

        async def events_of(chunks: list[bytes]) -> list[bytes]:
            async def chunks_of() -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            return [event async for event in SSEDecoder()._aiter_chunks(chunks_of())]

        handed = asyncio.run(handed_on(chunks))
        assert asyncio.run(events_of(handed)) == asyncio.run(events_of(chunks))
        assert all(chunk.endswith((b"\r", b"\n")) for chunk in handed[:-1])

    def test_a_crlf_split_between_two_reads_is_one_line_end(self) -> None:
        """An event of 999 lines ending ``\r\n``, each read split between its ``\r`` and its
        ``\n`` (which the SDK adds as two pieces): within ``MAX_EVENT_LINES``; 1,001 such: not."""
        for lines, overrun in ((999, False), (1001, True)):
            bound = AnthropicEventEnds()
            for _ in range(lines - 1):
                bound.find(b"a\r")
                bound.find(b"\n")
            ends = bound.find(b"\r\n")
            assert (ends, bound.overrun is not None) == (([], True) if overrun else ([2], False))

    def test_a_line_read_byte_by_byte_is_handed_on_whole(self) -> None:
        """An event whose 1 MB data line comes a byte at a time: handed to the SDK as one chunk
        then its blank line, not a million (the SDK's decoder copies the event so far at each
        chunk's piece: a line of megabytes read byte by byte held the event loop for hours)."""
        line = b"data: " + b"x" * 1_000_000 + b"\n"
        handed = asyncio.run(handed_on([*(line[index : index + 1] for index in range(len(line))), b"\n"]))
        assert handed == [line, b"\n"]

    @pytest.mark.parametrize(
        "fault", [Fault.MALFORMED_LINE, Fault.NON_UTF8, Fault.MISSING_TERMINATOR, Fault.NOT_AN_OBJECT]
    )
    async def test_broken_streams_are_unavailable(
        self, fake: FakeProvider, provider: AnthropicProvider, fault: Fault
    ) -> None:
        """Malformed JSON, non-UTF-8 bytes, a body that ends without ``message_stop``, or an event
        that is JSON but not an object: ProviderUnavailable."""
        fake.enqueue(Script(fault=fault, fault_after=1))
        texts, error = await collect_until_error(provider, make_call())
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert_sanitized(error)

    async def test_a_stream_without_its_stop_reason_is_unavailable(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """A stream whose ``message_delta`` (its stop reason and output count) never came, though
        ``message_stop`` did: ProviderUnavailable after its text, as the OpenAI adapter's stream
        without a finish reason (it finished UNSPECIFIED, billed the placeholder output count)."""
        fake.enqueue(Script(omit_message_delta=True))
        texts, error = await collect_until_error(provider, make_call())
        assert ("".join(texts), type(error)) == ("Hello from the fake provider.", ProviderUnavailable)
        assert "without a stop reason" in error.message
        assert_sanitized(error)


async def handed_on(chunks: list[bytes]) -> list[bytes]:
    """What an anthropic stream's bound (4 MiB) hands the SDK of a body read in ``chunks``."""

    class Read(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    bounded = _BoundedEvents(Read(), EventBound(DEFAULT_MAX_EVENT_BYTES, AnthropicEventEnds))
    return [chunk async for chunk in bounded]


class TestCancellation:
    async def test_cancel_mid_stream_aborts_upstream_within_a_second(
        self, fake: FakeProvider, provider: AnthropicProvider
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

    async def test_cancel_while_the_stream_stalls(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A cancel while the provider stalls with the socket open still closes the request."""
        fake.enqueue(Script(fault=Fault.HANG, fault_after=1))
        task = asyncio.create_task(collect(provider, make_call()))
        await eventually(lambda: bool(fake.requests) and fake.requests[-1].chunks_sent == 1)
        cancelled_at = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert record.aborted
        assert record.aborted_at is not None
        assert record.aborted_at - cancelled_at < 1.0

    async def test_closing_the_iterator_aborts_upstream(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """``aclose()`` after a few deltas closes the HTTP response before the answer is complete."""
        fake.enqueue(Script(chunk_count=50, chunk_delay=0.01))
        stream = provider.stream(make_call())
        received = [await anext(stream) for _ in range(3)]
        await stream.aclose()  # type: ignore[attr-defined]
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert (len(received), record.aborted, record.completed) == (3, True, False)


class TestTimeout:
    async def test_no_answer_within_the_timeout(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
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

    async def test_stall_after_first_token_times_out(self, fake: FakeProvider, provider: AnthropicProvider) -> None:
        """A stream that stalls mid-answer fails at the deadline, after the text already received."""
        # A whole answer first opens the connection: cold, on a loaded machine, reaching the fake
        # can take a good part of a short deadline (0.3 s was the deadline).
        await collect(provider, make_call())
        fake.enqueue(Script(fault=Fault.HANG, fault_after=2))
        started = time.monotonic()
        texts, error = await collect_until_error(provider, make_call(timeout=1.0))
        assert (texts, type(error)) == (["Hello ", "from "], ProviderTimedOut)
        # The deadline, not the endless stall, ends it; the slack is for a loaded machine.
        assert time.monotonic() - started < 1.0 + 1.5


class TestAfterMessageStop:
    """What follows ``message_stop``: the body's end, read so that the connection is reused."""

    async def test_a_reset_after_message_stop_ends_the_answer_ok_with_its_usage(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """The connection reset after ``message_stop`` is no failure: the answer and its usage
        came (as the OpenAI adapter's reset after its finish and usage)."""
        fake.enqueue(Script(fault=Fault.RESET_AT_END, hang_seconds=0.05, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            finish = (await collect(provider, make_call()))[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (11, 7, False)
        # Logged as the OpenAI adapter logs it, by the error's code, without the prompt or key
        # (it was swallowed unlogged).
        warnings = [entry for entry in logs if entry["event"] == "provider_error_after_finish"]
        assert [(entry["log_level"], entry["reason"]) for entry in warnings] == [("warning", "PROVIDER_UNAVAILABLE")]
        assert all("canary" not in str(entry) for entry in logs)

    @pytest.mark.parametrize("fault", [Fault.ERROR_EVENT, Fault.RESET], ids=["error_event", "reset"])
    async def test_an_error_after_message_delta_ends_the_answer_ok_with_its_usage(
        self, fake: FakeProvider, provider: AnthropicProvider, fault: Fault
    ) -> None:
        """``message_delta`` (the stop reason and the final usage) came, then an ``error`` event
        (overloaded) or a reset instead of ``message_stop``: only the terminator is missing, the
        answer ends OK with the usage reported, the error logged by its code, as after
        ``message_stop`` (it failed the attempt, the whole answer sent, an estimate billed)."""
        fake.enqueue(Script(fault=fault, fault_at_end=True, input_tokens=11, output_tokens=7))
        with capture_logs() as logs:
            events = await collect(provider, make_call())
        assert_whole_with_the_usage_reported(events)
        warnings = [entry["reason"] for entry in logs if entry["event"] == "provider_error_after_finish"]
        assert len(warnings) == 1
        assert all("canary" not in str(entry) for entry in logs)

    async def test_a_body_held_open_after_message_delta_ends_the_answer_ok_quickly(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """``message_delta`` (the stop reason and the final usage) came, then the server holds the
        body open without ``message_stop`` (a proxy holding a finished body): the answer ends OK
        with the usage reported after the short drain, as OpenAI's after its finish (it waited the
        idle timeout, 60 s, and failed UNAVAILABLE with an estimate billed)."""
        fake.enqueue(Script(fault=Fault.HANG, fault_at_end=True, input_tokens=11, output_tokens=7))
        started = time.monotonic()
        async with asyncio.timeout(5):
            events = await collect(provider, make_call())
        assert time.monotonic() - started < 2.0
        assert_whole_with_the_usage_reported(events)

    async def test_a_body_that_ends_after_message_delta_without_message_stop_ends_the_answer_ok(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """``message_delta`` (the stop reason and the final usage) came, then the body ends cleanly
        without ``message_stop``: the answer is whole and ends OK with the usage reported, as a
        held body or a reset there does (it failed UNAVAILABLE "stream ended without
        message_stop", an estimate billed). A body that ends before ``message_delta`` still fails:
        ``test_broken_streams_are_unavailable``."""
        fake.enqueue(Script(fault=Fault.MISSING_TERMINATOR, fault_at_end=True, input_tokens=11, output_tokens=7))
        events = await collect(provider, make_call())
        assert_whole_with_the_usage_reported(events)

    async def test_a_body_held_open_after_message_delta_ends_before_the_calls_deadline(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """The same hold with a deadline: the answer is handed on OK with its usage before the
        deadline (it failed DEADLINE_EXCEEDED, an estimate billed)."""
        fake.enqueue(Script(fault=Fault.HANG, fault_at_end=True, input_tokens=11, output_tokens=7))
        started = time.monotonic()
        events = await collect(provider, make_call(timeout=3.0))
        assert time.monotonic() - started < 2.0
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        assert (finish.usage.input_tokens, finish.usage.output_tokens, finish.estimated) == (11, 7, False)

    async def test_an_error_after_a_message_delta_without_usage_still_fails_the_attempt(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """The stop reason came but no output count: the usage is unknown, and an ``error`` event
        before ``message_stop`` fails the attempt, as a cut stream does."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_at_end=True, omit_delta_usage=True))
        texts, error = await collect_until_error(provider, make_call())
        assert ("".join(texts), type(error)) == ("Hello from the fake provider.", ProviderUnavailable)

    async def test_the_drain_after_message_stop_ends_before_the_calls_deadline(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """``message_stop`` is read 90 ms before the call's deadline and the server holds the body
        open: the drain stops by itself 50 ms before the deadline (``DEADLINE_MARGIN_SECONDS``, as
        the OpenAI adapter's drain), the answer handed on OK with its usage before the deadline,
        rather than run its whole 0.1 s past it, or until the deadline cut it (logged
        ``provider_error_after_finish``).

        The caller, not the clock, sets the 90 ms: it reads the answer's text, then waits before
        asking for the rest (the stop reason, ``message_stop``, already sent), so a loaded machine
        only makes the call's start and the answer's first events slower, which the 5 s deadline
        leaves room for."""
        fake.enqueue(Script(chunk_count=1, fault=Fault.HANG_AT_END, input_tokens=11, output_tokens=7))
        clock = asyncio.get_running_loop()
        timeout = 5.0
        # The adapter takes its deadline when the stream starts, after this: never earlier.
        deadline = clock.time() + timeout
        stream = provider.stream(make_call(timeout=timeout))
        with capture_logs() as logs:
            try:
                assert await anext(stream) == InputReported(Usage(input_tokens=11))
                assert await anext(stream) == TextDelta("chunk-0 ")
                await asyncio.sleep(deadline - 0.09 - clock.time())
                finish = await anext(stream)
                # Handed on before the deadline: the drain's own 50 ms before it is what keeps
                # a loaded loop's lateness (the drain stopping late) from failing this.
                ended = clock.time()
            finally:
                await close_stream(stream)
        assert ended < deadline
        assert isinstance(finish, ProviderFinish)
        assert (finish.finish_reason, finish.usage.input_tokens, finish.usage.output_tokens) == (
            FinishReason.STOP,
            11,
            7,
        )
        assert not [entry for entry in logs if entry["event"] == "provider_error_after_finish"]

    async def test_events_that_keep_coming_after_message_stop_end_the_answer_ok_soon(
        self, http_client: HttpClientKind
    ) -> None:
        """A server that keeps sending events after ``message_stop`` (one every 20 ms, the body never
        ending; not pings, which the SDK skips unread) is drained for one ``DRAIN_SECONDS`` in
        all, not for each event: the answer ends OK with its usage, rather than never."""
        more = anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        async with RawUpstream() as raw:
            body = [*anthropic_stream(["Hello ", "there."], input_tokens=11)]
            raw.replies.append(Reply(body=lambda: itertools.chain(body, itertools.repeat(more)), pause=0.02))
            adapter = AnthropicProvider("anthropic", CANARY_KEY, raw.url, http_client=http_client)
            try:
                async with asyncio.timeout(10):
                    events = await collect(adapter, make_call())
            finally:
                await adapter.aclose()
        finish = events[-1]
        assert isinstance(finish, ProviderFinish)
        text = "".join(event.text for event in events if isinstance(event, TextDelta))
        assert (text, finish.usage.input_tokens, finish.usage.output_tokens) == ("Hello there.", 11, 5)


class TestLogging:
    async def test_debug_logging_does_not_record_the_prompt_or_key(
        self, fake: FakeProvider, provider: AnthropicProvider, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With every logger at DEBUG, neither the SDK nor the adapter logs the prompt or the key."""
        fake.enqueue(Script(status=400), Script())
        with caplog.at_level(logging.DEBUG):
            await collect_until_error(provider, make_call())
            await collect(provider, make_call())
        assert caplog.records
        assert "canary" not in caplog.text


class TestConnectionReuse:
    async def test_sequential_streams_share_one_connection(
        self, fake: FakeProvider, provider: AnthropicProvider
    ) -> None:
        """The body is read to its end after message_stop, so keep-alive reuses the connection."""
        for _ in range(3):
            await collect(provider, make_call())
        assert [record.connection for record in fake.requests] == [1, 1, 1]
        assert fake.connections_accepted == 1
