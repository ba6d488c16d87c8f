"""The command line against real processes: `routesvc serve`, then route / complete / models; and
what each command says about flags and paths it cannot use (one line, exit 2, no traceback)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from routesvc import cli
from routesvc.client import RouterClient
from routesvc.errors import ConfigError
from routesvc.evaluation import evaluate_scores
from routesvc.server import Server
from routesvc.strategies.classifier import read_examples
from tests.conftest import REPO, default_config, free_port, process_environ, settings_from, user_chat
from tests.routing_data import STRONG, WEAK, records, write_jsonl
from tests.test_feedback_rpc import embedding_config


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
            "routing_cost_usd",
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
        # Cache writes: Anthropic's 1.25x and 2x the input price, the input price elsewhere.
        sonnet, mini = models["claude-sonnet"], models["gpt-4o-mini"]
        assert (sonnet["cacheWritePricePerMtok"], sonnet["cacheWrite1hPricePerMtok"]) == ("3.75", "6")
        assert (mini["cacheWritePricePerMtok"], mini["cacheWrite1hPricePerMtok"]) == ("0.15", "0.15")


class TestJsonOutput:
    """--json prints every field of the response, zero-valued ones too (they were left out)."""

    async def test_feedback_down_prints_its_score_of_zero(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """feedback --down --json has "score": 0.0 (it had no score at all; --up had 1.0)."""
        async with (
            Server(settings_from(embedding_config(tmp_path)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            decision = await client.route(user_chat("say hello to zulu"))
            argv = ["feedback", "--target", server.target, decision.decision_id, "--down", "--json"]
            code = await asyncio.to_thread(cli.main, argv)  # the command runs its own event loop
        assert code == 0
        # The in-process server logs to the same stdout; the command prints one JSON line.
        (printed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert json.loads(printed) == {
            "decision_id": decision.decision_id,
            "model": "gpt-4o-mini",
            "score": 0.0,
            "library_examples": "1",
        }

    def test_stats_prints_zero_totals(self, running: Running) -> None:
        """stats --json of a tenant with no requests has its zero counts and rates."""
        result = _cli(running, "stats", "--tenant", "nobody-at-all", "--json")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert (stats["totals"]["requests"], stats["totals"]["errors"]) == ("0", "0")
        assert (stats["escalations"], stats["fallbacks"], stats["escalation_rate"]) == ("0", "0", 0.0)
        assert stats["tenant"] == "nobody-at-all"


class TestServeLoop:
    def test_serves_on_uvloop_by_default(self, running: Running) -> None:
        """``server.uvloop`` defaults to true: the server says which loop it runs on."""
        assert running.event_loop == "uvloop"

    def test_no_uvloop_runs_on_asyncio(self) -> None:
        """``serve --no-uvloop`` runs on asyncio's own loop."""
        started = _first_line_of_serve("--no-uvloop")
        assert (started["event"], started["event_loop"]) == ("server_started", "asyncio")


def _run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``routesvc ARGS`` in a process of its own, without the SDK and routesvc variables (but ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "routesvc", *args],
        cwd=REPO,
        env={**process_environ(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The ``error: ...`` line of a command that failed cleanly: exit 2, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


class TestClientFlagErrors:
    """Client flags that cannot be used are reported before any call, as one line."""

    @pytest.mark.parametrize(
        ("flags", "expected"),
        [
            (("--tls-ca", "/nonexistent/ca.pem"), "error: TLS CA file /nonexistent/ca.pem: cannot read: "),
            (
                ("--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/c.key"),
                "error: TLS client key /nonexistent/c.key: cannot read: ",
            ),
        ],
    )
    def test_an_unreadable_tls_file_is_named(self, flags: tuple[str, ...], expected: str) -> None:
        """A TLS file that cannot be read: exit 2 with the file and the reason, not a traceback."""
        line = _one_line_error(_run("route", "--target", "127.0.0.1:9", *flags, "hi"))
        assert line.startswith(expected)
        assert line.endswith("No such file or directory")

    def test_an_api_key_in_plaintext_to_another_host_is_refused(self) -> None:
        """``--api-key`` without a TLS flag to a host other than this one: exit 2 before any call,
        saying how to connect over TLS or allow plaintext (``--insecure``)."""
        line = _one_line_error(_run("route", "--target", "192.0.2.1:9", "--api-key", "k", "--timeout", "1", "hi"))
        assert line == (
            "error: an API key would go in plaintext to 192.0.2.1:9: connect over TLS (--tls, --tls-ca), "
            "or allow plaintext to that host explicitly (--insecure)"
        )

    def test_an_api_key_to_a_list_whose_first_address_is_loopback_is_refused(self) -> None:
        """An ``ipv4:`` list is this host only if every address is: gRPC falls through to the
        next address when the first refuses, and the key went in plaintext to 192.0.2.2."""
        target = "ipv4:127.0.0.1:1,192.0.2.2:9"
        line = _one_line_error(_run("route", "--target", target, "--api-key", "k", "--timeout", "1", "hi"))
        assert line.startswith(f"error: an API key would go in plaintext to {target}: connect over TLS")

    @pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
    def test_a_certificate_and_its_key_go_together(self, flag: str, tmp_path: Path) -> None:
        """Half a client identity is a usage problem (grpc aborted the process on a certificate
        without its key)."""
        half = tmp_path / "half.pem"
        half.write_text("not used")
        line = _one_line_error(_run("route", "--target", "127.0.0.1:9", flag, str(half), "hi"))
        assert line == "error: a TLS client certificate and its private key go together: give both or neither"

    @pytest.mark.parametrize(
        ("flags", "problem"),
        [
            (("--metadata", "foo"), "argument --metadata: 'foo' is not KEY=VALUE"),
            (("--metadata", "=bar"), "argument --metadata: '=bar' is not KEY=VALUE"),
            (("--tools", "-3"), "argument --tools: '-3': the number of tools cannot be negative"),
            (("--timeout", "0"), "argument --timeout: '0': the deadline must be a number of seconds above 0"),
            (("--timeout", "-1"), "argument --timeout: '-1': the deadline must be a number of seconds above 0"),
        ],
    )
    def test_bad_request_flags_are_usage_errors(
        self, running: Running, flags: tuple[str, ...], problem: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A metadata item without '=' or a key, a negative tool count, a deadline not above 0:
        argparse's usage error (exit 2), nothing sent."""
        with pytest.raises(SystemExit) as exited:
            cli.main(["route", "--target", running.target, *flags, "hello"])
        assert exited.value.code == 2
        assert capsys.readouterr().err.rstrip().endswith(f"error: {problem}")

    @pytest.mark.parametrize(
        ("argv", "problem"),
        [
            (
                ("route", "--max-output-tokens", "99999999999", "hello"),
                "argument --max-output-tokens: '99999999999': the number of output tokens must be from 1 to 2147483647",
            ),
            (
                ("route", "--max-output-tokens", "0", "hello"),
                "argument --max-output-tokens: '0': the number of output tokens must be from 1 to 2147483647",
            ),
            (
                ("route", "--max-output-tokens", "1.5", "hello"),
                "argument --max-output-tokens: '1.5' is not a whole number",
            ),
            *(
                (
                    ("stats", "--window", window),
                    f"argument --window: '{window}': the window must be a number of seconds from 0 to 315576000000",
                )
                for window in ("nan", "inf", "1e300", "-1")
            ),
            (("stats", "--window", "soon"), "argument --window: 'soon' is not a number of seconds"),
        ],
    )
    def test_out_of_range_numbers_are_usage_errors(
        self, running: Running, argv: tuple[str, ...], problem: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--max-output-tokens outside an int32 from 1, and a --window that is not a finite number of
        seconds from 0 up to a Duration's range: argparse's usage error (exit 2), nothing sent (they
        were tracebacks from building the request)."""
        command, *rest = argv
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--target", running.target, *rest])
        assert exited.value.code == 2
        assert capsys.readouterr().err.rstrip().endswith(f"error: {problem}")

    def test_the_bounds_themselves_are_accepted(self) -> None:
        """The largest int32 of output tokens, and windows of 0 and of a Duration's largest, parse."""
        parser = cli.build_parser()
        assert parser.parse_args(["route", "--max-output-tokens", "2147483647", "hi"]).max_output_tokens == 2**31 - 1
        assert parser.parse_args(["stats", "--window", "0"]).window == 0.0
        assert parser.parse_args(["stats", "--window", "315576000000"]).window == 315_576_000_000.0

    def test_metadata_values_may_be_empty_or_hold_equals(self) -> None:
        """KEY= is an empty value and only the first '=' splits."""
        args = cli.build_parser().parse_args(["route", "--metadata", "a=", "--metadata", "b=x=y", "hi"])
        assert args.metadata == [("a", ""), ("b", "x=y")]


class TestNoServer:
    def test_no_service_at_the_target_says_what_to_check(self) -> None:
        """A client command with nothing listening at --target: one error line, exit 1, that says
        to start the service or pass --target (grpc's "failed to connect ... Connection refused"
        alone did not say what was wrong)."""
        target = f"127.0.0.1:{free_port()}"
        result = _run("route", "--target", target, "--timeout", "5", "hi")
        assert (result.returncode, "Traceback" in result.stderr) == (1, False)
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: UNAVAILABLE: ")
        assert f"is routesvc serving at {target}? start it with `make run`, or pass --target HOST:PORT" in line

    def test_a_target_whose_name_does_not_resolve_says_what_to_check(self) -> None:
        """A --target name that does not resolve (a typo) gets the same hint (it got none)."""
        result = _run("route", "--target", "routesvc.invalid:50051", "--timeout", "5", "hi")
        assert (result.returncode, "Traceback" in result.stderr) == (1, False)
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: UNAVAILABLE: ")
        assert line.endswith(
            "(is routesvc serving at routesvc.invalid:50051? start it with `make run`, or pass --target HOST:PORT)"
        )

    def test_a_proxy_whose_name_does_not_resolve_is_named_not_the_target(self) -> None:
        """A plaintext call to another host goes through the proxy the environment names; when that
        name does not resolve, the hint names the proxy (it told to start routesvc at the target)."""
        env = {"https_proxy": "http://proxy.invalid:3128", "grpc_proxy": "http://proxy.invalid:3128"}
        result = _run("models", "--target", "192.0.2.1:50051", "--insecure", "--timeout", "5", env=env)
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert (result.returncode, line.startswith("error: UNAVAILABLE: ")) == (1, True), result.stderr
        assert "make run" not in line
        assert line.endswith(
            "(the proxy proxy.invalid:3128 named by grpc_proxy, https_proxy or http_proxy does not resolve;"
            " fix it, or list the target in no_proxy)"
        )


class TestStandardInput:
    @pytest.mark.parametrize("command", ["route", "complete"])
    def test_text_that_is_not_utf8_is_one_line(self, command: str) -> None:
        """`cat long.txt | routesvc route -` with Latin-1 text: one line and exit 2, before any call
        (a prompt is sent as UTF-8; the locale's decoding smuggled it through as a traceback)."""
        result = subprocess.run(
            [sys.executable, "-m", "routesvc", command, "--target", "localhost:1", "--timeout", "5", "-"],
            cwd=REPO,
            env=process_environ(),
            input="a café prompt\n".encode("latin-1"),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stderr.decode()) == (2, "error: standard input is not UTF-8\n")


class TestServeFlagErrors:
    """`serve` overrides pass the checks the config file's fields do; a port it cannot have is one line."""

    @pytest.mark.parametrize(
        ("flags", "problem"),
        [
            (
                ("--port", "99999"),
                "argument --port: 99999: input should be less than or equal to 65535 (as server.port)",
            ),
            (("--port", "-1"), "argument --port: -1: input should be greater than or equal to 0 (as server.port)"),
            (
                ("--workers", "0"),
                "argument --workers: 0: input should be greater than or equal to 1 (as server.workers)",
            ),
            (
                ("--workers", "-2"),
                "argument --workers: -2: input should be greater than or equal to 1 (as server.workers)",
            ),
            (
                ("--workers", "65"),
                "argument --workers: 65: input should be less than or equal to 64 (as server.workers)",
            ),
        ],
    )
    def test_out_of_range_overrides_are_usage_errors(self, flags: tuple[str, ...], problem: str) -> None:
        """--port outside 0..65535 (it listened on the port modulo 65536) and --workers outside 1..64
        (0 and below were ignored): exit 2 before serving."""
        result = _run("serve", *flags, timeout=30)
        assert result.returncode == 2
        assert result.stderr.rstrip().endswith(f"error: {problem}")

    def test_a_port_in_use_is_one_line(self) -> None:
        """Another process listening on the port: exit 2 naming the address, not grpc's RuntimeError."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            line = _one_line_error(_run("serve", "--port", str(port), timeout=30))
        assert line == (
            f"error: server: cannot listen on 127.0.0.1:{port} (the port is in use, or the host is not this machine's)"
        )

    def test_a_prometheus_port_in_use_is_one_line(self, tmp_path: Path) -> None:
        """telemetry.metrics.prometheus_port taken by another process: exit 2 naming the field and
        the address, as for the gRPC port (it was a traceback and exit 1)."""
        config = default_config()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config["telemetry"] = {"metrics": {"prometheus_port": port}}
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            line = _one_line_error(_run("serve", "--config", str(path), "--port", "0", timeout=30))
        assert line == (
            f"error: telemetry.metrics.prometheus_port: cannot listen on 127.0.0.1:{port} (Address already in use)"
        )

    def test_a_feedback_db_that_is_not_sqlite_is_one_line(self, tmp_path: Path) -> None:
        """An embedding stage's feedback_db that is some other file: exit 2 naming the config file,
        the stage, the field and the file, as for any invalid config (it was sqlite3.DatabaseError,
        a traceback and exit 1)."""
        not_sqlite = tmp_path / "notes.txt"
        not_sqlite.write_text("not a database, but long enough to have a header of one\n" * 4)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(embedding_config(tmp_path, feedback_db=str(not_sqlite))), encoding="utf-8")
        line = _one_line_error(_run("serve", "--config", str(path), "--port", "0", timeout=30))
        assert line == f"error: {path}: routing.stages[0]: feedback_db {not_sqlite}: file is not a database"

    def test_a_bad_redis_url_is_one_line_before_the_workers_start(self, tmp_path: Path) -> None:
        """A Redis URL missing its host (the password read as a port), with two workers: exit 2
        and one line naming the field, from the supervisor, without the password (each worker
        failed with a traceback that printed it, and exit 1)."""
        config = default_config()
        config["shared_state"] = {"redis_url": "redis://default:S3cretPw/0"}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        result = _run("serve", "--config", str(path), "--port", "0", "--workers", "2", timeout=30)
        line = _one_line_error(result)
        assert line.startswith(f"error: {path}: shared_state.redis_url: not a valid Redis URL (the URL is not shown)")
        assert "S3cretPw" not in result.stderr + result.stdout
        assert "workers_started" not in result.stderr + result.stdout

    def test_a_provider_url_without_a_scheme_is_one_line_at_start(self, tmp_path: Path) -> None:
        """``ANTHROPIC_BASE_URL=127.0.0.1:8089`` (the scheme left out): exit 2 and one line naming
        the variable, before serving (it served, then failed every Anthropic call as an outage)."""
        result = _run("serve", "--port", "0", timeout=30, env={"ANTHROPIC_BASE_URL": "127.0.0.1:8089"})
        line = _one_line_error(result)
        assert line.startswith("error: <embedded default_config.yaml>: $ANTHROPIC_BASE_URL: not an absolute http(s)")
        assert "127.0.0.1:8089" not in result.stderr + result.stdout
        assert "server_started" not in result.stderr + result.stdout

    @pytest.mark.parametrize("sampler", ["always_on", "parentbased_traceidratio"])
    def test_a_sampler_ratio_that_is_no_number_is_one_line_at_start(self, sampler: str) -> None:
        """``OTEL_TRACES_SAMPLER_ARG=nan``: exit 2 and one line naming the variable, whichever
        sampler is chosen (a traceback and exit 1, even for always_on, which takes no ratio)."""
        env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "nan"}
        result = _run("serve", "--port", "0", timeout=30, env=env)
        line = _one_line_error(result)
        assert line == "error: <embedded default_config.yaml>: $OTEL_TRACES_SAMPLER_ARG: not a number"

    def test_credentials_in_the_otlp_endpoint_are_one_line_and_never_logged(self) -> None:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` with user:password@: exit 2 and one line naming the
        variable (it served, exported nothing, and the exporter logged the URL with the password at
        every failed export)."""
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:canary-otlp-pw@127.0.0.1:4999"}
        result = _run("serve", "--port", "0", timeout=30, env=env)
        line = _one_line_error(result)
        assert line.startswith(
            "error: <embedded default_config.yaml>: $OTEL_EXPORTER_OTLP_ENDPOINT: credentials in the URL"
        )
        assert "canary-otlp-pw" not in result.stderr + result.stdout
        assert "server_started" not in result.stderr + result.stdout

    @pytest.mark.parametrize(
        ("tail", "problem"),
        [
            ("huge: 1" + "0" * 5000, "a value that cannot be read as its type (an integer of more than 4,300 digits"),
            ("deep: " + "[" * 10000 + "]" * 10000, "nested too deeply"),
        ],
        ids=["integer-of-5001-digits", "nested-10000-deep"],
    )
    def test_yaml_python_cannot_read_is_one_line(self, tmp_path: Path, tail: str, problem: str) -> None:
        """An integer over Python's 4,300 digits (ValueError) or lists nested 10,000 deep
        (RecursionError): exit 2 and one line naming the file (a traceback and exit 1)."""
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(default_config()) + tail + "\n", encoding="utf-8")
        line = _one_line_error(_run("serve", "--config", str(path), "--port", "0", timeout=30))
        assert line.startswith(f"error: {path}: not valid YAML: {problem}")


def _fit_args(data: Path, out: Path) -> list[str]:
    return [
        "fit",
        "--data",
        str(data),
        "--strong",
        STRONG,
        "--weak",
        WEAK,
        "--out",
        str(out),
        "--encoder",
        "hashing-256",
    ]


class TestOfflineCommandErrors:
    """fit, score, eval and classify report paths they cannot use as one line, exit 2."""

    @pytest.fixture
    def data(self, tmp_path: Path) -> Path:
        """A small outcomes file with the pair."""
        return write_jsonl(tmp_path / "train.jsonl", records())

    @pytest.fixture
    def router(self, data: Path, tmp_path: Path) -> Path:
        """A router fitted on ``data``."""
        assert cli.main(_fit_args(data, tmp_path / "router")) == 0
        return tmp_path / "router"

    def test_fit_into_a_regular_file(self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--out naming an existing file is refused before fitting, naming the path."""
        existing = tmp_path / "existing"
        existing.write_text("keep me")
        assert cli.main(_fit_args(data, existing)) == 2
        assert capsys.readouterr().err == (
            f"error: --out {existing}: not a folder (fit writes router.json and library.npz into one)\n"
        )
        assert existing.read_text() == "keep me"

    def test_a_fit_that_fails_while_writing_leaves_the_old_router(
        self, data: Path, router: Path, tmp_path: Path
    ) -> None:
        """fit over an existing router that fails part way through writing (here a file size
        limit, as a full disk would): one line, exit 2, and the old router is left as it was,
        with nothing beside it (router.json was written in place: the old router was lost)."""
        before = {name: (router / name).read_bytes() for name in ("router.json", "library.npz")}
        limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        limit += " resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))"
        argv = [*_fit_args(data, router)[:-1], "hashing-64", "--kind-weight", "0"]  # no classifier to load
        code = f"{limit}; import sys; from routesvc import cli; sys.exit(cli.main({argv!r}))"
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=process_environ(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1].endswith(": File too large")
        assert {name: (router / name).read_bytes() for name in ("router.json", "library.npz")} == before
        assert sorted(path.name for path in tmp_path.iterdir()) == ["router", "train.jsonl"]

    def test_fit_over_a_router_replaces_it_whole(
        self, data: Path, router: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """fit into a folder a fit wrote replaces that router (its encoder too), and leaves
        nothing beside it."""
        assert cli.main([*_fit_args(data, router)[:-1], "hashing-64"]) == 0
        assert json.loads((router / "router.json").read_text())["encoder"] == "hashing-64"
        assert sorted(path.name for path in router.iterdir()) == ["library.npz", "router.json"]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["router", "train.jsonl"]

    @pytest.mark.parametrize("out", ["loop", "a/router"])
    def test_fit_into_a_symlink_loop_is_refused(
        self, out: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out that is, or lies under, a symlink loop cannot be resolved: one line naming
        --out, exit 2 (it was a RuntimeError traceback)."""
        (tmp_path / "loop").symlink_to("loop")
        (tmp_path / "a").symlink_to("b")
        (tmp_path / "b").symlink_to("a")
        assert cli.main(_fit_args(data, tmp_path / out)) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / out}: cannot resolve the path: ")

    def test_fit_into_a_folder_of_other_files_is_refused(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """fit replaces its --out folder whole, so a folder holding anything but a router's two
        files is refused before fitting, naming them, and left as it was."""
        folder = tmp_path / "models"
        folder.mkdir()
        (folder / "notes.txt").write_text("keep me")
        assert cli.main(_fit_args(data, folder)) == 2
        assert capsys.readouterr().err == (
            f"error: --out {folder}: holds files other than a router's (notes.txt); fit replaces the folder"
            " whole: give a new folder, or one written by fit\n"
        )
        assert [path.name for path in folder.iterdir()] == ["notes.txt"]

    def test_fit_into_a_folder_of_other_files_named_through_a_missing_folder_is_refused(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out is resolved before it is checked: "build/../models" with no build folder names
        models, which holds other files, so it is refused and left as it was (it passed the
        check as given, nothing being there, then models was replaced whole)."""
        folder = tmp_path / "models"
        folder.mkdir()
        (folder / "notes.txt").write_text("keep me")
        assert cli.main(_fit_args(data, tmp_path / "build" / ".." / "models")) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {folder}: holds files other than a router's")
        assert [path.name for path in folder.iterdir()] == ["notes.txt"]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["models", "train.jsonl"]

    @pytest.mark.parametrize("out", [".", ".."])
    def test_fit_into_the_current_folder_or_one_holding_it_is_refused(
        self, data: Path, router: Path, out: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """fit replaces its --out folder whole: from inside a router folder, "--out ." (or a
        folder holding the current one) is refused, and the folder the shell is in stays (it was
        renamed aside and removed, the shell left in a deleted folder)."""
        monkeypatch.chdir(router)
        before = {name: (router / name).read_bytes() for name in ("router.json", "library.npz")}
        assert cli.main(_fit_args(data, Path(out))) == 2
        named = router if out == "." else router.parent
        assert capsys.readouterr().err == (
            f"error: --out {named}: is the current folder or holds it; fit replaces the folder whole: give another\n"
        )
        assert {name: (router / name).read_bytes() for name in ("router.json", "library.npz")} == before
        assert sorted(path.name for path in router.parent.iterdir()) == ["router", "train.jsonl"]

    def test_a_fit_whose_out_another_fit_replaced_meanwhile_keeps_the_other(
        self,
        data: Path,
        router: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Two fits into one --out: when the other's router lands on --out after this one moved
        the old router aside, the other's is kept, the old one removed (it was left beside --out),
        and the error says --out changed (it was "Directory not empty")."""
        other = tmp_path / ".router.new-other"
        other.mkdir()
        for name in ("router.json", "library.npz"):
            (other / name).write_bytes((router / name).read_bytes())
        rename = Path.rename

        def other_fit_lands_between_the_renames(self: Path, target: str | os.PathLike[str]) -> Path:
            moved = rename(self, target)
            if self == router:  # this fit moved the old router aside: the other's lands now
                rename(other, router)
            return moved

        monkeypatch.setattr(Path, "rename", other_fit_lands_between_the_renames)
        assert cli.main([*_fit_args(data, router)[:-1], "hashing-64"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: --out {router}: changed while fitting (another fit wrote it?); not replaced"
        )
        assert json.loads((router / "router.json").read_text())["encoder"] == "hashing-256"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["router", "train.jsonl"]

    def test_fit_where_no_folder_can_be_made(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out below a regular file: one line naming the path, before any data is read."""
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        assert cli.main(_fit_args(data, blocker / "router")) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {blocker}")

    def test_score_where_the_output_cannot_be_written(
        self, data: Path, router: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """score --out below a regular file: one line naming the path."""
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        capsys.readouterr()
        code = cli.main(["score", "--router", str(router), "--data", str(data), "--out", str(blocker / "s.jsonl")])
        assert code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {blocker}")

    def test_eval_plot_into_a_missing_folder(
        self, data: Path, router: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """eval --plot into a folder that does not exist: one line naming the file, before any
        prompt is scored (nothing else is printed)."""
        plot = tmp_path / "missing" / "curve.png"
        capsys.readouterr()
        argv = ["eval", "--router", str(router), "--data", str(data), "--strong", STRONG, "--weak", WEAK]
        assert cli.main([*argv, "--plot", str(plot)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {plot}: No such file or directory"]

    @pytest.mark.parametrize("command", ["score", "classify", "eval --plot"])
    def test_an_output_file_that_is_a_folder_is_refused_before_the_work(
        self, command: str, data: Path, router: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out (or --plot) naming an existing folder: one line naming it, nothing scored first."""
        folder = tmp_path / "scores"
        folder.mkdir()
        argv = {
            "score": ["score", "--router", str(router), "--data", str(data), "--out", str(folder)],
            "classify": ["classify", "--data", str(data), "--out", str(folder)],
            "eval --plot": [
                "eval", "--router", str(router), "--data", str(data), "--strong", STRONG, "--weak", WEAK,
                "--plot", str(folder),
            ],
        }[command]  # fmt: skip
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {folder}: Is a directory"]

    def test_classify_where_the_output_cannot_be_written(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """classify --out below a regular file: one line naming the path, before classifying."""
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        assert cli.main(["classify", "--data", str(data), "--out", str(blocker / "l.jsonl")]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {blocker}")

    def test_classify_examples_that_are_not_json(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A line of --examples that is not JSON: the file and line, never the line's text."""
        examples = tmp_path / "examples.jsonl"
        examples.write_text('{"task": "chat", "prompt": "hello"}\n\nsecret text, not JSON\n')
        code = cli.main(
            ["classify", "--data", str(data), "--out", str(tmp_path / "l.jsonl"), "--examples", str(examples)]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert err == f"error: {examples}:3: not JSON (Expecting value)\n"
        assert "secret" not in err

    def test_classify_examples_may_hold_line_separators_inside_strings(
        self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """JSON allows U+2028, U+2029 and U+0085 raw inside a string: a line ends at "\\n" only, so such
        an examples file is read as written (str.splitlines cut it there: 'not valid JSON')."""
        examples = tmp_path / "examples.jsonl"
        prompt = "Write a poem\u2028about\u2029the\x85sea"
        rows = [{"task": "creative_writing", "prompt": prompt}, {"task": "chat", "prompt": "hello"}]
        examples.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        out = tmp_path / "l.jsonl"
        assert cli.main(["classify", "--data", str(data), "--out", str(out), "--examples", str(examples)]) == 0
        assert {json.loads(line)["task"] for line in out.read_text().splitlines()} <= {"creative_writing", "chat"}
        assert read_examples(examples) == [("creative_writing", prompt), ("chat", "hello")]

    def test_classify_examples_are_read_as_the_outcome_files_are(self, tmp_path: Path) -> None:
        """The examples file is decoded line by line as the outcome files are: a leading byte
        order mark is allowed, and a line that is not UTF-8 is named by its number (the whole
        file was "not UTF-8 text", and a byte order mark made line 1 "not valid JSON")."""
        examples = tmp_path / "examples.jsonl"
        examples.write_bytes(b'\xef\xbb\xbf{"task": "chat", "prompt": "hello"}\n')
        assert read_examples(examples) == [("chat", "hello")]
        examples.write_bytes(b'{"task": "chat", "prompt": "hello"}\n{"task": "chat", "prompt": "caf\xe9"}\n')
        with pytest.raises(ConfigError) as caught:
            read_examples(examples)
        assert caught.value.message == f"{examples}:2: not UTF-8"


def _write_lines(path: Path, rows: list[dict[str, object]]) -> Path:
    """``rows`` as JSONL (``json.dumps`` writes NaN and Infinity, as Python's own readers accept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _row(id_: str, prompt: str, strong: float, weak: float, **extra: object) -> dict[str, object]:
    return {"id": id_, "prompt": prompt, "task": "t", "outcomes": {STRONG: strong, WEAK: weak}, **extra}


HARD_PROMPT = "prove that 7 squared plus 17 times 23 equals 4091 minus 12"
EASY_PROMPT = "say hello to my friend alpha"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A router fitted for STRONG - WEAK on the synthetic data (hard prompts need the strong model)."""
    folder = tmp_path_factory.mktemp("fitted")
    data = write_jsonl(folder / "train.jsonl", records())
    assert cli.main(_fit_args(data, folder / "router")) == 0
    return folder / "router"


def _eval_args(router: Path, data: Path, strong: str = STRONG, weak: str = WEAK) -> list[str]:
    return ["eval", "--router", str(router), "--data", str(data), "--strong", strong, "--weak", weak, "--json"]


def _offline_argv(command: str, data: Path, fitted: Path, tmp_path: Path, out: Path) -> list[str]:
    """The arguments of offline ``command`` on ``data`` (fit writes ``tmp_path/router``; score and
    classify write ``out``)."""
    return {
        "fit": _fit_args(data, tmp_path / "router"),
        "score": ["score", "--router", str(fitted), "--data", str(data), "--out", str(out)],
        "eval": _eval_args(fitted, data),
        "classify": ["classify", "--data", str(data), "--out", str(out)],
    }[command]


class TestOfflineDataErrors:
    """Outcome data that breaks the format is one line naming file:line, exit 2, and nothing written."""

    @pytest.mark.parametrize(("value", "shown"), [(math.nan, "nan"), (math.inf, "inf"), (-0.5, "-0.5"), (1.5, "1.5")])
    def test_fit_refuses_outcomes_that_are_not_in_0_1(
        self, value: float, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An outcome that is NaN, infinite or outside [0, 1] names the file, line and model; no router."""
        data = write_jsonl(tmp_path / "train.jsonl", records())
        with data.open("a") as handle:
            handle.write(json.dumps(_row("bad", HARD_PROMPT, 1.0, value)) + "\n")
        out = tmp_path / "router"
        assert cli.main(_fit_args(data, out)) == 2
        expected = f"error: {data}:81: outcomes: {WEAK!r} is {shown}, not a number in [0, 1]\n"
        assert capsys.readouterr().err.splitlines(keepends=True)[-1] == expected
        assert not out.exists()

    @pytest.mark.parametrize(("value", "shown"), [(-0.01, "-0.01"), (math.inf, "inf"), (math.nan, "nan")])
    def test_costs_must_be_finite_and_not_negative(
        self, value: float, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A cost_usd that is negative or not finite is refused the same way."""
        data = _write_lines(
            tmp_path / "costs.jsonl", [_row("a", HARD_PROMPT, 1.0, 0.0, cost_usd={STRONG: 0.01, WEAK: value})]
        )
        assert cli.main(_fit_args(data, tmp_path / "router")) == 2
        expected = f"error: {data}:1: cost_usd: {WEAK!r} is {shown}, not a finite number, 0 or more\n"
        assert capsys.readouterr().err.splitlines(keepends=True)[-1] == expected

    def test_eval_json_never_prints_nan(self, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """eval --json on data with a NaN outcome is an error, not a report with NaN (invalid JSON) in it."""
        data = _write_lines(tmp_path / "nan.jsonl", [_row("a", HARD_PROMPT, math.nan, 0.0), _row("b", "y", 1, 0)])
        capsys.readouterr()
        assert cli.main(_eval_args(fitted, data)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == f"error: {data}:1: outcomes: {STRONG!r} is nan, not a number in [0, 1]\n"

    @pytest.mark.parametrize("command", ["fit", "score", "eval", "classify"])
    def test_data_that_is_not_utf8_is_one_line(
        self, command: str, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A line that is not UTF-8 (here Latin-1) is named by file and line: exit 2, no traceback."""
        data = tmp_path / "latin1.jsonl"
        good = json.dumps(_row("a", EASY_PROMPT, 1, 1)) + "\n" + json.dumps(_row("b", HARD_PROMPT, 1, 0)) + "\n"
        data.write_bytes(good.encode() + json.dumps(_row("c", "café", 1, 0), ensure_ascii=False).encode("latin-1"))
        out = tmp_path / "out.jsonl"
        capsys.readouterr()
        assert cli.main(_offline_argv(command, data, fitted, tmp_path, out)) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {data}:3: not UTF-8"
        assert not out.exists()

    @pytest.mark.parametrize("command", ["fit", "score", "eval", "classify"])
    @pytest.mark.parametrize(
        ("line", "problem"),
        [
            (json.dumps(_row("c", "bad \ud800 prompt", 1, 0)), "'prompt' is not valid UTF-8 (a lone surrogate)"),
            ("[" * 100_000 + "]" * 100_000, "not JSON (nested too deeply)"),
            ('{"id": "c", "prompt": "x", "outcomes": {"s": 1' + "0" * 5000 + "}}", "not JSON (a number too long)"),
        ],
        ids=["lone-surrogate", "nested-too-deeply", "number-too-long"],
    )
    def test_lines_json_reads_but_nothing_can_use_are_one_line(
        self, command: str, line: str, problem: str, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A prompt with a lone surrogate escape ("\\ud800": JSON reads it, no encoder takes it), a
        line nested past the parser's recursion limit and an integer past Python's 4,300 digits (a
        ValueError) are named by file and line: exit 2, no traceback."""
        data = tmp_path / "odd.jsonl"
        good = json.dumps(_row("a", EASY_PROMPT, 1, 1)) + "\n" + json.dumps(_row("b", HARD_PROMPT, 1, 0)) + "\n"
        data.write_text(good + line + "\n", encoding="utf-8")
        out = tmp_path / "out.jsonl"
        capsys.readouterr()
        assert cli.main(_offline_argv(command, data, fitted, tmp_path, out)) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {data}:3: {problem}"
        assert not out.exists()
        assert not (tmp_path / "router").exists()

    @pytest.mark.parametrize("command", ["fit", "score", "eval"])
    def test_ids_repeated_within_a_file_are_refused(
        self, command: str, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An id used twice in one file is named with both lines: eval and score report by id."""
        data = _write_lines(
            tmp_path / "dup.jsonl",
            [_row("x", HARD_PROMPT, 1, 0), _row("y", "what colour is the sky", 1, 1), _row("x", EASY_PROMPT, 1, 1)],
        )
        out = tmp_path / "scores.jsonl"
        argv = {
            "fit": _fit_args(data, tmp_path / "router"),
            "score": ["score", "--router", str(fitted), "--data", str(data), "--out", str(out)],
            "eval": _eval_args(fitted, data),
        }[command]
        capsys.readouterr()
        assert cli.main(argv) == 2
        expected = f"error: {data}:3: id 'x' repeats line 1 (ids must be unique within a file)"
        assert capsys.readouterr().err.splitlines()[-1] == expected
        assert not out.exists()


class TestEvalCommand:
    """eval scores each record's own prompt, matches names like fit, and says which names it used."""

    def test_ids_shared_by_two_files_keep_their_own_prompts(
        self, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two files of a folder may use the same ids: fit, score and eval read both, and eval's metrics
        are those of the scores `score` gives each record (not of the last prompt with that id)."""
        folder = tmp_path / "data"
        _write_lines(folder / "a.jsonl", [_row("q1", HARD_PROMPT, 1, 0), _row("q2", EASY_PROMPT, 1, 1)])
        _write_lines(folder / "b.jsonl", [_row("q1", EASY_PROMPT, 1, 1), _row("q2", HARD_PROMPT, 1, 0)])
        assert cli.main(_fit_args(folder, tmp_path / "router")) == 0
        out = tmp_path / "scores.jsonl"
        assert cli.main(["score", "--router", str(fitted), "--data", str(folder), "--out", str(out)]) == 0
        scores = [json.loads(line) for line in out.read_text().splitlines()]
        assert [s["id"] for s in scores] == ["q1", "q2", "q1", "q2"]
        hard, easy = scores[0]["score"], scores[1]["score"]
        assert hard > easy  # the router tells the two prompts apart, so a mix-up would show
        capsys.readouterr()
        assert cli.main(_eval_args(fitted, folder)) == 0
        report = json.loads(capsys.readouterr().out)
        expected = evaluate_scores([s["score"] for s in scores], [1, 1, 1, 1], [0, 1, 1, 0]).as_dict()
        assert expected == report
        assert report["apgr"] == pytest.approx(0.75)  # both hard prompts first: the best order

    @pytest.mark.parametrize("command", ["score", "classify"])
    def test_each_row_names_its_source_file(
        self, command: str, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """score and classify write "source" (the file's name without .jsonl) beside "id": files of a
        folder may share ids, and the output is joined back by both."""
        folder = tmp_path / "data"
        _write_lines(folder / "a.jsonl", [_row("q1", HARD_PROMPT, 1, 0)])
        _write_lines(folder / "b.jsonl", [_row("q1", EASY_PROMPT, 1, 1)])
        out = tmp_path / "out.jsonl"
        argv = {
            "score": ["score", "--router", str(fitted), "--data", str(folder), "--out", str(out)],
            "classify": ["classify", "--data", str(folder), "--out", str(out)],
        }[command]
        assert cli.main(argv) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(row["source"], row["id"]) for row in rows] == [("a", "q1"), ("b", "q1")]
        assert all(set(row) == {"source", "id", "score" if command == "score" else "task"} for row in rows)

    def test_model_names_match_by_alias_in_each_file(
        self, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each file's names are matched to --strong/--weak as fit matches them (id, else loose alias),
        reported per file on stderr; an alias of the router's own pair draws no warning."""
        folder = tmp_path / "data"
        strong_name, weak_name = f"org/{STRONG.title()}", f"{WEAK}-v0.1_concise"
        _write_lines(
            folder / "a.jsonl",
            [
                {"id": "1", "prompt": HARD_PROMPT, "outcomes": {strong_name: 1, WEAK: 0}},
                {"id": "2", "prompt": EASY_PROMPT, "outcomes": {strong_name: 1, WEAK: 1}},
            ],
        )
        _write_lines(
            folder / "b.jsonl",
            [
                {"id": "1", "prompt": HARD_PROMPT, "outcomes": {STRONG: 1, weak_name: 0, "other": 0}},
                {"id": "2", "prompt": "say hello", "outcomes": {STRONG: 1, weak_name: 1, "other": 1}},
            ],
        )
        _write_lines(folder / "c.jsonl", [{"id": "1", "prompt": "hi", "outcomes": {"A": 1, "B": 0}}])
        capsys.readouterr()
        assert cli.main(_eval_args(fitted, folder, strong=STRONG, weak=WEAK.upper())) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["prompts"] == 4
        used = [line for line in captured.err.splitlines() if line.startswith("  ")]
        assert used == [
            f"  a: 2 of 2 prompts, pair {strong_name} - {WEAK}",
            f"  b: 2 of 2 prompts, pair {STRONG} - {weak_name}",
            "  c: 1 prompts, skipped (no model matches the pair)",
        ]
        assert "warning" not in captured.err

    def test_warns_when_the_pair_is_not_the_routers(
        self, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A pair other than the one the router was fitted for is evaluated, with a warning on stderr."""
        data = _write_lines(
            tmp_path / "other.jsonl",
            [
                {"id": "1", "prompt": HARD_PROMPT, "outcomes": {"A": 1, "B": 0}},
                {"id": "2", "prompt": EASY_PROMPT, "outcomes": {"A": 1, "B": 1}},
            ],
        )
        capsys.readouterr()
        assert cli.main(_eval_args(fitted, data, strong="A", weak="B")) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["prompts"] == 2
        warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
        assert warnings == [
            f"warning: the router was fitted for {STRONG} - {WEAK}, not A - B: its scores rank prompts by the"
            " fitted pair's gap"
        ]
