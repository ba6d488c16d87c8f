"""TLS and mutual TLS (issue 6): client certificates map to tenants; no certificate, no call."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from routesvc.auth import key_digest
from routesvc.client import RouterClient, tls_credentials
from routesvc.server import Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is needed to make test certificates")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, and client certificates for two names."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=routesvc test CA", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("acme-client", []), ("stranger", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *ext, cwd=folder)  # fmt: skip
    return folder


@pytest.fixture
async def mtls(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[tuple[Server, Path]]:
    """A server requiring client certificates; acme-client maps to tenant acme (gpt-4o-mini only)."""
    pki = make_pki(tmp_path)
    config = default_config()
    config["server"] = {
        "tls": {
            "cert_file": str(pki / "server.pem"),
            "key_file": str(pki / "server.key"),
            "client_ca_file": str(pki / "ca.pem"),
            "client_tenants": {"acme-client": "acme"},
        }
    }
    config["auth"] = {"enabled": True}
    config["tenants"] = {
        "acme": {"allowed_models": ["gpt-4o-mini"]},
        "globex": {"api_key_sha256": [key_digest("globex-key")]},
    }
    async with Server(settings_from(config, live_environ(fake)), port=0) as server:
        yield server, pki


def _client(server: Server, pki: Path, name: str | None, api_key: str | None = None) -> RouterClient:
    cert = str(pki / f"{name}.pem") if name else None
    key = str(pki / f"{name}.key") if name else None
    return RouterClient(
        f"localhost:{server.port}", api_key=api_key, credentials=tls_credentials(str(pki / "ca.pem"), cert, key)
    )


class TestMutualTls:
    async def test_a_client_certificate_authenticates_its_tenant(self, mtls: tuple[Server, Path]) -> None:
        """acme-client's certificate is tenant acme: premium would pick gpt-4o, acme may only use gpt-4o-mini."""
        server, pki = mtls
        async with _client(server, pki, "acme-client") as client:
            decision = await client.route(user_chat("hi"), pb.RoutingContext(user_tier="premium"))
        assert decision.model == "gpt-4o-mini"
        assert any("not allowed for tenant 'acme'" in reason for reason in decision.reasons)

    async def test_no_client_certificate_no_call(self, mtls: tuple[Server, Path]) -> None:
        """Without a client certificate the handshake fails: UNAVAILABLE, the service never runs."""
        server, pki = mtls
        async with _client(server, pki, None, api_key="globex-key") as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hi"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_an_unmapped_certificate_still_needs_a_key(self, mtls: tuple[Server, Path]) -> None:
        """A valid certificate whose name maps to no tenant falls back to the bearer key."""
        server, pki = mtls
        async with _client(server, pki, "stranger") as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hi"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with _client(server, pki, "stranger", api_key="globex-key") as client:
            decision = await client.route(user_chat("hi"), pb.RoutingContext(user_tier="premium"))
        assert decision.model == "gpt-4o"
