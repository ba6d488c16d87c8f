"""A bound on the bytes of one server-sent event, below both SDKs' SSE decoders.

The SDKs' decoders hold an event's bytes until its blank line, then decode and parse it whole,
whatever its size: one 200 MB event from a broken or hostile server (an ``openai_compatible``
endpoint, a proxy gone wrong) cost the process about 800 MB, and a few such streams at once
would take every tenant's streams down with it. So each transport of an SDK client wraps the
body of an event-stream response and counts each event's bytes up to its blank line (its end,
whichever line ending the server uses); past ``max_event_bytes`` the body fails with
``EventTooLarge`` (an ``httpx2.ReadError``, as a broken connection fails it), which the adapters
translate to ``ProviderUnavailable``. What is held stays within the limit and one read's chunk.
Other responses (JSON errors, unary answers) are left alone.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx2

DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024

# An event's end: a blank line, whichever line ending the server uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The bytes of the data before a chunk kept to find an event's end split across two chunks.
_TAIL = 3


class EventTooLarge(httpx2.ReadError):
    """An event of the stream passed ``limit`` bytes before its end."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a server-sent event over {limit} bytes")
        self.limit = limit


class _BoundedEvents(httpx2.AsyncByteStream):
    """A response body that fails once an event runs past ``limit`` bytes."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = 0  # bytes since the last event's end
        tail = b""
        async for chunk in self._inner:
            # The last bytes before ``chunk`` come again, for an end split across the two.
            window = tail + chunk
            start = len(tail) - pending  # where the current event starts, in ``window``
            for end in _EVENT_END.finditer(window):
                if end.end() <= len(tail):
                    continue  # an end found in the chunk before
                if end.end() - start > self._limit:
                    break
                start = end.end()
            pending = len(window) - start
            if pending > self._limit:
                # The whole events before it are the stream's, as before a cut.
                if start > len(tail):
                    yield chunk[: start - len(tail)]
                raise EventTooLarge(self._limit)
            tail = window[-_TAIL:]
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedEventsTransport(httpx2.AsyncBaseTransport):
    """Delegates to an SDK client's transport; bounds each event of an event-stream response."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, max_event_bytes: int) -> None:
        self._inner = inner
        self._limit = max_event_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        streamed = response.headers.get("content-type", "").lower().startswith("text/event-stream")
        if streamed and isinstance(response.stream, httpx2.AsyncByteStream):
            response.stream = _BoundedEvents(response.stream, self._limit)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
