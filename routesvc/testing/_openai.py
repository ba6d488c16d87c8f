"""The fake's OpenAI ``/v1/chat/completions``: JSON, or ``data:`` chunks, a usage chunk, ``[DONE]``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from routesvc.testing._connection import Connection
from routesvc.testing._responses import before_json_answer, send_error, sse, stream_events
from routesvc.testing._script import Fault, RecordedRequest, Script, error_message, usage_numbers

PATH = "/v1/chat/completions"


def error_body(status: int, error_type: str, message: str, code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error JSON, with ``code`` when given; else a spent quota has ``insufficient_quota``
    as its code too and a 429 ``rate_limit_exceeded``, as OpenAI sends them, and any other null."""
    if code is None and error_type == "insufficient_quota":
        code = "insufficient_quota"
    if code is None and status == 429:
        code = "rate_limit_exceeded"
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def answer_message(script: Script, body: Any) -> dict[str, Any]:
    """The whole answer as a non-streamed response's (or a batch result's) ``message``."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(script.content_chunks())}
    if script.refusal:
        message["refusal"], message["content"] = message["content"], None
    calls = script.calls_for(body)
    if calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [
            {
                **({} if script.omit_tool_call_ids else {"id": call.call_id(index, "call")}),
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": json.loads(call.arguments) if script.tool_arguments_as_objects else call.arguments,
                },
            }
            for index, call in enumerate(calls)
        ]
    return message


def finish_reason_for(script: Script, body: Any) -> str:
    """The script's finish reason; for an answer that makes tool calls, the script's
    ``tool_calls_finish_reason``, else OpenAI's: ``stop`` when ``tool_choice`` named the tool,
    else ``tool_calls``."""
    if not script.calls_for(body):
        return script.finish_reason
    if script.tool_calls_finish_reason is not None:
        return script.tool_calls_finish_reason
    return "stop" if isinstance(body.get("tool_choice"), dict) else "tool_calls"


async def respond(connection: Connection, record: RecordedRequest, script: Script) -> None:
    """Answer one chat completion request as ``script`` says."""
    if script.fault is Fault.HANG_BEFORE_HEADERS:
        await connection.hang()
    if script.status != 200:
        await send_error(
            connection, record, script, lambda status, kind, text: error_body(status, kind, text, script.error_code)
        )
        return
    body: dict[str, Any] = record.body
    model = script.model or record.model
    completion_id = f"chatcmpl-fake-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    input_tokens, output_tokens = usage_numbers(record, script)
    calls = script.calls_for(body)
    finish_reason = finish_reason_for(script, body)
    usage: dict[str, Any] = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": script.cached_input_tokens},
    }
    if script.omit_output_tokens:
        del usage["completion_tokens"], usage["total_tokens"]
    if not record.stream:
        await before_json_answer(connection, script)
        response: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": answer_message(script, body),
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if not script.omit_usage:
            response["usage"] = usage
        await connection.send_json(200, response)
        return

    options = body.get("stream_options")
    # The usage chunk (and ``"usage": null`` on every other chunk) only when the client asked for it.
    include_usage = isinstance(options, dict) and options.get("include_usage") is True and not script.omit_usage

    piece_key = "message" if script.choice_message else "delta"

    text_sent = 0  # text chunks made so far, for ``continuous_usage``

    def chunk(
        delta: dict[str, Any],
        finish: str | None = script.unfinished_finish_reason,
        *,
        whole_usage: bool = False,
        **extra: Any,
    ) -> bytes:
        nonlocal text_sent
        text_sent += bool(delta.get("content"))
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, piece_key: delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        if include_usage:
            data["usage"] = None
            if script.continuous_usage:
                so_far = {"prompt_tokens": input_tokens, "completion_tokens": text_sent}
                data["usage"] = so_far | {"total_tokens": input_tokens + text_sent}
            if whole_usage:
                data["usage"] = usage
        return sse(data)

    if script.content_parts:
        thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": piece}]} for piece in script.reasoning]
        content = [chunk({"content": [part]}) for part in thinking]
        content += [chunk({"content": [{"type": "text", "text": text}]}) for text in script.content_chunks()]
    else:
        content = [chunk({"reasoning_content": piece}) for piece in script.reasoning]
        key = "refusal" if script.refusal else "content"
        content += [chunk({key: text}) for text in script.content_chunks()]

    def keyed(index: int, piece: dict[str, Any]) -> dict[str, Any]:
        if script.tool_call_indexes != "none":
            piece["index"] = index if script.tool_call_indexes == "each" else 0
        return piece

    for index, call in enumerate(calls):
        # The first piece names the call; the arguments follow in pieces, by the call's index.
        function = {"name": call.name, "arguments": ""}
        first = keyed(index, {"type": "function", "function": function})
        if not script.omit_tool_call_ids:
            first["id"] = call.call_id(index, "call")
        content.append(chunk({"tool_calls": [first]}))
        content += [
            chunk({"tool_calls": [keyed(index, {"function": {"arguments": piece}})]})
            for piece in call.argument_pieces()
        ]
    closing: list[bytes | float] = [chunk({}, finish_reason, whole_usage=script.usage_on_finish)]
    if script.whole_message_at_end:
        whole = {"role": "assistant", "content": "".join(script.content_chunks())}
        closing = [
            sse(
                {
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": None, "message": whole, "finish_reason": finish_reason}],
                }
            )
        ]
    if script.usage_delay:
        closing.append(script.usage_delay)
    if include_usage and not script.usage_on_finish:
        usage_chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        closing.append(sse(usage_chunk))
    if script.fault not in (Fault.HANG_AT_END, Fault.RESET_AT_END):
        closing.append(b"data: [DONE]\n\n")
    message = error_message(record, script, "fake in-band error")
    error = error_body(500, script.error_type or "server_error", message, script.error_code)
    faults = {
        Fault.ERROR_EVENT: sse(error),
        Fault.MALFORMED_LINE: b'data: {"choices": [{"delta": \n\n',
        Fault.OVERSIZED_LINE: chunk({}, padding="x" * script.oversized_bytes),
        Fault.NON_UTF8: b"data: \xff\xfe\xfd\n\n",
        Fault.UNKNOWN_EVENT: sse({"object": "fake.unknown", "choices": [], "id": completion_id, "model": model}),
        Fault.INCOMPLETE_EVENT: sse({"object": "chat.completion.chunk", "choices": [{"delta": None}]}),
        Fault.WRONG_TYPES: sse(
            {
                "object": "chat.completion.chunk",
                "model": 7,
                "choices": [{"index": 0, "delta": {"content": 5}, "finish_reason": None}, "not a choice"],
                "usage": "none",
            }
        ),
        Fault.NOT_AN_OBJECT: b"data: null\n\n",
    }
    await stream_events(
        connection,
        record,
        script,
        opening=[chunk({"role": "assistant", "content": ""})],
        content=content,
        closing=closing,
        faults=faults,
    )
