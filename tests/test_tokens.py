"""Token counting: the fast path and the cache give exactly what the encoder's token list gives."""

from __future__ import annotations

import json
from types import MappingProxyType

import bpe_openai
import pytest

from routesvc import tokens
from routesvc.client import RouterClient
from routesvc.models import ChatRequest, Message, ProviderKind, ResponseFormat, ResponseFormatType, Role, ToolCall
from routesvc.tokens import count_text_tokens, estimate_input_tokens
from routesvc.v1 import router_pb2 as pb
from tests.conftest import user_chat

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
    @pytest.mark.parametrize("kind", ["openai", "anthropic", "openai_compatible"])
    def test_each_message_counts_its_framing_its_role_and_its_text(self, kind: ProviderKind) -> None:
        """OpenAI's documented count (the cookbook's ``num_tokens_from_messages`` for gpt-4o): 3
        tokens a message, plus its role's text and its content, plus 3 priming the reply; every
        kind is estimated alike (Anthropic documents no framing of its own)."""
        chat = ChatRequest(
            (
                Message(Role.SYSTEM, "You are a terse geography tutor."),
                Message(Role.USER, "What is the capital of France?"),
                Message(Role.ASSISTANT, "Paris."),
                Message(Role.USER, "And of Italy?"),
            )
        )
        # In o200k each role is 1 token and the contents are 7, 7, 2 and 4.
        counts = [(count_text_tokens(m.role.value), count_text_tokens(m.content)) for m in chat.messages]
        assert counts == [(1, 7), (1, 7), (1, 2), (1, 4)]
        assert estimate_input_tokens(chat, kind) == 4 * (3 + 1) + (7 + 7 + 2 + 4) + 3

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


# A tool's parameter description in Chinese: about 34K o200k tokens as written, five times that as
# ``\uXXXX`` escapes (more than gpt-4o's 128K window).
_CJK_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "返回指定城市的天气预报，包括温度、湿度和风速。" * 2000}},
    "required": ["city"],
}


class TestRoutedEstimates:
    @pytest.mark.parametrize("where", ["tool", "response_format"])
    async def test_a_non_ascii_schema_is_counted_as_written_not_as_escapes(
        self, client: RouterClient, where: str
    ) -> None:
        """A tool's or a response format's schema in CJK is estimated at the o200k count of its text
        (the model sees its characters), so a request that fits gpt-4o is routed to it."""
        written = json.dumps(_CJK_SCHEMA, ensure_ascii=False)
        if where == "tool":
            chat = user_chat("北京天气怎么样？", tools=[pb.Tool(name="get_weather", parameters_json=written)])
        else:
            response_format = pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather", schema_json=written
            )
            chat = user_chat("北京天气怎么样？", response_format=response_format)
        decision = await client.route(chat, pb.RoutingContext(model="gpt-4o"))
        real = count_text_tokens(written) + count_text_tokens("北京天气怎么样？")
        assert decision.model == "gpt-4o"
        assert abs(decision.estimated_input_tokens - real) <= 20
