"""Complete: decide, call the provider through its real SDK over HTTP, stream, cost exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from decimal import Decimal

import grpc
import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict, WrappedLogger

from routesvc import wire
from routesvc.client import RouterClient
from routesvc.ledger import AttemptOutcome
from routesvc.server import Server
from routesvc.testing import DEFAULT_TEXT, FakeProvider, FakeToolCall, Fault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import (
    add_local_model,
    default_config,
    live_environ,
    loopback_channel,
    settings_from,
    until,
    user_chat,
)
from tests.observability import observed_server
from tests.test_validation import error_info

CANARY = "canary-prompt-51c2e"
COMPLETE = "routesvc.v1.RouterService/Complete"


async def _collect(
    client: RouterClient, prompt: str = "Say hello", *, timeout: float | None = None, **context: object
) -> list[pb.CompleteResponse]:
    return [m async for m in client.complete(user_chat(prompt), pb.RoutingContext(**context), timeout=timeout)]  # type: ignore[arg-type]


async def _failure(
    client: RouterClient, prompt: str = CANARY, **context: object
) -> tuple[grpc.aio.AioRpcError, list[pb.CompleteResponse]]:
    received: list[pb.CompleteResponse] = []

    async def read() -> None:
        async for message in client.complete(user_chat(prompt), pb.RoutingContext(**context)):  # type: ignore[arg-type]
            received.append(message)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read()
    return caught.value, received


def _price(model: str) -> tuple[Decimal, Decimal, Decimal]:
    spec = settings_from(default_config()).catalog.get(model)
    return spec.input_price_per_mtok, spec.output_price_per_mtok, spec.cached_input_price_per_mtok


class _GrpcErrors(logging.Handler):
    """The messages grpc's own loggers log at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _grpc_errors() -> Iterator[_GrpcErrors]:
    """What grpc's own loggers log at ERROR or above inside the block."""
    errors = _GrpcErrors()
    logging.getLogger("grpc").addHandler(errors)
    try:
        yield errors
    finally:
        logging.getLogger("grpc").removeHandler(errors)


# A 64 KiB receive window that never grows, and a connection per call (not one window shared by
# all): a late reader's messages past the window wait on flow control.
_LATE_READER_OPTIONS = [
    ("grpc.http2.lookahead_bytes", 65_536),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


async def _window_edge_sizes(fake: FakeProvider, client: RouterClient) -> range:
    """Answer sizes (characters of text) around the one whose Completion's frame is half in a
    late reader's window: the decision and the text fit, the Completion does or does not. The
    messages' sizes are measured first, on one answer."""
    window = 65_535
    measured = 65_000
    fake.enqueue(Script(chunks=("x" * measured,)))
    decision, delta, completion = await _collect(client, "a late reader")
    framed = [5 + len(message.SerializeToString()) for message in (decision, delta, completion)]
    middle = measured + window - sum(framed) + framed[2] // 2
    return range(middle - 90, middle + 91, 15)


def _with_grace(config: dict[str, object], grace: float) -> dict[str, object]:
    """``config`` with a shutdown grace of ``grace`` seconds and no drain delay."""
    config["server"] = {**dict(config.get("server") or {}), "grace_seconds": grace, "drain_delay_seconds": 0}  # type: ignore[call-overload]
    return config


def _closes_at(seconds: float) -> Callable[[Server], Awaitable[None]]:
    """A ``meanwhile`` for ``_late_readers`` that closes the server ``seconds`` after its calls
    reached it."""

    async def close(server: Server) -> None:
        await asyncio.sleep(seconds)
        await server.aclose()

    return close


async def _all_reached(fake: FakeProvider, asked: int, calls: int) -> None:
    """Wait until ``calls`` calls more than ``asked`` have reached the service (the fake has their
    requests), before a test stops the server. One reaching it after its stop began is refused
    by grpc, or cancelled before any handler runs (CANCELLED, no message): nothing logs, traces
    or counts it. A server closed 0.25 s after 13 late readers started had sometimes not taken
    the last one yet on a loaded machine (each takes it about 10 ms of the loop)."""
    await until(lambda: len(fake.requests) >= asked + calls)


async def _late_readers(
    fake: FakeProvider,
    *,
    read_at: float,
    cut: grpc.StatusCode,
    deadline: float | None = None,
    config: dict[str, object] | None = None,
    meanwhile: Callable[[Server], Awaitable[None]] | None = None,
    in_time: bool = True,
    closes: bool = False,
) -> list[EventDict]:
    """Complete calls whose clients read only ``read_at`` seconds after they start, while
    ``meanwhile`` runs: the decision and the text fit the 64 KiB stream window, the Completion
    does not, so its write waits on flow control. Where the window's edge falls depends on the
    messages' sizes, measured first; answers around it are asked for at once, each on a
    connection of its own. With a ``meanwhile`` (and no deadline), it runs, and the callers
    read, once every call has reached the service (``_all_reached``): ``read_at`` counts from
    then. Those that got their Completion must end OK everywhere (status, rpc_finished line,
    span, GetStats' ``errors``), some of them after a write held back (else this tested
    nothing); the others ``cut``. With ``in_time`` False the callers read too late
    for a Completion held back (after their deadline, or the shutdown grace): some Completion
    was handed over and the call still ``cut``, logged, traced and counted so. grpc logs no error
    either way. ``closes``: ``meanwhile`` closes the server (which then answers no GetStats).
    Returns the rpc_finished lines of the late calls."""
    # (A deadline counts from the call's start, which ``read_at`` then does not.)
    assert meanwhile is None or deadline is None
    options = _LATE_READER_OPTIONS
    reached = asyncio.Event()
    async with observed_server(fake, config=config) as observed:
        sizes = await _window_edge_sizes(fake, observed.client)

        async def late_reader(size: int) -> tuple[list[str], grpc.StatusCode, str]:
            async with loopback_channel(observed.server.target, options=options) as channel:
                request_id = f"late-reader-{size}"
                call = pb_grpc.RouterServiceStub(channel).Complete(
                    pb.CompleteRequest(chat=user_chat("a late reader")),
                    timeout=deadline,
                    metadata=(("x-request-id", request_id),),
                )
                if meanwhile is not None:
                    await reached.wait()
                await asyncio.sleep(read_at)
                kinds: list[str] = []
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for message in call:
                        kinds.append(str(message.WhichOneof("event")))
                return kinds, await call.code(), request_id

        for size in sizes:
            fake.enqueue(Script(chunks=("x" * size,)))
        with _grpc_errors() as grpc_errors:
            with capture_logs() as logs:
                asked = len(fake.requests)
                readers = asyncio.gather(*(late_reader(size) for size in sizes))
                if meanwhile is not None:
                    await _all_reached(fake, asked, len(sizes))
                    reached.set()
                    await meanwhile(observed.server)
                outcomes = await readers
                await until(lambda: sum(entry["event"] == "rpc_finished" for entry in logs) == len(sizes))
            await until(lambda: len(observed.named(COMPLETE)) == 1 + len(sizes))
            # (A server shut down answers no GetStats.)
            stats = await observed.client.get_stats() if (meanwhile is None or in_time) and not closes else None
    # Never "ExecuteBatchError raised in core by servicer method" (grpc's OK status failing to go
    # out behind a Completion its caller never read).
    assert grpc_errors.messages == []
    lines = {str(entry["request_id"]): entry for entry in logs if entry["event"] == "rpc_finished"}
    answered = [(code, lines[request_id]) for kinds, code, request_id in outcomes if kinds[-1:] == ["completion"]]
    cuts = [(code, lines[request_id]) for kinds, code, request_id in outcomes if kinds[-1:] != ["completion"]]
    assert [(code, line["code"]) for code, line in answered] == [(grpc.StatusCode.OK, "OK")] * len(answered)
    # Some Completion's write did wait for the late reader, past what ended the call: an answer
    # not held back ends in a few milliseconds.
    held = [line for _, line in answered if float(str(line["duration_ms"])) >= read_at / 3 * 1000]
    codes = [dict(span.attributes or {})["rpc.grpc.status_code"] for span in observed.named(COMPLETE)]
    if not in_time:
        # Its Completion handed to grpc (``answered_by``), its write waiting past the call's end,
        # but never taken. (One at the window's edge whose call ended at once, its status queued
        # in the transport behind the Completion's last bytes, is logged OK: grpc had sent all.)
        held = [(code, line) for code, line in cuts if float(str(line["duration_ms"])) >= 1000]
        completions = [line for _, line in held if line.get("answered_by")]
        assert completions, [(kinds, code.name) for kinds, code, _ in outcomes]
        assert [(code, line["code"]) for code, line in held] == [(cut, cut.name)] * len(held)
        assert codes.count(cut.value[0]) >= len(completions)
        # Every call ended as its caller saw it: the status of one whose text waited (grpc's stop
        # cutting it at the grace's end) was traced CANCELLED.
        assert set(codes) <= {grpc.StatusCode.OK.value[0], cut.value[0]}
        return list(lines.values())
    assert held, [(kinds, code.name) for kinds, code, _ in outcomes]
    assert [(code, line["code"]) for code, line in cuts] == [(cut, cut.name)] * len(cuts)
    assert sorted(codes) == [0] * (1 + len(answered)) + [cut.value[0]] * len(cuts)
    if stats is not None:
        assert (stats.totals.requests, stats.totals.errors) == (1 + len(sizes), len(cuts))
    return list(lines.values())


class TestStreaming:
    @pytest.mark.parametrize(
        ("context", "model", "path"),
        [
            ({}, "gpt-4o-mini", "/v1/chat/completions"),
            ({"task_hint": "creative_writing"}, "claude-sonnet", "/v1/messages"),
        ],
    )
    async def test_decision_then_every_chunk_in_order_then_usage_and_cost(
        self, live_client: RouterClient, fake: FakeProvider, context: dict[str, str], model: str, path: str
    ) -> None:
        """The stream is the decision, each chunk once and in order, then usage and exact cost."""
        chunks = tuple(f"part-{index} " for index in range(25))
        fake.enqueue(Script(chunks=chunks, input_tokens=1234, output_tokens=25))
        messages = await _collect(live_client, **context)
        kinds = [m.WhichOneof("event") for m in messages]
        assert kinds == ["decision"] + ["delta"] * 25 + ["completion"]
        assert messages[0].decision.model == model
        assert tuple(m.delta.text for m in messages[1:-1]) == chunks
        completion = messages[-1].completion
        input_price, output_price, _ = _price(model)
        expected = (1234 * input_price + 25 * output_price) / 1_000_000
        assert (completion.model, completion.usage.input_tokens, completion.usage.output_tokens) == (model, 1234, 25)
        assert Decimal(completion.cost_usd) == expected
        assert completion.finish_reason == pb.FINISH_REASON_STOP
        assert fake.requests[-1].path == path

    async def test_cached_tokens_are_billed_at_the_cached_price(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Provider-reported cached tokens are counted in usage and priced lower."""
        fake.enqueue(Script(input_tokens=1000, cached_input_tokens=600, output_tokens=10))
        completion = (await _collect(live_client))[-1].completion
        input_price, output_price, cached_price = _price("gpt-4o-mini")
        assert completion.usage.cached_input_tokens == 600
        assert Decimal(completion.cost_usd) == (400 * input_price + 600 * cached_price + 10 * output_price) / 1_000_000

    async def test_anthropic_cached_tokens_are_added_to_input(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic reports cache reads apart; usage counts them as input and prices them cached."""
        fake.enqueue(Script(input_tokens=1000, cached_input_tokens=600, output_tokens=10))
        completion = (await _collect(live_client, model="claude-sonnet"))[-1].completion
        input_price, output_price, cached_price = _price("claude-sonnet")
        assert (completion.usage.input_tokens, completion.usage.cached_input_tokens) == (1000, 600)
        assert Decimal(completion.cost_usd) == (400 * input_price + 600 * cached_price + 10 * output_price) / 1_000_000

    @pytest.mark.parametrize(
        ("context", "script"),
        [
            # The usage on the finish chunk, no usage-only chunk (Gemini's OpenAI-compatible endpoint).
            ({}, Script(usage_on_finish=True, fault=Fault.ERROR_EVENT, fault_at_end=True)),
            ({"model": "claude-sonnet"}, Script(fault=Fault.ERROR_EVENT, fault_at_end=True)),
        ],
        ids=["openai_usage_on_finish", "anthropic_after_message_delta"],
    )
    async def test_an_error_once_the_answer_and_its_usage_came_bills_the_usage_reported(
        self, live_client: RouterClient, fake: FakeProvider, context: dict[str, str], script: Script
    ) -> None:
        """The finish and the usage came, then an error event before the stream's terminator
        (``[DONE]``, ``message_stop``): the Completion is OK with the usage reported and its exact
        cost (UNAVAILABLE after the whole answer, an estimate billed)."""
        fake.enqueue(replace(script, input_tokens=1234, output_tokens=25))
        messages = await _collect(live_client, **context)
        _assert_whole_at_the_usage_reported(messages, fake)

    async def test_an_anthropic_body_held_open_after_message_delta_ends_ok_with_the_usage_reported(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """``message_delta`` (stop reason, final usage) came, then the body is held open without
        ``message_stop``: the Completion is OK, soon, with the usage reported and its exact cost
        (the caller waited the idle timeout, or its deadline, and got an error, an estimate billed)."""
        fake.enqueue(Script(fault=Fault.HANG, fault_at_end=True, input_tokens=1234, output_tokens=25))
        started = time.monotonic()
        messages = await _collect(live_client, timeout=10.0, model="claude-sonnet")
        assert time.monotonic() - started < 5.0
        _assert_whole_at_the_usage_reported(messages, fake)

    async def test_length_finish_reason(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """A truncated answer reports FINISH_REASON_LENGTH."""
        fake.enqueue(Script(finish_reason="length"))
        assert (await _collect(live_client))[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH

    async def test_an_empty_finish_reason_on_every_chunk_is_no_finish(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Ollama, SGLang and KoboldCpp send ``"finish_reason": ""`` on every unfinished chunk: the
        stream is read to its real end, however slow the model (the first gap over a second ended
        it: the answer cut to what had come, OK, FINISH_REASON_OTHER, usage estimated)."""
        fake.enqueue(Script(unfinished_finish_reason="", chunks=("Hello ", "slow ", "world"), chunk_delay=1.2))
        messages = await _collect(live_client)
        assert "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta") == "Hello slow world"
        completion = messages[-1].completion
        assert (completion.finish_reason, completion.usage.output_tokens) == (pb.FINISH_REASON_STOP, 3)

    async def test_usage_on_every_chunk_still_waits_for_the_usage_chunk(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A server that puts the usage so far on every chunk (vLLM's ``continuous_usage_stats``)
        still sends the whole usage last: it is waited for as when only the last chunk has one
        (0.1 s after the finish chunk was waited: the finish chunk's partial count was billed)."""
        fake.enqueue(Script(continuous_usage=True, usage_delay=0.3, output_tokens=30))
        completion = (await _collect(live_client))[-1].completion
        assert (completion.finish_reason, completion.usage.output_tokens) == (pb.FINISH_REASON_STOP, 30)

    async def test_the_wait_for_the_usage_chunk_ends_before_the_deadline(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A whole answer whose usage chunk would come after the caller's deadline ends OK before
        it, the usage estimated (the wait for the usage ran past the deadline: DEADLINE_EXCEEDED,
        no Completion, though the answer had come)."""
        fake.enqueue(Script(usage_delay=2.0, output_tokens=30))
        messages = await _collect(live_client, timeout=1.0)
        assert "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta") == DEFAULT_TEXT
        completion = messages[-1].completion
        assert completion.finish_reason == pb.FINISH_REASON_STOP
        assert 0 < completion.usage.output_tokens != 30

    async def test_the_client_credentials_are_not_forwarded(self, live_server: Server, fake: FakeProvider) -> None:
        """The provider sees the configured key, never the caller's authorization metadata."""
        async with RouterClient(live_server.target, api_key="client-secret-key") as client:
            await _collect(client)
        recorded = fake.requests[-1]
        assert recorded.api_key == "sk-test-openai"
        assert "client-secret-key" not in str(recorded.headers)

    async def test_traceparent_is_forwarded(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """Incoming trace context goes upstream with the provider call."""
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async for _ in live_client.complete(user_chat("hi"), metadata={"traceparent": traceparent}):
            pass
        assert fake.requests[-1].headers.get("traceparent") == traceparent

    async def test_max_output_tokens_and_temperature_reach_the_provider(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The request's limits are sent upstream."""
        async for _ in live_client.complete(user_chat("hi", max_output_tokens=77, temperature=0.3)):
            pass
        body = fake.requests[-1].body
        assert body["temperature"] == 0.3
        assert 77 in (body.get("max_tokens"), body.get("max_completion_tokens"))


UPSTREAM_STATUS = [
    (400, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REJECTED"),
    (401, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_AUTH_FAILED"),
    (403, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_AUTH_FAILED"),
    (404, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REJECTED"),
    (408, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (413, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REJECTED"),
    (422, grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_REJECTED"),
    (425, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (499, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
    (500, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (502, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (503, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (504, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    (529, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
]


class TestProviderErrors:
    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    @pytest.mark.parametrize(("status", "code", "reason"), UPSTREAM_STATUS)
    async def test_each_upstream_status_maps_to_one_grpc_status(
        self,
        live_client: RouterClient,
        fake: FakeProvider,
        model: str,
        status: int,
        code: grpc.StatusCode,
        reason: str,
    ) -> None:
        """Upstream HTTP errors map to the documented status; the message has no prompt or key."""
        fake.set_default(Script(status=status, retry_after="0" if status == 429 else None))
        error, received = await _failure(live_client, model=model)
        assert (error.code(), error_info(error).reason) == (code, reason)
        assert error_info(error).metadata["upstream_status"] == str(status)
        details = error.details() or ""
        assert CANARY not in details
        assert "sk-test" not in details
        assert [m.WhichOneof("event") for m in received] == ["decision"]

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    @pytest.mark.parametrize("status", [425, 499])
    async def test_a_transient_4xx_is_retried(
        self, live_client: RouterClient, fake: FakeProvider, model: str, status: int
    ) -> None:
        """A 499 (Google's APIs: an operation cancelled under load) or a 425 Too Early (RFC 8470)
        says "not now": the retry answers (it was final PROVIDER_REJECTED, no retry, no fallback)."""
        fake.enqueue(Script(status=status), Script(text="Answered."))
        messages = await _collect(live_client, model=model)
        assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP
        assert "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta") == "Answered."
        assert len(fake.requests) == 2

    async def test_rate_limits_carry_the_retry_delay(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """A 429 with Retry-After: 30 (longer than we wait) answers RESOURCE_EXHAUSTED with RetryInfo of 30 s."""
        from google.rpc import error_details_pb2, status_pb2

        fake.set_default(Script(status=429, retry_after="30"))
        error, _ = await _failure(live_client)
        status = status_pb2.Status.FromString(dict(error.trailing_metadata() or ())["grpc-status-details-bin"])
        delays = []
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                delays.append(info.retry_delay.seconds)
        assert delays == [30]

    async def test_connection_refused_is_unavailable(self) -> None:
        """A provider that is not listening is UNAVAILABLE."""
        environ = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        async with (
            Server(settings_from(default_config(), environ), port=0) as server,
            RouterClient(server.target) as client,
        ):
            error, _ = await _failure(client)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")

    async def test_missing_key_is_failed_precondition_naming_the_variable(self, client: RouterClient) -> None:
        """Completing on a provider with no key fails before any call, naming OPENAI_API_KEY."""
        error, received = await _failure(client)
        assert (error.code(), error_info(error).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_NOT_CONFIGURED",
        )
        assert "OPENAI_API_KEY" in (error.details() or "")
        assert received == []

    async def test_bad_input_makes_no_provider_call(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """An invalid request never reaches the provider."""
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in live_client.complete(pb.ChatRequest()):
                pass
        assert fake.requests == []


class TestCommitRule:
    @pytest.mark.parametrize("fault", [Fault.CUT, Fault.RESET])
    async def test_a_stream_cut_after_content_ends_unavailable_with_the_committed_trailer(
        self, live_client: RouterClient, fake: FakeProvider, fault: Fault
    ) -> None:
        """Cut after 40 of 60 chunks: the deltas that arrived, in order, then UNAVAILABLE saying how
        many were committed; no second attempt. A FIN delivers all 40; a TCP reset may destroy
        the last few in the kernel before our process reads them, never reorder or repeat them."""
        fake.enqueue(Script(chunk_count=60, fault=fault, fault_after=40))
        error, received = await _failure(live_client)
        kinds = [m.WhichOneof("event") for m in received]
        deltas = [m.delta.text for m in received[1:]]
        assert kinds == ["decision"] + ["delta"] * len(deltas)
        assert deltas == [f"chunk-{i} " for i in range(len(deltas))]
        assert len(deltas) == 40 if fault is Fault.CUT else 0 < len(deltas) <= 40
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
        trailers = dict(error.trailing_metadata() or ())
        assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", str(len(deltas)))
        assert len(fake.requests) == 1

    @pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_cut_delivers_what_arrived_with_it_over_either_transport(
        self, fake: FakeProvider, http_client: str, model: str
    ) -> None:
        """A FIN after 40 of 60 chunks delivers exactly the 40, three times in a row, on both
        providers' formats and over both SDK transports. aiohttp fails its reader when the
        connection closes mid-body with the last chunks still in its buffer; the adapters'
        transport hands those over before the error."""
        config = default_config()
        for provider in config["providers"].values():  # type: ignore[union-attr]
            provider["http_client"] = http_client
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            for _ in range(3):
                fake.enqueue(Script(chunk_count=60, fault=Fault.CUT, fault_after=40))
                error, received = await _failure(client, model=model)
                deltas = [m.delta.text for m in received[1:]]
                assert deltas == [f"chunk-{i} " for i in range(40)]
                assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
                trailers = dict(error.trailing_metadata() or ())
                assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", "40")
        assert len(fake.requests) == 3

    async def test_in_band_error_before_content_is_a_provider_error(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """An Anthropic error event before any text fails cleanly with no deltas."""
        fake.set_default(Script(fault=Fault.ERROR_EVENT, fault_after=0))
        error, received = await _failure(live_client, model="claude-sonnet")
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert [m.WhichOneof("event") for m in received] == ["decision"]


class TestDeadlinesAndCancellation:
    async def test_a_caller_that_leaves_while_the_server_waits_to_write_is_not_an_error(
        self, fake: FakeProvider, live_server: Server, live_client: RouterClient
    ) -> None:
        """The caller reads one delta of a ~12 MB answer, waits while the server blocks on flow
        control, and leaves: GetStats counts a request and no error (grpc failed the pending
        write before the cancel reached the handler, which raised it: an error in GetStats, code
        UNKNOWN on the span, and grpc logged ExecuteBatchError with a traceback)."""
        fake.enqueue(Script(chunks=tuple("z" * 4000 + f" {i} " for i in range(3000))), model="gpt-4o-mini")
        async with live_client.complete(user_chat("say hello")) as stream:
            async for message in stream:
                if message.WhichOneof("event") == "delta":
                    await asyncio.sleep(1.0)  # the server fills the windows and waits to write
                    break
        async with asyncio.timeout(15):
            while (stats := await live_client.get_stats()).totals.requests < 1:  # noqa: ASYNC110 - polled through GetStats
                await asyncio.sleep(0.05)
        assert (stats.totals.requests, stats.totals.errors) == (1, 0)

    async def test_a_stream_whose_deadline_passes_before_its_first_write_is_not_logged_ok(
        self, live_client: RouterClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Completes with deadlines of 0.5-3 ms: whichever way each ends, a call its client saw
        fail is never logged OK (a write that fails because the deadline passed closed the
        handler without a status), and grpc logs no servicer traceback for it."""
        seen: dict[str, str] = {}
        with capture_logs() as logs:
            for index in range(40):
                request_id = f"tight-{index}"
                try:
                    async for _ in live_client.complete(
                        user_chat("hi"), timeout=0.0005 * (1 + index % 6), metadata={"x-request-id": request_id}
                    ):
                        pass
                    seen[request_id] = "OK"
                except grpc.aio.AioRpcError as error:
                    seen[request_id] = error.code().name
            await asyncio.sleep(0.5)
        logged = {entry["request_id"]: entry["code"] for entry in logs if entry["event"] == "rpc_finished"}
        wrong = {rid: logged[rid] for rid, code in seen.items() if code != "OK" and logged.get(rid) == "OK"}
        assert wrong == {}
        assert not [record for record in caplog.records if "ExecuteBatchError" in record.getMessage()]

    async def test_a_cancel_that_a_late_loop_sees_after_the_servers_own_end_is_logged_as_the_deadline(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A stream with a 4 s deadline, which the server means to end itself 0.2 s before it;
        the loop is held up (blocked here, as by load) across that moment, and the caller's
        cancel comes in meanwhile, still before the deadline by the server's clock, as the
        caller's own deadline timer's does when it wins the race. The call is logged
        DEADLINE_EXCEEDED with its error_reason (it was CANCELLED: a deadline counted as the
        caller leaving)."""
        await _collect(live_client)  # opens the provider connection
        fake.enqueue(Script(chunk_count=1000, chunk_delay=0.05))
        loop = asyncio.get_running_loop()
        async with loopback_channel(live_server.target) as channel:
            call = pb_grpc.RouterServiceStub(channel).Complete(
                pb.CompleteRequest(chat=user_chat("hi")), timeout=4.0, metadata=(("x-request-id", "late-loop"),)
            )
            started = loop.time()

            def late_loop() -> None:
                # Past the server's own end (about started + 3.8), before the deadline (4.0).
                time.sleep(max(0.0, started + 3.85 - loop.time()))
                call.cancel()
                time.sleep(0.1)

            with capture_logs() as logs:
                assert (await call.read()).WhichOneof("event") == "decision"
                loop.call_at(started + 3.7, late_loop)
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    while await call.read() is not grpc.aio.EOF:
                        pass
                async with asyncio.timeout(10):
                    while not [e for e in logs if e["event"] == "rpc_finished" and e["request_id"] == "late-loop"]:  # noqa: ASYNC110 - no event for a log line
                        await asyncio.sleep(0.02)
        (line,) = [e for e in logs if e["event"] == "rpc_finished" and e["request_id"] == "late-loop"]
        assert (line["code"], line.get("error_reason")) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")

    async def test_a_deadline_mid_stream_says_how_many_chunks_were_sent(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A 1 s deadline on a stream of a chunk every 50 ms: the server's DEADLINE_EXCEEDED
        carries the committed trailers with the number of deltas the client got. (The client's
        own timer can beat the server's status to it, then there are no trailers; so up to ten
        tries, and every status that has them must count right.)"""
        # A whole answer first opens the provider connection: a cold first attempt on a loaded
        # machine can take most of a short deadline to bring its first chunk (0.5 s was the
        # deadline; a stream cut before any delta is not committed).
        await _collect(live_client)
        counted = []
        for _ in range(10):
            fake.enqueue(Script(chunk_count=100, chunk_delay=0.05))
            received: list[pb.CompleteResponse] = []

            async def read() -> None:
                async for message in live_client.complete(user_chat("hi"), timeout=1.0):
                    received.append(message)  # noqa: B023 - read at once, in this iteration

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deltas = sum(1 for message in received if message.WhichOneof("event") == "delta")
            trailers = dict(caught.value.trailing_metadata() or ())
            if "routesvc-chunks-sent" in trailers:
                assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", str(deltas))
                counted.append(deltas)
                break
        assert counted
        assert counted[0] > 0

    async def test_a_deadline_while_the_client_holds_a_write_back_still_ends_the_call_with_its_status(
        self, fake: FakeProvider
    ) -> None:
        """A client that stops reading mid-answer holds the server's write back (flow control) when
        the deadline comes: the server still ends the call DEADLINE_EXCEEDED (its log line with the
        reason, its span and its duration metric say so) and closes the provider request, and a
        client that reads on before its own deadline gets the committed trailers, counting every
        delta it got (the message whose write was cut short too: grpc sends it before the status).
        Reading on within the server's 20 ms lead is a race on a loaded machine, so up to ten
        tries; the server's record is checked on each."""
        big = "x" * 16_384
        # A 64 KiB receive window that never grows: a few chunks fill it, the server's write then
        # waits, and the client has little to read before the status.
        options = [("grpc.http2.lookahead_bytes", 65_536), ("grpc.http2.bdp_probe", 0)]
        finished: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

        def notify(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
            if event["event"] == "rpc_finished":
                finished[str(event["request_id"])].set()
            return event

        async with (
            observed_server(fake) as observed,
            loopback_channel(observed.server.target, options=options) as channel,
        ):
            await _collect(observed.client)  # opens the provider connection (see above)
            stub = pb_grpc.RouterServiceStub(channel)
            tries = 0
            with capture_logs(processors=[notify]) as logs:
                for tries in range(1, 11):
                    fake.enqueue(Script(chunks=(big,) * 2_000))
                    request_id = f"slow-reader-{tries}"
                    call = stub.Complete(
                        pb.CompleteRequest(chat=user_chat("hi")), timeout=1.0, metadata=(("x-request-id", request_id),)
                    )
                    received = [await call.read(), await call.read()]
                    assert [m.WhichOneof("event") for m in received] == ["decision", "delta"]
                    # Read nothing more until the server has given up on the provider, at its deadline.
                    await fake.requests[-1].wait_ended(timeout=10.0)

                    async def read_on() -> None:
                        while (message := await call.read()) is not grpc.aio.EOF:  # noqa: B023 - this try's call
                            received.append(message)  # noqa: B023 - read at once, in this iteration

                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await read_on()
                    deltas = sum(1 for m in received if m.WhichOneof("event") == "delta")
                    async with asyncio.timeout(10):
                        await finished[request_id].wait()
                    (line,) = [e for e in logs if e["event"] == "rpc_finished" and e["request_id"] == request_id]
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    assert (line["code"], line.get("error_reason")) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
                    assert fake.requests[-1].aborted
                    trailers = dict(caught.value.trailing_metadata() or ())
                    if "routesvc-chunks-sent" in trailers:
                        assert error_info(caught.value).reason == "DEADLINE_EXCEEDED"
                        counts = (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"], line["chunks"])
                        assert counts == ("true", str(deltas), deltas)
                        break
                    # The client's own timer won: it lost what it had not read, not what was sent.
                    assert line["chunks"] >= deltas
                else:
                    pytest.fail("no try got the committed trailers")
            # The span ends as the line is logged, before the caller's task runs again.
            codes = [dict(span.attributes or {})["rpc.grpc.status_code"] for span in observed.named(COMPLETE)]
            assert codes == [grpc.StatusCode.OK.value[0]] + [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * tries
            durations = {
                dict(point.attributes)["rpc.response.status_code"]
                for point in observed.points("rpc.server.call.duration")
                if dict(point.attributes)["rpc.method"] == COMPLETE
            }
            assert durations == {"OK", "DEADLINE_EXCEEDED"}

    async def test_a_completion_whose_write_waits_past_the_deadline_for_a_late_reader_ends_ok(
        self, fake: FakeProvider
    ) -> None:
        """A client that reads its stream only late: the decision and the text fit the 64 KiB
        stream window, the Completion (usage and cost, charged) does not, so its write waits on
        flow control while the server's own end of the call passes. The caller gets the whole
        answer, so the call ends OK (its status, rpc_finished line, span and GetStats' ``errors``
        alike): it ended DEADLINE_EXCEEDED with the committed trailers, and a caller trusting the
        status would pay for the answer again. The client reads 125 ms after the server's end
        (4.75 s, the most lead it takes) and as long before its own deadline (5 s). Those whose
        text does not fit end DEADLINE_EXCEEDED without a Completion, as they should."""
        await _late_readers(fake, deadline=5.0, read_at=4.875, cut=grpc.StatusCode.DEADLINE_EXCEEDED)

    async def test_a_completion_whose_write_waits_when_the_shutdown_grace_ends_ends_ok(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers (no deadline) while the server's shutdown grace ends (its calls
        interrupted and cancelled at 1 s, as ``Server.aclose`` does just before the grace's end).
        A caller whose Completion's write waited gets the whole answer and OK: it got UNAVAILABLE
        ``SHUTTING_DOWN`` after it, a status made to be retried, and paid again. Those whose text
        does not fit end UNAVAILABLE without a Completion, as they should."""

        async def shut_down(server: Server) -> None:
            await asyncio.sleep(1.0)
            server._service.interrupt_in_flight()
            server._service.cancel_in_flight()

        await _late_readers(fake, read_at=2.5, cut=grpc.StatusCode.UNAVAILABLE, meanwhile=shut_down)

    async def test_a_completion_held_for_a_caller_that_reads_after_its_deadline_ends_as_the_caller_saw(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers, reading only after their own deadline (3 s; read at 3.5 s): a
        Completion whose write waited is never taken, the caller gets DEADLINE_EXCEEDED without it.
        The call is logged, traced and counted DEADLINE_EXCEEDED, as the caller saw it, and grpc
        logs nothing: it ended OK in our log, span and GetStats, and grpc's own OK status,
        failing to go out, was logged at ERROR with a traceback (``ExecuteBatchError``)."""
        await _late_readers(fake, deadline=3.0, read_at=3.5, cut=grpc.StatusCode.DEADLINE_EXCEEDED, in_time=False)

    async def test_a_stalled_completion_whose_caller_reads_after_its_deadline_ends_as_the_caller_saw(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers with ``client_write_timeout_seconds`` 1 and a 2 s deadline, reading
        at 3 s: a Completion whose write stalled is never taken, the caller's deadline passing
        first. The call is logged (``client_stalled`` all the same), traced and counted
        DEADLINE_EXCEEDED, and grpc logs nothing: it ended OK, and grpc's OK status, failing to go
        out, was logged at ERROR with a traceback."""
        config = default_config()
        config["reliability"] = {"client_write_timeout_seconds": 1.0}
        lines = await _late_readers(
            fake, deadline=2.0, read_at=3.0, cut=grpc.StatusCode.DEADLINE_EXCEEDED, config=config, in_time=False
        )
        assert [line for line in lines if line.get("answered_by") and line.get("client_stalled") is True]

    async def test_a_completion_held_for_a_caller_that_reads_after_the_shutdown_grace_ends_unavailable(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers (no deadline) while the server shuts down (grace 2 s), reading
        only after it (at 3.5 s): a Completion whose write waited is discarded by grpc's stop, the
        caller gets UNAVAILABLE without it, and so the call is logged and traced (``SHUTTING_DOWN``),
        grpc logging nothing: it ended OK in our log and span."""
        config = _with_grace(default_config(), 2.0)
        lines = await _late_readers(
            fake, read_at=3.5, cut=grpc.StatusCode.UNAVAILABLE, meanwhile=_closes_at(0.5), config=config, in_time=False
        )
        assert {line.get("error_reason") for line in lines if line["code"] == "UNAVAILABLE"} == {"SHUTTING_DOWN"}
        assert [line for line in lines if line["code"] == "OK" and float(str(line["duration_ms"])) >= 400] == []

    async def test_a_caller_leaving_in_the_grace_before_its_held_completion_is_read_ends_cancelled(
        self, fake: FakeProvider
    ) -> None:
        """Late readers (as ``_late_readers``: the Completion's write held back by flow control)
        while the server closes 0.25 s after they reached it (``_all_reached``; times from
        then) with a 4 s grace: it cancels its calls at 3.75 s and its stop cuts them at 4.25 s.
        Callers that cancel their calls at 4 s, not having read, end CANCELLED, and so their
        calls are logged and traced, as they saw them: those whose Completion was handed over
        were logged and traced UNAVAILABLE ``SHUTTING_DOWN``, as if the stop had cut them, and
        those whose status waited behind their text logged so."""
        config = _with_grace(default_config(), 4.0)
        options = _LATE_READER_OPTIONS
        async with observed_server(fake, config=config) as observed:
            sizes = await _window_edge_sizes(fake, observed.client)
            reached = asyncio.Event()

            async def leaver(size: int) -> grpc.StatusCode:
                async with loopback_channel(observed.server.target, options=options) as channel:
                    call = pb_grpc.RouterServiceStub(channel).Complete(
                        pb.CompleteRequest(chat=user_chat("a late reader")),
                        metadata=(("x-request-id", f"leaver-{size}"),),
                    )
                    await reached.wait()
                    await asyncio.sleep(4.0)
                    call.cancel()
                    return await call.code()

            for size in sizes:
                fake.enqueue(Script(chunks=("x" * size,)))
            with _grpc_errors() as grpc_errors:
                with capture_logs() as logs:
                    asked = len(fake.requests)
                    leaving = asyncio.gather(*(leaver(size) for size in sizes))
                    await _all_reached(fake, asked, len(sizes))
                    reached.set()
                    await asyncio.sleep(0.25)
                    await observed.server.aclose()
                    codes = await leaving
                    await until(lambda: sum(entry["event"] == "rpc_finished" for entry in logs) == len(sizes))
                await until(lambda: len(observed.named(COMPLETE)) == 1 + len(sizes))
        assert grpc_errors.messages == []
        assert codes == [grpc.StatusCode.CANCELLED] * len(sizes)
        # Those whose answer fit the window ended OK at once; the others waited for their callers.
        lines = [entry for entry in logs if entry["event"] == "rpc_finished"]
        held = [line for line in lines if float(str(line["duration_ms"])) >= 1000]
        # Some had their Completion handed over (``answered_by``), the others' text still waited.
        assert [line for line in held if line.get("answered_by")]
        assert [line for line in held if not line.get("answered_by")]
        assert [(line["code"], line.get("error_reason")) for line in held] == [("CANCELLED", None)] * len(held)
        codes = [dict(span.attributes or {})["rpc.grpc.status_code"] for span in observed.named(COMPLETE)]
        assert sorted(codes) == [grpc.StatusCode.OK.value[0]] * (1 + len(lines) - len(held)) + [
            grpc.StatusCode.CANCELLED.value[0]
        ] * len(held)

    async def test_a_completion_whose_write_stalls_past_the_client_write_timeout_ends_ok(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers (no deadline) with ``client_write_timeout_seconds`` 1: a caller
        whose Completion's write waited that long has the whole answer, so its call ends OK, its
        slot freed and the stall noted (``client_stalled`` on its rpc_finished line, the span's
        event and ``routesvc.client_stalls``); it ended DEADLINE_EXCEEDED ``CLIENT_STALLED``
        after the Completion. Those whose text does not fit end ``CLIENT_STALLED``, as before."""
        config = default_config()
        config["reliability"] = {"client_write_timeout_seconds": 1.0}
        lines = await _late_readers(fake, read_at=2.5, cut=grpc.StatusCode.DEADLINE_EXCEEDED, config=config)
        answered = [line for line in lines if line.get("answered_by")]
        stalled = [line["request_id"] for line in answered if float(str(line["duration_ms"])) >= 1000]
        assert stalled
        assert [line["request_id"] for line in lines if line.get("client_stalled") is True] == stalled
        assert [line["error_reason"] for line in answered if "error_reason" in line] == []

    async def test_a_completion_whose_write_stalled_before_the_shutdown_ends_ok_for_a_caller_reading_in_the_grace(
        self, fake: FakeProvider
    ) -> None:
        """The same late readers (no deadline) with ``client_write_timeout_seconds`` 2.5, the
        server closed 0.25 s after they reached it (times from then) with a 4 s grace: the
        Completion's write stalls by 2.5 s, and the shutdown interrupts its calls at 3.25 s and
        cancels them at 3.75 s, while the stalled call still waits for its caller (as long
        again). A caller reading at 4 s, within the grace, gets the whole answer and OK, logged
        and traced so: the shutdown's cancel was taken as the call's end, logged CANCELLED, and
        the caller got the Completion, then UNAVAILABLE at the grace's end. Those whose text
        does not fit end ``CLIENT_STALLED``."""
        config = _with_grace(default_config(), 4.0)
        config["reliability"] = {"client_write_timeout_seconds": 2.5}
        lines = await _late_readers(
            fake,
            read_at=4.0,
            cut=grpc.StatusCode.DEADLINE_EXCEEDED,
            config=config,
            meanwhile=_closes_at(0.25),
            closes=True,
        )
        stalled = [line for line in lines if line.get("answered_by") and line.get("client_stalled") is True]
        assert stalled
        assert {line["code"] for line in stalled} == {"OK"}

    async def test_deadline_before_the_first_token(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """A 0.5 s deadline against a 5 s first token: DEADLINE_EXCEEDED on time, upstream closed."""
        # A whole answer first opens the provider connection, so that the timed request reaches
        # the fake before its deadline even on a loaded machine (a cold connect can take most of it).
        await _collect(live_client)
        fake.enqueue(Script(first_chunk_delay=5.0))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _collect(live_client, timeout=0.5)
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # On time: ended by the deadline, not by the 5 s first token; the slack is for a loaded machine.
        assert elapsed < 0.5 + 1.5
        assert len(fake.requests) == 2
        recorded = fake.requests[-1]
        await recorded.wait_ended(timeout=5.0)
        assert recorded.aborted

    @pytest.mark.parametrize("context", [{"model": "gpt-4o-mini"}, {"cascade": True}], ids=["retry", "cascade"])
    async def test_a_failure_with_no_time_left_for_another_attempt_is_what_the_caller_is_told(
        self, fake: FakeProvider, context: dict[str, object]
    ) -> None:
        """gpt-4o-mini stalls (first_token_timeout_seconds 0.6) and less than min_attempt_seconds
        (2.7) of the 3 s deadline is left: no fallback (claude-sonnet, one a cascade step may fall
        back to too) or escalation starts, and the caller gets the stall's UNAVAILABLE, as without
        any configured, not a DEADLINE_EXCEEDED long before its deadline."""
        config = default_config()
        config["reliability"] = {"first_token_timeout_seconds": 0.6, "min_attempt_seconds": 2.7}
        config["routing"]["fallbacks"]["gpt-4o-mini"] = ["gpt-4o", "claude-sonnet"]  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await _collect(client)  # opens the provider connection (see above)
            fake.enqueue(Script(first_chunk_delay=5.0), model="gpt-4o-mini")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _collect(client, timeout=3.0, **context)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    @pytest.mark.parametrize("after", [0, 1, 10, 100])
    async def test_cancel_mid_stream_closes_the_upstream_request(
        self, live_client: RouterClient, fake: FakeProvider, after: int
    ) -> None:
        """Cancelling after N deltas aborts the provider's HTTP response within a second."""
        # after=0: the provider holds its first token, so the cancel lands while waiting for it.
        fake.enqueue(Script(chunk_count=1000, chunk_delay=0.02, first_chunk_delay=5.0 if after == 0 else 0.0))
        call = live_client.complete(user_chat("hi"))
        seen = 0
        async for message in call:
            if message.WhichOneof("event") == "delta":
                seen += 1
            if after == 0:
                async with asyncio.timeout(5):
                    while not fake.requests:  # noqa: ASYNC110 - the fake has no arrival event; a bounded poll
                        await asyncio.sleep(0.01)
                break
            if seen >= after:
                break
        await call.aclose()
        cancelled_at = time.monotonic()
        recorded = fake.requests[-1]
        await recorded.wait_ended(timeout=2.0)
        assert recorded.aborted
        assert recorded.aborted_at is not None
        assert recorded.aborted_at - cancelled_at < 1.0
        assert recorded.chunks_sent < 1000

    async def test_the_call_starts_when_complete_is_called_not_at_the_first_read(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The provider is asked before the stream is read (the call started at the first read, so
        a timeout counted from then, unlike the Go, Java and TypeScript clients); the answer is
        then read whole, and a stream never read is cancelled by ``aclose``."""
        stream = live_client.complete(user_chat("hi"), timeout=10)
        async with asyncio.timeout(5):
            while not fake.requests:  # noqa: ASYNC110 - the fake has no arrival event; a bounded poll
                await asyncio.sleep(0.01)
        events = [message.WhichOneof("event") async for message in stream]
        assert events[0] == "decision"
        assert events[-1] == "completion"
        fake.enqueue(Script(chunk_count=1000, chunk_delay=0.02))
        unread = live_client.complete(user_chat("hi"))
        async with asyncio.timeout(5):
            while len(fake.requests) < 2:  # noqa: ASYNC110 - a bounded poll, as above
                await asyncio.sleep(0.01)
        await unread.aclose()
        await fake.requests[-1].wait_ended(timeout=2.0)
        assert fake.requests[-1].aborted

    async def test_leaving_an_async_with_stream_cancels_the_call_it_still_holds(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """``async with client.complete(...) as stream``, left by a ``break`` while ``stream`` still
        holds it: the call is cancelled as the block ends and the provider's request is aborted (a
        stream in a variable ran on, with the provider, until it was collected)."""
        fake.enqueue(Script(chunk_count=1000, chunk_delay=0.02))
        async with live_client.complete(user_chat("hi")) as stream:
            async for message in stream:
                if message.HasField("delta"):
                    break
        recorded = fake.requests[-1]
        await recorded.wait_ended(timeout=10.0)  # the whole answer takes 20 s
        assert (recorded.aborted, recorded.completed) == (True, False)
        assert recorded.chunks_sent < 1000
        assert [message async for message in stream] == []

    async def test_the_server_keeps_serving_after_cancels(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """Cancelled calls leave nothing behind that breaks the next call."""
        fake.enqueue(Script(chunk_count=100, chunk_delay=0.05))
        task = asyncio.create_task(_collect(live_client))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        messages = await _collect(live_client)
        assert messages[-1].WhichOneof("event") == "completion"

    async def test_a_caller_that_stops_at_the_completion_does_not_cancel_the_call(
        self, live_server: Server, fake: FakeProvider
    ) -> None:
        """The client hands over the completion only once the call has its status: stopping there
        ends an OK call instead of cancelling one whose final status the server is sending."""
        calls: list[grpc.aio.UnaryStreamCall] = []

        class Recorder(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
            async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
                call = await continuation(details, request)
                calls.append(call)
                return call

        channel = loopback_channel(live_server.target, interceptors=[Recorder()])
        async with RouterClient(live_server.target, channel=channel) as client:
            for _ in range(5):
                fake.enqueue(Script(chunks=("a", "b", "c")))
                async for message in client.complete(user_chat("Say hello")):
                    if message.WhichOneof("event") == "completion":
                        assert calls[-1].done()
                        break
        assert [await call.code() for call in calls] == [grpc.StatusCode.OK] * 5


class TestOpenAICompatible:
    async def test_a_compatible_server_is_called_through_the_openai_sdk(self, fake: FakeProvider) -> None:
        """kind openai_compatible with a base_url and no key (as for Ollama or vLLM) streams and costs."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llama-local", provider_model="meta-llama/Llama-3.1-8B-Instruct")
        fake.enqueue(Script(input_tokens=100, output_tokens=5))
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            messages = await _collect(client, model="llama-local")
        completion = messages[-1].completion
        assert (completion.model, completion.provider) == ("llama-local", "local")
        assert Decimal(completion.cost_usd) == (100 * Decimal("0.02") + 5 * Decimal("0.05")) / 1_000_000
        assert fake.requests[-1].body["model"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert fake.requests[-1].body["stream_options"] == {"include_usage": True}

    async def test_stream_usage_false_sends_no_stream_options_and_estimates_the_usage(self, fake: FakeProvider) -> None:
        """providers.local.stream_usage false, for a server that refuses stream_options (older vLLM,
        some hosted endpoints answer 400 to every call that has it): the field is not sent, and the
        usage the server then leaves out is estimated, in the ledger as flagged."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llama-local")
        config["providers"]["local"]["stream_usage"] = False  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            messages = await _collect(client, model="llama-local")
            [entry] = server.router.ledger.entries(messages[0].decision.decision_id)
        assert "stream_options" not in fake.requests[-1].body
        assert messages[-1].completion.usage.output_tokens > 0
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.COMPLETED, True)


class TestProviderStrings:
    """A provider's strings reach the caller as a protobuf string can hold them (valid UTF-8),
    whatever its JSON escaped: a lone surrogate (half of an emoji's UTF-16 pair, as a server
    that cuts a stream mid-character sends it) ended the call INTERNAL after its text was sent."""

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    @pytest.mark.parametrize(
        ("chunks", "deltas"),
        [
            (("Hello ", "\ud83d", "\ude00", " done"), ["Hello ", "\U0001f600", " done"]),
            (("Hello ", "\ude00\ud83d"), ["Hello ", "\ufffd", "\ufffd"]),
        ],
        ids=["pair_split_across_deltas", "lone_halves"],
    )
    async def test_a_lone_surrogate_in_the_text_is_replaced_and_the_stream_completes(
        self,
        live_client: RouterClient,
        live_server: Server,
        fake: FakeProvider,
        model: str,
        chunks: tuple[str, ...],
        deltas: list[str],
    ) -> None:
        """An emoji's pair split across two events reaches the caller whole (each half was a
        U+FFFD); a lone half becomes U+FFFD, also a first half the stream ends on. The completion
        follows, and the ledger has the attempt completed (it said cancelled)."""
        fake.enqueue(Script(chunks=chunks))
        messages = await _collect(live_client, model=model)
        assert [m.delta.text for m in messages if m.WhichOneof("event") == "delta"] == deltas
        assert messages[-1].WhichOneof("event") == "completion"
        [entry] = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert entry.outcome is AttemptOutcome.COMPLETED

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_first_half_held_when_the_stream_fails_before_any_text_is_dropped_and_retried(
        self, live_client: RouterClient, fake: FakeProvider, model: str
    ) -> None:
        """The first delta is only an emoji's first half (held back for its pair), then the
        connection is cut: nothing reached the caller, so the attempt is retried and the caller
        gets the clean second answer alone (the half came out as U+FFFD, the call's first chunk:
        committed, UNAVAILABLE STREAM_INTERRUPTED, no retry)."""
        fake.enqueue(
            Script(chunks=("\ud83d", "\ude00 rest"), fault=Fault.CUT, fault_after=1), Script(chunks=("Hello ", "again"))
        )
        before = len(fake.requests)
        messages = await _collect(live_client, model=model)
        assert [m.delta.text for m in messages if m.WhichOneof("event") == "delta"] == ["Hello ", "again"]
        assert messages[-1].WhichOneof("event") == "completion"
        assert len(fake.requests) - before == 2

    async def test_the_judge_is_sent_the_answer_as_the_caller_got_it(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A cascade's cheap answer whose emoji came in two events: the judge is asked about the
        emoji (its request could not be encoded, and failed as a "malformed stream" of the
        provider before it was sent)."""
        fake.enqueue(
            Script(chunks=("Paris ", "\ud83d", "\ude00", " is it")),
            Script(text='{"score": 0.9}'),
            model="gpt-4o-mini",
        )
        chat = user_chat("Capital of France?")
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        # A scored answer is released as one delta (2521e11), the emoji whole in it.
        assert [m.delta.text for m in messages if m.WhichOneof("event") == "delta"] == ["Paris \U0001f600 is it"]
        [_answer, judge] = fake.requests
        assert "Paris \U0001f600 is it" in json.dumps(judge.body, ensure_ascii=False)
        assert messages[-1].completion.model == "gpt-4o-mini"

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_tool_call_strings_and_the_provider_model_are_made_valid(
        self, live_client: RouterClient, fake: FakeProvider, model: str
    ) -> None:
        """A tool call's arguments whose emoji came in two pieces are joined again, a lone half is
        U+FFFD: the caller gets the calls it paid for (INTERNAL, with the attempt completed and
        charged). A reported model name with a lone half is no model id: the model asked for."""
        arguments = '{"a": "\ud83d\ude00", "b": "\ud83d"}'
        call = FakeToolCall(name="f", arguments=arguments, pieces=len(arguments))  # one character an event
        fake.enqueue(Script(chunks=(), tool_calls=(call,), model="gpt-\ud83d"))
        chat = user_chat("call f", tools=[pb.Tool(name="f", parameters_json='{"type": "object"}')])
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(model=model))]
        completion = messages[-1].completion
        assert [json.loads(c.arguments_json) for c in completion.tool_calls] == [{"a": "\U0001f600", "b": "\ufffd"}]
        assert completion.provider_model == {"gpt-4o-mini": "gpt-4o-mini", "claude-sonnet": "claude-sonnet-4-6"}[model]

    async def test_an_internal_error_after_text_carries_the_committed_trailers(
        self, live_client: RouterClient, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Our bug in the last message, after three chunks were sent: INTERNAL, with the committed
        trailers counting them, so that a client does not retry and repeat the text."""

        def failing_completion(event: object) -> pb.Completion:
            raise ValueError("a bug")

        monkeypatch.setattr(wire, "_completion", failing_completion)
        fake.enqueue(Script(chunk_count=3))
        error, received = await _failure(live_client)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert [m.WhichOneof("event") for m in received] == ["decision"] + ["delta"] * 3
        trailers = dict(error.trailing_metadata() or ())
        assert (trailers["routesvc-committed"], trailers["routesvc-chunks-sent"]) == ("true", "3")


def _assert_whole_at_the_usage_reported(messages: list[pb.CompleteResponse], fake: FakeProvider) -> None:
    """The whole default answer, OK (STOP), at the usage the fake reported (1234 in, 25 out) and its
    exact cost, from one provider request."""
    assert "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta") == DEFAULT_TEXT
    completion = messages[-1].completion
    input_price, output_price, _ = _price(completion.model)
    assert (completion.finish_reason, completion.usage.input_tokens, completion.usage.output_tokens) == (
        pb.FINISH_REASON_STOP,
        1234,
        25,
    )
    assert Decimal(completion.cost_usd) == (1234 * input_price + 25 * output_price) / 1_000_000
    assert len(fake.requests) == 1
