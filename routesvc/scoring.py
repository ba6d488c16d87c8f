"""Quality scorers: how good is a model's answer, from 0 (useless) to 1 (fine)?

A cascade asks one ``Scorer`` about the cheap model's answer and escalates when the score is
below the step's threshold. Scorers never raise for a bad answer; a scorer that cannot decide
(the judge timed out, answered garbage) returns the configured on-failure score and says so in
``reason``. Reasons are a few words, never answer or prompt text.

    LocalScorer      no extra call: empty, truncated, refused or filtered answers, JSON that was
                     asked for and does not parse, hedged answers
    LLMJudge         a cheap model asked for {"score": 0-1} in JSON, within a timeout
    CombinedScorer   several scorers: the lowest score (skipping the rest once one is below
                     the threshold), or the mean
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from routesvc.catalog import ModelSpec
from routesvc.cost import estimate_cost
from routesvc.models import (
    AllowList,
    ChatRequest,
    FinishReason,
    Message,
    QualityScore,
    Role,
    RoutingRequest,
    UpstreamCall,
)
from routesvc.providers.base import Provider, ProviderCall
from routesvc.retry import skips_provider
from routesvc.sidecall import deterministic_temperature, settle_breaker, side_call
from routesvc.tokens import estimate_input_tokens

if TYPE_CHECKING:
    # Not at run time: the breakers' module imports the config, which imports the classifier,
    # which imports the side calls, as this module does.
    from routesvc.breaker import Breakers, Permit

log = structlog.get_logger("routesvc.scoring")


@dataclass(frozen=True, slots=True)
class ScoringInput:
    """What a scorer sees: the request, the answer, and the threshold it will be held to.

    ``timeout`` is the seconds a scorer's calls may take from when it is called, their holds
    (``reserve``) included, which end early enough before the caller's deadline for the answer to
    be released after them (None: no deadline; at most 0: no call can be made). ``min_timeout``
    is the least time a call is made with: one that would have less, its hold's round trips
    counted, is not made (a hold is cut when what is left gets down to it). ``charge``
    is called once for every upstream call a scorer makes, as soon as the call ends, however it
    ends (also when the caller is cancelled mid-call), so that it is charged exactly once.
    ``reserve`` is called with a call's estimated cost before a scorer makes it: it returns why the
    call is not to be made, and it is then not made (the request's tenant budget cannot take it,
    or, with it, the escalation its verdict may lead to would pass the cost cap or the budget: a
    verdict that cannot change the outcome is not paid for), or "" when it is, its cost then held
    in the request's reservation. ``spent_providers`` names the providers whose quota this
    request found spent: a scorer does not call them, and adds the provider of a call of its own
    that finds its quota spent (so the request's later steps skip it too). ``allow_list`` is the
    tenant's: a scorer does not call a model it refuses (the request and answer would go where the
    tenant's data may not). ``breakers`` are the router's per-model circuit breakers, which a
    scorer's calls go through as the answers' and an LLM classifier's do: a model whose breaker is
    open is not called, and each call's end is told to its breaker (None: no breakers).
    """

    request: RoutingRequest
    model: str
    answer: str
    finish_reason: FinishReason
    threshold: float
    timeout: float | None = None
    min_timeout: float = 0.0
    charge: Callable[[UpstreamCall], None] | None = None
    reserve: Callable[[Decimal], Awaitable[str]] | None = None
    spent_providers: set[str] = field(default_factory=set)
    allow_list: AllowList = field(default_factory=AllowList)
    breakers: Breakers | None = None


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """A score and the upstream calls made to reach it.

    ``scored`` False: no scorer judged the answer, and ``quality`` is the judge's configured
    ``on_failure`` (the judge failed or was not asked); such an answer has no score in the
    statistics."""

    quality: QualityScore
    calls: tuple[UpstreamCall, ...] = ()
    scored: bool = True


class Scorer(Protocol):
    """Scores one answer in [0, 1]; never raises for a bad answer or a failed judge."""

    @property
    def name(self) -> str:
        """The scorer's name as it appears in decisions and escalations, for example "local"."""
        ...

    async def score(self, scoring_input: ScoringInput, /) -> ScoreResult:
        """Score ``scoring_input.answer``."""
        ...


# Refusals and hedges the large chat models use; matched at the start of the answer, where a
# refusal is stated (a long answer that mentions "I cannot" later is not a refusal).
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry|unfortunately|as an ai(?: language model)?)?[^.!?\n]{0,40}?\b"
    r"(?:i\s+(?:can(?:'|no)?t|cannot|am\s+(?:not\s+able|unable)|'m\s+(?:not\s+able|unable)|won'?t|will\s+not)"
    r"\s+(?:help|assist|answer|provide|comply|do\s+that|fulfil|fulfill|create|write|generate|share|engage)"
    r"(?!\s+but\b))",
    re.IGNORECASE,
)
_HEDGE = re.compile(
    r"\b(?:i\s+(?:do\s+not|don'?t)\s+know|i'?m\s+not\s+(?:sure|certain)|i\s+am\s+not\s+(?:sure|certain)|"
    r"(?:it\s+is|it'?s)\s+(?:impossible|not\s+possible)\s+to\s+(?:determine|know|say)|"
    r"cannot\s+be\s+determined|there\s+is\s+not\s+enough\s+information|insufficient\s+information)\b",
    re.IGNORECASE,
)
# Asked for an answer in JSON: an output verb then JSON ("respond with JSON", "return the result
# as JSON"), "format" or "formatted" then in or as JSON, up to three words apart ("format as
# JSON", "format the data as JSON", "formatted in JSON"), or "JSON only". A
# question about JSON ("how are dates represented in JSON?", "what's the best way to format JSON
# files?") asks for no JSON answer. One bounded scan at most: the patterns read a bounded slice of
# a message (``_ends``), so they cost little on any prompt.
_OUTPUT_VERB = r"(?:respond|reply|answer|output|return|give|provide|print)"
_ASKS_FOR_JSON = re.compile(
    rf"\b{_OUTPUT_VERB}\s+(?:(?:only|with|in|as|a|an|the|valid|raw)\s+)*json\b"
    rf"|\b{_OUTPUT_VERB}\b[^.?!\n]{{0,80}}?\b(?:in|as)\s+(?:valid\s+)?json\b"
    r"|\bformat(?:ted)?\s+(?:[\w'-]+\s+){0,3}(?:in|as)\s+(?:valid\s+)?json\b"
    r"|\bjson\s+only\b",
    re.IGNORECASE,
)
# A request for code is answered with code, whatever it says about JSON.
_ASKS_FOR_CODE = re.compile(r"\b(?:function|code|script|program|class|snippet|regex)\b", re.IGNORECASE)
# Asked for Python code, in one clause (up to a . ? ! or line end): a verb of making and a piece
# of Python code ("write a Python function", "make a Python class", "write the solution in
# Python"), a verb that means coding and Python ("implement X in Python", "code this in Python",
# "translate this to Python", "write Python to ..."), or a clause that starts with Python code
# ("Python code to parse a CSV"). A question about Python ("what is the GIL in Python?", "can I
# write comments in Python?", "how are dicts implemented in Python?"): a clause that opens with a
# question word ("how do I convert a string to an int in Python?", "should we rewrite it in
# Python?") asks for no code, unless it is a request put as a question ("can you code this in
# Python?", "could you ..., please?"). Each pattern scans a clause once (no nested scans).
_CLAUSE_END = re.compile(r"[.?!\n]+")
_QUESTION = re.compile(
    r"^\W*(?:how|why|what|what's|which|when|where|who|whose|should|shall|is|are|was|were|does|do|did|can|could"
    r"|would|will|may|might|must|has|have)\b(?!\s+you\b)",
    re.IGNORECASE,
)
_PLEASE = re.compile(r"\bplease\b", re.IGNORECASE)
_CODE_NOUN = (
    r"(?:function|method|class|script|program|code|snippet|module|solution|implementation|app|application"
    r"|game|tool|algorithm|decorator|generator|parser|loop|test|scraper|bot|cli)s?"
)
_MAKING_VERB = re.compile(
    r"\b(?:write|create|build|generate|develop|make|give\s+me|show\s+me|provide)\b", re.IGNORECASE
)
_CODING_VERB = re.compile(r"\b(?:implement|code|solve|rewrite|translate|convert|port|show\s+me\s+how)\b", re.IGNORECASE)
_PYTHON_CODE_NOUN = re.compile(rf"\bpython\s+{_CODE_NOUN}\b", re.IGNORECASE)
_CODE_NOUN_WORD = re.compile(rf"\b{_CODE_NOUN}\b", re.IGNORECASE)
_IN_PYTHON = re.compile(r"\b(?:in|into|to|using)\s+python\b", re.IGNORECASE)
_WRITE_PYTHON = re.compile(r"\b(?:write|code)\s+(?:some\s+|me\s+)?python\b", re.IGNORECASE)
_STARTS_WITH_PYTHON_CODE = re.compile(rf"^\W*(?:a\s+|some\s+)?python\s+{_CODE_NOUN}\b", re.IGNORECASE)
# ``[ \t]``, not ``\s``: a run of blank lines read from each of its line starts would be quadratic.
_PYTHON_CODE = re.compile(r"^[ \t]*(?:def|class|import|from)[ \t]+\w|\blambda\b[^:\n]{0,200}:", re.MULTILINE)
_ASKS_FOR_ONE_CHOICE = re.compile(
    r"\b(?:print|answer|reply|respond|give|output)\s+(?:with\s+)?only\s+(?:a\s+single|one|the)\s+"
    r"(?:choice|letter|option)",
    re.IGNORECASE,
)
_ONE_CHOICE = re.compile(r"^\W{0,3}(?:answer:?\s*)?\(?[A-Ha-h]\)?(?:\W|$)", re.IGNORECASE)
# The patterns spell apostrophes the ASCII way; models often write typographic ones ("I’m", "can’t").
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})


# What the patterns read of a message: its first and last characters, where a prompt says what
# it asks for (a long prompt quotes its material between), so that scoring costs little whatever
# the prompt's length.
READ_CHARS = 2_000


def _ends(text: str) -> str:
    """The first and last ``READ_CHARS`` characters of ``text`` (all of it when shorter), apart."""
    if len(text) <= 2 * READ_CHARS:
        return text
    return f"{text[:READ_CHARS]}\n{text[-READ_CHARS:]}"


def asks_for_json(request: RoutingRequest) -> bool:
    """Whether the request asks for a JSON answer: a JSON ``chat.response_format``, metadata
    ``response_format: json``, or a system or the last user message saying so (in its first or
    last ``READ_CHARS`` characters)."""
    if (
        request.chat.response_format is not None
        or request.context.metadata.get("response_format", "").lower() == "json"
    ):
        return True
    question = _ends(request.chat.last_user_message)
    if _ASKS_FOR_CODE.search(question):
        return False
    texts = [_ends(m.content) for m in request.chat.messages if m.role is Role.SYSTEM]
    texts.append(question)
    return any(_ASKS_FOR_JSON.search(text) for text in texts)


def asks_for_python(question: str) -> bool:
    """Whether ``question`` (a user message) asks for Python code, in one of its clauses (in its
    first or last ``READ_CHARS`` characters)."""
    for clause in _CLAUSE_END.split(_ends(question)):
        if "python" not in clause.lower():
            continue
        if _QUESTION.search(clause) and not _PLEASE.search(clause):
            continue
        if _STARTS_WITH_PYTHON_CODE.search(clause) or _WRITE_PYTHON.search(clause):
            return True
        if _CODING_VERB.search(clause) and _IN_PYTHON.search(clause):
            return True
        if _MAKING_VERB.search(clause) and (
            _PYTHON_CODE_NOUN.search(clause) or (_CODE_NOUN_WORD.search(clause) and _IN_PYTHON.search(clause))
        ):
            return True
    return False


def _unfenced(text: str) -> str:
    """``text`` (stripped) without the code fence around all of it (```json ... ```), if any.

    Found by slicing, not by a pattern: a fence-matching regex backtracks cubically on a fence
    followed by a long run of whitespace, and the answer is the model's, of any length."""
    text = text.strip()
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    inner = text[3:-3]
    if inner[:4].lower() == "json":
        inner = inner[4:]
    return inner.strip()


def _parses_as_json(answer: str) -> bool:
    text = _unfenced(answer)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class LocalScorer:
    """Scores from the answer alone, with no extra call.

    ====================================  =====
    the answer                            score
    ====================================  =====
    empty, or filtered by the provider    0.0
    a refusal ("I'm sorry, I can't ...")  0.1
    truncated (finish_reason length)      0.2
    asked-for JSON that does not parse    0.2
    an unterminated code block            0.2
    asked-for Python code missing         0.3
    not the one choice asked for          0.4
    hedged ("I'm not sure", "cannot be    0.5
    determined")
    anything else                         1.0
    ====================================  =====
    """

    name = "local"

    async def score(self, scoring_input: ScoringInput, /) -> ScoreResult:
        """The score of the first rule that matches, in the order of the table."""
        return ScoreResult(self.verdict(scoring_input.request, scoring_input.answer, scoring_input.finish_reason))

    def verdict(self, request: RoutingRequest, answer: str, finish_reason: FinishReason) -> QualityScore:
        """The same as ``score``, synchronously (for offline measurement)."""
        text = answer.strip().translate(_APOSTROPHES)
        if finish_reason is FinishReason.CONTENT_FILTER:
            return QualityScore(0.0, self.name, "filtered by the provider")
        if not text:
            return QualityScore(0.0, self.name, "empty answer")
        if _REFUSAL.search(text[:300]):
            return QualityScore(0.1, self.name, "refusal")
        if finish_reason is FinishReason.LENGTH:
            return QualityScore(0.2, self.name, "truncated (finish_reason length)")
        if asks_for_json(request) and not _parses_as_json(text):
            return QualityScore(0.2, self.name, "requested JSON does not parse")
        if text.count("```") % 2:
            return QualityScore(0.2, self.name, "unterminated code block")
        question = _ends(request.chat.last_user_message).translate(_APOSTROPHES)
        if asks_for_python(question) and not _PYTHON_CODE.search(text):
            return QualityScore(0.3, self.name, "requested Python code missing")
        if _ASKS_FOR_ONE_CHOICE.search(question[-500:]) and not _ONE_CHOICE.match(text):
            return QualityScore(0.4, self.name, "not the one choice asked for")
        if _HEDGE.search(text[:500]):
            return QualityScore(0.5, self.name, "hedged answer")
        return QualityScore(1.0, self.name, "no problem found")


_JUDGE_SYSTEM = (
    "You grade answers to user requests. Judge whether the answer is correct, complete and follows the "
    'request\'s instructions. Reply with only a JSON object: {"score": <number from 0 to 1>, "reason": '
    '"<at most ten words>"}. 1 means a fully correct and helpful answer, 0 a wrong or useless one.'
)
_MAX_QUOTED_CHARS = 16_000
_DECODER = json.JSONDecoder()
# The judge is asked for a few dozen tokens; a server that ignores that is read no further than
# this, so an answer of nested braces cannot make the search below quadratic.
_MAX_ANSWER_CHARS = 4_096


def parse_judge_score(text: str) -> float | None:
    """The ``score`` of the first JSON object in ``text`` if it is a number in [0, 1], else None.

    Each ``{`` is tried as the start of a whole JSON object, so a reason that itself contains
    braces (``"dict literal {} is wrong"``, likely when judging code) does not cut it short. Only
    the first ``_MAX_ANSWER_CHARS`` characters are read.
    """
    text = text[:_MAX_ANSWER_CHARS]
    start = text.find("{")
    while start != -1:
        try:
            data, _ = _DECODER.raw_decode(text, start)  # from a "{": a JSON object, a dict
        except (RecursionError, ValueError):
            # Bad JSON, nesting too deep, or an integer too long to read: no score there.
            start = text.find("{", start + 1)
            continue
        score = data.get("score")
        # The range first: an integer too large for a float (309 digits) has no isfinite.
        if isinstance(score, int | float) and not isinstance(score, bool) and 0 <= score <= 1:
            return float(score)
        return None
    return None


class LLMJudge:
    """Asks ``model`` (through its ``provider``) for a 0-1 score in JSON within ``timeout`` seconds.

    When the judge fails (provider error, timeout, no parsable score) or is not asked (the
    request's budget cannot take its call, or its verdict could lead to no escalation:
    ``ScoringInput.reserve``; the tenant may not use its
    model: ``ScoringInput.allow_list``; no time is left for it: ``ScoringInput.timeout``; its
    model's circuit breaker is open: ``ScoringInput.breakers``), ``on_failure`` decides:
    ``release`` scores the answer 1.0, ``escalate`` 0.0; the reason says the judge failed and why.
    So it does after an unexpected error (a fault of ours or of a library's, not the provider's),
    logged as ``judge_failed`` with its traceback. The judge's call is returned in
    ``ScoreResult.calls`` so that it is charged to the request.

    Its calls count against its model's breaker as an LLM classifier's do (``settle_breaker``): a
    provider failure does, its own timeout and an answer without a score do not (no verdict), and
    a score closes a half-open breaker whose probe it was.
    """

    name = "llm_judge"

    def __init__(
        self,
        provider: Provider | None,
        model: ModelSpec,
        *,
        timeout: float,
        max_output_tokens: int = 64,
        on_failure: Literal["release", "escalate"] = "release",
        unavailable: str = "",
    ) -> None:
        """``provider`` None: the judge cannot be asked (``unavailable`` says why), so every score
        is its ``on_failure``; the other scorers still run."""
        self._provider = provider
        self._unavailable = unavailable
        self._model = model
        self._timeout = timeout
        self._max_output_tokens = max_output_tokens
        self._on_failure = on_failure

    def _messages(self, scoring_input: ScoringInput) -> tuple[Message, ...]:
        chat = scoring_input.request.chat
        instructions = "\n\n".join(m.content for m in chat.messages if m.role is Role.SYSTEM)[:_MAX_QUOTED_CHARS]
        question = chat.last_user_message[-_MAX_QUOTED_CHARS:]
        images = next((len(m.images) for m in reversed(chat.messages) if m.role is Role.USER), 0)
        if images:
            # The judge reads text only: it is told that the answer may describe what it cannot see.
            question = f"{question}\n[{images} image(s) sent with the request, not shown here]"
        answer = scoring_input.answer[:_MAX_QUOTED_CHARS]
        prompt = f"<request>\n{question}\n</request>\n\n<answer>\n{answer}\n</answer>\n\nGrade the answer."
        if instructions:
            prompt = f"<instructions>\n{instructions}\n</instructions>\n\n{prompt}"
        return (Message(Role.SYSTEM, _JUDGE_SYSTEM), Message(Role.USER, prompt))

    def _failed(self, why: str, calls: tuple[UpstreamCall, ...] = ()) -> ScoreResult:
        score = 1.0 if self._on_failure == "release" else 0.0
        verb = "released" if self._on_failure == "release" else "escalated"
        return ScoreResult(QualityScore(score, self.name, f"judge {why}; {verb} as configured"), calls, scored=False)

    async def score(self, scoring_input: ScoringInput, /) -> ScoreResult:
        """Ask the judge. Its usage (estimated when it did not finish) goes to ``charge`` when the
        call ends and comes back in ``calls``."""
        if self._provider is None:
            return self._failed(f"{self._model.id} not asked ({self._unavailable})")
        if disallowed := scoring_input.allow_list.refuses(self._model.id):
            return self._failed(f"{self._model.id} not asked ({disallowed})")
        if self._model.provider in scoring_input.spent_providers:
            why = f"provider {self._model.provider}'s quota was found spent earlier in this request"
            return self._failed(f"{self._model.id} not asked ({why})")
        least = scoring_input.min_timeout
        if scoring_input.timeout is not None and (scoring_input.timeout <= 0 or scoring_input.timeout < least):
            return self._failed(f"{self._model.id} not asked (no time left before the deadline)")
        messages = self._messages(scoring_input)
        breakers = scoring_input.breakers
        permit = None if breakers is None else breakers.allow(self._model.id)
        if breakers is not None and permit is None:
            return self._failed(f"{self._model.id} not asked (circuit breaker open for model {self._model.id})")
        try:
            left = scoring_input.timeout
            if scoring_input.reserve is not None:
                tokens_in = estimate_input_tokens(ChatRequest(messages))
                started = time.monotonic()
                cost = estimate_cost(self._model, tokens_in, self._max_output_tokens)
                # Bounded by the time the judge has less the least its call is made with: a slow
                # store's hold ran past the server's end of the call (DEADLINE_EXCEEDED, the answer
                # in hand never sent), or left the call a sliver it timed out in, charged for no
                # verdict. What it held, if it got there, is released with the reservation at its
                # settle.
                hold_for = None if left is None else left - least
                timer = asyncio.timeout(hold_for)
                try:
                    async with timer:
                        why = await scoring_input.reserve(cost)
                except TimeoutError:
                    if not timer.expired():
                        raise  # not our cut: a fault of the hold, which propagates as its others do
                    store = f"the tenant's budget store did not answer within the {hold_for:.3g} s left for it"
                    return self._failed(f"{self._model.id} not asked ({store})")
                if why:
                    return self._failed(f"not asked ({why})")
                # The hold (a round trip to a shared store, maybe slow) came out of the time the
                # call had: it still ends when ``timeout`` said, not that much later.
                if left is not None:
                    left -= time.monotonic() - started
                    if left <= 0 or left < least:
                        return self._failed(f"{self._model.id} not asked (no time left before the deadline)")
            timeout = self._timeout if left is None else min(self._timeout, left)
            call = ProviderCall(
                model=self._model.id,
                provider_model=self._model.provider_model,
                messages=messages,
                max_output_tokens=self._max_output_tokens,
                temperature=deterministic_temperature(self._model),
                timeout=timeout,
            )
            try:
                return await self._ask(self._provider, call, timeout, scoring_input, permit)
            except Exception as exc:
                # The answer in hand is still scored (by ``on_failure``), and the operator is told
                # with the traceback; the call, if made, was charged as it ended. A cancellation is
                # no Exception: it propagates.
                log.exception("judge_failed", model=self._model.id, error=type(exc).__name__)
                return self._failed(f"failed unexpectedly ({type(exc).__name__})")
        finally:
            if breakers is not None and permit is not None:
                # A call not made, or ended before its breaker heard of it (cancelled, a fault of
                # ours), gives back a half-open probe's turn; a settled one's permit frees nothing.
                breakers.release_probe(permit)

    async def _ask(
        self,
        provider: Provider,
        call: ProviderCall,
        timeout: float,
        scoring_input: ScoringInput,
        permit: Permit | None,
    ) -> ScoreResult:
        # A client span of its own (purpose judge): its cost counts, it never answers the request.
        result = await side_call(provider, self._model, call, purpose="judge", charge=scoring_input.charge)
        used = result.used
        score = None if result.error is not None else parse_judge_score(result.text)
        if scoring_input.breakers is not None and permit is not None:
            settle_breaker(
                scoring_input.breakers,
                permit,
                result.error,
                answered=bool(result.text),
                understood=score is not None,
            )
        if isinstance(result.error, TimeoutError):
            return self._failed(f"timed out after {timeout:g} s", (used,))
        if result.error is not None:
            if skips_provider(result.error):
                scoring_input.spent_providers.add(self._model.provider)
            return self._failed(f"failed ({result.error.reason})", (used,))
        if score is None:
            return self._failed("gave no score in [0, 1]", (used,))
        return ScoreResult(QualityScore(score, self.name, f"judge {self._model.id} scored it"), (used,))


class CombinedScorer:
    """Several scorers as one.

    ``min``: run them in order and keep the lowest score; once a score is below the threshold the
    rest are skipped (a cheap local check spares the judge's call). ``mean``: run all and average.
    The result names the scorer whose score decided (``min``) or ``mean(a,b)``.
    """

    def __init__(self, scorers: Sequence[Scorer], combine: Literal["min", "mean"] = "min") -> None:
        if not scorers:
            raise ValueError("CombinedScorer needs at least one scorer")
        self._scorers = tuple(scorers)
        self._combine = combine

    @property
    def name(self) -> str:
        """``min(local,llm_judge)``, or the one scorer's name."""
        if len(self._scorers) == 1:
            return self._scorers[0].name
        return f"{self._combine}({','.join(s.name for s in self._scorers)})"

    async def score(self, scoring_input: ScoringInput, /) -> ScoreResult:
        """The combined score and every call the scorers made."""
        results: list[ScoreResult] = []
        for scorer in self._scorers:
            result = await scorer.score(scoring_input)
            results.append(result)
            if self._combine == "min" and result.quality.score < scoring_input.threshold:
                break
        calls = tuple(call for result in results for call in result.calls)
        # Scored when one of the scorers scored it (a local pass, then a judge not asked).
        scored = any(result.scored for result in results)
        if self._combine == "min" or len(results) == 1:
            # On a tie the later scorer speaks (the judge after a local pass says more).
            lowest = min(reversed(results), key=lambda r: r.quality.score)
            return ScoreResult(lowest.quality, calls, scored)
        mean = sum(r.quality.score for r in results) / len(results)
        reason = "; ".join(f"{r.quality.scorer}: {r.quality.score:g} ({r.quality.reason})" for r in results)
        return ScoreResult(QualityScore(mean, self.name, reason), calls, scored)
