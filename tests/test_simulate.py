"""`routesvc simulate`: route a file's prompts offline; the same numbers GetStats reports live."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import yaml

from routesvc.client import RouterClient
from routesvc.feedback import FeedbackStore
from routesvc.models import ChatRequest, Message, Role
from routesvc.router import Router
from routesvc.server import Server
from routesvc.simulate import SimulationDataError, read_prompts, simulate
from routesvc.testing import FakeProvider, Script
from routesvc.tokens import estimate_input_tokens
from routesvc.v1 import router_pb2 as pb
from tests.conftest import REPO, SHARED_DATA, default_config, settings_from, user_chat
from tests.observability import observed_server
from tests.test_feedback_rpc import embedding_config

ROUTERBENCH = SHARED_DATA / "routerbench_train.jsonl"


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _routerbench_rows(count: int) -> list[dict[str, object]]:
    with ROUTERBENCH.open(encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(count)]
    # Give a few rows the hints a client would send, so the mix has more than the default model.
    for index, hint in ((1, "code_generation"), (4, "creative_writing"), (7, "multi_step_reasoning")):
        rows[index]["task_hint"] = hint
    rows[9]["user_tier"] = "premium"
    return rows


def _feedback_files(folder: Path) -> dict[str, bytes]:
    """The bytes of the feedback database's files (the database, and its WAL and index if open)."""
    return {path.name: path.read_bytes() for path in folder.glob("feedback.db*")}


class TestReadPrompts:
    def test_context_fields_are_read(self, tmp_path: Path) -> None:
        """tenant, user_tier, task_hint and max_output_tokens shape the routed request."""
        path = _write(tmp_path / "p.jsonl", [{"prompt": "hi", "tenant": "acme", "task_hint": "code_generation"}])
        (prompt,) = read_prompts(path)
        assert [(m.role, m.content) for m in prompt.message.chat.messages] == [(pb.ROLE_USER, "hi")]
        assert (prompt.message.context.tenant, prompt.message.context.task_hint) == ("acme", "code_generation")

    @pytest.mark.parametrize(
        "line",
        [
            "not json",
            '{"id": "x"}',
            '{"prompt": 3}',
            '{"prompt": "x", "outcomes": 1}',
            '{"prompt": "x", "max_output_tokens": 1.5}',
            '{"prompt": "x", "max_output_tokens": 99999999999}',
            '{"prompt": "bad \\ud800 row"}',
        ],
    )
    def test_a_bad_line_names_file_and_line(self, tmp_path: Path, line: str) -> None:
        """A line without a string prompt (or with malformed outcomes) fails naming where."""
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "fine"}\n\n' + line + "\n", encoding="utf-8")
        with pytest.raises(SimulationDataError, match=r"bad\.jsonl:3"):
            list(read_prompts(path))

    @pytest.mark.parametrize(
        ("line", "problem"),
        [
            (b'{"prompt": "caf\xe9"}', "not UTF-8"),
            (b"[" * 100_000 + b"]" * 100_000, "not JSON (nested too deeply)"),
            (b'{"prompt": "x", "outcomes": {"m": NaN}}', "outcomes: 'm' is nan, not a number in [0, 1]"),
            (b'{"prompt": "x", "outcomes": {"m": 7}}', "outcomes: 'm' is 7.0, not a number in [0, 1]"),
            (
                b'{"prompt": "x", "outcomes": {"m": ' + b"9" * 400 + b"}}",
                "outcomes: 'm' is inf, not a number in [0, 1]",
            ),
            (b'{"prompt": "x", "outcomes": {"m": "good"}}', "outcomes: 'm' is not a number"),
        ],
        ids=["latin-1", "nested", "nan", "seven", "400-digit", "text"],
    )
    def test_lines_fit_would_refuse_are_refused_the_same_way(self, tmp_path: Path, line: bytes, problem: str) -> None:
        """Each line is decoded as UTF-8 by itself and its outcomes checked as fit checks them (a
        score is a finite number in [0, 1]), so a bad one is named by file and line: no traceback,
        and no NaN in the --json report."""
        path = tmp_path / "bad.jsonl"
        path.write_bytes(b'{"prompt": "fine", "outcomes": {"m": 1}}\n\n' + line + b"\n")
        with pytest.raises(SimulationDataError) as caught:
            list(read_prompts(path))
        assert caught.value.message == f"{path}:3: {problem}"


class TestSimulate:
    async def test_mix_cost_baseline_and_savings(self, tmp_path: Path) -> None:
        """Estimated cost is the decisions' estimates; the baseline prices the same tokens on claude-sonnet."""
        path = _write(
            tmp_path / "p.jsonl",
            [{"prompt": "What is the capital of France?"}, {"prompt": "Write a sort", "task_hint": "code_generation"}],
        )
        settings = settings_from(default_config())
        report = await simulate(settings, read_prompts(path))
        tokens = [
            estimate_input_tokens(ChatRequest((Message(Role.USER, p),)))
            for p in ("What is the capital of France?", "Write a sort")
        ]
        mini = (tokens[0] * Decimal("0.15") + 512 * Decimal("0.60")) / 1_000_000
        gpt4o = (tokens[1] * Decimal("2.50") + 512 * Decimal("10.00")) / 1_000_000
        baseline = sum((t * Decimal(3) + 512 * Decimal(15)) / 1_000_000 for t in tokens)
        assert {m.model: m.requests for m in report.models.values()} == {"gpt-4o-mini": 1, "gpt-4o": 1}
        assert (report.estimated_cost_usd, report.baseline_cost_usd) == (mini + gpt4o, baseline)
        assert report.savings_usd == baseline - mini - gpt4o
        assert report.quality_kept is None

    async def test_rows_the_service_would_refuse_are_not_routable(self, tmp_path: Path) -> None:
        """An empty prompt and max_output_tokens below 1 or over the cap are refused as the service
        refuses them, counted by reason; nothing is priced for them (a negative count made the
        costs negative)."""
        rows = [
            {"prompt": "hi", "max_output_tokens": -100000},
            {"prompt": "hi", "max_output_tokens": 10**9},
            {"prompt": "   "},
            {"prompt": "What is the capital of France?"},
        ]
        report = await simulate(settings_from(default_config()), read_prompts(_write(tmp_path / "p.jsonl", rows)))
        assert (report.prompts, report.skipped) == (1, 3)
        assert report.errors == {"INVALID_REQUEST": 3}
        assert report.estimated_cost_usd > 0

    async def test_tenants_route_limits_are_not_counted(self, tmp_path: Path) -> None:
        """Five prompts of a tenant allowed two Route calls a minute are all routed: simulate
        calls no provider and is no Route traffic (three were not routable, RATE_LIMITED, and
        with shared_state.redis_url each was counted in the live tenant's shared counter)."""
        config = default_config()
        config["tenants"] = {"acme": {"route_requests_per_minute": 2}}
        rows = [{"prompt": f"Say hi {n}", "tenant": "acme"} for n in range(5)]
        report = await simulate(settings_from(config), read_prompts(_write(tmp_path / "p.jsonl", rows)))
        assert (report.prompts, report.skipped, report.errors) == (5, 0, {})

    async def test_quality_kept_needs_scores_for_the_chosen_and_the_baseline_model(self, tmp_path: Path) -> None:
        """Without a map only identical ids are scored; --model-map names the file's models."""
        rows = [
            {"prompt": "hello", "outcomes": {"small": 1.0, "big": 1.0}},
            {"prompt": "hi there", "outcomes": {"small": 0.0, "big": 1.0}},
            {"prompt": "thanks a lot", "outcomes": {"small": 1.0}},
        ]
        path = _write(tmp_path / "p.jsonl", rows)
        settings = settings_from(default_config())
        unmapped = await simulate(settings, read_prompts(path))
        assert (unmapped.scored, unmapped.quality_kept) == (0, None)
        mapped = await simulate(settings, read_prompts(path), {"gpt-4o-mini": "small", "claude-sonnet": "big"})
        assert (mapped.scored, mapped.quality_kept) == (2, 0.5)
        assert mapped.as_json()["quality"] == {
            "scored_prompts": 2,
            "model_map": {"gpt-4o-mini": "small", "claude-sonnet": "big"},
            "chosen_mean_score": 0.5,
            "baseline_mean_score": 1.0,
            "quality_kept": 0.5,
        }

    async def test_the_baseline_model_is_configurable(self, tmp_path: Path) -> None:
        """telemetry.baseline_model replaces the most expensive model as the baseline."""
        config = default_config()
        config["telemetry"] = {"baseline_model": "gpt-4o"}
        path = _write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
        report = await simulate(settings_from(config), read_prompts(path))
        assert report.baseline_model == "gpt-4o"

    async def test_the_live_feedback_store_is_left_alone(self, tmp_path: Path) -> None:
        """With an embedding stage that keeps feedback, a simulation routes by the stage's router but
        opens no feedback store: the file is unchanged, and the real decisions waiting in it (here
        at its cap of 2) are not pushed out by simulated ones."""
        config = embedding_config(tmp_path, feedback_max_pending_decisions=2)
        store = FeedbackStore(tmp_path / "feedback.db", max_pending_decisions=2)
        for decision_id in ("real-1", "real-2"):
            store.remember(decision_id, "gpt-4o", np.ones(128, np.float32), "hashing-128")
        store.close()
        before = _feedback_files(tmp_path)
        rows = [{"prompt": f"say hello to {name}"} for name in ("alpha", "bravo", "charlie", "delta")]
        report = await simulate(settings_from(config), read_prompts(_write(tmp_path / "p.jsonl", rows)))
        assert report.prompts == 4
        assert _feedback_files(tmp_path) == before
        store = FeedbackStore(tmp_path / "feedback.db", max_pending_decisions=2)
        try:
            assert store.record("real-1", 1.0).decision_id == "real-1"
        finally:
            store.close()

    async def test_the_router_is_closed_when_a_line_fails_mid_run(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad line after some routed ones ends the run with its data error, and the router (with
        whatever its policy holds open) is closed all the same."""
        closed: list[Router] = []
        aclose = Router.aclose

        async def recording_aclose(self: Router) -> None:
            closed.append(self)
            await aclose(self)

        monkeypatch.setattr(Router, "aclose", recording_aclose)
        path = tmp_path / "p.jsonl"
        path.write_text('{"prompt": "hello"}\n{"prompt": 3}\n', encoding="utf-8")
        with pytest.raises(SimulationDataError, match=r"p\.jsonl:2"):
            await simulate(settings_from(default_config()), read_prompts(path))
        assert len(closed) == 1


class TestMatchesTheLiveService:
    async def test_simulate_equals_getstats_after_the_same_prompts(self, tmp_path: Path, fake: FakeProvider) -> None:
        """RouterBench prompts through `routesvc simulate` and through the live service give the same
        model mix, estimated cost and baseline; with usage equal to the estimate, the same savings."""
        rows = _routerbench_rows(30)
        path = _write(tmp_path / "routerbench30.jsonl", rows)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "routesvc", "simulate", "--data", str(path), "--json",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        simulated = json.loads(out)
        async with observed_server(fake) as observed:
            for row in rows:
                prompt = str(row["prompt"])
                tokens = estimate_input_tokens(ChatRequest((Message(Role.USER, prompt),)))
                fake.enqueue(Script(input_tokens=tokens, output_tokens=512))
                context = pb.RoutingContext(
                    task_hint=str(row.get("task_hint", "")), user_tier=str(row.get("user_tier", ""))
                )
                async for _ in observed.client.complete(user_chat(prompt), context):
                    pass
            stats = await observed.client.get_stats()
        assert {m["model"]: m["requests"] for m in simulated["models"]} == {
            m.model: m.totals.requests for m in stats.models
        }
        assert len(stats.models) > 1
        assert Decimal(simulated["estimated_cost_usd"]) == Decimal(stats.totals.estimated_cost_usd)
        assert Decimal(simulated["baseline_cost_usd"]) == Decimal(stats.totals.estimated_baseline_cost_usd)
        assert Decimal(simulated["estimated_cost_usd"]) == Decimal(stats.totals.cost_usd)
        assert Decimal(simulated["savings_usd"]) == Decimal(stats.totals.savings_usd)

    async def test_a_tenants_configured_user_tier_routes_as_it_does_live(self, tmp_path: Path) -> None:
        """A tenant configured ``user_tier: premium`` (the tier of its requests that name none):
        the live Route sends its plain question to gpt-4o (rule premium_tier), and so does
        simulate, at the same estimate (it routed it to gpt-4o-mini, ignoring the tier); a row
        that names its own tier keeps it."""
        config = default_config()
        config["tenants"] = {"acme": {"user_tier": "premium"}}
        settings = settings_from(config)
        prompt = "What is the capital of France?"
        rows = [{"prompt": prompt, "tenant": "acme"}, {"prompt": prompt, "tenant": "acme", "user_tier": "free"}]
        report = await simulate(settings, read_prompts(_write(tmp_path / "p.jsonl", rows)))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            live = await client.route(user_chat(prompt), pb.RoutingContext(tenant="acme"))
            free = await client.route(user_chat(prompt), pb.RoutingContext(tenant="acme", user_tier="free"))
        assert (live.model, live.rule, free.model) == ("gpt-4o", "premium_tier", "gpt-4o-mini")
        assert {m.model: m.requests for m in report.models.values()} == {"gpt-4o": 1, "gpt-4o-mini": 1}
        assert report.estimated_cost_usd == Decimal(live.estimated_cost_usd) + Decimal(free.estimated_cost_usd)


class TestSimulateCommand:
    def test_the_shared_routerbench_rows_with_the_default_policy(self) -> None:
        """On the RouterBench file the text report gives the mix, cost, baseline, savings and quality kept."""
        result = subprocess.run(
            [
                sys.executable, "-m", "routesvc", "simulate", "--data", str(ROUTERBENCH),
                "--model-map", "gpt-4o-mini=gpt-3.5-turbo-1106", "--model-map", "claude-sonnet=gpt-4-1106-preview",
            ],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("prompts:         2216")
        assert any(line.startswith("  gpt-4o-mini") for line in lines)
        assert any(line.startswith("savings:") and "%" in line for line in lines)
        assert any(line.startswith("quality kept:    ") and "scored prompts" in line for line in lines)

    def test_json_output_never_carries_nan(self, tmp_path: Path) -> None:
        """--json on a file with a NaN outcome: one line naming file and line, exit 2, nothing on
        stdout (the report printed NaN, which is not JSON, with exit 0)."""
        path = tmp_path / "nan.jsonl"
        path.write_text('{"prompt": "What is 2+2?", "outcomes": {"gpt-4o-mini": NaN, "claude-sonnet": 1}}\n')
        result = subprocess.run(
            [sys.executable, "-m", "routesvc", "simulate", "--data", str(path), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"error: {path}:1: outcomes: 'gpt-4o-mini' is nan, not a number in [0, 1]\n"

    def test_a_missing_file_is_one_line_and_exit_2(self, tmp_path: Path) -> None:
        """An unreadable --data file is reported without a traceback."""
        result = subprocess.run(
            [sys.executable, "-m", "routesvc", "simulate", "--data", str(tmp_path / "none.jsonl")],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stderr.count("\n")) == (2, 1)
        assert "none.jsonl: cannot read" in result.stderr

    def test_a_policy_with_an_llm_classifier_is_refused_naming_the_limit(self, tmp_path: Path) -> None:
        """simulate calls no provider, so a classifier stage with method llm, whose labels are a
        model's answers, cannot be simulated: one line naming the stage and the limit, exit 2, with
        the provider's key set (it said the provider "has no credentials" and to set its key)."""
        config = default_config()
        config["routing"]["stages"][0] = {"kind": "classifier", "method": "llm", "model": "gpt-4o-mini"}  # type: ignore[index]
        config_path = tmp_path / "llm.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        data = _write(tmp_path / "p.jsonl", [{"prompt": "Write a Python function that sorts a list"}])
        environ = {**os.environ, "OPENAI_API_KEY": "test-key", "ANTHROPIC_API_KEY": "test-key"}
        result = subprocess.run(
            [sys.executable, "-m", "routesvc", "simulate", "--data", str(data), "--config", str(config_path)],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=environ,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            f"error: {config_path}: routing.stages[0].method: simulate calls no provider, so it cannot run a"
            " classifier stage with method llm (its labels are the model's answers); simulate with method local"
            " in that stage\n"
        )
