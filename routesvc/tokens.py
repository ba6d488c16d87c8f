"""Offline token counting with the OpenAI encodings shipped in the ``bpe-openai`` wheel."""

from __future__ import annotations

import functools
import json

import bpe_openai

from routesvc.models import ChatRequest

# Per-message framing the chat formats add around each message's text (role markers and
# separators); OpenAI documents 3 tokens per message plus 3 to prime the reply.
_TOKENS_PER_MESSAGE = 3
_TOKENS_REPLY_PRIMER = 3


@functools.cache
def _encoding() -> bpe_openai.Encoding:
    return bpe_openai.get_encoding("o200k_base")


# The encoder refuses very long inputs at once, so long texts are counted in pieces cut at
# whitespace (a cut can move at most a token or two per piece).
_PIECE_CHARS = 200_000


def count_text_tokens(text: str) -> int:
    """Tokens in ``text`` under o200k (the gpt-4o encoding; close for other vendors' models)."""
    encoding = _encoding()
    total = 0
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = start + _PIECE_CHARS
        cut = max(text.rfind(" ", start + _PIECE_CHARS // 2, end), text.rfind("\n", start + _PIECE_CHARS // 2, end))
        end = cut if cut > start else end
        total += len(encoding.encode_ordinary(text[start:end]))
        start = end
    return total + len(encoding.encode_ordinary(text[start:]))


def estimate_input_tokens(chat: ChatRequest) -> int:
    """Estimated input tokens of ``chat``: message texts, framing and tool definitions."""
    total = _TOKENS_REPLY_PRIMER
    for message in chat.messages:
        total += _TOKENS_PER_MESSAGE + count_text_tokens(message.content)
    for tool in chat.tools:
        schema = json.dumps(dict(tool.parameters), separators=(",", ":"), sort_keys=True)
        total += count_text_tokens(f"{tool.name} {tool.description} {schema}")
    return total
