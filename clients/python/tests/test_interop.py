"""The Python client against a live routesvc: each test states one behaviour callers rely on."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from conftest import PINNED_MODEL, Script, Upstream
from routesvc.v1 import router_pb2 as pb
from routesvc_client import DEFAULT_STREAM_TIMEOUT, DEFAULT_TIMEOUT, RouterClient, error_info, retry_info, user_prompt


def pinned(prompt: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(chat=user_prompt(prompt), context=pb.RoutingContext(model=PINNED_MODEL))


class TestRouterClient:
    async def test_route_returns_a_decision(self, client: RouterClient) -> None:
        """Route answers with a decision naming a model, an id, an estimate and the candidates."""
        decision = await client.route(pb.RouteRequest(chat=user_prompt("Say hello")), timeout=10)
        assert decision.model
        assert decision.decision_id
        assert decision.estimated_cost_usd
        assert len(decision.candidates) > 0

    async def test_list_models_returns_the_catalog(self, client: RouterClient) -> None:
        """ListModels lists every catalog model with its prices."""
        models = await client.list_models(timeout=10)
        assert models
        assert models[0].id
        assert models[0].input_price_per_mtok

    async def test_complete_streams_decision_deltas_then_completion(self, client: RouterClient) -> None:
        """Complete yields the decision first, then only deltas, then a completion with usage and cost."""
        messages = [m async for m in client.complete(pb.CompleteRequest(chat=user_prompt("Say hello")), timeout=20)]
        kinds = [m.WhichOneof("event") for m in messages]
        assert kinds[0] == "decision"
        assert kinds[-1] == "completion"
        assert len(kinds) >= 3
        assert set(kinds[1:-1]) == {"delta"}
        completion = messages[-1].completion
        assert completion.usage.input_tokens > 0
        assert completion.usage.output_tokens > 0
        assert completion.cost_usd
        assert completion.finish_reason == pb.FINISH_REASON_STOP

    async def test_slow_provider_ends_in_deadline_exceeded(self, client: RouterClient, script: Script) -> None:
        """A provider slower than the call's deadline ends the stream with DEADLINE_EXCEEDED."""
        await script(first_chunk_delay=10.0)  # also connects: the deadline is for the provider
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in client.complete(pinned("Say hello slowly"), timeout=1):
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_a_call_without_a_timeout_gets_the_default(self, target: str) -> None:
        """A call given no ``timeout`` ends at ``default_timeout`` (30 s unless set, as in Go, Java
        and TypeScript): against a server that never answers (TCP accepted, no HTTP/2) it is
        DEADLINE_EXCEEDED, where without a deadline it would wait for the connection to fail."""
        assert (DEFAULT_TIMEOUT, DEFAULT_STREAM_TIMEOUT) == (30.0, 300.0)
        with socket.create_server(("127.0.0.1", 0)) as silent:
            port = silent.getsockname()[1]
            async with RouterClient(f"127.0.0.1:{port}", insecure=True, default_timeout=0.2) as quick:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await quick.list_models()
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_a_complete_without_a_timeout_ends_at_the_default_stream_deadline(
        self, client: RouterClient, target: str, script: Script
    ) -> None:
        """A Complete given no ``timeout`` is bounded by ``default_stream_timeout``: a provider
        slower than it ends the stream DEADLINE_EXCEEDED."""
        await script(first_chunk_delay=10.0)
        async with RouterClient(target, insecure=True, default_stream_timeout=1) as quick:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in quick.complete(pinned("Say hello slowly")):
                    pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def test_a_streams_metadata_carries_the_request_id(self, client: RouterClient) -> None:
        """After a successful Complete the stream gives its call's initial and trailing metadata,
        with the x-request-id sent."""
        request = pb.CompleteRequest(chat=user_prompt("Say hello"))
        async with client.complete(request, timeout=20, metadata={"x-request-id": "py-interop-c0de"}) as stream:
            kinds = [message.WhichOneof("event") async for message in stream]
            initial = dict(await stream.initial_metadata() or ())
            trailing = dict(await stream.trailing_metadata() or ())
        assert kinds[-1] == "completion"
        assert (initial["x-request-id"], trailing["x-request-id"]) == ("py-interop-c0de", "py-interop-c0de")

    async def test_cancel_mid_stream(self, client: RouterClient, script: Script) -> None:
        """Cancelling a call after the first delta ends it as CANCELLED on the client."""
        await script(chunk_count=100, chunk_delay=0.05)
        call = client.stub.Complete(pinned("Count slowly"), timeout=20, metadata=client.metadata())
        assert (await call.read()).WhichOneof("event") == "decision"
        assert (await call.read()).WhichOneof("event") == "delta"
        assert call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED

    async def test_leaving_an_async_with_stream_early_cancels_it_upstream(
        self, client: RouterClient, script: Script, upstream: Upstream
    ) -> None:
        """Breaking out of ``async with client.complete(...) as stream`` cancels the call when the
        block is left, so routesvc aborts the provider's request (a 5 s answer) instead of letting
        it stream on while the caller still holds the stream."""
        await script(chunk_count=100, chunk_delay=0.05)
        seen = []
        async with client.complete(pinned("Count slowly"), timeout=20) as stream:
            async for message in stream:
                seen.append(message.WhichOneof("event"))
                if message.HasField("delta"):
                    break
        recorded = await upstream()
        assert seen == ["decision", "delta"]
        assert (recorded["aborted"], recorded["completed"]) == (True, False)
        assert recorded["chunks_sent"] < 100

    async def test_aclose_cancels_a_stream_held_in_a_variable(
        self, client: RouterClient, script: Script, upstream: Upstream
    ) -> None:
        """A stream kept in a variable and left by ``break`` is cancelled by ``aclose()``: the
        provider's request is aborted while the variable still holds the stream."""
        await script(chunk_count=100, chunk_delay=0.05)
        stream = client.complete(pinned("Count slowly"), timeout=20)
        async for message in stream:
            if message.HasField("delta"):
                break
        await stream.aclose()
        recorded = await upstream()
        assert [message async for message in stream] == []
        assert (recorded["aborted"], recorded["chunks_sent"] < 100) == (True, True)

    async def test_leaving_a_bare_loop_early_cancels_it_upstream(
        self, client: RouterClient, script: Script, upstream: Upstream
    ) -> None:
        """Breaking out of ``async for message in client.complete(...)``, the stream held by
        nothing else, cancels the call as the loop is left: the provider's request is aborted."""
        await script(chunk_count=100, chunk_delay=0.05)
        seen = []
        async for message in client.complete(pinned("Count slowly"), timeout=20):
            seen.append(message.WhichOneof("event"))
            if message.HasField("delta"):
                break
        recorded = await upstream()
        assert seen == ["decision", "delta"]
        assert (recorded["aborted"], recorded["chunks_sent"] < 100) == (True, True)

    async def test_invalid_argument_carries_error_info_reason(self, client: RouterClient) -> None:
        """Empty messages are INVALID_ARGUMENT with ErrorInfo reason INVALID_REQUEST in domain routesvc."""
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.route(pb.RouteRequest(chat=pb.ChatRequest()), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(raised.value)
        assert info is not None
        assert (info.reason, info.domain) == ("INVALID_REQUEST", "routesvc")

    async def test_request_id_round_trips_in_metadata(self, client: RouterClient) -> None:
        """The x-request-id a caller sends comes back in initial and trailing metadata."""
        request_id = "py-interop-7f3a"
        call = client.stub.Route(
            pb.RouteRequest(chat=user_prompt("Say hello")),
            timeout=10,
            metadata=client.metadata({"x-request-id": request_id}),
        )
        await call
        assert dict(await call.initial_metadata()).get("x-request-id") == request_id
        assert dict(await call.trailing_metadata()).get("x-request-id") == request_id

    async def test_health_check_reports_serving(self, client: RouterClient) -> None:
        """The grpc.health.v1 check for RouterService is SERVING."""
        assert await client.health(timeout=10) == health_pb2.HealthCheckResponse.SERVING


class _Listener:
    """A TCP listener that records the bytes clients send and answers each connection like any
    HTTP/2 peer (an on-path attacker, or a plaintext endpoint) with an empty SETTINGS frame."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._open = 0
        self.idle = asyncio.Event()  # set when the last connection has closed

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self.idle.clear()
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            while data := await reader.read(65536):
                self.received.extend(data)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._open -= 1
            if not self._open:
                self.idle.set()


class _ConnectProxy:
    """An HTTP CONNECT proxy that records each tunnel asked of it and relays it, as a corporate
    proxy would: a client that goes through it still gets its answer."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.relayed = bytearray()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\r\n")
            self.requests.append(line.strip())
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            host, _, port = line.split()[1].decode().rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool) -> None:
                while data := await source.read(65536):
                    if record:
                        self.relayed.extend(data)
                    sink.write(data)
                sink.close()

            await asyncio.gather(pipe(reader, upstream_writer, True), pipe(upstream_reader, writer, False))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class TestTransport:
    @pytest.mark.parametrize("variable", ["grpc_proxy", "https_proxy", "http_proxy"])
    async def test_a_key_to_this_host_never_goes_through_a_proxy(
        self, target: str, variable: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``insecure=True`` to a loopback target dials it directly, whatever proxy the environment
        names (gRPC would tunnel it, key and all, through that proxy in the clear): the call
        succeeds, and a relaying CONNECT proxy is asked for nothing and carries nothing."""
        proxy = _ConnectProxy()
        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        async with server:
            for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy", "grpc_proxy", "https_proxy", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv(variable, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            async with RouterClient(target, api_key="interop-secret-key", insecure=True, default_timeout=10) as client:
                assert await client.list_models()
        assert (proxy.requests, bytes(proxy.relayed)) == ([], b"")

    async def test_tls_is_the_default_so_the_api_key_never_goes_out_in_cleartext(self) -> None:
        """Without ``insecure=True`` the client speaks TLS, as the Go, Java and TypeScript clients
        do: what reaches the server is a TLS handshake, never the API key in the clear."""
        listener = _Listener()
        server = await asyncio.start_server(listener, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            async with RouterClient(f"127.0.0.1:{port}", api_key="interop-secret-key", default_timeout=5) as client:
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.list_models()
            async with asyncio.timeout(10):
                await listener.idle.wait()
        assert bytes(listener.received[:2]) == b"\x16\x03"  # a TLS handshake record
        assert b"interop-secret-key" not in listener.received

    async def test_insecure_sends_the_key_over_plaintext_as_the_callers_choice(self) -> None:
        """``insecure=True`` is plaintext HTTP/2, and the caller's explicit choice to send the key
        over it (for loopback and tests, like Go's ``WithInsecure()``)."""
        listener = _Listener()
        server = await asyncio.start_server(listener, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            async with RouterClient(f"127.0.0.1:{port}", api_key="interop-secret-key", insecure=True) as client:
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.list_models(timeout=0.5)
            async with asyncio.timeout(10):
                await listener.idle.wait()
        assert bytes(listener.received).startswith(b"PRI * HTTP/2.0")
        assert b"interop-secret-key" in listener.received

    def test_insecure_with_credentials_is_refused(self) -> None:
        """``insecure=True`` together with TLS ``credentials`` is a ``ValueError``: choose one."""
        with pytest.raises(ValueError, match="insecure=True with credentials"):
            RouterClient("127.0.0.1:1", insecure=True, credentials=grpc.ssl_channel_credentials())


class TestErrorDetails:
    def test_retry_info_reads_the_delay_and_error_info_the_reason(self) -> None:
        """``retry_info`` reads the RetryInfo a RESOURCE_EXHAUSTED error carries, ``error_info`` its
        reason; an error without them has neither."""
        status = status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED, message="tenant 'a' is over its 1 requests per minute"
        )
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain="routesvc"))
        status.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=42, nanos=5 * 10**8))
        )
        error = grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        )
        bare = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        info = retry_info(error)
        assert info is not None
        assert info.retry_delay.ToMilliseconds() == 42_500
        assert getattr(error_info(error), "reason", None) == "RATE_LIMITED"
        assert (retry_info(bare), error_info(bare)) == (None, None)

    def test_a_default_timeout_not_above_zero_is_refused(self) -> None:
        """A default deadline of zero or less is a ``ValueError`` naming it (None turns it off)."""
        with pytest.raises(ValueError, match="default_stream_timeout"):
            RouterClient("127.0.0.1:1", default_stream_timeout=0)
