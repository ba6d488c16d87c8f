"""What providers bill, through a real server and the fake provider: prompt-cache writes at their
own price, a spent quota that no retry helps, and usage the provider did not report."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2
from structlog.testing import capture_logs

from routesvc.client import RouterClient, build_chat
from routesvc.errors import ProviderError, ProviderStalled, ProviderTimedOut, ProviderUnavailable
from routesvc.ledger import AttemptOutcome
from routesvc.models import ChatRequest, Message, ProviderEvent, Role, ToolCall, ToolSpec, UpstreamCall, Usage
from routesvc.providers.anthropic import AnthropicProvider
from routesvc.providers.anthropic_batch import AnthropicBatches
from routesvc.providers.base import ProviderCall
from routesvc.providers.batch import BatchItem
from routesvc.server import Server
from routesvc.sidecall import side_call
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.tokens import count_text_tokens, estimate_input_tokens
from routesvc.v1 import router_pb2 as pb
from tests.conftest import add_local_model, default_config, live_environ, settings_from, until, user_chat
from tests.observability import observed_server
from tests.test_batches import batch_config, submit, wait_state
from tests.test_classifier import CHEAP
from tests.test_validation import error_info

_PER_TOKEN = Decimal(1_000_000)


def _details(error: grpc.aio.AioRpcError) -> list[str]:
    """The type names of the rich status details of a failed call."""
    metadata = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(metadata["grpc-status-details-bin"])
    return [detail.TypeName() for detail in status.details]


class TestCacheWrites:
    """Anthropic bills prompt-cache writes at 1.25x the input price (5-minute cache) and 2x (1-hour)."""

    async def test_a_streamed_answer_bills_cache_writes_at_their_price(
        self, fake: FakeProvider, live_server: Server, live_client: RouterClient
    ) -> None:
        """100,000 input tokens written to the cache on claude-sonnet ($3 in, $15 out), 40,000 of
        them to the 1-hour cache: 60,000 x 3.75 + 40,000 x 6 + 5 x 15 per 1M; the Completion shows
        the writes, and the ledger holds the same cost."""
        fake.enqueue(
            Script(input_tokens=100_000, cache_creation_input_tokens=100_000, cache_creation_1h_input_tokens=40_000)
        )
        messages = [
            m async for m in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="claude-sonnet"))
        ]
        completion = messages[-1].completion
        expected = (60_000 * Decimal("3.75") + 40_000 * Decimal(6) + 5 * Decimal(15)) / _PER_TOKEN
        assert Decimal(completion.cost_usd) == expected == Decimal("0.465075")
        assert (completion.usage.input_tokens, completion.usage.cache_write_input_tokens) == (100_000, 100_000)
        assert completion.usage.cache_write_1h_input_tokens == 40_000
        assert completion.total_usage == completion.usage
        (entry,) = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert (entry.cost_usd, entry.usage.cache_write_input_tokens) == (expected, 100_000)

    async def test_a_batch_answer_bills_cache_writes_at_their_price_less_the_discount(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch job on claude-sonnet with 60 of its 100 input tokens written to the cache costs
        (40 x 3 + 60 x 3.75 + 20 x 15) per 1M, halved by the batch discount."""
        fake.enqueue(
            Script(text="ok", input_tokens=100, output_tokens=20, cache_creation_input_tokens=60),
            model="claude-sonnet-4-6",
        )
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint="creative_writing"))[1].batch
            assert job.model == "claude-sonnet"
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        expected = (40 * Decimal(3) + 60 * Decimal("3.75") + 20 * Decimal(15)) / _PER_TOKEN / 2
        assert Decimal(done.result.cost_usd) == expected
        # The stored result keeps the cache writes with the rest of its usage.
        assert (done.result.usage.input_tokens, done.result.usage.cache_write_input_tokens) == (100, 60)


QUOTA_BODY = json.dumps(
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
)


class TestQuotaExhausted:
    """OpenAI's 429 ``insufficient_quota`` (billing exhausted) is no rate limit: waiting does not help."""

    async def test_the_request_falls_back_to_another_provider_without_retry_or_breaker(
        self, fake: FakeProvider, live_server: Server, live_client: RouterClient
    ) -> None:
        """Six requests pinned to gpt-4o (fallback claude-sonnet) while the OpenAI key's quota is spent:
        each calls gpt-4o once (no retry, and no breaker opens: all six still try it) and is answered
        by claude-sonnet."""
        fake.set_default(Script(status=429, error_body=QUOTA_BODY), model="gpt-4o")
        answered = []
        for _ in range(6):
            messages = [
                m async for m in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="gpt-4o"))
            ]
            answered.append(messages[-1].completion.model)
        assert answered == ["claude-sonnet"] * 6
        assert [r.model for r in fake.requests] == ["gpt-4o", "claude-sonnet-4-6"] * 6

    async def test_the_providers_other_models_are_skipped_and_the_caller_is_not_told_to_retry(
        self, fake: FakeProvider, live_client: RouterClient
    ) -> None:
        """Pinned to gpt-4o-mini, whose only fallback (gpt-4o) is on the same key: one upstream
        request, then FAILED_PRECONDITION ``PROVIDER_QUOTA_EXHAUSTED`` with no ``RetryInfo``."""
        fake.set_default(Script(status=429, error_body=QUOTA_BODY, retry_after="20"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="gpt-4o-mini")):
                pass
        error = caught.value
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
        assert (error.code(), error_info(error).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_QUOTA_EXHAUSTED",
        )
        assert _details(error) == ["google.rpc.ErrorInfo"]
        assert error.details() == "provider openai model gpt-4o-mini: HTTP 429 (insufficient_quota)"

    async def test_a_gateways_402_for_spent_credits_is_quota_exhausted(self, fake: FakeProvider) -> None:
        """An OpenAI-compatible gateway that answers 402 for a spent balance (OpenRouter's
        "insufficient credits", its code a number): one upstream request, then FAILED_PRECONDITION
        ``PROVIDER_QUOTA_EXHAUSTED`` (it was read as an outage: retried, UNAVAILABLE)."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "routed")
        credits = {"error": {"code": 402, "message": "Insufficient credits. Add more using the credits page"}}
        fake.set_default(Script(status=402, error_body=json.dumps(credits)))
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("Say hello"), pb.RoutingContext(model="routed")):
                    pass
        assert len(fake.requests) == 1
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_QUOTA_EXHAUSTED",
        )


class TestQuotaExhaustedInARequestOfSeveralModels:
    async def test_a_cascade_step_whose_quota_is_spent_escalates_to_another_provider(self, fake: FakeProvider) -> None:
        """Chain gpt-4o-mini -> claude-sonnet with the OpenAI key's quota spent: the step fails
        and the request escalates to claude-sonnet, which answers (the quota error ended it)."""
        config = default_config()
        steps = [{"model": "gpt-4o-mini", "threshold": 0.8}, {"model": "claude-sonnet"}]
        config["cascade"] = {"apply": "always", "scorers": ["local"], "chains": [{"steps": steps}]}
        for model in ("gpt-4o-mini", "gpt-4o"):  # one OpenAI key: its quota is spent for both
            fake.set_default(Script(status=429, error_body=QUOTA_BODY), model=model)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext())]
        assert messages[-1].completion.model == "claude-sonnet"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "claude-sonnet-4-6"]

    async def test_no_escalation_is_announced_to_a_step_whose_quota_was_found_spent(self, fake: FakeProvider) -> None:
        """gpt-4o-mini finds the OpenAI key's quota spent, and gpt-4o, the next step, is on the same
        key with no fallback: the request ends with the quota error, announcing no escalation to a
        model it never calls (one was announced, and counted in GetStats)."""
        config = default_config()
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        fake.set_default(Script(status=429, error_body=QUOTA_BODY), model="gpt-4o-mini")
        messages: list[pb.CompleteResponse] = []

        async def complete(client: RouterClient) -> None:
            async for message in client.complete(user_chat("hi"), pb.RoutingContext(cascade=True)):
                messages.append(message)

        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await complete(client)
            stats = await client.get_stats()
        assert [m.WhichOneof("event") for m in messages] == ["decision"]
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "PROVIDER_QUOTA_EXHAUSTED",
        )
        assert stats.escalations == 0
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    @staticmethod
    def judged_chain(fake: FakeProvider, *steps: str) -> dict[str, object]:
        """A cascade always applied over ``steps`` (each but the last held to 0.8), judged by gpt-4o
        on the OpenAI key, whose failure escalates; requests without a task go to the first step.
        "llama" is a local OpenAI-compatible model."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llama")
        config["routing"]["default_model"] = steps[0]  # type: ignore[index]
        chain = [{"model": model, "threshold": 0.8} for model in steps[:-1]] + [{"model": steps[-1]}]
        config["cascade"] = {
            "apply": "always",
            "scorers": ["llm_judge"],
            "judge": {"model": "gpt-4o", "timeout_seconds": 5, "on_failure": "escalate"},
            "chains": [{"steps": chain}],
        }
        return config

    async def test_the_judge_is_not_asked_on_a_provider_whose_quota_the_request_found_spent(
        self, fake: FakeProvider
    ) -> None:
        """Chain gpt-4o-mini -> llama -> claude-sonnet, judged by gpt-4o, with the OpenAI key's
        quota spent: gpt-4o-mini's failure tells the request, so llama's answer is not sent to the
        judge on the same key (a call certain to fail); the judge's on_failure escalates it."""
        config = self.judged_chain(fake, "gpt-4o-mini", "llama", "claude-sonnet")
        for model in ("gpt-4o-mini", "gpt-4o"):
            fake.set_default(Script(status=429, error_body=QUOTA_BODY), model=model)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext())]
        escalations = [m.escalation for m in messages if m.WhichOneof("event") == "escalation"]
        assert messages[-1].completion.model == "claude-sonnet"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "llama", "claude-sonnet-4-6"]
        assert "quota was found spent" in escalations[-1].quality.reason

    async def test_a_judge_that_finds_its_quota_spent_rules_out_its_provider_for_later_steps(
        self, fake: FakeProvider
    ) -> None:
        """Chain llama -> gpt-4o-mini -> claude-sonnet, judged by gpt-4o, with the OpenAI key's
        quota spent: the judge's own failure says so, and the request skips gpt-4o-mini (same key)
        for claude-sonnet instead of calling it to find out again."""
        config = self.judged_chain(fake, "llama", "gpt-4o-mini", "claude-sonnet")
        for model in ("gpt-4o-mini", "gpt-4o"):
            fake.set_default(Script(status=429, error_body=QUOTA_BODY), model=model)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext())]
        assert messages[-1].completion.model == "claude-sonnet"
        assert [r.model for r in fake.requests] == ["llama", "gpt-4o", "claude-sonnet-4-6"]

    async def test_a_model_only_rate_limited_is_what_the_caller_is_told(
        self, fake: FakeProvider, live_client: RouterClient
    ) -> None:
        """gpt-4o is rate limited and its fallback's account is unpaid: the caller gets
        RESOURCE_EXHAUSTED with a retry delay (a later retry may be answered by gpt-4o), not
        'do not retry until paid'."""
        fake.set_default(Script(status=429, retry_after="1"), model="gpt-4o")
        fake.set_default(Script(status=402, error_type="billing_error"), model="claude-sonnet-4-6")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="gpt-4o")):
                pass
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PROVIDER_RATE_LIMITED",
        )
        assert [r.model for r in fake.requests] == ["gpt-4o", "gpt-4o", "claude-sonnet-4-6"]


class TestQuotaExhaustedBehindAnOpenBreaker:
    async def test_a_model_behind_an_open_breaker_is_what_the_caller_is_told(self, fake: FakeProvider) -> None:
        """gpt-4o's breaker is open (it half-opens again soon) and its fallback's account is unpaid:
        the caller is told UNAVAILABLE, which a retry may get past, not 'do not retry until paid'."""
        config = default_config()
        config["reliability"] = {"breaker": {"failure_threshold": 1}}
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.enqueue(Script(status=500), Script(status=500), model="gpt-4o")  # opens gpt-4o's breaker
            fake.enqueue(Script(text="ok"), model="claude-sonnet-4-6")
            [m async for m in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o"))]
            fake.set_default(Script(status=402, error_type="billing_error"), model="claude-sonnet-4-6")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o")):
                    pass
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
        )


class TestAttemptsThatNeverReachedTheProvider:
    """An attempt cut before its request went out (its connection never made) cost nothing."""

    @pytest.mark.parametrize("reached", [False, True], ids=["never_connected", "received_unanswered"])
    async def test_a_stalled_attempt_is_charged_only_once_the_provider_had_it(
        self, fake: FakeProvider, unaccepting_port: int, reached: bool
    ) -> None:
        """A 2,000-token prompt to a local model that sends nothing, stalled twice (a retry) by
        the first-token timer: at a host whose TCP handshake never completes, both attempts cost
        nothing and the tenant has spent nothing (each was charged its input estimate); at a
        provider that read the request and never answered, each is charged that estimate."""
        config = default_config()
        url = fake.openai_base_url if reached else f"http://127.0.0.1:{unaccepting_port}/v1"
        add_local_model(config, url, "local-model")
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        config["reliability"] = {"first_token_timeout_seconds": 0.3, "retries_per_model": 1, "backoff_seconds": 0}
        config["tenants"] = {"acme": {"daily_budget_usd": "10"}}
        fake.set_default(Script(fault=Fault.HANG_BEFORE_HEADERS))
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(tenant="acme", model="local-model")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("hello " * 2000), context):
                    pass
            entries = server.router.ledger.entries()
            spent = await server.router.admission.spent("acme")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) == (2 if reached else 0)
        assert [(entry.outcome, entry.estimated) for entry in entries] == [(AttemptOutcome.FAILED, reached)] * 2
        assert all((entry.usage.input_tokens > 2000) is reached for entry in entries)
        assert (spent > 0) is reached
        assert spent == sum(entry.cost_usd for entry in entries)

    async def test_an_attempt_cut_by_the_deadline_before_it_connected_costs_nothing(
        self, unaccepting_port: int
    ) -> None:
        """The caller's deadline passes while the connection is still being made: DEADLINE_EXCEEDED,
        and the attempt is in the ledger at no cost, not estimated (it was charged the prompt's
        input estimate)."""
        config = default_config()
        add_local_model(config, f"http://127.0.0.1:{unaccepting_port}/v1", "local-model")
        config["tenants"] = {"acme": {"daily_budget_usd": "10"}}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            context = pb.RoutingContext(tenant="acme", model="local-model")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("hello " * 2000), context, timeout=1.0):
                    pass
            await until(lambda: len(server.router.ledger.entries()) == 1)
            (entry,) = server.router.ledger.entries()
            spent = await server.router.admission.spent("acme")
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (entry.cost_usd, entry.usage.input_tokens, entry.estimated, spent) == (0, 0, False, 0)


class TestUnreportedUsage:
    """A provider that reports no usage: the adapter's estimate is flagged as one."""

    async def test_the_estimate_is_flagged_in_the_ledger_and_covers_the_tools(self, fake: FakeProvider) -> None:
        """An OpenAI-compatible server without usage: the ledger entry says estimated, and the input
        billed is the router's estimate of the whole request (its 20-field tool included)."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llama", capabilities=["tools"])
        fake.set_default(Script(omit_usage=True))
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
        chat = build_chat(
            [("system", "You are terse."), ("user", "Fill the form")],
            tools=[pb.Tool(name="fill", description="Fill a form", parameters_json=json.dumps(schema))],
        )
        async with Server(settings_from(config, {}), port=0) as server, RouterClient(server.target) as client:
            messages = [m async for m in client.complete(chat, pb.RoutingContext(model="llama"))]
            (entry,) = server.router.ledger.entries(messages[0].decision.decision_id)
        request = ChatRequest(
            messages=(Message(Role.SYSTEM, "You are terse."), Message(Role.USER, "Fill the form")),
            tools=(ToolSpec(name="fill", description="Fill a form", parameters=schema),),
        )
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.COMPLETED, True)
        assert messages[-1].completion.usage.input_tokens == entry.usage.input_tokens == estimate_input_tokens(request)

    async def test_reported_usage_is_not_flagged(self, live_server: Server, live_client: RouterClient) -> None:
        """A provider that reports usage leaves the ledger entry unflagged."""
        messages = [m async for m in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="gpt-4o"))]
        (entry,) = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert entry.estimated is False


class TestImplausibleUsage:
    """A count the call cannot have used (a broken server's) is taken as unreported: estimated,
    flagged and logged, not charged as is (10**19 output tokens overflowed the protobuf's int64
    after the answer was streamed, and charged the tenant's budget $6e12)."""

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_an_output_over_the_max_output_tokens_sent_is_estimated(self, fake: FakeProvider, model: str) -> None:
        """10**19 output tokens for a call that asked for at most 512: the answer completes with
        its output counted from its text, the ledger flags it estimated, the tenant's budget takes
        that cost, a warning names the counts, and the tenant's next call is served."""
        config = default_config()
        config["tenants"] = {"t": {"daily_budget_usd": "100"}}
        fake.enqueue(Script(chunk_count=3, output_tokens=10**19, input_tokens=7))
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(model=model, tenant="t")
            with capture_logs() as logs:
                messages = [m async for m in client.complete(user_chat("Say hello"), context)]
            [entry] = server.router.ledger.entries(messages[0].decision.decision_id)
            spent = await server.router.admission.spent("t")
            fake.enqueue(Script(chunk_count=3))
            again = [m async for m in client.complete(user_chat("Say hello"), context)]
        usage = messages[-1].completion.usage
        assert (usage.input_tokens, usage.output_tokens) == (7, count_text_tokens("chunk-0 chunk-1 chunk-2 "))
        assert (entry.outcome, entry.estimated, entry.usage.output_tokens) == (
            AttemptOutcome.COMPLETED,
            True,
            usage.output_tokens,
        )
        assert spent == entry.cost_usd == Decimal(messages[-1].completion.cost_usd)
        [warning] = [e for e in logs if e["event"] == "provider_usage_implausible"]
        assert (warning["log_level"], warning["implausible"], warning["output_tokens"]) == ("warning", "output", 10**19)
        assert again[-1].WhichOneof("event") == "completion"

    async def test_an_openai_compatible_reasoners_output_past_max_tokens_is_charged_as_reported(
        self, fake: FakeProvider
    ) -> None:
        """DeepSeek's reasoner (or R1, Qwen3, QwQ behind vLLM) on an openai_compatible server:
        ``max_tokens`` bounds the answer, and ``completion_tokens`` counts the reasoning too. 3,050
        output tokens for a call that sent ``max_tokens`` 100 are charged as reported, unflagged
        (they were taken as implausible, estimated from the text seen and logged, at every call);
        a count past twice the model's context window is still estimated."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "deepseek-reasoner")
        fake.enqueue(Script(text="It is 4.", reasoning=("Let me think. ",), input_tokens=12, output_tokens=3050))
        fake.enqueue(Script(text="It is 4.", input_tokens=12, output_tokens=10**19))
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            chat = user_chat("2+2?", max_output_tokens=100)
            context = pb.RoutingContext(model="deepseek-reasoner")
            with capture_logs() as logs:
                reasoned = [m async for m in client.complete(chat, context)]
                broken = [m async for m in client.complete(chat, context)]
            [entry] = server.router.ledger.entries(reasoned[0].decision.decision_id)
        assert fake.requests[0].body["max_tokens"] == 100
        assert (reasoned[-1].completion.usage.output_tokens, entry.estimated) == (3050, False)
        assert broken[-1].completion.usage.output_tokens < 100
        implausible = [e["output_tokens"] for e in logs if e["event"] == "provider_usage_implausible"]
        assert implausible == [10**19]

    async def test_an_input_far_past_the_context_window_is_estimated(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """10**12 input tokens reported for a short prompt on a 128k model: the input billed is
        the router's estimate of the prompt, flagged; the output as reported."""
        fake.enqueue(Script(chunk_count=3, input_tokens=10**12, output_tokens=3))
        context = pb.RoutingContext(model="gpt-4o-mini")
        messages = [m async for m in live_client.complete(user_chat("Say hello"), context)]
        [entry] = live_server.router.ledger.entries(messages[0].decision.decision_id)
        request = ChatRequest(messages=(Message(Role.USER, "Say hello"),))
        usage = messages[-1].completion.usage
        assert (usage.input_tokens, usage.output_tokens) == (estimate_input_tokens(request), 3)
        assert (entry.estimated, entry.usage) == (True, Usage(usage.input_tokens, 3))

    async def test_a_cut_stream_whose_reported_input_is_implausible_estimates_it(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic's message_start reports 10**19 input tokens, and the stream is cut: the
        attempt is charged the prompt's estimate, not that count (it is dropped, as unreported)."""
        fake.enqueue(Script(input_tokens=10**19, chunk_count=10, fault=Fault.CUT, fault_after=3))
        messages: list[pb.CompleteResponse] = []

        async def complete() -> None:
            async for message in live_client.complete(user_chat("Say hello"), pb.RoutingContext(model="claude-sonnet")):
                messages.append(message)

        with pytest.raises(grpc.aio.AioRpcError):
            await complete()
        [entry] = live_server.router.ledger.entries(messages[0].decision.decision_id)
        request = ChatRequest(messages=(Message(Role.USER, "Say hello"),))
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.INTERRUPTED, True)
        assert entry.usage.input_tokens == estimate_input_tokens(request, "anthropic")

    async def test_a_side_calls_implausible_output_is_estimated(self, fake: FakeProvider) -> None:
        """A judge's or classifier's call whose server reports 10**19 output tokens for a call
        that asked for at most 64: charged its text's count, flagged."""
        fake.enqueue(Script(text="0.9", output_tokens=10**19, input_tokens=5))
        provider = AnthropicProvider("anthropic", "sk-test", fake.anthropic_base_url)
        model = settings_from(default_config()).catalog.get("claude-sonnet")
        call = ProviderCall(
            model=model.id,
            provider_model=model.provider_model,
            messages=(Message(Role.USER, "Grade this"),),
            max_output_tokens=64,
        )
        charges: list[UpstreamCall] = []
        try:
            await side_call(provider, model, call, purpose="judge", charge=charges.append)
        finally:
            await provider.aclose()
        [used] = charges
        assert (used.finished, used.estimated, used.usage) == (True, True, Usage(5, count_text_tokens("0.9")))


class TestInputReportedBeforeTheAnswer:
    """Anthropic tells the input it bills (cache reads and writes apart) in ``message_start``: a
    stream cut short after it is charged that input, and only its output is estimated."""

    async def test_a_cut_stream_is_charged_the_input_anthropic_reported(self, fake: FakeProvider) -> None:
        """40,000 input tokens, 39,000 of them read from the cache, cut after 3 chunks: the ledger,
        the completion's attempt and the span charge 1,000 x $3 + 39,000 x $0.30 per 1M and the
        estimated output (the tokenizer's estimate of the prompt was billed, all at the full
        input price: 10x too much for the cache reads)."""
        fake.enqueue(
            Script(input_tokens=40_000, cached_input_tokens=39_000, chunk_count=10, fault=Fault.CUT, fault_after=3),
            model="claude-sonnet-4-6",
        )
        async with observed_server(fake) as observed:
            messages: list[pb.CompleteResponse] = []

            async def complete() -> None:
                context = pb.RoutingContext(model="claude-sonnet")
                async for message in observed.client.complete(user_chat("Summarise the contract"), context):
                    messages.append(message)

            with pytest.raises(grpc.aio.AioRpcError):
                await complete()
            # The attempt's span ends as the handler does, just after the client has the status.
            await until(lambda: len(observed.named("chat claude-sonnet-4-6")) == 1)
            [entry] = observed.server.router.ledger.entries(messages[0].decision.decision_id)
            (span,) = observed.named("chat claude-sonnet-4-6")
        attributes = dict(span.attributes or {})
        expected = (
            1_000 * Decimal(3) + 39_000 * Decimal("0.30") + entry.usage.output_tokens * Decimal(15)
        ) / _PER_TOKEN
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.INTERRUPTED, True)
        assert (entry.usage.input_tokens, entry.usage.cached_input_tokens) == (40_000, 39_000)
        assert entry.usage.output_tokens > 0
        assert entry.cost_usd == expected
        assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.cache_read.input_tokens"]) == (
            40_000,
            39_000,
        )
        assert Decimal(str(attributes["routesvc.cost_usd"])) == expected

    async def test_a_side_call_cut_short_is_charged_the_input_anthropic_reported(self, fake: FakeProvider) -> None:
        """A judge's or classifier's call on Anthropic, cut after 2 chunks: its charge has the
        input message_start reported, cache reads apart."""
        fake.enqueue(
            Script(input_tokens=5_000, cached_input_tokens=4_000, chunk_count=6, fault=Fault.CUT, fault_after=2)
        )
        provider = AnthropicProvider("anthropic", "sk-test", fake.anthropic_base_url)
        model = settings_from(default_config()).catalog.get("claude-sonnet")
        call = ProviderCall(
            model=model.id, provider_model=model.provider_model, messages=(Message(Role.USER, "Grade this"),)
        )
        charges: list[UpstreamCall] = []
        try:
            result = await side_call(provider, model, call, purpose="judge", charge=charges.append)
        finally:
            await provider.aclose()
        [used] = charges
        assert isinstance(result.error, ProviderError)
        assert used.estimated
        assert (used.usage.input_tokens, used.usage.cached_input_tokens) == (5_000, 4_000)


class TestAnthropicBatchRequests:
    """The batch adapter builds its requests as the streaming one does."""

    async def test_temperature_prefill_and_called_tools_are_adapted(self, fake: FakeProvider) -> None:
        """A temperature over 1 is sent as 1, the final assistant prefill right-stripped, and the
        tools a history called declared when the item offers none."""
        messages = (
            Message(Role.USER, "Weather?"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("toolu_1", "get_weather"),)),
            Message(Role.TOOL, "18 C", tool_call_id="toolu_1"),
            Message(Role.ASSISTANT, "It is "),
        )
        api = AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        try:
            await api.submit(
                [BatchItem("job_1", "claude-sonnet", "claude-sonnet-4-6", messages, 64, temperature=1.7)], "tag"
            )
        finally:
            await api.aclose()
        params = fake.batches[0].requests[0]["params"]
        assert (params["temperature"], params["messages"][-1]) == (1.0, {"role": "assistant", "content": "It is"})
        assert (params["tools"], params["tool_choice"]) == (
            [{"name": "get_weather", "input_schema": {"type": "object"}}],
            {"type": "none"},
        )


def local_judge_config(fake: FakeProvider) -> dict[str, object]:
    """The default config with the cascade's judge on "llama", an OpenAI-compatible model of ``fake``."""
    config = default_config()
    add_local_model(config, fake.openai_base_url, "llama")
    config["cascade"]["judge"] = {"model": "llama", "timeout_seconds": 5, "on_failure": "release"}  # type: ignore[index]
    return config


async def test_a_judge_whose_usage_was_not_reported_is_flagged_estimated(fake: FakeProvider) -> None:
    """A cascade judge on an OpenAI-compatible model that reports no usage: its ledger entry is
    flagged estimated, as an answer's is (the span said so, the ledger did not)."""
    config = local_judge_config(fake)
    fake.enqueue(Script(text="Paris is the capital of France."), model="gpt-4o-mini")
    fake.set_default(Script(text='{"score": 0.9}', omit_usage=True), model="llama")
    async with (
        Server(settings_from(config, live_environ(fake)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        chat = user_chat("What is the capital of France?")
        messages = [m async for m in client.complete(chat, pb.RoutingContext(cascade=True))]
        entries = server.router.ledger.entries(messages[0].decision.decision_id)
    assert [(e.model, e.estimated) for e in entries] == [("gpt-4o-mini", False), ("llama", True)]


async def test_a_judge_cut_while_reasoning_is_charged_for_what_it_produced(fake: FakeProvider) -> None:
    """The judge streams reasoning and is cut before any text: the provider billed that output, so
    its attempt is charged an estimate, flagged (it was taken for a refusal and charged nothing)."""
    config = local_judge_config(fake)
    fake.enqueue(Script(text="Paris is the capital of France."), model="gpt-4o-mini")
    reasoning = tuple(f"step {n} of a long thought " for n in range(6))
    fake.enqueue(Script(reasoning=reasoning, text='{"score": 1}', fault=Fault.CUT, fault_after=4), model="llama")
    async with (
        Server(settings_from(config, live_environ(fake)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        chat = user_chat("What is the capital of France?")
        messages = [m async for m in client.complete(chat, pb.RoutingContext(cascade=True))]
        entries = server.router.ledger.entries(messages[0].decision.decision_id)
    [judge] = [e for e in entries if e.model == "llama"]
    assert judge.estimated is True
    assert judge.usage.output_tokens > 0


class _EndsWith:
    """A provider whose every stream fails at once with ``error`` (what an adapter raises when its
    own deadline passes, or when the provider refuses the call)."""

    name = "openai"

    def __init__(self, error: ProviderError, *, sent: bool = True) -> None:
        self._error = error
        self._sent = sent

    async def stream(self, call: ProviderCall) -> AsyncIterator[ProviderEvent]:
        if self._sent:
            call.sent.set()  # as the adapters' transports do once the request went out
        raise self._error
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        pass


class TestSideCallCharges:
    @pytest.mark.parametrize(
        ("error", "sent", "charged"),
        [
            (ProviderTimedOut("deadline", provider="openai", model="cheap"), True, True),
            (ProviderStalled("silent", provider="openai", model="cheap"), True, True),
            (ProviderUnavailable("HTTP 503", provider="openai", model="cheap", status=503), True, False),
            (ProviderTimedOut("deadline", provider="openai", model="cheap"), False, False),
        ],
        ids=["its_deadline", "stalled", "refused", "its_deadline_before_it_was_sent"],
    )
    async def test_a_side_call_ended_from_our_side_is_charged_its_prompt(
        self, error: ProviderError, sent: bool, charged: bool
    ) -> None:
        """A judge's or classifier's call whose own deadline passes in the adapter (the race with
        its asyncio timeout goes either way) is charged its prompt's estimate, flagged, as the
        timeout is and as its span says (it was charged nothing); a refusal costs nothing, and so
        does a call cut before its request went out."""
        call = ProviderCall(model="cheap", provider_model="cheap", messages=(Message(Role.USER, "Grade this"),))
        charges: list[UpstreamCall] = []
        provider = _EndsWith(error, sent=sent)
        result = await side_call(provider, CHEAP, call, purpose="judge", charge=charges.append)
        (used,) = charges
        assert (result.error is error, used.estimated, used.usage.input_tokens > 0) == (True, charged, charged)


@pytest.mark.parametrize(
    ("script", "label"),
    [
        (Script(reasoning=tuple(f"step {n} of a long thought " for n in range(6)), text='{"score": 1}',
                fault=Fault.CUT, fault_after=4), "cut while reasoning"),
        (Script(chunks=('{"sc', 'ore', '": 0', ".9}"), fault=Fault.CUT, fault_after=3), "cut in its answer"),
    ],
    ids=["reasoning", "answer"],
)  # fmt: skip
async def test_a_judge_cut_short_is_charged_as_its_span_counts_it(
    fake: FakeProvider, script: Script, label: str
) -> None:
    """A cascade judge cut short after output: its ledger entry has the usage its span reports
    (the ledger counted only the messages' text, without the prompt's framing, and joined the
    answer before the reasoning, so the two disagreed)."""
    config = local_judge_config(fake)
    fake.enqueue(Script(text="Paris is the capital of France."), model="gpt-4o-mini")
    fake.enqueue(script, model="llama")
    async with observed_server(fake, config=config) as observed:
        chat = user_chat("What is the capital of France?")
        messages = [m async for m in observed.client.complete(chat, pb.RoutingContext(cascade=True))]
        entries = observed.server.router.ledger.entries(messages[0].decision.decision_id)
    [judge] = [e for e in entries if e.model == "llama"]
    (span,) = observed.named("chat llama")
    attributes = dict(span.attributes or {})
    assert judge.estimated, label
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        judge.usage.input_tokens,
        judge.usage.output_tokens,
    )
