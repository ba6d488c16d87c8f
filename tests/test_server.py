"""The server: health, reflection, unknown methods, request ids, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from routesvc.client import RouterClient
from routesvc.server import SERVICE_NAME, Server
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import REPO, default_config, settings_from, user_chat


async def health_across_drain(server: Server, target: str, service: str = "") -> tuple[int, int]:
    """The status a plaintext Watch on ``target`` streams first, and then once ``server`` starts
    draining."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
        first = await call.read()
        closing = asyncio.create_task(server.aclose())
        second = await call.read()
        await closing
    return first.status, second.status


class TestHealth:
    async def test_serving_for_the_server_and_the_service(self, server: Server) -> None:
        """grpc.health.v1 Check says SERVING for "" and for routesvc.v1.RouterService."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE_NAME):
                response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert response.status == health_pb2.HealthCheckResponse.SERVING

    async def test_watch_sees_not_serving_on_shutdown(self, server: Server) -> None:
        """Watch streams SERVING, then NOT_SERVING when the server starts draining."""
        assert await health_across_drain(server, server.target, SERVICE_NAME) == (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )


class TestReflection:
    async def test_lists_the_services(self, server: Server) -> None:
        """Server reflection lists RouterService and health."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            async for response in responses:
                names = {service.name for service in response.list_services_response.service}
                break
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


class TestMetadata:
    async def test_unknown_method_is_unimplemented(self, server: Server) -> None:
        """A method the service does not have is UNIMPLEMENTED."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = channel.unary_unary("/routesvc.v1.RouterService/Nope")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_request_id_round_trips(self, server: Server) -> None:
        """x-request-id sent by the client comes back in initial and trailing metadata."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            from routesvc.v1 import router_pb2 as pb
            from routesvc.v1 import router_pb2_grpc as pb_grpc

            call = pb_grpc.RouterServiceStub(channel).Route(
                pb.RouteRequest(chat=user_chat("hi")), metadata=(("x-request-id", "req-123"),)
            )
            await call
            initial = dict(await call.initial_metadata())
            trailing = dict(await call.trailing_metadata())
        assert (initial["x-request-id"], trailing["x-request-id"]) == ("req-123", "req-123")

    async def test_a_request_id_is_made_when_missing(self, client: RouterClient, server: Server) -> None:
        """Without x-request-id the server makes one up and returns it."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            from routesvc.v1 import router_pb2 as pb
            from routesvc.v1 import router_pb2_grpc as pb_grpc

            call = pb_grpc.RouterServiceStub(channel).Route(pb.RouteRequest(chat=user_chat("hi")))
            await call
            assert len(dict(await call.initial_metadata())["x-request-id"]) == 32


class TestProcess:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
    def test_sigterm_exits_zero_after_logging(self, signum: signal.Signals) -> None:
        """`routesvc serve` logs JSON lines, and on SIGTERM (or SIGHUP: the session went away)
        drains and exits 0."""
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        process = subprocess.Popen(
            [sys.executable, "-m", "routesvc", "serve", "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            started = json.loads(process.stdout.readline())
            assert started["event"] == "server_started"
            process.send_signal(signum)
            assert process.wait(timeout=30) == 0
            events = [json.loads(line)["event"] for line in process.stdout.read().splitlines()]
            assert events[-2:] == ["server_draining", "server_stopped"] or events[-1] == "server_stopped"
            # Started without any provider key: said at start, once per provider and once overall.
            assert (events.count("provider_unconfigured"), events.count("no_provider_configured")) == (2, 1)
        finally:
            process.kill()


class TestHeap:
    async def test_a_serving_process_freezes_its_start_up_heap_and_again_after_a_reload(self) -> None:
        """``routesvc serve`` (``freeze_heap``) moves the objects built at start out of the cycle
        collector's reach, so a full collection no longer walks them (170 ms -> 2 ms measured),
        and refreezes after a reload; an embedded server (the default) leaves the heap alone."""
        gc.unfreeze()
        settings = settings_from(default_config())
        async with Server(settings, port=0):
            assert gc.get_freeze_count() == 0
        try:
            async with Server(settings, port=0, freeze_heap=True) as server:
                frozen = gc.get_freeze_count()
                assert frozen > 10_000
                await server.reload(settings_from(default_config()))
                assert gc.get_freeze_count() > 10_000
                async with RouterClient(server.target) as client:
                    decision = await client.route(user_chat("hi"))
                assert decision.model == "gpt-4o-mini"
        finally:
            gc.unfreeze()


class TestConnectionAge:
    async def test_clients_are_asked_to_reconnect_after_max_connection_age(self) -> None:
        """server.max_connection_age_seconds 0.5: the server closes the client's connection with a
        GOAWAY once it is that old (the channel leaves READY) and the next call reconnects, so
        long-lived clients spread over new replicas in time."""
        config = default_config()
        config["server"] = {"max_connection_age_seconds": 0.5}
        async with (
            Server(settings_from(config), port=0) as server,
            grpc.aio.insecure_channel(server.target) as channel,
        ):
            stub = pb_grpc.RouterServiceStub(channel)
            request = pb.RouteRequest(chat=user_chat("hi"))
            await stub.Route(request, timeout=5)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            async with asyncio.timeout(10):
                while channel.get_state() is grpc.ChannelConnectivity.READY:  # noqa: ASYNC110 - no state event here
                    await asyncio.sleep(0.1)
            assert (await stub.Route(request, timeout=5)).decision.model == "gpt-4o-mini"
