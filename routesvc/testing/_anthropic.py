"""The fake's Anthropic ``/v1/messages``: JSON, or ``event:``/``data:`` pairs from message_start to message_stop."""

from __future__ import annotations

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


async def respond(connection: Connection, record: RecordedRequest, script: Script) -> None:
    """Answer one messages request as ``script`` says."""
    if script.fault is Fault.HANG_BEFORE_HEADERS:
        await connection.hang()
    if script.status != 200:
        await send_error(connection, record, script, error_body)
        return
    stop_reason = _STOP_REASONS.get(script.finish_reason, script.finish_reason)
    input_tokens, output_tokens = usage_numbers(record, script)
    # Anthropic counts cache reads and writes apart from ``input_tokens``.
    start_usage: dict[str, Any] = {
        "input_tokens": input_tokens - script.cached_input_tokens - script.cache_creation_input_tokens,
        "cache_creation_input_tokens": script.cache_creation_input_tokens,
        "cache_read_input_tokens": script.cached_input_tokens,
        "output_tokens": 1 if output_tokens else 0,
    }
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
        response = {
            **message,
            "content": [{"type": "text", "text": "".join(script.content_chunks())}],
            "stop_reason": stop_reason,
        }
        if not script.omit_usage:
            response["usage"] = {**start_usage, "output_tokens": output_tokens}
        await connection.send_json(200, response, {"request-id": f"req_fake_{uuid.uuid4().hex[:24]}"})
        return

    if not script.omit_usage:
        message["usage"] = start_usage
    delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
    if not script.omit_usage:
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
    block_start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    await stream_events(
        connection,
        record,
        script,
        opening=[
            sse({"type": "message_start", "message": message}, "message_start"),
            sse(block_start, "content_block_start"),
            sse({"type": "ping"}, "ping"),
        ],
        content=lambda text: sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            "content_block_delta",
        ),
        closing=[
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ],
        faults=faults,
    )
