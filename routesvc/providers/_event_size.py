"""A bound on the bytes of one server-sent event, below both SDKs' SSE decoders.

The SDKs' decoders hold an event's bytes until its blank line, then decode and parse it whole,
whatever its size: one 200 MB event from a broken or hostile server (an ``openai_compatible``
endpoint, a proxy gone wrong) cost the process about 800 MB, and a few such streams at once
would take every tenant's streams down with it. So each transport of an SDK client wraps the
body of every successful (2xx) response to a streaming request (the adapter sends it inside
``streaming()``), whatever its ``Content-Type``, since both SDKs parse a streamed body as events whatever it is
labelled, and counts each event's bytes up to its end as the SDK's decoder finds it
(``EventBound.ends``); past ``EventBound.limit`` the body fails with ``EventTooLarge`` (an
``httpx2.ReadError``, as a broken connection fails it), which the adapters translate to
``ProviderUnavailable``. What is held stays within the limit and one read's chunk. A UTF-8 byte
order mark before the first event, which the SSE spec skips and neither SDK does, is dropped. The anthropic
SDK's decoder also costs time quadratic in the pieces of one event (it splits each read into
lines and adds each piece to the event's bytes by copying them), so an event of a million short
lines, well within the limit, held the event loop for minutes, and so did one long line read a
byte at a time: that SDK is handed whole lines only (a read's last line, not yet ended, is held
and handed on with the rest of it, its bytes counted in the event's), and an anthropic stream's
event fails ``event_too_many_lines`` past ``MAX_EVENT_LINES`` lines (a real event has two or
three, however many reads it comes in). An error's body (4xx, 5xx) or a redirect's (3xx, which the
SDK follows) is not bounded as events (an error of any size counted as one event turned a 400 or a
429 into ``event_too_large``) but as a whole: the SDK reads it whole for its message, so it is
passed on when it ends within ``ERROR_BODY_LIMIT`` bytes and ``ERROR_BODY_SECONDS`` of reading (a
body that trickles, or chunked framing that carries next to nothing, was read until the call's
deadline), decoded here (gzip, of one member or more, or deflate, decoded no further than that,
what follows its end that is no member not read) when compressed, and dropped (an empty body, the
rest unread) past them, or when compressed otherwise (``br``, ``zstd``, two codings) or broken (an
error body read whole, or decoded whole, could cost the process gigabytes). One its connection cuts
ends where it was cut (the transport's error, raised to the SDK's read of the body, lost the
status: a 400 or a 429 became a connection failure); one still coming at ``ERROR_BODY_SECONDS``
whose bytes so far are whole (a JSON document, a gzip member) ends there too. A body dropped, or
cut short of a whole one, is marked on its response (``error_body_lost``): the batch adapters take
such a 400 for no definite rejection. A dropped body's answer keeps its status and
headers, so a 400 stays rejected and a 429 keeps its ``Retry-After``, but all the body told is
lost: the error's code in the message, and what only the body tells of its class, a spent quota
(OpenAI's 429 ``insufficient_quota`` then a rate limit, retried; Anthropic's 400 "credit balance is
too low" then a rejection, with no fallback). A body cut at the bound would not tell it either (its
JSON does not parse).

The bytes counted are the ones the SDK decodes: a streaming request asks for them unencoded
(``Accept-Encoding: identity``), and a successful answer that comes compressed all the same
fails with ``EncodedStream`` (a few hundred bytes of gzip can hold a 100 kB event, a few hundred
kB a 200 MB one, decoded whole after the transport); one labelled with a coding the stack does
not decode (``none``, ``utf-8``, ``x-gzip``; ``br`` unless brotli or brotlicffi is installed,
``zstd`` unless Python has ``compression.zstd`` (3.14+) or backports.zstd is installed:
``DECODED_CODINGS``) is read as unencoded, as the stack reads it. An error's or a redirect's
body is capped so for every request, whoever sends it (``CappedErrorsTransport``, which the batch
adapters' clients use too); the successful responses to other requests (batch files, list pages)
are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import httpx2
from httpx2._decoders import SUPPORTED_DECODERS

DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024
# The most lines of one event of an anthropic stream, as its SDK's decoder adds them one by one.
MAX_EVENT_LINES = 1000
# The most of an error's or a redirect's body passed on (a provider's error is well under a kB).
ERROR_BODY_LIMIT = 1024 * 1024
# The longest an error's or a redirect's body is read (a provider's comes with its head), from the
# SDK's first read of it.
ERROR_BODY_SECONDS = 2.0
# Set in an error's response extensions when its body was not passed on whole (``_CappedBody``):
# dropped, or cut short of a whole one.
BODY_LOST = "routesvc.error_body_lost"
# What a request asks its answer compressed in (``CappedErrorsTransport``): the codings decoded here.
_ASKED_CODINGS = "gzip, deflate"

_OPENAI_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
# The bytes of the data before a chunk kept to find an event's end split across two chunks.
_TAIL = 3
_ANTHROPIC_ENDS = (b"\r\r", b"\n\n", b"\r\n\r\n")
_BOM = "\ufeff".encode()


class EventEnds(Protocol):
    r"""Where one stream's events end, as its SDK's decoder finds them, chunk after chunk; and
    ``overrun``, once an event runs past a limit of the kind's other than its bytes (then ``find``
    has returned the ends before it only). With ``whole_lines``, the chunks passed to ``find`` and
    on to the SDK are whole lines (each ends in ``\r`` or ``\n``, but the stream's last)."""

    overrun: UnreadableStream | None
    whole_lines: bool

    def find(self, chunk: bytes) -> list[int]:
        """The offsets in ``chunk`` just after each event's end, in order (the chunks before
        passed to ``find`` first)."""


class OpenAIEventEnds:
    r"""As the openai SDK's decoder (``_SSELineDecoder``, per the SSE spec): a line end (``\r\n``,
    ``\r``, ``\n``) followed by another, so ``\n`` then ``\r\n`` is one too."""

    whole_lines = False

    def __init__(self) -> None:
        self._tail = b""  # the last bytes before the chunk, for an end split across the two
        self.overrun: UnreadableStream | None = None

    def find(self, chunk: bytes) -> list[int]:
        window = self._tail + chunk
        skip = len(self._tail)
        self._tail = window[-_TAIL:]
        # An end that ends in the bytes before the chunk was found with them.
        return [end.end() - skip for end in _OPENAI_EVENT_END.finditer(window) if end.end() > skip]


class AnthropicEventEnds:
    r"""As the anthropic SDK's decoder (``SSEDecoder._aiter_chunks``): it splits each chunk it reads
    into lines (``splitlines``), adds them one by one to the event's bytes, and ends the event
    only when these then end with ``\r\r``, ``\n\n`` or ``\r\n\r\n``. So it holds a stream that
    mixes line endings (``\n`` then ``\r\n``, ``\r`` then ``\r\n``) as one event, and an end
    split across two chunks between ``\r`` and ``\n`` (``\r\r`` then ``\n``) is one where
    one is not; the chunks are the ones passed on, so the ends are the SDK's exactly.

    The chunks are whole lines (``whole_lines``): a piece without a line end cannot end an event,
    so the SDK ends them where it would end the chunks as read, and each piece it adds is a line.
    An event of more than ``MAX_EVENT_LINES`` lines is an ``overrun``; a ``\n`` that ends a
    ``\r\n`` split between two chunks (which the SDK adds on its own) is not another line."""

    whole_lines = True

    def __init__(self) -> None:
        self._held = b""  # the last bytes of the event so far (no more than an end's)
        self._lines = 0  # the lines of the event so far
        self.overrun: UnreadableStream | None = None

    def find(self, chunk: bytes) -> list[int]:
        ends: list[int] = []
        held = self._held
        offset = 0
        for line in chunk.splitlines(keepends=True):
            offset += len(line)
            if not (line == b"\n" and offset == 1 and held.endswith(b"\r")):
                self._lines += 1
            if self._lines > MAX_EVENT_LINES:
                self.overrun = EventTooManyLines(MAX_EVENT_LINES)
                break
            held = (held + line[-4:])[-4:]
            if held.endswith(_ANTHROPIC_ENDS):
                ends.append(offset)
                held = b""
                self._lines = 0
        self._held = held
        return ends


# The content codings the HTTP stack decodes: httpx2's decoders, over both transports (aiohttp's
# passes the body on undecoded, ``auto_decompress=False``, to httpx2): gzip and deflate; br only
# where brotli or brotlicffi is installed; zstd only where Python has ``compression.zstd`` (3.14+)
# or backports.zstd is installed (not the zstandard package). A stream in any of these is refused. Any
# other coding ("none", "utf-8": a header some SSE servers send to keep proxies from compressing;
# "x-gzip", "compress", which httpx2 does not know) the stack passes on as it came, as identity,
# so the bytes counted are the bytes decoded.
DECODED_CODINGS = frozenset(SUPPORTED_DECODERS) - {"identity"}

_STREAMING: ContextVar[bool] = ContextVar("routesvc_streaming_request", default=False)


@contextlib.contextmanager
def streaming() -> Iterator[None]:
    """While an adapter's SDK sends a streaming request in this context: its response is bounded."""
    token = _STREAMING.set(True)
    try:
        yield
    finally:
        _STREAMING.reset(token)


@dataclass(frozen=True)
class EventBound:
    """At most ``limit`` bytes per event, each stream's events ending where a new ``ends`` finds
    them (its SDK's rule: ``OpenAIEventEnds``, ``AnthropicEventEnds``)."""

    limit: int
    ends: Callable[[], EventEnds]


class UnreadableStream(httpx2.ReadError):
    """A streamed body the transport refuses to pass on: ``what`` went wrong, ``reason`` its code."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(what)
        self.what = what
        self.reason = reason


class EventTooLarge(UnreadableStream):
    """An event of the stream passed ``limit`` bytes before its end."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"stream event over {limit} bytes (reliability.max_event_bytes)", "event_too_large")
        self.limit = limit


class EventTooManyLines(UnreadableStream):
    """An event of an anthropic stream passed ``lines`` lines before its end."""

    def __init__(self, lines: int) -> None:
        super().__init__(f"stream event over {lines} lines (an anthropic stream's most)", "event_too_many_lines")
        self.lines = lines


class EncodedStream(UnreadableStream):
    """A successful streamed answer came ``encoding``-compressed though asked unencoded."""

    def __init__(self, encoding: str) -> None:
        super().__init__(f"stream sent with content-encoding {encoding}, not identity as asked", "stream_encoded")


async def _without_bom(chunks: AsyncIterator[bytes] | httpx2.AsyncByteStream) -> AsyncIterator[bytes]:
    """``chunks`` without a UTF-8 byte order mark at their start (even split across chunks): the
    SSE spec skips it, neither SDK does (the first event's first line then names no field)."""
    head: bytes | None = b""  # the first bytes while they may be a BOM; None once known
    async for chunk in chunks:
        if head is None:
            yield chunk
            continue
        head += chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            continue
        rest = head.removeprefix(_BOM)
        head = None
        if rest:
            yield rest
    if head:
        yield head


class _BoundedEvents(httpx2.AsyncByteStream):
    """A response body that fails once an event runs past ``limit`` bytes (or its ends' other
    limit); passed on in whole lines if its ends want them."""

    def __init__(self, inner: httpx2.AsyncByteStream, bound: EventBound) -> None:
        self._inner = inner
        self._limit = bound.limit
        self._ends = bound.ends()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = 0  # bytes passed on since the last event's end
        partial = bytearray()  # a line begun and not ended, held (``whole_lines``), of the same event
        async for read in _without_bom(self._inner):
            chunk = read
            if self._ends.whole_lines:
                cut = max(read.rfind(b"\r"), read.rfind(b"\n")) + 1
                if cut == 0:
                    partial += read  # appended in place: a line read byte by byte costs its length once
                    if pending + len(partial) > self._limit:
                        raise EventTooLarge(self._limit)
                    continue
                chunk = bytes(partial) + read[:cut] if partial else read[:cut]
                partial = bytearray(read[cut:])
            start = -pending  # where the current event starts, in ``chunk``
            too_large = False
            for end in self._ends.find(chunk):
                if end - start > self._limit:
                    too_large = True
                    break
                start = end
            pending = len(chunk) - start
            # After an overrun ``find`` stopped at it: ``pending`` then counts the events after
            # it in ``chunk`` too, so it says nothing of the failing event's bytes.
            error: UnreadableStream | None = None
            if too_large:
                error = EventTooLarge(self._limit)
            elif self._ends.overrun is not None:
                error = self._ends.overrun
            elif pending + len(partial) > self._limit:
                error = EventTooLarge(self._limit)
            if error is not None:
                # The whole events before it are the stream's, as before a cut.
                if start > 0:
                    yield chunk[:start]
                raise error
            yield chunk
        if partial:
            yield bytes(partial)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Inflater:
    """A gzip or deflate body's decoder, as httpx2's and urllib3's read them, that makes no more
    bytes of a chunk than it is given room for. Deflate with its zlib header or without (told
    apart on the first two bytes, however they are read); gzip of one member or more (RFC 1952:
    each decoded in turn, as urllib3 and Python's gzip do), what follows the first member that is
    not one ignored (httpx2 ignores all that follows the first member, urllib3 such bytes), as is
    all that follows a deflate stream's end. A later member's bytes are held aside until it ends
    whole, and dropped if it breaks or the body ends before it (the body then ended with the
    member before). ``done`` once the rest would be ignored."""

    def __init__(self, coding: str) -> None:
        self._gzip = coding == "gzip"
        self._head: bytes | None = None if self._gzip else b""  # deflate's first bytes, until two
        self._members = 1
        self._pending = bytearray()  # the current member's bytes, until passed on
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS)
        self.done = False

    def decode(self, data: bytes, room: int) -> bytes:
        """At most ``room`` (at least 1) bytes more of the body; ``zlib.error`` if it is broken."""
        if self._head is not None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, None
            try:
                # The zlib header's check fails on its two bytes if it is not one.
                return self._inflate(data, room)
            except zlib.error:
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inflate(data, room)

    def _inflate(self, data: bytes, room: int) -> bytes:
        out = bytearray()
        while data and not self.done and len(out) + len(self._pending) < room:
            if self._decoder.eof:  # a gzip member's end (a deflate stream's is ``done``)
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
                self._members += 1
            try:
                self._pending += self._decoder.decompress(data, room - len(out) - len(self._pending))
            except zlib.error:
                if self._members == 1:
                    raise
                self._pending.clear()  # not a whole gzip member: the body ended with the one before
                self.done = True
                break
            if not self._gzip and self._decoder.eof:
                # The deflate stream's end: all that follows is ignored, so none of it is waited for.
                self.done = True
            if self._members == 1 or self._decoder.eof:
                out += self._pending
                self._pending.clear()
            # Short of ``room`` all ``data`` was taken, but what follows a member's end.
            data = self._decoder.unused_data if self._decoder.eof else b""
        if len(out) + len(self._pending) >= room:
            # Past the bound: the body is dropped whole all the same.
            out += self._pending
            self._pending.clear()
        return bytes(out)

    def flush(self) -> bytes:
        """What is left once every chunk was decoded with room to spare (nothing, as zlib goes;
        nothing of a later member the body ended in)."""
        if self.done or self._head is not None:
            return b""
        if self._members > 1 and not self._decoder.eof:
            self._pending.clear()
            return b""
        return self._decoder.flush()


# The codings of an error's body decoded here, within the bound; any other the stack decodes drops it.
_INFLATED = frozenset({"gzip", "deflate"})


class _CappedBody(httpx2.AsyncByteStream):
    """An error's or a redirect's body: passed on whole if it ends within ``ERROR_BODY_LIMIT`` bytes
    and ``ERROR_BODY_SECONDS``, read and decoded alike (by ``inflater`` first if given), else empty
    (read no further); empty, unread, if ``dropped``; empty if ``inflater`` finds it broken. One cut
    by its connection (short of its length, its last chunk, a gzip member's end) ends there; one
    still coming at ``ERROR_BODY_SECONDS`` ends there too if what came is whole (``_whole``: a whole
    JSON document, decoded), else is dropped. A body dropped, or cut short of a whole one, is
    marked ``BODY_LOST`` in ``marks`` (its response's extensions)."""

    def __init__(
        self,
        inner: httpx2.AsyncByteStream,
        marks: dict[str, object],
        *,
        dropped: bool,
        inflater: _Inflater | None = None,
    ) -> None:
        self._inner = inner
        self._marks = marks
        self._dropped = dropped
        self._inflater = inflater

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._dropped:
            self._marks[BODY_LOST] = True
            return
        held = bytearray()
        timed_out = False
        try:
            async with asyncio.timeout(ERROR_BODY_SECONDS):
                # Nothing is yielded inside: the SDK's read of the body is this task's own.
                ended = await self._read(held)
        except TimeoutError:
            # Bytes that trickle, or framing that carries next to none (chunk extensions, 1-byte
            # chunks), would be read until the call's deadline, the status lost with it. What came
            # whole (its length or last chunk missing) is kept, as when its connection cuts it;
            # a compressed body is judged on what it decodes to (below, once flushed).
            ended = False
            timed_out = True
            if self._inflater is None and not self._whole(held):
                self._marks[BODY_LOST] = True
                return
        if ended is None:
            self._marks[BODY_LOST] = True
            return
        if self._inflater is not None:
            try:
                held += self._inflater.flush()
            except zlib.error:
                self._marks[BODY_LOST] = True
                return
            if len(held) > ERROR_BODY_LIMIT:
                self._marks[BODY_LOST] = True
                return
        if not ended and not self._whole(held):
            self._marks[BODY_LOST] = True
            if timed_out:
                return
        if held:
            yield bytes(held)

    @staticmethod
    def _whole(held: bytearray) -> bool:
        """Whether the body read so far, ``held`` (decoded, if it came compressed), is whole though
        its framing did not end: a whole JSON document. (Not a gzip member's end: a document split
        over two members and cut after the first is not whole, and one whose trailer is missing is.)
        A document nested past the parser's depth is none (``RecursionError``: 2 kB of ``[`` made
        an error's status a bug, INTERNAL)."""
        try:
            json.loads(held)
        except (ValueError, RecursionError):
            return False
        return True

    async def _read(self, held: bytearray) -> bool | None:
        """Read the body into ``held``: True once it ended, False if its connection cut it, None
        once it is to be dropped."""
        read = 0
        try:
            async for chunk in self._inner:
                read += len(chunk)
                if self._inflater is None:
                    held += chunk
                else:
                    try:
                        held += self._inflater.decode(chunk, ERROR_BODY_LIMIT + 1 - len(held))
                    except zlib.error:
                        return None
                if len(held) > ERROR_BODY_LIMIT:
                    return None
                if self._inflater is not None and self._inflater.done:
                    break  # the rest is ignored: not read
                if read > ERROR_BODY_LIMIT:
                    # Bytes that decode to little or nothing (endless empty gzip members or deflate
                    # blocks) are bounded as they come: a real compressed error is smaller than its text.
                    return None
        except httpx2.TransportError:
            # Cut by its connection, often once its JSON came whole: the body ends with what came
            # (raised to the SDK, the status and headers were lost with it: a 400 or a 429 became
            # a connection failure, retried).
            return False
        return True

    async def aclose(self) -> None:
        await self._inner.aclose()


def _capped(response: httpx2.Response, codings: list[str]) -> httpx2.Response:
    """``response`` (an error or a redirect, whose body the SDK reads whole) with its body capped
    (``_CappedBody``); its body in ``codings`` (its ``Content-Encoding``) decoded here or dropped."""
    if not isinstance(response.stream, httpx2.AsyncByteStream):
        return response
    decoded = [coding for coding in codings if coding in DECODED_CODINGS]
    inflater = _Inflater(decoded[0]) if len(decoded) == 1 and decoded[0] in _INFLATED else None
    response.stream = _CappedBody(
        response.stream, response.extensions, dropped=bool(decoded) and inflater is None, inflater=inflater
    )
    if decoded:
        del response.headers["content-encoding"]
    return response


def error_body_lost(response: httpx2.Response) -> bool:
    """Whether an error's body was dropped or cut short of a whole one (``BODY_LOST``): what only
    the body tells (a spent quota) is not known."""
    return bool(response.extensions.get(BODY_LOST))


def _codings(response: httpx2.Response) -> list[str]:
    return [value.strip().lower() for value in response.headers.get_list("content-encoding", split_commas=True)]


class CappedErrorsTransport(httpx2.AsyncBaseTransport):
    """Delegates to an SDK client's transport; caps the body of each error or redirect answer
    (``ERROR_BODY_LIMIT``, ``ERROR_BODY_SECONDS``), whatever the request. Successful answers are
    left alone (a batch's results file is as large as its answers). Each request asks for its answer
    in the codings decoded here only (gzip, deflate): httpx2 asks for ``br`` too where brotli is
    installed, ``zstd`` on Python 3.14+, whose error bodies would be dropped (an Anthropic 400
    "credit balance is too low" read as a rejection, a batch's jobs failed)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.headers["accept-encoding"] = _ASKED_CODINGS
        response = await self._inner.handle_async_request(request)
        return response if response.is_success else _capped(response, _codings(response))

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedEventsTransport(CappedErrorsTransport):
    """Delegates to an SDK client's transport; bounds each event of a streaming request's response,
    and caps the body of every error or redirect answer (``CappedErrorsTransport``)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, bound: EventBound) -> None:
        super().__init__(inner)
        self._bound = bound

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if not _STREAMING.get():
            return await super().handle_async_request(request)
        request.headers["accept-encoding"] = "identity"
        response = await self._inner.handle_async_request(request)
        codings = _codings(response)
        if not response.is_success:
            # An error's or a redirect's body holds no events, and the SDK reads it whole.
            return _capped(response, codings)
        if any(coding in DECODED_CODINGS for coding in codings):
            # A stream's events would be decoded whole.
            await response.aclose()
            raise EncodedStream(", ".join(codings))
        if isinstance(response.stream, httpx2.AsyncByteStream):
            response.stream = _BoundedEvents(response.stream, self._bound)
        return response
