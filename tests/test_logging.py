"""JSON log lines: what `routesvc serve` writes to stdout, and what it never writes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from decimal import Decimal

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from routesvc.client import RouterClient
from routesvc.config import LoggingConfig
from routesvc.cost import format_usd
from routesvc.server import Server
from routesvc.telemetry import configure_logging
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat

SECRET = "canary-prompt-in-a-local-41c7"


def _logged_lines(monkeypatch: pytest.MonkeyPatch, emit: object) -> list[dict[str, object]]:
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8")
    monkeypatch.setattr("sys.stdout", stdout)
    configure_logging(LoggingConfig(level="info", format="json"))
    assert callable(emit)
    emit()
    stdout.flush()
    return [json.loads(line) for line in raw.getvalue().decode("utf-8").splitlines()]


class TestJsonLines:
    def test_a_line_is_one_json_object_with_level_timestamp_and_fields(self, monkeypatch: pytest.MonkeyPatch) -> None:
        lines = _logged_lines(
            monkeypatch, lambda: structlog.get_logger("t").info("rpc_finished", method="Route", duration_ms=0.5)
        )
        assert len(lines) == 1
        line = lines[0]
        assert (line["event"], line["level"], line["method"], line["duration_ms"]) == (
            "rpc_finished",
            "info",
            "Route",
            0.5,
        )
        assert str(line["timestamp"]).endswith("Z")

    def test_a_traceback_carries_no_local_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A handler's locals can hold the prompt or a key: tracebacks name frames, never values."""

        def handler(prompt: str) -> None:
            try:
                raise RuntimeError("a bug")
            except RuntimeError:
                structlog.get_logger("t").exception("rpc_internal_error", method="Route")

        lines = _logged_lines(monkeypatch, lambda: handler(SECRET))
        assert len(lines) == 1
        frames = lines[0]["exception"][0]["frames"]  # type: ignore[index]
        assert any(frame["name"] == "handler" for frame in frames)
        assert all("locals" not in frame for frame in frames)
        assert SECRET not in json.dumps(lines)

    def test_values_orjson_refuses_still_make_a_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Non-string keys, integers past 64 bits and unknown types never make a log call raise."""
        lines = _logged_lines(
            monkeypatch,
            lambda: structlog.get_logger("t").info("odd", counts={1: 2}, big=2**70, cost=Decimal("0.5")),
        )
        assert (lines[0]["counts"], lines[0]["big"], lines[0]["cost"]) == ({"1": 2}, 2**70, "Decimal('0.5')")


class TestThirdPartyLines:
    def test_a_libraries_warning_is_a_json_line_on_stderr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A warning a library logs through the standard library (an OTel exporter that cannot
        reach its collector) is a JSON line on stderr with level, logger and timestamp (it was
        plain text a JSON log pipeline could not read); its traceback carries no locals; the
        library's debug and info lines stay out."""
        stderr = io.StringIO()
        monkeypatch.setattr("sys.stderr", stderr)
        configure_logging(LoggingConfig(level="debug", format="json"))
        library = logging.getLogger("opentelemetry.exporter.otlp")
        library.info("sending %s", "a request body")

        def export(secret: str) -> None:
            raise ConnectionError("collector unreachable")

        try:
            export(SECRET)
        except ConnectionError:
            library.warning("Failed to export %s", "spans", exc_info=True)
        (line,) = [json.loads(text) for text in stderr.getvalue().splitlines()]
        assert (line["event"], line["level"], line["logger"]) == (
            "Failed to export spans",
            "warning",
            "opentelemetry.exporter.otlp",
        )
        assert str(line["timestamp"]).endswith("Z")
        assert line["exception"][0]["exc_type"] == "ConnectionError"
        assert SECRET not in stderr.getvalue()

    def test_a_library_at_its_own_debug_level_prints_only_its_warnings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The SDKs set their own loggers to DEBUG under ANTHROPIC_LOG / OPENAI_LOG=debug (the
        root's WARNING then does not hold their records back): their debug and info lines, which
        carry URLs and response headers, still never print; their warnings do."""
        stderr = io.StringIO()
        monkeypatch.setattr("sys.stderr", stderr)
        configure_logging(LoggingConfig(level="debug", format="json"))
        library = logging.getLogger("openai._base_client")
        library.setLevel(logging.DEBUG)  # as the SDK's setup_logging sets it
        try:
            library.debug("HTTP Response: POST %s Headers(%s)", "https://api.openai.com/v1", "...")
            library.info("Retrying request to %s", "/chat/completions")
            library.warning("connection pool is full")
        finally:
            library.setLevel(logging.NOTSET)
        assert [json.loads(text)["event"] for text in stderr.getvalue().splitlines()] == ["connection pool is full"]

    def test_a_libraries_warning_inside_an_rpc_names_its_request_and_decision(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A library's warning logged while an RPC runs (its ids bound, as the service binds them)
        carries its request id and decision id, as routesvc's own lines do (it had neither)."""
        stderr = io.StringIO()
        monkeypatch.setattr("sys.stderr", stderr)
        configure_logging(LoggingConfig(level="info", format="json"))
        with structlog.contextvars.bound_contextvars(request_id="request-a", decision_id="decision-a"):
            logging.getLogger("httpx").warning("connection reset")
        (line,) = [json.loads(text) for text in stderr.getvalue().splitlines()]
        assert (line["event"], line.get("request_id"), line.get("decision_id")) == (
            "connection reset",
            "request-a",
            "decision-a",
        )


class TestLinesOfAnRpc:
    async def test_lines_logged_inside_concurrent_calls_name_their_own_request_and_decision(
        self, fake: FakeProvider
    ) -> None:
        """Two Completes at once, each first refused 503 and then answered without usage: the
        lines logged inside each (the attempts, the usage estimate) carry its own request id and
        decision id, as its ``rpc_finished`` does (they carried neither, and with tracing off no
        trace id either, so they could not be told apart)."""
        fake.set_default(Script(omit_usage=True, chunk_count=5, chunk_delay=0.02))
        fake.enqueue(Script(status=503), Script(status=503))
        settings = settings_from(default_config(), live_environ(fake))
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:

                async def complete(request_id: str) -> None:
                    chat = user_chat("hello")
                    metadata = {"x-request-id": request_id}
                    [m async for m in client.complete(chat, pb.RoutingContext(), metadata=metadata)]

                await asyncio.gather(complete("request-a"), complete("request-b"))
        finished = {line["request_id"]: line["decision_id"] for line in logs if line["event"] == "rpc_finished"}
        inside = [line for line in logs if line["event"] in ("provider_attempt_finished", "provider_usage_estimated")]
        assert sorted(finished) == ["request-a", "request-b"]
        assert len(inside) == 6  # per call: the refused attempt, the answer and its estimate
        for line in inside:
            assert line["decision_id"] == finished[str(line["request_id"])], line

    async def test_rpc_finished_carries_what_the_whole_request_spent(self, fake: FakeProvider) -> None:
        """Each Complete's ``rpc_finished`` line has the tokens and cost of every attempt the
        ledger charges the request for: a cascade's cheap answer, its judge and the stronger
        model's answer (it had the last answer's tokens beside the request's cost), and a stream
        cut after text, which fails UNAVAILABLE (it had neither)."""
        fake.enqueue(
            Script(text="Lyon maybe", input_tokens=10, output_tokens=2),
            Script(text='{"score": 0.1}', input_tokens=50, output_tokens=5),
            model="gpt-4o-mini",
        )
        fake.enqueue(Script(text="Paris.", input_tokens=10, output_tokens=1), model="gpt-4o")
        settings = settings_from(default_config(), live_environ(fake))
        with capture_logs() as logs:
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                cascade = [
                    m
                    async for m in client.complete(
                        user_chat("What is the capital of France?"),
                        pb.RoutingContext(cascade=True),
                        metadata={"x-request-id": "cascade"},
                    )
                ]
                fake.enqueue(Script(chunk_count=6, fault=Fault.CUT, fault_after=3), model="gpt-4o-mini")
                cut: list[pb.CompleteResponse] = []

                async def read_cut() -> None:
                    chat, pinned = user_chat("hello there"), pb.RoutingContext(model="gpt-4o-mini")
                    async for message in client.complete(chat, pinned, metadata={"x-request-id": "cut"}):
                        cut.append(message)

                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await read_cut()
                ledger = server.router.ledger
                charged = {
                    request_id: ledger.entries(messages[0].decision.decision_id)
                    for request_id, messages in (("cascade", cascade), ("cut", cut))
                }
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [len(entries) for entries in charged.values()] == [3, 1]
        finished = {line["request_id"]: line for line in logs if line["event"] == "rpc_finished"}
        for request_id, entries in charged.items():
            line = finished[request_id]
            expected = (
                sum(entry.usage.input_tokens for entry in entries),
                sum(entry.usage.output_tokens for entry in entries),
                format_usd(sum((entry.cost_usd for entry in entries), Decimal(0))),
            )
            assert expected == (line.get("input_tokens"), line.get("output_tokens"), line.get("cost_usd")), request_id
