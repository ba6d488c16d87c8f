"""Property-based tests (RELIABILITY 17 and 19): whatever the request bytes or the provider's
stream, every outcome is an expected status, never UNKNOWN or INTERNAL, and nothing hangs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routesvc.config import LimitsConfig
from routesvc.errors import InvalidRequest, RequestTooLarge
from routesvc.server import Server
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from routesvc.wire import routing_request
from tests.conftest import default_config, live_environ, loopback_sync_channel, settings_from

CANARY = "prop-canary-93b1"

roles = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(min_value=-5, max_value=99))
contents = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.just(CANARY))
messages = st.builds(pb.Message, role=roles, content=contents)
tools = st.builds(
    pb.Tool,
    name=st.one_of(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), st.text(max_size=70)),
    parameters_json=st.one_of(st.just(""), st.just("{}"), st.just('{"type":"object"}'), st.text(max_size=20)),
)


@st.composite
def chats(draw: st.DrawFn) -> pb.ChatRequest:
    chat = pb.ChatRequest(messages=draw(st.lists(messages, max_size=5)), tools=draw(st.lists(tools, max_size=3)))
    if draw(st.booleans()):
        chat.max_output_tokens = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    if draw(st.booleans()):
        chat.temperature = draw(st.floats(allow_nan=True, allow_infinity=True))
    return chat


@st.composite
def contexts(draw: st.DrawFn) -> pb.RoutingContext:
    context = pb.RoutingContext(
        tenant=draw(st.text(max_size=8)),
        user_tier=draw(st.sampled_from(["", "premium", "free"])),
        task_hint=draw(st.sampled_from(["", "code_generation", "creative_writing", "nonsense"])),
        max_cost_usd=draw(st.one_of(st.just(""), st.just("0.01"), st.just("-1"), st.just("NaN"), st.text(max_size=6))),
        model=draw(st.sampled_from(["", "gpt-4o", "nope"])),
        metadata=draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    )
    if draw(st.booleans()):
        context.realtime = draw(st.booleans())
    return context


class TestValidationProperties:
    @settings(max_examples=300, deadline=None)
    @given(chat=chats(), context=contexts())
    def test_validation_accepts_or_names_a_field(self, chat: pb.ChatRequest, context: pb.RoutingContext) -> None:
        """Every request either converts or raises InvalidRequest / RequestTooLarge without its text."""
        try:
            routing_request(pb.RouteRequest(chat=chat, context=context), LimitsConfig())
        except InvalidRequest as error:
            assert error.field.startswith(("chat", "context"))
            assert CANARY not in error.message
        except RequestTooLarge:
            pass


class _Background:
    """A server and the fake provider on an event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake = FakeProvider()
        self.run(self.fake.start())
        self.server: Server = self.run(self._start_server())

    async def _start_server(self) -> Server:
        # grpc.aio binds a server to the loop it is created on: create it on the background loop.
        server = Server(settings_from(default_config(), live_environ(self.fake)), port=0)
        await server.start()
        return server

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=30)

    def enqueue(self, script: Script) -> None:
        self.loop.call_soon_threadsafe(self.fake.enqueue, script)

    def close(self) -> None:
        self.run(self.server.aclose())
        self.run(self.fake.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def background() -> Iterator[_Background]:
    running = _Background()
    yield running
    running.close()


@pytest.fixture(scope="module")
def stub(background: _Background) -> Iterator[pb_grpc.RouterServiceStub]:
    with loopback_sync_channel(background.server.target) as channel:
        yield pb_grpc.RouterServiceStub(channel)


EXPECTED_ROUTE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class TestOverTheWire:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(chat=chats(), context=contexts())
    def test_route_answers_an_expected_status(
        self, stub: pb_grpc.RouterServiceStub, chat: pb.ChatRequest, context: pb.RoutingContext
    ) -> None:
        """Route on any request: a decision or an expected status with no prompt text in it."""
        try:
            stub.Route(pb.RouteRequest(chat=chat, context=context), timeout=10)
        except grpc.RpcError as error:
            assert error.code() in EXPECTED_ROUTE, error.details()  # type: ignore[attr-defined]
            assert CANARY not in (error.details() or "")  # type: ignore[attr-defined]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.binary(max_size=64))
    def test_arbitrary_bytes_are_invalid_argument_or_parse(self, background: _Background, data: bytes) -> None:
        """Raw bytes on the wire: either a message that is then validated, or INVALID_ARGUMENT."""
        with loopback_sync_channel(background.server.target) as channel:
            call = channel.unary_unary("/routesvc.v1.RouterService/Route")
            try:
                call(data, timeout=10)
            except grpc.RpcError as error:
                assert error.code() in EXPECTED_ROUTE, error.details()  # type: ignore[attr-defined]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        chunks=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12),
        fault=st.sampled_from(list(Fault)),
        fault_after=st.integers(min_value=0, max_value=12),
        model=st.sampled_from(["gpt-4o-mini", "claude-sonnet"]),
    )
    def test_any_provider_stream_ends_in_the_text_or_an_expected_status(
        self,
        background: _Background,
        stub: pb_grpc.RouterServiceStub,
        chunks: list[str],
        fault: Fault,
        fault_after: int,
        model: str,
    ) -> None:
        """Arbitrary text and any fault from either wire format: the deltas are a prefix of the text in
        order, and the stream ends with a completion or UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE,
        within the deadline."""
        script = Script(chunks=tuple(chunks), fault=fault, fault_after=fault_after, hang_seconds=None)
        for _ in range(3):  # retries may ask again
            background.enqueue(script)
        received: list[str] = []
        request = pb.CompleteRequest(
            chat=pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")]),
            context=pb.RoutingContext(model=model),
        )
        try:
            for message in stub.Complete(request, timeout=3):
                if message.WhichOneof("event") == "delta":
                    received.append(message.delta.text)
                elif message.WhichOneof("event") == "completion":
                    assert "".join(received) == "".join(chunks)
        except grpc.RpcError as error:
            assert error.code() in {  # type: ignore[attr-defined]
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }, error.details()  # type: ignore[attr-defined]
            assert "".join(chunks).startswith("".join(received))
        finally:
            background.run(_drain(background.fake))


async def _drain(fake: FakeProvider) -> None:
    fake.reset()
