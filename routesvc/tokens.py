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


def count_text_tokens(text: str) -> int:
    """Tokens in ``text`` under o200k (the gpt-4o encoding; close for other vendors' models)."""
    return len(_encoding().encode_ordinary(text))


def estimate_input_tokens(chat: ChatRequest) -> int:
    """Estimated input tokens of ``chat``: message texts, framing and tool definitions."""
    total = _TOKENS_REPLY_PRIMER
    for message in chat.messages:
        total += _TOKENS_PER_MESSAGE + count_text_tokens(message.content)
    for tool in chat.tools:
        schema = json.dumps(dict(tool.parameters), separators=(",", ":"), sort_keys=True)
        total += count_text_tokens(f"{tool.name} {tool.description} {schema}")
    return total
