"""Fixtures for interop tests against a live routesvc (``ROUTESVC_TARGET``) and its fake provider
(``ROUTESVC_FAKE_URL``); .ci/clients.sh starts both."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from routesvc_client import RouterClient

PINNED_MODEL = "gpt-4o-mini"
"""Scripted tests pin this model so the fake's per-model queue serves exactly their request."""


@pytest.fixture
async def client() -> AsyncIterator[RouterClient]:
    target = os.environ.get("ROUTESVC_TARGET")
    if not target:
        pytest.skip("ROUTESVC_TARGET not set: no live service to test against")
    async with RouterClient(target, api_key="interop-key") as client:
        yield client


@pytest.fixture
def script() -> Callable[..., None]:
    """Queue one scripted answer for ``PINNED_MODEL`` at the fake provider."""
    fake_url = os.environ.get("ROUTESVC_FAKE_URL")
    if not fake_url:
        pytest.skip("ROUTESVC_FAKE_URL not set: cannot script a slow provider")

    def enqueue(**fields: Any) -> None:
        body = json.dumps({"script": fields, "model": PINNED_MODEL, "mode": "enqueue"}).encode()
        # S310: the URL is the loopback fake named by the test environment, always http.
        request = urllib.request.Request(  # noqa: S310
            f"{fake_url}/_fake/script", data=body, headers={"content-type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200

    return enqueue
