"""One HTTP/1.1 connection of the fake: buffered request parsing, chunked writes, client-gone detection."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


class ClientGone(Exception):
    """The client closed the connection."""


class ConnectionDone(Exception):
    """The fake ended the connection on purpose (cut or reset)."""


class BadRequest(Exception):
    """The request could not be parsed as HTTP/1.1."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Connection:
    """One client connection: buffered reads, chunked writes, and noticing when the client leaves."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, number: int = 0) -> None:
        self.number = number
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
            if len(self._buffer) > MAX_HEAD + MAX_BODY:
                return

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed an idle connection."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise BadRequest("request head too large")
            if not await self._fill():
                if self._buffer:
                    raise BadRequest("connection closed mid-request")
                return None
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("bad request line")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            length = _parse_int(headers.get("content-length", "0") or "0", 10)
            if length > MAX_BODY:
                raise BadRequest("body too large")
            body = await self._read_exactly(length)
        return Request(parts[0], parts[1], headers, body)

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not await self._fill():
                raise BadRequest("connection closed mid-body")
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD or not await self._fill():
                raise BadRequest("bad chunked body")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = _parse_int((await self._read_line()).split(b";")[0].decode("latin-1"), 16)
            if size == 0:
                while await self._read_line():
                    pass
                return bytes(body)
            body.extend(await self._read_exactly(size))
            await self._read_exactly(2)
            if len(body) > MAX_BODY:
                raise BadRequest("body too large")

    async def send(self, data: bytes) -> None:
        """Write raw bytes; ``ClientGone`` if the client has left."""
        if self.gone.is_set():
            raise ClientGone
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._mark_gone()
            raise ClientGone from exc
        except RuntimeError as exc:
            # uvloop's transport refuses a write once it is closed with a RuntimeError ("unable to
            # perform operation on <TCPTransport closed=True ...>"): the client has left.
            if not self._writer.is_closing():
                raise
            self._mark_gone()
            raise ClientGone from exc

    async def send_chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked body."""
        await self.send(b"%x\r\n%b\r\n" % (len(data), data))

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise ``ClientGone`` as soon as the client leaves."""
        if self.gone.is_set():
            raise ClientGone
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self.gone.wait()
        except TimeoutError:
            return
        raise ClientGone

    async def hang(self) -> None:
        """Send nothing until the client leaves."""
        await self.gone.wait()
        raise ClientGone

    async def cut(self) -> None:
        """Close the connection (FIN) wherever the response is."""
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()
        self._writer.close()
        raise ConnectionDone

    def reset(self) -> None:
        """Abort the connection with a TCP RST."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        raise ConnectionDone

    def close(self) -> None:
        self._writer.close()

    async def send_head(self, status: int, headers: Mapping[str, str]) -> None:
        """The status line and headers of a response."""
        await self.send(head(status, headers))

    async def send_json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        """A complete JSON response (``data`` already a string is sent as is)."""
        body = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        extra = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
        await self.send(head(status, extra) + body)


def _parse_int(text: str, base: int) -> int:
    try:
        value = int(text.strip(), base)
    except ValueError:
        raise BadRequest("bad length") from None
    if value < 0:
        raise BadRequest("negative length")
    return value


def head(status: int, headers: Mapping[str, str]) -> bytes:
    """A response status line and headers, keep-alive."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Site Overloaded" if status == 529 else "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", "connection: keep-alive"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
