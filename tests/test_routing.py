"""Route: the seed policy over a real gRPC server, with reasons naming each rule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from routesvc.client import RouterClient
from routesvc.encoders import HashingEncoder
from routesvc.fitting import FitSettings, fit_router
from routesvc.server import Server
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, settings_from, user_chat
from tests.routing_data import STRONG, WEAK, records
from tests.test_validation import error_info

PLAIN = "What is the capital of France?"


def _tools(count: int) -> list[pb.Tool]:
    return [pb.Tool(name=f"t{index}") for index in range(count)]


async def _route(
    client: RouterClient, prompt: str = PLAIN, *, chat: pb.ChatRequest | None = None, **context: object
) -> pb.RouteDecision:
    return await client.route(chat or user_chat(prompt), pb.RoutingContext(**context))  # type: ignore[arg-type]


class TestSeedPolicy:
    async def test_plain_question_takes_the_default(self, client: RouterClient) -> None:
        """A prompt no rule matches goes to gpt-4o-mini, saying no rule matched."""
        decision = await _route(client)
        assert (decision.model, decision.strategy, decision.rule) == ("gpt-4o-mini", "default", "default")
        assert "no rule matched" in decision.reasons
        assert decision.mode == pb.MODE_REALTIME

    @pytest.mark.parametrize(
        ("task", "model"),
        [("code_generation", "gpt-4o"), ("multi_step_reasoning", "gpt-4o"), ("creative_writing", "claude-sonnet")],
    )
    async def test_task_hints_escalate(self, client: RouterClient, task: str, model: str) -> None:
        """Task labels from the hint pick the seed's model, and the reason names the rule."""
        decision = await _route(client, task_hint=task)
        assert (decision.model, decision.rule, decision.task) == (model, task, task)
        rule_reasons = [reason for reason in decision.reasons if reason.startswith(f"rule {task} ")]
        assert len(rule_reasons) == 1
        assert "(from hint)" in rule_reasons[0]

    async def test_a_hint_the_policy_does_not_know_is_set_aside(self, client: RouterClient) -> None:
        """A typo'd hint ("codegen") would have skipped the classifier and matched no rule: it is
        ignored, the classifier labels the code request, and the decision says so."""
        decision = await _route(client, "Write a Python function that merges two sorted lists", task_hint="codegen")
        assert (decision.model, decision.task) == ("gpt-4o", "code_generation")
        assert decision.reasons[0] == "context.task_hint is not a task this policy knows; ignored"

    async def test_a_hint_a_rule_names_is_known(self) -> None:
        """A task of the operator's own, named in a rule's task_in, is a hint the policy knows."""
        config = default_config()
        config["routing"]["stages"].insert(  # type: ignore[index]
            0, {"kind": "rules", "rules": [{"name": "legal", "when": {"task_in": ["legal_review"]}, "model": "gpt-4o"}]}
        )
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision = await _route(client, task_hint="legal_review")
        assert (decision.model, decision.rule, decision.task) == ("gpt-4o", "legal", "legal_review")

    @pytest.mark.parametrize(
        ("prompt", "model", "task"),
        [
            ("Write a Python function that merges two sorted lists", "gpt-4o", "code_generation"),
            ("Write a short poem about autumn leaves falling in the rain", "claude-sonnet", "creative_writing"),
        ],
    )
    async def test_without_a_hint_the_classifier_labels_the_task(
        self, client: RouterClient, prompt: str, model: str, task: str
    ) -> None:
        """The default policy labels tasks offline, so the seed rules work with no task hint."""
        decision = await _route(client, prompt)
        assert (decision.model, decision.task, decision.rule) == (model, task, task)
        assert any(reason.startswith("classifier: local model labelled the task") for reason in decision.reasons)

    async def test_premium_tier_escalates(self, client: RouterClient) -> None:
        """Premium users get gpt-4o."""
        decision = await _route(client, user_tier="premium")
        assert (decision.model, decision.rule) == ("gpt-4o", "premium_tier")

    async def test_more_than_five_tools_go_to_sonnet(self, client: RouterClient) -> None:
        """Six tool definitions pick claude-sonnet; five do not."""
        six = await _route(client, chat=user_chat(PLAIN, tools=_tools(6)))
        five = await _route(client, chat=user_chat(PLAIN, tools=_tools(5)))
        assert (six.model, six.rule, five.model) == ("claude-sonnet", "many_tools", "gpt-4o-mini")

    async def test_long_inputs_go_to_sonnet_and_others_are_excluded(self, client: RouterClient) -> None:
        """Over 128K estimated tokens picks claude-sonnet; the 128K models are excluded with the numbers."""
        decision = await _route(client, "word " * 130_000)
        assert (decision.model, decision.rule) == ("claude-sonnet", "long_context")
        assert decision.estimated_input_tokens > 128_000
        excluded = {c.model: c.excluded_reason for c in decision.candidates if not c.eligible}
        assert set(excluded) == {"gpt-4o-mini", "gpt-4o"}
        assert excluded["gpt-4o"].startswith("context window 128000 < ")

    async def test_not_realtime_is_batch_mode_at_the_batch_price(self, client: RouterClient) -> None:
        """realtime=false sets batch mode; the estimate is at the discounted price."""
        realtime = await _route(client)
        batch = await _route(client, realtime=False)
        assert (batch.mode, batch.model) == (pb.MODE_BATCH, "gpt-4o-mini")
        assert any(reason.startswith("rule deferrable") for reason in batch.reasons)
        assert float(batch.estimated_cost_usd) == pytest.approx(float(realtime.estimated_cost_usd) / 2)

    async def test_every_matching_rule_is_explained_in_precedence_order(self, client: RouterClient) -> None:
        """Creative writing by a premium user: creative_writing (precedence 3) wins over premium_tier (6)."""
        decision = await _route(client, task_hint="creative_writing", user_tier="premium")
        assert decision.model == "claude-sonnet"
        rules = [reason for reason in decision.reasons if reason.startswith("rule ")]
        assert rules[0].startswith("rule creative_writing (precedence 3)")
        assert rules[0].endswith("; chosen")
        assert rules[1].startswith("rule premium_tier (precedence 6) matched")
        assert rules[1].endswith("; overridden by creative_writing")

    async def test_estimates_are_tokens_times_price(self, client: RouterClient) -> None:
        """The estimated cost is estimated input tokens and default output tokens at catalog price."""
        decision = await _route(client)
        expected = (decision.estimated_input_tokens * 0.15 + 512 * 0.60) / 1_000_000
        assert decision.estimated_output_tokens == 512
        assert float(decision.estimated_cost_usd) == pytest.approx(expected)

    async def test_decisions_have_unique_ids(self, client: RouterClient) -> None:
        """Every decision gets its own id."""
        ids = {(await _route(client)).decision_id for _ in range(5)}
        assert len(ids) == 5

    async def test_missing_credentials_are_reported_without_failing_route(self, client: RouterClient) -> None:
        """Route still decides without keys, and says which variable Complete needs."""
        decision = await _route(client)
        assert any("OPENAI_API_KEY" in reason for reason in decision.reasons)


def _with_mode_rules() -> dict[str, object]:
    """The default policy plus two rules that set claude-sonnet and batch mode: one first, one last."""
    config = default_config()
    rules = config["routing"]["stages"][1]["rules"]  # type: ignore[index]
    first = {"name": "reports_overnight", "when": {"metadata": {"kind": "report"}}}
    last = {"name": "reports_late", "when": {"metadata": {"kind": "report2"}}}
    rules.insert(0, {**first, "model": "claude-sonnet", "mode": "batch"})
    rules.append({**last, "model": "claude-sonnet", "mode": "batch"})
    return config


class TestModes:
    """The mode comes from the rule that picked the model or from a rule that sets only a mode,
    never from a rule that was skipped or overridden, and a reason names its rule."""

    async def test_a_skipped_rule_sets_no_mode(self) -> None:
        """A realtime JSON-mode request matches a batch rule whose model (claude-sonnet, no JSON
        object mode) cannot serve it: the rule is skipped, so its mode is not taken either (it made
        the request a batch job on gpt-4o-mini, explained only as default/default)."""
        chat = user_chat("Summarise the quarter as json")
        chat.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
        async with Server(settings_from(_with_mode_rules()), port=0) as server, RouterClient(server.target) as client:
            decision = await _route(client, chat=chat, metadata={"kind": "report"})
        assert (decision.model, decision.mode, decision.rule) == ("gpt-4o-mini", pb.MODE_REALTIME, "default")
        skipped = [r for r in decision.reasons if r.startswith("rule reports_overnight (precedence 1)")]
        assert len(skipped) == 1
        assert "; skipped: " in skipped[0]
        assert not any(reason.startswith("mode ") for reason in decision.reasons)

    async def test_an_overridden_rule_sets_no_mode(self) -> None:
        """A code request that also matches a later batch rule: code_generation picks gpt-4o, the
        later rule is overridden, and the request stays realtime at the realtime price."""
        async with Server(settings_from(_with_mode_rules()), port=0) as server, RouterClient(server.target) as client:
            decision = await _route(client, task_hint="code_generation", metadata={"kind": "report2"})
        assert (decision.model, decision.mode, decision.rule) == ("gpt-4o", pb.MODE_REALTIME, "code_generation")
        assert any(r.endswith("; overridden by code_generation") for r in decision.reasons)
        assert not any(reason.startswith("mode ") for reason in decision.reasons)

    async def test_the_chosen_rule_sets_its_mode_and_is_named(self) -> None:
        """The batch rule that picks its model sets its mode, and the reasons say the mode is its."""
        async with Server(settings_from(_with_mode_rules()), port=0) as server, RouterClient(server.target) as client:
            decision = await _route(client, metadata={"kind": "report"})
        assert (decision.model, decision.mode, decision.rule) == ("claude-sonnet", pb.MODE_BATCH, "reports_overnight")
        assert "mode batch from rule reports_overnight" in decision.reasons

    async def test_a_rule_that_only_sets_the_mode_applies_with_the_rule_that_picks_the_model(
        self, client: RouterClient
    ) -> None:
        """deferrable sets only the mode: it batches whatever picks the model, default or rule, and
        the reasons name it as the mode's rule."""
        default = await _route(client, realtime=False)
        coded = await _route(client, realtime=False, task_hint="code_generation")
        assert (default.mode, default.rule, coded.mode, coded.rule) == (
            pb.MODE_BATCH,
            "default",
            pb.MODE_BATCH,
            "code_generation",
        )
        assert "mode batch from rule deferrable" in default.reasons
        assert "mode batch from rule deferrable" in coded.reasons


def _without_deferrable() -> dict[str, object]:
    """The default policy without its one batch rule (deferrable)."""
    config = default_config()
    stage = config["routing"]["stages"][1]  # type: ignore[index]
    stage["rules"] = [rule for rule in stage["rules"] if rule["name"] != "deferrable"]
    return config


class TestRealtimeFalse:
    """realtime=false batches an unpinned request only through a rule that sets mode batch; a
    pinned model skips the rules, so there the flag alone batches. Either way the reasons say why."""

    async def test_a_pinned_model_with_realtime_false_is_batched_and_says_why(self) -> None:
        """Pinned and realtime=false, under a policy with no batch rule: batch, at the batch price,
        the reasons saying it is the flag on a pinned model (they said only "pinned")."""
        settings = settings_from(_without_deferrable())
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            pinned = await _route(client, realtime=False, model="gpt-4o-mini")
        assert (pinned.mode, pinned.strategy) == (pb.MODE_BATCH, "pinned")
        assert pinned.reasons[:2] == [
            "model gpt-4o-mini pinned by the request",
            "realtime=false: mode batch (a pinned model skips the policy's rules)",
        ]

    async def test_an_unpinned_request_with_realtime_false_and_no_batch_rule_says_it_is_served_in_realtime(
        self,
    ) -> None:
        """The same request unpinned: no rule sets batch, so it is served in realtime, and the
        reasons say why (they said only "no rule matched")."""
        settings = settings_from(_without_deferrable())
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            routed = await _route(client, realtime=False)
        assert (routed.mode, routed.model) == (pb.MODE_REALTIME, "gpt-4o-mini")
        assert "realtime=false, but no matching rule sets mode batch: served in realtime" in routed.reasons

    async def test_a_batch_rule_says_nothing_more(self, client: RouterClient) -> None:
        """With the default policy's deferrable rule the reasons name it, and nothing else is said."""
        routed = await _route(client, realtime=False)
        assert routed.mode == pb.MODE_BATCH
        assert not any(reason.startswith("realtime=false") for reason in routed.reasons)

    async def test_a_mode_rule_after_an_embedding_stage_that_defers_is_the_one_named(self, tmp_path: Path) -> None:
        """An embedding stage whose two models the tenant may not use defers to a rules stage in
        which a realtime rule (chat_now) matches before the deferrable batch rule: served in
        realtime, the reasons naming chat_now, and not also saying that no matching rule set batch
        (the deferred decision lost which rule set its mode, so both were said)."""
        fit_router(records(), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0)).save(tmp_path / "router")
        config = default_config()
        embedding = {"kind": "embedding", "router": str(tmp_path / "router"), "strong_model": "gpt-4o"}
        config["routing"] = {
            "default_model": "claude-sonnet",
            "stages": [
                {**embedding, "weak_model": "gpt-4o-mini"},
                {
                    "kind": "rules",
                    "rules": [
                        {"name": "chat_now", "when": {"metadata": {"kind": "chat"}}, "mode": "realtime"},
                        {"name": "deferrable", "when": {"realtime": False}, "mode": "batch"},
                    ],
                },
            ],
        }
        config["tenants"] = {"t": {"allowed_models": ["claude-sonnet"]}}
        context = pb.RoutingContext(tenant="t", realtime=False, metadata={"kind": "chat"})
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            routed = await client.route(user_chat("hello"), context)
        assert (routed.model, routed.mode) == ("claude-sonnet", pb.MODE_REALTIME)
        assert routed.reasons[0].endswith("deferred")
        assert any("mode realtime from rule chat_now" in reason for reason in routed.reasons)
        assert not any(reason.startswith("realtime=false") for reason in routed.reasons)


@pytest.fixture
async def custom_client(request: pytest.FixtureRequest) -> AsyncIterator[RouterClient]:
    config, environ = request.param
    async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
        yield client


def _with_rules(rules: list[dict[str, object]], **routing: object) -> dict[str, object]:
    config = default_config()
    config["routing"] = {"default_model": "gpt-4o-mini", "stages": [{"kind": "rules", "rules": rules}], **routing}
    return config


CONDITIONS = _with_rules(
    [
        {"name": "acme", "when": {"tenant_in": ["acme"]}, "model": "claude-sonnet"},
        {"name": "eu", "when": {"metadata": {"region": "eu"}}, "model": "gpt-4o"},
        {"name": "sql", "when": {"last_user_message_matches": r"(?i)\bselect\b.*\bfrom\b"}, "model": "gpt-4o"},
        {"name": "short", "when": {"input_tokens_lt": 5}, "model": "claude-sonnet"},
    ]
)


class TestConditions:
    @pytest.mark.parametrize("custom_client", [(CONDITIONS, {})], indirect=True)
    async def test_tenant_metadata_regex_and_token_conditions(self, custom_client: RouterClient) -> None:
        """Each kind of condition matches only its own requests."""
        assert (await _route(custom_client, tenant="acme")).rule == "acme"
        assert (await _route(custom_client, metadata={"region": "eu"})).rule == "eu"
        assert (await _route(custom_client, metadata={"region": "us"})).rule == "default"
        assert (await _route(custom_client, "Please SELECT name FROM users where x")).rule == "sql"
        assert (await _route(custom_client, "hi")).rule == "default"  # 3 framing + 3 primer + text > 5

    @pytest.mark.parametrize("custom_client", [(CONDITIONS, {})], indirect=True)
    async def test_regex_reasons_never_quote_the_prompt(self, custom_client: RouterClient) -> None:
        """A regex match is explained without repeating the user's text."""
        decision = await _route(custom_client, "select secret_canary_value from users")
        assert decision.rule == "sql"
        assert all("secret_canary_value" not in reason for reason in decision.reasons)


NO_TOOLS = default_config()
NO_TOOLS["models"][1]["capabilities"] = []  # type: ignore[index]
FALLTHROUGH = _with_rules(
    [{"name": "sonnet_for_all", "when": {"realtime": True}, "model": "claude-sonnet"}],
    on_unconfigured_provider="fallthrough",
)


class TestEligibility:
    @pytest.mark.parametrize("custom_client", [(NO_TOOLS, {})], indirect=True)
    async def test_a_rule_whose_model_cannot_serve_is_skipped(self, custom_client: RouterClient) -> None:
        """Premium with tools, when gpt-4o lacks tool support: the rule is skipped, default serves."""
        decision = await _route(custom_client, chat=user_chat(PLAIN, tools=_tools(1)), user_tier="premium")
        assert decision.model == "gpt-4o-mini"
        assert any("skipped: does not support tools" in reason for reason in decision.reasons)

    @pytest.mark.parametrize("custom_client", [(NO_TOOLS, {})], indirect=True)
    async def test_tool_turns_need_a_model_that_takes_tools_even_without_tools_offered(
        self, custom_client: RouterClient
    ) -> None:
        """A conversation that carries a tool call and its result, tools not offered again:
        gpt-4o (no tool support here) is excluded, as it would be if tools were offered."""
        call = pb.ToolCall(id="call_1", name="lookup", arguments_json='{"q": "x"}')
        chat = pb.ChatRequest(
            messages=[
                pb.Message(role=pb.ROLE_USER, content=PLAIN),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="42"),
            ]
        )
        decision = await _route(custom_client, chat=chat, user_tier="premium")
        excluded = {c.model: c.excluded_reason for c in decision.candidates}
        assert excluded["gpt-4o"] == "does not support the tool turns sent"
        assert decision.model == "gpt-4o-mini"

    @pytest.mark.parametrize("custom_client", [(FALLTHROUGH, {"OPENAI_API_KEY": "sk-x"})], indirect=True)
    async def test_fallthrough_skips_models_without_keys(self, custom_client: RouterClient) -> None:
        """With on_unconfigured_provider fallthrough, a model without a key is not chosen."""
        decision = await _route(custom_client)
        assert decision.model == "gpt-4o-mini"
        assert "ANTHROPIC_API_KEY" in {c.model: c.excluded_reason for c in decision.candidates}["claude-sonnet"]

    async def test_pinned_model_is_served(self, client: RouterClient) -> None:
        """context.model pins a catalog model."""
        decision = await _route(client, model="claude-sonnet")
        assert (decision.model, decision.strategy) == ("claude-sonnet", "pinned")

    async def test_unknown_pinned_model_is_not_found(self, client: RouterClient) -> None:
        """An unknown model id is NOT_FOUND naming it."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, model="gpt-9")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gpt-9" in (caught.value.details() or "")

    async def test_no_model_fits_is_resource_exhausted(self, client: RouterClient) -> None:
        """An input larger than every context window is RESOURCE_EXHAUSTED."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, "word " * 210_000)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "context window" in (caught.value.details() or "")

    async def test_a_pinned_model_too_small_for_a_prompt_another_model_fits_is_no_eligible_model(
        self, client: RouterClient
    ) -> None:
        """A prompt past gpt-4o's 128K window that fits claude-sonnet's 200K: pinned to gpt-4o it is
        NO_ELIGIBLE_MODEL naming gpt-4o's window (the request can be served: shortening the prompt
        is not the only way), unpinned it goes to claude-sonnet."""
        prompt = "word " * 130_000
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, prompt, model="gpt-4o")
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_ELIGIBLE_MODEL",
        )
        assert (caught.value.details() or "").startswith(
            "the pinned model gpt-4o cannot serve the request (context window 128000 < "
        )
        assert (await _route(client, prompt)).model == "claude-sonnet"

    async def test_a_pinned_model_too_small_when_only_a_model_the_tenant_may_not_use_fits(self) -> None:
        """The same prompt pinned to gpt-4o by a tenant that may use gpt-4o-mini and gpt-4o only:
        CONTEXT_WINDOW_EXCEEDED, no hint pointing at a model it cannot use (it said "another
        model's context window fits it", counting claude-sonnet, which its allow-list refuses)."""
        config = default_config()
        config["tenants"] = {"acme": {"allowed_models": ["gpt-4o-mini", "gpt-4o"]}}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _route(client, "word " * 130_000, model="gpt-4o", tenant="acme")
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CONTEXT_WINDOW_EXCEEDED",
        )
        assert "another model" not in (caught.value.details() or "")

    async def test_a_pinned_model_too_small_for_a_prompt_no_model_fits_is_context_window_exceeded(
        self, client: RouterClient
    ) -> None:
        """A prompt past every model's window, pinned: CONTEXT_WINDOW_EXCEEDED, as unpinned."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, "word " * 210_000, model="claude-sonnet")
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CONTEXT_WINDOW_EXCEEDED",
        )


class TestMaxCost:
    async def test_over_budget_choice_is_downgraded(self, client: RouterClient) -> None:
        """A premium request capped below gpt-4o's estimate goes to the cheapest model within the cap."""
        decision = await _route(client, user_tier="premium", max_cost_usd="0.001")
        assert decision.model == "gpt-4o-mini"
        assert "exceeds max_cost_usd 0.001; downgraded to gpt-4o-mini" in decision.reasons[-2]

    async def test_a_downgraded_decision_names_the_cap_not_the_rule_that_chose_another_model(
        self, client: RouterClient
    ) -> None:
        """The cap picked the model, so strategy and rule say so (they named the rule that picked
        gpt-4o, which did not serve); the reason names the strategy and rule that chose it."""
        chosen = await _route(client, user_tier="premium")
        decision = await _route(client, user_tier="premium", max_cost_usd="0.001")
        assert (chosen.model, decision.model) == ("gpt-4o", "gpt-4o-mini")
        assert (decision.strategy, decision.rule) == ("max_cost", "max_cost_downgrade")
        assert (
            f"on gpt-4o (chosen by {chosen.strategy} / {chosen.rule}) exceeds max_cost_usd 0.001"
            in (decision.reasons[-2])
        )

    async def test_a_pinned_model_over_the_cap_is_refused_not_replaced(self, client: RouterClient) -> None:
        """A pin replaces the policy's choice, so it is not downgraded: a pinned model whose
        estimate is over the cap is RESOURCE_EXHAUSTED naming it (it was served by gpt-4o-mini
        under a decision saying "model gpt-4o pinned by the request")."""
        within = await _route(client, model="gpt-4o", max_cost_usd="1")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, model="gpt-4o", max_cost_usd="0.001")
        assert within.model == "gpt-4o"
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pinned model gpt-4o" in (caught.value.details() or "")

    async def test_nothing_within_the_cap_is_resource_exhausted(self, client: RouterClient) -> None:
        """When even the cheapest eligible model costs more than the cap, the request is refused."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _route(client, max_cost_usd="0.0000001")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
