"""What both adapters must do alike over both SDK transports (aiohttp, the default, and httpx)
where the transports themselves differ: a body whose HTTP framing breaks, a kept-alive connection
after it, closing an adapter while a stream is being read, and telling whether a request went
out. Real SDKs, real HTTP, the fake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from routesvc.errors import ProviderError, ProviderTimedOut, ProviderUnavailable
from routesvc.models import InputReported, Message, Role, TextDelta
from routesvc.providers.anthropic import AnthropicProvider
from routesvc.providers.base import HttpClientKind, ProviderCall
from routesvc.providers.openai import OpenAIProvider
from routesvc.testing import FakeProvider, Fault, Script
from tests.conftest import until
from tests.forward_proxy import ForwardProxy

Adapter = OpenAIProvider | AnthropicProvider


@pytest.fixture(params=["openai", "anthropic"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def make_adapter(kind: str, http_client: HttpClientKind, openai_url: str, anthropic_url: str) -> Adapter:
    if kind == "openai":
        return OpenAIProvider("openai", "sk-test", openai_url, "openai", http_client=http_client)
    return AnthropicProvider("anthropic", "sk-test", anthropic_url, http_client=http_client)


@pytest.fixture
async def adapter(fake: FakeProvider, kind: str, http_client: HttpClientKind) -> AsyncIterator[Adapter]:
    """An adapter of each kind, over each transport, pointed at the fake."""
    made = make_adapter(kind, http_client, fake.openai_base_url, fake.anthropic_base_url)
    yield made
    await made.aclose()


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
    full) and then drains it, with a 2.5 s call deadline; then the connection idles past that
    deadline and the next call reuses it: the next call is answered. (aiohttp rearms its socket
    read timer when reading resumes even after the body has ended; fired on the idle pooled
    connection, it failed the next request at once with a read timeout, without any request
    reaching the provider. The adapters give the SDKs no read timeout of their own: the call's
    deadline and the router's stream timers bound every read.)"""
    failures = []
    for _ in range(3):
        fake.enqueue(Script(chunks=tuple(["x" * 2000] * 1000)))
        # A deadline with room for a loaded machine to read the 2 MB (0.5 s failed under load;
        # 1.5 s left little room on a busy 2-core machine).
        stream = adapter.stream(call(timeout=2.5))
        first = await anext(aiter(stream))
        if isinstance(first, InputReported):  # Anthropic's message_start tells the input first
            first = await anext(aiter(stream))
        assert isinstance(first, TextDelta)
        await asyncio.sleep(0.2)  # the provider sends the rest while nothing is read
        async for _ in stream:
            pass
        await asyncio.sleep(2.6)  # past the first call's deadline, the connection idle in the pool
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
        builds the proxy's transport itself; it went unhooked, and such a cut was charged $0.)"""
        async with ForwardProxy() as proxy:
            for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            made = make_adapter(kind, http_client, fake.openai_base_url, fake.anthropic_base_url)
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
