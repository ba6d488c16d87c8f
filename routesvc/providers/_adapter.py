"""What the streaming adapters (``OpenAIProvider``, ``AnthropicProvider``) share: their name, where
their calls go, their HTTP transport, their SDK client's lifecycle, the guard around each SDK
step, and the short wait for what follows a whole answer and the rule for errors then. Each
builds its own client (the SDKs differ in what they take) and hands it here; what it sends, how
it reads the answer and how it translates its SDK's exceptions stay its own."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from typing import Generic, Protocol, TypeVar

import httpx2
import structlog

from routesvc.errors import ProviderError
from routesvc.providers._http import (
    BUFFERED_READ_SECONDS,
    DEADLINE_MARGIN_SECONDS,
    guarded,
    next_event,
    server_url,
)
from routesvc.providers.base import HttpClientKind, ProviderCall


class SdkClient(Protocol):
    """The part of an SDK's async client (``AsyncOpenAI``, ``AsyncAnthropic``) used here."""

    @property
    def base_url(self) -> httpx2.URL: ...

    async def close(self) -> None: ...

    def is_closed(self) -> bool: ...


_Client = TypeVar("_Client", bound=SdkClient)
_T = TypeVar("_T")

_log = structlog.get_logger("routesvc.providers")


class SdkAdapter(ABC, Generic[_Client]):
    """A streaming adapter over one SDK client, which translates that SDK's exceptions itself
    (``_translate``)."""

    def __init__(self, name: str, client: _Client, http_client: HttpClientKind) -> None:
        self._name = name
        self._client = client
        self._http_client: HttpClientKind = http_client

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    @property
    def base_url(self) -> str:
        """Where its calls go, as the SDK resolved it, in one form for each server
        (``server_url``: the same server written with or without a trailing slash is equal)."""
        return server_url(self._client.base_url)

    @property
    def http_client(self) -> HttpClientKind:
        """The SDK's HTTP transport (``providers.<name>.http_client``)."""
        return self._http_client

    async def aclose(self) -> None:
        """Close the SDK's HTTP connection pool."""
        await self._client.close()

    @property
    def closed(self) -> bool:
        """Whether ``aclose`` has closed the connection pool."""
        return self._client.is_closed()

    async def _guard(self, call: ProviderCall, deadline: float | None, awaitable: Awaitable[_T]) -> _T:
        """Await one SDK step within the call's deadline, translating whatever it raises."""
        return await guarded(self._name, call, deadline, awaitable, self._translate)

    async def _next_within(
        self,
        call: ProviderCall,
        deadline: float | None,
        stream: AsyncIterator[object],
        wait: float,
        *,
        none_came: object,
    ) -> object:
        """The stream's next event once its answer is whole (the finish reason came), or
        ``none_came`` when none comes within ``wait`` seconds (``DRAIN_SECONDS``, or the wait for
        OpenAI's usage chunk), nor before the deadline's margin: a server (a proxy) holding the
        finished body open ends the answer OK soon, not after ``stream_idle_timeout_seconds``
        (failed UNAVAILABLE, or DEADLINE_EXCEEDED, an estimate billed). What has come already is
        still read within the margin (the usage chunk written with the finish): for half of what
        is left, at most ``BUFFERED_READ_SECONDS``. An error of the stream is raised: whether it
        fails the attempt is the caller's to say (``_ends_whole``)."""
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            wait = min(wait, max(left - DEADLINE_MARGIN_SECONDS, min(BUFFERED_READ_SECONDS, left / 2)))
            if wait <= 0:
                return none_came
        tail = asyncio.timeout(wait)
        try:
            async with tail:
                return await self._guard(call, deadline, next_event(stream))
        except TimeoutError:
            if not tail.expired():
                raise
            return none_came

    def _ends_whole(self, call: ProviderCall, exc: ProviderError, *, whole: bool) -> bool:
        """Whether an error of the stream ``exc`` leaves the answer whole, the attempt OK: so once
        the answer is (``whole``: its finish reason came, and the provider's usage of it too, or
        none will come). The caller has then had the whole answer; failing the attempt would show
        it UNAVAILABLE and bill an estimate instead of the usage reported. The error is logged
        ``provider_error_after_finish`` by its fixed code, not its message: nothing the server
        sent. Before that, the error is the attempt's (False: the caller raises it)."""
        if whole:
            _log.warning("provider_error_after_finish", provider=self._name, model=call.model, reason=exc.reason)
        return whole

    @abstractmethod
    def _translate(self, call: ProviderCall, exc: Exception) -> ProviderError | None:
        """The ``ProviderError`` for an SDK or transport exception; None for anything else (our bug)."""
