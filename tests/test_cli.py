"""The command line against real processes: `routesvc serve`, then route / complete / models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest

from tests.conftest import REPO, process_environ


@dataclass
class Running:
    target: str
    fake_url: str
    event_loop: str


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    """The fake provider and `routesvc serve` as separate processes, keys and URLs via the SDK variables."""
    base = process_environ()
    fake = _spawn(["-m", "routesvc.testing", "--port", "0"], base)
    server: subprocess.Popen[str] | None = None
    try:
        assert fake.stdout is not None
        fake_url = fake.stdout.readline().strip()
        env = {
            **base,
            "OPENAI_API_KEY": "sk-cli-test",
            "OPENAI_BASE_URL": f"{fake_url}/v1",
            "ANTHROPIC_API_KEY": "sk-cli-test",
            "ANTHROPIC_BASE_URL": fake_url,
        }
        server = _spawn(["-m", "routesvc", "serve", "--port", "0"], env)
        assert server.stdout is not None
        started = json.loads(server.stdout.readline())
        assert started["event"] == "server_started"
        yield Running(started["target"], fake_url, started["event_loop"])
    finally:
        for process in (server, fake):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


def _first_line_of_serve(*flags: str) -> dict[str, object]:
    """The first log line of ``routesvc serve FLAGS`` (no keys: it serves Route only), then SIGTERM."""
    base = process_environ()
    server = _spawn(["-m", "routesvc", "serve", "--port", "0", *flags], base)
    try:
        assert server.stdout is not None
        line: dict[str, object] = json.loads(server.stdout.readline())
        return line
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _cli(running: Running, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUTESVC_TARGET": running.target}
    return subprocess.run(
        [sys.executable, "-m", "routesvc", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _route(running: Running, *args: str, stdin: str | None = None) -> dict[str, object]:
    result = _cli(running, "route", "--json", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert isinstance(decision, dict)
    return decision


class TestRouteCommand:
    def test_the_seed_policy_from_the_command_line(self, running: Running) -> None:
        """The issue's acceptance examples, each with reasons naming the rule."""
        code = _route(running, "Write a Python function that merges two sorted lists", "--task", "code_generation")
        assert (code["model"], code["rule"]) == ("gpt-4o", "code_generation")
        long = _route(running, "-", stdin="lorem ipsum " * 65_000)
        assert (long["model"], long["rule"]) == ("claude-sonnet", "long_context")
        tools = _route(running, "--tools", "6", "What's the weather in Paris?")
        assert (tools["model"], tools["rule"]) == ("claude-sonnet", "many_tools")
        premium = _route(running, "--tier", "premium", "What's the weather in Paris?")
        assert (premium["model"], premium["rule"]) == ("gpt-4o", "premium_tier")
        batch = _route(running, "--no-realtime", "Summarise this report")
        assert batch["mode"] == "batch"
        plain = _route(running, "What is the capital of France?")
        assert (plain["model"], plain["mode"]) == ("gpt-4o-mini", "realtime")
        for decision in (code, long, tools, premium):
            assert any(str(decision["rule"]) in str(reason) for reason in decision["reasons"])  # type: ignore[attr-defined]

    def test_json_has_the_documented_keys(self, running: Running) -> None:
        """route --json prints one object with the documented keys."""
        keys = set(_route(running, "hello"))
        assert {
            "model",
            "provider",
            "strategy",
            "reasons",
            "estimated_input_tokens",
            "estimated_cost_usd",
            "mode",
            "decision_id",
        } <= keys

    def test_errors_are_one_line_with_status_and_reason(self, running: Running) -> None:
        """A bad request exits 1 with the status, message and ErrorInfo reason on stderr."""
        result = _cli(running, "route", "--model", "gpt-9", "hello")
        assert result.returncode == 1
        assert result.stderr.startswith("error: NOT_FOUND: unknown model 'gpt-9'")
        assert result.stderr.rstrip().endswith("[MODEL_NOT_FOUND]")


class TestCompleteCommand:
    @pytest.mark.parametrize(
        ("flags", "model"), [((), "gpt-4o-mini"), (("--task", "creative_writing"), "claude-sonnet")]
    )
    def test_streams_through_the_real_sdks_and_costs_tokens_times_price(
        self, running: Running, flags: tuple[str, ...], model: str
    ) -> None:
        """complete --json: a decision, the fake's text as deltas, usage and cost = tokens x catalog price."""
        result = _cli(running, "complete", "--json", *flags, "Say hello")
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert lines[0]["type"] == "decision"
        text = "".join(line["text"] for line in lines if line["type"] == "delta")
        assert text == "Hello from the fake provider."
        last = lines[-1]
        prices = {"gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")), "claude-sonnet": (Decimal(3), Decimal(15))}
        input_price, output_price = prices[model]
        expected = (last["input_tokens"] * input_price + last["output_tokens"] * output_price) / 1_000_000
        assert (last["model"], last["finish_reason"]) == (model, "stop")
        assert Decimal(last["cost_usd"]) == expected
        assert last["output_tokens"] == 5

    def test_plain_output_is_the_answer(self, running: Running) -> None:
        """Without --json the answer text goes to stdout, the summary to stderr."""
        result = _cli(running, "complete", "Say hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "Hello from the fake provider."
        assert "USD" in result.stderr


class TestModelsCommand:
    def test_lists_the_catalog_with_availability(self, running: Running) -> None:
        """models --json lists each model, its prices and that its provider is configured."""
        result = _cli(running, "models", "--json")
        assert result.returncode == 0, result.stderr
        models = {m["id"]: m for m in json.loads(result.stdout)}
        assert set(models) == {"gpt-4o-mini", "gpt-4o", "claude-sonnet"}
        assert models["gpt-4o"]["inputPricePerMtok"] == "2.5"
        assert all(m["available"] for m in models.values())


class TestServeLoop:
    def test_serves_on_uvloop_by_default(self, running: Running) -> None:
        """``server.uvloop`` defaults to true: the server says which loop it runs on."""
        assert running.event_loop == "uvloop"

    def test_no_uvloop_runs_on_asyncio(self) -> None:
        """``serve --no-uvloop`` runs on asyncio's own loop."""
        started = _first_line_of_serve("--no-uvloop")
        assert (started["event"], started["event_loop"]) == ("server_started", "asyncio")
