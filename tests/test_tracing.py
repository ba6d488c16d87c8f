"""Traces: one server span per RPC, a routing span, one client span per upstream attempt, GenAI
attributes and cost, trace context in and out, events for fallbacks and escalations, ids on logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from routesvc import telemetry
from routesvc.client import build_chat
from routesvc.config import ReliabilityConfig
from routesvc.models import ChatRequest, Message, Role, RoutingContext, RoutingRequest
from routesvc.testing import FakeProvider, FakeToolCall, Fault, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import add_local_model, default_config, loopback_channel, settings_from, until, user_chat
from tests.observability import Observed, observed_server
from tests.test_images import png

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
COMPLETE = "routesvc.v1.RouterService/Complete"


async def _complete(observed: Observed, prompt: str = "Say hello", **context: object) -> list[pb.CompleteResponse]:
    return [
        m
        async for m in observed.client.complete(
            user_chat(prompt),
            pb.RoutingContext(**context),  # type: ignore[arg-type]
            metadata={"traceparent": TRACEPARENT},
        )
    ]


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


@pytest.fixture
async def observed(fake: FakeProvider) -> Observed:  # type: ignore[misc]
    async with observed_server(fake) as running:
        yield running


class TestServerSpan:
    async def test_one_server_span_per_rpc_with_rpc_attributes(self, observed: Observed) -> None:
        """Route, Complete and ListModels each produce exactly one SERVER span named service/method."""
        await observed.client.route(user_chat("hi"))
        await _complete(observed)
        await observed.client.list_models()
        servers = [s for s in observed.finished() if s.kind is SpanKind.SERVER]
        assert [s.name for s in servers] == [
            "routesvc.v1.RouterService/Route",
            COMPLETE,
            "routesvc.v1.RouterService/ListModels",
        ]
        attributes = _attrs(servers[1])
        assert (attributes["rpc.system"], attributes["rpc.service"], attributes["rpc.method"]) == (
            "grpc",
            "routesvc.v1.RouterService",
            "Complete",
        )
        assert attributes["rpc.grpc.status_code"] == 0

    @pytest.mark.parametrize(
        ("opt_in", "old", "stable"),
        [("rpc", False, True), ("http, rpc/dup", True, True), ("http", True, False)],
        ids=["stable", "both", "old"],
    )
    async def test_the_stable_rpc_conventions_are_opted_into(
        self, fake: FakeProvider, opt_in: str, old: bool, stable: bool
    ) -> None:
        """OTEL_SEMCONV_STABILITY_OPT_IN, as OpenTelemetry's migration plan defines it: ``rpc``
        puts the stable RPC attributes on server spans instead of the old ones (rpc.method fully
        qualified, the status code by name, error.type on a failure), ``rpc/dup`` both (the
        fully qualified rpc.method wins), anything else the old ones alone."""
        async with observed_server(fake, environ={"OTEL_SEMCONV_STABILITY_OPT_IN": opt_in}) as running:
            await _complete(running)
            fake.set_default(Script(status=503))
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(running)

            await until(lambda: len(running.named(COMPLETE)) == 2)
            ok, failed = (_attrs(span) for span in running.named(COMPLETE))
        method = COMPLETE if stable else "Complete"
        expected_ok: dict[str, object] = {"rpc.method": method}
        expected_failed: dict[str, object] = {"rpc.method": method}
        if old:
            expected_ok |= {"rpc.system": "grpc", "rpc.service": "routesvc.v1.RouterService", "rpc.grpc.status_code": 0}
            expected_failed |= {"rpc.system": "grpc", "rpc.service": "routesvc.v1.RouterService"}
            expected_failed |= {"rpc.grpc.status_code": 14}
        if stable:
            expected_ok |= {"rpc.system.name": "grpc", "rpc.response.status_code": "OK"}
            expected_failed |= {"rpc.system.name": "grpc", "rpc.response.status_code": "UNAVAILABLE"}
            expected_failed |= {"error.type": "UNAVAILABLE"}
        for attributes, expected in ((ok, expected_ok), (failed, expected_failed)):
            assert {key: value for key, value in attributes.items() if key.startswith(("rpc.", "error."))} == expected

    async def test_continues_the_callers_trace(self, observed: Observed) -> None:
        """An incoming traceparent makes the server span a child of the caller's span, in its trace."""
        await _complete(observed)
        (server,) = observed.named(COMPLETE)
        assert format(server.context.trace_id, "032x") == TRACE_ID
        assert _parent(server) == int(CALLER_SPAN, 16)

    async def test_a_failed_rpc_has_its_status_code_and_is_an_error_only_when_ours(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """A bad request is INVALID_ARGUMENT (3) and not an error span; an outage is UNAVAILABLE (14) and is."""
        with pytest.raises(grpc.aio.AioRpcError):
            await observed.client.route(pb.ChatRequest())

        fake.set_default(Script(status=503))
        with pytest.raises(grpc.aio.AioRpcError):
            await _complete(observed)

        def servers() -> list[ReadableSpan]:
            return [s for s in observed.finished() if s.kind is SpanKind.SERVER]

        # A span ends as its handler does, just after the client has the status (on a loaded
        # machine the Complete's was not ended yet).
        await until(lambda: len(servers()) == 2)
        route, complete = servers()
        assert (_attrs(route)["rpc.grpc.status_code"], route.status.status_code) == (3, StatusCode.UNSET)
        assert (_attrs(complete)["rpc.grpc.status_code"], complete.status.status_code) == (14, StatusCode.ERROR)

    @pytest.mark.parametrize("max_cost_usd", ["", "0.0000000001"], ids=["answered", "refused-over-max-cost"])
    async def test_a_route_that_works_past_its_deadline_without_awaiting_is_the_deadline_everywhere(
        self, fake: FakeProvider, max_cost_usd: str
    ) -> None:
        """A Route whose rule's regex backtracks for about a second (CPU only, no await, so
        asyncio's timer cannot end it) under a 0.25 s deadline, then answered or refused
        RESOURCE_EXHAUSTED (over its max_cost_usd): the caller gets DEADLINE_EXCEEDED, and so do
        the rpc_finished line, the server span and rpc.server.call.duration (they said OK or
        RESOURCE_EXHAUSTED while every caller timed out)."""
        from structlog.testing import capture_logs

        config = default_config()
        slow_rule = {"name": "slow", "when": {"last_user_message_matches": r"(a+)+$"}, "model": "gpt-4o"}
        config["routing"]["stages"].insert(0, {"kind": "rules", "rules": [slow_rule]})  # type: ignore[index]
        async with observed_server(fake, config=config) as observed:
            # A first call opens the channel: that alone can take a short deadline on a loaded machine.
            await observed.client.route(user_chat("a" * 12 + "!"))
            slow, context = user_chat("a" * 23 + "!"), pb.RoutingContext(max_cost_usd=max_cost_usd)
            with capture_logs() as logs:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await observed.client.route(slow, context, timeout=0.25)
                await until(lambda: any(entry["event"] == "rpc_finished" for entry in logs))
            await until(lambda: len([s for s in observed.finished() if s.kind is SpanKind.SERVER]) == 2)
            servers = [s for s in observed.finished() if s.kind is SpanKind.SERVER]
            points = observed.points("rpc.server.call.duration")
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        (line,) = [entry for entry in logs if entry["event"] == "rpc_finished"]
        assert (line["code"], line.get("error_reason")) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
        assert [_attrs(server)["rpc.grpc.status_code"] for server in servers] == [0, 4]
        codes = sorted(dict(point.attributes)["rpc.response.status_code"] for point in points)
        assert codes == ["DEADLINE_EXCEEDED", "OK"]

    async def test_a_route_refused_past_its_deadline_gives_its_route_count_back(self, fake: FakeProvider) -> None:
        """Two Routes of a tenant allowed 2 Route calls a minute, whose rule's regex backtracks for
        about a second (CPU only) under a 0.25 s deadline, are refused DEADLINE_EXCEEDED having paid
        nothing (the local classifier): they give their counts back, as a Route refused before it
        paid anything does, so the tenant's next Route is answered (it was RATE_LIMITED: its minute
        used up by calls whose callers never had a decision)."""
        config = default_config()
        config["tenants"] = {"acme": {"route_requests_per_minute": 2}}
        slow_rule = {"name": "slow", "when": {"last_user_message_matches": r"(a+)+$"}, "model": "gpt-4o"}
        config["routing"]["stages"].insert(0, {"kind": "rules", "rules": [slow_rule]})  # type: ignore[index]
        acme = pb.RoutingContext(tenant="acme")
        async with observed_server(fake, config=config) as observed:
            await observed.client.route(user_chat("a" * 12 + "!"))  # opens the channel; no tenant's
            codes = []
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await observed.client.route(user_chat("a" * 23 + "!"), acme, timeout=0.25)
                codes.append(caught.value.code())
            answered = await observed.client.route(user_chat("hello"), acme)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert answered.model

    @pytest.mark.slow
    async def test_a_route_ended_deadline_exceeded_anywhere_keeps_no_route_count(self, fake: FakeProvider) -> None:
        """Routes over a catalog of 1,000 more models (some 10 ms of CPU to decide and convert,
        no await), deadlines swept across that work: every Route the server ended
        DEADLINE_EXCEEDED gives its route_requests_per_minute count back, and only those it
        answered keep theirs. The router looked at the clock once before the decision was built,
        and the service again after its conversion (with another clock, the loop's): a Route
        the first found in time and the second late was refused with its count kept (most of
        those ended so here), the tenant's quota spent on decisions its callers never had. What
        was kept is read as the tenant sees it: Routes are then asked until its minute is used
        up, and the minute's count must be the Routes answered."""
        from structlog.testing import capture_logs

        calls, spare = 150, 20
        config = default_config()
        for number in range(1_000):
            add_local_model(config, "http://127.0.0.1:1/v1", f"local-{number}")
        config["tenants"] = {"acme": {"route_requests_per_minute": calls + spare}}
        acme = pb.RoutingContext(tenant="acme")
        chat = user_chat("hello there")
        async with observed_server(fake, config=config) as observed:
            loop = asyncio.get_running_loop()
            works = []
            for _ in range(5):  # no tenant's: not counted
                started = loop.time()
                await observed.client.route(chat)
                works.append(loop.time() - started)
            work = min(works)
            with capture_logs() as logs:
                for call in range(calls):
                    # The server ends a call a twentieth of its time early: deadlines from half
                    # the work's length to a fifth more.
                    timeout = work / 0.95 * (0.5 + 0.7 * call / calls)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await observed.client.route(chat, acme, timeout=timeout)
                # Then Routes until the tenant's minute is used up.
                refused = None
                while refused is None:
                    try:
                        await observed.client.route(chat, acme)
                    except grpc.aio.AioRpcError as error:
                        refused = error
                # Every call whose handler ran has its line (one grpc started after its deadline
                # had passed has neither, and was never counted); a span ends as its line is logged.
                await until(
                    lambda: (
                        sum(entry["event"] == "rpc_finished" for entry in logs) + 5
                        == len(observed.named("routesvc.v1.RouterService/Route"))
                    )
                )
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        codes = [str(entry["code"]) for entry in logs if entry["event"] == "rpc_finished"]
        # CANCELLED: the caller's timer (started before the server's) ended a call before the
        # server's end, grpc cancelling its handler at its first await, before it was counted.
        assert (
            {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
            <= set(codes)
            <= {
                "OK",
                "DEADLINE_EXCEEDED",
                "CANCELLED",
                "RESOURCE_EXHAUSTED",
            }
        )
        assert codes.count("RESOURCE_EXHAUSTED") == 1
        # The minute's counts went to answered Routes only (with a late one's count kept, the
        # tenant's quota ran out before as many were answered).
        assert codes.count("OK") == calls + spare, (codes.count("OK"), codes.count("DEADLINE_EXCEEDED"))

    async def test_a_complete_that_works_past_its_deadline_after_its_completion_ends_ok(
        self, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A Complete that has sent its decision, text and Completion (usage and cost, charged),
        whose work then runs past the server's own end of the call without awaiting (a loaded
        loop) and before the caller's deadline, ends OK: the caller has the whole answer, and the
        rpc_finished line and server span say OK (it ended DEADLINE_EXCEEDED with the committed
        trailers, so that a client ignoring them would pay again). The router's ``complete`` is
        wrapped here as a stand-in for that loop (CPU work after the last event, which no
        request can make our code do): after its last event a short await lets grpc send the
        Completion, then it blocks the loop until just past the server's own end."""
        import time

        from structlog.testing import capture_logs

        async with observed_server(fake) as observed:
            router = observed.server.router
            original = router.complete

            def busy_after_the_answer(*args: Any, **kwargs: Any) -> AsyncIterator[object]:
                loop = asyncio.get_running_loop()
                ends_at = loop.time() + kwargs["timeout"]

                async def events() -> AsyncIterator[object]:
                    async for event in original(*args, **kwargs):
                        yield event
                    await asyncio.sleep(0.05)
                    time.sleep(max(0.0, ends_at - loop.time()) + 0.01)  # noqa: ASYNC251 - the busy loop

                return events()

            monkeypatch.setattr(router, "complete", busy_after_the_answer)
            await observed.client.route(user_chat("hi"))  # opens the channel
            with capture_logs() as logs:
                stream = observed.client.complete(user_chat("hello there"), timeout=2.0)
                events = [message.WhichOneof("event") async for message in stream]
                await until(lambda: any(entry["event"] == "rpc_finished" for entry in logs))
            await until(lambda: len(observed.named(COMPLETE)) == 1)
            (server,) = observed.named(COMPLETE)
        assert (events[0], events[-1]) == ("decision", "completion")
        (line,) = [entry for entry in logs if entry["event"] == "rpc_finished"]
        assert line["code"] == "OK"
        assert _attrs(server)["rpc.grpc.status_code"] == 0

    @pytest.mark.slow
    async def test_a_call_that_expired_while_the_loop_was_busy_has_one_log_line_with_its_spans_code(
        self, fake: FakeProvider
    ) -> None:
        """Routes with 1-16 ms deadlines, each on a new channel, arrive while a rule's regex
        backtracks (CPU only) for about half a second: grpc starts some of their handlers after
        their deadline has passed and cancels them at their first await. Every call whose handler
        ran (one server span each) has one rpc_finished line, with its span's code (such a call
        had its span and its duration point but no line: it was cancelled before the code that
        logs it)."""
        from structlog.testing import capture_logs

        from routesvc.client import RouterClient

        config = default_config()
        slow_rule = {"name": "slow", "when": {"last_user_message_matches": r"(a+)+$"}, "model": "gpt-4o"}
        config["routing"]["stages"].insert(0, {"kind": "rules", "rules": [slow_rule]})  # type: ignore[index]

        async def route(client: RouterClient, prompt: str, timeout: float) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.route(user_chat(prompt), timeout=timeout)

        async with observed_server(fake, config=config) as observed:
            await observed.client.route(user_chat("hi"))  # opens the channel the slow call uses
            with capture_logs() as logs:
                for _ in range(12):
                    async with contextlib.AsyncExitStack() as stack:
                        target = observed.server.target
                        clients = [await stack.enter_async_context(RouterClient(target)) for _ in range(6)]
                        quick = [route(client, "hi", 0.001 + 0.005 * (n % 4)) for n, client in enumerate(clients)]
                        await asyncio.gather(*quick, route(observed.client, "a" * 22 + "!", 0.3))
                # Every handler has ended, and with it its span (which ends after the handler's line).
                service = observed.server._service
                await until(lambda: not service.calls_in_flight())
                await asyncio.sleep(0.5)
            spans = [s for s in observed.finished() if s.kind is SpanKind.SERVER and s.name.endswith("/Route")]
        lines = [entry for entry in logs if entry["event"] == "rpc_finished"]
        names = {code.value[0]: code.name for code in grpc.StatusCode}
        span_codes = sorted(names[_attrs(span)["rpc.grpc.status_code"]] for span in spans[1:])  # after the first
        assert sorted(line["code"] for line in lines) == span_codes

    @pytest.mark.parametrize(
        ("script", "reason"),
        [
            (Script(status=401), "PROVIDER_AUTH_FAILED"),
            (Script(status=429, error_type="insufficient_quota"), "PROVIDER_QUOTA_EXHAUSTED"),
        ],
    )
    async def test_a_failure_only_the_operator_can_end_is_an_error_span_and_a_warning(
        self, observed: Observed, fake: FakeProvider, script: Script, reason: str
    ) -> None:
        """routesvc's provider key refused, or its account unpaid: the call is FAILED_PRECONDITION
        (9), yet its server span is an error and its rpc_finished line a warning, so the outage
        can be alerted on (both were as quiet as a caller's bad request)."""
        from structlog.testing import capture_logs

        fake.set_default(script)
        with capture_logs() as logs:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _complete(observed)
            # Logged, and the span ended, as the handler ends, just after the client has the status.
            await until(lambda: any(entry["event"] == "rpc_finished" for entry in logs) and observed.named(COMPLETE))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        (complete,) = observed.named(COMPLETE)
        assert (_attrs(complete)["rpc.grpc.status_code"], complete.status.status_code) == (9, StatusCode.ERROR)
        assert complete.status.description == reason
        (line,) = [entry for entry in logs if entry["event"] == "rpc_finished"]
        assert (line["log_level"], line["error_reason"]) == ("warning", reason)

    async def test_a_failure_only_the_operator_can_end_names_its_code_in_the_stable_conventions(
        self, fake: FakeProvider
    ) -> None:
        """With OTEL_SEMCONV_STABILITY_OPT_IN=rpc an error span carries ``error.type``, the code's
        name: so does the error span of a refused provider key (FAILED_PRECONDITION, whose
        description stays the reason; it had no ``error.type``)."""
        fake.set_default(Script(status=401))
        async with observed_server(fake, environ={"OTEL_SEMCONV_STABILITY_OPT_IN": "rpc"}) as running:
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(running)
            await until(lambda: bool(running.named(COMPLETE)))
            (complete,) = running.named(COMPLETE)
        attributes = _attrs(complete)
        assert (complete.status.status_code, complete.status.description) == (StatusCode.ERROR, "PROVIDER_AUTH_FAILED")
        assert (attributes["rpc.response.status_code"], attributes.get("error.type")) == (
            "FAILED_PRECONDITION",
            "FAILED_PRECONDITION",
        )

    async def test_health_checks_are_not_traced(self, observed: Observed) -> None:
        """Only RouterService RPCs are traced; a health check leaves no span."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with loopback_channel(observed.server.target) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert observed.finished() == []


class TestRoutingSpan:
    async def test_routing_span_carries_the_decision(self, observed: Observed) -> None:
        """The `route` span is the server span's child with strategy, rule, reasons, candidates and estimate."""
        decision = await observed.client.route(user_chat("write code"), pb.RoutingContext(task_hint="code_generation"))
        (server,) = observed.named("routesvc.v1.RouterService/Route")
        (route,) = observed.named("route")
        assert _parent(route) == server.context.span_id
        attributes = _attrs(route)
        assert attributes["routesvc.selected_model"] == "gpt-4o"
        assert attributes["routesvc.strategy"] == decision.strategy
        assert attributes["routesvc.rule"] == "code_generation"
        assert attributes["routesvc.decision_id"] == decision.decision_id
        assert list(attributes["routesvc.reasons"]) == list(decision.reasons)  # type: ignore[call-overload]
        assert set(attributes["routesvc.candidates"]) == {"gpt-4o-mini", "gpt-4o", "claude-sonnet"}  # type: ignore[arg-type]
        assert Decimal(str(attributes["routesvc.estimated_cost_usd"])) == Decimal(decision.estimated_cost_usd)
        assert isinstance(attributes["routesvc.decision_ms"], float)
        assert isinstance(attributes["routesvc.stage.rules_ms"], float)
        assert "routesvc.stage.default_ms" not in attributes  # the rules decided; the default never ran

    async def test_each_policy_stage_reports_its_own_latency(self, observed: Observed) -> None:
        """When no rule picks, the rules and default stages each put their own time on the routing span."""
        await observed.client.route(user_chat("hello"))
        attributes = _attrs(observed.named("route")[0])
        rules, default, total = (
            float(attributes[key])  # type: ignore[arg-type]
            for key in ("routesvc.stage.rules_ms", "routesvc.stage.default_ms", "routesvc.decision_ms")
        )
        assert min(default, rules) > 0
        assert rules + default <= total


class TestClientSpan:
    async def test_one_chat_span_with_genai_attributes_and_cost(self, observed: Observed, fake: FakeProvider) -> None:
        """The upstream call is a CLIENT span `chat {model}` under the routing span with usage and exact cost."""
        fake.enqueue(Script(input_tokens=1200, cached_input_tokens=200, output_tokens=40, chunk_delay=0.01))
        messages = await _complete(observed)
        completion = messages[-1].completion
        (chat,) = observed.named("chat gpt-4o-mini")
        (route,) = observed.named("route")
        (server,) = observed.named(COMPLETE)
        assert chat.kind is SpanKind.CLIENT
        assert _parent(chat) == route.context.span_id
        attributes = _attrs(chat)
        assert {key: attributes[key] for key in ("gen_ai.operation.name", "gen_ai.provider.name")} == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
        }
        assert (attributes["gen_ai.request.model"], attributes["gen_ai.response.model"]) == (
            "gpt-4o-mini",
            "gpt-4o-mini",
        )
        assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (1200, 40)
        assert attributes["gen_ai.usage.cache_read.input_tokens"] == 200
        assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]  # type: ignore[call-overload]
        assert attributes["gen_ai.usage.cost.currency"] == "USD"
        assert attributes["gen_ai.usage.cost.amount"] == pytest.approx(float(completion.cost_usd))
        assert attributes["routesvc.cost_usd"] == pytest.approx(float(completion.cost_usd))
        assert attributes["routesvc.time_to_first_chunk_ms"] > 0  # type: ignore[operator]
        assert _attrs(server)["routesvc.cost_usd"] == pytest.approx(float(completion.cost_usd))
        assert (_attrs(server)["routesvc.attempts"], _attrs(server)["routesvc.escalations"]) == (1, 0)
        assert _attrs(server)["routesvc.time_to_first_token_ms"] >= attributes["routesvc.time_to_first_chunk_ms"]  # type: ignore[operator]

    async def test_stop_sequences_are_a_request_attribute(self, observed: Observed) -> None:
        """A request's stop sequences are the chat span's ``gen_ai.request.stop_sequences``."""
        async for _ in observed.client.complete(user_chat("Say hello", stop=["END", "7"])):
            pass
        (chat,) = observed.named("chat gpt-4o-mini")
        assert list(_attrs(chat)["gen_ai.request.stop_sequences"]) == ["END", "7"]  # type: ignore[call-overload]

    async def test_a_json_response_format_is_output_type_json(self, observed: Observed) -> None:
        """A request for a JSON answer sets the chat span's ``gen_ai.output.type`` to ``json``."""
        response_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
        async for _ in observed.client.complete(user_chat("Say hello in JSON", response_format=response_format)):
            pass
        (chat,) = observed.named("chat gpt-4o-mini")
        assert _attrs(chat)["gen_ai.output.type"] == "json"

    async def test_the_provider_receives_our_client_span_as_parent(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """Upstream `traceparent` keeps the caller's trace id and names the chat span as parent."""
        await _complete(observed)
        (chat,) = observed.named("chat gpt-4o-mini")
        sent = fake.requests[-1].headers["traceparent"]
        assert sent == f"00-{TRACE_ID}-{format(chat.context.span_id, '016x')}-01"

    async def test_anthropic_attempts_name_their_provider(self, observed: Observed) -> None:
        """A claude-sonnet call is `chat claude-sonnet-4-6` with gen_ai.provider.name anthropic."""
        await _complete(observed, task_hint="creative_writing")
        (chat,) = observed.named("chat claude-sonnet-4-6")
        assert _attrs(chat)["gen_ai.provider.name"] == "anthropic"
        assert _attrs(chat)["routesvc.model"] == "claude-sonnet"

    async def test_a_retried_attempt_is_a_second_client_span_and_costs_add_up(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """A 503 then a success: two chat spans, the failed one an error, and the server total is their sum."""
        fake.enqueue(Script(status=503), Script(input_tokens=100, output_tokens=10))
        messages = await _complete(observed)
        assert messages[-1].WhichOneof("event") == "completion"
        chats = observed.named("chat gpt-4o-mini")
        assert len(chats) == 2
        assert chats[0].status.status_code is StatusCode.ERROR
        assert _attrs(chats[0])["error.type"] == "PROVIDER_UNAVAILABLE"
        assert chats[1].status.status_code is StatusCode.UNSET
        total = sum(float(_attrs(c)["routesvc.cost_usd"]) for c in chats)  # type: ignore[arg-type]
        (server,) = observed.named(COMPLETE)
        assert _attrs(server)["routesvc.cost_usd"] == pytest.approx(total)
        assert total == pytest.approx(float(messages[-1].completion.cost_usd))


class TestServerAddressOfTheSDKDefault:
    @pytest.mark.parametrize(
        ("provider_name", "model_id", "host"),
        [("openai", "gpt-4o-mini", "api.openai.com"), ("anthropic", "claude-sonnet", "api.anthropic.com")],
    )
    async def test_a_provider_without_a_base_url_names_the_sdk_default_host(
        self, fake: FakeProvider, provider_name: str, model_id: str, host: str
    ) -> None:
        """A provider configured without a base URL (nor its SDK's variable) is called at the
        SDK's default host: the client span names it, port 443 (it named no server at all). The
        provider object here is pointed at the fake; the span reads the configuration."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from routesvc.providers.anthropic import AnthropicProvider
        from routesvc.providers.base import ProviderCall
        from routesvc.providers.openai import OpenAIProvider

        settings = settings_from(default_config(), {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-test"})
        assert settings.providers[provider_name].base_url is None
        exporter = InMemorySpanExporter()
        instrumentation = telemetry.Telemetry(settings, span_exporter=exporter)
        provider = (
            OpenAIProvider("openai", "sk-test", fake.openai_base_url)
            if provider_name == "openai"
            else AnthropicProvider("anthropic", "sk-test", fake.anthropic_base_url)
        )
        model = settings.catalog.get(model_id)
        call = ProviderCall(model=model.id, provider_model=model.provider_model, messages=(Message(Role.USER, "hi"),))
        with instrumentation.server_rpc("routesvc.v1.RouterService", "Complete", ()) as rpc:
            async for _ in telemetry.observed_stream(provider, model, call):
                pass
            rpc.finish("OK", 0)
        await provider.aclose()
        instrumentation.shutdown()
        (chat,) = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CLIENT]
        assert (_attrs(chat)["server.address"], _attrs(chat)["server.port"]) == (host, 443)


class TestCancellation:
    async def test_usage_is_recorded_when_the_client_cancels(self, observed: Observed, fake: FakeProvider) -> None:
        """A client that leaves after 3 chunks: the chat span still ends, with usage estimated from
        what was sent and received and flagged, its cost on the server span, status CANCELLED (1)."""
        fake.enqueue(Script(chunk_count=40, chunk_delay=0.05, input_tokens=500))
        stream = observed.client.complete(user_chat("Tell me about tea"))
        deltas = 0
        async for message in stream:
            deltas += message.WhichOneof("event") == "delta"
            if deltas == 3:
                break
        await stream.aclose()
        # The spans end off the caller's task: wait for both, with a cap a loaded machine cannot
        # reach (it was 2 s, for the server span only).
        async with asyncio.timeout(10):
            while not (observed.named(COMPLETE) and observed.named("chat gpt-4o-mini")):  # noqa: ASYNC110 - no span event
                await asyncio.sleep(0.02)
        (server,) = observed.named(COMPLETE)
        (chat,) = observed.named("chat gpt-4o-mini")
        attributes = _attrs(chat)
        assert attributes["routesvc.usage_estimated"] is True
        assert attributes["routesvc.outcome"] == "cancelled"
        assert attributes["gen_ai.usage.input_tokens"] > 0  # type: ignore[operator]
        assert 3 <= attributes["gen_ai.usage.output_tokens"] < 40  # type: ignore[operator]
        assert attributes["routesvc.cost_usd"] > 0  # type: ignore[operator]
        assert chat.status.status_code is StatusCode.UNSET
        assert _attrs(server)["rpc.grpc.status_code"] == 1
        assert _attrs(server)["routesvc.cost_usd"] == attributes["routesvc.cost_usd"]


class TestContent:
    async def test_no_content_attributes_by_default(self, observed: Observed, fake: FakeProvider) -> None:
        """With capture off no span attribute or event holds the prompt or the answer."""
        fake.enqueue(Script(text="the secret answer"))
        await _complete(observed, "the secret question")
        dumped = json.dumps([span.to_json() for span in observed.finished()])
        assert "secret" not in dumped
        assert "gen_ai.input.messages" not in dumped

    async def test_capture_switched_on_records_input_and_output_messages(self, fake: FakeProvider) -> None:
        """telemetry.capture_content puts gen_ai.input.messages and gen_ai.output.messages on the chat span."""
        fake.enqueue(Script(text="the answer"))
        async with observed_server(fake, telemetry={"capture_content": True}) as observed:
            await _complete(observed, "the question")
            (chat,) = observed.named("chat gpt-4o-mini")
        attributes = _attrs(chat)
        assert json.loads(str(attributes["gen_ai.input.messages"])) == [
            {"role": "user", "parts": [{"type": "text", "content": "the question"}]}
        ]
        assert json.loads(str(attributes["gen_ai.output.messages"])) == [
            {"role": "assistant", "parts": [{"type": "text", "content": "the answer"}], "finish_reason": "stop"}
        ]

    async def test_captured_messages_are_bounded_keeping_the_latest(self, fake: FakeProvider) -> None:
        """A 300,000-character system prompt and a short question, with capture on: the input
        attribute keeps the question whole and cuts the system prompt, saying how much it left out
        (the whole prompt became one span attribute, which can make an export batch too large for
        a collector); the answer is kept, as it is short."""
        fake.enqueue(Script(text="the answer"))
        chat = pb.ChatRequest(
            messages=[
                pb.Message(role=pb.ROLE_SYSTEM, content="rules " * 50_000),
                pb.Message(role=pb.ROLE_USER, content="the question"),
            ]
        )
        async with observed_server(fake, telemetry={"capture_content": True}) as observed:
            [m async for m in observed.client.complete(chat, pb.RoutingContext(model="gpt-4o-mini"))]
            (span,) = observed.named("chat gpt-4o-mini")
        system, user = json.loads(str(_attrs(span)["gen_ai.input.messages"]))
        assert user["parts"] == [{"type": "text", "content": "the question"}]
        kept = telemetry.CAPTURE_MAX_CHARS - len("the question")
        left_out = 300_000 - kept
        assert system["parts"][0]["content"] == ("rules " * 50_000)[:kept] + f"[... {left_out} characters not captured]"
        assert "the answer" in str(_attrs(span)["gen_ai.output.messages"])

    async def test_captured_messages_carry_tool_calls_and_results(self, fake: FakeProvider) -> None:
        """With capture on, tool turns are ``tool_call`` and ``tool_call_response`` parts (they were
        left out: a result read as a plain text turn, a call-only turn as empty text), and the
        model's calls are in the output message."""
        fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("lookup", '{"q": "y"}'),)))
        call = pb.ToolCall(id="call_1", name="lookup", arguments_json='{"q": "x"}')
        chat = pb.ChatRequest(
            messages=[
                pb.Message(role=pb.ROLE_USER, content="the question"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="the result"),
            ],
            tools=[pb.Tool(name="lookup")],
        )
        async with observed_server(fake, telemetry={"capture_content": True}) as observed:
            [m async for m in observed.client.complete(chat, pb.RoutingContext(model="gpt-4o-mini"))]
            (span,) = observed.named("chat gpt-4o-mini")
        attributes = _attrs(span)
        assert json.loads(str(attributes["gen_ai.input.messages"]))[1:] == [
            {
                "role": "assistant",
                "parts": [{"type": "tool_call", "id": "call_1", "name": "lookup", "arguments": '{"q": "x"}'}],
            },
            {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "the result"}]},
        ]
        assert json.loads(str(attributes["gen_ai.output.messages"])) == [
            {
                "role": "assistant",
                "parts": [{"type": "tool_call", "id": "call_fake_0", "name": "lookup", "arguments": '{"q": "y"}'}],
                "finish_reason": "tool_call",
            }
        ]


def _two_fallbacks_config(**reliability: object) -> dict[str, object]:
    """The default policy, gpt-4o-mini falling back to gpt-4o then claude-sonnet, no retries."""
    config = default_config()
    config["routing"]["fallbacks"] = {"gpt-4o-mini": ["gpt-4o", "claude-sonnet"]}  # type: ignore[index]
    config["reliability"] = {"retries_per_model": 0, **reliability}
    return config


class TestAttemptsAsTheLedgerHasThem:
    """An attempt's span, the cost metric and GetStats say what the ledger and the caller are told."""

    async def test_an_attempt_that_sends_no_chunk_in_time_is_a_failure_charged_as_the_ledger_has_it(
        self, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini sends nothing within first_token_timeout_seconds and the request falls back
        to gpt-4o: the stalled attempt's span is ERROR PROVIDER_UNAVAILABLE (it said 'cancelled',
        unset), and it is charged its input's estimate (the provider had the prompt) in the span
        and the ledger alike (the ledger charged nothing), so the server span, GetStats and the
        caller's cost agree."""
        fake.enqueue(Script(first_chunk_delay=5.0, input_tokens=100), model="gpt-4o-mini")
        fake.enqueue(Script(input_tokens=100, output_tokens=10), model="gpt-4o")
        async with observed_server(fake, config=_two_fallbacks_config(first_token_timeout_seconds=0.3)) as observed:
            messages = await _complete(observed)
            ledger = observed.server.router.ledger.entries()
            stats = await observed.client.get_stats()
        completion = messages[-1].completion
        (stalled,) = observed.named("chat gpt-4o-mini")
        (server,) = observed.named(COMPLETE)
        assert (completion.model, stalled.status.status_code) == ("gpt-4o", StatusCode.ERROR)
        assert _attrs(stalled)["error.type"] == "PROVIDER_UNAVAILABLE"
        assert (ledger[0].model, ledger[0].estimated, ledger[0].cost_usd > 0) == ("gpt-4o-mini", True, True)
        assert _attrs(stalled)["routesvc.cost_usd"] == pytest.approx(float(ledger[0].cost_usd))
        assert _attrs(server)["routesvc.cost_usd"] == pytest.approx(float(completion.cost_usd))
        assert Decimal(stats.totals.cost_usd) == Decimal(completion.cost_usd) == sum(e.cost_usd for e in ledger)

    async def test_a_call_cancelled_before_its_first_chunk_costs_what_the_ledger_says(self, fake: FakeProvider) -> None:
        """The caller leaves while the provider has sent nothing: span, cost metric and ledger
        agree on an estimate of the prompt (the ledger charged nothing)."""
        fake.enqueue(Script(first_chunk_delay=3.0, input_tokens=100))
        async with observed_server(fake) as observed:
            stream = observed.client.complete(user_chat("Tell me about tea " * 50))
            async for message in stream:
                if message.WhichOneof("event") == "decision":
                    break
            while not fake.requests:  # noqa: ASYNC110 - the fake has no event for a request's arrival
                await asyncio.sleep(0.01)
            await stream.aclose()
            while not observed.named(COMPLETE):  # noqa: ASYNC110 - the span ends when the handler does
                await asyncio.sleep(0.02)
            ledger = observed.server.router.ledger.entries()
            cost_metric = sum(p.value for p in observed.points("routesvc.cost"))
        (chat,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
        (server,) = observed.named(COMPLETE)
        assert [(e.outcome.value, e.estimated, e.cost_usd > 0) for e in ledger] == [("cancelled", True, True)]
        spent = float(ledger[0].cost_usd)
        assert (_attrs(chat)["routesvc.cost_usd"], _attrs(server)["routesvc.cost_usd"], cost_metric) == (spent,) * 3

    async def test_a_stream_cut_after_sub_word_chunks_is_estimated_as_the_ledger_has_it(
        self, fake: FakeProvider
    ) -> None:
        """Cut by the idle timer after four sub-word chunks: the span counts the output from the
        chunks joined, as the ledger does (it counted each chunk apart: 4 tokens for "Hello wor"
        and "ld", the ledger 2), so its cost is the ledger's."""
        fake.enqueue(Script(chunks=("Hel", "lo", " wor", "ld", "!"), fault=Fault.HANG, fault_after=4))
        config = default_config()
        config["reliability"] = {"retries_per_model": 0, "max_attempts": 1, "stream_idle_timeout_seconds": 1.0}
        async with observed_server(fake, config=config) as observed:
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(observed, model="gpt-4o-mini")
            (entry,) = observed.server.router.ledger.entries()
        (chat,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
        usage = (_attrs(chat)["gen_ai.usage.input_tokens"], _attrs(chat)["gen_ai.usage.output_tokens"])
        assert usage == (entry.usage.input_tokens, entry.usage.output_tokens)
        assert _attrs(chat)["routesvc.cost_usd"] == pytest.approx(float(entry.cost_usd))

    async def test_a_stalled_json_schema_request_counts_its_schema_as_the_ledger_does(self, fake: FakeProvider) -> None:
        """A JSON-schema request whose attempt stalls: the span's input estimate counts the
        schema, as the router's does (it left it out: 9 tokens against 822)."""
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        properties = {f"field_{i}": {"type": "string", "description": f"field number {i}"} for i in range(40)}
        schema = {"type": "object", "properties": properties, "additionalProperties": False}
        response_format = pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="fields", schema_json=json.dumps(schema)
        )
        config = default_config()
        config["reliability"] = {"retries_per_model": 0, "max_attempts": 1, "first_token_timeout_seconds": 1.0}
        async with observed_server(fake, config=config) as observed:
            chat = user_chat("Give me JSON", response_format=response_format)
            with pytest.raises(grpc.aio.AioRpcError):
                [m async for m in observed.client.complete(chat, pb.RoutingContext(model="gpt-4o-mini"))]
            (entry,) = observed.server.router.ledger.entries()
        (span,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
        assert entry.usage.input_tokens > 500
        assert _attrs(span)["gen_ai.usage.input_tokens"] == entry.usage.input_tokens

    async def test_a_stalled_image_request_counts_the_image_at_the_models_scale(self, fake: FakeProvider) -> None:
        """An image request to gpt-4o-mini whose attempt stalls: the ledger and the span estimate
        its input with the image at gpt-4o-mini's ``image_token_scale`` (8,500 tokens for an image
        of 255), as the decision's estimate does."""
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        image = pb.ContentPart(image=pb.Image(data=png(200, 100), media_type="image/png"))
        chat = build_chat([pb.Message(role=pb.ROLE_USER, content="What is it?", parts=[image])])
        config = default_config()
        config["reliability"] = {"retries_per_model": 0, "max_attempts": 1, "first_token_timeout_seconds": 1.0}
        async with observed_server(fake, config=config) as observed:
            decision = await observed.client.route(chat, pb.RoutingContext(model="gpt-4o-mini"))
            with pytest.raises(grpc.aio.AioRpcError):
                [m async for m in observed.client.complete(chat, pb.RoutingContext(model="gpt-4o-mini"))]
            (entry,) = observed.server.router.ledger.entries()
        (span,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
        assert entry.usage.input_tokens == decision.estimated_input_tokens - 255 + 8500
        assert _attrs(span)["gen_ai.usage.input_tokens"] == entry.usage.input_tokens

    async def test_a_fallback_is_counted_only_when_its_model_is_called(self, fake: FakeProvider) -> None:
        """max_attempts 1: gpt-4o-mini fails 503 and no other attempt may start, so no fallback
        happened: none in the routing span's events, the metric, the server span or GetStats
        (one was counted for each model left in the chain)."""
        fake.enqueue(Script(status=503), model="gpt-4o-mini")
        async with observed_server(fake, config=_two_fallbacks_config(max_attempts=1)) as observed:
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(observed)
            stats = await observed.client.get_stats()
            points = observed.points("routesvc.fallbacks")
        (route,) = observed.named("route")
        (server,) = observed.named(COMPLETE)
        assert [s.name for s in observed.finished() if s.kind is SpanKind.CLIENT] == ["chat gpt-4o-mini"]
        assert [e.name for e in route.events if e.name == "routesvc.fallback"] == []
        assert (_attrs(server)["routesvc.fallbacks"], sum(p.value for p in points), stats.fallbacks) == (0, 0, 0)

    async def test_a_fallback_that_is_called_is_counted_once(self, fake: FakeProvider) -> None:
        """gpt-4o-mini fails 503 and gpt-4o answers: one fallback, to gpt-4o, everywhere."""
        fake.enqueue(Script(status=503), model="gpt-4o-mini")
        async with observed_server(fake, config=_two_fallbacks_config()) as observed:
            await _complete(observed)
            stats = await observed.client.get_stats()
        (route,) = observed.named("route")
        (server,) = observed.named(COMPLETE)
        events = [dict(e.attributes or {}) for e in route.events if e.name == "routesvc.fallback"]
        assert [e["routesvc.to_model"] for e in events] == ["gpt-4o"]
        assert (_attrs(server)["routesvc.fallbacks"], stats.fallbacks) == (1, 1)


class TestEvents:
    def test_fallbacks_and_escalations_are_events_and_counted_on_the_server_span(self) -> None:
        """record_fallback / record_escalation add events to the routing span and counts to the server span."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        settings = settings_from(default_config())
        exporter = InMemorySpanExporter()
        instrumentation = telemetry.Telemetry(settings, span_exporter=exporter)
        request = RoutingRequest(ChatRequest((Message(Role.USER, "hi"),)), RoutingContext(tenant="acme"))
        with instrumentation.server_rpc("routesvc.v1.RouterService", "Complete", ()) as rpc:
            telemetry.start_routing(request)
            telemetry.record_fallback("gpt-4o-mini", "gpt-4o", "PROVIDER_UNAVAILABLE")
            telemetry.record_escalation("gpt-4o-mini", "gpt-4o", "score below threshold", score=0.42)
            rpc.finish("OK", 0)
        instrumentation.shutdown()
        spans = {span.name: span for span in exporter.get_finished_spans()}
        events = [(e.name, dict(e.attributes or {})) for e in spans["route"].events]
        assert events == [
            (
                "routesvc.fallback",
                {
                    "routesvc.from_model": "gpt-4o-mini",
                    "routesvc.to_model": "gpt-4o",
                    "routesvc.reason": "PROVIDER_UNAVAILABLE",
                },
            ),
            (
                "routesvc.escalation",
                {
                    "routesvc.from_model": "gpt-4o-mini",
                    "routesvc.to_model": "gpt-4o",
                    "routesvc.reason": "score below threshold",
                    "routesvc.score": 0.42,
                },
            ),
        ]
        server = _attrs(spans["routesvc.v1.RouterService/Complete"])
        assert (server["routesvc.fallbacks"], server["routesvc.escalations"]) == (1, 1)
        assert spans["route"].status.status_code is StatusCode.UNSET

    async def test_a_failed_cascade_step_records_no_score(self, fake: FakeProvider) -> None:
        """gpt-4o-mini fails 503 twice in a cascade: the escalation event and the route span carry
        no score, as for an answer no scorer scored (there was no answer: they said 0.0, as if a
        scorer had judged one useless)."""
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        async with observed_server(fake) as observed:
            messages = await _complete(observed, cascade=True, task_hint="simple_qa")
        assert messages[-1].completion.model == "gpt-4o"
        (route,) = observed.named("route")
        events = [dict(e.attributes or {}) for e in route.events if e.name == "routesvc.escalation"]
        assert events == [
            {
                "routesvc.from_model": "gpt-4o-mini",
                "routesvc.to_model": "gpt-4o",
                "routesvc.reason": "none: gpt-4o-mini failed (PROVIDER_UNAVAILABLE)",
            }
        ]
        attributes = _attrs(route)
        assert (attributes["routesvc.cascade.released"], "routesvc.cascade.score" in attributes) == (False, False)

    def test_the_hooks_do_nothing_outside_an_rpc(self) -> None:
        """Outside an RPC (simulate, unit tests) the hooks are silent no-ops."""
        telemetry.record_fallback("a", "b", "PROVIDER_UNAVAILABLE")
        telemetry.record_retry("a", "PROVIDER_UNAVAILABLE", 0.1)
        telemetry.record_escalation("a", "b", "low score", 0.1)
        telemetry.record_cascade(True, 0.9)
        assert telemetry.current_request() is None


def _fallback_config() -> dict[str, object]:
    config = default_config()
    routing = config["routing"]
    assert isinstance(routing, dict)
    routing["fallbacks"] = {"gpt-4o-mini": ["gpt-4o"]}
    config["reliability"] = {"retries_per_model": 0}
    return config


class TestFallback:
    async def test_a_fallback_is_an_event_with_a_client_span_per_model(self, fake: FakeProvider) -> None:
        """gpt-4o-mini fails 503, gpt-4o answers: two chat spans, one routesvc.fallback event, counted."""
        fake.enqueue(Script(status=503), model="gpt-4o-mini")
        async with observed_server(fake, config=_fallback_config()) as observed:
            messages = await _complete(observed)
            stats = await observed.client.get_stats()
        assert messages[-1].completion.model == "gpt-4o"
        (failed,) = observed.named("chat gpt-4o-mini")
        (answered,) = observed.named("chat gpt-4o")
        (route,) = observed.named("route")
        (server,) = observed.named(COMPLETE)
        assert _parent(failed) == _parent(answered) == route.context.span_id
        assert [(e.name, dict(e.attributes or {})) for e in route.events] == [
            (
                "routesvc.fallback",
                {
                    "routesvc.from_model": "gpt-4o-mini",
                    "routesvc.to_model": "gpt-4o",
                    "routesvc.reason": "PROVIDER_UNAVAILABLE",
                },
            )
        ]
        assert route.status.status_code is StatusCode.UNSET
        assert server.status.status_code is StatusCode.UNSET
        assert _attrs(server)["routesvc.fallbacks"] == 1
        assert stats.fallbacks == 1

    @pytest.mark.parametrize(("mini_wait", "gpt_4o_wait"), [(5, 40), (40, 5)])
    async def test_a_fallback_past_open_breakers_is_from_the_model_just_before_it(
        self, fake: FakeProvider, mini_wait: int, gpt_4o_wait: int
    ) -> None:
        """gpt-4o-mini falls back to gpt-4o then claude-sonnet; both first models' breakers are
        open (by a 503's Retry-After each), so claude-sonnet answers: its fallback is from gpt-4o,
        the model before it in the chain, whichever breaker lets a probe through sooner (it was
        from the soonest, the model the caller's RetryInfo would name), in the event and the
        metric. So too for the request whose gpt-4o-mini failed and whose gpt-4o was refused (it
        was from gpt-4o-mini, the failure the caller would be told of)."""
        config = _two_fallbacks_config(breaker={"failure_threshold": 1, "open_seconds": 1, "max_open_seconds": 60})
        fake.enqueue(Script(status=503, retry_after=str(gpt_4o_wait)), model="gpt-4o")
        fake.enqueue(Script(status=503, retry_after=str(mini_wait)), model="gpt-4o-mini")
        async with observed_server(fake, config=config) as observed:
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(observed, model="gpt-4o")  # gpt-4o's own chain has no fallback
            await _complete(observed, model="gpt-4o-mini")  # mini fails, gpt-4o refused, claude
            messages = await _complete(observed, model="gpt-4o-mini")  # both refused, claude
            points = observed.points("routesvc.fallbacks")
        assert messages[-1].completion.model == "claude-sonnet"
        last = observed.named("route")[-1]
        events = [dict(e.attributes or {}) for e in last.events if e.name == "routesvc.fallback"]
        expected = {
            "routesvc.from_model": "gpt-4o",
            "routesvc.to_model": "claude-sonnet",
            "routesvc.reason": "PROVIDER_UNAVAILABLE",
        }
        assert events == [expected]
        assert {tuple(sorted(dict(p.attributes).items())): p.value for p in points} == {
            tuple(sorted(expected.items())): 2
        }


class TestRetry:
    async def test_a_retry_on_the_same_model_is_an_event_with_its_wait(self, fake: FakeProvider) -> None:
        """gpt-4o-mini fails 503, then answers: one routesvc.retry event on the routing span naming
        the model, the failure's reason and the wait before the retry (the first backoff: at most
        backoff_seconds), no fallback."""
        fake.enqueue(Script(status=503), Script(), model="gpt-4o-mini")
        async with observed_server(fake) as observed:
            messages = await _complete(observed)
        assert messages[-1].completion.model == "gpt-4o-mini"
        (route,) = observed.named("route")
        (retry,) = [dict(e.attributes or {}) for e in route.events if e.name == "routesvc.retry"]
        delay = retry.pop("routesvc.retry_delay_seconds")
        assert retry == {"routesvc.model": "gpt-4o-mini", "routesvc.reason": "PROVIDER_UNAVAILABLE"}
        assert isinstance(delay, float)
        assert 0 <= delay <= ReliabilityConfig().backoff_seconds
        assert [e.name for e in route.events if e.name == "routesvc.fallback"] == []


class TestPurpose:
    async def test_a_judge_call_costs_but_does_not_set_the_baseline(self, fake: FakeProvider) -> None:
        """A cascade's judge call is a client span with routesvc.purpose=judge: its cost is added to the
        request's, but the baseline prices the answer's usage only."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from routesvc.cost import cost_of_usage
        from routesvc.models import Usage
        from routesvc.providers.base import ProviderCall
        from routesvc.providers.openai import OpenAIProvider
        from tests.conftest import live_environ

        settings = settings_from(default_config(), live_environ(fake))
        exporter = InMemorySpanExporter()
        instrumentation = telemetry.Telemetry(settings, span_exporter=exporter)
        provider = OpenAIProvider("openai", "sk-test-openai", fake.openai_base_url, "openai")
        mini = settings.catalog.get("gpt-4o-mini")
        call = ProviderCall(model=mini.id, provider_model=mini.provider_model, messages=(Message(Role.USER, "hi"),))
        fake.enqueue(Script(input_tokens=1000, output_tokens=100), Script(input_tokens=2000, output_tokens=10))
        with instrumentation.server_rpc("routesvc.v1.RouterService", "Complete", ()) as rpc:
            async for _ in telemetry.observed_stream(provider, mini, call):
                pass
            async for _ in telemetry.observed_stream(provider, mini, call, purpose="judge"):
                pass
            cost, baseline = rpc.cost, rpc.baseline_cost
            rpc.finish("OK", 0)
        await provider.aclose()
        instrumentation.shutdown()
        answer, judge = Usage(input_tokens=1000, output_tokens=100), Usage(input_tokens=2000, output_tokens=10)
        assert cost == cost_of_usage(mini, answer) + cost_of_usage(mini, judge)
        assert baseline == cost_of_usage(settings.catalog.get("claude-sonnet"), answer)
        purposes = [
            dict(s.attributes or {})["routesvc.purpose"]
            for s in exporter.get_finished_spans()
            if s.name.startswith("chat")
        ]
        assert purposes == ["answer", "judge"]


def _llm_classifier_config(timeout_s: float) -> dict[str, object]:
    config = default_config()
    config["routing"]["stages"][0] = {  # type: ignore[index]
        "kind": "classifier",
        "method": "llm",
        "model": "gpt-4o-mini",
        "timeout_s": timeout_s,
    }
    return config


def _duration_error_types(observed: Observed) -> list[object]:
    return [dict(p.attributes).get("error.type") for p in observed.points("gen_ai.client.operation.duration")]


class TestSideCallsOurTimersGiveUpOn:
    async def test_an_llm_classifier_call_past_its_timeout_is_a_failed_span(self, fake: FakeProvider) -> None:
        """The classifier gives up on a silent model (its timeout_s): like an answer the router's
        timers gave up on, its span is ERROR with error.type=PROVIDER_UNAVAILABLE, and so is the
        duration metric's point (both said 'cancelled', as for a caller that left)."""
        fake.enqueue(Script(text='{"task": "summarization", "complexity": "low"}', first_chunk_delay=5))
        async with observed_server(fake, config=_llm_classifier_config(0.2)) as observed:
            decision = await observed.client.route(user_chat("Summarise this report."))
            (client,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
            error_types = _duration_error_types(observed)
        attributes = _attrs(client)
        assert "timed out" in decision.reasons[0]
        assert (client.status.status_code, client.status.description) == (StatusCode.ERROR, "PROVIDER_UNAVAILABLE")
        assert (attributes["error.type"], attributes["routesvc.outcome"]) == ("PROVIDER_UNAVAILABLE",) * 2
        assert attributes["routesvc.usage_estimated"] is True
        assert error_types == ["PROVIDER_UNAVAILABLE"]

    async def test_a_judge_call_past_its_timeout_is_a_failed_span(self, fake: FakeProvider) -> None:
        """A cascade judge that says nothing within cascade.judge.timeout_seconds: its span is an
        ERROR with error.type=PROVIDER_UNAVAILABLE; the answer's span is not."""
        config = default_config()
        config["cascade"]["judge"]["timeout_seconds"] = 0.2  # type: ignore[index]
        fake.enqueue(Script(text="cheap answer", input_tokens=100, output_tokens=10))
        fake.enqueue(Script(text='{"score": 0.9}', first_chunk_delay=5))
        async with observed_server(fake, config=config) as observed:
            await _complete(observed, cascade=True, task_hint="simple_qa")
            spans = {_attrs(span)["routesvc.purpose"]: span for span in observed.named("chat gpt-4o-mini")}
            error_types = _duration_error_types(observed)
        assert spans["answer"].status.status_code is StatusCode.UNSET
        assert spans["judge"].status.status_code is StatusCode.ERROR
        assert _attrs(spans["judge"])["error.type"] == "PROVIDER_UNAVAILABLE"
        assert error_types.count("PROVIDER_UNAVAILABLE") == 1

    async def test_a_classifier_call_the_caller_left_is_still_cancelled(self, fake: FakeProvider) -> None:
        """A caller that leaves while the classifier waits on its model: the call's span says
        'cancelled' (no error status), as any attempt a caller ended does."""
        fake.enqueue(Script(text='{"task": "summarization", "complexity": "low"}', first_chunk_delay=5))
        async with observed_server(fake, config=_llm_classifier_config(30)) as observed:
            routing = asyncio.ensure_future(observed.client.route(user_chat("Summarise this report.")))
            await until(lambda: bool(fake.requests))
            routing.cancel()
            await until(lambda: any(span.kind is SpanKind.CLIENT for span in observed.finished()))
            (client,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
        assert client.status.status_code is StatusCode.UNSET
        assert _attrs(client)["error.type"] == "cancelled"


class TestExport:
    async def test_an_llm_classifier_call_is_a_client_span_of_the_route(self, fake: FakeProvider) -> None:
        """With the llm classifier method, a Route's labelling call to gpt-4o-mini is a CLIENT span
        (routesvc.purpose=classifier) under the routing span, with its usage and cost; the model
        is sent the part of a huge prompt the local classifier reads, not all of it."""
        config = default_config()
        config["routing"]["stages"][0] = {"kind": "classifier", "method": "llm", "model": "gpt-4o-mini"}  # type: ignore[index]
        fake.enqueue(Script(text='{"task": "summarization", "complexity": "low"}', input_tokens=900, output_tokens=12))
        async with observed_server(fake, config=config) as observed:
            await observed.client.route(user_chat("Summarise this report. " + "word " * 20_000))
            (client,) = [span for span in observed.finished() if span.kind is SpanKind.CLIENT]
            (route,) = observed.named("route")
            (server,) = observed.named("routesvc.v1.RouterService/Route")
        attributes = _attrs(client)
        assert (attributes["routesvc.purpose"], attributes["gen_ai.usage.input_tokens"]) == ("classifier", 900)
        assert _parent(client) == route.context.span_id
        assert Decimal(str(attributes["routesvc.cost_usd"])) > 0
        # The Route paid for that call: its server span says what it cost (it said nothing).
        assert (_attrs(server)["routesvc.cost_usd"], _attrs(server)["routesvc.attempts"]) == (
            attributes["routesvc.cost_usd"],
            1,
        )
        sent = fake.requests[0].body["messages"][-1]["content"]
        assert len(sent) <= 8_000

    async def test_a_collector_that_is_down_delays_shutdown_by_seconds_only(self, fake: FakeProvider) -> None:
        """OTLP traces to a collector that takes the connection and never answers, metrics to a
        closed port: requests are unaffected, and with the span queue full (2048 spans, four
        batches of 512, each export attempt waiting out its 3 s timeout: 12 s and more) the
        server still stops within a few seconds, the flush cut short and logged."""
        import socket
        import time

        from structlog.testing import capture_logs

        from routesvc.client import RouterClient
        from routesvc.server import Server
        from tests.conftest import free_port, live_environ

        config = default_config()
        with socket.create_server(("127.0.0.1", 0)) as silent:
            config["telemetry"] = {
                "tracing": {"exporter": "otlp", "otlp_endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}"},
                "metrics": {"exporter": "otlp", "otlp_endpoint": f"http://127.0.0.1:{free_port()}"},
            }
            server = Server(settings_from(config, live_environ(fake)), port=0)
            await server.start()
            try:
                async with RouterClient(server.target) as client:
                    messages = [m async for m in client.complete(user_chat("hi"))]
                for number in range(2048):
                    server.telemetry.tracer.start_span(f"queued {number}").end()
            finally:
                started = time.monotonic()
                with capture_logs() as logs:
                    await server.aclose()
                took = time.monotonic() - started
        assert messages[-1].WhichOneof("event") == "completion"
        assert took < 8
        assert [entry["unfinished"] for entry in logs if entry["event"] == "telemetry_flush_cut_short"] == [
            ["routesvc-telemetry-traces"]
        ]
