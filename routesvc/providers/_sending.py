"""When a call's request goes out: the transports' hooks that set ``ProviderCall.sent``.

An attempt cut short (a cancel, the deadline, a stall) is charged an estimate of its input only
once the provider had it; one cut while its connection was still being made (a host that never
accepts, a full pool) cost the provider nothing. Only the HTTP transport knows when the request
was written, so each SDK client's transport is hooked:

    aiohttp (the default)   a ``TraceConfig`` on the SDK transport's session: ``on_request_headers_sent``
    httpx                   the httpcore ``trace`` request extension: ``*.send_request_headers.started``

Both fire on an open connection as the request's headers are about to be written, the body
right after them: from then on the request is the provider's.

The adapter awaits the SDK's request inside ``sending(call.sent)``, which the hooks find in a
context variable: they run in that task (or, for aiohttp's body writer, in a task it starts
there, which copies the context), and the SDK passes nothing of ours down to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx2
from httpx2._utils import URLPattern

from routesvc.loopback import is_loopback_host
from routesvc.providers._event_size import BoundedEventsTransport, EventBound
from routesvc.providers.base import RequestSent

_SENDING: ContextVar[RequestSent | None] = ContextVar("routesvc_request_sending", default=None)


@contextlib.contextmanager
def sending(sent: RequestSent) -> Iterator[None]:
    """While the SDK sends a request in this context: ``sent`` is set once it goes out."""
    token = _SENDING.set(sent)
    try:
        yield
    finally:
        _SENDING.reset(token)


def _went_out() -> None:
    sent = _SENDING.get()
    if sent is not None:
        sent.set()


async def _on_headers_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    _went_out()


def _aiohttp_trace() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_on_headers_sent)
    config.freeze()
    return config


_AIOHTTP_TRACE = _aiohttp_trace()


def trace_session(transport: object) -> None:
    """Hook the aiohttp session of the SDK's aiohttp ``transport``, making it now if the transport
    has not yet (as it would on its first request: its ``client`` and ``get_client``)."""
    session = getattr(transport, "client", None)
    if not isinstance(session, aiohttp.ClientSession):
        make = getattr(transport, "get_client", None)
        if make is None:
            return
        session = make()
        setattr(transport, "client", session)  # noqa: B010  # the SDK transport's own attribute, untyped here
    if isinstance(session, aiohttp.ClientSession) and _AIOHTTP_TRACE not in session.trace_configs:
        session.trace_configs.append(_AIOHTTP_TRACE)


async def _on_httpcore_event(name: str, info: dict[str, Any]) -> None:
    # A proxy tunnel's CONNECT carries the request's extensions too: it is not the request.
    if name.endswith("send_request_headers.started") and getattr(info.get("request"), "method", None) != b"CONNECT":
        _went_out()


class _TracedTransport(httpx2.AsyncBaseTransport):
    """Delegates to the SDK's httpx transport, asking httpcore to report each request's steps."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.extensions["trace"] = _on_httpcore_event
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def traced(client_class: type[httpx2.AsyncClient], bound: EventBound) -> httpx2.AsyncClient:
    """An instance of the SDK's ``DefaultAsyncHttpxClient`` class (its defaults: timeouts,
    connection limits) whose transports (direct and proxy) report when a request goes out, each
    event of a stream bounded by ``bound`` (``_event_size``)."""
    client = client_class()
    wrap_transports(client, lambda inner: BoundedEventsTransport(_TracedTransport(inner), bound))
    return client


def wrap_transports(
    client: httpx2.AsyncClient, wrap: Callable[[httpx2.AsyncBaseTransport], httpx2.AsyncBaseTransport]
) -> None:
    """Wrap each of a new ``client``'s transports, direct and proxy, in ``wrap``.

    Done once the client is made, whoever made the transports: httpx builds them in
    ``_init_transport`` and ``_init_proxy_transport``, but Anthropic's ``DefaultAsyncHttpxClient``
    builds its own, the proxies from ``HTTP(S)_PROXY``/``ALL_PROXY`` among them, and hands them in
    as ``mounts``: hooking those two methods missed them."""
    client._transport = wrap(client._transport)
    client._mounts = {pattern: None if mount is None else wrap(mount) for pattern, mount in client._mounts.items()}


def direct_to_loopback(client: httpx2.AsyncClient, base_url: str) -> httpx2.AsyncClient:
    """``client``, calling ``base_url``'s host directly when it is this host (``is_loopback_host``:
    Ollama, vLLM, the fake provider on 127.0.0.1, ``localhost`` or ``[::1]``), never through a
    proxy the environment names (``http_proxy``, ``HTTP_PROXY``, ``all_proxy``...): the proxy got
    the whole prompt and the key (``Authorization: Bearer``) in the clear, then dialled its own
    loopback rather than this host's (UNAVAILABLE). As ``NO_PROXY=host`` would: a mount of that host
    to the client's direct transport, so the rest of what the environment says (``SSL_CERT_FILE``,
    ``.netrc``, the proxy for other hosts) stays as it was. Both transports take their proxy from
    these mounts (httpx's, and aiohttp's ``ClientSession`` trusts no environment itself)."""
    host = (httpx2.URL(base_url).host or "").lower()
    if is_loopback_host(host):
        pattern = f"all://[{host}]" if ":" in host else f"all://{host}"
        mounts = {**client._mounts, URLPattern(pattern): None}
        client._mounts = dict(sorted(mounts.items()))
    return client
