"""Token counting: the fast path and the cache give exactly what the encoder's token list gives."""

from __future__ import annotations

from types import MappingProxyType

import bpe_openai

from routesvc import tokens
from routesvc.models import ChatRequest, Message, ResponseFormat, ResponseFormatType, Role, ToolCall
from routesvc.tokens import count_text_tokens, estimate_input_tokens

_ENCODING = bpe_openai.get_encoding("o200k_base")

SAMPLES = (
    "What is the capital of France?",
    "def merge(a, b):\n    return sorted(a + b)\n" * 20,
    "héllo wörld, 日本語のテキスト, emoji 🙂 " * 30,
    "lone surrogate \ud800 inside",
    "<|endoftext|> special tokens are plain text here",
    "x" * 5000,
    "",
)


class TestCountTextTokens:
    def test_equals_the_length_of_the_encoding(self) -> None:
        """For short, cached-size, non-ASCII, surrogate and special-token texts alike."""
        expected = [len(_ENCODING.encode_ordinary(_ENCODING._sanitize_text(text))) for text in SAMPLES]
        assert expected == [count_text_tokens(text) for text in SAMPLES]

    def test_a_cached_count_is_the_same_count(self) -> None:
        """A message-sized text counted twice gives the same number, the second time from the cache."""
        text = "The quarterly report covers revenue and churn. " * 40
        first = count_text_tokens(text)
        hits = tokens._count_cached.cache_info().hits
        assert (first, hits + 1) == (count_text_tokens(text), tokens._count_cached.cache_info().hits)

    def test_long_texts_are_counted_in_pieces_without_the_cache(self) -> None:
        """Texts past the cache's size limit are counted, in pieces, and not kept."""
        text = "word " * 60_000
        size = tokens._count_cached.cache_info().currsize
        # 60,000 words and the final space, which o200k keeps as a token of its own.
        assert (count_text_tokens(text), tokens._count_cached.cache_info().currsize) == (60_001, size)


class TestEstimateInputTokens:
    def test_tool_calls_and_results_are_counted(self) -> None:
        """An assistant turn's calls (id, name, arguments) and a tool turn's call id count as input."""
        call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}')
        plain = ChatRequest((Message(Role.USER, "Weather?"), Message(Role.ASSISTANT, ""), Message(Role.USER, "18 C")))
        with_calls = ChatRequest(
            (
                Message(Role.USER, "Weather?"),
                Message(Role.ASSISTANT, "", (call,)),
                Message(Role.TOOL, "18 C", tool_call_id="call_1"),
            )
        )
        expected = count_text_tokens("call_1 get_weather " + call.arguments_json) + count_text_tokens("call_1")
        assert estimate_input_tokens(with_calls) - estimate_input_tokens(plain) == expected

    def test_a_response_formats_schema_is_counted(self) -> None:
        """A JSON schema response format's name and schema (compact JSON) count as input."""
        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        response_format = ResponseFormat(ResponseFormatType.JSON_SCHEMA, "weather", MappingProxyType(schema))
        plain = ChatRequest((Message(Role.USER, "Weather?"),))
        with_schema = ChatRequest((Message(Role.USER, "Weather?"),), response_format=response_format)
        expected = count_text_tokens('weather {"properties":{"city":{"type":"string"}},"type":"object"}')
        assert estimate_input_tokens(with_schema) - estimate_input_tokens(plain) == expected
