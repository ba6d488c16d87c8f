"""A provider on this host (Ollama, vLLM, the fake on 127.0.0.1) is called directly, never through
a proxy the environment names; a provider elsewhere keeps that proxy. Real forward proxy on
loopback (``tests/proxies.py``), the fake provider, the real SDKs over both transports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from routesvc.loopback import is_loopback_ip
from routesvc.models import Message, ProviderEvent, ProviderFinish, Role, TextDelta
from routesvc.providers._adapter import SdkAdapter
from routesvc.providers.anthropic import AnthropicProvider
from routesvc.providers.base import HttpClientKind, ProviderCall
from routesvc.providers.openai import OpenAIProvider
from routesvc.testing import FakeProvider, Script
from tests.proxies import ForwardProxy

CANARY_PROMPT = "canary-prompt-5d1c2e keep this off proxies"
CANARY_KEY = "sk-canary-proxy-key-8f31a7"
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy")


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ForwardProxy]:
    """A recording forward proxy that dials the fake for ``provider.test``, with nothing in the
    environment exempting any host from it."""
    for name in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    async with ForwardProxy(resolve={"provider.test": "127.0.0.1"}) as running:
        yield running


def make_call(model: str) -> ProviderCall:
    return ProviderCall(
        model=model,
        provider_model=f"{model}-test",
        messages=(Message(Role.USER, CANARY_PROMPT),),
    )


def build(kind: str, base_url: str, http_client: HttpClientKind) -> SdkAdapter[object]:
    if kind == "openai":
        return OpenAIProvider("local", CANARY_KEY, base_url, "openai_compatible", http_client=http_client)  # type: ignore[return-value]
    return AnthropicProvider("local", CANARY_KEY, base_url, http_client=http_client)  # type: ignore[return-value]


async def collect(provider: SdkAdapter[object], call: ProviderCall) -> list[ProviderEvent]:
    return [event async for event in provider.stream(call)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("variable", PROXY_VARIABLES)
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
async def test_a_provider_on_this_host_is_called_directly_whatever_proxy_the_environment_names(
    fake: FakeProvider,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    http_client: HttpClientKind,
    variable: str,
    kind: str,
    host: str,
) -> None:
    """With ``http_proxy`` (or ``HTTP_PROXY``, ``all_proxy``) set before the provider is built, a
    call to a provider at ``http://127.0.0.1:PORT`` or ``http://localhost:PORT`` reaches it
    directly and succeeds; the proxy sees nothing (it got the prompt and the key in the clear,
    and the call failed UNAVAILABLE when the proxy could not reach its own loopback). So does
    one at the unspecified address (``0.0.0.0``, as Docker and Ollama setups name a local
    server), which went through the proxy."""
    monkeypatch.setenv(variable, proxy.url)
    base = fake.openai_base_url if kind == "openai" else fake.anthropic_base_url
    base = base.replace("127.0.0.1", host)
    fake.enqueue(Script())
    provider = build(kind, base, http_client)
    try:
        events = await collect(provider, make_call("gpt-4o-mini" if kind == "openai" else "claude-sonnet"))
    finally:
        await provider.aclose()
    assert "".join(event.text for event in events if isinstance(event, TextDelta)) == "Hello from the fake provider."
    assert isinstance(events[-1], ProviderFinish)
    assert proxy.requests == []
    assert len(fake.requests) == 1


def test_this_hosts_addresses_are_told_apart_from_others() -> None:
    """The addresses a call reaches this host at, in every form a resolver reads (short and
    numeric IPv4 forms, IPv4-mapped, unspecified), are this host's; others and names are not
    (``0.0.0.0``, ``::`` and ``127.1`` were not, so a call to them went through the proxy)."""
    ours = ["127.0.0.1", "127.1", "2130706433", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"]
    others = ["10.0.0.1", "8.8.8.8", "::ffff:8.8.8.8", "2001:db8::1", "1.2.3", "example.com", ""]
    assert [host for host in ours + others if is_loopback_ip(host)] == ours


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_provider_elsewhere_keeps_the_environments_proxy(
    fake: FakeProvider,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
    http_client: HttpClientKind,
    kind: str,
) -> None:
    """A provider not on this host (``provider.test``, which the proxy dials the fake for) is
    still called through ``http_proxy``: it may be the only way out of the network."""
    monkeypatch.setenv("http_proxy", proxy.url)
    base = fake.openai_base_url if kind == "openai" else fake.anthropic_base_url
    fake.enqueue(Script())
    provider = build(kind, base.replace("127.0.0.1", "provider.test"), http_client)
    try:
        events = await collect(provider, make_call("gpt-4o-mini" if kind == "openai" else "claude-sonnet"))
    finally:
        await provider.aclose()
    assert isinstance(events[-1], ProviderFinish)
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    port = base.split(":")[2].split("/")[0]
    assert proxy.requests == [f"POST http://provider.test:{port}{path} HTTP/1.1".encode()]
