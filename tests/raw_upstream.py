"""An HTTP server on loopback that answers each request with exact bytes, for what the fake does not
send (a body that never ends, a compression bomb, a BOM, odd event framing).

    async with RawUpstream() as raw:
        raw.replies.append(Reply(status=400, body=endless(b"x")))
        adapter = OpenAIProvider(..., base_url=raw.url + "/v1")

Each request takes the next of ``replies`` (a 500 once they run out); ``sent`` counts the body
bytes written for each reply, in order, up to when the client left; ``asked`` holds each request's
headers, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One answer: ``status``, ``headers`` and the body's chunks (``body()``, each written as it
    comes, ``pause`` seconds apart, so that the client reads them one by one)."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Callable[[], Iterable[bytes]] = lambda: ()
    content_type: str = "text/event-stream"
    pause: float = 0.0
    # The answer's exact bytes, its head and framing too (``wire``), written as above, then the
    # connection closed, or first held open until the client leaves (``hold``): for a body cut
    # short of its length or its last chunk, chunk extensions, a stall after a whole body.
    wire: Callable[[], Iterable[bytes]] | None = None
    hold: bool = False


def head(status: int, headers: Mapping[str, str]) -> bytes:
    """An HTTP/1.1 answer's head of ``status`` and ``headers``, for ``Reply.wire``."""
    lines = [f"HTTP/1.1 {status} Whatever", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _WrittenRaw(web.StreamResponse):
    """An answer written raw already (``Reply.wire``): aiohttp writes nothing of it, and closes the
    connection as after a client that left."""

    async def prepare(self, request: web.BaseRequest) -> None:
        raise ConnectionResetError("answered raw")


def endless(piece: bytes, *, first: bytes = b"") -> Callable[[], Iterator[bytes]]:
    """A body that never ends: ``first``, then ``piece`` over and over (64 KiB chunks)."""
    chunk = piece * max(1, 65536 // len(piece))

    def body() -> Iterator[bytes]:
        yield first
        while True:
            yield chunk

    return body


def endless_gzip(piece: bytes, *, first: bytes = b"") -> Callable[[], Iterator[bytes]]:
    """As ``endless``, gzip-compressed: each chunk on the wire decodes to about 1 MiB."""

    def body() -> Iterator[bytes]:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        yield compressor.compress(first)
        plain = piece * max(1, (1 << 20) // len(piece))
        while True:
            yield compressor.compress(plain) + compressor.flush(zlib.Z_SYNC_FLUSH)

    return body


def chunks(*parts: bytes) -> Callable[[], Iterable[bytes]]:
    """A body of these chunks."""
    return lambda: parts


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def openai_stream(texts: Iterable[str], *, end: bytes = b"\n\n") -> list[bytes]:
    """An OpenAI chat completion stream of ``texts``: chunk events, finish, usage, ``[DONE]``."""

    def chunk(**extra: Any) -> bytes:
        return b"data: " + _json({"id": "c1", "object": "chat.completion.chunk", "model": "m", **extra}) + end

    events = [chunk(choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}]) for text in texts]
    events.append(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}))
    return [*events, b"data: [DONE]" + end]


def anthropic_event(name: str, data: Mapping[str, Any]) -> bytes:
    """One Anthropic event: its ``event:`` and ``data:`` lines and the blank line."""
    return b"event: " + name.encode() + b"\ndata: " + _json(data) + b"\n\n"


def anthropic_stream(texts: Iterable[str], *, input_tokens: int = 10) -> list[bytes]:
    """An Anthropic message stream of ``texts``: message_start (``input_tokens``), one text block,
    message_delta (5 output tokens), message_stop."""
    message = {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    block = {"type": "text", "text": ""}
    events = [
        anthropic_event("message_start", {"type": "message_start", "message": message}),
        anthropic_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
    ]
    for text in texts:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        events.append(anthropic_event("content_block_delta", delta))
    events.append(anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}
    events.append(anthropic_event("message_delta", delta))
    return [*events, anthropic_event("message_stop", {"type": "message_stop"})]


class RawUpstream:
    """The server; ``url`` once entered."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.sent: list[int] = []
        self.asked: list[Mapping[str, str]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.asked.append(request.headers)
        reply = self.replies.pop(0) if self.replies else Reply(status=500, body=chunks(b'{"error": "no reply"}'))
        if reply.wire is not None:
            return await self._write_raw(request, reply, reply.wire)
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
        )
        await response.prepare(request)
        index = len(self.sent)
        self.sent.append(0)
        with contextlib.suppress(ConnectionError):
            for chunk in reply.body():
                await response.write(chunk)
                self.sent[index] += len(chunk)
                await asyncio.sleep(reply.pause)  # a write the socket takes at once does not yield
            await response.write_eof()
        return response

    async def _write_raw(
        self, request: web.Request, reply: Reply, wire: Callable[[], Iterable[bytes]]
    ) -> web.StreamResponse:
        index = len(self.sent)
        self.sent.append(0)
        transport = request.transport
        with contextlib.suppress(ConnectionError):
            for chunk in wire():
                # Nothing prepared: the writer adds no framing of its own.
                await request.writer.write(chunk)
                self.sent[index] += len(chunk)
                await asyncio.sleep(reply.pause)
            await request.writer.drain()
            while reply.hold and transport is not None and not transport.is_closing():  # noqa: ASYNC110  # aiohttp sets no event when the client leaves
                await asyncio.sleep(0.05)
        return _WrittenRaw()

    async def __aenter__(self) -> RawUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
