"""Faults in the network (a fault-injecting TCP proxy between us and the provider), slow
consumers (RELIABILITY 18), and resources returning to baseline after faults (RELIABILITY 23)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict, WrappedLogger

from routesvc.client import RouterClient
from routesvc.ledger import AttemptOutcome
from routesvc.server import Server
from routesvc.testing import FakeProvider, Fault, FaultProxy, NetworkFault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import default_config, live_environ, loopback_channel, settings_from, user_chat
from tests.observability import observed_server
from tests.test_validation import error_info


@pytest.fixture
async def proxied(fake: FakeProvider, request: pytest.FixtureRequest) -> AsyncIterator[tuple[FaultProxy, RouterClient]]:
    """The service reaching the fake provider only through a FaultProxy. First-token timer 5 s,
    or ``first_token_timeout_seconds`` by indirect parametrization (a short one would also cut a
    cold first stream through the proxy on a loaded machine, in tests that are not about it)."""
    first_token = getattr(request, "param", {}).get("first_token_timeout_seconds", 5.0)
    async with FaultProxy("127.0.0.1", fake.port) as proxy:
        environ = {**live_environ(fake), "OPENAI_BASE_URL": f"{proxy.base_url}/v1"}
        config = default_config()
        config["reliability"] = {"first_token_timeout_seconds": first_token, "max_attempts": 1}
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            yield proxy, client


class TestNetworkFaults:
    async def test_a_connection_reset_mid_stream_ends_committed(
        self, proxied: tuple[FaultProxy, RouterClient], fake: FakeProvider
    ) -> None:
        """RST after ~3 KB of a 100-chunk stream: the deltas that arrived, in order, then UNAVAILABLE
        with a committed trailer counting exactly them."""
        proxy, client = proxied
        proxy.fault = NetworkFault(reset_after_bytes=3_000)
        fake.enqueue(Script(chunk_count=100, chunk_delay=0.005))
        received: list[str] = []

        async def read() -> None:
            async for message in client.complete(user_chat("hi")):
                if message.WhichOneof("event") == "delta":
                    received.append(message.delta.text)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read()
        assert 0 < len(received) < 100
        assert received == [f"chunk-{i} " for i in range(len(received))]
        assert error_info(caught.value).reason == "STREAM_INTERRUPTED"
        assert dict(caught.value.trailing_metadata() or ())["routesvc-chunks-sent"] == str(len(received))
        assert proxy.faults_injected == 1

    @pytest.mark.parametrize("proxied", [{"first_token_timeout_seconds": 0.5}], indirect=True)
    async def test_a_black_hole_times_out_on_the_first_token(self, proxied: tuple[FaultProxy, RouterClient]) -> None:
        """A network that accepts and never answers: UNAVAILABLE after first_token_timeout_seconds."""
        proxy, client = proxied
        proxy.fault = NetworkFault(blackhole=True)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.complete(user_chat("hi")):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # Not before the timer; after it only by a loaded machine's slack (nothing else would end it).
        assert 0.5 <= time.monotonic() - started < 0.5 + 2.5

    async def test_the_first_token_timer_runs_from_the_call_through_anthropics_input_report(
        self, fake: FakeProvider
    ) -> None:
        """first_token_timeout_seconds 1: Anthropic's message_start (the input report) comes 0.5 s
        late and the first text 0.8 s after it: the call stalls at 1 s from its start, as an
        OpenAI stream would (the timer started again at the input report, and the text, 1.3 s
        after the call, was taken)."""
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(delay_per_chunk=0.5)
            config = default_config()
            config["reliability"] = {"first_token_timeout_seconds": 1.0, "retries_per_model": 0}
            config["routing"]["fallbacks"] = {}  # type: ignore[index]
            environ = {"ANTHROPIC_API_KEY": "sk-test-anthropic", "ANTHROPIC_BASE_URL": proxy.base_url}
            fake.enqueue(Script(text="late first token", first_chunk_delay=0.8), model="claude-sonnet-4-6")
            async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in client.complete(user_chat("hi"), pb.RoutingContext(model="claude-sonnet")):
                        pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sent no chunk for 1 s" in (caught.value.details() or "")

    async def test_a_slow_network_is_not_a_stall(
        self, proxied: tuple[FaultProxy, RouterClient], fake: FakeProvider
    ) -> None:
        """20 ms per network chunk, under the timers: the whole answer arrives."""
        proxy, client = proxied
        proxy.fault = NetworkFault(delay_per_chunk=0.02)
        fake.enqueue(Script(chunk_count=20, chunk_delay=0.01))
        messages = [m async for m in client.complete(user_chat("hi"))]
        assert messages[-1].completion.usage.output_tokens == 20


class TestSlowConsumer:
    async def test_a_slow_reader_holds_back_its_provider_and_nobody_else(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A client reading one 16 KiB chunk per 20 ms: the provider is held back by flow control (it
        cannot push the whole 32 MiB answer into our memory), while another stream completes at once."""
        big = "x" * 16_384
        fake.enqueue(Script(chunks=(big,) * 2_000), model="gpt-4o")
        fake.enqueue(Script(chunk_count=50), model="gpt-4o-mini")
        slow = live_client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o"))
        read = 0
        async for message in slow:
            read += message.WhichOneof("event") == "delta"
            if read >= 25:
                break
            await asyncio.sleep(0.02)
        started = time.monotonic()
        fast = [m async for m in live_client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o-mini"))]
        fast_seconds = time.monotonic() - started
        slow_record = next(r for r in fake.requests if r.model == "gpt-4o")
        pushed = slow_record.chunks_sent
        await slow.aclose()
        assert fast[-1].WhichOneof("event") == "completion"
        assert fast_seconds < 2.0
        assert pushed < 1_000, f"the provider pushed {pushed} of 2000 chunks for a reader that took {read}"

    async def test_a_caller_that_stops_reading_is_ended_and_frees_what_it_held(self, fake: FakeProvider) -> None:
        """A raw gRPC caller opens Complete with no deadline, reads the decision and nothing more:
        once a write has waited client_write_timeout_seconds (0.3) the server ends the call
        DEADLINE_EXCEEDED, reason CLIENT_STALLED (logged, a span event and a metric), closes the
        provider request, charges the attempt once (estimated, as a cancel), and frees the
        server's only RPC slot and the tenant's only concurrency reservation, so the tenant's
        next call is served. A caller that reads on gets that status with the committed trailers."""
        config = default_config()
        config["reliability"] = {"max_concurrent_rpcs": 1, "client_write_timeout_seconds": 0.3}
        config["tenants"] = {"mallory": {"max_concurrent": 1}}
        tenant = pb.RoutingContext(tenant="mallory")
        fake.enqueue(Script(chunks=("x" * 16_384,) * 600))  # ~10 MB: far more than the windows hold
        finished = asyncio.Event()

        def notify(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
            if event["event"] == "rpc_finished" and event.get("request_id") == "stalled":
                finished.set()
            return event

        # A 64 KiB receive window that never grows, so the server's writes wait soon.
        options = [("grpc.http2.lookahead_bytes", 65_536), ("grpc.http2.bdp_probe", 0)]
        async with (
            observed_server(fake, config=config) as observed,
            loopback_channel(observed.server.target, options=options) as channel,
        ):
            stub = pb_grpc.RouterServiceStub(channel)
            with capture_logs(processors=[notify]) as logs:
                call = stub.Complete(
                    pb.CompleteRequest(chat=user_chat("write a lot"), context=tenant),
                    metadata=(("x-request-id", "stalled"),),
                )
                decision = (await call.read()).decision
                async with asyncio.timeout(10):
                    await finished.wait()
            (line,) = [e for e in logs if e["event"] == "rpc_finished" and e["request_id"] == "stalled"]
            await fake.requests[-1].wait_ended(timeout=5.0)
            (entry,) = observed.server.router.ledger.entries(decision.decision_id)
            assert (line["code"], line["error_reason"]) == ("DEADLINE_EXCEEDED", "CLIENT_STALLED")
            assert fake.requests[-1].aborted
            assert (entry.outcome, entry.estimated) == (AttemptOutcome.CANCELLED, True)
            assert [p.value for p in observed.points("routesvc.client_stalls")] == [1]
            (span,) = observed.named("routesvc.v1.RouterService/Complete")
            assert [event.name for event in span.events] == ["routesvc.client_stalled"]
            assert observed.server._service.calls_in_flight() == frozenset()

            # The slot and the reservation are free: the tenant's next call is served.
            fake.enqueue(Script(chunk_count=3))
            answer = [m async for m in observed.client.complete(user_chat("hi"), tenant)]
            assert answer[-1].WhichOneof("event") == "completion"

            received: list[pb.CompleteResponse] = []

            async def read_on() -> None:
                while (message := await call.read()) is not grpc.aio.EOF:
                    received.append(message)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_on()
        deltas = sum(1 for message in received if message.WhichOneof("event") == "delta")
        trailers = dict(caught.value.trailing_metadata() or ())
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "CLIENT_STALLED",
        )
        assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", str(deltas))

    async def test_a_stalled_calls_slot_is_free_while_its_status_waits(self, fake: FakeProvider) -> None:
        """Once the server gives up on a caller that stopped reading (CLIENT_STALLED, after
        client_write_timeout_seconds) its status waits behind the unread messages as long again;
        the call holds nothing meanwhile, so the server's only RPC slot is free: the next call is
        served before the stalled one has ended (it was refused OVERLOADED until then, twice the
        timeout in all)."""
        config = default_config()
        config["reliability"] = {"max_concurrent_rpcs": 1, "client_write_timeout_seconds": 1.0}
        fake.enqueue(Script(chunks=("x" * 16_384,) * 600))  # ~10 MB: far more than the windows hold
        finished = asyncio.Event()

        def notify(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
            if event["event"] == "rpc_finished" and event.get("request_id") == "stalled":
                finished.set()
            return event

        options = [("grpc.http2.lookahead_bytes", 65_536), ("grpc.http2.bdp_probe", 0)]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
            loopback_channel(server.target, options=options) as channel,
        ):
            stub = pb_grpc.RouterServiceStub(channel)
            with capture_logs(processors=[notify]):
                call = stub.Complete(
                    pb.CompleteRequest(chat=user_chat("write a lot")), metadata=(("x-request-id", "stalled"),)
                )
                assert [(await call.read()).WhichOneof("event") for _ in range(2)] == ["decision", "delta"]
                # The server gave up on the caller: it closed the provider request.
                await fake.requests[-1].wait_ended(timeout=10.0)
                fake.enqueue(Script(chunk_count=3))
                served_while_stalled_call_ends = False
                while not finished.is_set():
                    try:
                        answer = [m async for m in client.complete(user_chat("hi"))]
                    except grpc.aio.AioRpcError as refused:
                        if error_info(refused).reason != "OVERLOADED":
                            raise
                        await asyncio.sleep(0.02)
                        continue
                    assert answer[-1].WhichOneof("event") == "completion"
                    served_while_stalled_call_ends = not finished.is_set()
                    break
            call.cancel()
        assert served_while_stalled_call_ends


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestResourcesReturnToBaseline:
    async def test_faults_and_cancels_leave_no_tasks_or_descriptors_behind(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """After 200 requests mixing cuts, resets, 503s, hangs and client cancels, the asyncio tasks
        and open descriptors are back to what they were after warm-up."""
        for _ in range(10):
            [m async for m in live_client.complete(user_chat("warm up"))]
        await asyncio.sleep(0.2)
        tasks, fds = len(asyncio.all_tasks()), _fds()
        faults = [
            Script(chunk_count=20, fault=Fault.CUT, fault_after=5),
            Script(chunk_count=20, fault=Fault.RESET, fault_after=5),
            Script(status=503),
            Script(chunk_count=20, chunk_delay=0.01),
            Script(chunk_count=20),
        ]
        for index in range(200):
            fake.enqueue(faults[index % len(faults)])
            stream = live_client.complete(user_chat("hi"))
            try:
                async for message in stream:
                    if index % 5 == 3 and message.WhichOneof("event") == "delta":
                        break  # a client cancel mid-stream
            except grpc.aio.AioRpcError:
                pass
            finally:
                await stream.aclose()
        for _ in range(50):
            if len(asyncio.all_tasks()) <= tasks and _fds() <= fds + 4:
                break
            await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) <= tasks
        assert _fds() <= fds + 4  # keep-alive pools may hold a few more sockets, never one per request
