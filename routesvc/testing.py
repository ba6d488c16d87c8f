"""Public test helpers: a fake OpenAI / Anthropic server on loopback, scriptable per request.

``FakeProvider`` is a real HTTP/1.1 server (``asyncio.start_server``, keep-alive, chunked
transfer encoding) that speaks what the official SDKs expect:

    POST /v1/chat/completions   OpenAI: JSON, or ``data: {chunk}`` lines, a usage chunk with empty
                                ``choices`` when ``stream_options.include_usage``, then ``data: [DONE]``
    POST /v1/messages           Anthropic: JSON, or ``event:``/``data:`` pairs from ``message_start``
                                to ``message_stop``, with cumulative output tokens in ``message_delta``
    POST /_fake/script          control: ``{"script": {...}, "model": "...", "mode": "enqueue" | "default"}``
    GET  /_fake/requests        control: every request received, with whether the client aborted
    POST /_fake/reset           control: forget scripts and requests

Each API request is answered by one ``Script`` (text, chunking, delays, usage, HTTP error,
``Fault``), taken from a FIFO queue or a default, per model name or for all models::

    async with FakeProvider() as fake:
        fake.enqueue(Script(chunk_count=60, fault=Fault.CUT, fault_after=40))
        client = AsyncOpenAI(base_url=fake.openai_base_url, api_key="k")
        ...
        assert fake.requests[-1].aborted is False

Run it as a separate process for other languages and CI: ``python -m routesvc.testing --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import http
import itertools
import json
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = ["DEFAULT_TEXT", "FakeProvider", "Fault", "RecordedRequest", "Script"]

DEFAULT_TEXT = "Hello from the fake provider."

_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024

OPENAI_CHAT_PATH = "/v1/chat/completions"
ANTHROPIC_MESSAGES_PATH = "/v1/messages"


class Fault(enum.Enum):
    """What goes wrong in a response, after ``Script.fault_after`` content chunks.

    Faults that end the exchange early (``CUT``, ``RESET``, ``HANG``) leave the stream unterminated;
    the others inject one bad event and then finish the stream normally.
    """

    NONE = "none"
    CUT = "cut"  # close the connection (FIN) without finishing the chunked body
    RESET = "reset"  # abort the connection with a TCP RST
    HANG = "hang"  # stop sending; keep the socket open until the client leaves
    HANG_BEFORE_HEADERS = "hang_before_headers"  # read the request, never answer
    ERROR_EVENT = "error_event"  # an in-band error event, then the end of the body
    MALFORMED_LINE = "malformed_line"  # a ``data:`` line that is not JSON
    OVERSIZED_LINE = "oversized_line"  # a valid event padded to ``oversized_bytes``
    NON_UTF8 = "non_utf8"  # a ``data:`` line with bytes that are not UTF-8
    UNKNOWN_EVENT = "unknown_event"  # an event type the SDKs do not know
    INCOMPLETE_EVENT = "incomplete_event"  # valid JSON without the fields its type requires
    MISSING_TERMINATOR = "missing_terminator"  # end the body without finish, usage, [DONE] or message_stop


_FINISH_TO_ANTHROPIC = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

_ERROR_TYPES = {
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


@dataclass(frozen=True, slots=True)
class Script:
    """How the fake answers one request.

    Content: ``chunks`` if given, else ``chunk_count`` chunks ``"chunk-0 "``, ``"chunk-1 "``...,
    else ``text`` split after each run of whitespace. Usage: ``input_tokens`` defaults to the number
    of whitespace-separated words in every message (and the system prompt) received, and includes
    ``cached_input_tokens`` and ``cache_creation_input_tokens`` (the Anthropic wire format reports
    them apart, as Anthropic does); ``output_tokens`` defaults to the number of chunks.
    ``finish_reason`` uses OpenAI names and is translated for Anthropic (stop -> end_turn, ...);
    an unknown name is sent as is.

    An error ``status`` answers with a provider-shaped JSON error (or ``error_body`` verbatim),
    ``Retry-After: retry_after`` and ``retry-after-ms`` when set. With ``echo_prompt`` the error
    message and in-band error events repeat the prompt and the API key received, as careless
    providers do, so that tests prove nothing is copied from them.
    """

    text: str = DEFAULT_TEXT
    chunks: tuple[str, ...] | None = None
    chunk_count: int | None = None
    chunk_delay: float = 0.0
    first_chunk_delay: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    omit_usage: bool = False
    finish_reason: str = "stop"
    model: str | None = None
    status: int = 200
    error_type: str | None = None  # of an HTTP error or an in-band error event; default by status
    error_body: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fault: Fault = Fault.NONE
    fault_after: int = 0
    oversized_bytes: int = 1024 * 1024
    echo_prompt: bool = True

    def content_chunks(self) -> tuple[str, ...]:
        """The text pieces this script streams, in order."""
        if self.chunks is not None:
            return self.chunks
        if self.chunk_count is not None:
            return tuple(f"chunk-{index} " for index in range(self.chunk_count))
        return tuple(re.findall(r"\S+\s*|\s+", self.text))

    def to_json(self) -> dict[str, Any]:
        """This script as JSON-ready values (for ``POST /_fake/script``)."""
        data = asdict(self)
        data["fault"] = self.fault.value
        data["headers"] = dict(self.headers)
        if self.chunks is not None:
            data["chunks"] = list(self.chunks)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Script:
        """A script from JSON values; unknown keys are an error (``ValueError``)."""
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown script fields: {sorted(unknown)}")
        values = dict(data)
        if "fault" in values:
            values["fault"] = Fault(values["fault"])
        if values.get("chunks") is not None:
            values["chunks"] = tuple(str(chunk) for chunk in values["chunks"])
        if "headers" in values:
            values["headers"] = MappingProxyType({str(k): str(v) for k, v in dict(values["headers"]).items()})
        return cls(**values)


@dataclass(eq=False, slots=True)
class RecordedRequest:
    """One request the fake received, and how its response ended.

    ``aborted`` is True when the client closed the connection before the response was complete;
    ``aborted_at`` is then the ``time.monotonic()`` at which the fake noticed. ``ended`` is set once
    the exchange is over, however it ended.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    received_at: float
    script: Script | None = None
    chunks_sent: int = 0
    completed: bool = False
    aborted: bool = False
    aborted_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def model(self) -> str:
        """The ``model`` field of the JSON body, or ""."""
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else ""

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed response."""
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def api_key(self) -> str | None:
        """The key sent as ``x-api-key`` or ``Authorization: Bearer``."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        authorization = self.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:]
        return None

    async def wait_ended(self, timeout: float) -> None:
        """Wait until the exchange is over; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self.ended.wait()

    def to_json(self) -> dict[str, Any]:
        """This record as JSON-ready values (for ``GET /_fake/requests``)."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": dict(self.headers),
            "body": self.body,
            "received_at": self.received_at,
            "chunks_sent": self.chunks_sent,
            "completed": self.completed,
            "aborted": self.aborted,
            "aborted_at": self.aborted_at,
            "ended": self.ended.is_set(),
        }


class _ClientGone(Exception):
    """The client closed the connection."""


class _ConnectionDone(Exception):
    """The fake ended the connection on purpose (cut or reset)."""


class _BadRequest(Exception):
    """The request could not be parsed as HTTP/1.1."""


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Connection:
    """One client connection: buffered reads, chunked writes, and noticing when the client leaves."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self.gone = asyncio.Event()
        self.gone_at: float | None = None

    def _mark_gone(self) -> None:
        if not self.gone.is_set():
            self.gone_at = time.monotonic()
            self.gone.set()

    async def _fill(self) -> bool:
        try:
            data = await self._reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self._mark_gone()
            return False
        self._buffer.extend(data)
        return True

    async def watch(self) -> None:
        """Read while a response is written, so that a closed socket is noticed at once."""
        while await self._fill():
            if len(self._buffer) > _MAX_HEAD + _MAX_BODY:
                return

    async def read_request(self) -> _Request | None:
        """The next request, or None when the client closed an idle connection."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > _MAX_HEAD:
                raise _BadRequest("request head too large")
            if not await self._fill():
                if self._buffer:
                    raise _BadRequest("connection closed mid-request")
                return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("bad request line")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            length = int(headers.get("content-length", "0") or 0)
            if length > _MAX_BODY:
                raise _BadRequest("body too large")
            body = await self._read_exactly(length)
        return _Request(parts[0], parts[1], headers, body)

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not await self._fill():
                raise _BadRequest("connection closed mid-body")
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > _MAX_HEAD or not await self._fill():
                raise _BadRequest("bad chunked body")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self._read_line()).split(b";")[0], 16)
            if size == 0:
                while await self._read_line():
                    pass
                return bytes(body)
            body.extend(await self._read_exactly(size))
            await self._read_exactly(2)
            if len(body) > _MAX_BODY:
                raise _BadRequest("body too large")

    async def send(self, data: bytes) -> None:
        """Write raw bytes; ``_ClientGone`` if the client has left."""
        if self.gone.is_set():
            raise _ClientGone
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._mark_gone()
            raise _ClientGone from exc

    async def send_chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked body."""
        await self.send(b"%x\r\n%b\r\n" % (len(data), data))

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise ``_ClientGone`` as soon as the client leaves."""
        if self.gone.is_set():
            raise _ClientGone
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self.gone.wait()
        except TimeoutError:
            return
        raise _ClientGone

    async def hang(self) -> None:
        """Send nothing until the client leaves."""
        await self.gone.wait()
        raise _ClientGone

    async def cut(self) -> None:
        """Close the connection (FIN) wherever the response is."""
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()
        self._writer.close()
        raise _ConnectionDone

    def reset(self) -> None:
        """Abort the connection with a TCP RST."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        raise _ConnectionDone

    def close(self) -> None:
        self._writer.close()


def _received_text(body: Any) -> str:
    """All message and system text of an OpenAI or Anthropic request body, space-joined."""
    texts: list[str] = []

    def collect(content: Any) -> None:
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])

    if isinstance(body, dict):
        collect(body.get("system"))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                collect(message.get("content"))
    return " ".join(texts)


def _sse(data: Any, event: str | None = None) -> bytes:
    payload = json.dumps(data, separators=(",", ":")).encode()
    prefix = f"event: {event}\n".encode() if event is not None else b""
    return prefix + b"data: " + payload + b"\n\n"


_Handler = Callable[["_Connection", _Request], Awaitable[bool]]


class FakeProvider:
    """A scriptable fake OpenAI and Anthropic server on loopback.

    ``api_key``: when set, API requests with another key get a provider-shaped 401.
    ``default``: the script used when no queued or per-model script applies.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Script | None = None,
        api_key: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._api_key = api_key
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._defaults: dict[str | None, Script] = {None: default or Script()}
        self._queues: dict[str | None, collections.deque[Script]] = collections.defaultdict(collections.deque)
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        # One handler per (method, path); the batch endpoints (/v1/batches, /v1/messages/batches)
        # plug in here when they arrive.
        self._routes: dict[tuple[str, str], _Handler] = {
            ("POST", OPENAI_CHAT_PATH): self._openai,
            ("POST", ANTHROPIC_MESSAGES_PATH): self._anthropic,
            ("POST", "/_fake/script"): self._control_script,
            ("GET", "/_fake/requests"): self._control_requests,
            ("POST", "/_fake/reset"): self._control_reset,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (port 0 picks a free port)."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self._host}:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """What the OpenAI SDK wants: the root plus ``/v1``."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What the Anthropic SDK wants: the bare root."""
        return self.base_url

    # -- scripts and records ---------------------------------------------------------------------

    def set_default(self, script: Script, *, model: str | None = None) -> None:
        """Answer with ``script`` when no queued script applies (for ``model`` only, if given)."""
        self._defaults[model] = script

    def enqueue(self, *scripts: Script, model: str | None = None) -> None:
        """Answer the next requests (for ``model`` only, if given) with ``scripts``, in order."""
        self._queues[model].extend(scripts)

    def reset(self) -> None:
        """Forget queued and per-model scripts and recorded requests (the global default stays)."""
        self._queues.clear()
        self._defaults = {None: self._defaults[None]}
        self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every API request received so far, oldest first (control requests are not recorded)."""
        return list(self._requests)

    def _take_script(self, model: str) -> Script:
        for key in (model, None):
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        return self._defaults.get(model) or self._defaults[None]

    # -- serving ---------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = _Connection(reader, writer)
        try:
            while (request := await connection.read_request()) is not None:
                handler = self._routes.get((request.method, request.path.split("?")[0]))
                if handler is None:
                    keep_alive = await self._send_json(connection, 404, {"error": {"type": "not_found_error"}})
                else:
                    keep_alive = await handler(connection, request)
                if not keep_alive or request.headers.get("connection", "").lower() == "close":
                    break
        except (_ClientGone, _ConnectionDone, _BadRequest, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            connection.close()

    async def _send_json(
        self, connection: _Connection, status: int, data: Any, headers: Mapping[str, str] | None = None
    ) -> bool:
        body = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        await connection.send(
            _head(status, {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})})
            + body
        )
        return True

    async def _api_exchange(
        self,
        connection: _Connection,
        request: _Request,
        respond: Callable[[RecordedRequest, Script], Awaitable[None]],
        error_body: Callable[[int, str, str], Any],
    ) -> bool:
        """Record an API request, pick its script and answer it while watching for the client leaving."""
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=MappingProxyType(dict(request.headers)),
            body=body,
            received_at=time.monotonic(),
        )
        self._requests.append(record)
        watcher = asyncio.create_task(connection.watch())
        keep_alive = False
        try:
            if not isinstance(body, dict):
                await self._send_json(connection, 400, error_body(400, "invalid_request_error", "body is not JSON"))
                keep_alive = True
            elif self._api_key is not None and record.api_key != self._api_key:
                message = f"invalid api key {record.api_key}"
                await self._send_json(connection, 401, error_body(401, "authentication_error", message))
                keep_alive = True
            else:
                script = self._take_script(record.model)
                record.script = script
                await respond(record, script)
                keep_alive = True
            record.completed = True
        except _ClientGone:
            record.aborted = True
            record.aborted_at = connection.gone_at
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            record.ended.set()
        return keep_alive

    async def _error_response(
        self, connection: _Connection, record: RecordedRequest, script: Script, error_body: Callable[..., Any]
    ) -> None:
        error_type = script.error_type or _ERROR_TYPES.get(script.status, "api_error")
        message = f"fake error {script.status}"
        if script.echo_prompt:
            message += f" for prompt {_received_text(record.body)!r} with key {record.api_key!r}"
        headers = dict(script.headers)
        if script.retry_after is not None:
            headers["retry-after"] = script.retry_after
        if script.retry_after_ms is not None:
            headers["retry-after-ms"] = script.retry_after_ms
        data = script.error_body if script.error_body is not None else error_body(script.status, error_type, message)
        await connection.pause(script.first_chunk_delay)
        await self._send_json(connection, script.status, data, headers)

    async def _stream_events(
        self,
        connection: _Connection,
        record: RecordedRequest,
        script: Script,
        opening: list[bytes],
        content: Callable[[str], bytes],
        closing: list[bytes],
        faults: Mapping[Fault, bytes],
    ) -> None:
        """Stream ``opening``, one event per chunk, ``closing``; inject ``script.fault`` on the way."""
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "transfer-encoding": "chunked",
            "cache-control": "no-cache",
            **script.headers,
        }
        await connection.send(_head(200, headers))
        for event in opening:
            await connection.send_chunk(event)
        chunks = script.content_chunks()
        for index in range(len(chunks) + 1):
            if index == script.fault_after and script.fault is not Fault.NONE:
                if script.fault is Fault.CUT:
                    await connection.cut()
                elif script.fault is Fault.RESET:
                    connection.reset()
                elif script.fault is Fault.HANG:
                    await connection.hang()
                elif script.fault is Fault.MISSING_TERMINATOR:
                    await connection.send(b"0\r\n\r\n")
                    return
                elif script.fault is Fault.ERROR_EVENT:
                    await connection.send_chunk(faults[Fault.ERROR_EVENT])
                    await connection.send(b"0\r\n\r\n")
                    return
                elif script.fault in faults:
                    await connection.send_chunk(faults[script.fault])
            if index == len(chunks):
                break
            await connection.pause(script.first_chunk_delay if index == 0 else script.chunk_delay)
            await connection.send_chunk(content(chunks[index]))
            record.chunks_sent += 1
        for event in closing:
            await connection.send_chunk(event)
        await connection.send(b"0\r\n\r\n")

    def _usage_numbers(self, record: RecordedRequest, script: Script) -> tuple[int, int]:
        input_tokens = script.input_tokens
        if input_tokens is None:
            input_tokens = len(_received_text(record.body).split())
        output_tokens = script.output_tokens
        if output_tokens is None:
            output_tokens = len(script.content_chunks())
        return input_tokens, output_tokens

    async def _answer_non_streaming(self, connection: _Connection, script: Script) -> None:
        """Apply the faults that make sense without a stream, then the latency."""
        if script.fault in (Fault.HANG, Fault.HANG_BEFORE_HEADERS):
            await connection.hang()
        if script.fault is Fault.CUT:
            await connection.cut()
        if script.fault is Fault.RESET:
            connection.reset()
        await connection.pause(script.first_chunk_delay)

    # -- OpenAI ----------------------------------------------------------------------------------

    async def _openai(self, connection: _Connection, request: _Request) -> bool:
        return await self._api_exchange(
            connection, request, lambda record, script: self._openai_respond(connection, record, script), _openai_error
        )

    async def _openai_respond(self, connection: _Connection, record: RecordedRequest, script: Script) -> None:
        if script.fault is Fault.HANG_BEFORE_HEADERS:
            await connection.hang()
        if script.status != 200:
            await self._error_response(connection, record, script, _openai_error)
            return
        body: dict[str, Any] = record.body
        model = script.model or record.model
        completion_id = f"chatcmpl-fake-{next(self._ids)}"
        created = int(time.time())
        input_tokens, output_tokens = self._usage_numbers(record, script)
        usage = {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "prompt_tokens_details": {"cached_tokens": script.cached_input_tokens},
        }
        if not record.stream:
            await self._answer_non_streaming(connection, script)
            response: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(script.content_chunks())},
                        "logprobs": None,
                        "finish_reason": script.finish_reason,
                    }
                ],
            }
            if not script.omit_usage:
                response["usage"] = usage
            await self._send_json(connection, 200, response)
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True and not script.omit_usage

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra,
            }
            if include_usage:
                data["usage"] = None
            return _sse(data)

        closing = [chunk({}, script.finish_reason)]
        if include_usage:
            closing.append(
                _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        closing.append(b"data: [DONE]\n\n")
        error = _openai_error(500, script.error_type or "server_error", self._in_band_message(record, script))
        faults = {
            Fault.ERROR_EVENT: _sse(error),
            Fault.MALFORMED_LINE: b'data: {"choices": [{"delta": \n\n',
            Fault.OVERSIZED_LINE: chunk({}, padding="x" * script.oversized_bytes),
            Fault.NON_UTF8: b"data: \xff\xfe\xfd\n\n",
            Fault.UNKNOWN_EVENT: _sse({"object": "fake.unknown", "choices": [], "id": completion_id, "model": model}),
            Fault.INCOMPLETE_EVENT: _sse({"object": "chat.completion.chunk", "choices": [{"delta": None}]}),
        }
        await self._stream_events(
            connection,
            record,
            script,
            opening=[chunk({"role": "assistant", "content": ""})],
            content=lambda text: chunk({"content": text}),
            closing=closing,
            faults=faults,
        )

    # -- Anthropic -------------------------------------------------------------------------------

    async def _anthropic(self, connection: _Connection, request: _Request) -> bool:
        return await self._api_exchange(
            connection,
            request,
            lambda record, script: self._anthropic_respond(connection, record, script),
            _anthropic_error,
        )

    async def _anthropic_respond(self, connection: _Connection, record: RecordedRequest, script: Script) -> None:
        if script.fault is Fault.HANG_BEFORE_HEADERS:
            await connection.hang()
        if script.status != 200:
            await self._error_response(connection, record, script, _anthropic_error)
            return
        model = script.model or record.model
        message_id = f"msg_fake_{next(self._ids)}"
        stop_reason = _FINISH_TO_ANTHROPIC.get(script.finish_reason, script.finish_reason)
        input_tokens, output_tokens = self._usage_numbers(record, script)
        start_usage: dict[str, Any] = {
            "input_tokens": input_tokens - script.cached_input_tokens - script.cache_creation_input_tokens,
            "cache_creation_input_tokens": script.cache_creation_input_tokens,
            "cache_read_input_tokens": script.cached_input_tokens,
            "output_tokens": 1 if output_tokens else 0,
        }
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if not record.stream:
            await self._answer_non_streaming(connection, script)
            response = {
                **message,
                "content": [{"type": "text", "text": "".join(script.content_chunks())}],
                "stop_reason": stop_reason,
            }
            if not script.omit_usage:
                response["usage"] = {**start_usage, "output_tokens": output_tokens}
            await self._send_json(connection, 200, response, {"request-id": f"req_fake_{next(self._ids)}"})
            return
        if not script.omit_usage:
            message["usage"] = start_usage
        delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
        if not script.omit_usage:
            delta["usage"] = {"output_tokens": output_tokens}
        error = _anthropic_error(529, script.error_type or "overloaded_error", self._in_band_message(record, script))
        faults = {
            Fault.ERROR_EVENT: _sse(error, "error"),
            Fault.MALFORMED_LINE: b'event: content_block_delta\ndata: {"type": "content_block_delta", \n\n',
            Fault.OVERSIZED_LINE: _sse({"type": "ping", "padding": "x" * script.oversized_bytes}, "ping"),
            Fault.NON_UTF8: b"event: content_block_delta\ndata: \xff\xfe\xfd\n\n",
            Fault.UNKNOWN_EVENT: _sse({"type": "fake_unknown"}, "fake_unknown"),
            Fault.INCOMPLETE_EVENT: _sse({"type": "content_block_delta"}, "content_block_delta"),
        }
        await self._stream_events(
            connection,
            record,
            script,
            opening=[
                _sse({"type": "message_start", "message": message}, "message_start"),
                _sse(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    "content_block_start",
                ),
                _sse({"type": "ping"}, "ping"),
            ],
            content=lambda text: _sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                "content_block_delta",
            ),
            closing=[
                _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                _sse(delta, "message_delta"),
                _sse({"type": "message_stop"}, "message_stop"),
            ],
            faults=faults,
        )

    @staticmethod
    def _in_band_message(record: RecordedRequest, script: Script) -> str:
        message = "fake in-band error"
        if script.echo_prompt:
            message += f" for prompt {_received_text(record.body)!r} with key {record.api_key!r}"
        return message

    # -- control ---------------------------------------------------------------------------------

    async def _control_script(self, connection: _Connection, request: _Request) -> bool:
        try:
            data = json.loads(request.body)
            script = Script.from_json(data.get("script") or {})
            model = data.get("model")
            mode = data.get("mode", "enqueue")
            if mode not in ("enqueue", "default") or not (model is None or isinstance(model, str)):
                raise ValueError("mode must be enqueue or default; model a string")
        except (ValueError, TypeError, AttributeError) as exc:
            return await self._send_json(connection, 400, {"error": {"type": "invalid_script", "message": str(exc)}})
        if mode == "default":
            self.set_default(script, model=model)
        else:
            self.enqueue(script, model=model)
        return await self._send_json(connection, 200, {"ok": True})

    async def _control_requests(self, connection: _Connection, request: _Request) -> bool:
        return await self._send_json(connection, 200, {"requests": [record.to_json() for record in self._requests]})

    async def _control_reset(self, connection: _Connection, request: _Request) -> bool:
        self.reset()
        return await self._send_json(connection, 200, {"ok": True})


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Site Overloaded" if status == 529 else "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", "connection: keep-alive"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _openai_error(status: int, error_type: str, message: str) -> dict[str, Any]:
    code = "rate_limit_exceeded" if status == 429 else None
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def _anthropic_error(status: int, error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": f"req_fake_{status}"}


async def _run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeProvider(host=host, port=port) as fake:
        # The address on stdout lets a parent process that asked for port 0 find the server.
        sys.stdout.write(f"{fake.base_url}\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m routesvc.testing [--host H] [--port N]``: run the fake provider until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m routesvc.testing", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.host, args.port))


if __name__ == "__main__":
    main()
