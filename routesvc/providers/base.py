"""The ``Provider`` protocol: one way of calling a family of model APIs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

from routesvc.models import Message, ProviderEvent, ToolSpec

# The HTTP transport under an SDK client: the SDKs' aiohttp one (``DefaultAioHttpClient``, wrapped
# by ``_aiohttp.keeping_buffered`` so a cut loses nothing; routesvc's default) or their own default,
# httpx. Same requests and headers; aiohttp costs less CPU per stream. docs/performance.md lists
# the differences.
HttpClientKind = Literal["aiohttp", "httpx"]


@dataclass(frozen=True, slots=True)
class ProviderCall:
    """One call to a model: what to send, and how long it may take.

    ``timeout`` is the seconds left before the caller's deadline (None: no deadline); the
    adapter bounds the whole HTTP exchange by it. ``headers`` are extra HTTP headers to send
    upstream (for example ``traceparent``); never the client's own credentials.
    """

    model: str
    provider_model: str
    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int = 512
    temperature: float | None = None
    timeout: float | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


class Provider(Protocol):
    """A model API family (OpenAI, Anthropic, OpenAI-compatible).

    ``stream`` yields ``TextDelta``s in order and then exactly one ``ProviderFinish``; every SDK
    exception is translated to a ``routesvc.errors.ProviderError`` subclass inside the adapter.
    Closing the iterator early (``aclose``, or cancelling the task that iterates it) closes the
    upstream HTTP request.
    """

    @property
    def name(self) -> str:
        """The configured provider name, for example "openai"."""
        ...

    def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        """Call the model and stream its answer."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
