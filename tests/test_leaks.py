"""Canary leak test (RELIABILITY.md item 20): a canary prompt and a canary provider key go through
success and error paths of a real `routesvc serve` process with debug logging, span export,
metric export and a Prometheus endpoint switched on; neither appears in any sink.

The sinks are the process's stdout (JSON logs), its stderr (console span and metric exporters),
the Prometheus page, and what the client receives (messages, error details, trailers). Each sink
is first shown to hold data, so an empty sink cannot pass the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from routesvc.client import RouterClient
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import REPO, default_config, user_chat

CANARY_PROMPT = "canary-prompt-7f3a9c1e"
CANARY_KEY = "sk-canary-key-5b8d2e"
CLIENT_KEY = "client-canary-credential-93c1"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

pytestmark = pytest.mark.slow


@dataclass
class Served:
    """A `routesvc serve` process and where its output goes."""

    process: subprocess.Popen[bytes]
    target: str
    metrics_url: str
    stdout: Path
    stderr: Path
    received: list[str] = field(default_factory=list)

    def stop(self) -> tuple[str, str]:
        """SIGTERM, wait, and return everything the process wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        return self.stdout.read_text(errors="replace"), self.stderr.read_text(errors="replace")


def _wait_for_lines(path: Path, events: set[str], process: subprocess.Popen[bytes]) -> dict[str, dict[str, str]]:
    deadline = time.monotonic() + 30
    found: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline and process.poll() is None:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") in events:
                    found[record["event"]] = record
        if set(found) == events:
            return found
        time.sleep(0.05)
    raise AssertionError(f"server did not log {events}: {path.read_text(errors='replace')[-2000:]}")


@pytest.fixture
async def served(fake: FakeProvider, tmp_path: Path) -> AsyncIterator[Served]:
    """`routesvc serve` with debug JSON logs, console span and metric exporters and /metrics."""
    config = default_config()
    config["logging"] = {"level": "debug", "format": "json"}
    # Every failure path runs against the same model; keep its breaker closed throughout.
    config["reliability"] = {"breaker": {"failure_threshold": 100}}
    config["telemetry"] = {
        "tracing": {"exporter": "console"},
        "metrics": {"exporter": "console", "export_interval_seconds": 0.2, "prometheus_port": 0},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "ROUTESVC_", "OTEL_"))}
    env.update(
        OPENAI_API_KEY=CANARY_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        ANTHROPIC_API_KEY=CANARY_KEY,
        ANTHROPIC_BASE_URL=fake.anthropic_base_url,
    )
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once; output goes to files, nothing blocks
            [sys.executable, "-m", "routesvc", "serve", "--config", str(config_path), "--port", "0"],
            cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    served = None
    try:
        started = await asyncio.to_thread(
            _wait_for_lines, stdout, {"server_started", "prometheus_endpoint_started"}, process
        )
        served = Served(
            process,
            started["server_started"]["target"],
            started["prometheus_endpoint_started"]["url"],
            stdout,
            stderr,
        )
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _drive(client: RouterClient, served: Served, context: pb.RoutingContext | None = None, **kw: float) -> None:
    """One Complete with the canary prompt; whatever the client sees is kept for inspection."""
    call_metadata = {"traceparent": TRACEPARENT}
    try:
        async for message in client.complete(
            user_chat(f"Please answer: {CANARY_PROMPT}"), context, metadata=call_metadata, **kw
        ):
            if message.WhichOneof("event") != "delta":
                served.received.append(str(message))
    except grpc.aio.AioRpcError as error:
        served.received.append(f"{error.code()} {error.details()} {error.trailing_metadata()}")


async def _cancel_mid_stream(client: RouterClient, served: Served) -> None:
    stream = client.complete(user_chat(CANARY_PROMPT))
    async for message in stream:
        if message.WhichOneof("event") == "delta":
            break
    await stream.aclose()


class TestCanaries:
    async def test_no_canary_in_any_sink(self, served: Served, fake: FakeProvider) -> None:
        """Success, provider errors that echo prompt and key, cuts, cancels and deadlines leave no canary
        in logs, spans, metrics, the scrape page or anything the client receives; the client's own
        credential never goes upstream."""
        fake.enqueue(Script(status=401), model="gpt-4o-mini")  # echoes prompt and key
        fake.enqueue(Script(status=400), model="gpt-4o-mini")
        fake.enqueue(*(Script(status=503) for _ in range(4)), model="gpt-4o-mini")
        fake.enqueue(Script(chunk_count=5, fault=Fault.ERROR_EVENT, fault_after=2), model="gpt-4o-mini")
        fake.enqueue(Script(chunk_count=6, fault=Fault.CUT, fault_after=3), model="gpt-4o-mini")
        fake.enqueue(Script(chunk_count=50, chunk_delay=0.05), model="gpt-4o-mini")  # cancelled by the client
        fake.enqueue(Script(first_chunk_delay=3), model="gpt-4o-mini")  # deadline
        fake.enqueue(Script(status=401), model="claude-sonnet-4-6")
        async with RouterClient(served.target, api_key=CLIENT_KEY) as client:
            await _drive(client, served)  # 401
            await _drive(client, served)  # 400
            await _drive(client, served)  # 503 until retries run out
            await _drive(client, served)  # in-band error after content
            await _drive(client, served)  # cut after content
            await _cancel_mid_stream(client, served)
            await _drive(client, served, timeout=0.5)  # deadline before the first chunk
            await _drive(client, served, pb.RoutingContext(task_hint="creative_writing"))  # anthropic 401
            await _drive(client, served)  # success
            await _drive(client, served, pb.RoutingContext(task_hint="creative_writing"))  # anthropic success
            served.received.append(str(await client.route(user_chat(CANARY_PROMPT))))
            try:
                await client.route(pb.ChatRequest(messages=[pb.Message(content=CANARY_PROMPT)]))
            except grpc.aio.AioRpcError as error:
                served.received.append(f"{error.code()} {error.details()} {error.trailing_metadata()}")
        await asyncio.sleep(0.6)  # a metric export interval
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(served.metrics_url, timeout=5).read().decode())  # noqa: S310
        stdout, stderr = await asyncio.to_thread(served.stop)

        # Every sink holds what it should, so that the absence of canaries means something.
        events = {json.loads(line)["event"] for line in stdout.splitlines() if line.startswith("{")}
        assert "provider_attempt_finished" in events
        assert '"name": "chat gpt-4o-mini"' in stderr
        assert '"name": "routesvc.v1.RouterService/Complete"' in stderr
        assert "gen_ai.client.token.usage" in stderr
        assert "routesvc_cost" in page
        assert any("PERMISSION" in r or "FAILED_PRECONDITION" in r for r in served.received)
        assert any("UNAVAILABLE" in r for r in served.received)
        assert any("INVALID_ARGUMENT" in r for r in served.received)
        assert len(fake.requests) >= 10
        assert any(CANARY_PROMPT in json.dumps(r.body) for r in fake.requests), "the prompt did go upstream"

        sinks = {"stdout": stdout, "stderr": stderr, "prometheus": page, "client": "\n".join(served.received)}
        for name, text in sinks.items():
            for canary in (CANARY_PROMPT, CANARY_KEY, CLIENT_KEY):
                assert canary not in text, f"{canary} leaked into {name}"
        for recorded in fake.requests:
            assert CLIENT_KEY not in json.dumps(dict(recorded.headers))

    async def test_every_rpc_log_line_carries_trace_and_span_ids(self, served: Served, fake: FakeProvider) -> None:
        """Logged inside an RPC, a line has the caller's trace_id and a span_id; the exported server
        span has the same ids."""
        async with RouterClient(served.target) as client:
            await _drive(client, served)
            await client.list_models()
        stdout, stderr = await asyncio.to_thread(served.stop)
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        in_rpc = [line for line in lines if line["event"] in ("rpc_finished", "provider_attempt_finished")]
        assert len(in_rpc) == 3
        assert all(re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) for line in in_rpc)
        assert all(re.fullmatch(r"[0-9a-f]{16}", line["span_id"]) for line in in_rpc)
        complete = next(line for line in in_rpc if line.get("method") == "Complete")
        assert complete["trace_id"] == TRACE_ID
        assert f'"span_id": "0x{complete["span_id"]}"' in stderr
        assert "trace_id" not in next(line for line in lines if line["event"] == "server_started")
