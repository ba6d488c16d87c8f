"""What both adapters must do alike over both SDK transports (aiohttp, the default, and httpx)
where the transports themselves differ: a body whose HTTP framing breaks, a kept-alive connection
after it, closing an adapter while a stream is being read, and telling whether a request went
out. Real SDKs, real HTTP, the fake."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator

import pytest
from httpx2 import _client as httpx2_client
from httpx2._decoders import SUPPORTED_DECODERS

from routesvc.errors import (
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimedOut,
    ProviderUnavailable,
)
from routesvc.models import InputReported, Message, ProviderFinish, Role, TextDelta
from routesvc.providers import _event_size
from routesvc.providers.anthropic import AnthropicProvider
from routesvc.providers.anthropic_batch import AnthropicBatches
from routesvc.providers.base import HttpClientKind, ProviderCall, close_stream
from routesvc.providers.openai import OpenAIProvider
from routesvc.providers.openai_batch import OpenAIBatches
from routesvc.testing import FakeProvider, Fault, Script
from tests.conftest import until
from tests.proxies import ForwardProxy
from tests.raw_upstream import (
    RawUpstream,
    Reply,
    anthropic_stream,
    chunks,
    endless,
    endless_gzip,
    head,
    openai_stream,
)

Adapter = OpenAIProvider | AnthropicProvider


@pytest.fixture(params=["openai", "anthropic"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def make_adapter(
    kind: str, http_client: HttpClientKind, openai_url: str, anthropic_url: str, *, max_event_bytes: int | None = None
) -> Adapter:
    bound = {} if max_event_bytes is None else {"max_event_bytes": max_event_bytes}
    if kind == "openai":
        return OpenAIProvider("openai", "sk-test", openai_url, "openai", http_client=http_client, **bound)
    return AnthropicProvider("anthropic", "sk-test", anthropic_url, http_client=http_client, **bound)


@pytest.fixture
async def adapter(fake: FakeProvider, kind: str, http_client: HttpClientKind) -> AsyncIterator[Adapter]:
    """An adapter of each kind, over each transport, pointed at the fake."""
    made = make_adapter(kind, http_client, fake.openai_base_url, fake.anthropic_base_url)
    yield made
    await made.aclose()


@pytest.fixture
async def bounded(fake: FakeProvider, kind: str, http_client: HttpClientKind) -> AsyncIterator[Adapter]:
    """As ``adapter``, with ``max_event_bytes`` 8192."""
    made = make_adapter(kind, http_client, fake.openai_base_url, fake.anthropic_base_url, max_event_bytes=8192)
    yield made
    await made.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    """A server answering with exact bytes (``tests/raw_upstream.py``)."""
    async with RawUpstream() as running:
        yield running


@pytest.fixture
async def on_raw(raw: RawUpstream, kind: str, http_client: HttpClientKind) -> AsyncIterator[Adapter]:
    """An adapter of each kind, over each transport, pointed at ``raw``."""
    made = make_adapter(kind, http_client, raw.url + "/v1", raw.url)
    yield made
    await made.aclose()


@pytest.fixture
async def bounded_anthropic_on_raw(raw: RawUpstream, http_client: HttpClientKind) -> AsyncIterator[Adapter]:
    """An anthropic adapter, over each transport, pointed at ``raw``, with ``max_event_bytes`` 8192."""
    made = make_adapter("anthropic", http_client, raw.url + "/v1", raw.url, max_event_bytes=8192)
    yield made
    await made.aclose()


def stream_of(kind: str, texts: tuple[str, ...] = ("Hello ", "world")) -> list[bytes]:
    """A whole stream of ``texts`` in ``kind``'s format."""
    return openai_stream(texts) if kind == "openai" else anthropic_stream(texts)


def spent_quota(kind: str) -> tuple[int, dict[str, object]]:
    """A provider's error for a spent quota: OpenAI's 429 ``insufficient_quota``, Anthropic's 400
    "credit balance is too low"."""
    if kind == "openai":
        return 429, {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota"}}
    error = {"type": "invalid_request_error", "message": "Your credit balance is too low."}
    return 400, {"type": "error", "error": error}


def compressed(data: bytes, wbits: int) -> bytes:
    """``data`` compressed whole: gzip (wbits 31), zlib-wrapped deflate (15) or raw deflate (-15)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


async def read_rate_limit(on_raw: Adapter) -> float:
    """A call read through ``on_raw`` fails a rate limit with its Retry-After, 7 s: the seconds the
    read took."""
    started = time.monotonic()
    texts, error = await read(on_raw, call(timeout=8))
    assert (texts, type(error)) == ([], ProviderRateLimited)
    assert isinstance(error, ProviderRateLimited)
    assert error.retry_after == 7.0
    return time.monotonic() - started


async def read_spent_quota(raw: RawUpstream, on_raw: Adapter, status: int, coding: str, parts: list[bytes]) -> None:
    """The spent-quota error sent as ``parts`` (written 0.05 s apart) labelled ``coding`` is read
    as a spent quota."""
    reply = Reply(
        status=status,
        headers={"content-encoding": coding},
        body=chunks(*parts),
        content_type="application/json",
        pause=0.05,
    )
    raw.replies.append(reply)
    texts, error = await read(on_raw, call(timeout=8))
    assert (texts, type(error)) == ([], ProviderQuotaExhausted)


def call(timeout: float | None = None) -> ProviderCall:
    return ProviderCall(
        model="m", provider_model="m", messages=(Message(Role.USER, "Say something."),), timeout=timeout
    )


async def read(
    adapter: Adapter, request: ProviderCall, *, on_delta: asyncio.Event | None = None, after: int = 0
) -> tuple[list[str], ProviderError | None]:
    """The text deltas of a stream and the error it ended with (None if it finished); sets
    ``on_delta`` once ``after`` deltas have come."""
    texts: list[str] = []
    try:
        async for event in adapter.stream(request):
            if isinstance(event, TextDelta):
                texts.append(event.text)
                if on_delta is not None and len(texts) == after:
                    on_delta.set()
    except ProviderError as error:
        return texts, error
    return texts, None


async def test_malformed_http_framing_fails_at_once(fake: FakeProvider, adapter: Adapter) -> None:
    """A chunk-size line that is not hex after 3 chunks, the socket left open: the 3 chunks, then
    ProviderUnavailable at once, not at the call's 8 s deadline. (aiohttp tells the connection, not
    the body's reader; the adapters' transport relays it.)"""
    script = Script(chunk_count=5, chunk_delay=0.02, fault=Fault.BAD_FRAMING, fault_after=3)
    fake.enqueue(script)
    started = time.monotonic()
    texts, error = await read(adapter, call(timeout=8.0))
    assert time.monotonic() - started < 3.0  # far from the 8 s deadline, with a loaded machine's slack
    assert (texts, type(error)) == (list(script.content_chunks()[:3]), ProviderUnavailable)


async def test_a_kept_alive_connection_carries_only_its_own_bodys_errors(fake: FakeProvider, adapter: Adapter) -> None:
    """A whole stream, then bad framing on the same connection, then a whole stream again: each
    ends as its own body did."""
    fake.enqueue(Script(chunk_count=3), Script(chunk_count=5, chunk_delay=0.02, fault=Fault.BAD_FRAMING, fault_after=2))
    fake.enqueue(Script(chunk_count=3))
    outcomes = [await read(adapter, call(timeout=8.0)) for _ in range(3)]
    assert [(len(texts), type(error)) for texts, error in outcomes] == [
        (3, type(None)),
        (2, ProviderUnavailable),
        (3, type(None)),
    ]
    assert fake.requests[0].connection == fake.requests[1].connection  # the second body reused it


async def test_closing_the_adapter_ends_a_stream_being_read(fake: FakeProvider, adapter: Adapter) -> None:
    """``aclose()`` while a stream waits on a silent provider fails that stream at once
    (ProviderUnavailable), not at the call's 8 s deadline. (Closing aiohttp's session does not wake
    such a read; the adapters' transport fails it.)"""
    fake.enqueue(Script(chunk_count=10, fault=Fault.HANG, fault_after=3))
    three = asyncio.Event()
    reading = asyncio.ensure_future(read(adapter, call(timeout=8.0), on_delta=three, after=3))
    await asyncio.wait_for(three.wait(), 5.0)
    started = time.monotonic()
    await adapter.aclose()
    texts, error = await asyncio.wait_for(reading, 5.0)
    assert time.monotonic() - started < 3.0  # far from the 8 s deadline, with a loaded machine's slack
    assert (len(texts), type(error)) == (3, ProviderUnavailable)


async def test_a_big_body_read_slowly_leaves_its_connection_fit_for_the_next_call(
    fake: FakeProvider, adapter: Adapter
) -> None:
    """A 2 MB stream whose reader pauses (aiohttp stops reading the socket while its buffer is
    full) and then drains it, with a 4 s call deadline; then the connection idles past that
    deadline and the next call reuses it: the next call is answered. (aiohttp rearms its socket
    read timer when reading resumes even after the body has ended; fired on the idle pooled
    connection, it failed the next request at once with a read timeout, without any request
    reaching the provider. The adapters give the SDKs no read timeout of their own: the call's
    deadline and the router's stream timers bound every read.)"""
    failures = []
    for _ in range(2):
        fake.enqueue(Script(chunks=tuple(["x" * 2000] * 1000)))
        # A deadline with room for a loaded machine to read the 2 MB (0.5 s failed under load;
        # 1.5 s left little room on a busy 2-core machine, and 2.5 s timed out once with four
        # other jobs on its two cores).
        stream = adapter.stream(call(timeout=4.0))
        first = await anext(aiter(stream))
        if isinstance(first, InputReported):  # Anthropic's message_start tells the input first
            first = await anext(aiter(stream))
        assert isinstance(first, TextDelta)
        await asyncio.sleep(0.2)  # the provider sends the rest while nothing is read
        async for _ in stream:
            pass
        await asyncio.sleep(4.1)  # past the first call's deadline, the connection idle in the pool
        sent = len(fake.requests)
        _, error = await read(adapter, call(timeout=5.0))
        if error is not None:
            failures.append((error.message, len(fake.requests) - sent))
    assert failures == []


class TestRequestSent:
    """``ProviderCall.sent``: set once the request went out, what a call cut short is billed on."""

    async def test_a_request_the_provider_received_is_marked_sent(self, fake: FakeProvider, adapter: Adapter) -> None:
        """A provider that reads the request and never answers: once it has the request, the call
        is marked sent (the caller then cancels it)."""
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        request = call(timeout=30.0)
        reading = asyncio.ensure_future(read(adapter, request))
        try:
            await until(lambda: len(fake.requests) == 1)
            assert request.sent.is_set()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def test_a_request_sent_through_a_proxy_from_the_environment_is_marked_sent(
        self, fake: FakeProvider, kind: str, http_client: HttpClientKind, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Behind an HTTP proxy named by ``HTTP_PROXY``, a provider that reads the request and
        never answers: once it has the request, the call is marked sent. (Anthropic's httpx client
        builds the proxy's transport itself; it went unhooked, and such a cut was charged $0.) The
        provider is named by a host that is not this one (a provider on this host is called
        directly); the proxy dials the fake for it."""
        async with ForwardProxy(resolve={"provider.test": "127.0.0.1"}) as proxy:
            for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            made = make_adapter(
                kind,
                http_client,
                fake.openai_base_url.replace("127.0.0.1", "provider.test"),
                fake.anthropic_base_url.replace("127.0.0.1", "provider.test"),
            )
            fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
            request = call(timeout=30.0)
            reading = asyncio.ensure_future(read(made, request))
            try:
                await until(lambda: len(fake.requests) == 1)
                assert (len(proxy.requests), request.sent.is_set()) == (1, True)
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
                await made.aclose()

    async def test_a_request_whose_connection_never_opened_is_not_marked_sent(
        self, unaccepting_port: int, kind: str, http_client: HttpClientKind
    ) -> None:
        """A host whose TCP handshake never completes: the call's deadline ends it, and it is not
        marked sent (the router charges such an attempt nothing)."""
        url = f"http://127.0.0.1:{unaccepting_port}"
        made = make_adapter(kind, http_client, f"{url}/v1", url)
        try:
            request = call(timeout=0.3)
            _, error = await read(made, request)
        finally:
            await made.aclose()
        assert (type(error), request.sent.is_set()) == (ProviderTimedOut, False)


class TestCloseStream:
    """``close_stream``: what the router and its wrappers call to end a provider's stream early."""

    async def test_closing_a_stream_mid_answer_aborts_the_upstream_request(
        self, fake: FakeProvider, adapter: Adapter
    ) -> None:
        """A stream closed after its first chunk closes the HTTP response: the provider sees the abort."""
        fake.enqueue(Script(chunk_count=10, fault=Fault.HANG, fault_after=3))
        stream = adapter.stream(call(timeout=30.0))
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await close_stream(stream)
        await fake.requests[0].wait_ended(timeout=5.0)
        assert fake.requests[0].aborted

    async def test_a_stream_without_aclose_is_left_as_it_is(self) -> None:
        """An iterator that is not a generator has nothing to close: nothing is read from it, nothing fails."""
        asked: list[int] = []

        class Plain:
            def __aiter__(self) -> Plain:
                return self

            async def __anext__(self) -> object:
                asked.append(1)
                raise StopAsyncIteration

        await close_stream(Plain())
        assert asked == []


class TestEventBound:
    """``reliability.max_event_bytes`` as both adapters apply it to what a streaming request
    reads (the rules each SDK ends events by are tested with each adapter)."""

    async def test_an_event_over_max_event_bytes_is_unavailable_and_one_under_passes(
        self, fake: FakeProvider, bounded: Adapter
    ) -> None:
        """An event just over ``max_event_bytes`` after the first chunk: that chunk, then
        ProviderUnavailable naming the limit (the event was read whole, whatever its size); an
        event under it is read as any other."""
        fake.enqueue(
            Script(fault=Fault.OVERSIZED_LINE, fault_after=1, oversized_bytes=8192),
            Script(fault=Fault.OVERSIZED_LINE, fault_after=1, oversized_bytes=7000),
        )
        texts, error = await read(bounded, call())
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert error is not None
        assert "stream event over 8192 bytes (reliability.max_event_bytes) (event_too_large)" in error.message
        texts, error = await read(bounded, call())
        assert ("".join(texts), error) == ("Hello from the fake provider.", None)

    @pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream"])
    async def test_an_event_over_max_event_bytes_is_unavailable_whatever_the_stream_is_labelled(
        self, fake: FakeProvider, bounded: Adapter, content_type: str
    ) -> None:
        """A stream labelled other than ``text/event-stream`` (a proxy that rewrites the type),
        which the SDK reads as events all the same: an event over ``max_event_bytes`` fails it as
        it does an event stream's (it was read whole, whatever its size)."""
        fake.enqueue(
            Script(
                fault=Fault.OVERSIZED_LINE,
                fault_after=1,
                oversized_bytes=8192,
                headers={"content-type": content_type},
            )
        )
        texts, error = await read(bounded, call())
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert error is not None
        assert "stream event over 8192 bytes (reliability.max_event_bytes) (event_too_large)" in error.message

    @pytest.mark.parametrize(
        "encoding",
        [
            "none",
            "utf-8",
            "identity, none",
            "x-gzip",
            "compress",
            "x-compress",
            *(coding for coding in ("br", "zstd") if coding not in SUPPORTED_DECODERS),
        ],
    )
    async def test_a_stream_labelled_with_a_coding_the_stack_does_not_decode_is_read_as_unencoded(
        self, fake: FakeProvider, bounded: Adapter, encoding: str
    ) -> None:
        """``content-encoding: none`` (a header SSE servers send to keep proxies from compressing)
        or another coding the HTTP stack does not decode (httpx2 knows no ``x-gzip`` nor
        ``compress``; ``br`` only with brotli or brotlicffi installed, ``zstd`` only with Python's
        ``compression.zstd`` (3.14+) or backports.zstd): the stack reads
        the body as unencoded, and so is the stream read (it was failed as compressed, every
        attempt: ``none`` before, ``x-gzip``, ``br``... until now)."""
        fake.enqueue(Script(headers={"content-encoding": encoding}))
        texts, error = await read(bounded, call())
        assert ("".join(texts), error) == ("Hello from the fake provider.", None)

    @pytest.mark.parametrize(("status", "error_class"), [(400, ProviderRejected), (429, ProviderRateLimited)])
    async def test_an_error_body_over_max_event_bytes_is_read_as_the_error_it_is(
        self, fake: FakeProvider, kind: str, bounded: Adapter, status: int, error_class: type[Exception]
    ) -> None:
        """An error answer to a streaming request whose JSON body is over ``max_event_bytes`` (a
        validation error echoing its input) is not bounded as events: a 400 stays rejected, a 429
        keeps its Retry-After (both were UNAVAILABLE ``event_too_large``, retried and counted
        against the provider)."""
        message = "x" * 20000
        bodies = {
            "openai": {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}},
            "anthropic": {"type": "error", "error": {"type": "invalid_request_error", "message": message}},
        }
        fake.enqueue(Script(status=status, error_body=json.dumps(bodies[kind]), retry_after="7"))
        texts, error = await read(bounded, call())
        assert (texts, type(error)) == ([], error_class)
        if isinstance(error, ProviderRateLimited):
            assert error.retry_after == 7.0

    async def test_a_stream_is_asked_unencoded_and_one_compressed_all_the_same_is_unavailable(
        self, fake: FakeProvider, bounded: Adapter
    ) -> None:
        """A streaming request asks for ``accept-encoding: identity``; a server that gzips the
        stream anyway fails the attempt before any event is read (its events were counted
        compressed: a few hundred bytes of gzip can hold an event of megabytes, decoded whole)."""
        fake.enqueue(Script(gzip_stream=True))
        texts, error = await read(bounded, call())
        assert (texts, type(error)) == ([], ProviderUnavailable)
        assert error is not None
        assert "content-encoding gzip, not identity as asked (stream_encoded)" in error.message
        assert fake.requests[-1].headers["accept-encoding"] == "identity"

    @pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
    @pytest.mark.parametrize(("status", "error_class"), [(400, ProviderRejected), (429, ProviderRateLimited)])
    async def test_an_error_body_that_never_ends_is_not_read_past_a_bound(
        self, raw: RawUpstream, on_raw: Adapter, compressed: bool, status: int, error_class: type[Exception]
    ) -> None:
        """An error answer to a streaming request whose body never ends, plain or gzip (which
        decodes to about 1 MiB per chunk): the call fails at once as the error its status says, a
        429 with its Retry-After, having read no more than about its bound (1 MiB, ``ERROR_BODY_LIMIT``) of it (it was
        read and decoded whole, growing to gigabytes until the call's deadline, which it then failed)."""
        body = (endless_gzip if compressed else endless)(b"x", first=b'{"error": {"message": "')
        headers = {"retry-after": "7", **({"content-encoding": "gzip"} if compressed else {})}
        raw.replies.append(Reply(status=status, headers=headers, body=body, content_type="application/json"))
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], error_class)
        if isinstance(error, ProviderRateLimited):
            assert error.retry_after == 7.0
        await until(lambda: len(raw.sent) == 1 and raw.sent[0] > 0)
        assert raw.sent[0] < 32 << 20

    async def test_a_compressed_error_body_is_decoded_no_further_than_a_bound(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 400 whose gzip body of 20 kB decodes to a 20 MB JSON error naming its type (a
        compression bomb): rejected, by its status alone: the body is decoded no further than 1 MiB
        (it was decoded whole: a few hundred kB of gzip cost a gigabyte), then dropped, so its type
        is not in the message."""
        head = (
            b'{"error": {"type": "bomb_error", "message": "'
            if kind == "openai"
            else b'{"type": "error", "error": {"type": "bomb_error", "message": "'
        )
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        wire = compressor.compress(head) + compressor.compress(b"x" * (20 << 20))
        wire += compressor.compress(b'"}}') + compressor.flush()
        headers = {"content-encoding": "gzip"}
        raw.replies.append(Reply(status=400, headers=headers, body=chunks(wire), content_type="application/json"))
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderRejected)
        assert error is not None
        assert "bomb_error" not in error.message

    @pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
    async def test_a_compressed_error_body_within_a_bound_is_decoded_and_read_as_the_error_it_is(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, coding: str
    ) -> None:
        """A spent quota's error, gzip or deflate (zlib-wrapped or raw, as httpx2 reads it), from a
        server that compresses though asked not to: a spent quota, its code in the message, as
        the same error plain (the body was dropped: OpenAI's 429 ``insufficient_quota`` then a
        rate limit, retried; Anthropic's 400 "credit balance is too low" a rejection, no
        fallback)."""
        status, body, code = {
            "openai": (
                429,
                {
                    "error": {
                        "message": "You exceeded your current quota.",
                        "type": "insufficient_quota",
                        "code": "insufficient_quota",
                    }
                },
                "insufficient_quota",
            ),
            "anthropic": (
                400,
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "Your credit balance is too low."},
                },
                "invalid_request_error",
            ),
        }[kind]
        wbits = {"gzip": 31, "deflate": 15, "raw deflate": -15}[coding]
        wire = compressed(json.dumps(body).encode(), wbits)
        headers = {"content-encoding": coding.removeprefix("raw ")}
        raw.replies.append(
            Reply(status=status, headers=headers, body=chunks(wire[:9], wire[9:]), content_type="application/json")
        )
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderQuotaExhausted)
        assert error is not None
        assert f"HTTP {status} ({code})" in error.message

    @pytest.mark.parametrize("shape", ["gzip of two members", "raw deflate read a byte first"])
    async def test_a_compressed_error_body_in_any_valid_shape_is_read_as_the_error_it_is(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, shape: str
    ) -> None:
        """A spent quota's error as gzip of two members (RFC 1952; as Python's gzip and urllib3
        read it), trailing bytes that are no member after them, or as raw deflate whose first
        byte comes alone: a spent quota (the body was cut at the first member's end, its JSON
        unparseable; the raw deflate, whose zlib header check could not fail on one byte, was
        dropped: a rate limit, a rejection)."""
        status, body = spent_quota(kind)
        plain = json.dumps(body).encode()

        if shape == "gzip of two members":
            coding = "gzip"
            parts = [compressed(plain[:20], 31) + compressed(plain[20:], 31) + b"\0\0\0\0"]
        else:
            coding = "deflate"
            wire = compressed(plain, -15)
            parts = [wire[:1], wire[1:]]
        await read_spent_quota(raw, on_raw, status, coding, parts)

    async def test_a_compressed_error_body_followed_by_endless_bytes_is_read_as_the_error_at_once(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 400 whose gzip member is followed by bytes that never end and are no member: the
        error, read at once, the trailing bytes not read on (they were read, and held, until the
        call's deadline)."""
        wire = zlib.compressobj(6, zlib.DEFLATED, 31)
        member = wire.compress(b'{"error": {"type": "invalid_request_error", "message": "bad"}}') + wire.flush()
        headers = {"content-encoding": "gzip"}
        raw.replies.append(
            Reply(status=400, headers=headers, body=endless(b"x", first=member), content_type="application/json")
        )
        started = time.monotonic()
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderRejected)
        assert time.monotonic() - started < 4
        assert raw.sent[0] < 32 << 20

    @pytest.mark.parametrize("shape", ["empty gzip members", "empty deflate blocks"])
    async def test_a_compressed_error_body_that_decodes_to_nothing_endlessly_is_not_read_past_a_bound(
        self, raw: RawUpstream, on_raw: Adapter, shape: str
    ) -> None:
        """A 429 whose compressed body never ends but decodes to nothing (empty gzip members, 20
        bytes each, or one deflate stream's empty stored blocks): a rate limit at once, its
        Retry-After kept, the body dropped once 1 MiB of it was read (it was read and decoded,
        a core busy, until the call's deadline, which it then failed)."""
        if shape == "empty gzip members":
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            coding, first, piece = "gzip", b"", compressor.compress(b"") + compressor.flush()
        else:
            coding, first, piece = "deflate", b"\x78\x9c", b"\x00\x00\x00\xff\xff"
        headers = {"retry-after": "7", "content-encoding": coding}
        raw.replies.append(
            Reply(status=429, headers=headers, body=endless(piece, first=first), content_type="application/json")
        )
        assert await read_rate_limit(on_raw) < 4
        await until(lambda: len(raw.sent) == 1 and raw.sent[0] > 0)
        assert raw.sent[0] < 32 << 20

    @pytest.mark.parametrize("shape", ["cut before its trailer", "with a bad check, read apart from it"])
    async def test_a_compressed_error_body_whose_later_member_is_broken_is_read_as_its_first_member(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, shape: str
    ) -> None:
        """A spent quota's error as one whole gzip member, then a second member that is broken:
        cut before its trailer, or with a wrong CRC-32 that comes in a read after its data: a
        spent quota, the body ending with the whole member (the broken member's bytes decoded
        before it broke were appended, the JSON unparseable: a rate limit, a rejection)."""
        status, body = spent_quota(kind)

        first, second = compressed(json.dumps(body).encode(), 31), compressed(b' {"more": "bytes"}', 31)
        if shape == "cut before its trailer":
            parts = [first + second[:-8]]
        else:
            parts = [first + second[:-8], bytes([second[-8] ^ 0xFF]) + second[-7:]]
        await read_spent_quota(raw, on_raw, status, "gzip", parts)

    async def test_a_broken_compressed_error_body_is_read_as_its_status_says(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 400 labelled gzip that is not: rejected, by its status alone (as a body dropped)."""
        headers = {"content-encoding": "gzip"}
        raw.replies.append(
            Reply(status=400, headers=headers, body=chunks(b"not gzip at all"), content_type="application/json")
        )
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderRejected)

    async def test_a_redirect_body_that_never_ends_is_not_read_past_a_bound(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 307 to the same path whose body never ends, then a stream there: the redirect is
        followed at once and the stream read (the redirect's body was read whole until the
        call's deadline)."""
        path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
        raw.replies.append(Reply(status=307, headers={"location": path}, body=endless(b"x"), content_type="text/plain"))
        raw.replies.append(Reply(body=chunks(*stream_of(kind))))
        texts, error = await read(on_raw, call(timeout=8))
        assert ("".join(texts), error) == ("Hello world", None)
        assert raw.sent[0] < 32 << 20

    @pytest.mark.parametrize("kind", ["anthropic"])
    async def test_an_anthropic_event_of_over_1000_lines_is_unavailable_and_one_of_fewer_passes(
        self, raw: RawUpstream, on_raw: Adapter
    ) -> None:
        """After the first text, an event of 1,001 lines (lines the SDK ignores, 2 kB in all, well
        under ``max_event_bytes``): that text, then ProviderUnavailable ``event_too_many_lines``
        naming the 1,000 lines the anthropic SDK's decoder may add to one event (it adds each by
        copying the event so far: a million such lines held the event loop for minutes; the stream
        was read as any other), and not ``max_event_bytes``, which was not passed (it was named);
        one of 999 lines is read as any other."""
        events = anthropic_stream(["Hello ", "world"])

        def padded(lines: int) -> list[bytes]:
            # The event line, ``lines - 3`` lines of "a", the data line, the blank line.
            return [*events[:3], b"event: ping\n" + b"a\n" * (lines - 3) + b'data: {"type": "ping"}\n\n', *events[3:]]

        raw.replies.append(Reply(body=chunks(*padded(1001))))
        raw.replies.append(Reply(body=chunks(*padded(999))))
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert error is not None
        assert "stream event over 1000 lines (an anthropic stream's most) (event_too_many_lines)" in error.message
        assert "max_event_bytes" not in error.message
        texts, error = await read(on_raw, call(timeout=8))
        assert ("".join(texts), error) == ("Hello world", None)

    async def test_an_anthropic_event_of_over_1000_lines_read_with_the_next_events_is_too_many_lines(
        self, raw: RawUpstream, bounded_anthropic_on_raw: Adapter
    ) -> None:
        """An event of 1,001 lines (2 kB) sent in one write with the next event (7 kB), each well
        under ``max_event_bytes`` 8192, the two over it: ``event_too_many_lines``, not
        ``max_event_bytes`` (the bytes after the failing event's start, the next event's included,
        were checked against it first: ``event_too_large``)."""
        events = anthropic_stream(["Hello ", "world"])
        lines = b"event: ping\n" + b"a\n" * 998 + b'data: {"type": "ping"}\n\n'
        big = b'event: ping\ndata: {"type": "ping", "pad": "' + b"x" * 7000 + b'"}\n\n'
        raw.replies.append(Reply(body=chunks(*events[:3], lines + big, *events[3:])))
        texts, error = await read(bounded_anthropic_on_raw, call(timeout=8))
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert error is not None
        assert "stream event over 1000 lines (an anthropic stream's most) (event_too_many_lines)" in error.message
        assert "max_event_bytes" not in error.message

    @pytest.mark.parametrize("kind", ["anthropic"])
    async def test_an_anthropic_event_read_byte_by_byte_is_read_as_any_other(
        self, raw: RawUpstream, on_raw: Adapter
    ) -> None:
        """A text event of 2 kB, its two lines sent a byte at a time (a slow link, a trickling
        proxy): the whole text (each read was counted as a line, so it failed ``event_too_large``
        past 1,000 reads, naming ``max_event_bytes``; the SDK is now handed whole lines)."""
        events = anthropic_stream(["Hello ", "x" * 2000, " world"])
        trickled = [events[3][index : index + 1] for index in range(len(events[3]))]
        raw.replies.append(Reply(body=chunks(*events[:3], *trickled, *events[4:]), pause=0.0005))
        texts, error = await read(on_raw, call(timeout=30))
        assert ("".join(texts), error) == ("Hello " + "x" * 2000 + " world", None)

    async def test_an_anthropic_line_over_max_event_bytes_read_in_pieces_is_unavailable(
        self, raw: RawUpstream, bounded_anthropic_on_raw: Adapter
    ) -> None:
        """An event whose one data line of 9 kB comes in 100-byte reads, ``max_event_bytes`` 8192:
        ProviderUnavailable ``event_too_large`` after the first text (the line held for its end is
        counted as the event's)."""
        events = anthropic_stream(["Hello ", "x" * 9000, " world"])
        pieces = [events[3][index : index + 100] for index in range(0, len(events[3]), 100)]
        raw.replies.append(Reply(body=chunks(*events[:3], *pieces, *events[4:]), pause=0.0005))
        texts, error = await read(bounded_anthropic_on_raw, call(timeout=8))
        assert (texts, type(error)) == (["Hello "], ProviderUnavailable)
        assert error is not None
        assert "stream event over 8192 bytes (reliability.max_event_bytes) (event_too_large)" in error.message

    @pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
    async def test_a_byte_order_mark_before_the_first_event_is_skipped(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, split: bool
    ) -> None:
        """A UTF-8 byte order mark before the first event (which the SSE spec skips), whole or
        sent byte by byte: the whole text and the provider's usage (the first event
        was lost to both SDKs: OpenAI's first text dropped, the answer OK; Anthropic's
        ``message_start`` with the input count, then estimated and under-billed)."""
        texts_sent = ["Hello ", "world"]
        events = openai_stream(texts_sent) if kind == "openai" else anthropic_stream(texts_sent, input_tokens=1000)
        head = [b"\xef", b"\xbb", b"\xbf" + events[0]] if split else [b"\xef\xbb\xbf" + events[0]]
        raw.replies.append(Reply(body=chunks(*head, *events[1:])))
        texts: list[str] = []
        finish = None
        async for event in on_raw.stream(call(timeout=8)):
            if isinstance(event, TextDelta):
                texts.append(event.text)
            elif isinstance(event, ProviderFinish):
                finish = event
        assert finish is not None
        assert ("".join(texts), finish.usage.input_tokens, finish.estimated) == (
            "Hello world",
            10 if kind == "openai" else 1000,
            False,
        )


@pytest.mark.parametrize(
    "empty", [b"data:\n\n", b"data: \n\n", b"event: ping\n\n", b"id: 7\n\n", b"retry: 1000\n\n", b": keep-alive\n\n"]
)
async def test_an_event_without_data_is_skipped(raw: RawUpstream, kind: str, on_raw: Adapter, empty: bytes) -> None:
    """An event whose data is empty, or that has fields but no data (a keep-alive some servers
    send), after the first text: skipped, as the SSE spec skips it, the answer whole (the openai
    SDK passed it on, and its empty data, not JSON, failed the stream UNAVAILABLE after the text)."""
    events = stream_of(kind)
    raw.replies.append(Reply(body=chunks(*events[:3], empty, *events[3:])))
    texts, error = await read(on_raw, call(timeout=8))
    assert ("".join(texts), error) == ("Hello world", None)


def rate_limited(kind: str) -> bytes:
    """A provider's 429 body (a rate limit, not a spent quota)."""
    if kind == "openai":
        return json.dumps(
            {"error": {"message": "Slow down.", "type": "requests", "code": "rate_limit_exceeded"}}
        ).encode()
    return json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}}).encode()


def error_head(status: int, **headers: str) -> bytes:
    return head(
        status, {"content-type": "application/json", **{name.replace("_", "-"): v for name, v in headers.items()}}
    )


class TestErrorBodyCut:
    """An error's body that its connection cuts, or that comes too slowly, keeps its answer's
    status and headers: a 400 stays rejected, a 429 keeps its Retry-After."""

    @pytest.mark.parametrize("cut", ["short of its length", "without its last chunk"])
    @pytest.mark.parametrize("status", [400, 429])
    async def test_an_error_body_cut_by_its_connection_keeps_its_status(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, cut: str, status: int
    ) -> None:
        """A 400 or a 429 (Retry-After 7) whose JSON body came whole, then its connection closed
        short of its Content-Length or without the chunked body's last chunk: rejected, or a rate
        limit with its Retry-After (the transport's error reached the SDK's read of the body: a
        connection failure, UNAVAILABLE and retried, the 400 sent again, the Retry-After lost)."""
        body = rate_limited(kind)
        if cut == "short of its length":
            wire = error_head(status, retry_after="7", content_length=str(len(body) + 1)) + body
        else:
            wire = error_head(status, retry_after="7", transfer_encoding="chunked") + b"%x\r\n%s\r\n" % (
                len(body),
                body,
            )
        raw.replies.append(Reply(wire=chunks(wire)))
        texts, error = await read(on_raw, call(timeout=8))
        expected = ProviderRateLimited if status == 429 else ProviderRejected
        assert (texts, type(error)) == ([], expected)
        if isinstance(error, ProviderRateLimited):
            assert error.retry_after == 7.0

    async def test_an_error_body_nested_past_the_parsers_depth_keeps_its_status(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 429 (Retry-After 7) whose body is 2 kB of ``[``, cut short of its length: a rate limit
        with its Retry-After (the check whether the cut body was a whole JSON document raised
        RecursionError out of the SDK's read: INTERNAL, no retry, no fallback)."""
        body = b"[" * 2000
        wire = error_head(429, retry_after="7", content_length=str(len(body) + 1)) + body
        raw.replies.append(Reply(wire=chunks(wire)))
        await read_rate_limit(on_raw)

    async def test_a_compressed_error_body_cut_mid_member_is_read_as_far_as_it_came(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A spent quota's error in gzip, its connection closed before the member's trailer (its
        JSON whole): a spent quota (a connection failure, retried against the spent account)."""
        status, body = spent_quota(kind)
        member = compressed(json.dumps(body).encode(), 31)
        wire = error_head(status, content_encoding="gzip", content_length=str(len(member))) + member[:-8]
        raw.replies.append(Reply(wire=chunks(wire)))
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderQuotaExhausted)

    async def test_an_error_body_that_trickles_is_dropped_after_a_time_bound(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A 429 (Retry-After 7) whose body comes a byte every 0.3 s: a rate limit with its
        Retry-After once ``ERROR_BODY_SECONDS`` (2 s) passed, the body dropped (it was read until
        the call's deadline, which failed it, the 429 and its Retry-After lost)."""
        assert _event_size.ERROR_BODY_SECONDS == 2.0
        body = rate_limited(kind)
        raw.replies.append(
            Reply(
                status=429,
                headers={"retry-after": "7"},
                body=chunks(*(body[i : i + 1] for i in range(len(body)))),
                content_type="application/json",
                pause=0.3,
            )
        )
        assert 2 <= await read_rate_limit(on_raw) < 4

    @pytest.mark.parametrize("framing", ["chunk extensions", "1-byte chunks"])
    async def test_an_error_body_of_framing_that_carries_next_to_nothing_is_dropped_after_a_time_bound(
        self, raw: RawUpstream, on_raw: Adapter, monkeypatch: pytest.MonkeyPatch, framing: str
    ) -> None:
        """A 429 (Retry-After 7) whose chunked body never ends and carries a byte per chunk: with
        60 kB of chunk extensions each (which the HTTP stacks discard), or 1-byte chunks (over
        httpx, ~10 s of a core per MiB): a rate limit with its Retry-After once
        ``ERROR_BODY_SECONDS`` passed (0.5 s here), the body dropped (read at wire speed until the
        call's deadline, a core busy, the 429 and its Retry-After lost)."""
        monkeypatch.setattr(_event_size, "ERROR_BODY_SECONDS", 0.5)
        frame = b"1;" + b"e" * 60000 + b"\r\nx\r\n" if framing == "chunk extensions" else b"1\r\nx\r\n" * 10000
        wire = endless(frame, first=error_head(429, retry_after="7", transfer_encoding="chunked"))
        raw.replies.append(Reply(wire=wire))
        assert await read_rate_limit(on_raw) < 3

    async def test_a_whole_deflate_error_body_then_a_stall_is_read_at_once(
        self, raw: RawUpstream, kind: str, on_raw: Adapter
    ) -> None:
        """A spent quota's error in deflate, whole, then the connection held open (its Content-Length
        longer): a spent quota at once (the body was read on after the deflate stream's end, which
        nothing follows, until a time bound dropped it: a rate limit, a rejection)."""
        status, body = spent_quota(kind)
        stream = compressed(json.dumps(body).encode(), 15)
        wire = error_head(status, content_encoding="deflate", content_length=str(len(stream) + 10)) + stream
        raw.replies.append(Reply(wire=chunks(wire), hold=True))
        started = time.monotonic()
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderQuotaExhausted)
        assert time.monotonic() - started < 1


class TestErrorBodyWholeAtTheTimeBound:
    """An error's body that came whole, its framing unended (a wrong length, no last chunk), the
    connection held open: kept once ``ERROR_BODY_SECONDS`` passes, as when its connection cuts it."""

    @pytest.mark.parametrize("shape", ["its length longer", "gzip member whole, its length longer", "no last chunk"])
    async def test_a_whole_error_body_then_a_stall_keeps_what_it_tells(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, monkeypatch: pytest.MonkeyPatch, shape: str
    ) -> None:
        """A spent quota's JSON whole (plain, or one whole gzip member), then nothing more, the
        connection held open: a spent quota once ``ERROR_BODY_SECONDS`` (0.5 s here) passed (the
        body was dropped whole: a rate limit, retried on the spent account, or a rejection, with
        no fallback; the same bytes then a close kept it)."""
        monkeypatch.setattr(_event_size, "ERROR_BODY_SECONDS", 0.5)
        status, error_body = spent_quota(kind)
        body = json.dumps(error_body).encode()
        if shape == "no last chunk":
            wire = error_head(status, transfer_encoding="chunked") + b"%x\r\n%s\r\n" % (len(body), body)
        elif shape.startswith("gzip"):
            member = compressed(body, 31)
            wire = error_head(status, content_encoding="gzip", content_length=str(len(member) + 50)) + member
        else:
            wire = error_head(status, content_length=str(len(body) + 50)) + body
        raw.replies.append(Reply(wire=chunks(wire), hold=True))
        started = time.monotonic()
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderQuotaExhausted)
        assert time.monotonic() - started < 2

    async def test_a_part_of_an_error_body_then_a_stall_is_dropped(
        self, raw: RawUpstream, kind: str, on_raw: Adapter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Half a spent quota's JSON, then a stall: the body dropped at ``ERROR_BODY_SECONDS``,
        the status kept (a rate limit, or a rejection)."""
        monkeypatch.setattr(_event_size, "ERROR_BODY_SECONDS", 0.5)
        status, error_body = spent_quota(kind)
        body = json.dumps(error_body).encode()
        wire = error_head(status, content_length=str(len(body))) + body[: len(body) // 2]
        raw.replies.append(Reply(wire=chunks(wire), hold=True))
        texts, error = await read(on_raw, call(timeout=8))
        assert (texts, type(error)) == ([], ProviderRateLimited if status == 429 else ProviderRejected)


def batch_api(kind: str, url: str) -> OpenAIBatches | AnthropicBatches:
    return OpenAIBatches("openai", "sk", url + "/v1") if kind == "openai" else AnthropicBatches("anthropic", "sk", url)


async def anthropic_create_error(raw: RawUpstream) -> ProviderError:
    """What an Anthropic batch create answered by ``raw``'s next reply raises."""
    api = AnthropicBatches("anthropic", "sk", raw.url)
    try:
        with pytest.raises(ProviderError) as raised:
            await api.submit([], "tag")
    finally:
        await api.aclose()
    return raised.value


# An Anthropic bad request's error body: a rejection for good.
BAD_REQUEST = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}


class TestBatchErrorBodies:
    """The batch adapters' clients read an error's body as the streams' do, and a 400 whose body is
    lost is not taken for a definite rejection (which fails a batch's jobs)."""

    async def test_a_batch_client_asks_for_no_coding_it_does_not_decode(
        self, raw: RawUpstream, kind: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a stack that decodes br and zstd too (brotli installed, Python 3.14), a batch
        call asks ``Accept-Encoding: gzip, deflate`` only (httpx2's default asked br and zstd, whose
        error bodies are dropped: Anthropic's "credit balance is too low" 400 on a create was then
        a rejection, the group's jobs failed for good, not kept queued)."""
        monkeypatch.setattr(httpx2_client, "ACCEPT_ENCODING", "gzip, deflate, br, zstd")
        raw.replies.append(Reply(status=404, body=chunks(b'{"error": {"message": "no such batch"}}')))
        api = batch_api(kind, raw.url)
        try:
            with pytest.raises(ProviderRejected):
                await api.poll("batch_1")
        finally:
            await api.aclose()
        assert raw.asked[0]["accept-encoding"] == "gzip, deflate"

    @pytest.mark.parametrize("lost", ["stalled part-way", "gzip cut mid-member"])
    async def test_a_400_on_a_create_whose_body_is_lost_is_unavailable(
        self, raw: RawUpstream, monkeypatch: pytest.MonkeyPatch, lost: str
    ) -> None:
        """A batch create answered Anthropic's credit-spent 400 whose body stalls part-way (dropped
        at ``ERROR_BODY_SECONDS``, 0.5 s here) or whose gzip is cut mid-member: unavailable with
        its status 400 (retried: the jobs are released, the account may be paid later), not
        rejected (the queue failed every job of the group for good)."""
        monkeypatch.setattr(_event_size, "ERROR_BODY_SECONDS", 0.5)
        _, error_body = spent_quota("anthropic")
        body = json.dumps(error_body).encode()
        if lost == "stalled part-way":
            wire = error_head(400, content_length=str(len(body))) + body[: len(body) // 2]
        else:
            member = compressed(body, 31)
            head_ = error_head(400, content_encoding="gzip", content_length=str(len(member)))
            wire = head_ + member[: len(member) // 2]
        raw.replies.append(Reply(wire=chunks(wire), hold=lost == "stalled part-way"))
        error = await anthropic_create_error(raw)
        assert (type(error), error.status) == (ProviderUnavailable, 400)

    @pytest.mark.parametrize(
        ("shape", "expected"),
        [
            ("credit 400 in two gzip members, cut after the first", ProviderUnavailable),
            ("bad request whole, its gzip trailer missing", ProviderRejected),
        ],
    )
    async def test_a_compressed_400_on_a_create_is_judged_whole_by_what_it_decodes_to(
        self, raw: RawUpstream, shape: str, expected: type[ProviderError]
    ) -> None:
        """A batch create's 400 in gzip cut by its connection: Anthropic's credit-spent JSON split
        over two members and cut after the first is a lost body (unavailable, status 400: retried),
        a bad request's JSON decoded whole but its trailer missing a rejection (whether the body
        was whole was judged by a member's end, not the JSON: the first was a rejection, the
        group's jobs failed for good, the second retried until the jobs expired)."""
        if shape.startswith("credit"):
            _, error_body = spent_quota("anthropic")
            body = json.dumps(error_body).encode()
            first = compressed(body[: len(body) // 2], 31)
            member = first + compressed(body[len(body) // 2 :], 31)
            sent = first
        else:
            member = compressed(json.dumps(BAD_REQUEST).encode(), 31)
            sent = member[:-8]
        wire = error_head(400, content_encoding="gzip", content_length=str(len(member))) + sent
        raw.replies.append(Reply(wire=chunks(wire)))
        error = await anthropic_create_error(raw)
        assert (type(error), error.status) == (expected, 400)

    async def test_a_400_on_a_create_whose_body_came_whole_then_stalled_keeps_what_it_tells(
        self, raw: RawUpstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Anthropic's credit-spent 400 on a batch create, its JSON whole, then a stall: a spent
        quota (the jobs wait queued), and a bad request's 400 so too a rejection."""
        monkeypatch.setattr(_event_size, "ERROR_BODY_SECONDS", 0.5)
        _, error_body = spent_quota("anthropic")
        raised: list[type[BaseException]] = []
        for body in (json.dumps(error_body).encode(), json.dumps(BAD_REQUEST).encode()):
            wire = error_head(400, content_length=str(len(body) + 50)) + body
            raw.replies.append(Reply(wire=chunks(wire), hold=True))
            raised.append(type(await anthropic_create_error(raw)))
        assert raised == [ProviderQuotaExhausted, ProviderRejected]
