"""The SDKs' aiohttp transport, made to hand over what arrived before a cut.

Both SDKs ship ``DefaultAioHttpClient``: an httpx2 client whose transport is aiohttp. When a
provider closes the connection in the middle of a body, aiohttp marks the body's reader failed and
its next read raises at once, even though bytes that came in with the close are still in the
reader's buffer; those are the stream's last chunks. ``keeping_buffered`` wraps each transport of
such a client so that, on that error, the buffered bytes are yielded first and the error raised
after them: on a cut, the same chunks reach the caller as over httpx.

aiohttp offers no public way to read its buffer once the reader has failed, so this reads the
reader's ``_buffer`` (a deque of bytes) and ``_buffer_offset``. Where a future aiohttp lacks them,
nothing is recovered and the stream fails as it would without this; a unit test of aiohttp's
reader (tests/test_providers_openai.py, ``TestAiohttpDetails``) fails first, to say so.

Two more places where aiohttp leaves a body's read waiting until its timeout, which httpx fails at
once, are closed the same way: closing the client fails the bodies still being read; and a body
whose HTTP framing turns malformed part-way (a chunk-size line that is not hex) fails at once with
what came before it. aiohttp reports that parse error to the connection's protocol and closes the
connection, but not to the body's reader, so the wrapper relays it (an instance attribute over the
protocol's ``set_exception`` while the body is open, removed when it ends; an error the protocol
took before the body reached the wrapper fails the body at once). A read that aiohttp's reader
refuses with a bare ``RuntimeError`` because the connection is gone becomes ``httpx2.ReadError``.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx2
from aiohttp.http_exceptions import HttpProcessingError

from routesvc.providers._event_size import BoundedEventsTransport, EventBound
from routesvc.providers._sending import trace_session, wrap_transports


def unread_bytes(reader: object) -> bytes:
    """What an aiohttp ``StreamReader`` holds but has not handed over; b"" if unknown."""
    buffer = getattr(reader, "_buffer", None)
    offset = getattr(reader, "_buffer_offset", 0)
    if not buffer or not isinstance(offset, int):
        return b""
    return b"".join(buffer)[offset:]


class _KeepingStream(httpx2.AsyncByteStream):
    """A response body that yields aiohttp's buffered bytes before the error that ended it."""

    def __init__(self, inner: httpx2.AsyncByteStream, reader: aiohttp.StreamReader, protocol: object) -> None:
        self._inner = inner
        self._reader = reader
        self._closed = False
        self._protocol = protocol
        self._relay = _relay_parse_errors(protocol, weakref.WeakMethod(self.fail))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx2.ReadError as exc:
            if not isinstance(exc.__cause__, aiohttp.ClientPayloadError):
                raise
            rest = unread_bytes(self._reader)
            if rest:
                yield rest
            raise
        except RuntimeError as exc:
            # aiohttp's reader raises a bare RuntimeError when it would wait on a connection that
            # is already closed without having failed the body: a broken stream, not our bug.
            if getattr(self._protocol, "connected", True):
                raise
            raise httpx2.ReadError("the connection closed during the response body") from exc
        finally:
            self._stop_relaying()

    async def aclose(self) -> None:
        self._closed = True
        self._stop_relaying()
        await self._inner.aclose()

    def _stop_relaying(self) -> None:
        # The connection may serve the next request (keep-alive): its errors are not this body's.
        # Only our own relay is removed: the next body may have put its own there already.
        relay, self._relay = self._relay, None
        attributes = getattr(self._protocol, "__dict__", {})
        if relay is not None and attributes.get("set_exception") is relay:
            del attributes["set_exception"]

    def fail(self, why: str = "the HTTP client was closed") -> None:
        """End the body: a read waiting on it raises at once."""
        if not self._closed and self._reader.exception() is None:
            self._reader.set_exception(aiohttp.ClientPayloadError(why))


def _relay_parse_errors(
    protocol: object, fail: weakref.WeakMethod[Callable[[str], None]]
) -> Callable[..., None] | None:
    """Shadow ``protocol.set_exception`` so that an HTTP parse error also fails the body (``fail``);
    the relay put there, or None where the protocol cannot take the attribute.

    The relay calls the protocol class's own method, never an earlier body's relay (a connection
    kept alive for thousands of requests must not grow a chain of them), and holds the protocol
    and the body weakly: no reference cycle, so a body dropped without being closed is finalized
    at once, where it was dropped, as without the relay.
    """
    method = getattr(type(protocol), "set_exception", None)
    if method is None or not hasattr(protocol, "__dict__"):
        return None
    # The parse error may have come before the body was handed to us (under load, the bad bytes
    # can be read before the request's task resumes): then the protocol holds it already.
    earlier = getattr(protocol, "exception", None)
    if callable(earlier) and isinstance(earlier(), HttpProcessingError):
        _call(fail, "malformed response body")
    owner = weakref.ref(protocol)

    def set_exception(exc: BaseException, *args: Any, **kwargs: Any) -> None:
        target = owner()
        if target is not None:
            method(target, exc, *args, **kwargs)
        if isinstance(exc, HttpProcessingError):
            _call(fail, "malformed response body")

    protocol.__dict__["set_exception"] = set_exception
    return set_exception


def _call(fail: weakref.WeakMethod[Callable[[str], None]], why: str) -> None:
    method = fail()
    if method is not None:
        method(why)


class _KeepingTransport(httpx2.AsyncBaseTransport):
    """Delegates to the SDK's aiohttp transport, its session hooked to say when a request goes out
    (``_sending``); wraps each response body in ``_KeepingStream``."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner
        self._open: weakref.WeakSet[_KeepingStream] = weakref.WeakSet()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        trace_session(self._inner)
        response = await self._inner.handle_async_request(request)
        aiohttp_response = getattr(response.stream, "_aiohttp_response", None)
        if isinstance(aiohttp_response, aiohttp.ClientResponse) and isinstance(response.stream, httpx2.AsyncByteStream):
            connection = aiohttp_response.connection
            protocol = connection.protocol if connection is not None else None
            stream = _KeepingStream(response.stream, aiohttp_response.content, protocol)
            self._open.add(stream)
            response.stream = stream
        return response

    async def aclose(self) -> None:
        for stream in list(self._open):
            stream.fail()
        await self._inner.aclose()


def keeping_buffered(client_class: type[httpx2.AsyncClient], bound: EventBound) -> httpx2.AsyncClient:
    """An instance of the SDK's ``DefaultAioHttpClient`` class whose transports (direct and proxy)
    are wrapped in ``_KeepingTransport``, each event of a stream bounded by ``bound``
    (``_event_size``); its defaults (timeouts, connection limits) are the SDK's."""
    client = client_class()
    wrap_transports(client, lambda inner: BoundedEventsTransport(_KeepingTransport(inner), bound))
    return client
