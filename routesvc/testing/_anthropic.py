"""The fake's Anthropic ``/v1/messages``: JSON, or ``event:``/``data:`` pairs from message_start to message_stop."""

from __future__ import annotations

import json
import uuid
from typing import Any

from routesvc.testing._connection import Connection
from routesvc.testing._responses import before_json_answer, send_error, sse, stream_events
from routesvc.testing._script import Fault, RecordedRequest, Script, error_message, usage_numbers

PATH = "/v1/messages"

# ``Script.finish_reason`` uses OpenAI's names; others are sent as they are.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def error_body(status: int, error_type: str, message: str) -> dict[str, Any]:
    """Anthropic's error JSON."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": f"req_fake_{status}"}


def answer_content(script: Script, body: Any) -> list[dict[str, Any]]:
    """The whole answer as a non-streamed response's (or a batch result's) content blocks."""
    text = "".join(script.content_chunks())
    calls = script.calls_for(body)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not calls else []
    blocks += [
        {"type": "tool_use", "id": call.call_id(index, "toolu"), "name": call.name, "input": json.loads(call.arguments)}
        for index, call in enumerate(calls)
    ]
    return blocks


def cache_creation(script: Script) -> dict[str, int]:
    """The cache writes by lifetime, as ``usage.cache_creation`` reports them."""
    hour = script.cache_creation_1h_input_tokens
    return {"ephemeral_5m_input_tokens": script.cache_creation_input_tokens - hour, "ephemeral_1h_input_tokens": hour}


def stop_reason_for(script: Script, body: Any) -> str:
    """The script's finish reason in Anthropic's name; for an answer that makes tool calls, its
    ``tool_calls_finish_reason`` so, else ``tool_use``."""
    if not script.calls_for(body):
        return _STOP_REASONS.get(script.finish_reason, script.finish_reason)
    reason = script.tool_calls_finish_reason
    return "tool_use" if reason is None else _STOP_REASONS.get(reason, reason)


async def respond(connection: Connection, record: RecordedRequest, script: Script) -> None:
    """Answer one messages request as ``script`` says."""
    if script.fault is Fault.HANG_BEFORE_HEADERS:
        await connection.hang()
    if script.status != 200:
        await send_error(connection, record, script, error_body)
        return
    calls = script.calls_for(record.body)
    stop_reason = stop_reason_for(script, record.body)
    input_tokens, output_tokens = usage_numbers(record, script)
    # Anthropic counts cache reads and writes apart from ``input_tokens``.
    start_usage: dict[str, Any] = {
        "input_tokens": input_tokens - script.cached_input_tokens - script.cache_creation_input_tokens,
        "cache_creation_input_tokens": script.cache_creation_input_tokens,
        "cache_creation": cache_creation(script),
        "cache_read_input_tokens": script.cached_input_tokens,
        "output_tokens": 1 if output_tokens else 0,
    }
    if script.omit_output_tokens:
        del start_usage["output_tokens"]
    message: dict[str, Any] = {
        "id": f"msg_fake_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": script.model or record.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if not record.stream:
        await before_json_answer(connection, script)
        response = {**message, "content": answer_content(script, record.body), "stop_reason": stop_reason}
        if not script.omit_usage:
            whole = {} if script.omit_output_tokens else {"output_tokens": output_tokens}
            response["usage"] = {**start_usage, **whole}
        await connection.send_json(200, response, {"request-id": f"req_fake_{uuid.uuid4().hex[:24]}"})
        return

    if not script.omit_usage:
        message["usage"] = start_usage
    delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
    if not script.omit_usage and not script.omit_output_tokens and not script.omit_delta_usage:
        delta["usage"] = {"output_tokens": output_tokens}  # cumulative: the total so far
    error = error_body(
        529, script.error_type or "overloaded_error", error_message(record, script, "fake in-band error")
    )
    faults = {
        Fault.ERROR_EVENT: sse(error, "error"),
        Fault.MALFORMED_LINE: b'event: content_block_delta\ndata: {"type": "content_block_delta", \n\n',
        Fault.OVERSIZED_LINE: sse({"type": "ping", "padding": "x" * script.oversized_bytes}, "ping"),
        Fault.NON_UTF8: b"event: content_block_delta\ndata: \xff\xfe\xfd\n\n",
        Fault.UNKNOWN_EVENT: sse({"type": "fake_unknown"}, "fake_unknown"),
        Fault.INCOMPLETE_EVENT: sse({"type": "content_block_delta"}, "content_block_delta"),
        Fault.WRONG_TYPES: sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
            "content_block_delta",
        ),
        Fault.NOT_AN_OBJECT: b"event: content_block_delta\ndata: [1, 2]\n\n",
    }
    # (event, whether it is a content chunk): a block's start and stop go out with the next chunk.
    events: list[tuple[bytes, bool]] = []
    index = 0
    whole_text = "".join(script.content_chunks()) if script.text_in_start else ""
    if script.reasoning:
        events += [(_block_delta(0, type="thinking_delta", thinking=piece), True) for piece in script.reasoning]
        events += [(_block_delta(0, type="signature_delta", signature="fake-signature"), False)]
        events += [(_block_stop(0), False), (_block_start(1, type="text", text=whole_text), bool(whole_text))]
        index = 1
    if not script.text_in_start:
        events += [(_block_delta(index, type="text_delta", text=text), True) for text in script.content_chunks()]
    events.append((_block_stop(index), False))
    for number, call in enumerate(calls):
        index += 1
        tool_use = {"type": "tool_use", "id": call.call_id(number, "toolu"), "name": call.name, "input": {}}
        if script.tool_input_in_start:
            tool_use["input"] = json.loads(call.arguments)
            events.append((_block_start(index, **tool_use), True))
        else:
            events.append((_block_start(index, **tool_use), False))
            pieces = call.argument_pieces()
            events += [(_block_delta(index, type="input_json_delta", partial_json=p), True) for p in pieces]
        events.append((_block_stop(index), False))
    content: list[bytes] = []
    pending = b""
    for event, is_chunk in events:
        if is_chunk:
            content.append(pending + event)
            pending = b""
        else:
            pending += event
    first_block = (
        {"type": "thinking", "thinking": "", "signature": ""}
        if script.reasoning
        else {"type": "text", "text": whole_text}
    )
    message_delta = [] if script.omit_message_delta else [sse(delta, "message_delta")]
    await stream_events(
        connection,
        record,
        script,
        opening=[
            sse({"type": "message_start", "message": message}, "message_start"),
            _block_start(0, **first_block),
            sse({"type": "ping"}, "ping"),
        ],
        content=content,
        closing=[pending, *message_delta, sse({"type": "message_stop"}, "message_stop")],
        faults=faults,
    )


def _block_start(index: int, **block: Any) -> bytes:
    return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")


def _block_delta(index: int, **delta: Any) -> bytes:
    return sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")


def _block_stop(index: int) -> bytes:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")
