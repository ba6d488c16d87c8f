"""Offline token counting with the OpenAI encodings shipped in the ``bpe-openai`` wheel."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping

import bpe_openai

from routesvc.images import image_estimate
from routesvc.models import ChatRequest, ImageEstimate, ProviderKind, Role

# Per-message framing the chat formats add around each message's text: OpenAI's cookbook ("How to
# count tokens with tiktoken", num_tokens_from_messages, gpt-4o and gpt-4o-mini) counts 3 tokens a
# message (its start, separator and end markers) plus the tokens of its role's text (and of a name,
# which our messages do not have), and 3 to prime the reply (<|start|>assistant<|message|>).
# Anthropic documents no framing of its own; its kind is estimated with the same.
_TOKENS_PER_MESSAGE = 3
_TOKENS_REPLY_PRIMER = 3


@functools.cache
def _encoding() -> bpe_openai.Encoding:
    return bpe_openai.get_encoding("o200k_base")


# The encoder refuses very long inputs at once, so long texts are counted in pieces cut at
# whitespace (a cut can move at most a token or two per piece).
_PIECE_CHARS = 200_000


# Chat traffic sends the same texts again and again (an application's system prompt, the earlier
# turns of a conversation) and counting costs about 40 ns a character, so the counts of
# message-sized texts are kept: at most 1024 texts of at most 16K characters (16 MB of ASCII).
_CACHED_MIN_CHARS = 256
_CACHED_MAX_CHARS = 16_384


@functools.cache
def _counter() -> Callable[[str], int]:
    """The Rust backend's ``count`` (the length of ``encode_ordinary`` without building the list of
    tokens, 1.2-3x faster) when this bpe-openai exposes it, else ``len(encode_ordinary(...))``."""
    encoding = _encoding()
    count = getattr(getattr(encoding, "_backend", None), "count", None)

    def by_encoding(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    if count is None:
        return by_encoding

    def by_count(text: str) -> int:
        try:
            return int(count(text))
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary replaces them first
            return by_encoding(text)

    return by_count


def _count_uncached(text: str) -> int:
    counter = _counter()
    total = 0
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = start + _PIECE_CHARS
        cut = max(text.rfind(" ", start + _PIECE_CHARS // 2, end), text.rfind("\n", start + _PIECE_CHARS // 2, end))
        end = cut if cut > start else end
        total += counter(text[start:end])
        start = end
    return total + counter(text[start:])


_count_cached = functools.lru_cache(maxsize=1024)(_count_uncached)


def count_text_tokens(text: str) -> int:
    """Tokens in ``text`` under o200k (the gpt-4o encoding; close for other vendors' models)."""
    if _CACHED_MIN_CHARS <= len(text) <= _CACHED_MAX_CHARS:
        return _count_cached(text)
    return _count_uncached(text)


@functools.cache
def _role_tokens(role: Role) -> int:
    """Tokens of a role's text as the chat format writes it (``user``, ``tool``: 1 each in o200k)."""
    return count_text_tokens(role.value)


def _schema_text(schema: Mapping[str, object]) -> str:
    """A JSON schema as compact JSON with its characters as written, not ``\\uXXXX`` escapes: the
    provider parses the schema and the model sees its text (escapes would count a CJK character as
    about five tokens instead of one)."""
    return json.dumps(dict(schema), separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def estimate_image_tokens(chat: ChatRequest) -> ImageEstimate:
    """The part of ``estimate_input_tokens(chat, kind)`` that its images make up, by each kind."""
    total = ImageEstimate()
    for message in chat.messages:
        for image in message.images:
            total += image_estimate(image)
    return total


def estimate_input_tokens(chat: ChatRequest, kind: ProviderKind = "openai_compatible") -> int:
    """Estimated input tokens of ``chat`` on a model of a provider of ``kind``: message texts,
    images (by that kind's formula, ``routesvc.images``; the larger of OpenAI's and Anthropic's
    unless told) and tool calls, framing (OpenAI's: 3 tokens and the role's text a message, 3 for
    the reply; every kind alike), tool definitions and a response format's JSON schema (which the
    providers put in the prompt too)."""
    total = _TOKENS_REPLY_PRIMER
    images = ImageEstimate()
    for message in chat.messages:
        total += _TOKENS_PER_MESSAGE + _role_tokens(message.role) + count_text_tokens(message.content)
        for image in message.images:
            images += image_estimate(image)
        for call in message.tool_calls:
            total += count_text_tokens(f"{call.id} {call.name} {call.arguments_json}")
        if message.tool_call_id:
            total += count_text_tokens(message.tool_call_id)
    for tool in chat.tools:
        schema = _schema_text(tool.parameters)
        total += count_text_tokens(f"{tool.name} {tool.description} {schema}")
    if chat.response_format is not None and chat.response_format.schema:
        schema = _schema_text(chat.response_format.schema)
        total += count_text_tokens(f"{chat.response_format.name} {schema}")
    return total + images.for_kind(kind)
