"""TLS and mutual TLS (issue 6): client certificates map to tenants; no certificate, no call."""

from __future__ import annotations

import asyncio
import copy
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from routesvc.auth import key_digest
from routesvc.client import RouterClient, tls_credentials
from routesvc.errors import ConfigError
from routesvc.server import SERVICE_NAME, Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb
from tests.conftest import (
    REPO,
    default_config,
    free_port,
    live_environ,
    loopback_channel,
    process_environ,
    settings_from,
    user_chat,
)
from tests.test_server import health_across_drain


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


def mtls_config(pki: Path) -> dict[str, Any]:
    """Client certificates required; acme-client maps to tenant acme (gpt-4o-mini only), globex
    has a key."""
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
    return config


@pytest.fixture
async def mtls(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[tuple[Server, Path]]:
    """A server with ``mtls_config``."""
    pki = make_pki(tmp_path)
    async with Server(settings_from(mtls_config(pki), live_environ(fake)), port=0) as server:
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


class TestCliAgainstTls:
    """What a client command says when its TLS settings do not match a routesvc serving mutual TLS:
    to look at the TLS flags, not to start a server with ``make run`` (one is serving)."""

    @pytest.mark.parametrize(
        "flags",
        [(), ("--tls-ca", "{pki}/ca.pem"), ("--tls",)],
        ids=["plaintext", "without-the-client-certificate", "unverified-server-certificate"],
    )
    async def test_a_tls_mismatch_names_the_tls_flags(self, mtls: tuple[Server, Path], flags: tuple[str, ...]) -> None:
        """Plaintext to the TLS port and TLS without the client certificate (the server closes the
        socket), and TLS that cannot verify the server's certificate (the handshake fails): one
        ``error: UNAVAILABLE`` line, exit 1, with the TLS hint."""
        server, pki = mtls
        target = f"localhost:{server.port}"
        line = await _unavailable_line(target, (flag.format(pki=pki) for flag in flags))
        assert "make run" not in line
        assert line.endswith(
            f"(does {target} serve TLS? pass --tls-ca PEM for its CA (--tls for the system roots), and"
            " --tls-cert PEM --tls-key PEM if it requires a client certificate)"
        )

    @pytest.mark.parametrize("flags", [("--tls-ca", "{pki}/ca.pem"), ("--tls",)], ids=["tls-ca", "tls"])
    async def test_a_tls_call_to_a_plaintext_server_says_to_leave_the_tls_flags_out(
        self, live_server: Server, tmp_path: Path, flags: tuple[str, ...]
    ) -> None:
        """TLS to a routesvc serving plaintext fails the handshake (WRONG_VERSION_NUMBER): the hint
        says to leave the TLS flags out (it said to pass --tls-ca, which the caller had passed)."""
        pki = make_pki(tmp_path)
        target = f"localhost:{live_server.port}"
        line = await _unavailable_line(target, (flag.format(pki=pki) for flag in flags))
        assert line.endswith(
            f"(does {target} serve plaintext? then leave out --tls, --tls-ca, --tls-cert and --tls-key)"
        )


async def _unavailable_line(target: str, flags: Iterable[str]) -> str:
    """The one error line of ``routesvc models --target TARGET FLAGS``, which must exit 1 UNAVAILABLE."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "routesvc", "models", "--target", target, "--timeout", "5", *flags,
        cwd=REPO, env=process_environ(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, stderr = await process.communicate()
    (line,) = [line for line in stderr.decode().splitlines() if line.startswith("error: ")]
    assert (process.returncode, line.startswith("error: UNAVAILABLE: ")) == (1, True), stderr
    return line


@pytest.fixture(scope="module")
def shared_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make_pki`` once for the tests that only read it, with the server key also encrypted."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    _openssl("pkcs8", "-topk8", "-in", "server.key", "-out", "encrypted.key", "-passout", "pass:pw", cwd=pki)
    return pki


class TestTlsFilesGrpcCannotUse:
    """A TLS file that is readable but unusable fails the start naming the field (it failed as
    grpc bound the port: "cannot listen on ... (the port is in use ...)")."""

    @pytest.mark.parametrize(
        ("files", "message"),
        [
            (
                {"key_file": "stranger.key"},
                "server.tls.key_file: the key in {pki}/stranger.key does not match the certificate of"
                " server.tls.cert_file",
            ),
            (
                {"cert_file": "server.key", "key_file": "server.pem"},
                "server.tls.cert_file: {pki}/server.key holds no PEM certificate (a key, or the files swapped?)",
            ),
            (
                {"client_ca_file": "server.ext"},
                "server.tls.client_ca_file: {pki}/server.ext holds no PEM certificate (a key, or the files swapped?)",
            ),
            ({"key_file": "ca.pem"}, "server.tls.key_file: {pki}/ca.pem holds no PEM private key"),
            (
                {"key_file": "encrypted.key"},
                "server.tls.key_file: {pki}/encrypted.key is protected by a passphrase, which grpc cannot use",
            ),
        ],
        ids=["mismatched-key", "swapped-files", "client-ca-not-pem", "key-not-a-key", "encrypted-key"],
    )
    async def test_an_unusable_tls_file_is_a_config_error_naming_its_field(
        self, shared_pki: Path, files: dict[str, str], message: str
    ) -> None:
        pki = shared_pki
        config = mtls_config(pki)
        config["server"]["tls"].update({field: str(pki / name) for field, name in files.items()})
        with pytest.raises(ConfigError) as caught:
            Server(settings_from(config, {}), port=0)
        assert caught.value.message == message.format(pki=pki)
        assert "PRIVATE KEY" not in caught.value.message

    async def test_a_1024_bit_server_key_grpc_serves_is_not_refused(
        self, shared_pki: Path, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A server certificate with a 1024-bit RSA key, which OpenSSL 3's default security level
        refuses but grpc binds and handshakes with, starts and answers over TLS (the check refused
        it, saying the key file held no PEM private key)."""
        pki = shared_pki
        _openssl("req", "-newkey", "rsa:1024", "-nodes", "-keyout", str(tmp_path / "weak.key"),
                 "-out", str(tmp_path / "weak.csr"), "-subj", "/CN=weak", cwd=pki)  # fmt: skip
        _openssl("x509", "-req", "-in", str(tmp_path / "weak.csr"), "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", str(tmp_path / "weak.pem"), "-days", "2", "-extfile", "server.ext",
                 cwd=pki)  # fmt: skip
        config = default_config()
        config["server"] = {"tls": {"cert_file": str(tmp_path / "weak.pem"), "key_file": str(tmp_path / "weak.key")}}
        async with Server(settings_from(config, live_environ(fake)), port=0) as server:
            credentials = tls_credentials(str(pki / "ca.pem"))
            async with RouterClient(f"localhost:{server.port}", credentials=credentials) as client:
                decision = await client.route(user_chat("hello"))
        assert decision.model

    def test_serve_with_a_mismatched_key_says_so_and_not_that_the_port_is_in_use(
        self, shared_pki: Path, tmp_path: Path
    ) -> None:
        """The process: one ``error:`` line naming the key file, exit 2 (it blamed the port)."""
        pki = shared_pki
        config = mtls_config(pki)
        config["server"]["tls"]["key_file"] = str(pki / "stranger.key")
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "routesvc", "serve", "--config", str(path), "--port", "0"],
            cwd=REPO,
            env=process_environ(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [
            f"error: server.tls.key_file: the key in {pki}/stranger.key does not match the certificate of"
            " server.tls.cert_file"
        ]


class TestClientTenantsReload:
    async def test_a_reload_applies_client_tenants_at_once_and_the_credentials_at_a_restart(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """``client_tenants`` is read again by a hot reload: a certificate mapped to another tenant
        is that tenant from the next call, one whose mapping is removed needs a key, and the
        reload does not say it waits for a restart; a changed ``cert_file`` (the server's
        credentials, built at start) does, by its own name."""
        pki = make_pki(tmp_path)
        config = mtls_config(pki)
        moved = copy.deepcopy(config)
        moved["server"]["tls"]["client_tenants"] = {"acme-client": "globex"}
        removed = copy.deepcopy(config)
        removed["server"]["tls"]["client_tenants"] = {}
        removed["server"]["tls"]["cert_file"] = str(shutil.copy(pki / "server.pem", pki / "renewed.pem"))
        environ = live_environ(fake)
        async with Server(settings_from(config, environ), port=0) as server:
            with capture_logs() as logs:
                await server.reload(settings_from(moved, environ))
                async with _client(server, pki, "acme-client") as client:
                    decision = await client.route(user_chat("hi"), pb.RoutingContext(user_tier="premium"))
                await server.reload(settings_from(removed, environ))
                async with _client(server, pki, "acme-client") as client:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await client.route(user_chat("hi"))
        assert decision.model == "gpt-4o"  # globex has no allowed_models
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        waiting = [entry["fields"] for entry in logs if entry["event"] == "config_reload_needs_restart"]
        assert waiting == [["server.tls.cert_file"]]


class TestHealthPort:
    """``server.health_port``: health alone, in plaintext, beside a TLS port, for probes that cannot
    speak TLS (Kubernetes' gRPC probes, Docker's HEALTHCHECK)."""

    @pytest.fixture
    async def tls_server(self, tmp_path: Path, fake: FakeProvider) -> AsyncIterator[Server]:
        pki = make_pki(tmp_path)
        config = default_config()
        config["server"] = {
            "tls": {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")},
            "health_port": 0,
        }
        async with Server(settings_from(config, live_environ(fake)), port=0) as server:
            yield server

    async def test_a_plaintext_probe_sees_serving_where_the_tls_port_refuses_it(self, tls_server: Server) -> None:
        async with loopback_channel(tls_server.health_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE_NAME):
                response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
        async with loopback_channel(tls_server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_the_health_port_serves_nothing_else(self, tls_server: Server) -> None:
        """Route in plaintext on the health port is UNIMPLEMENTED: it is not a way around TLS."""
        async with RouterClient(tls_server.health_target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hello"), pb.RoutingContext())
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_a_drain_turns_the_health_port_not_serving(self, tls_server: Server) -> None:
        assert await health_across_drain(tls_server, tls_server.health_target) == (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def test_the_health_port_must_be_another_port(self) -> None:
        config = default_config()
        config["server"] = {"port": 50051, "health_port": 50051}
        with pytest.raises(ConfigError, match="server: health_port must differ from port"):
            settings_from(config, {})

    @pytest.mark.parametrize("reuse_port", [False, True], ids=["one-process", "worker"])
    async def test_a_serving_port_given_at_start_must_not_be_the_health_port(self, reuse_port: bool) -> None:
        """``serve --port`` (or a worker's shared port) equal to health_port is refused before
        anything is bound: with SO_REUSEPORT both servers would take the port and split the calls."""
        free = free_port()
        config = default_config()
        config["server"] = {"port": 0, "health_port": free}
        with pytest.raises(ConfigError, match=rf"^server.health_port: {free} is the serving port too"):
            Server(settings_from(config, {}), port=free, reuse_port=reuse_port)
        with socket.socket() as again:  # nothing was left bound
            again.bind(("127.0.0.1", free))

    async def test_a_health_port_in_use_is_a_config_error_naming_it(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config = default_config()
            config["server"] = {"health_port": taken.getsockname()[1]}
            with socket.socket() as serving:
                serving.bind(("127.0.0.1", 0))
                serving_port = serving.getsockname()[1]
            with pytest.raises(ConfigError, match=r"^server.health_port: cannot listen on 127.0.0.1:\d+ "):
                Server(settings_from(config, {}), port=serving_port)
        with socket.socket() as again:  # the serving port was not left bound
            again.bind(("127.0.0.1", serving_port))
