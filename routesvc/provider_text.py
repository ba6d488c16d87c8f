"""Provider strings made valid text once, where they enter the service.

A provider's JSON may escape half a UTF-16 pair (``"\\ud83d"``: a server that cuts a stream
mid-character, or splits an emoji across two chunks). Python reads it into a ``str`` with a lone
surrogate, which has no UTF-8 form: a protobuf message, a metric label, a SQLite row or the
judge's request body holding it cannot be encoded. So every string a provider sends is converted
here, as an adapter's stream or a batch's results reach the router or the queue, and the wire,
the telemetry, the ledger, the scorers and the store all see the same valid text: a lone
surrogate becomes U+FFFD, and the halves of a pair are joined, also across two text deltas."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace

from routesvc.models import Heartbeat, ProviderEvent, ProviderFinish, TextDelta, ToolCall
from routesvc.providers.base import ProviderCall, ProviderWrapper, close_stream
from routesvc.providers.batch import ItemResult

_REPLACEMENT = "\ufffd"


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD and every pair's halves joined."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def valid_calls(calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
    """``calls`` with their id, name and arguments made valid text."""
    return tuple(
        ToolCall(id=valid_text(call.id), name=valid_text(call.name), arguments_json=valid_text(call.arguments_json))
        for call in calls
    )


def valid_result(result: ItemResult) -> ItemResult:
    """A batch item's result with its text, provider model and tool calls made valid text."""
    return replace(
        result,
        text=valid_text(result.text),
        provider_model=valid_text(result.provider_model),
        tool_calls=valid_calls(result.tool_calls),
    )


def _high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


class ValidText(ProviderWrapper):
    """``provider``'s streams with every string made valid text. A text delta that ends with the
    first half of a pair keeps that half back, to be joined with the next delta's start; a half
    still held when the stream ends (finished, or failed with an error after some text came
    out) comes out as U+FFFD before the end. One still held when the stream fails before any
    text came out is dropped: a U+FFFD would be the answer's first chunk, committing a call the
    router could otherwise retry or fall back from with nothing sent. One held when the stream
    is cancelled (our stall and deadline timers cut it so) is dropped too: yielding it would
    swallow the cancellation.
    A delta held back whole comes out as an empty ``Heartbeat`` (not reasoning): the model sent a
    chunk."""

    async def stream(self, call: ProviderCall) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's events, their strings valid text."""
        held = ""
        # Whether a text delta went out: only then is a half held at a failure part of the answer.
        emitted = False
        stream = self._provider.stream(call)
        try:
            try:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        text = held + event.text
                        held = text[-1] if text and _high_surrogate(text[-1]) else ""
                        text = text[: len(text) - len(held)]
                        event = TextDelta(valid_text(text)) if text or not held else Heartbeat()
                    elif isinstance(event, Heartbeat):
                        event = replace(event, text=valid_text(event.text))
                    elif isinstance(event, ProviderFinish):
                        if held:
                            held = ""
                            yield TextDelta(_REPLACEMENT)
                        event = replace(
                            event,
                            provider_model=valid_text(event.provider_model),
                            tool_calls=valid_calls(event.tool_calls),
                        )
                    emitted = emitted or isinstance(event, TextDelta)
                    yield event
            except Exception:
                if held and emitted:
                    # What came of the answer before the failure, as the caller sees it.
                    held = ""
                    yield TextDelta(_REPLACEMENT)
                raise
            if held:
                yield TextDelta(_REPLACEMENT)
        finally:
            await close_stream(stream)
