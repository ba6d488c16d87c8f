"""routesvc.client.RouterClient against the real in-process server: the deadlines a call gets when
its caller gives none, and what a Complete stream tells of its call."""

from __future__ import annotations

import socket

import grpc
import pytest

from routesvc.client import DEFAULT_STREAM_TIMEOUT, DEFAULT_TIMEOUT, RouterClient, is_loopback_target, tls_credentials
from routesvc.errors import ConfigError
from routesvc.server import Server
from routesvc.testing import FakeProvider, Script
from tests.conftest import user_chat
from tests.proxies import ConnectProxy


class TestDefaultDeadlines:
    def test_the_defaults_are_those_of_the_other_clients(self) -> None:
        """30 s for a unary call, 5 minutes for a whole Complete stream, as the Go, Java and
        TypeScript clients have."""
        assert (DEFAULT_TIMEOUT, DEFAULT_STREAM_TIMEOUT) == (30.0, 300.0)

    async def test_a_call_without_a_timeout_gets_the_default(self) -> None:
        """A call given no ``timeout`` ends at the client's ``default_timeout``: against a server
        that never answers (TCP accepted, no HTTP/2) it is DEADLINE_EXCEEDED, where without a
        deadline it would wait for the connection to fail."""
        with socket.create_server(("127.0.0.1", 0)) as silent:
            port = silent.getsockname()[1]
            async with RouterClient(f"127.0.0.1:{port}", default_timeout=0.2) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.get_stats()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_a_timeout_given_replaces_the_default(self) -> None:
        """A call given a ``timeout`` has that deadline, not the default."""
        with socket.create_server(("127.0.0.1", 0)) as silent:
            port = silent.getsockname()[1]
            async with RouterClient(f"127.0.0.1:{port}", default_timeout=600) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.list_models(timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_a_complete_without_a_timeout_ends_at_the_default_stream_deadline(
        self, fake: FakeProvider, live_server: Server
    ) -> None:
        """A Complete given no ``timeout`` is bounded by ``default_stream_timeout``: a provider
        slower than it ends the stream DEADLINE_EXCEEDED."""
        fake.enqueue(Script(first_chunk_delay=10.0))
        async with RouterClient(live_server.target, default_stream_timeout=0.5) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("Say hello slowly")):
                    pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_none_turns_a_default_off(self, server: Server) -> None:
        """``default_timeout=None``: a call given no ``timeout`` has no deadline (and succeeds)."""
        async with RouterClient(server.target, default_timeout=None) as client:
            assert await client.list_models()

    @pytest.mark.parametrize("name", ["default_timeout", "default_stream_timeout"])
    @pytest.mark.parametrize("value", [0, -1.0])
    def test_a_default_not_above_zero_is_refused(self, name: str, value: float) -> None:
        """A default deadline of zero or less is a ``ValueError`` naming it (None is how to turn it off)."""
        with pytest.raises(ValueError, match=name):
            RouterClient("127.0.0.1:1", **{name: value})  # type: ignore[arg-type]


class TestPlaintextApiKey:
    """The CLI's client is plaintext unless given credentials; its API key goes in the clear only
    to this host, or where the caller says so."""

    @pytest.mark.parametrize("target", ["192.0.2.1:50051", "routesvc.example:443", "dns:///routesvc.example:443"])
    def test_a_key_over_plaintext_to_another_host_is_refused(self, target: str) -> None:
        """``api_key`` without credentials to a host other than this one is a ``ConfigError``
        naming the target and the ways out, before anything is sent."""
        with pytest.raises(ConfigError, match=f"plaintext to {target}: connect over TLS"):
            RouterClient(target, api_key="secret")

    @pytest.mark.parametrize(
        "target",
        [
            "localhost:50051",
            "127.0.0.1:50051",
            "127.8.9.10:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
            "dns:///localhost:1",
            "ipv4:127.0.0.1:1,127.0.0.2:2",
            "unix:/run/r",
        ],
    )
    async def test_a_key_over_plaintext_to_this_host_is_allowed(self, target: str) -> None:
        """Loopback addresses, ``localhost`` and unix sockets take a key over plaintext."""
        async with RouterClient(target, api_key="secret"):
            pass

    @pytest.mark.parametrize(
        "target",
        [
            "ipv4:127.0.0.1:1,192.0.2.2:2",
            "ipv6:[::1]:1,[2001:db8::2]:2",
            "dev.localhost:1",
            "dns:///dev.localhost:1",
            "dns://192.0.2.53/localhost:1",
        ],
    )
    def test_a_target_that_may_reach_another_host_is_not_this_host(self, target: str) -> None:
        """Every address of a list must be this host (gRPC falls through to the next one), and a
        name other than ``localhost`` is not trusted, whatever it ends in (``dev.localhost`` can
        resolve anywhere); nor is ``localhost`` resolved by a DNS server the target names."""
        assert is_loopback_target(target) is False

    def test_localhost_is_this_host_only_if_it_resolves_to_loopback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``localhost`` is trusted by what it resolves to: one address elsewhere refuses the key."""
        real = socket.getaddrinfo
        elsewhere = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", 0))

        def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[object]:
            return [*real(host, *args, **kwargs), elsewhere]  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        with pytest.raises(ConfigError, match="plaintext to localhost:50051: connect over TLS"):
            RouterClient("localhost:50051", api_key="secret")

    async def test_insecure_or_credentials_allow_a_key_to_another_host(self) -> None:
        """``insecure=True`` is the caller's explicit choice of plaintext; with credentials it is TLS."""
        async with RouterClient("192.0.2.1:50051", api_key="secret", insecure=True):
            pass
        async with RouterClient("192.0.2.1:50051", api_key="secret", credentials=tls_credentials()):
            pass

    async def test_a_key_trusted_to_this_host_never_goes_through_a_proxy(
        self, server: Server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """gRPC tunnels plaintext through a proxy the environment names, loopback targets included;
        a key sent in the clear because the target is this host goes straight to it, and the
        proxy (here a listener that records who connects) sees nothing."""
        with socket.create_server(("127.0.0.1", 0)) as proxy:
            proxy.setblocking(False)
            for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("grpc_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
            async with RouterClient(server.target, api_key="secret", default_timeout=5) as client:
                assert await client.list_models()
            with pytest.raises(BlockingIOError):
                proxy.accept()

    @pytest.mark.parametrize("variable", ["grpc_proxy", "https_proxy", "http_proxy"])
    @pytest.mark.parametrize(("api_key", "insecure"), [(None, False), ("secret", True)], ids=["no key", "insecure key"])
    async def test_a_call_to_this_host_never_goes_through_a_proxy(
        self, server: Server, monkeypatch: pytest.MonkeyPatch, variable: str, api_key: str | None, insecure: bool
    ) -> None:
        """A loopback target is dialled directly whatever proxy the environment names, with no key
        (``routesvc models`` behind a corporate proxy) and with a key under ``insecure=True``: a
        relaying CONNECT proxy is asked for no tunnel and carries nothing, and the call succeeds."""
        async with ConnectProxy() as proxy:
            for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy", "grpc_proxy", "https_proxy", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv(variable, proxy.url)
            async with RouterClient(server.target, api_key=api_key, insecure=insecure, default_timeout=5) as client:
                assert await client.list_models()
            assert (proxy.requests, bytes(proxy.relayed)) == ([], b"")

    async def test_a_call_to_another_host_takes_the_environments_proxy(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only this host is exempt: plaintext to another host (``insecure=True``, key included,
        the caller's choice) goes through the proxy the environment names, as gRPC does, since
        it may be the only way there."""
        async with ConnectProxy() as proxy:
            for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy", "grpc_proxy", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("https_proxy", proxy.url)
            async with RouterClient("192.0.2.1:50051", api_key="secret", insecure=True, default_timeout=1) as client:
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.list_models()
            assert proxy.requests == [b"CONNECT 192.0.2.1:50051 HTTP/1.1"]

    async def test_no_key_no_refusal(self) -> None:
        """Without a key there is nothing to protect: plaintext to any host is allowed."""
        async with RouterClient("192.0.2.1:50051"):
            pass


class TestCompleteStreamMetadata:
    async def test_the_request_id_is_in_the_streams_initial_and_trailing_metadata(
        self, live_client: RouterClient
    ) -> None:
        """After a successful Complete the stream gives its call's initial and trailing metadata,
        each with the x-request-id the caller sent."""
        async with live_client.complete(user_chat("Say hello"), metadata={"x-request-id": "py-client-7f3a"}) as stream:
            kinds = [message.WhichOneof("event") async for message in stream]
            initial = dict(await stream.initial_metadata() or ())
            trailing = dict(await stream.trailing_metadata() or ())
        assert kinds[-1] == "completion"
        assert (initial["x-request-id"], trailing["x-request-id"]) == ("py-client-7f3a", "py-client-7f3a")
