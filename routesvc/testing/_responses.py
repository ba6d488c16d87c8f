"""What every fake API response shares: SSE framing, error responses, streaming with fault injection."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from routesvc.testing._connection import Connection
from routesvc.testing._script import Fault, RecordedRequest, Script, error_message

ErrorBody = Callable[[int, str, str], Any]
"""Builds a provider-shaped error body from (status, error type, message)."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_END_OF_BODY = b"0\r\n\r\n"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: an optional ``event:`` line and one ``data:`` line of compact JSON."""
    payload = json.dumps(data, separators=(",", ":")).encode()
    prefix = f"event: {event}\n".encode() if event is not None else b""
    return prefix + b"data: " + payload + b"\n\n"


async def send_error(connection: Connection, record: RecordedRequest, script: Script, error_body: ErrorBody) -> None:
    """Answer with the script's HTTP error status, body and ``Retry-After`` headers."""
    error_type = script.error_type or ERROR_TYPES.get(script.status, "api_error")
    message = error_message(record, script, f"fake error {script.status}")
    headers = dict(script.headers)
    if script.retry_after is not None:
        headers["retry-after"] = script.retry_after
    if script.retry_after_ms is not None:
        headers["retry-after-ms"] = script.retry_after_ms
    data = script.error_body if script.error_body is not None else error_body(script.status, error_type, message)
    await connection.pause(script.first_chunk_delay)
    await connection.send_json(script.status, data, headers)


async def before_json_answer(connection: Connection, script: Script) -> None:
    """Apply the faults that make sense without a stream, then the script's latency."""
    if script.fault in (Fault.HANG, Fault.HANG_BEFORE_HEADERS):
        await connection.hang()
    if script.fault is Fault.CUT:
        await connection.cut()
    if script.fault is Fault.RESET:
        connection.reset()
    await connection.pause(script.first_chunk_delay)


async def stream_events(
    connection: Connection,
    record: RecordedRequest,
    script: Script,
    *,
    opening: list[bytes],
    content: Sequence[bytes],
    closing: Sequence[bytes | float],
    faults: Mapping[Fault, bytes],
) -> None:
    """Stream ``opening``, each content chunk (reasoning, text, tool-call pieces: one or more events
    each), ``closing`` (a number in it: a pause of that many seconds); inject ``script.fault`` on the way.

    ``faults`` holds the API's own bytes for the faults that inject an event.
    """
    headers = {
        "content-type": "text/event-stream; charset=utf-8",
        "transfer-encoding": "chunked",
        "cache-control": "no-cache",
        **({"content-encoding": "gzip"} if script.gzip_stream else {}),
        **script.headers,
    }
    await connection.send_head(200, headers)
    gzip = zlib.compressobj(wbits=31) if script.gzip_stream else None

    async def send_chunk(events: bytes) -> None:
        events = events.replace(b"\n\n", b"\n" + script.event_blank_line.encode())
        if gzip is not None:
            events = gzip.compress(events) + gzip.flush(zlib.Z_SYNC_FLUSH)
        await connection.send_chunk(events)

    async def inject() -> bool:
        """Inject ``script.fault``; whether the exchange ends there."""
        if script.fault is Fault.CUT:
            await connection.cut()
        elif script.fault is Fault.RESET:
            connection.reset()
        elif script.fault is Fault.HANG and script.hang_seconds is not None:
            await connection.pause(script.hang_seconds)
        elif script.fault is Fault.HANG:
            await connection.hang()
        elif script.fault is Fault.BAD_FRAMING:
            await connection.send(b"zz\r\n")
            await connection.hang()
        elif script.fault is Fault.MISSING_TERMINATOR:
            await connection.send(_END_OF_BODY)
            return True
        elif script.fault is Fault.ERROR_EVENT:
            await send_chunk(faults[Fault.ERROR_EVENT])
            await connection.send(_END_OF_BODY)
            return True
        elif script.fault in faults:
            await send_chunk(faults[script.fault])
        return False

    for event in opening:
        await send_chunk(event)
    chunks = content
    for index in range(len(chunks) + 1):
        at_fault = index == script.fault_after and not script.fault_at_end
        if at_fault and script.fault is not Fault.NONE and await inject():
            return
        if index == len(chunks):
            break
        await connection.pause(script.first_chunk_delay if index == 0 else script.chunk_delay)
        await send_chunk(chunks[index])
        record.chunks_sent += 1
    for position, step in enumerate(closing):
        at_fault = script.fault_at_end and position == len(closing) - 1
        if at_fault and script.fault is not Fault.NONE and await inject():
            return
        if isinstance(step, bytes):
            await send_chunk(step)
        else:
            await connection.pause(step)
    if script.fault is Fault.HANG_AT_END:
        if script.hang_seconds is None:
            await connection.hang()
        else:
            await connection.pause(script.hang_seconds)
    if script.fault is Fault.RESET_AT_END:
        await connection.pause(script.hang_seconds or 0.0)
        connection.reset()
    if gzip is not None:
        await connection.send_chunk(gzip.flush())
    await connection.send(_END_OF_BODY)
