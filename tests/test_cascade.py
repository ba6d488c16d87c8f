"""Cascading escalation: the scorers, the escalation chain, the max-cost stop and the buffered stream."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from routesvc import redis_admission
from routesvc.client import RouterClient
from routesvc.cost import cost_of_usage, estimated_cost
from routesvc.ledger import AttemptOutcome
from routesvc.models import (
    ChatRequest,
    FinishReason,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    RoutingContext,
    RoutingRequest,
    Usage,
)
from routesvc.providers.openai import OpenAIProvider
from routesvc.scoring import CombinedScorer, LLMJudge, LocalScorer, ScoringInput, parse_judge_score
from routesvc.server import Server
from routesvc.testing import FakeProvider, FakeToolCall, Fault, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import add_local_model, default_config, live_environ, settings_from, until, user_chat
from tests.redis_server import running_redis
from tests.test_redis_admission import _Proxy
from tests.test_validation import error_info


def _input(
    answer: str, prompt: str = "hello", finish: FinishReason = FinishReason.STOP, **metadata: str
) -> ScoringInput:
    request = RoutingRequest(
        ChatRequest((Message(Role.USER, prompt),)),
        RoutingContext(metadata=metadata),  # type: ignore[arg-type]
    )
    return ScoringInput(request=request, model="gpt-4o-mini", answer=answer, finish_reason=finish, threshold=0.8)


class TestLocalScorer:
    """The local scorer needs no call and flags answers that are plainly not good enough."""

    @pytest.mark.parametrize(
        ("answer", "finish", "expected"),
        [
            ("", FinishReason.STOP, (0.0, "empty answer")),
            ("Paris is the capital.", FinishReason.CONTENT_FILTER, (0.0, "filtered by the provider")),
            ("I'm sorry, but I can't help with that.", FinishReason.STOP, (0.1, "refusal")),
            ("I\u2019m sorry, but I can\u2019t help with that.", FinishReason.STOP, (0.1, "refusal")),
            ("I won\u2019t help with that.", FinishReason.STOP, (0.1, "refusal")),
            ("I\u2019m not sure; I don\u2019t know.", FinishReason.STOP, (0.5, "hedged answer")),
            ("The answer is", FinishReason.LENGTH, (0.2, "truncated (finish_reason length)")),
            ("I'm not sure; it cannot be determined.", FinishReason.STOP, (0.5, "hedged answer")),
            ("Paris is the capital of France.", FinishReason.STOP, (1.0, "no problem found")),
        ],
    )
    async def test_scores_by_the_first_rule_that_matches(
        self, answer: str, finish: FinishReason, expected: tuple[float, str]
    ) -> None:
        """Empty, filtered, refused, truncated and hedged answers score low; a plain answer scores 1."""
        result = await LocalScorer().score(_input(answer, finish=finish))
        assert (result.quality.score, result.quality.reason) == expected
        assert result.calls == ()

    async def test_requested_json_that_does_not_parse_scores_low(self) -> None:
        """A prompt asking for JSON answered with prose scores 0.2; fenced valid JSON scores 1."""
        prompt = "Return the result as JSON."
        bad = await LocalScorer().score(_input("Sure, here it is: name=x", prompt))
        good = await LocalScorer().score(_input('```json\n{"name": "x"}\n```', prompt))
        assert (bad.quality.score, bad.quality.reason) == (0.2, "requested JSON does not parse")
        assert good.quality.score == 1.0

    @pytest.mark.parametrize(
        ("prompt", "answer"),
        [
            ("Tell me about Rome.", "I can't help but admire Rome: it is ancient and beautiful."),
            ("Write a function that returns JSON.", "def f():\n    return json.dumps({})"),
            ("What is JSON?", "A text format for structured data."),
        ],
    )
    async def test_ordinary_answers_are_not_flagged(self, prompt: str, answer: str) -> None:
        """Not refusals, and no JSON was asked of the answer itself: score 1."""
        result = await LocalScorer().score(_input(answer, prompt))
        assert (result.quality.score, result.quality.reason) == (1.0, "no problem found")

    @pytest.mark.parametrize(
        "prompt",
        [
            "Respond with JSON only.",
            "Format the output as valid JSON.",
            "Give me the three largest cities in JSON format.",
            "List the planets. Reply only in JSON.",
            "List three primary colours. Format as JSON.",
            "List three primary colours, formatted as JSON.",
            "Extract the names and ages from this text and format the data as JSON: Ann is 30, Bob 41.",
            "Format the list as JSON: apples, pears, plums.",
            "Summarise the article in three bullet points. Format in JSON.",
        ],
    )
    async def test_json_is_asked_for_by_an_output_verb(self, prompt: str) -> None:
        """An output verb then JSON, "format" then in or as JSON up to three words on, or "JSON
        only" asks for a JSON answer: prose scores 0.2."""
        result = await LocalScorer().score(_input("Sure: Paris, Lyon, Nice.", prompt))
        assert (result.quality.score, result.quality.reason) == (0.2, "requested JSON does not parse")

    @pytest.mark.parametrize(
        ("prompt", "answer"),
        [
            ("Can I write comments in JSON?", "No, standard JSON has no comment syntax."),
            ("How are dates usually represented in JSON?", "As ISO 8601 strings, since JSON has no date type."),
            ("Is a trailing comma allowed in JSON?", "No, the JSON grammar does not allow trailing commas."),
            ("What is the GIL in Python?", "A lock that lets one thread run Python bytecode at a time."),
            ("How are lists different from tuples in Python?", "Lists are mutable; tuples are immutable."),
            ("Is indentation significant in Python?", "Yes, indentation defines blocks."),
            ("Can I write comments in Python?", "Yes, a comment starts with #."),
            ("What's the best way to format JSON files?", "Use a formatter such as jq or your editor's."),
            ("How are dictionaries implemented in Python?", "As hash tables with open addressing."),
            ("How do I convert a string to an int in Python?", "Call int on it: int('42') is 42."),
            ("Should we rewrite our billing service in Python or Go?", "Go, for its static types and speed."),
            ("Is it hard to port a Perl codebase to Python?", "Not very: the idioms map well."),
            ("How would you solve the diamond problem in Python?", "Python's MRO (C3) already solves it."),
            ("Why does my code run slower in Python than in Java?", "CPython interprets; the JVM compiles."),
        ],
    )
    async def test_a_question_about_json_or_python_asks_for_neither(self, prompt: str, answer: str) -> None:
        """A question that mentions JSON or Python asks for no JSON answer and no code: a correct
        prose answer scores 1 (it scored 0.2 "requested JSON does not parse" or 0.3 "requested
        Python code missing", and the cascade paid for the strong model)."""
        result = await LocalScorer().score(_input(answer, prompt))
        assert (result.quality.score, result.quality.reason) == (1.0, "no problem found")

    @pytest.mark.parametrize(
        "prompt",
        [
            "Write a Python function that merges two sorted lists.",
            "Implement quicksort in Python and add unit tests with pytest.",
            "Return the number of subarrays whose sum equals k. Write the solution in Python.",
            "Create a Python script that renames the files in a folder.",
            "Can you code this in python? Read a file and count its words.",
            "Python code to parse a CSV file please",
            "Make a Python function that returns the nth prime.",
            "Code a web scraper in Python.",
            "Solve this in Python: the sum of the digits of 2**1000",
            "Rewrite this in Python: for (i=0;i<10;i++) printf(i);",
        ],
    )
    async def test_python_code_is_asked_for_by_a_request_to_write_some(self, prompt: str) -> None:
        """A request to write or implement code in Python answered in prose scores 0.3; with code, 1."""
        prose = await LocalScorer().score(_input("Sort both lists, then walk them together.", prompt))
        code = await LocalScorer().score(_input("def solve(items):\n    return sorted(items)", prompt))
        assert (prose.quality.score, prose.quality.reason) == (0.3, "requested Python code missing")
        assert code.quality.score == 1.0

    async def test_a_fence_then_a_long_run_of_whitespace_is_read_in_one_pass(self) -> None:
        """An answer that opens a JSON fence, then 10,000 spaces, and never closes it scores 0.2 at
        once: the fence is found by slicing (a fence regex backtracked cubically on it, some
        fifteen minutes of a frozen event loop here); a fenced answer still parses."""
        prompt = "Return the result as JSON."
        unclosed = await LocalScorer().score(_input("```json\n" + " " * 10_000 + "x", prompt))
        fenced = await LocalScorer().score(_input("```JSON\n" + " " * 10_000 + '{"a": 1}\n```', prompt))
        bare = await LocalScorer().score(_input('```{"a": 1}```', prompt))
        assert (unclosed.quality.score, unclosed.quality.reason) == (0.2, "requested JSON does not parse")
        assert (fenced.quality.score, bare.quality.score) == (1.0, 1.0)

    async def test_a_long_run_of_blank_lines_is_read_in_one_pass(self) -> None:
        """An answer of 200,000 blank lines to a request for Python code scores 0.3 at once: the
        code pattern reads a line's indent only (``^\\s*`` read every blank line after each line
        start, quadratic: minutes here); code after them is still found."""
        prompt = "Write a Python function that merges two sorted lists."
        blank = await LocalScorer().score(_input("Here:" + "\n" * 200_000 + "done.", prompt))
        code = await LocalScorer().score(_input("Here:" + "\n" * 200_000 + "  def merge(a, b):\n  pass", prompt))
        assert (blank.quality.score, blank.quality.reason) == (0.3, "requested Python code missing")
        assert code.quality.score == 1.0

    async def test_a_long_prompt_is_read_at_its_ends_only(self) -> None:
        """The patterns read the first and last ``READ_CHARS`` characters of the last user message
        (where a prompt says what it asks for), so that scoring costs little whatever its length:
        a request for Python code at either end is seen, one in the middle of quoted material not."""
        filler = "lorem ipsum " * 1_000
        ask = "Write a Python function that merges two sorted lists."
        prose = "Sort both lists, then walk them together."
        scores = [
            (await LocalScorer().score(_input(prose, prompt))).quality.score
            for prompt in (f"{ask}\n{filler}", f"{filler}\n{ask}", f"{filler}\n{ask}\n{filler}")
        ]
        assert scores == [0.3, 0.3, 1.0]

    async def test_json_can_be_requested_in_metadata(self) -> None:
        """Routing metadata ``response_format: json`` asks for JSON too."""
        result = await LocalScorer().score(_input("not json", response_format="json"))
        assert result.quality.reason == "requested JSON does not parse"

    @pytest.mark.parametrize("kind", [ResponseFormatType.JSON_OBJECT, ResponseFormatType.JSON_SCHEMA])
    async def test_json_can_be_requested_by_the_response_format(self, kind: ResponseFormatType) -> None:
        """A JSON ``chat.response_format`` asks for JSON, whatever the prompt says (here: code)."""
        chat = ChatRequest(
            (Message(Role.USER, "Write a function to add two numbers."),), response_format=ResponseFormat(kind)
        )
        scoring = ScoringInput(
            request=RoutingRequest(chat),
            model="gpt-4o-mini",
            answer="def add(a, b): return a + b",
            finish_reason=FinishReason.STOP,
            threshold=0.8,
        )
        result = await LocalScorer().score(scoring)
        assert (result.quality.score, result.quality.reason) == (0.2, "requested JSON does not parse")

    async def test_an_ignored_single_choice_format_scores_low(self) -> None:
        """A multiple-choice prompt asking for one letter, answered with prose, scores 0.4."""
        prompt = "Which is a metal?\nA) wood\nB) iron\nPrint only a single choice from A or B."
        prose = await LocalScorer().score(_input("Iron is a metal because it conducts.", prompt))
        letter = await LocalScorer().score(_input("B", prompt))
        assert (prose.quality.score, letter.quality.score) == (0.4, 1.0)


class TestJudgeScoreParsing:
    """The judge's verdict is the ``score`` of the first JSON object, when it is in [0, 1]."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ('{"score": 0.7, "reason": "ok"}', 0.7),
            ('Verdict: {"score": 1}', 1.0),
            ('{"score": 1.5}', None),
            ('{"score": "high"}', None),
            ('{"score": true}', None),
            ("no json here", None),
            ('{"score": 0.1, "reason": "dict literal {} is wrong"}', 0.1),
            ('```json\n{"score": 0.2, "reason": "uses {x: 1} as a set"}\n```', 0.2),
            ('{not json} then {"score": 0.4}', 0.4),
            ('{"score": 1' + "0" * 400 + "}", None),  # too large for a float: OverflowError, INTERNAL
            ('{"a":' * 3000, None),  # nested too deep: RecursionError, INTERNAL
            (" " * 4_096 + '{"score": 0.5}', None),  # read no further than 4,096 characters
        ],
    )
    def test_parses_only_scores_in_range(self, text: str, expected: float | None) -> None:
        """Out-of-range, non-numeric and missing scores are failures (None), and so is an answer
        nested too deep to read; the answer is read no further than 4,096 characters."""
        assert parse_judge_score(text) == expected


class TestLLMJudge:
    """The judge is a real call through the Provider protocol to the fake, with a timeout."""

    @pytest.fixture
    async def provider(self, fake: FakeProvider) -> AsyncIterator[OpenAIProvider]:
        """An OpenAI adapter pointed at the fake."""
        adapter = OpenAIProvider("openai", "sk-test", fake.openai_base_url)
        yield adapter
        await adapter.aclose()

    def _judge(self, provider: OpenAIProvider, **kwargs: object) -> LLMJudge:
        model = settings_from(default_config()).catalog.get("gpt-4o-mini")
        return LLMJudge(provider, model, timeout=kwargs.pop("timeout", 2.0), **kwargs)  # type: ignore[arg-type]

    async def test_the_judges_json_score_is_the_score_and_its_call_is_charged(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """{"score": 0.3} scores 0.3; the judge's usage comes back to be charged."""
        fake.enqueue(Script(text='{"score": 0.3, "reason": "wrong"}', input_tokens=40, output_tokens=9))
        result = await self._judge(provider).score(_input("Paris"))
        assert (result.quality.score, result.quality.scorer) == (0.3, "llm_judge")
        assert [(c.model, c.usage, c.estimated) for c in result.calls] == [
            ("gpt-4o-mini", Usage(input_tokens=40, output_tokens=9), False)
        ]
        assert fake.requests[-1].body["messages"][0]["role"] == "system"

    async def test_a_judge_that_refuses_temperature_is_asked_without_one(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """The judge asks at temperature 0, except a model that refuses the parameter (OpenAI's
        reasoning models), which gets none instead of a 400."""
        config = default_config()
        config["models"][0]["unsupported_parameters"] = ["temperature"]  # type: ignore[index]
        refusing = settings_from(config).catalog.get("gpt-4o-mini")
        for model in (settings_from(default_config()).catalog.get("gpt-4o-mini"), refusing):
            fake.enqueue(Script(text='{"score": 0.9}'))
            await LLMJudge(provider, model, timeout=2.0).score(_input("Paris"))
        assert [request.body.get("temperature") for request in fake.requests] == [0.0, None]

    async def test_garbage_releases_by_default(self, provider: OpenAIProvider, fake: FakeProvider) -> None:
        """A judge answer without a score: on_failure release scores 1.0 and says why."""
        fake.enqueue(Script(text="I think it is fine"))
        result = await self._judge(provider).score(_input("Paris"))
        assert result.quality.score == 1.0
        assert result.quality.reason == "judge gave no score in [0, 1]; released as configured"

    async def test_a_timeout_escalates_when_configured(self, provider: OpenAIProvider, fake: FakeProvider) -> None:
        """A judge slower than its timeout: on_failure escalate scores 0.0; the upstream call is closed."""
        # A whole judge answer first opens the connection, so that the slow call reaches the fake
        # within its 0.3 s even on a loaded machine (a cold connect can take most of it).
        fake.enqueue(Script(text='{"score": 0.9}'))
        await self._judge(provider).score(_input("Paris"))
        fake.enqueue(Script(first_chunk_delay=5))
        result = await self._judge(provider, timeout=0.3, on_failure="escalate").score(_input("Paris"))
        assert result.quality.score == 0.0
        assert result.quality.reason == "judge timed out after 0.3 s; escalated as configured"
        assert len(fake.requests) == 2
        await fake.requests[-1].wait_ended(5)
        assert fake.requests[-1].aborted
        assert result.calls[0].estimated

    async def test_an_answer_nested_too_deep_is_a_bad_answer(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """A judge answer of deeply nested JSON (a server that ignores the output limit) gives no
        score: released as configured, its call charged (it failed the request INTERNAL)."""
        fake.enqueue(Script(text='{"a":' * 3000))
        result = await self._judge(provider).score(_input("Paris"))
        assert result.quality.reason == "judge gave no score in [0, 1]; released as configured"
        assert len(result.calls) == 1

    async def test_an_unexpected_error_applies_on_failure_and_is_logged(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """A failure that is no provider's (here the HTTP library cannot take an infinite timeout,
        which config refuses but a judge built in code can carry) applies ``on_failure`` like a
        provider error, and is logged as an error for the operator (it failed the request INTERNAL)."""
        fake.enqueue(Script(text='{"score": 0.9}'))
        with capture_logs() as logs:
            result = await self._judge(provider, timeout=float("inf"), on_failure="escalate").score(_input("Paris"))
        assert (result.quality.score, result.quality.reason) == (
            0.0,
            "judge failed unexpectedly (OverflowError); escalated as configured",
        )
        assert [(e["event"], e["log_level"], e["error"]) for e in logs if e["event"] == "judge_failed"] == [
            ("judge_failed", "error", "OverflowError")
        ]

    async def test_a_hold_that_leaves_the_judge_less_than_its_least_time_is_cut_and_the_judge_not_asked(
        self, provider: OpenAIProvider, fake: FakeProvider
    ) -> None:
        """The judge has 1 s and is asked only with at least 0.5 s (`min_timeout`); its hold in
        the tenant's budget (a slow store) would take 0.8 s: the hold is cut once 0.5 s is all that
        is left, and the judge is not asked (it was, with 0.2 s, timed out and was paid for no
        verdict), scored by on_failure with the reason."""

        async def slow_store(cost: Decimal) -> str:
            await asyncio.sleep(0.8)
            return ""

        scoring_input = replace(_input("Paris"), timeout=1.0, min_timeout=0.5, reserve=slow_store)
        result = await self._judge(provider).score(scoring_input)
        assert (result.quality.score, result.calls) == (1.0, ())
        assert result.quality.reason == (
            "judge gpt-4o-mini not asked (the tenant's budget store did not answer within the 0.5 s left for it);"
            " released as configured"
        )
        assert fake.requests == []

    async def test_a_timeout_error_of_the_hold_itself_is_not_taken_for_the_holds_cut(
        self, provider: OpenAIProvider
    ) -> None:
        """A TimeoutError raised by the hold in the tenant's budget long before the judge's time
        is up is not reported as the store not answering in the time left (it was): it
        propagates, as the hold's other faults do."""

        async def failing_hold(cost: Decimal) -> str:
            raise TimeoutError

        scoring_input = replace(_input("Paris"), timeout=5.0, reserve=failing_hold)
        with pytest.raises(TimeoutError):
            await self._judge(provider).score(scoring_input)

    async def test_a_provider_error_is_a_failure(self, provider: OpenAIProvider, fake: FakeProvider) -> None:
        """A 400 from the judge's provider: released as configured, reason names the error."""
        fake.enqueue(Script(status=400))
        result = await self._judge(provider).score(_input("Paris"))
        assert result.quality.reason == "judge failed (PROVIDER_REJECTED); released as configured"


class TestCombinedScorer:
    """min: the lowest score, and a local rejection spares the judge's call; mean: the average."""

    async def test_min_skips_the_judge_when_the_local_scorer_rejects(self, fake: FakeProvider) -> None:
        """An empty answer scores 0 locally; the judge is never called."""
        provider = OpenAIProvider("openai", "sk", fake.openai_base_url)
        model = settings_from(default_config()).catalog.get("gpt-4o-mini")
        scorer = CombinedScorer([LocalScorer(), LLMJudge(provider, model, timeout=2)], "min")
        result = await scorer.score(_input(""))
        await provider.aclose()
        assert (result.quality.score, result.quality.scorer, scorer.name) == (0.0, "local", "min(local,llm_judge)")
        assert fake.requests == []

    async def test_mean_averages(self, fake: FakeProvider) -> None:
        """mean(local 1.0, judge 0.4) = 0.7."""
        fake.enqueue(Script(text='{"score": 0.4}'))
        provider = OpenAIProvider("openai", "sk", fake.openai_base_url)
        model = settings_from(default_config()).catalog.get("gpt-4o-mini")
        result = await CombinedScorer([LocalScorer(), LLMJudge(provider, model, timeout=2)], "mean").score(
            _input("Paris")
        )
        await provider.aclose()
        assert result.quality.score == pytest.approx(0.7)
        assert result.quality.scorer == "mean(local,llm_judge)"


def _kinds(messages: list[pb.CompleteResponse]) -> list[str]:
    folded: list[str] = []
    for message in messages:
        kind = str(message.WhichOneof("event"))
        if not folded or folded[-1] != kind or kind != "delta":
            folded.append(kind)
    return folded


def _text(messages: list[pb.CompleteResponse]) -> str:
    return "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta")


async def _cascade(
    client: RouterClient,
    prompt: str = "What is the capital of France?",
    *,
    timeout: float | None = None,
    **context: object,
) -> list[pb.CompleteResponse]:
    """Every message of one cascaded Complete (``timeout``: the call's deadline, else the client's)."""
    request_context = pb.RoutingContext(cascade=True, **context)  # type: ignore[arg-type]
    return [m async for m in client.complete(user_chat(prompt), request_context, timeout=timeout)]


@contextlib.asynccontextmanager
async def _served(config: dict[str, object], fake: FakeProvider) -> AsyncIterator[tuple[Server, RouterClient]]:
    """A server of ``config`` whose providers are ``fake``, and a client of it."""
    async with (
        Server(settings_from(config, live_environ(fake)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        yield server, client


class TestEscalationChain:
    """With the default config and the fake: gpt-4o-mini first, escalated to gpt-4o below 0.8."""

    async def test_an_answer_scoring_0_5_is_escalated_and_only_the_strong_answer_is_sent(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """Judge says 0.5: one escalation message, then only gpt-4o's text; both attempts' tokens
        and the summed cost in the completion; the ledger charges each call once."""
        fake.enqueue(Script(text="Lyon maybe", input_tokens=10, output_tokens=2), model="gpt-4o-mini")
        fake.enqueue(Script(text='{"score": 0.5}', input_tokens=50, output_tokens=5), model="gpt-4o-mini")
        fake.enqueue(Script(text="Paris.", input_tokens=10, output_tokens=1), model="gpt-4o")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        decision, escalation, completion = messages[0].decision, messages[1].escalation, messages[-1].completion
        assert list(decision.cascade_models) == ["gpt-4o-mini", "gpt-4o"]
        assert list(decision.cascade_thresholds) == [0.8]
        assert (escalation.from_model, escalation.to_model, escalation.threshold) == ("gpt-4o-mini", "gpt-4o", 0.8)
        assert (escalation.quality.score, escalation.quality.scorer) == (0.5, "llm_judge")
        assert _text(messages) == "Paris."
        mini_answer = Decimal("10") * Decimal("0.15") / 10**6 + Decimal("2") * Decimal("0.60") / 10**6
        judge = Decimal("50") * Decimal("0.15") / 10**6 + Decimal("5") * Decimal("0.60") / 10**6
        strong = Decimal("10") * Decimal("2.50") / 10**6 + Decimal("1") * Decimal("10.00") / 10**6
        assert Decimal(escalation.cost_usd) == mini_answer + judge
        assert Decimal(completion.cost_usd) == mini_answer + judge + strong
        assert completion.model == "gpt-4o"
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_ESCALATED),
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_JUDGE),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_COMPLETED),
        ]
        assert (completion.total_usage.input_tokens, completion.total_usage.output_tokens) == (70, 8)
        entries = live_server.router.ledger.entries(decision.decision_id)
        assert [(e.model, e.outcome) for e in entries] == [
            ("gpt-4o-mini", AttemptOutcome.COMPLETED),
            ("gpt-4o-mini", AttemptOutcome.COMPLETED),
            ("gpt-4o", AttemptOutcome.COMPLETED),
        ]
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)

    async def test_an_answer_scoring_0_9_is_released_with_one_answer_charged(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """Judge says 0.9: the cheap answer is released, gpt-4o is never called, one answer attempt."""
        fake.enqueue(Script(text="Paris is the capital."), Script(text='{"score": 0.9}'), model="gpt-4o-mini")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        completion = messages[-1].completion
        assert (completion.model, _text(messages)) == ("gpt-4o-mini", "Paris is the capital.")
        assert (completion.quality.score, completion.quality.scorer) == (0.9, "llm_judge")
        assert [a.outcome for a in completion.attempts] == [pb.ATTEMPT_OUTCOME_COMPLETED, pb.ATTEMPT_OUTCOME_JUDGE]
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    async def test_a_local_rejection_escalates_without_a_judge_call(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A refusal scores 0.1 locally: escalated at once, the judge is not asked."""
        fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
        messages = await _cascade(live_client)
        assert messages[1].escalation.quality.reason == "refusal"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o"]

    async def test_a_cheap_model_that_fails_before_its_first_token_escalates(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini answers 503 twice (its retry spent): escalated to gpt-4o, announced with the
        error as reason; its configured fallback (gpt-4o, the next step) is not used silently."""
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert messages[1].escalation.quality.reason == "gpt-4o-mini failed (PROVIDER_UNAVAILABLE)"
        assert messages[-1].completion.model == "gpt-4o"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]

    async def test_a_rejected_request_is_not_escalated(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """A 400 from the cheap model would be a 400 from the next: FAILED_PRECONDITION, no escalation."""
        fake.enqueue(Script(status=400), model="gpt-4o-mini")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _cascade(live_client)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_a_cut_buffered_answer_escalates_instead_of_interrupting(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap stream is cut after 3 chunks, and so is its retry: nothing reached the
        client, so it escalates cleanly, and none of the cut text is sent."""
        cut = Script(text="Lyon Lyon Lyon Lyon Lyon Lyon", chunk_count=6, fault=Fault.CUT, fault_after=3)
        fake.enqueue(cut, cut, model="gpt-4o-mini")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert "Lyon" not in _text(messages)
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]

    async def test_max_cost_stops_escalation_and_releases_the_cheap_answer(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """max_cost_usd above the least the cheap call can cost plus gpt-4o's estimate (so the
        cascade is planned), below what the cheap call did cost (500 output tokens) plus that
        estimate: no escalation can follow, so the judge, whose verdict would change nothing, is
        not asked (it was, and paid for); the local scorer scores the released answer, and the
        reason says why."""
        cheap = Script(text="Lyon", input_tokens=10, output_tokens=500)
        fake.enqueue(cheap, Script(text='{"score": 0.2}'), model="gpt-4o-mini")
        messages = await _cascade(live_client, max_cost_usd="0.0053")
        assert list(messages[0].decision.cascade_models) == ["gpt-4o-mini", "gpt-4o"]
        assert _kinds(messages) == ["decision", "delta", "completion"]
        completion = messages[-1].completion
        assert (completion.quality.score, completion.quality.scorer) == (1.0, "local")
        assert completion.quality.reason.startswith("no problem found; escalation to gpt-4o stopped: estimated total")
        assert completion.quality.reason.endswith("(so the judge was not asked)")
        assert [a.outcome for a in completion.attempts] == [pb.ATTEMPT_OUTCOME_COMPLETED]
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    @pytest.mark.parametrize("where", ["request", "config"])
    async def test_a_cascade_the_cost_cap_rules_out_is_not_planned_and_the_answer_streams(
        self, fake: FakeProvider, where: str
    ) -> None:
        """max_cost_usd (the request's, or cascade.max_cost_usd) is below gpt-4o's estimate alone:
        no escalation could ever follow, so no cascade is planned (the decision names no chain, its
        reason says why), and the cheap answer streams as it comes, its first chunk long before its
        last (it was held back whole, to be released anyway by the same cap)."""
        config = default_config()
        context: dict[str, object] = {}
        if where == "config":
            config["cascade"]["max_cost_usd"] = "0.001"  # type: ignore[index]
        else:
            context["max_cost_usd"] = "0.001"
        fake.enqueue(Script(chunk_count=6, chunk_delay=0.3), model="gpt-4o-mini")
        messages: list[pb.CompleteResponse] = []
        arrived: list[float] = []
        async with _served(config, fake) as (_server, client):
            request_context = pb.RoutingContext(cascade=True, **context)  # type: ignore[arg-type]
            async for message in client.complete(user_chat("What is the capital of France?"), request_context):
                messages.append(message)
                arrived.append(asyncio.get_running_loop().time())
        decision = messages[0].decision
        assert (decision.model, list(decision.cascade_models)) == ("gpt-4o-mini", [])
        assert any(reason.startswith("no cascade: gpt-4o left out: at least ") for reason in decision.reasons)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert arrived[-1] - arrived[1] > 1.0  # the first chunk came ~1.5 s before the last
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_a_step_a_cached_prompt_leaves_room_for_is_planned_and_escalated_to(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A 5,000-token prompt, 4,900 of it read from the provider's cache (half price on
        gpt-4o-mini), and max_cost_usd 0.0182: the cheap refusal, so billed, plus gpt-4o's
        estimate (0.0180 USD) is within the cap, so gpt-4o is planned and escalated to (the plan
        priced the cheap input in full, 0.0184 USD with gpt-4o, and left it out: the refusal was
        streamed, never escalated)."""
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal, cached_input_tokens=4900), model="gpt-4o-mini")
        fake.enqueue(Script(text="Paris."), model="gpt-4o")
        context = pb.RoutingContext(cascade=True, task_hint="simple_qa", max_cost_usd="0.0182")
        messages = [m async for m in live_client.complete(user_chat("hello " * 5000), context)]
        assert list(messages[0].decision.cascade_models) == ["gpt-4o-mini", "gpt-4o"]
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert messages[-1].completion.model == "gpt-4o"

    async def test_a_judge_alone_is_not_asked_when_no_escalation_can_follow(self, fake: FakeProvider) -> None:
        """Scored by the judge alone, an answer that cannot be escalated (the cost cap) is released
        unscored, with no judge call; GetStats' mean released score leaves it out (it counted as a
        perfect 1.0, as did the span's ``routesvc.cascade.score``)."""
        config = default_config()
        config["cascade"]["scorers"] = ["llm_judge"]  # type: ignore[index]
        cheap = Script(text="Lyon", input_tokens=10, output_tokens=500)
        fake.enqueue(cheap, Script(text='{"score": 0.2}'), model="gpt-4o-mini")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, max_cost_usd="0.0053")
            stats = await client.get_stats()
        quality = messages[-1].completion.quality
        assert (_text(messages), quality.score, quality.scorer) == ("Lyon", 1.0, "none")
        assert quality.reason.startswith("not scored; escalation to gpt-4o stopped")
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
        assert (stats.cascade_decisions, stats.HasField("mean_released_score")) == (1, False)

    async def test_a_judge_whose_verdict_could_lead_to_no_escalation_is_not_asked(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """max_cost_usd above the cheap call plus gpt-4o's estimate, but below that plus the
        judge's call: a low verdict could not be followed by the escalation, so the judge is not
        asked (it was, and paid for, and its 0.2 then stopped at the cap) and its ``on_failure``
        (release) applies, the reason saying why."""
        fake.enqueue(Script(text="Paris.", input_tokens=8, output_tokens=5), model="gpt-4o-mini")
        fake.enqueue(Script(text='{"score": 0.2}', input_tokens=200, output_tokens=10), model="gpt-4o-mini")
        messages = await _cascade(live_client, "hi", max_cost_usd="0.005152")
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert completion.quality.reason.startswith("judge not asked (with its call, escalation to gpt-4o stopped:")
        assert completion.quality.reason.endswith("); released as configured")
        assert [a.outcome for a in completion.attempts] == [pb.ATTEMPT_OUTCOME_COMPLETED]
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_an_escalation_that_could_not_start_before_the_deadline_releases_the_answer(
        self, fake: FakeProvider
    ) -> None:
        """The cheap answer (a refusal) comes with less than reliability.min_attempt_seconds of the
        caller's deadline left: gpt-4o could not be called, so the answer in hand is released,
        with a reason saying why (an Escalation was announced, gpt-4o never called, and the call
        ended DEADLINE_EXCEEDED before its deadline, the paid answer thrown away)."""
        config = default_config()
        config["reliability"] = {"min_attempt_seconds": 1.0}
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal, first_chunk_delay=0.7), model="gpt-4o-mini")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=1.6)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == refusal
        assert "not escalated to gpt-4o" in messages[-1].completion.quality.reason
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_an_escalation_without_time_to_start_before_the_time_kept_for_the_answer_is_not_made(
        self, fake: FakeProvider
    ) -> None:
        """The cheap refusal comes with between one and two reliability.min_attempt_seconds of the
        caller's deadline left: the escalated call, which ends one before the deadline to keep
        time for the answer in hand, could not start, so no Escalation is sent and the answer is
        released with the reason (one was announced, gpt-4o never called, and the answer released
        as "timed out")."""
        config = default_config()
        config["reliability"] = {"min_attempt_seconds": 1.0}
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal, first_chunk_delay=0.7), model="gpt-4o-mini")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=2.6)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == refusal
        assert "not escalated to gpt-4o: " in messages[-1].completion.quality.reason
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    @pytest.mark.parametrize("deadline", [1.0, 6.0])
    async def test_a_judge_too_slow_for_the_deadline_leaves_time_to_release_the_answer(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider, deadline: float
    ) -> None:
        """The judge hangs: its call ends reliability.min_attempt_seconds before the server's own
        end of the call (a twentieth of the time before the caller's deadline, at most 250 ms),
        so its on_failure (release) sends the paid cheap answer in time (the judge had all the
        time left, and the call ended DEADLINE_EXCEEDED with nothing; with a 6 s deadline it
        ended 0.2 s before the caller's deadline, 50 ms after the server had ended the call)."""
        fake.enqueue(Script(text="Paris is the capital."), Script(first_chunk_delay=30), model="gpt-4o-mini")
        messages = await _cascade(live_client, timeout=deadline)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == "Paris is the capital."
        quality = messages[-1].completion.quality
        assert quality.reason.startswith("judge timed out after ")
        assert quality.reason.endswith("; released as configured")
        assert [a.outcome for a in messages[-1].completion.attempts] == [
            pb.ATTEMPT_OUTCOME_COMPLETED,
            pb.ATTEMPT_OUTCOME_JUDGE,
        ]

    async def test_a_judge_without_time_to_finish_is_not_asked(self, fake: FakeProvider) -> None:
        """The cheap answer comes with less than two reliability.min_attempt_seconds of the 1.5 s
        deadline left: a judge call ending one before the deadline could not have one, so it is
        not made, and the answer is released (the judge, here a slow one, was asked, and the call
        ended DEADLINE_EXCEEDED)."""
        config = default_config()
        config["reliability"] = {"min_attempt_seconds": 0.5}
        answer, judge = Script(text="Paris is the capital.", first_chunk_delay=0.8), Script(first_chunk_delay=30)
        fake.enqueue(answer, judge, model="gpt-4o-mini")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=1.5)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == "Paris is the capital."
        assert "not asked" in messages[-1].completion.quality.reason
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_without_opting_in_nothing_is_buffered_or_scored(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """apply on_request (the default): a request that does not ask streams as before, one call."""
        messages = [m async for m in live_client.complete(user_chat("hi"), pb.RoutingContext())]
        assert list(messages[0].decision.cascade_models) == []
        assert len(fake.requests) == 1


class TestJudgeLedger:
    async def test_a_judge_call_the_provider_refuses_is_a_failed_attempt(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap answer comes, the judge's call gets a 503: the ledger records the judge's
        attempt FAILED at zero cost, not estimated (it was COMPLETED, as if the judge answered)."""
        fake.enqueue(Script(text="A fine and complete answer."), Script(status=503))
        messages = await _cascade(live_client, "say hello")
        entries = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert [(e.model, e.outcome) for e in entries[:2]] == [
            ("gpt-4o-mini", AttemptOutcome.COMPLETED),
            ("gpt-4o-mini", AttemptOutcome.FAILED),
        ]
        assert (entries[1].cost_usd, entries[1].estimated) == (Decimal(0), False)

    async def test_a_judge_call_that_finished_without_usage_is_completed(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The judge answers its score but its provider reports no usage: the ledger records the
        call COMPLETED with an estimated usage, as an answer that finished so is (it was
        INTERRUPTED, "cut after output")."""
        fake.enqueue(Script(text="Paris is the capital."), Script(text='{"score": 0.9}', omit_usage=True))
        messages = await _cascade(live_client)
        entries = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert messages[-1].completion.quality.score == 0.9
        assert [(e.outcome, e.estimated) for e in entries] == [
            (AttemptOutcome.COMPLETED, False),
            (AttemptOutcome.COMPLETED, True),
        ]


class TestCascadeVisibility:
    """The plan is in Route's decision; escalations and releases reach GetStats."""

    async def test_route_shows_the_cascade_plan(self, live_client: RouterClient) -> None:
        """Route with cascade true: the chain, its threshold, the scorer, and a reason saying so."""
        decision = await live_client.route(user_chat("hi"), pb.RoutingContext(cascade=True))
        assert (list(decision.cascade_models), list(decision.cascade_thresholds), decision.cascade_scorer) == (
            ["gpt-4o-mini", "gpt-4o"],
            [0.8],
            "min(local,llm_judge)",
        )
        assert decision.reasons[-1] == (
            "cascade: gpt-4o-mini (release at score >= 0.8), then gpt-4o; scorer min(local,llm_judge)"
        )

    async def test_a_cascade_asked_for_whose_step_cannot_serve_the_request_says_why_there_is_none(
        self, fake: FakeProvider
    ) -> None:
        """cascade true from a tenant that may not use gpt-4o: the chain's one other step is left
        out, and the decision says that this is why there is no cascade, as it says for a step the
        cost cap leaves out (it said nothing: only the candidate list named gpt-4o excluded)."""
        config = default_config()
        config["tenants"] = {"nofour": {"allowed_models": ["gpt-4o-mini", "claude-sonnet"]}}
        async with _served(config, fake) as (_server, client):
            decision = await client.route(user_chat("hi"), pb.RoutingContext(cascade=True, tenant="nofour"))
        assert (decision.model, list(decision.cascade_models)) == ("gpt-4o-mini", [])
        assert decision.reasons[-1] == "no cascade: gpt-4o left out: not allowed for tenant 'nofour'"

    async def test_a_cascade_whose_step_has_no_key_says_why_there_is_none(self) -> None:
        """Route with no provider keys: gpt-4o's provider cannot be called, so no cascade, and the
        reason names the variable to set."""
        async with Server(settings_from(default_config()), port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("hi"), pb.RoutingContext(cascade=True))
        assert list(decision.cascade_models) == []
        assert decision.reasons[-1].startswith("no cascade: gpt-4o left out: provider 'openai' has no API key")

    async def test_a_pinned_model_is_never_cascaded(self, live_client: RouterClient) -> None:
        """context.model pins gpt-4o-mini: no cascade even when asked, and the reasons say why
        (they said nothing of the cascade asked for)."""
        decision = await live_client.route(user_chat("hi"), pb.RoutingContext(cascade=True, model="gpt-4o-mini"))
        assert list(decision.cascade_models) == []
        assert decision.reasons[-1] == "no cascade: model gpt-4o-mini pinned by the request"

    async def test_a_request_offering_tools_says_why_it_is_not_cascaded(self, live_client: RouterClient) -> None:
        """Route with a tool and cascade true, routed to the chain's first model: no cascade, and
        the reasons say it is the tools (they said nothing)."""
        chat = user_chat("What is the capital of France?", tools=[pb.Tool(name="lookup")])
        decision = await live_client.route(chat, pb.RoutingContext(cascade=True))
        assert (decision.model, list(decision.cascade_models)) == ("gpt-4o-mini", [])
        assert decision.reasons[-1] == "no cascade: the request offers tools (a tool call is no answer to score)"

    async def test_a_batch_request_says_why_it_is_not_cascaded(self, live_client: RouterClient) -> None:
        """Route with realtime false and cascade true: mode batch, no cascade, and the reasons say
        it is the mode (they said nothing)."""
        decision = await live_client.route(user_chat("hi"), pb.RoutingContext(cascade=True, realtime=False))
        assert (decision.model, decision.mode, list(decision.cascade_models)) == ("gpt-4o-mini", pb.MODE_BATCH, [])
        assert decision.reasons[-1] == "no cascade: mode batch (a cascade runs in realtime only)"

    async def test_a_pinned_batch_request_says_both_reasons(self, live_client: RouterClient) -> None:
        """Pinned and batch: the one ``no cascade`` reason names both."""
        context = pb.RoutingContext(cascade=True, realtime=False, model="gpt-4o-mini")
        decision = await live_client.route(user_chat("hi"), context)
        assert decision.reasons[-1] == (
            "no cascade: model gpt-4o-mini pinned by the request; mode batch (a cascade runs in realtime only)"
        )

    async def test_a_request_not_asking_for_a_cascade_gets_no_cascade_reason(self, live_client: RouterClient) -> None:
        """With ``apply: on_request``, a pinned request that does not ask for a cascade is told
        nothing about one."""
        decision = await live_client.route(user_chat("hi"), pb.RoutingContext(model="gpt-4o-mini"))
        assert not any(reason.startswith("no cascade") for reason in decision.reasons)

    async def test_a_request_with_tools_is_never_cascaded(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """Tools and cascade true: no cascade (a tool call is no answer to score); the model's calls
        come back in one call, none to a judge."""
        fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("lookup", '{"q": "France"}'),)))
        chat = user_chat("What is the capital of France?", tools=[pb.Tool(name="lookup")])
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        assert list(messages[0].decision.cascade_models) == []
        assert [call.name for call in messages[-1].completion.tool_calls] == ["lookup"]
        assert len(fake.requests) == 1

    async def test_a_conversation_with_tool_turns_is_never_cascaded(self, live_client: RouterClient) -> None:
        """The turn after tool results, tools not offered again: still no cascade (the answer may be
        another call, and the scorers read text)."""
        call = pb.ToolCall(id="call_1", name="lookup", arguments_json='{"q": "France"}')
        chat = pb.ChatRequest(
            messages=[
                pb.Message(role=pb.ROLE_USER, content="What is the capital of France?"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="Paris"),
            ]
        )
        decision = await live_client.route(chat, pb.RoutingContext(cascade=True))
        assert list(decision.cascade_models) == []
        assert decision.reasons[-1] == (
            "no cascade: the conversation carries tool calls or results (the answer may be another call)"
        )

    async def test_stats_count_escalations_and_releases(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """One escalated and one released request: 1 escalation, 2 cascade decisions, half released."""
        fake.enqueue(Script(text="I cannot help with that."), model="gpt-4o-mini")
        await _cascade(live_client)
        fake.enqueue(Script(text="Paris"), Script(text='{"score": 1}'), model="gpt-4o-mini")
        await _cascade(live_client)
        stats = await live_client.get_stats()
        assert (stats.escalations, stats.cascade_decisions, stats.cascade_release_rate) == (1, 2, 0.5)

    async def test_an_answer_the_judge_did_not_score_has_no_score_in_the_stats(self, fake: FakeProvider) -> None:
        """The judge alone scores: an answer it scored 0.9 counts in ``mean_released_score``, one
        it gave no score for (released by its ``on_failure``, 1.0) does not, though both are
        released; with only the latter, there is no mean."""
        config = default_config()
        config["cascade"]["scorers"] = ["llm_judge"]  # type: ignore[index]
        async with _served(config, fake) as (_server, client):
            fake.enqueue(Script(text="Paris"), Script(text="no score here"), model="gpt-4o-mini")
            unscored = await _cascade(client)
            alone = await client.get_stats()
            fake.enqueue(Script(text="Paris"), Script(text='{"score": 0.9}'), model="gpt-4o-mini")
            await _cascade(client)
            stats = await client.get_stats()
        assert unscored[-1].completion.quality.reason == "judge gave no score in [0, 1]; released as configured"
        assert (alone.HasField("mean_released_score"), alone.cascade_release_rate) == (False, 1.0)
        assert (stats.mean_released_score, stats.cascade_release_rate) == (pytest.approx(0.9), 1.0)


class TestCascadeCancellation:
    """RELIABILITY 4 in a cascade: a client that leaves during the judge's call still pays for it once."""

    async def test_cancel_during_the_judge_call(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """The judge hangs; the client cancels: the judge request is aborted and both calls are in the
        ledger once, the judge's CANCELLED and estimated (it was INTERRUPTED, "cut after output")."""
        fake.enqueue(Script(text="Paris"), Script(first_chunk_delay=30), model="gpt-4o-mini")
        received: list[pb.CompleteResponse] = []

        async def read() -> None:
            async for message in live_client.complete(user_chat("hi"), pb.RoutingContext(cascade=True)):
                received.append(message)

        task = asyncio.create_task(read())
        async with asyncio.timeout(5):
            while len(fake.requests) < 2:  # noqa: ASYNC110 - the fake has no arrival event; a bounded poll
                await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        judge = fake.requests[1]
        await judge.wait_ended(2)
        assert judge.aborted
        decision_id = received[0].decision.decision_id
        async with asyncio.timeout(2):
            while len(live_server.router.ledger.entries(decision_id)) < 2:  # noqa: ASYNC110 - a bounded poll
                await asyncio.sleep(0.01)
        entries = live_server.router.ledger.entries(decision_id)
        assert [(e.attempt, e.outcome, e.estimated) for e in entries] == [
            (1, AttemptOutcome.COMPLETED, False),
            (2, AttemptOutcome.CANCELLED, True),
        ]
        assert entries[1].usage.input_tokens > 0

    async def test_cancel_before_the_judge_call_is_sent(self, fake: FakeProvider, unaccepting_port: int) -> None:
        """The judge's server never accepts the connection; the client leaves while the judge is
        connecting: the judge's call is in the ledger CANCELLED at zero cost, not estimated (it was
        FAILED, as if its provider had refused it)."""
        config = default_config()
        add_local_model(config, f"http://127.0.0.1:{unaccepting_port}/v1", "llama")
        config["cascade"]["judge"] = {"model": "llama", "timeout_seconds": 10}  # type: ignore[index]
        fake.enqueue(Script(text="Paris."), model="gpt-4o-mini")
        received: list[pb.CompleteResponse] = []
        async with _served(config, fake) as (server, client):

            async def read() -> None:
                context = pb.RoutingContext(cascade=True, task_hint="simple_qa")
                async for message in client.complete(user_chat("hi"), context):
                    received.append(message)

            task = asyncio.create_task(read())
            async with asyncio.timeout(5):
                while not (received and server.router.ledger.entries(received[0].decision.decision_id)):  # noqa: ASYNC110 - a bounded poll
                    await asyncio.sleep(0.01)
            # The answer is in the ledger; the judge is connecting (nothing tells when it starts to:
            # the margin is for a loaded machine, the judge's timeout is 10 s).
            await asyncio.sleep(0.5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            decision_id = received[0].decision.decision_id
            async with asyncio.timeout(5):
                while len(server.router.ledger.entries(decision_id)) < 2:  # noqa: ASYNC110 - a bounded poll
                    await asyncio.sleep(0.01)
            entries = server.router.ledger.entries(decision_id)
        assert [(e.model, e.outcome, e.estimated, e.cost_usd) for e in entries] == [
            ("gpt-4o-mini", AttemptOutcome.COMPLETED, False, entries[0].cost_usd),
            ("llama", AttemptOutcome.CANCELLED, False, Decimal(0)),
        ]


def _three_step_cascade(mini: float, gpt4o: float) -> dict[str, object]:
    """The default config with ``apply: always`` and the chain mini -> gpt-4o -> claude-sonnet
    (release thresholds ``mini`` and ``gpt4o``), scored by the local scorer only."""
    config = default_config()
    steps = [
        {"model": "gpt-4o-mini", "threshold": mini},
        {"model": "gpt-4o", "threshold": gpt4o},
        {"model": "claude-sonnet"},
    ]
    config["cascade"] = {"apply": "always", "scorers": ["local"], "chains": [{"steps": steps}]}
    return config


@contextlib.asynccontextmanager
async def _three_steps_with_a_breaker_open(
    fake: FakeProvider, model: str, upstream: str
) -> AsyncIterator[RouterClient]:
    """A client of a server cascading gpt-4o-mini -> gpt-4o -> claude-sonnet (0.8, 0.8; no
    fallbacks, no retries, one failure opening a model's breaker for 60 s) on which a call to
    ``model`` has failed (a 503 from ``upstream``, its name at the fake): ``model``'s breaker is open."""
    config = _three_step_cascade(0.8, 0.8)
    config["reliability"] = {"breaker": {"failure_threshold": 1, "open_seconds": 60}, "retries_per_model": 0}
    config["routing"]["fallbacks"] = {}  # type: ignore[index]
    fake.enqueue(Script(status=503), model=upstream)
    async with _served(config, fake) as (_server, client):
        with pytest.raises(grpc.aio.AioRpcError):
            [m async for m in client.complete(user_chat("hi"), pb.RoutingContext(model=model))]
        yield client


class TestCascadeConfig:
    """apply: always cascades every request whose decision starts a chain; a three-step chain escalates twice."""

    async def test_a_skipped_middle_step_takes_its_threshold_with_it(self, fake: FakeProvider) -> None:
        """mini (0.2) -> gpt-4o (0.95) -> claude-sonnet for a tenant that may not use gpt-4o: mini's
        answer is released at mini's own 0.2, not at the skipped step's 0.95."""
        config = _three_step_cascade(0.2, 0.95)
        config["tenants"] = {"acme": {"allowed_models": ["gpt-4o-mini", "claude-sonnet"]}}
        async with Server(settings_from(config, live_environ(fake)), port=0) as server:
            request = RoutingRequest(ChatRequest((Message(Role.USER, "hi"),)), RoutingContext(tenant="acme"))
            decision = await server.router.route(request)
        assert (decision.cascade_models, decision.cascade_thresholds) == (("gpt-4o-mini", "claude-sonnet"), (0.2,))
        assert decision.reasons[-1].startswith("cascade: gpt-4o-mini (release at score >= 0.2), then claude-sonnet")

    async def test_a_three_step_chain_escalates_step_by_step(self, fake: FakeProvider) -> None:
        """mini -> gpt-4o -> claude-sonnet, local scorer only: two refusals, two escalations."""
        config = _three_step_cascade(0.8, 0.8)
        refusal = Script(text="I cannot help with that.")
        fake.enqueue(refusal, model="gpt-4o-mini")
        fake.enqueue(refusal, model="gpt-4o")
        async with _served(config, fake) as (_server, client):
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext())]
        assert _kinds(messages) == ["decision", "escalation", "escalation", "delta", "completion"]
        assert [(m.escalation.from_model, m.escalation.to_model) for m in messages[1:3]] == [
            ("gpt-4o-mini", "gpt-4o"),
            ("gpt-4o", "claude-sonnet"),
        ]
        assert messages[-1].completion.model == "claude-sonnet"


class TestFailedStepsKeepTheirLimits:
    """A cascade step that fails has no answer to release: the request's limits stop the
    escalation as they stop a fallback, and the request ends with the step's own failure."""

    async def test_a_failed_step_does_not_escalate_past_max_cost(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini answers 503 twice and gpt-4o's estimate alone is over ``max_cost_usd``: not
        called, as without the cascade; UNAVAILABLE with the cheap model's error."""
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _cascade(live_client, max_cost_usd="0.001")
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    async def test_a_failed_step_the_budget_cannot_escalate_ends_with_its_failure(self, fake: FakeProvider) -> None:
        """The tenant's budget cannot take gpt-4o: the request ends UNAVAILABLE with the provider's
        error, as the same failure without a cascade does, not BUDGET_EXCEEDED (retry tomorrow)."""
        config = default_config()
        config["tenants"] = {"acme": {"daily_budget_usd": "0.001"}}
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        async with _served(config, fake) as (_server, client):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _cascade(client, "hi", tenant="acme")
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    async def test_the_last_steps_fallback_is_held_to_the_cascade_cost_cap(self, fake: FakeProvider) -> None:
        """cascade.max_cost_usd lets gpt-4o follow the cheap answer, not claude-sonnet (gpt-4o's
        configured fallback) once the cost so far is added to its estimate: gpt-4o fails, and
        claude-sonnet is not called (the cap was never checked for the last step's fallbacks); the
        cheap answer in hand is released."""
        config = default_config()
        settings = settings_from(config, live_environ(fake))
        prompt = "What is the capital of France?"
        async with Server(settings, port=0) as server:
            request = RoutingRequest(ChatRequest((Message(Role.USER, prompt),)), RoutingContext(cascade=True))
            decision = await server.router.route(request)
        catalog = settings.catalog
        cheap = cost_of_usage(catalog.get("gpt-4o-mini"), Usage(input_tokens=24_000, output_tokens=6))
        gpt4o, claude = (estimated_cost(catalog.get(m), decision) for m in ("gpt-4o", "claude-sonnet"))
        cap = claude + cheap / 2  # claude-sonnet alone fits; after the cheap answer it does not
        assert cheap + gpt4o <= cap  # the escalation to gpt-4o fits
        config["cascade"]["max_cost_usd"] = str(cap)  # type: ignore[index]
        refusal = Script(text="I cannot help with that.", input_tokens=24_000, output_tokens=6)
        fake.enqueue(refusal, model="gpt-4o-mini")
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client, prompt)
        assert messages[-1].completion.quality.reason.endswith(
            "escalation to gpt-4o failed (PROVIDER_UNAVAILABLE), released"
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o", "gpt-4o"]

    async def test_the_last_step_never_falls_back_to_a_step_it_rejected(self, fake: FakeProvider) -> None:
        """mini -> gpt-4o -> claude-sonnet with the default fallbacks (claude-sonnet: [gpt-4o]): both
        refusals are escalated, claude-sonnet fails, and gpt-4o, already rejected, is not asked
        again to answer unscored: its answer in hand is released."""
        refusal = Script(text="I cannot help with that.")
        fake.enqueue(refusal, model="gpt-4o-mini")
        fake.enqueue(refusal, refusal, model="gpt-4o")
        fake.enqueue(Script(status=503), Script(status=503), model="claude-sonnet-4-6")
        async with (
            Server(settings_from(_three_step_cascade(0.8, 0.8), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext())]
        assert messages[-1].completion.model == "gpt-4o"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-6", "claude-sonnet-4-6"]

    async def test_a_cut_step_that_cannot_escalate_is_not_reported_committed(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap step's buffered stream is cut after 30 chunks, and so is its retry; the cost
        cap stops its fallback and the escalation: nothing reached the client, so the error is an
        uncommitted UNAVAILABLE (safe to retry), not STREAM_INTERRUPTED with 30 chunks "sent".
        (The cap is above the least the cheap step could cost plus gpt-4o's estimate, so the
        cascade is planned, and below what the two cut attempts did cost plus that estimate.)"""
        cut = Script(chunk_count=40, fault=Fault.CUT, fault_after=30)
        fake.enqueue(cut, cut, model="gpt-4o-mini")
        got: list[pb.CompleteResponse] = []

        async def complete() -> None:
            context = pb.RoutingContext(cascade=True, max_cost_usd="0.0052")
            async for message in live_client.complete(user_chat("What is the capital of France?"), context):
                got.append(message)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await complete()
        info = error_info(caught.value)
        assert [m.WhichOneof("event") for m in got] == ["decision"]
        assert (caught.value.code(), info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
        assert "committed" not in info.metadata or info.metadata["committed"] != "true"
        assert caught.value.details().endswith("mid-answer (nothing was sent)")
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    @pytest.mark.parametrize("fault", [Fault.CUT, Fault.ERROR_EVENT], ids=["cut", "in-band error"])
    async def test_a_step_that_fails_mid_answer_is_retried_and_only_the_retry_is_sent(
        self, live_client: RouterClient, fake: FakeProvider, fault: Fault
    ) -> None:
        """The cheap step's stream fails after 3 chunks: nothing was sent, so it is retried on the
        same model, as a failure before the first chunk is (it escalated at once, and under a cost
        cap that stops the escalation the request failed after one call); the retry's answer is
        released, and the client gets its text alone, not the failed attempt's before it (scored
        locally: the cap stops the escalation, so no judge is asked)."""
        fake.enqueue(
            Script(text="Lyon Lyon Lyon Lyon", chunk_count=4, fault=fault, fault_after=3),
            Script(text="Paris is the capital of France.", output_tokens=500),
            model="gpt-4o-mini",
        )
        # Planned as a cascade (the least the cheap step can cost plus gpt-4o's estimate is within
        # it), stopped by what the answer did cost.
        context = {"max_cost_usd": "0.0053"}
        messages = await _cascade(live_client, **context)
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == "Paris is the capital of France."
        assert completion.model == "gpt-4o-mini"
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_FAILED),
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
        ]
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"] * 2

    async def test_a_retry_that_answers_no_text_is_scored_as_empty_not_as_the_cut_attempts_text(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap step's stream is cut after 3 chunks and its retry answers with no text at
        all: the step's answer is the retry's, empty, which the local scorer rejects, so the
        request escalates; the cut attempt's text is never released (it was, scored 1.0, under
        the retry's completion)."""
        fake.enqueue(Script(chunk_count=6, fault=Fault.CUT, fault_after=3), Script(chunks=()), model="gpt-4o-mini")
        fake.enqueue(Script(text="the strong model's answer"), model="gpt-4o")
        messages = await _cascade(live_client, "Say hello")
        [escalation] = [m.escalation for m in messages if m.WhichOneof("event") == "escalation"]
        completion = messages[-1].completion
        assert (escalation.from_model, escalation.to_model, escalation.quality.score) == ("gpt-4o-mini", "gpt-4o", 0.0)
        assert _text(messages) == "the strong model's answer"
        assert completion.model == "gpt-4o"
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_FAILED),
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_ESCALATED),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_COMPLETED),
        ]

    async def test_an_escalation_reports_the_usage_of_a_cut_step(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap stream is cut after 30 chunks and its retry refuses: the escalation carries
        both attempts' usage next to their cost (the cut one's estimated), as the completion's
        attempt list does."""
        fake.enqueue(
            Script(chunk_count=40, fault=Fault.CUT, fault_after=30),
            Script(text="I cannot help with that."),
            model="gpt-4o-mini",
        )
        messages = await _cascade(live_client)
        [escalation] = [m.escalation for m in messages if m.WhichOneof("event") == "escalation"]
        cheap = [a for a in messages[-1].completion.attempts if a.model == "gpt-4o-mini"]
        assert [a.outcome for a in cheap][:2] == [pb.ATTEMPT_OUTCOME_FAILED, pb.ATTEMPT_OUTCOME_ESCALATED]
        assert cheap[0].usage.output_tokens > 0
        assert Decimal(escalation.cost_usd) == sum(Decimal(a.cost_usd) for a in cheap) > 0
        assert (escalation.usage.input_tokens, escalation.usage.output_tokens) == (
            sum(a.usage.input_tokens for a in cheap if a.outcome != pb.ATTEMPT_OUTCOME_JUDGE),
            sum(a.usage.output_tokens for a in cheap if a.outcome != pb.ATTEMPT_OUTCOME_JUDGE),
        )


class TestAJudgeThatCannotBeAsked:
    @pytest.mark.parametrize(
        ("on_failure", "answered_by", "verb"),
        [("release", "gpt-4o-mini", "released"), ("escalate", "gpt-4o", "escalated")],
    )
    async def test_a_judge_the_tenant_may_not_use_is_not_asked_and_its_on_failure_applies(
        self, fake: FakeProvider, on_failure: str, answered_by: str, verb: str
    ) -> None:
        """The judge is on claude-sonnet and tenant acme may use only the OpenAI models: the
        request and the cheap answer are not sent to the judge; its ``on_failure`` applies (the
        answer released, or escalated to gpt-4o), the quality reason saying why."""
        config = default_config()
        config["cascade"]["judge"] = {"model": "claude-sonnet", "on_failure": on_failure}  # type: ignore[index]
        config["tenants"] = {"acme": {"allowed_models": ["gpt-4o-mini", "gpt-4o"]}}
        fake.set_default(Script(text="Paris is the capital."))
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, tenant="acme")
        completion = messages[-1].completion
        escalations = [m.escalation for m in messages if m.HasField("escalation")]
        quality = escalations[0].quality if escalations else completion.quality
        assert (completion.model, len(escalations)) == (answered_by, 1 if on_failure == "escalate" else 0)
        assert quality.reason == f"judge claude-sonnet not asked (not allowed for tenant 'acme'); {verb} as configured"
        assert {request.path for request in fake.requests} == {"/v1/chat/completions"}

    async def test_a_judge_without_a_key_applies_its_on_failure_and_the_cascade_still_runs(
        self, fake: FakeProvider
    ) -> None:
        """The judge is on claude-sonnet and ANTHROPIC_API_KEY is not set: the cascade still runs
        with the local scorer; the judge's ``on_failure`` (release) applies, and the quality
        reason says why; the start logs it once."""
        config = default_config()
        config["cascade"]["judge"]["model"] = "claude-sonnet"  # type: ignore[index]
        environ = {"OPENAI_API_KEY": "sk-test-openai", "OPENAI_BASE_URL": fake.openai_base_url}
        fake.enqueue(Script(text="Paris is the capital."), model="gpt-4o-mini")
        with capture_logs() as logs:
            async with (
                Server(settings_from(config, environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                messages = await _cascade(client)
        assert list(messages[0].decision.cascade_models) == ["gpt-4o-mini", "gpt-4o"]
        quality = messages[-1].completion.quality
        assert quality.score == 1.0
        assert "judge claude-sonnet not asked (" in quality.reason
        assert "ANTHROPIC_API_KEY" in quality.reason
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
        assert [e["judge"] for e in logs if e["event"] == "cascade_judge_unavailable"] == ["claude-sonnet"]


def _judged_by_llama(fake: FakeProvider, **breaker: object) -> dict[str, object]:
    """The default config with the judge on a local model ``llama`` served by the fake, and
    ``breaker`` as ``reliability.breaker``."""
    config = default_config()
    add_local_model(config, fake.openai_base_url, "llama")
    config["cascade"]["judge"] = {"model": "llama", "timeout_seconds": 2}  # type: ignore[index]
    config["reliability"]["breaker"] = breaker  # type: ignore[index]
    return config


class TestTheJudgesCircuitBreaker:
    """The judge's calls go through the router's per-model circuit breakers, counted as an LLM
    classifier's are."""

    async def test_a_failing_judge_opens_its_breaker_and_is_then_not_asked(self, fake: FakeProvider) -> None:
        """The judge answers 503 twice (failure_threshold 2): its breaker opens, and the third
        request's judge is not asked (it was, and paid, on every request) and its on_failure
        (release) applies at once, the reason saying why."""
        config = _judged_by_llama(fake, failure_threshold=2, open_seconds=60)
        fake.set_default(Script(text="Paris is the capital."))
        fake.enqueue(Script(status=503), Script(status=503), Script(status=503), model="llama")
        async with _served(config, fake) as (server, client):
            reasons = [(await _cascade(client))[-1].completion.quality.reason for _ in range(3)]
            retry_in = server.router.breakers.retry_in("llama")
        assert reasons == [
            "judge failed (PROVIDER_UNAVAILABLE); released as configured",
            "judge failed (PROVIDER_UNAVAILABLE); released as configured",
            "judge llama not asked (circuit breaker open for model llama); released as configured",
        ]
        assert [r.model for r in fake.requests].count("llama") == 2
        assert retry_in > 0

    async def test_judge_answers_without_a_score_or_timeouts_are_no_verdict(self, fake: FakeProvider) -> None:
        """A judge that answers prose (no score) or is ended by its own timeout, again and again,
        leaves its breaker closed (failure_threshold 1): neither is a failure of its model."""
        config = _judged_by_llama(fake, failure_threshold=1, open_seconds=60)
        config["cascade"]["judge"]["timeout_seconds"] = 0.5  # type: ignore[index]
        fake.set_default(Script(text="Paris is the capital."))
        fake.enqueue(Script(text="fine"), Script(first_chunk_delay=5), Script(text="fine"), model="llama")
        async with _served(config, fake) as (server, client):
            for _ in range(3):
                await _cascade(client)
            allowed = server.router.breakers.allow("llama") is not None
        assert [r.model for r in fake.requests].count("llama") == 3
        assert allowed


class TestAnOutputLimitIsNoReasonToEscalate:
    """Every step of a cascade is held to the request's output limit (its max_output_tokens, or
    limits.default_output_tokens), so an answer cut at that limit would be cut there again."""

    async def test_an_answer_cut_at_the_requests_output_limit_is_released(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap answer stops at the request's 8 tokens (finish_reason length): it is released
        as it is, with the local scorer's 0.2 and a reason saying why it was not escalated; gpt-4o
        and the judge are not called (gpt-4o was, held to the same 8 tokens, and cut there too)."""
        cut = Script(text="Paris is the capital of", finish_reason="length", output_tokens=8)
        fake.enqueue(cut, model="gpt-4o-mini")
        chat = user_chat("Name the capital of France and describe it.", max_output_tokens=8)
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        assert _kinds(messages) == ["decision", "delta", "completion"]
        completion = messages[-1].completion
        assert (completion.model, completion.finish_reason) == ("gpt-4o-mini", pb.FINISH_REASON_LENGTH)
        assert (completion.quality.score, completion.quality.scorer) == (0.2, "local")
        assert completion.quality.reason == (
            "truncated (finish_reason length); not escalated to gpt-4o: the answer reached the request's"
            " output limit (8 tokens), which gpt-4o is held to as well (so the judge was not asked)"
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]

    async def test_an_empty_answer_cut_at_the_limit_still_escalates(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A length stop with no answer text (a reasoning model that spent the limit thinking) is
        no answer: the next model, which may answer within the limit, is asked."""
        fake.enqueue(Script(text="", chunks=(), finish_reason="length", output_tokens=8), model="gpt-4o-mini")
        chat = user_chat("Name the capital of France.", max_output_tokens=8)
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert messages[-1].completion.model == "gpt-4o"

    async def test_an_answer_cut_after_reasoning_still_escalates(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap model reasons, then writes a few words and is cut at the request's 64 tokens:
        the limit went to its reasoning, so gpt-4o, which may answer whole within it, is asked (the
        cut answer was released, gpt-4o never asked)."""
        thinking = tuple(f"thinking step {i}. " for i in range(20))
        cut = Script(reasoning=thinking, text="The capital of", finish_reason="length", output_tokens=64)
        fake.enqueue(cut, model="gpt-4o-mini")
        fake.enqueue(Script(text="The capital of France is Paris."), model="gpt-4o")
        chat = user_chat("What is the capital of France?", max_output_tokens=64)
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert messages[1].escalation.quality.reason == "truncated (finish_reason length)"
        assert (_text(messages), messages[-1].completion.model) == ("The capital of France is Paris.", "gpt-4o")

    async def test_an_answer_whose_emoji_came_split_across_chunks_did_not_reason(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cheap model sends no reasoning, only text in which a flag's surrogate pairs come
        split across chunks (a chunk held back whole is a chunk without text), and is cut at the
        request's 64 tokens: the rule applies, it is released and gpt-4o is not asked (it was,
        held to the same limit and cut there too)."""
        chunks = ("The capital is Paris ", "\ud83c", "\uddeb", "\ud83c", "\uddf7 and it is a city of")
        fake.enqueue(Script(chunks=chunks, finish_reason="length", output_tokens=64), model="gpt-4o-mini")
        chat = user_chat("What is the capital of France?", max_output_tokens=64)
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(cascade=True))]
        assert _kinds(messages)[0] == "decision"
        assert "escalation" not in _kinds(messages)
        answer = "The capital is Paris \U0001f1eb\U0001f1f7 and it is a city of"
        assert (_text(messages), messages[-1].completion.model) == (answer, "gpt-4o-mini")
        reason = messages[-1].completion.quality.reason
        assert "not escalated to gpt-4o: the answer reached the request's output limit" in reason
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]


class TestAnEscalationThatCannotBeServed:
    """The answer in hand is not given up for an escalation that cannot answer."""

    async def test_an_escalation_into_open_breakers_is_not_made_nor_judged(self, fake: FakeProvider) -> None:
        """gpt-4o's breaker is open (one 503 with failure_threshold 1; it has no fallback here):
        the cheap answer is released with a reason saying why it was not escalated, and the judge,
        whose verdict could change nothing, is not asked (it was, and paid, and its 0.5 escalated
        into the breaker: UNAVAILABLE, the paid answer thrown away)."""
        config = default_config()
        config["reliability"]["breaker"] = {"failure_threshold": 1, "open_seconds": 60}  # type: ignore[index]
        config["reliability"]["retries_per_model"] = 0  # type: ignore[index]
        config["routing"]["fallbacks"] = {"gpt-4o-mini": ["gpt-4o"]}  # type: ignore[index]
        fake.enqueue(Script(status=503), model="gpt-4o")
        async with _served(config, fake) as (server, client):
            with pytest.raises(grpc.aio.AioRpcError):
                [m async for m in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o"))]
            assert server.router.breakers.retry_in("gpt-4o") > 0
            fake.enqueue(Script(text="Lyon, maybe."), Script(text='{"score": 0.5}'), model="gpt-4o-mini")
            before = len(fake.requests)
            messages = await _cascade(client)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert _text(messages) == "Lyon, maybe."
        quality = messages[-1].completion.quality
        assert quality.reason == (
            "no problem found; not escalated to gpt-4o: circuit breaker open for model gpt-4o"
            " (so the judge was not asked)"
        )
        assert [r.model for r in fake.requests[before:]] == ["gpt-4o-mini"]

    async def test_a_middle_step_behind_an_open_breaker_is_passed_over(self, fake: FakeProvider) -> None:
        """In gpt-4o-mini -> gpt-4o -> claude-sonnet, gpt-4o's breaker is open: the cheap answer
        rejected (a refusal) escalates straight to claude-sonnet."""
        async with _three_steps_with_a_breaker_open(fake, "gpt-4o", "gpt-4o") as client:
            fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
            messages = await _cascade(client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert messages[1].escalation.to_model == "claude-sonnet"
        assert messages[-1].completion.model == "claude-sonnet"

    async def test_an_escalation_that_fails_before_any_text_releases_the_answer_in_hand(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """The judge scores the cheap answer 0.6: an Escalation to gpt-4o is sent; gpt-4o, its
        retry and its fallback claude-sonnet fail before any text. Nothing of theirs reached the
        client, so the cheap answer, paid and judged, is released after the Escalation (the call
        failed UNAVAILABLE, the answer thrown away), with a reason saying so; every call charged."""
        fake.enqueue(Script(text="Paris, I think."), Script(text='{"score": 0.6}'), model="gpt-4o-mini")
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o")
        fake.enqueue(Script(status=529), Script(status=529), model="claude-sonnet-4-6")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert _text(messages) == "Paris, I think."
        completion = messages[-1].completion
        assert completion.model == "gpt-4o-mini"
        assert (completion.quality.score, completion.quality.scorer) == (0.6, "llm_judge")
        assert completion.quality.reason == (
            "judge gpt-4o-mini scored it; escalation to gpt-4o failed (PROVIDER_UNAVAILABLE), released"
        )
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_JUDGE),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_FAILED),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_FAILED),
            ("claude-sonnet", pb.ATTEMPT_OUTCOME_FAILED),
        ]
        entries = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)
        stats = await live_client.get_stats()
        assert (stats.cascade_decisions, stats.cascade_release_rate, stats.mean_released_score) == (1, 1.0, 0.6)

    async def test_a_middle_step_that_fails_with_nowhere_to_go_releases_the_answer_in_hand(
        self, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini -> gpt-4o -> claude-sonnet with claude-sonnet's breaker open: the cheap
        refusal escalates to gpt-4o, which fails (503) and cannot escalate further; the refusal in
        hand is released, its reason saying so (the call failed with gpt-4o's error)."""
        async with _three_steps_with_a_breaker_open(fake, "claude-sonnet", "claude-sonnet-4-6") as client:
            refusal = "I'm sorry, but I can't help with that."
            fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
            fake.enqueue(Script(status=503), model="gpt-4o")
            messages = await _cascade(client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert (_text(messages), messages[-1].completion.model) == (refusal, "gpt-4o-mini")
        assert messages[-1].completion.quality.reason == (
            "refusal; escalation to gpt-4o failed (PROVIDER_UNAVAILABLE), released"
        )

    @pytest.mark.parametrize(("status", "reason"), [(401, "PROVIDER_AUTH_FAILED"), (400, "PROVIDER_REJECTED")])
    async def test_a_middle_step_rejecting_the_call_releases_the_answer_in_hand(
        self, fake: FakeProvider, status: int, reason: str
    ) -> None:
        """gpt-4o-mini -> gpt-4o -> claude-sonnet: the cheap refusal escalates to gpt-4o, which
        refuses the call (a revoked key, a 400) before any text, an error claude-sonnet is not
        tried past; the refusal in hand is released, as a 2-step chain releases it (the call
        ended with gpt-4o's error after the Escalation, the paid answer thrown away)."""
        config = _three_step_cascade(0.8, 0.8)
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
        fake.enqueue(Script(status=status), Script(status=status), model="gpt-4o")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client)
            entries = server.router.ledger.entries(messages[0].decision.decision_id)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == (refusal, "gpt-4o-mini")
        assert completion.quality.reason == f"refusal; escalation to gpt-4o failed ({reason}), released"
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o"]
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)

    async def test_an_escalation_that_hangs_releases_the_answer_in_hand_before_the_deadline(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """The judge scores the cheap answer 0.5; gpt-4o accepts the call and sends nothing. Its
        call ends reliability.min_attempt_seconds before the caller's 2 s deadline, so the cheap
        answer, paid and judged, is released in time, the hung call charged its estimated input
        (it ran to the deadline: DEADLINE_EXCEEDED after the Escalation, the answer thrown away)."""
        fake.enqueue(Script(text="Lyon, maybe."), Script(text='{"score": 0.5}'), model="gpt-4o-mini")
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS), model="gpt-4o")
        messages = await _cascade(live_client, timeout=2.0)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert completion.quality.reason == "judge gpt-4o-mini scored it; escalation to gpt-4o timed out, released"
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_JUDGE),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_FAILED),
        ]
        entries = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert (entries[-1].model, entries[-1].estimated) == ("gpt-4o", True)
        assert entries[-1].cost_usd > 0
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)

    async def test_the_judge_of_an_answer_that_would_be_kept_ends_when_an_escalation_still_can_start(
        self, fake: FakeProvider
    ) -> None:
        """An escalation from an answer that would be kept needs twice min_attempt_seconds (1 s
        here) left before the server's end of the 4 s call (3.8 s), so the judge's call ends 2 s
        before it: the judge answering only 2.3 s in is cut at 1.8 s, on_failure releases the
        answer (it ran to 2.8 s, was paid, and its 0.1 changed nothing: `not escalated to gpt-4o:
        N s of the deadline left`)."""
        config = default_config()
        config["reliability"]["min_attempt_seconds"] = 1.0  # type: ignore[index]
        slow_verdict = Script(text='{"score": 0.1}', first_chunk_delay=2.3)
        fake.enqueue(Script(text="Lyon, maybe."), slow_verdict, model="gpt-4o-mini")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client, timeout=4.0)
            entries = server.router.ledger.entries(messages[0].decision.decision_id)
        assert _kinds(messages) == ["decision", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        reason = completion.quality.reason
        assert reason.startswith("judge timed out after ")
        assert reason.endswith("; released as configured")
        assert [(e.model, e.outcome) for e in entries] == [
            ("gpt-4o-mini", AttemptOutcome.COMPLETED),
            ("gpt-4o-mini", AttemptOutcome.INTERRUPTED),
        ]
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini"]

    @pytest.mark.parametrize(("min_attempt", "timeout"), [(1.0, 4.0), (0.2, 2.0)])
    async def test_a_judge_cut_by_the_deadline_with_on_failure_escalate_escalates(
        self, fake: FakeProvider, min_attempt: float, timeout: float
    ) -> None:
        """The judge's call of an answer that would be kept ends twice min_attempt_seconds (1 s,
        and the default 0.2 s) before the server's end of the call, the time the escalation needs:
        a judge cut there with `on_failure: escalate` escalates, and gpt-4o answers (its verdict
        was refused by the moments since the cut, `not escalated to gpt-4o: 1.997 s of the
        deadline left`, the judge paid and ignored; at 0.2 s by floating point, the deadline less
        the cut coming out a hair under 0.4 s; and an escalation let through was then refused its
        start, `escalation to gpt-4o timed out, released`, no call made)."""
        config = default_config()
        config["reliability"]["min_attempt_seconds"] = min_attempt  # type: ignore[index]
        config["cascade"]["judge"]["on_failure"] = "escalate"  # type: ignore[index]
        slow_verdict = Script(text='{"score": 0.9}', first_chunk_delay=3.0)
        fake.enqueue(Script(text="Lyon, maybe."), slow_verdict, model="gpt-4o-mini")
        fake.enqueue(Script(text="Paris."), model="gpt-4o")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client, timeout=timeout)
            entries = server.router.ledger.entries(messages[0].decision.decision_id)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        quality = messages[1].escalation.quality
        assert quality.reason.startswith("judge timed out after ")
        assert quality.reason.endswith("; escalated as configured")
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == ("Paris.", "gpt-4o")
        assert [(e.model, e.outcome) for e in entries] == [
            ("gpt-4o-mini", AttemptOutcome.COMPLETED),
            ("gpt-4o-mini", AttemptOutcome.INTERRUPTED),
            ("gpt-4o", AttemptOutcome.COMPLETED),
        ]

    async def test_judges_cut_together_on_a_busy_server_all_escalate_and_are_answered(self, fake: FakeProvider) -> None:
        """40 cascaded calls at once on one server, each judge (gpt-4o) hanging until its cut with
        `on_failure: escalate`, all cut at the same moment: the event loop gets back to them tens of
        ms late, which is not counted against the escalation (only waits for the tenant's budget
        are), so each escalates, claude-sonnet called and answering. (Counted, up to 20 ms
        forgiven, it refused most of them, `not escalated to claude-sonnet: 0.38x s of the deadline
        left`, the judge paid and its verdict ignored, and announced some it then never called,
        `escalation to claude-sonnet timed out, released`.)"""
        calls = 40
        config = default_config()
        config["reliability"]["min_attempt_seconds"] = 1.0  # type: ignore[index]
        config["reliability"]["max_concurrent_rpcs"] = 100  # type: ignore[index]
        config["cascade"]["judge"]["on_failure"] = "escalate"  # type: ignore[index]
        config["cascade"]["judge"]["model"] = "gpt-4o"  # type: ignore[index]
        config["cascade"]["chains"] = [  # type: ignore[index]
            {"steps": [{"model": "gpt-4o-mini", "threshold": 0.8}, {"model": "claude-sonnet"}]}
        ]
        fake.enqueue(*[Script(text="Lyon, maybe.")] * calls, model="gpt-4o-mini")
        fake.enqueue(*[Script(fault=Fault.HANG_BEFORE_HEADERS)] * calls, model="gpt-4o")
        fake.enqueue(*[Script(text="Paris.")] * calls, model="claude-sonnet-4-6")
        async with _served(config, fake) as (_server, client):
            answers = await asyncio.gather(*[_cascade(client, timeout=4.0) for _ in range(calls)])
        outcomes = [
            (_kinds(messages), _text(messages), messages[-1].completion.model, messages[-1].completion.quality.reason)
            for messages in answers
        ]
        assert outcomes == [(["decision", "escalation", "delta", "completion"], "Paris.", "claude-sonnet", "")] * calls
        assert [r.model for r in fake.requests].count("claude-sonnet-4-6") == calls

    @pytest.mark.parametrize("reply_delay", [0.15, 0.262, 0.27, 0.278])
    async def test_with_a_slow_shared_store_an_escalation_announced_is_made_with_its_time(
        self, fake: FakeProvider, tmp_path: Path, reply_delay: float
    ) -> None:
        """Redis (the tenant's budget) answers each command `reply_delay` s late; the judge hangs
        (`on_failure: escalate`, min_attempt_seconds 1, a 4 s call) and gpt-4o's first text takes
        0.5 s. Either the escalation is made, gpt-4o started with its min_attempt_seconds and
        answers, or it is not announced and the answer in hand is released, saying why (it was
        announced, then gpt-4o called with a sliver of its time, or not at all, the round trips
        to Redis after the time was checked eating it: `escalation to gpt-4o timed out, released`)."""
        messages = await _judged_on_a_slow_store(
            fake, tmp_path, reply_delay, min_attempt_seconds=1.0, first_text_delay=0.5, timeout=4.0
        )
        _assert_escalated_or_released(messages, fake)

    @pytest.mark.parametrize("reply_delay", [0.1, 0.12, 0.2])
    async def test_with_a_slow_shared_store_and_the_default_min_attempt_the_caller_always_gets_an_answer(
        self, fake: FakeProvider, tmp_path: Path, reply_delay: float
    ) -> None:
        """Redis (the tenant's budget) answers each command `reply_delay` s late, the default
        min_attempt_seconds (0.2), a 4 s call; the judge hangs (`on_failure: escalate`), gpt-4o's
        first text takes 50 ms. The judge's call ends at its end, its hold in the budget included,
        and the escalation's hold waits only the time it has: the caller gets gpt-4o's answer or,
        not escalated, the answer in hand with the reason. (The judge ran its hold's round trips
        past its end, that overrun not counted, and the escalation's hold then ran past the
        server's end of the call: DEADLINE_EXCEEDED after the decision, the paid answer never
        sent.)"""
        messages = await _judged_on_a_slow_store(fake, tmp_path, reply_delay, first_text_delay=0.05, timeout=4.0)
        _assert_escalated_or_released(messages, fake)

    async def test_a_judges_hold_in_a_slow_shared_store_comes_out_of_its_time(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """Redis (the tenant's budget) answers each command 0.5 s late; the judge hangs
        (`on_failure: release`, the default min_attempt_seconds, an 8 s call). Its call ends at its
        end, the round trips of its hold in the budget included, and the answer is released. (It
        was given its time after the hold, ran those round trips past its end and past the
        server's end of the call: DEADLINE_EXCEEDED, the paid answer never sent.)"""
        messages = await _judged_on_a_slow_store(fake, tmp_path, 0.5, on_failure="release", timeout=8.0)
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert completion.quality.reason.startswith("judge timed out after ")

    async def test_a_judges_hold_in_a_store_that_stops_answering_ends_within_the_judges_time(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """Redis (the tenant's budget) answers the call's admission, then each reply 0.95 s late
        (within its 1 s timeout), from before the cheap answer (2 s in) is scored, so the judge's
        hold would end past the server's end of the 4 s call: the hold is cut when the judge's
        time is up, the judge not asked, and the answer is released as configured, saying why
        (the hold ran on: DEADLINE_EXCEEDED, the paid answer never sent)."""
        with running_redis(tmp_path) as url:
            async with _Proxy(url) as proxy:
                config = default_config()
                config["shared_state"] = {"redis_url": proxy.url}
                config["tenants"] = {"acme": {"daily_budget_usd": "100"}}
                fake.enqueue(Script(text="Lyon, maybe.", first_chunk_delay=2.0), model="gpt-4o-mini")
                async with _served(config, fake) as (_server, client):
                    context = pb.RoutingContext(cascade=True, tenant="acme")
                    prompt = user_chat("What is the capital of France?")
                    call = client.complete(prompt, context, timeout=4.0)
                    first = await anext(call)
                    await until(lambda: len(fake.requests) == 1)
                    proxy.delay = 0.95
                    messages = [first, *[m async for m in call]]
                    proxy.hurry()
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert "not asked (the tenant's budget store did not answer within the " in completion.quality.reason

    async def test_the_check_before_scoring_waits_for_a_slow_shared_store_only_while_the_answer_can_be_released(
        self, fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The cheap answer comes 1 s into a 4 s call (the server ends it at 3.8 s), then Redis (the
        tenant's budget) answers each reply 3 s late: the check before scoring, whether the budget
        could take gpt-4o, waits only until the answer must be released, and the answer is
        released, not escalated, saying why; the judge is not asked, and the budget settles to what
        was paid. (The check waited for the store to ~4 s: DEADLINE_EXCEEDED after the decision,
        the cheap answer paid and never sent.) The answer comes early enough that a loaded
        machine's lateness leaves the check its time, so only the store's silence can stop it (the
        store client's own 1 s limit on a reply raised to 5 s, or it would cut the read first)."""
        monkeypatch.setattr(redis_admission, "_TIMEOUT_SECONDS", 5.0)
        config = default_config()
        fake.enqueue(Script(text="Lyon, maybe.", first_chunk_delay=1.0), model="gpt-4o-mini")
        messages, budget = await _on_a_store_slowed_mid_call(fake, tmp_path, config, requests=1, reply_delay=3.0)
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert re.fullmatch(
            r"no problem found; not escalated to gpt-4o: the tenant's budget store did not answer within the"
            r" [0-9.]+ s left for it \(so the judge was not asked\)",
            completion.quality.reason,
        )
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
        assert budget == (Decimal(0), Decimal(completion.cost_usd))

    async def test_a_fallback_of_an_escalation_is_not_waited_for_on_a_slow_shared_store_past_the_answers_release(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """The cheap answer is judged 0.1 and escalated to gpt-4o at once; Redis (the tenant's
        budget) then answers each reply 0.9 s late, and gpt-4o fails (503, no retry) 3 s in, with
        the server's end of the 4 s call at 3.8 s: its fallback claude-sonnet's hold in the budget
        is waited for only while claude-sonnet could still start, then the fallback is skipped and
        the answer in hand released, saying why; the budget settles to what was paid. (The hold
        waited for the store to ~4 s: DEADLINE_EXCEEDED after the Escalation, the cheap answer and
        the judge paid, and the answer never sent.)"""
        config = default_config()
        config["reliability"]["retries_per_model"] = 0  # type: ignore[index]
        fake.enqueue(Script(text="Lyon, maybe."), Script(text='{"score": 0.1}'), model="gpt-4o-mini")
        fake.enqueue(Script(status=503, first_chunk_delay=3.0), model="gpt-4o")
        fake.enqueue(Script(text="Paris."), model="claude-sonnet-4-6")
        messages, budget = await _on_a_store_slowed_mid_call(fake, tmp_path, config, requests=3, reply_delay=0.9)
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert completion.quality.reason.endswith("; escalation to gpt-4o failed (PROVIDER_UNAVAILABLE), released")
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
        assert budget == (Decimal(0), Decimal(completion.cost_usd))

    async def test_a_judge_is_not_asked_when_its_hold_in_a_slow_shared_store_leaves_it_less_than_min_attempt(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """min_attempt_seconds 0.5: the cheap answer comes 1.35 s into a 4 s call, then Redis (the
        tenant's budget) answers each reply 0.6 s late, so the judge, whose calls end 1 s before
        the server's end (3.8 s), has ~0.85 s when its hold starts: the hold is cut once 0.5 s is
        all that is left, the judge not asked, and the answer released as configured, saying why;
        the budget settles to the answer alone. (The hold ran its round trip, and the judge was
        asked with ~0.2 s, timed out and was paid for no verdict.)"""
        config = default_config()
        config["reliability"]["min_attempt_seconds"] = 0.5  # type: ignore[index]
        config["cascade"]["judge"]["on_failure"] = "release"  # type: ignore[index]
        hanging_verdict = Script(text='{"score": 0.9}', first_chunk_delay=5.0)
        fake.enqueue(Script(text="Lyon, maybe.", first_chunk_delay=1.35), hanging_verdict, model="gpt-4o-mini")
        messages, budget = await _on_a_store_slowed_mid_call(fake, tmp_path, config, requests=1, reply_delay=0.6)
        completion = messages[-1].completion
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert completion.quality.reason.startswith("judge gpt-4o-mini not asked (")
        assert completion.quality.reason.endswith("); released as configured")
        assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
        assert [a.outcome for a in completion.attempts] == [pb.ATTEMPT_OUTCOME_COMPLETED]
        assert budget == (Decimal(0), Decimal(completion.cost_usd))

    async def test_an_escalated_answer_that_has_started_streams_to_the_deadline(self, fake: FakeProvider) -> None:
        """With an answer in hand, only gpt-4o's first text must come min_attempt_seconds (1 s
        here) before the deadline: it does (0.5 s into the 4 s call), and its answer, still
        streaming past that point, ends before the deadline and reaches the caller whole (it was
        cut there, DEADLINE_EXCEEDED after part of it was sent, though the answer in hand could
        no longer be released)."""
        config = default_config()
        config["reliability"]["min_attempt_seconds"] = 1.0  # type: ignore[index]
        fake.enqueue(Script(text="Lyon, maybe."), Script(text='{"score": 0.5}'), model="gpt-4o-mini")
        words = tuple(f"w{i} " for i in range(8))  # the last ~3.3 s in: after 2.8 s, before 3.8 s
        fake.enqueue(Script(chunks=words, first_chunk_delay=0.5, chunk_delay=0.4), model="gpt-4o")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client, timeout=4.0)
            entries = server.router.ledger.entries(messages[0].decision.decision_id)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == ("".join(words), "gpt-4o")
        assert [(e.model, e.outcome) for e in entries][-1] == ("gpt-4o", AttemptOutcome.COMPLETED)
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)

    async def test_with_min_attempt_seconds_0_an_escalation_that_hangs_still_releases_the_answer_in_hand(
        self, fake: FakeProvider
    ) -> None:
        """reliability.min_attempt_seconds 0 still keeps a little time (50 ms) before the server's
        end of the 2 s call for a release: gpt-4o hangs, and the refusal in hand is released (it
        ran to the end, DEADLINE_EXCEEDED after the Escalation, the paid answer never sent)."""
        config = default_config()
        config["cascade"]["scorers"] = ["local"]  # type: ignore[index]
        config["reliability"]["min_attempt_seconds"] = 0.0  # type: ignore[index]
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS), model="gpt-4o")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=2.0)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert (_text(messages), messages[-1].completion.model) == (refusal, "gpt-4o-mini")
        assert messages[-1].completion.quality.reason == "refusal; escalation to gpt-4o timed out, released"

    @pytest.mark.parametrize(
        ("tail", "deltas"),
        [(("x",) * 6000, 1), (("\U0001f600" * 1000,) * 300, 2)],
        ids=["6001 chunks", "1.2 MB of 4-byte characters"],
    )
    async def test_a_long_answer_in_hand_is_released_whole_within_the_time_kept(
        self, fake: FakeProvider, tail: tuple[str, ...], deltas: int
    ) -> None:
        """A held answer of 6,001 provider chunks, gpt-4o hanging, 50 ms kept for the release
        (min_attempt_seconds 0): it reaches the caller whole, in one delta (it was written one
        chunk a message, ~600 of them before the server's end of the call, then DEADLINE_EXCEEDED
        committed); one over 1 MiB comes in deltas of at most 1 MiB, cut between characters. The
        6 s deadline only bounds the cheap answer's stream (6,001 chunks through the SDK, slow on a
        loaded machine); the release still has its 50 ms, whatever the deadline."""
        config = default_config()
        config["cascade"]["scorers"] = ["local"]  # type: ignore[index]
        config["reliability"]["min_attempt_seconds"] = 0.0  # type: ignore[index]
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(chunks=(refusal, *tail)), model="gpt-4o-mini")
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS), model="gpt-4o")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=6.0)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert (_text(messages), messages[-1].completion.model) == (refusal + "".join(tail), "gpt-4o-mini")
        sizes = [len(m.delta.text.encode()) for m in messages if m.WhichOneof("event") == "delta"]
        assert len(sizes) == deltas
        assert max(sizes) <= 1 << 20

    async def test_a_middle_step_that_hangs_releases_the_answer_in_hand_before_the_deadline(
        self, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini -> gpt-4o -> claude-sonnet: the cheap refusal escalates to gpt-4o, which
        sends nothing; its call ends reliability.min_attempt_seconds before the caller's deadline
        and the refusal in hand is released (the call ended DEADLINE_EXCEEDED)."""
        config = _three_step_cascade(0.8, 0.8)
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
        fake.enqueue(Script(fault=Fault.HANG_BEFORE_HEADERS), model="gpt-4o")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client, "hi", timeout=2.0)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        assert (_text(messages), messages[-1].completion.model) == (refusal, "gpt-4o-mini")
        assert messages[-1].completion.quality.reason == "refusal; escalation to gpt-4o timed out, released"

    async def test_an_empty_answer_is_not_released_when_the_escalation_fails(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """An empty cheap answer is no answer: when the escalation fails too, the call ends
        UNAVAILABLE with the escalated model's error."""
        fake.enqueue(Script(text="", chunks=()), model="gpt-4o-mini")
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o")
        fake.enqueue(Script(status=529), Script(status=529), model="claude-sonnet-4-6")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _cascade(live_client)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_an_escalated_model_that_answers_nothing_releases_the_answer_in_hand(
        self, live_client: RouterClient, live_server: Server, fake: FakeProvider
    ) -> None:
        """The cheap refusal escalates to gpt-4o, which reasons up to the output limit and sends no
        text: nothing was sent, so the refusal in hand, paid for, is released, its reason saying
        so (the caller got gpt-4o's empty completion, finish length, the paid answer dropped)."""
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
        fake.enqueue(Script(chunks=(), reasoning=("thinking ",) * 5, finish_reason="length"), model="gpt-4o")
        messages = await _cascade(live_client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == (refusal, "gpt-4o-mini")
        assert completion.finish_reason == pb.FINISH_REASON_STOP
        assert completion.quality.reason.endswith("; escalation to gpt-4o gave no answer, released")
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_ESCALATED),
        ]
        entries = live_server.router.ledger.entries(messages[0].decision.decision_id)
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)

    async def test_a_middle_step_that_answers_nothing_and_cannot_escalate_releases_the_answer_in_hand(
        self, fake: FakeProvider
    ) -> None:
        """gpt-4o-mini -> gpt-4o -> claude-sonnet with claude-sonnet's breaker open: the cheap
        refusal escalates to gpt-4o, which answers with no text and cannot escalate further; the
        refusal in hand is released (the caller got gpt-4o's empty completion)."""
        async with _three_steps_with_a_breaker_open(fake, "claude-sonnet", "claude-sonnet-4-6") as client:
            refusal = "I'm sorry, but I can't help with that."
            fake.enqueue(Script(text=refusal), model="gpt-4o-mini")
            fake.enqueue(Script(chunks=(), reasoning=("think ",)), model="gpt-4o")
            messages = await _cascade(client)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == (refusal, "gpt-4o-mini")
        assert completion.quality.reason == (
            "refusal; escalation to gpt-4o gave no answer"
            " (not escalated to claude-sonnet: circuit breaker open for model claude-sonnet), released"
        )
        assert [(a.model, a.outcome) for a in completion.attempts] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_ESCALATED),
        ]

    @pytest.mark.parametrize(
        ("verdicts", "empty"),
        [
            ((Script(status=500),) * 3, Script(chunks=(), reasoning=("think ",) * 3, finish_reason="length")),
            ((Script(text='{"score": 0.9}'),), Script(chunks=())),
        ],
        ids=["judge failed, on_failure release", "judge says 0.9"],
    )
    async def test_a_middle_step_that_answers_nothing_and_is_released_by_its_judge_releases_the_answer_in_hand(
        self, fake: FakeProvider, verdicts: tuple[Script, ...], empty: Script
    ) -> None:
        """gpt-4o-mini -> gpt-4o -> claude-sonnet scored by the judge only: the cheap refusal (0.1)
        escalates to gpt-4o, which answers with no text; its judge fails (`on_failure: release`)
        or scores it 0.9, so it is released: the refusal in hand is released instead (the caller
        got gpt-4o's empty completion, the paid answer dropped)."""
        config = _three_step_cascade(0.8, 0.8)
        config["routing"]["fallbacks"] = {}  # type: ignore[index]
        config["cascade"]["scorers"] = ["llm_judge"]  # type: ignore[index]
        config["cascade"]["judge"] = {"model": "gpt-4o-mini", "timeout_seconds": 10, "on_failure": "release"}  # type: ignore[index]
        refusal = "I'm sorry, but I can't help with that."
        fake.enqueue(Script(text=refusal), Script(text='{"score": 0.1}'), *verdicts, model="gpt-4o-mini")
        fake.enqueue(empty, model="gpt-4o")
        async with _served(config, fake) as (server, client):
            messages = await _cascade(client)
            entries = server.router.ledger.entries(messages[0].decision.decision_id)
        assert _kinds(messages) == ["decision", "escalation", "delta", "completion"]
        completion = messages[-1].completion
        assert (_text(messages), completion.model) == (refusal, "gpt-4o-mini")
        assert completion.quality.reason.endswith("; escalation to gpt-4o gave no answer, released")
        assert [(a.model, a.outcome) for a in completion.attempts if a.outcome != pb.ATTEMPT_OUTCOME_JUDGE] == [
            ("gpt-4o-mini", pb.ATTEMPT_OUTCOME_COMPLETED),
            ("gpt-4o", pb.ATTEMPT_OUTCOME_ESCALATED),
        ]
        assert sum(e.cost_usd for e in entries) == Decimal(completion.cost_usd)
        assert "claude-sonnet-4-6" not in [r.model for r in fake.requests]

    async def test_a_filtered_escalated_answer_is_not_released_around(self, fake: FakeProvider) -> None:
        """The provider filtered gpt-4o's answer: that stands (the caller gets the filtered, empty
        completion), the refusal in hand is not released around the provider's filter."""
        config = default_config()
        config["cascade"]["scorers"] = ["local"]  # type: ignore[index]
        fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
        fake.enqueue(Script(chunks=(), finish_reason="content_filter"), model="gpt-4o")
        async with _served(config, fake) as (_server, client):
            messages = await _cascade(client)
        assert _kinds(messages) == ["decision", "escalation", "completion"]
        completion = messages[-1].completion
        assert (completion.model, completion.finish_reason) == ("gpt-4o", pb.FINISH_REASON_CONTENT_FILTER)


async def _judged_on_a_slow_store(
    fake: FakeProvider,
    tmp_path: Path,
    reply_delay: float,
    *,
    timeout: float,
    on_failure: str = "escalate",
    min_attempt_seconds: float | None = None,
    first_text_delay: float | None = None,
) -> list[pb.CompleteResponse]:
    """A cascaded Complete of tenant acme (a budget counted in a real Redis whose every reply comes
    `reply_delay` s late) whose judge hangs: gpt-4o-mini answers "Lyon, maybe.", and gpt-4o, if
    `first_text_delay` is given, answers "Paris." after that long."""
    with running_redis(tmp_path) as url:
        async with _Proxy(url) as proxy:
            config = default_config()
            if min_attempt_seconds is not None:
                config["reliability"]["min_attempt_seconds"] = min_attempt_seconds  # type: ignore[index]
            config["cascade"]["judge"]["on_failure"] = on_failure  # type: ignore[index]
            config["shared_state"] = {"redis_url": proxy.url}
            config["tenants"] = {"acme": {"daily_budget_usd": "100"}}
            hanging_verdict = Script(text='{"score": 0.9}', first_chunk_delay=5.0)
            fake.enqueue(Script(text="Lyon, maybe."), hanging_verdict, model="gpt-4o-mini")
            if first_text_delay is not None:
                fake.enqueue(Script(text="Paris.", first_chunk_delay=first_text_delay), model="gpt-4o")
            async with _served(config, fake) as (_server, client):
                proxy.delay = reply_delay
                return await _cascade(client, tenant="acme", timeout=timeout)


async def _on_a_store_slowed_mid_call(
    fake: FakeProvider, tmp_path: Path, config: dict[str, object], *, requests: int, reply_delay: float
) -> tuple[list[pb.CompleteResponse], tuple[Decimal, Decimal]]:
    """A cascaded 4 s Complete of tenant acme (a budget counted in a real Redis) on `config`, whose
    every reply from Redis comes `reply_delay` s late from once the fake has had `requests`
    requests; its messages, and what Redis then counts for acme today once the call has settled
    (reserved, spent: the reserved back to 0 within a generous cap)."""
    with running_redis(tmp_path) as url:
        async with _Proxy(url) as proxy:
            config["shared_state"] = {"redis_url": proxy.url}
            config["tenants"] = {"acme": {"daily_budget_usd": "100"}}
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                context = pb.RoutingContext(cascade=True, tenant="acme")
                call = client.complete(user_chat("What is the capital of France?"), context, timeout=4.0)
                collected = asyncio.ensure_future(_collect(call))
                try:
                    await until(lambda: len(fake.requests) >= requests)
                    proxy.delay = reply_delay
                    messages = await collected
                finally:
                    collected.cancel()
                    proxy.hurry()
                budget = await _settled_budget(url, "acme")
    return messages, budget


async def _collect(call: AsyncIterator[pb.CompleteResponse]) -> list[pb.CompleteResponse]:
    return [message async for message in call]


async def _settled_budget(redis_url: str, tenant: str) -> tuple[Decimal, Decimal]:
    """What Redis counts for `tenant` today (UTC), reserved and spent, once nothing is reserved
    (or after 10 s)."""
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    keys = [f"routesvc:{tenant}:reserved:day:{day}", f"routesvc:{tenant}:spent:day:{day}"]
    direct = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while Decimal(await direct.get(keys[0]) or 0):  # noqa: ASYNC110 - another process's Redis key, polled
                    await asyncio.sleep(0.05)
        reserved, spent = await direct.mget(keys)
    finally:
        await direct.aclose()
    return Decimal(reserved or 0), Decimal(spent or 0)


def _assert_escalated_or_released(messages: list[pb.CompleteResponse], fake: FakeProvider) -> None:
    """Either escalated and answered by gpt-4o, or not announced and the answer in hand released,
    saying why (never announced and then not made, never an error)."""
    completion = messages[-1].completion
    if _kinds(messages) == ["decision", "escalation", "delta", "completion"]:
        assert (_text(messages), completion.model) == ("Paris.", "gpt-4o")
    else:
        assert _kinds(messages) == ["decision", "delta", "completion"]
        assert (_text(messages), completion.model) == ("Lyon, maybe.", "gpt-4o-mini")
        assert "; not escalated to gpt-4o: " in completion.quality.reason
        assert "gpt-4o" not in [r.model for r in fake.requests]
