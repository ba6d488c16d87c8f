"""Reliability: retries and fallbacks before commit, breakers, stream timers, the cost ledger.

Each test names the item of ../shared/RELIABILITY.md it covers.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import grpc
import pytest
from structlog.testing import capture_logs

from routesvc.breaker import Breakers, BreakerState
from routesvc.client import RouterClient
from routesvc.config import BreakerConfig
from routesvc.errors import ConfigError, DeadlineExceeded
from routesvc.ledger import AttemptOutcome, Ledger, LedgerEntry
from routesvc.models import ChatRequest, Message, Role, RoutingRequest, Usage
from routesvc.providers._http import TokensAsked, parse_retry_after, rate_limit_reset
from routesvc.server import Server
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import default_config, live_environ, loopback_channel, settings_from, until, user_chat
from tests.observability import Observed, observed_server
from tests.test_limits import retry_delay
from tests.test_validation import error_info


def reliable_config(**reliability: object) -> dict[str, object]:
    """The default policy with fast timers and gpt-4o -> claude-sonnet fallbacks."""
    config = default_config()
    config["reliability"] = {
        "backoff_seconds": 0.01,
        "max_backoff_seconds": 0.05,
        "first_token_timeout_seconds": 5,
        "stream_idle_timeout_seconds": 5,
        "breaker": {"failure_threshold": 3, "open_seconds": 0.5},
        **reliability,
    }
    config["routing"]["fallbacks"] = {"gpt-4o": ["claude-sonnet"], "gpt-4o-mini": ["claude-sonnet"]}  # type: ignore[index]
    return config


@pytest.fixture
async def reliable(fake: FakeProvider, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Server, RouterClient]]:
    """A server with ``reliable_config`` (overridable by indirect parametrization) over the fake."""
    overrides = getattr(request, "param", {})
    settings = settings_from(reliable_config(**overrides), live_environ(fake))
    async with Server(settings, port=0) as server, RouterClient(server.target) as client:
        yield server, client


async def collect(client: RouterClient, prompt: str = "hello", **context: object) -> list[pb.CompleteResponse]:
    """Read a whole Complete stream."""
    return [m async for m in client.complete(user_chat(prompt), pb.RoutingContext(**context))]  # type: ignore[arg-type]


async def failure(
    client: RouterClient, prompt: str = "hello", **context: object
) -> tuple[grpc.aio.AioRpcError, list[pb.CompleteResponse]]:
    """Read a Complete stream that must fail; the error and what arrived before it."""
    received: list[pb.CompleteResponse] = []

    async def read() -> None:
        async for message in client.complete(user_chat(prompt), pb.RoutingContext(**context)):  # type: ignore[arg-type]
            received.append(message)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read()
    return caught.value, received


def kinds(messages: list[pb.CompleteResponse]) -> list[str]:
    """The oneof kinds of a stream, with runs of deltas folded to one."""
    folded: list[str] = []
    for message in messages:
        kind = str(message.WhichOneof("event"))
        if not folded or folded[-1] != kind or kind != "delta":
            folded.append(kind)
    return folded


class TestRetriesBeforeCommit:
    """RELIABILITY 6: 503, in-band error before content, 429 with Retry-After are retried or fall back."""

    async def test_a_503_is_retried_and_the_client_sees_one_clean_answer(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """503 then success on the same model: one answer, two upstream calls, both in the ledger."""
        server, client = reliable
        fake.enqueue(Script(status=503), Script(chunks=("one ", "answer")))
        messages = await collect(client)
        assert kinds(messages) == ["decision", "delta", "completion"]
        assert "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta") == "one answer"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
        outcomes = [e.outcome for e in server.router.ledger.entries(messages[0].decision.decision_id)]
        assert outcomes == [AttemptOutcome.FAILED, AttemptOutcome.COMPLETED]

    async def test_a_429_waits_for_retry_after(self, reliable: tuple[Server, RouterClient], fake: FakeProvider) -> None:
        """429 with Retry-After: 0.3 s: the retry starts no sooner than the provider asked."""
        _, client = reliable
        fake.enqueue(Script(status=429, retry_after_ms="300"), Script())
        messages = await collect(client)
        assert kinds(messages)[-1] == "completion"
        first, second = fake.requests
        assert second.received_at - first.received_at >= 0.3

    async def test_an_in_band_error_before_content_falls_back(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """An Anthropic error event before any text is retried; the answer is clean."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0, error_type="overloaded_error"), Script())
        messages = await collect(client, task_hint="creative_writing")
        assert kinds(messages) == ["decision", "delta", "completion"]
        assert len(fake.requests) == 2

    async def test_repeated_failures_fall_back_to_the_next_model(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """gpt-4o fails twice (its retry spent): claude-sonnet answers, the completion says so."""
        _, client = reliable
        fake.enqueue(Script(status=502), Script(status=503), model="gpt-4o")
        messages = await collect(client, user_tier="premium")
        assert messages[0].decision.model == "gpt-4o"
        assert messages[-1].completion.model == "claude-sonnet"
        assert [r.model for r in fake.requests] == ["gpt-4o", "gpt-4o", "claude-sonnet-4-6"]

    async def test_a_fallback_over_the_requests_max_cost_is_not_tried(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """gpt-4o-mini fails twice (its retry spent) on a request capped at 0.001 USD: its fallback
        claude-sonnet, estimated over the cap, is not called; the caller gets UNAVAILABLE."""
        _, client = reliable
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        error, received = await failure(client, max_cost_usd="0.001")
        assert Decimal(received[0].decision.estimated_cost_usd) <= Decimal("0.001")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    async def test_client_errors_are_not_retried(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A 400 is final: one upstream call, FAILED_PRECONDITION."""
        _, client = reliable
        fake.enqueue(Script(status=400))
        error, _ = await failure(client)
        assert (error.code(), len(fake.requests)) == (grpc.StatusCode.FAILED_PRECONDITION, 1)

    async def test_an_in_band_error_whose_code_is_a_client_error_is_not_retried(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """vLLM's in-band error ``{"type": "BadRequestError", "code": 400}`` is final like a 400:
        one upstream call, FAILED_PRECONDITION (it was read as an outage: retried, UNAVAILABLE)."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, error_type="BadRequestError", error_code=400))
        error, _ = await failure(client)
        assert (error.code(), len(fake.requests)) == (grpc.StatusCode.FAILED_PRECONDITION, 1)

    @pytest.mark.parametrize("prompt", ["hello", "Why do I get invalid_request_error from OpenAI?"])
    async def test_an_in_band_rejection_is_final_whatever_the_prompt_says_of_its_type(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, prompt: str
    ) -> None:
        """An in-band ``invalid_request_error`` is final, one upstream call, FAILED_PRECONDITION,
        under a prompt that mentions the type as under one that does not (the type was dropped as
        an echo of the prompt: an outage, retried, UNAVAILABLE)."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0, error_type="invalid_request_error"))
        error, _ = await failure(client, prompt)
        assert (error.code(), len(fake.requests)) == (grpc.StatusCode.FAILED_PRECONDITION, 1)

    @pytest.mark.parametrize("prompt", ["hello", "Why do I get insufficient_quota from OpenAI?"])
    async def test_an_in_band_spent_quota_falls_back_at_once_whatever_the_prompt_says_of_its_type(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, prompt: str
    ) -> None:
        """An in-band ``insufficient_quota`` is a spent quota, not retried on the model: the
        fallback answers next, under a prompt that mentions the type as under one that does not
        (the type was dropped as an echo: an outage, retried on the spent model first)."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_after=0, error_type="insufficient_quota"))
        messages = await collect(client, prompt)
        assert kinds(messages)[-1] == "completion"
        assert messages[0].decision.model in {"gpt-4o", "gpt-4o-mini"}  # both fall back to claude-sonnet
        assert [r.model for r in fake.requests][1:] == ["claude-sonnet-4-6"]

    @pytest.mark.parametrize("reliable", [{"max_attempts": 2}], indirect=True)
    async def test_a_call_the_providers_failed_is_logged_at_warning(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """The one rpc_finished line of a call that ended UNAVAILABLE is a warning (something to
        alert on); a call the caller got wrong (a 400 from the provider) stays at info."""
        _, client = reliable
        fake.enqueue(Script(status=503), Script(status=503), Script(status=400))
        with capture_logs() as logs:
            await failure(client)
            await failure(client)
        finished = [(entry["code"], entry["log_level"]) for entry in logs if entry["event"] == "rpc_finished"]
        assert finished == [("UNAVAILABLE", "warning"), ("FAILED_PRECONDITION", "info")]

    @pytest.mark.parametrize("reliable", [{"max_attempts": 2}], indirect=True)
    async def test_attempts_are_capped(self, reliable: tuple[Server, RouterClient], fake: FakeProvider) -> None:
        """With max_attempts 2, a provider that keeps failing is called twice, then UNAVAILABLE."""
        _, client = reliable
        fake.set_default(Script(status=503))
        error, _ = await failure(client)
        assert (error.code(), len(fake.requests)) == (grpc.StatusCode.UNAVAILABLE, 2)


def _rfc3339(seconds_from_now: float) -> str:
    """A moment ``seconds_from_now`` in RFC 3339, as Anthropic's rate-limit headers give it."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return moment.isoformat().replace("+00:00", "Z")


def retry_delays(observed: Observed) -> list[float]:
    """The waits before each retry on a model, from the ``routesvc.retry`` events of every request."""
    return [
        float(event.attributes["routesvc.retry_delay_seconds"])  # type: ignore[arg-type, index]
        for span in observed.named("route")
        for event in span.events
        if event.name == "routesvc.retry"
    ]


class TestProviderRetryDelays:
    """RELIABILITY 6: the wait a provider asks for, however it says it, is waited before a retry on
    its model and told to the caller (RetryInfo) when the error reaches it."""

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    @pytest.mark.parametrize(
        ("headers", "seconds"),
        [
            # The limit at 0 remaining says when a request may go again (not the larger reset).
            (
                {
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "30s",
                    "x-ratelimit-remaining-tokens": "9000",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                30.0,
            ),
            # Nothing says which refused: the later, the one guess never too soon (the sooner,
            # when the tokens refused, sends the retry and the caller into a certain second 429).
            ({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
            # 499 requests left: the requests limit had room for this one, so the tokens refused
            # (1200 of 30000 left); their reset, not the requests' 120 ms (a retry then is refused
            # again), with or without the limits' sizes.
            (
                {
                    "x-ratelimit-limit-requests": "500",
                    "x-ratelimit-remaining-requests": "499",
                    "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-limit-tokens": "30000",
                    "x-ratelimit-remaining-tokens": "1200",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                360.0,
            ),
            (
                {
                    "x-ratelimit-remaining-requests": "499",
                    "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-remaining-tokens": "1200",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                360.0,
            ),
            # Both spent: the later (a request passes only once both have reset).
            (
                {
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "30s",
                    "x-ratelimit-remaining-tokens": "0",
                    "x-ratelimit-reset-tokens": "45s",
                },
                45.0,
            ),
            # The provider's own Retry-After says it, whatever the limits' resets.
            (
                {
                    "retry-after": "3",
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "30s",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                3.0,
            ),
            # The spent limit resets in microseconds (a Go duration in µs): that, not the other's 6 minutes.
            (
                {
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "850us",
                    "x-ratelimit-remaining-tokens": "9000",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                0.00085,
            ),
        ],
    )
    async def test_an_openai_429_without_retry_after_carries_its_limits_reset(
        self,
        reliable: tuple[Server, RouterClient],
        fake: FakeProvider,
        headers: dict[str, str],
        seconds: float,
    ) -> None:
        """A 429 with no Retry-After but OpenAI's ``x-ratelimit-reset-*`` headers: RATE_LIMITED
        with RetryInfo of the reset (it had none): the spent limit's, the later if both are spent;
        if none is, not the requests' while one is left, else the later; a Retry-After wins."""
        _, client = reliable
        fake.enqueue(Script(status=429, headers=headers))
        error, _ = await failure(client, model="gpt-4o-mini")
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
        assert retry_delay(error) == pytest.approx(seconds)

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    async def test_an_anthropic_429_without_retry_after_carries_its_limits_reset(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A 429 with no Retry-After but Anthropic's ``anthropic-ratelimit-*-reset`` moments: the
        RetryInfo is the time until the reset of the limit at 0 remaining."""
        _, client = reliable
        headers = {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": _rfc3339(40),
            "anthropic-ratelimit-tokens-remaining": "5000",
            "anthropic-ratelimit-tokens-reset": _rfc3339(600),
        }
        fake.enqueue(Script(status=429, headers=headers))
        error, _ = await failure(client, model="claude-sonnet")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 30 < retry_delay(error) <= 40

    async def test_a_429_without_retry_after_waits_for_its_limits_reset(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """The retry on the model starts no sooner than ``x-ratelimit-reset-requests`` says (it
        came after the backoff's few milliseconds)."""
        _, client = reliable
        headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"}
        fake.enqueue(Script(status=429, headers=headers), Script())
        messages = await collect(client)
        assert kinds(messages)[-1] == "completion"
        first, second = fake.requests
        assert second.received_at - first.received_at >= 0.3

    @pytest.mark.parametrize("status", [503, 529])
    async def test_an_unavailable_answer_waits_for_its_retry_after(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, status: int
    ) -> None:
        """A 503 (or Anthropic's 529 overloaded) with Retry-After: 0.3 s: the retry starts no
        sooner (it came after the backoff's few milliseconds)."""
        _, client = reliable
        fake.enqueue(Script(status=status, retry_after_ms="300"), Script())
        messages = await collect(client)
        assert kinds(messages)[-1] == "completion"
        first, second = fake.requests
        assert second.received_at - first.received_at >= 0.3

    @pytest.mark.parametrize(("model", "status"), [("gpt-4o-mini", 503), ("claude-sonnet", 529)])
    async def test_a_zero_retry_after_still_waits_a_jittered_backoff(
        self, fake: FakeProvider, model: str, status: int
    ) -> None:
        """Five calls each answered 503 (Anthropic: 529 overloaded) with ``Retry-After: 0``, then
        served: each retry waits a backoff drawn as when no wait is given (in (0, backoff_seconds]
        for a first retry), each its own, not 0 (all the calls an overloaded provider refused at
        once would come back at once). The wait is read from the ``routesvc.retry`` span event."""
        fake.enqueue(*[Script(status=status, retry_after="0"), Script()] * 5)
        async with observed_server(fake, config=reliable_config()) as observed:
            for _ in range(5):
                messages = await collect(observed.client, model=model)
                assert messages[-1].completion.model == model
        delays = retry_delays(observed)
        assert len(delays) == len(set(delays)) == 5
        assert all(0 < delay <= 0.01 for delay in delays)

    async def test_a_longer_retry_after_than_the_backoff_is_waited_as_given(self, fake: FakeProvider) -> None:
        """A 503 with ``retry-after-ms: 300`` (longer than any first backoff here): the retry waits
        exactly the provider's 0.3 s."""
        fake.enqueue(Script(status=503, retry_after_ms="300"), Script())
        async with observed_server(fake, config=reliable_config()) as observed:
            await collect(observed.client, model="gpt-4o-mini")
        assert retry_delays(observed) == [0.3]

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    async def test_a_token_limit_the_prompt_is_over_is_the_one_waited_for(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """An Anthropic 429 none of whose limits is at 0: 2 input tokens left (0.2% of the limit,
        fewer than the prompt's), its reset in 30 s; output tokens closer to spent (0.01%) but with
        room for the request's ``max_tokens``, reset in 10 s. The input tokens refused it: RetryInfo
        of their 30 s (it was the sooner reset's 10 s, into a certain second 429)."""
        _, client = reliable
        headers = {
            "anthropic-ratelimit-input-tokens-limit": "1000",
            "anthropic-ratelimit-input-tokens-remaining": "2",
            "anthropic-ratelimit-input-tokens-reset": _rfc3339(30),
            "anthropic-ratelimit-output-tokens-limit": "1000000000",
            "anthropic-ratelimit-output-tokens-remaining": "100000",
            "anthropic-ratelimit-output-tokens-reset": _rfc3339(10),
        }
        fake.enqueue(Script(status=429, headers=headers))
        error, _ = await failure(client, model="claude-sonnet")
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
        assert 20 < retry_delay(error) <= 30

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    async def test_an_anthropic_limit_at_0_wins_over_its_tokens_headers(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """An Anthropic 429 whose requests are at 0 (reset in 5 s), its output tokens 600 left
        (reset in 40 s), room for the request's ``max_tokens`` of 512, and its tokens headers
        repeating the output tokens' (the most restrictive of its token limits, not their sum):
        the requests refused it, RetryInfo of their 5 s. (Read as input plus output, the ~300
        input tokens and 512 output were over the tokens' 600: their 40 s.)"""
        _, client = reliable
        headers = {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": _rfc3339(5),
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "30000",
            "anthropic-ratelimit-input-tokens-reset": _rfc3339(20),
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "600",
            "anthropic-ratelimit-output-tokens-reset": _rfc3339(40),
            "anthropic-ratelimit-tokens-limit": "8000",
            "anthropic-ratelimit-tokens-remaining": "600",
            "anthropic-ratelimit-tokens-reset": _rfc3339(40),
        }
        fake.enqueue(Script(status=429, headers=headers))
        chat = user_chat("word " * 300, max_output_tokens=512)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.complete(chat, pb.RoutingContext(model="claude-sonnet")):
                pass
        error = caught.value
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
        assert 0 < retry_delay(error) <= 5

    async def test_a_zero_retry_after_is_retried_whatever_max_retry_after_seconds(self, fake: FakeProvider) -> None:
        """``max_retry_after_seconds`` bounds the provider's wait, not the backoff (bounded by
        ``max_backoff_seconds``): with it at 1 ms, below the backoff's draw, a 503 saying
        ``Retry-After: 0`` is still retried on its model after that backoff (it went to the
        fallback)."""
        config = reliable_config(backoff_seconds=0.05, max_backoff_seconds=0.05, max_retry_after_seconds=0.001)
        fake.enqueue(Script(status=503, retry_after="0"), Script(), model="gpt-4o-mini")
        async with observed_server(fake, config=config) as observed:
            messages = await collect(observed.client, model="gpt-4o-mini")
        assert messages[-1].completion.model == "gpt-4o-mini"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
        (delay,) = retry_delays(observed)
        assert 0 < delay <= 0.05

    async def test_a_failure_that_opens_its_models_breaker_falls_back_without_waiting(self, fake: FakeProvider) -> None:
        """gpt-4o-mini's 503 asks for 5 s and opens its breaker (threshold 1) for 30 s: the retry
        would find it open when the 5 s are up, so it is not waited for: the fallback answers
        before them (it was called after them), and no ``routesvc.retry`` event tells of a
        retry never made."""
        config = reliable_config(breaker={"failure_threshold": 1, "open_seconds": 30})
        fake.enqueue(Script(status=503, retry_after="5"), model="gpt-4o-mini")
        async with observed_server(fake, config=config) as observed:
            messages = await collect(observed.client, model="gpt-4o-mini")
        assert messages[-1].completion.model == "claude-sonnet"
        first, fallback = fake.requests
        assert fallback.received_at - first.received_at < 5
        assert retry_delays(observed) == []

    @pytest.mark.parametrize(
        "reliability", [{"retry_budget_tokens": 1}, {"max_attempts": 1}], ids=["retry_budget", "max_attempts"]
    )
    async def test_a_retry_nothing_is_left_for_is_not_waited_for(
        self, fake: FakeProvider, reliability: dict[str, object]
    ) -> None:
        """gpt-4o-mini's 503 asks for 5 s, and the failure spends the retry budget (of 1 token:
        retries go only above half of it) or the request's one attempt: no retry or fallback can
        follow, so the request fails at once (it slept the 5 s first) with the provider's wait in
        RetryInfo, and no ``routesvc.retry`` event."""
        fake.enqueue(Script(status=503, retry_after="5"), model="gpt-4o-mini")
        async with observed_server(fake, config=reliable_config(**reliability)) as observed:
            started = time.monotonic()
            error, _ = await failure(observed.client, model="gpt-4o-mini")
            elapsed = time.monotonic() - started
        assert (error.code(), retry_delay(error), len(fake.requests)) == (grpc.StatusCode.UNAVAILABLE, 5.0, 1)
        assert elapsed < 5
        assert retry_delays(observed) == []

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    @pytest.mark.parametrize(("model", "status"), [("gpt-4o-mini", 503), ("claude-sonnet", 529)])
    async def test_an_unavailable_answers_retry_after_reaches_the_caller(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, model: str, status: int
    ) -> None:
        """A 503 (529 overloaded) with Retry-After: 30 that reaches the caller: UNAVAILABLE with
        RetryInfo of 30 s (it had none)."""
        _, client = reliable
        fake.enqueue(Script(status=status, retry_after="30"))
        error, _ = await failure(client, model=model)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert retry_delay(error) == 30.0


class TestCommitRule:
    """RELIABILITY 7: after the first chunk nothing is retried or appended."""

    async def test_a_cut_after_content_is_not_retried(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """Cut after 40 of 60 chunks: 40 deltas, UNAVAILABLE committed, one upstream call, usage estimated."""
        server, client = reliable
        fake.enqueue(Script(chunk_count=60, fault=Fault.CUT, fault_after=40))
        error, received = await failure(client)
        assert sum(1 for m in received if m.WhichOneof("event") == "delta") == 40
        assert error_info(error).reason == "STREAM_INTERRUPTED"
        assert len(fake.requests) == 1
        (entry,) = server.router.ledger.entries(received[0].decision.decision_id)
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.INTERRUPTED, True)
        assert entry.usage.output_tokens > 0


class TestOversizedEvents:
    """RELIABILITY 9: one provider event over ``reliability.max_event_bytes`` fails the attempt
    (it was read whole, whatever its size: a 200 MB event cost the process about 800 MB)."""

    @pytest.mark.parametrize("reliable", [{"max_event_bytes": 8192}], indirect=True)
    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_an_event_just_over_the_limit_after_text_ends_the_call_unavailable(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, model: str
    ) -> None:
        """An event just over the limit after two chunks: the two deltas, then UNAVAILABLE
        STREAM_INTERRUPTED naming the limit, one upstream call."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.OVERSIZED_LINE, fault_after=2, oversized_bytes=8192))
        error, received = await failure(client, model=model)
        assert sum(1 for m in received if m.WhichOneof("event") == "delta") == 2
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
        assert "stream event over 8192 bytes (reliability.max_event_bytes)" in str(error.details())
        assert len(fake.requests) == 1

    @pytest.mark.parametrize("reliable", [{"max_event_bytes": 8192}], indirect=True)
    async def test_an_event_just_over_the_limit_before_text_is_retried(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """Before the first chunk the attempt fails as a broken stream and is retried; an event
        under the limit passes."""
        _, client = reliable
        fake.enqueue(
            Script(fault=Fault.OVERSIZED_LINE, fault_after=0, oversized_bytes=8192),
            Script(fault=Fault.OVERSIZED_LINE, fault_after=0, oversized_bytes=7000),
        )
        messages = await collect(client, model="gpt-4o-mini")
        assert messages[-1].WhichOneof("event") == "completion"
        assert len(fake.requests) == 2


class TestStreamTimers:
    """RELIABILITY 8: a stream that stalls with the socket open is ended and closed upstream."""

    @pytest.mark.parametrize("reliable", [{"stream_idle_timeout_seconds": 0.3}], indirect=True)
    async def test_an_idle_stream_is_ended(self, reliable: tuple[Server, RouterClient], fake: FakeProvider) -> None:
        """Three chunks then silence: after the idle timeout the client gets UNAVAILABLE, upstream closed."""
        _, client = reliable
        fake.enqueue(Script(chunk_count=10, fault=Fault.HANG, fault_after=3))
        started = time.monotonic()
        error, received = await failure(client)
        assert time.monotonic() - started < 3
        assert (error.code(), sum(1 for m in received if m.WhichOneof("event") == "delta")) == (
            grpc.StatusCode.UNAVAILABLE,
            3,
        )
        await fake.requests[0].wait_ended(timeout=5.0)
        assert fake.requests[0].aborted

    @pytest.mark.parametrize(
        # 1 s, not less: the fake must have received the request before the timer gives up on it
        # (a CI run on a loaded machine once took longer than 0.3 s to get it there).
        "reliable",
        [{"first_token_timeout_seconds": 1.0, "retries_per_model": 0, "max_attempts": 1}],
        indirect=True,
    )
    async def test_no_first_token_in_time_is_unavailable(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A provider that never answers is given up after first_token_timeout_seconds."""
        _, client = reliable
        # A whole answer first opens the connection, so that the hanging request reaches the fake
        # well within the timer even when the machine is loaded (a cold connect can take most of it).
        fake.enqueue(Script(chunk_count=1))
        await collect(client)
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS))
        error, _ = await failure(client)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) == 2
        await fake.requests[1].wait_ended(timeout=5.0)
        assert fake.requests[1].aborted

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_finished_answer_whose_body_is_held_open_ends_with_its_usage(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, model: str
    ) -> None:
        """An answer whose finish reason and usage came, but whose server (a proxy) then holds the
        body open without ``[DONE]`` (Anthropic: after ``message_stop``), ends at once: OK, with
        the usage reported, not after ``stream_idle_timeout_seconds`` (5 s here) as UNAVAILABLE
        with an estimate; the upstream request is closed."""
        _, client = reliable
        fake.enqueue(Script(fault=Fault.HANG_AT_END, input_tokens=10, output_tokens=5))
        started = time.monotonic()
        messages = await collect(client, model=model)
        elapsed = time.monotonic() - started
        completion = messages[-1].completion
        text = "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta")
        assert (text, completion.usage.input_tokens, completion.usage.output_tokens) == (
            "Hello from the fake provider.",
            10,
            5,
        )
        assert elapsed < 2.5
        await fake.requests[0].wait_ended(timeout=5.0)
        assert fake.requests[0].aborted


class TestDeadlines:
    """RELIABILITY 5: no fallback starts after the deadline."""

    async def test_no_attempt_starts_after_the_deadline(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A first attempt that eats the deadline is not followed by a retry or fallback."""
        _, client = reliable
        # A whole answer first opens the connection: the timed request must reach the fake before
        # the deadline (cold, on a loaded machine, getting there can take a good part of a second).
        fake.enqueue(Script(chunk_count=1))
        await collect(client)
        fake.enqueue(Script(first_chunk_delay=5.0))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.complete(user_chat("hello"), timeout=1.0):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The deadline ends the call, not the 5 s first chunk; the slack over the deadline is for
        # a loaded machine (0.2 s of it was once not enough).
        assert time.monotonic() - started < 1.0 + 1.5
        # The attempt the deadline cut ends (closed upstream, or at the latest its 5 s answer); a
        # retry or fallback would follow it.
        await fake.requests[1].wait_ended(timeout=10.0)
        await asyncio.sleep(0.3)
        assert len(fake.requests) == 2

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0}], indirect=True)
    async def test_the_callers_deadline_is_not_the_models_failure(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """Streams cut by their caller's deadline (here the router's own, with no RPC timer to race
        the provider call's) end in DeadlineExceeded, recorded in the ledger, and however many
        there are, the healthy model's breaker stays closed and the retry budget untouched."""
        server, _ = reliable
        request = RoutingRequest(ChatRequest((Message(Role.USER, "hello"),)))
        # A first, whole answer opens the connection: cold, on a loaded CI machine, it once took
        # longer than the deadline to bring a first chunk, and an attempt cut before any chunk is
        # recorded FAILED, not INTERRUPTED.
        fake.enqueue(Script(chunk_count=1))
        async for _ in server.router.complete(request, timeout=5.0):
            pass
        fake.set_default(Script(chunk_count=400, chunk_delay=0.005))
        for _ in range(4):  # failure_threshold is 3
            events = server.router.complete(request, timeout=0.5)
            with pytest.raises(DeadlineExceeded):
                async for _ in events:
                    pass
        assert server.router.breakers.state("gpt-4o-mini") is BreakerState.CLOSED
        assert server.router.retry_budget.tokens == server.router.settings.config.reliability.retry_budget_tokens
        outcomes = [entry.outcome for entry in server.router.ledger.entries()]
        assert outcomes == [AttemptOutcome.COMPLETED] + [AttemptOutcome.INTERRUPTED] * 4

    async def test_a_short_deadline_does_not_take_a_half_open_breakers_probe(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A call whose deadline is too short to start an attempt reaches a half-open breaker
        first: it fails DEADLINE_EXCEEDED without claiming the probe, and the next call probes,
        succeeds and closes the breaker."""
        server, client = reliable
        breakers = server.router.breakers
        for _ in range(3):
            breakers.record_failure("gpt-4o-mini")
        await asyncio.sleep(0.6)  # open_seconds 0.5
        assert breakers.state("gpt-4o-mini") is BreakerState.HALF_OPEN
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.complete(user_chat("hello"), pb.RoutingContext(model="gpt-4o-mini"), timeout=0.05):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        messages = await collect(client, model="gpt-4o-mini")
        assert messages[-1].completion.model == "gpt-4o-mini"
        assert breakers.state("gpt-4o-mini") is BreakerState.CLOSED


class TestBreakers:
    """RELIABILITY 10 and 11: breakers open on failures, reject fast, half-open and recover."""

    def test_opening_and_closing_are_logged_once_each(self) -> None:
        """An operator sees a breaker open (model, failures, for how long) and close again, one
        line each, not one per failure while it is open."""
        now = [0.0]
        breakers = Breakers(BreakerConfig(failure_threshold=2, open_seconds=10), clock=lambda: now[0])
        with capture_logs() as logs:
            for _ in range(4):
                breakers.record_failure("m")
            now[0] = 10.0
            assert breakers.allow("m")
            breakers.record_success("m")
            breakers.record_success("m")
        assert [(entry["event"], entry["log_level"]) for entry in logs] == [
            ("breaker_opened", "warning"),
            ("breaker_closed", "info"),
        ]
        assert (logs[0]["model"], logs[0]["failures"], logs[0]["open_seconds"]) == ("m", 2, 10)

    def test_a_probe_that_never_reports_holds_the_slot_at_most_open_seconds(self) -> None:
        """One probe at a time while half-open; a probe lost without a verdict (a bug) lets the
        next one through after open_seconds instead of keeping the model out for good."""
        now = [0.0]
        breakers = Breakers(BreakerConfig(failure_threshold=1, open_seconds=10), clock=lambda: now[0])
        breakers.record_failure("m")
        now[0] = 10.0
        assert (bool(breakers.allow("m")), breakers.allow("m")) == (True, None)
        now[0] = 19.9
        assert not breakers.allow("m")
        now[0] = 20.0
        assert breakers.allow("m")

    def test_only_the_probe_gives_the_half_open_turn_back(self) -> None:
        """A call started while the breaker was closed (a long stream) that ends without a verdict
        (cancelled, its deadline, a refused request) while a half-open probe runs frees nothing:
        no second probe starts beside the first. The probe's own end gives the turn back, once;
        a lost probe's late release does not free its successor's turn."""
        now = [0.0]
        breakers = Breakers(BreakerConfig(failure_threshold=1, open_seconds=30), clock=lambda: now[0])
        stream = breakers.allow("m")
        assert stream is not None
        assert not stream.probe
        breakers.record_failure("m")  # another call fails: the breaker opens
        now[0] = 31.0
        probe = breakers.allow("m")
        assert probe is not None
        assert probe.probe
        breakers.release_probe(stream)
        assert breakers.allow("m") is None
        breakers.release_probe(probe)
        second = breakers.allow("m")
        assert second is not None
        assert second.probe
        breakers.release_probe(probe)  # the first probe's end reported twice
        assert breakers.allow("m") is None
        now[0] = 61.0  # the second probe never reported: a third may go, and the second's
        third = breakers.allow("m")  # late release leaves the third's turn taken
        assert third is not None
        assert third.probe
        breakers.release_probe(second)
        assert breakers.allow("m") is None
        assert breakers.state("m") is BreakerState.HALF_OPEN

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0}], indirect=True)
    @pytest.mark.parametrize("status", [400, 405, 410, 415, 451])
    async def test_requests_the_provider_refuses_open_no_breaker(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, status: int
    ) -> None:
        """Five 400s in a row (one tenant's bad requests), or any other 4xx but 408/429 (a
        gateway's 451 for one tenant's prompt, a 405 or 415), are final for their callers: not
        retried, no fallback; and the model stays in service for everyone: breaker closed, retry
        budget untouched, the next request answered by the same model."""
        server, client = reliable
        fake.enqueue(*[Script(status=status)] * 5, model="gpt-4o-mini")
        for _ in range(5):
            error, _ = await failure(client)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"] * 5
        assert server.router.breakers.state("gpt-4o-mini") is BreakerState.CLOSED
        assert server.router.retry_budget.tokens == server.router.settings.config.reliability.retry_budget_tokens
        messages = await collect(client)
        assert messages[-1].completion.model == "gpt-4o-mini"

    @pytest.mark.parametrize(
        # open_seconds 2, not the fixture's 0.5: the breaker must still be open when the timed call
        # reaches it, a gc and a call after it opened, however loaded the machine is.
        "reliable",
        [{"retries_per_model": 0, "breaker": {"failure_threshold": 3, "open_seconds": 2.0}}],
        indirect=True,
    )
    async def test_breaker_opens_rejects_fast_then_recovers(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """3 failures open gpt-4o-mini's breaker; calls then skip it (falling back to claude-sonnet,
        failing too) without reaching gpt-4o-mini until open_seconds pass; the probe succeeds."""
        server, client = reliable
        fake.enqueue(*[Script(status=500)] * 3, model="gpt-4o-mini")
        fake.set_default(Script(status=500), model="claude-sonnet-4-6")

        def mini_calls() -> int:
            return sum(1 for r in fake.requests if r.model == "gpt-4o-mini")

        for _ in range(3):
            await failure(client)
        assert mini_calls() == 3
        gc.collect()  # no full collection of the test process's heap (~150 ms) inside the timed call
        started = time.monotonic()
        error, _ = await failure(client, model="gpt-4o-mini")
        # Rejected, not held until the breaker half-opens: well under open_seconds (2 s), with
        # room for a loaded machine (0.25 s was the bound with open_seconds 0.5).
        assert time.monotonic() - started < 1.0
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert mini_calls() == 3
        await until(lambda: server.router.breakers.state("gpt-4o-mini") is BreakerState.HALF_OPEN)
        messages = await collect(client, model="gpt-4o-mini")
        assert messages[-1].completion.model == "gpt-4o-mini"
        assert server.router.breakers.state("gpt-4o-mini").value == "closed"

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    async def test_breaker_stays_open_at_least_retry_after(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """A 429 with Retry-After longer than open_seconds keeps the breaker open that long."""
        server, client = reliable
        fake.enqueue(*[Script(status=429, retry_after="30")] * 3)
        for _ in range(3):
            await failure(client, model="gpt-4o-mini")
        assert server.router.breakers.retry_in("gpt-4o-mini") > 25

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    @pytest.mark.parametrize("retry_after", ["inf", "1e400"])
    async def test_an_endless_retry_after_is_read_as_a_day(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, retry_after: str
    ) -> None:
        """429s saying Retry-After: inf: each caller gets RESOURCE_EXHAUSTED with a finite retry
        delay (a day, never UNKNOWN), and the breaker opens for ``max_open_seconds``, not forever."""
        server, client = reliable
        fake.enqueue(*[Script(status=429, retry_after=retry_after)] * 3)
        for _ in range(3):
            error, _ = await failure(client, model="gpt-4o-mini")
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay(error) == 86_400
        assert 50 < server.router.breakers.retry_in("gpt-4o-mini") <= 60

    def test_a_retry_after_holds_the_breaker_open_at_most_max_open_seconds(self) -> None:
        """A provider's Retry-After longer than ``open_seconds`` holds the breaker open that long,
        up to ``max_open_seconds``: one answer saying a day, at the opening or from the half-open
        probe, takes the model out for at most the operator's bound."""
        now = [0.0]
        breakers = Breakers(BreakerConfig(failure_threshold=1, open_seconds=10, max_open_seconds=60), lambda: now[0])
        breakers.record_failure("m", retry_after=45.0)
        assert breakers.retry_in("m") == 45.0
        now[0] = 45.0
        assert breakers.allow("m") is not None  # the probe
        breakers.record_failure("m", retry_after=86_400.0)
        assert breakers.retry_in("m") == 60.0
        breakers.record_success("m")
        breakers.record_failure("m", retry_after=86_400.0)
        assert breakers.retry_in("m") == 60.0

    @pytest.mark.parametrize("reliable", [{"retries_per_model": 0, "max_attempts": 1}], indirect=True)
    @pytest.mark.parametrize(("model", "status"), [("gpt-4o-mini", 503), ("claude-sonnet", 529)])
    async def test_an_unavailable_answer_with_a_days_retry_after_opens_the_breaker_at_most_max_open_seconds(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider, model: str, status: int
    ) -> None:
        """Three 503s (Anthropic: 529s), the last saying Retry-After: 86400: the breaker opens for
        ``max_open_seconds`` (60 by default), not a day; its caller is still told the provider's day."""
        server, client = reliable
        fake.enqueue(Script(status=status), Script(status=status), Script(status=status, retry_after="86400"))
        for _ in range(3):
            error, _ = await failure(client, model=model)
        assert retry_delay(error) == 86_400
        assert 50 < server.router.breakers.retry_in(model) <= 60

    @pytest.mark.parametrize(("open_seconds", "longest"), [(120, 120.0), (10, 60.0)])
    def test_an_unset_max_open_seconds_is_60_or_open_seconds_if_longer(self, open_seconds: int, longest: float) -> None:
        """A config that sets ``open_seconds`` (120: longer than the 60 s default bound) and no
        ``max_open_seconds`` loads, as it did before the bound existed: a day's Retry-After holds
        the breaker open for the larger of 60 and ``open_seconds``."""
        config = reliable_config(breaker={"failure_threshold": 1, "open_seconds": open_seconds})
        breaker = settings_from(config).config.reliability.breaker
        breakers = Breakers(breaker, lambda: 0.0)
        breakers.record_failure("m", retry_after=86_400.0)
        assert breakers.retry_in("m") == longest

    def test_max_open_seconds_below_open_seconds_is_refused(self) -> None:
        """A bound on the open time shorter than the open time itself says nothing sensible: the
        config is refused at start, naming the fields."""
        config = reliable_config(breaker={"open_seconds": 30, "max_open_seconds": 10})
        with pytest.raises(
            ConfigError, match=r"reliability\.breaker: .*max_open_seconds \(10\) must be at least open_seconds \(30\)"
        ):
            settings_from(config)

    async def test_an_open_breakers_refusal_says_when_to_retry(self, fake: FakeProvider) -> None:
        """With no fallback, a request while the model's breaker is open fails fast UNAVAILABLE
        with RetryInfo of the time until the breaker lets a probe through."""
        config = reliable_config(
            retries_per_model=0, max_attempts=1, breaker={"failure_threshold": 3, "open_seconds": 30}
        )
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.enqueue(*[Script(status=503)] * 3)
            for _ in range(3):
                await failure(client, model="gpt-4o-mini")
            error, _ = await failure(client, model="gpt-4o-mini")
            retry_in = server.router.breakers.retry_in("gpt-4o-mini")
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert retry_in <= retry_delay(error) <= 30
        assert len(fake.requests) == 3

    async def test_when_every_model_is_refused_the_retry_info_is_the_soonest_probe(self, fake: FakeProvider) -> None:
        """gpt-4o-mini's breaker is open for 40 s (its 503's Retry-After), its fallback
        claude-sonnet's for 5 s (``open_seconds``): a request both refuse fails fast with RetryInfo
        of the fallback's sooner probe (it carried the first model's 40 s), and neither is called."""
        config = reliable_config(
            retries_per_model=0,
            max_attempts=1,
            breaker={"failure_threshold": 1, "open_seconds": 5, "max_open_seconds": 60},
        )
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.enqueue(Script(status=503, retry_after="40"), Script(status=503))
            await failure(client, model="gpt-4o-mini")
            await failure(client, model="claude-sonnet")
            assert 30 < server.router.breakers.retry_in("gpt-4o-mini") <= 40
            error, _ = await failure(client, model="gpt-4o-mini")
            fallback_retry_in = server.router.breakers.retry_in("claude-sonnet")
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert fallback_retry_in <= retry_delay(error) <= 5
        assert len(fake.requests) == 2
        # The error names the model whose probe the RetryInfo is (it named gpt-4o-mini), and the
        # message says both were refused.
        metadata = error_info(error).metadata
        assert (metadata["model"], metadata["provider"]) == ("claude-sonnet", "anthropic")
        assert error.details() == (
            "circuit breakers open for models gpt-4o-mini, claude-sonnet (the soonest probe: claude-sonnet's)"
        )

    @pytest.mark.parametrize(
        ("headers", "seconds"),
        [
            ({"retry-after": "3"}, 3.0),
            ({"retry-after-ms": "250"}, 0.25),
            ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
            ({"retry-after": "-5"}, 0.0),
            ({"retry-after": "nan"}, None),
            ({"retry-after": "Infinity"}, 86_400.0),
            ({"retry-after-ms": "1e999"}, 86_400.0),
            ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
            ({}, None),
        ],
    )
    def test_retry_after_is_a_finite_number_of_seconds(self, headers: dict[str, str], seconds: float | None) -> None:
        """Seconds or milliseconds or an HTTP date, clamped to [0, one day]; garbage reads as absent."""
        assert parse_retry_after(headers) == seconds

    @pytest.mark.parametrize(
        ("headers", "seconds"),
        [
            ({"x-ratelimit-reset-requests": "1s"}, 1.0),
            ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
            ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
            ({"x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
            ({"x-ratelimit-reset-requests": "1h2m3s"}, 3723.0),
            # Nothing says which refused: the later reset, the one never too soon.
            ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "7s"}, 7.0),
            (
                {
                    "x-ratelimit-remaining-requests": "3",
                    "x-ratelimit-reset-requests": "2s",
                    "x-ratelimit-remaining-tokens": "0",
                    "x-ratelimit-reset-tokens": "7ms",
                },
                0.007,
            ),
            ({"x-ratelimit-reset-requests": "9999h"}, 86_400.0),
            ({"x-ratelimit-reset-requests": "850us"}, 0.00085),
            ({"x-ratelimit-reset-requests": "1.5µs"}, 0.0000015),
            ({"x-ratelimit-reset-requests": "2μs"}, 0.000002),
            ({"x-ratelimit-reset-requests": "300ns"}, 0.0000003),
            ({"x-ratelimit-reset-requests": "1m0.000001s"}, 60.000001),
            ({"x-ratelimit-reset-requests": "0"}, 0.0),
            ({"x-ratelimit-reset-requests": "-5s"}, None),
            # One leading sign, as Go's ParseDuration reads it: "+" says nothing, "-0" is 0.
            ({"x-ratelimit-reset-requests": "+5s"}, 5.0),
            ({"x-ratelimit-reset-requests": "+1m30s"}, 90.0),
            ({"x-ratelimit-reset-requests": "+0"}, 0.0),
            ({"x-ratelimit-reset-requests": "-0"}, 0.0),
            ({"x-ratelimit-reset-requests": "-0s"}, 0.0),
            ({"x-ratelimit-reset-requests": "++5s"}, None),
            ({"x-ratelimit-reset-requests": "00"}, None),
            # ASCII digits only, as Go's (float() would read the Arabic-Indic 3).
            ({"x-ratelimit-reset-requests": "\u0663s"}, None),
            # A spent limit whose reset is unreadable: not the reset of one that is not spent.
            (
                {
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "in a while",
                    "x-ratelimit-remaining-tokens": "9000",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                None,
            ),
            ({"x-ratelimit-reset-requests": "soon"}, None),
            ({"x-ratelimit-reset-requests": "1x"}, None),
            ({"anthropic-ratelimit-requests-reset": "2026-01-01T00:00:30Z"}, 30.0),
            (
                {
                    "anthropic-ratelimit-input-tokens-remaining": "0",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:05+00:00",
                    "anthropic-ratelimit-output-tokens-remaining": "100",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:01:00Z",
                },
                5.0,
            ),
            # None at 0 remaining, 40 requests left: the requests limit had room for this one, so
            # the tokens refused (it was the sooner reset: a retry then is refused again).
            (
                {
                    "anthropic-ratelimit-requests-remaining": "40",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:02Z",
                    "anthropic-ratelimit-tokens-remaining": "800",
                    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:05:00Z",
                },
                300.0,
            ),
            # With the limits' sizes: the one closest to spent refused, output tokens (100 of
            # 8000 left), not the input tokens (5000 of 40000) nor the requests (with room).
            (
                {
                    "anthropic-ratelimit-requests-limit": "50",
                    "anthropic-ratelimit-requests-remaining": "40",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-input-tokens-limit": "40000",
                    "anthropic-ratelimit-input-tokens-remaining": "5000",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:10Z",
                    "anthropic-ratelimit-output-tokens-limit": "8000",
                    "anthropic-ratelimit-output-tokens-remaining": "100",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:30Z",
                },
                30.0,
            ),
            # The same, the input closest to spent: its sooner reset.
            (
                {
                    "anthropic-ratelimit-input-tokens-limit": "40000",
                    "anthropic-ratelimit-input-tokens-remaining": "100",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:10Z",
                    "anthropic-ratelimit-output-tokens-limit": "8000",
                    "anthropic-ratelimit-output-tokens-remaining": "4000",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:30Z",
                },
                10.0,
            ),
            # A limit without its size: not known which token limit is closest, the later.
            (
                {
                    "anthropic-ratelimit-input-tokens-remaining": "100",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:10Z",
                    "anthropic-ratelimit-output-tokens-limit": "8000",
                    "anthropic-ratelimit-output-tokens-remaining": "4000",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:30Z",
                },
                30.0,
            ),
            # Two at 0: the later of theirs, not the sooner reset of a limit with room left.
            (
                {
                    "anthropic-ratelimit-requests-remaining": "40",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-input-tokens-remaining": "0",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:05Z",
                    "anthropic-ratelimit-output-tokens-remaining": "0",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:20Z",
                },
                20.0,
            ),
            # Anthropic's tokens repeat the more restrictive of its input and output tokens: beside
            # them they are no limit of their own (here they would say 0, the output's 30 s).
            (
                {
                    "anthropic-ratelimit-requests-remaining": "0",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-output-tokens-remaining": "600",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:30Z",
                    "anthropic-ratelimit-tokens-remaining": "0",
                    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:30Z",
                },
                1.0,
            ),
            # Alone, they are read as a limit.
            (
                {
                    "anthropic-ratelimit-requests-remaining": "0",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-tokens-remaining": "0",
                    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:30Z",
                },
                30.0,
            ),
            ({"anthropic-ratelimit-tokens-reset": "2025-12-31T23:59:00Z"}, 0.0),
            ({"anthropic-ratelimit-tokens-reset": "tomorrow"}, None),
            ({}, None),
        ],
    )
    def test_rate_limit_resets_are_read_as_seconds(self, headers: dict[str, str], seconds: float | None) -> None:
        """OpenAI's reset durations and Anthropic's reset moments: the reset of a limit at 0
        remaining (the later of several); else, of the limits a request may have found short (not
        a requests limit with one left), the one closest to spent by the limits' sizes, or the
        later reset without them; clamped to [0, one day]; garbage reads as absent."""
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp()
        expected = None if seconds is None else pytest.approx(seconds)
        assert rate_limit_reset(headers, now=now) == expected

    @pytest.mark.parametrize(
        ("asked", "seconds"),
        [
            # The request's 6000 input tokens are more than the 5000 left: that limit refused,
            # though the output tokens are closer to spent.
            (TokensAsked(input_tokens=6000, output_tokens=50), 10.0),
            # Its 200 output tokens are more than the 100 left: that one.
            (TokensAsked(input_tokens=10, output_tokens=200), 30.0),
            # Both short: the later (the request passes once both have room).
            (TokensAsked(input_tokens=6000, output_tokens=200), 30.0),
            # Neither short by the estimate: the closest to spent.
            (TokensAsked(input_tokens=10, output_tokens=50), 30.0),
            (None, 30.0),
        ],
    )
    def test_a_token_limit_below_the_requests_tokens_is_the_one_that_refused(
        self, asked: TokensAsked | None, seconds: float
    ) -> None:
        """A 429 none of whose limits is at 0: a token limit whose remaining is below what the
        request takes of it (its input estimate for input tokens, its ``max_tokens`` for output)
        refused it, whatever the other limits' fractions say."""
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp()
        headers = {
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "5000",
            "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:10Z",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "100",
            "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:30Z",
        }
        assert rate_limit_reset(headers, now=now, asked=asked) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        ("headers", "asked", "seconds"),
        [
            # Requests at 0: they refused, though the estimate is over the input tokens left (a
            # cache read, which Anthropic's input-tokens limit leaves out, may make it so).
            (
                {
                    "anthropic-ratelimit-requests-remaining": "0",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-input-tokens-remaining": "2000",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:40Z",
                },
                TokensAsked(input_tokens=10000, output_tokens=512),
                1.0,
            ),
            # The same on OpenAI: its requests at 0, its tokens below the estimate.
            (
                {
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-remaining-tokens": "500",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                TokensAsked(input_tokens=400, output_tokens=200),
                0.12,
            ),
            # Nothing at 0: OpenAI's tokens (combined: 400 + 200 over its 500) refused.
            (
                {
                    "x-ratelimit-remaining-requests": "499",
                    "x-ratelimit-reset-requests": "120ms",
                    "x-ratelimit-remaining-tokens": "500",
                    "x-ratelimit-reset-tokens": "6m0s",
                },
                TokensAsked(input_tokens=400, output_tokens=200),
                360.0,
            ),
            # Anthropic's tokens beside its output tokens are not counted as input plus output:
            # the output's 600 left take the 512, and the input tokens are closest to spent.
            (
                {
                    "anthropic-ratelimit-input-tokens-limit": "40000",
                    "anthropic-ratelimit-input-tokens-remaining": "400",
                    "anthropic-ratelimit-input-tokens-reset": "2026-01-01T00:00:05Z",
                    "anthropic-ratelimit-output-tokens-limit": "8000",
                    "anthropic-ratelimit-output-tokens-remaining": "600",
                    "anthropic-ratelimit-output-tokens-reset": "2026-01-01T00:00:40Z",
                    "anthropic-ratelimit-tokens-limit": "8000",
                    "anthropic-ratelimit-tokens-remaining": "600",
                    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:40Z",
                },
                TokensAsked(input_tokens=300, output_tokens=512),
                5.0,
            ),
            # Anthropic's tokens alone are read as a limit: with a request left, they refused.
            (
                {
                    "anthropic-ratelimit-requests-limit": "50",
                    "anthropic-ratelimit-requests-remaining": "1",
                    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
                    "anthropic-ratelimit-tokens-limit": "8000",
                    "anthropic-ratelimit-tokens-remaining": "600",
                    "anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:40Z",
                },
                TokensAsked(input_tokens=300, output_tokens=512),
                40.0,
            ),
        ],
        ids=[
            "anthropic_requests_at_0",
            "openai_requests_at_0",
            "openai_tokens_short",
            "anthropic_split",
            "anthropic_alone",
        ],
    )
    def test_a_limit_at_0_comes_before_the_requests_estimated_tokens(
        self, headers: dict[str, str], asked: TokensAsked, seconds: float
    ) -> None:
        """A limit the provider says is at 0 refused the request, whatever routesvc's estimate of
        its tokens says of the others (the provider counts its own: cache reads, images); only
        when none is at 0 does a token limit below the estimate decide. Anthropic's tokens
        headers, the most restrictive of its input and output tokens limits, are no limit beside
        those."""
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp()
        assert rate_limit_reset(headers, now=now, asked=asked) == pytest.approx(seconds)

    async def test_total_outage_keeps_upstream_calls_per_request_low(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """Every provider answers 503 for 60 requests: at most 1.2 upstream calls per request."""
        _, client = reliable
        fake.set_default(Script(status=503))
        started = time.monotonic()
        for _ in range(60):
            error, _ = await failure(client)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert len(fake.requests) / 60 <= 1.2
        assert time.monotonic() - started < 10


class TestLedger:
    """RELIABILITY 14: the ledger agrees with what the provider billed."""

    def test_a_failing_listener_neither_loses_the_entry_nor_raises(self) -> None:
        """Entries are written in cleanup paths (a cancelled call's ``finally``): a listener that
        raises is logged, and the entry and the other listeners are unaffected."""
        ledger = Ledger(10)
        seen: list[str] = []

        def broken(entry: LedgerEntry) -> None:
            raise RuntimeError("listener bug")

        ledger.subscribe(broken)
        ledger.subscribe(lambda entry: seen.append(entry.decision_id))
        with capture_logs() as logs:
            ledger.record(
                request_id="r",
                decision_id="d",
                tenant="t",
                model="m",
                provider="p",
                attempt=1,
                outcome=AttemptOutcome.COMPLETED,
                usage=Usage(1, 1),
                cost_usd=Decimal("0.1"),
                estimated=False,
            )
        assert [e.decision_id for e in ledger.entries()] == ["d"]
        assert seen == ["d"]
        assert [entry["event"] for entry in logs] == ["ledger_listener_failed"]

    async def test_ledger_equals_provider_usage(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """Streamed and fallback requests: ledger usage equals the fake's reported usage, counted once."""
        server, client = reliable
        fake.enqueue(Script(input_tokens=100, output_tokens=7))
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o")
        fake.enqueue(Script(input_tokens=200, output_tokens=9), model="claude-sonnet-4-6")
        first = await collect(client)
        second = await collect(client, user_tier="premium")
        completed = [e for e in server.router.ledger.entries() if e.outcome is AttemptOutcome.COMPLETED]
        assert [(e.model, e.usage.input_tokens, e.usage.output_tokens) for e in completed] == [
            ("gpt-4o-mini", 100, 7),
            ("claude-sonnet", 200, 9),
        ]
        for messages in (first, second):
            decision_id = messages[0].decision.decision_id
            total = sum((e.cost_usd for e in server.router.ledger.entries(decision_id)), Decimal(0))
            assert Decimal(messages[-1].completion.cost_usd) == total
        assert len(server.router.ledger.entries()) == 4

    async def test_a_cancelled_streams_cost_counts_against_the_tenants_budget(self, fake: FakeProvider) -> None:
        """RELIABILITY 12: a tenant that cancels mid-answer is charged what the ledger charged
        (the estimate of what it received): the reservation settles after the attempt is
        recorded, not before with a cost of 0, which let a cancelling tenant spend for ever."""
        config = reliable_config()
        config["tenants"] = {"acme": {"daily_budget_usd": "5"}}
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            loopback_channel(server.target) as channel,
        ):
            # Chunks as fast as they come: the cancel lands while the handler is writing (the
            # stream is closed from outside), not while it waits for the provider.
            fake.enqueue(Script(chunk_count=2000))
            stub = pb_grpc.RouterServiceStub(channel)
            call = stub.Complete(pb.CompleteRequest(chat=user_chat("hello"), context=pb.RoutingContext(tenant="acme")))
            seen = 0
            async for message in call:
                seen += message.WhichOneof("event") == "delta"
                if seen == 1500:
                    call.cancel()  # a raw stub: the client wrapper would read to the end instead
                    break
            async with asyncio.timeout(5):
                while server.router.admission.in_flight("acme"):  # noqa: ASYNC110 - settles off the caller's task
                    await asyncio.sleep(0.02)
            charged = server.router.ledger.total_cost("acme")
            assert charged > 0
            assert await server.router.admission.spent("acme") == charged

    async def test_a_cancelled_stream_is_recorded_once_as_estimated(
        self, reliable: tuple[Server, RouterClient], fake: FakeProvider
    ) -> None:
        """RELIABILITY 4: a client cancel mid-stream leaves exactly one estimated ledger entry."""
        server, client = reliable
        fake.enqueue(Script(chunk_count=500, chunk_delay=0.01))
        stream = client.complete(user_chat("hello"))
        seen = 0
        async for message in stream:
            seen += message.WhichOneof("event") == "delta"
            if seen == 10:
                break
        await stream.aclose()
        await fake.requests[0].wait_ended(timeout=5.0)
        await until(lambda: bool(server.router.ledger.entries()))
        (entry,) = server.router.ledger.entries()
        assert (entry.outcome, entry.estimated) == (AttemptOutcome.CANCELLED, True)
