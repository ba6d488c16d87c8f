"""Fixtures for interop tests against a live routesvc (``ROUTESVC_TARGET``) and its fake provider
(``ROUTESVC_FAKE_URL``); .ci/clients.sh starts both."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from routesvc_client import RouterClient

PINNED_MODEL = "claude-sonnet"
"""The catalog model the scripted tests pin, so that the fake provider's script queue for its provider
model name is consumed only by them, never by the unscripted tests (routed to the default gpt-4o-mini)."""

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Opens the fake provider's loopback URL directly, never through a proxy the environment names."""

Script = Callable[..., Awaitable[None]]
Upstream = Callable[[], Awaitable[dict[str, Any]]]


@pytest.fixture
def target() -> str:
    """The live service's ``host:port``; the tests that need one are skipped without it."""
    target = os.environ.get("ROUTESVC_TARGET")
    if not target:
        pytest.skip("ROUTESVC_TARGET not set: no live service to test against")
    return target


@pytest.fixture
async def client(target: str) -> AsyncIterator[RouterClient]:
    async with RouterClient(target, api_key="interop-key", insecure=True) as client:
        yield client


@pytest.fixture
def fake_url() -> str:
    """The fake provider's URL; the tests that script it or read its records are skipped when
    run by hand without one (.ci/clients.sh always sets it)."""
    url = os.environ.get("ROUTESVC_FAKE_URL")
    if not url:
        pytest.skip("ROUTESVC_FAKE_URL not set: no fake provider to script or read")
    return url


@pytest.fixture
def script(client: RouterClient, fake_url: str) -> Script:
    """Reset the fake provider, then queue one scripted answer for the provider model serving
    ``PINNED_MODEL`` (as ListModels reports it)."""

    def post(path: str, payload: object) -> None:
        # S310: the URL is the loopback fake named by the test environment, always http.
        request = urllib.request.Request(  # noqa: S310
            f"{fake_url}{path}", data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
        )
        with _DIRECT.open(request, timeout=10) as response:
            assert response.status == 200

    async def enqueue(**fields: Any) -> None:
        models = await client.list_models(timeout=10)
        provider_model = next(model.provider_model for model in models if model.id == PINNED_MODEL)
        post("/_fake/reset", {})
        post("/_fake/script", {"script": fields, "model": provider_model, "mode": "enqueue"})

    return enqueue


@pytest.fixture
def upstream(fake_url: str) -> Upstream:
    """The fake provider's record of the last request it received, once that request has ended
    (completed, cut or aborted by routesvc): ``aborted`` says whether routesvc closed it early."""

    def requests() -> list[dict[str, Any]]:
        with _DIRECT.open(f"{fake_url}/_fake/requests", timeout=10) as response:
            recorded: list[dict[str, Any]] = json.load(response)["requests"]
        return recorded

    async def last_ended() -> dict[str, Any]:
        # The fake is another process with no event to wait on: a bounded poll, well past the
        # scripted answer's length, so an uncancelled request ends completed rather than timing out.
        async with asyncio.timeout(20):
            while True:
                recorded = await asyncio.to_thread(requests)
                if recorded and recorded[-1]["ended"]:
                    return recorded[-1]
                await asyncio.sleep(0.05)

    return last_ended
