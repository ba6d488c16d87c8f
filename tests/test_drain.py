"""Graceful drain (RELIABILITY 15): health flips, short streams finish, long ones end with the
committed trailer before the grace period is over."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routesvc.client import RouterClient
from routesvc.server import Server
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat
from tests.test_validation import error_info


class TestDrain:
    async def test_shutdown_with_streams_in_flight(self, fake: FakeProvider) -> None:
        """drain 0.3 s, grace 1.5 s: a 0.5 s stream completes, a 20 s one ends UNAVAILABLE committed."""
        config = default_config()
        config["server"] = {"drain_delay_seconds": 0.3, "grace_seconds": 1.5}
        server = Server(settings_from(config, live_environ(fake)), port=0)
        await server.start()
        fake.enqueue(Script(chunk_count=10, chunk_delay=0.05), model="gpt-4o-mini")
        fake.enqueue(Script(chunk_count=2000, chunk_delay=0.01), model="gpt-4o")
        async with RouterClient(server.target) as client, grpc.aio.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            async def short() -> str:
                messages = [m async for m in client.complete(user_chat("hi"))]
                return str(messages[-1].WhichOneof("event"))

            async def long() -> tuple[int, grpc.aio.AioRpcError | None]:
                chunks = 0
                try:
                    async for message in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o")):
                        chunks += message.WhichOneof("event") == "delta"
                except grpc.aio.AioRpcError as error:
                    return chunks, error
                return chunks, None

            short_task = asyncio.create_task(short())
            long_task = asyncio.create_task(long())
            while len(fake.requests) < 2:  # noqa: ASYNC110 - the fake has no arrival event
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            started = loop.time()
            closing = asyncio.create_task(server.aclose())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await short_task == "completion"
            chunks, error = await long_task
            await closing
            elapsed = loop.time() - started
        assert error is not None
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        trailers = dict(error.trailing_metadata() or ())
        assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", str(chunks))
        assert 0 < chunks < 2000
        assert elapsed < 0.3 + 1.5 + 0.5
