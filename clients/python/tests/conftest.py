"""Fixtures for interop tests against a live routesvc (``ROUTESVC_TARGET``) and its fake provider
(``ROUTESVC_FAKE_URL``); .ci/clients.sh starts both."""

from __future__ import annotations

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

Script = Callable[..., Awaitable[None]]


@pytest.fixture
async def client() -> AsyncIterator[RouterClient]:
    target = os.environ.get("ROUTESVC_TARGET")
    if not target:
        pytest.skip("ROUTESVC_TARGET not set: no live service to test against")
    async with RouterClient(target, api_key="interop-key") as client:
        yield client


@pytest.fixture
def script(client: RouterClient) -> Script:
    """Reset the fake provider, then queue one scripted answer for the provider model serving
    ``PINNED_MODEL`` (as ListModels reports it)."""
    fake_url = os.environ.get("ROUTESVC_FAKE_URL")
    if not fake_url:
        pytest.skip("ROUTESVC_FAKE_URL not set: cannot script a slow provider")

    def post(path: str, payload: object) -> None:
        # S310: the URL is the loopback fake named by the test environment, always http.
        request = urllib.request.Request(  # noqa: S310
            f"{fake_url}{path}", data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200

    async def enqueue(**fields: Any) -> None:
        models = await client.list_models(timeout=10)
        provider_model = next(model.provider_model for model in models if model.id == PINNED_MODEL)
        post("/_fake/reset", {})
        post("/_fake/script", {"script": fields, "model": provider_model, "mode": "enqueue"})

    return enqueue
