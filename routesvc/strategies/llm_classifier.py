"""The classifier stage's ``llm`` method: a cheap configured model asked for the task label.

The model is asked for ``{"task", "complexity"}`` as JSON (its labels read whatever their case),
bounded by a timeout and cached by tenant and prompt hash; requests with the same key at once
share one call; a reload's stage that asks the same model the same way (at the same provider
base URL) keeps both (``keep_labels_of``). On timeout, provider error or bad JSON the stage falls
back (to the local classifier when one is given, else to no label) and the request is still
served, as it is when the request's deadline comes first (what the request still needs after
its label kept: ``RoutingInput.decide_by``) or leaves too little time to ask; so it is after an
unexpected error, logged (``classifier_failed``) with its traceback, and at once, at no cost,
while the model's circuit breaker is open. A provider failure counts
against that breaker; a label only as its half-open probe's verdict, and an answer that is not
the JSON asked for not at all (``_settle``). Its latency and cost are in the stage's reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

import structlog

from routesvc.catalog import Catalog, ModelSpec
from routesvc.cost import cost_of_usage, format_usd
from routesvc.encoders import Encoder
from routesvc.errors import (
    ConfigError,
    ProviderError,
    RouteSvcError,
)
from routesvc.features import bounded
from routesvc.memo import Memo, text_key
from routesvc.models import Message, Role, UpstreamCall, Usage
from routesvc.providers.base import Provider, ProviderCall
from routesvc.sidecall import deterministic_temperature, settle_breaker, side_call
from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict
from routesvc.strategies.classifier import (
    COMPLEXITIES,
    TASK_LABELS,
    ClassifierStageConfig,
    TaskClassifier,
    overriding,
    task_classifier,
    task_left,
    with_reason,
)
from routesvc.tasks import keep_until_done

if TYPE_CHECKING:
    # Not at run time: the breakers' module imports the config, which imports the classifier's.
    from routesvc.breaker import Breakers, Permit

log = structlog.get_logger("routesvc.classifier")


class ClassifierAnswerError(RouteSvcError):
    """The LLM classifier's answer was not the JSON asked for."""

    reason = "CLASSIFIER_BAD_ANSWER"


_INSTRUCTIONS = (
    "You label requests sent to an AI assistant. Reply with JSON only, no prose: "
    '{"task": one of '
    + ", ".join(f'"{label}"' for label in TASK_LABELS)
    + ', "complexity": "low" | "medium" | "high"}. '
    "multi_step_reasoning covers maths, logic and planning; complexity is how capable a model must be to answer well."
)


def _judged(complexity: str) -> str:
    return f"complexity {complexity}" if complexity else "complexity not given"


_DECODER = json.JSONDecoder()
# Answers in a row not in JSON before the first warning (then at each doubling).
_NOT_JSON_WARN_AT = 8
# The answer is asked for in 40 tokens; a server that ignores that is read no further than this,
# so an answer of nested braces cannot make the search below quadratic.
_MAX_ANSWER_CHARS = 4_096


def parse_answer(text: str) -> tuple[str, str]:
    """(task, complexity) from the model's answer, each the canonical lower-case label whatever the
    answer's case and surrounding whitespace, complexity "" when the answer leaves it out; raises
    ``ClassifierAnswerError`` when invalid."""
    text = text[:_MAX_ANSWER_CHARS]
    start = text.find("{")
    if start == -1:
        raise ClassifierAnswerError("no JSON object in the classifier's answer")
    data: object = None
    while start != -1 and not isinstance(data, dict):
        # The first JSON object from a "{", whatever follows it (prose with braces, a second object).
        try:
            data, _ = _DECODER.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError, ValueError):
            # Nesting too deep, or an integer too long to read: a bad answer, as much as bad JSON.
            data = None
        start = text.find("{", start + 1)
    if not isinstance(data, dict):
        raise ClassifierAnswerError("classifier answer is not JSON (no object parses)")
    task = _label(data.get("task"))
    complexity = _label(data.get("complexity", ""))
    if task not in TASK_LABELS:
        raise ClassifierAnswerError(f"classifier answered an unknown task {task!r}")
    if complexity != "" and complexity not in COMPLEXITIES:
        raise ClassifierAnswerError(f"classifier answered an unknown complexity {complexity!r}")
    return str(task), str(complexity)


def _label(value: object) -> object:
    """A label as the model wrote it, matched as the canonical lower-case one: models answer
    ``"HIGH"`` or ``"Code_Generation "`` as often as the form asked for."""
    return value.strip().lower() if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one call to the model gave: its label and usage, or (``problem``) why it gave none."""

    task: str = ""
    complexity: str = ""
    usage: Usage = field(default_factory=Usage)
    problem: str = ""  # "timed out", an error's name, "failed unexpectedly (Name)"


@dataclass(eq=False, slots=True)
class _Flight:
    """A call to the model in flight for one tenant and prompt, and how many requests wait on it."""

    call: asyncio.Task[_Answer]
    waiting: int = 0


@dataclass(eq=False, slots=True)
class _Labels:
    """What an LLM classifier stage has of its model: the labels it gave (by tenant and prompt
    digest) and the calls in flight (by the same key). ``asks`` is what makes its answers (model,
    provider and the server it answers from, provider model, temperature) and the cache's size: a
    reloaded policy's stage with the same takes them over."""

    asks: tuple[object, ...]
    cache: Memo[tuple[str, str]]
    flights: dict[bytes, _Flight] = field(default_factory=dict)
    # Calls every request left when its deadline cut its wait, until they end (``_wait``).
    ending: set[asyncio.Task[_Answer]] = field(default_factory=set)
    # Answers in a row that were not the JSON asked for (``_note_answer``).
    not_json_in_a_row: int = 0


def _settle(
    breakers: Breakers,
    permit: Permit,
    error: TimeoutError | ProviderError | ClassifierAnswerError | None,
    answered: bool,
) -> None:
    """Tell the model's breaker how the classifier's call on ``permit`` ended. A provider failure
    counts against the model as an answer call's does (held open for the provider's Retry-After
    when longer); a refusal of this request (400s, a spent quota) before any output, or our own
    timeout, is no verdict. A label is a verdict only as the half-open probe's, which it closes; on
    a closed breaker it is no sign the model can answer (a long answer may fail where a 40-token
    label does not). An answer that is not the JSON asked for (``ClassifierAnswerError``) is no
    verdict at all, the probe's turn given back: the server answered, and what it said depends on
    the prompt, which the tenant writes (a prompt can talk the model out of JSON). Counted against
    the model, one tenant's prompt would take it from every tenant's answers, each time its breaker
    half-opens; as it is, the stage falls back and the request is served."""
    if isinstance(error, ClassifierAnswerError):
        settle_breaker(breakers, permit, None, answered=answered, understood=False)
    else:
        settle_breaker(breakers, permit, error, answered=answered, understood=True)


class LLMClassifierStage:
    """Asks a cheap model for the task label; times out, caches, shares calls and falls back."""

    def __init__(
        self,
        provider: Provider,
        model: ModelSpec,
        *,
        timeout_s: float = 2.0,
        cache_size: int = 10_000,
        fallback: TaskClassifier | None = None,
        override_hint: bool = False,
        min_confidence: float = 0.0,
    ) -> None:
        self._provider = provider
        self._model = model
        self._timeout_s = timeout_s
        temperature = deterministic_temperature(model)
        # The provider's URL, not just its name: a reload that points the name at another
        # server asks another model, whatever it is called.
        asks = (model.id, model.provider, provider.base_url, model.provider_model, temperature, cache_size)
        self._labels = _Labels(asks, Memo(cache_size))
        self._fallback = fallback
        self._override_hint = override_hint
        self._min_confidence = min_confidence

    @property
    def name(self) -> str:
        """The stage name in decisions."""
        return "classifier"

    def keep_labels_of(self, earlier: Iterable[Strategy]) -> None:
        """Take over the labels of the first of ``earlier`` (the stages of the policy a reload
        replaces) that is an LLM classifier asking the same model the same way (at the same
        provider base URL: the name pointed at another server is another model), with the same
        ``cache_size``: its answers are this stage's, so a reload (a rotated key, a budget
        changed) pays for none of them again. Its calls in flight are joined too when this stage
        asks through the same provider client with the same ``timeout_s``: a call on a client the
        reload replaced ends when the old router closes it (which would fail the requests of the
        new one waiting on it, and count against the model's breaker), and one bounded by an
        earlier ``timeout_s`` would outlast this stage's. Shared, not copied: nothing of
        ``earlier`` changes, so a reload that is rejected after this leaves it as it was. Else
        this stage starts empty (the system prompt and labels are this module's, the same for
        every stage)."""
        for stage in earlier:
            if isinstance(stage, LLMClassifierStage) and stage._labels.asks == self._labels.asks:
                if stage._provider is self._provider and stage._timeout_s == self._timeout_s:
                    self._labels = stage._labels
                else:  # its labels; its calls in flight end on the old router, into the same cache
                    self._labels = _Labels(self._labels.asks, stage._labels.cache)
                return

    async def _ask(
        self,
        prompt: str,
        charge: Callable[[UpstreamCall], None] | None,
        breakers: Breakers | None,
        permit: Permit | None,
    ) -> tuple[str, str, Usage]:
        # The part of the prompt the local classifier reads too: a huge prompt is not paid for
        # twice, and the label depends on its start and end.
        messages = (Message(Role.SYSTEM, _INSTRUCTIONS), Message(Role.USER, bounded(prompt)))
        call = ProviderCall(
            model=self._model.id,
            provider_model=self._model.provider_model,
            messages=messages,
            max_output_tokens=40,
            temperature=deterministic_temperature(self._model),
            timeout=self._timeout_s,
        )
        # A client span of its own (purpose classifier): its latency, usage and cost are in the
        # trace and the cost metrics, like a cascade judge's call. Charged however the call ended
        # (a timeout, a cancelled request): the provider bills what it started.
        result = await side_call(self._provider, self._model, call, purpose="classifier", charge=charge)
        error: TimeoutError | ProviderError | ClassifierAnswerError | None = result.error
        labels = ("", "")
        if error is None:
            try:
                labels = parse_answer(result.text)
            except ClassifierAnswerError as exc:
                error = exc
        if breakers is not None and permit is not None:
            _settle(breakers, permit, error, bool(result.text))
        if result.error is None:
            self._note_answer(json=error is None)
        if error is not None:
            raise error
        task, complexity = labels
        return task, complexity, result.finish.usage if result.finish is not None else Usage()

    def _note_answer(self, *, json: bool) -> None:
        """Count the answers in a row that were not the JSON asked for, and warn the operator at
        8, 16, 32, ... of them: such an answer costs a call and gives no label (the stage falls
        back), and a model that never answers JSON (one without JSON mode behind an
        OpenAI-compatible server, say) is paid for every new prompt, which the decisions' reasons
        alone would not show. Neither the prompt nor the answer is logged."""
        if json:
            self._labels.not_json_in_a_row = 0
            return
        self._labels.not_json_in_a_row += 1
        count = self._labels.not_json_in_a_row
        if count >= _NOT_JSON_WARN_AT and count & (count - 1) == 0:
            log.warning("classifier_answers_not_json", model=self._model.id, in_a_row=count)

    async def _call(
        self,
        key: bytes,
        prompt: str,
        charge: Callable[[UpstreamCall], None] | None,
        breakers: Breakers | None,
        permit: Permit | None,
    ) -> _Answer:
        """One call to the model, for every request waiting on it: the label (remembered under
        ``key``), or why there is none. A cancellation (every request waiting left) propagates."""
        try:
            task, complexity, usage = await self._ask(prompt, charge, breakers, permit)
        except (TimeoutError, RouteSvcError) as exc:
            return _Answer(problem="timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
        except Exception as exc:
            # A fault of ours or of a library's, not the provider's: the label is an aid to
            # routing, so the request is still served (with the fallback's label), and the
            # operator is told with the traceback. A cancellation is no Exception: it propagates.
            log.exception("classifier_failed", model=self._model.id, error=type(exc).__name__)
            return _Answer(problem=f"failed unexpectedly ({type(exc).__name__})")
        finally:
            if breakers is not None and permit is not None:
                # A call that ended before the breaker heard of it (cancelled, a fault of ours)
                # gives back a half-open probe's turn; a settled one's permit frees nothing.
                breakers.release_probe(permit)
            flight = self._labels.flights.get(key)
            if flight is not None and flight.call is asyncio.current_task():
                del self._labels.flights[key]
        self._labels.cache.put(key, (task, complexity))
        return _Answer(task, complexity, usage)

    async def _wait(self, key: bytes, flight: _Flight, timeout: float | None) -> _Answer | None:
        """``flight``'s answer, or None when ``timeout`` (seconds; None: none) passed first. A
        request that leaves (its deadline, its caller gone) leaves the call to the others waiting;
        the last to leave ends it. One whose caller is gone waits until it is charged; one cut by
        its deadline does not: the call is aborted and charged from its own task (``charge``, as
        it ends, after the request's decision), so that requests cut together on a hung classifier
        do not spend the time kept for their answers on each other's aborts."""
        flight.waiting += 1
        try:
            done, _ = await asyncio.wait([flight.call], timeout=timeout)
        except BaseException:
            if self._leave(key, flight) is not None:
                await asyncio.wait([flight.call])
            raise
        if done:
            flight.waiting -= 1
            return flight.call.result()
        ended = self._leave(key, flight)
        if ended is not None:
            # Kept until it ends: the loop holds only a weak reference to a task.
            keep_until_done(ended, self._labels.ending)
        return None

    def _leave(self, key: bytes, flight: _Flight) -> asyncio.Task[_Answer] | None:
        """One request stops waiting on ``flight``; the call, cancelled, when it was the last."""
        flight.waiting -= 1
        if flight.waiting or flight.call.done():
            return None
        if self._labels.flights.get(key) is flight:
            del self._labels.flights[key]
        flight.call.cancel()
        return flight.call

    async def classify(
        self,
        prompt: str,
        charge: Callable[[UpstreamCall], None] | None = None,
        *,
        tenant: str = "",
        may_not_pay: str = "",
        may_not_use: str = "",
        breakers: Breakers | None = None,
        answer_by: float | None = None,
        min_call_seconds: float = 0.0,
        on_cut: Callable[[], None] | None = None,
    ) -> tuple[str, str, str]:
        """(task, complexity, explanation); task is "" when the model failed and no fallback exists
        (or the fallback's guess is below ``min_confidence``). Each provider call goes to
        ``charge`` as it ends (an answer from the cache, or from a call another request made,
        makes none).

        Labels are remembered per ``tenant``: a label one tenant paid for is not another's, and an
        answer "(cached)" at no cost must not tell a tenant that another sent the same prompt. When
        ``may_not_use`` says why the tenant may not use the model (its allow-list), the model's
        label is not its to have, remembered or not: the fallback answers. When ``may_not_pay``
        says why it may not be asked (the budget is spent), it is not: the cache, a call in flight
        or the fallback answers. A request whose tenant and prompt have a call in flight waits for
        that call (within its own deadline) instead of making another. A model whose breaker (in
        ``breakers``, the router's) is open is not asked: the fallback answers.

        The request waits for the model's label until ``answer_by`` (``time.monotonic()``; None: no
        deadline), then falls back as on ``timeout_s``, the call left to the others waiting on it
        (ended, and charged, when none is): what the request still needs after its label, before
        its deadline, is kept; ``on_cut`` is called then. With less than ``min_call_seconds`` (the
        least a provider call is started with) until then, the model is not asked."""
        if may_not_use:
            return self._fall_back(prompt, f"not asked ({may_not_use})")
        # Two digests side by side: no tenant name and prompt can make another pair's key.
        key = text_key(tenant) + text_key(prompt)
        cached = self._labels.cache.get(key)
        if cached is not None:
            task, complexity = cached
            return (
                task,
                complexity,
                f"classifier: {self._model.id} labelled the task {task!r}, {_judged(complexity)} (cached)",
            )
        flight = self._labels.flights.get(key)
        shared = flight is not None
        left = None if answer_by is None else answer_by - time.monotonic()
        if flight is None:
            if left is not None and (left <= 0 or left < min_call_seconds):
                return self._fall_back(prompt, "not asked (no time left before the deadline)")
            if may_not_pay:
                return self._fall_back(prompt, f"not asked ({may_not_pay})")
            if not prompt.strip():
                # Nothing to label (a turn of images alone): a call would be refused or wasted.
                return self._fall_back(prompt, "not asked (the last user turn has no text)")
            permit = None if breakers is None else breakers.allow(self._model.id)
            if breakers is not None and permit is None:
                return self._fall_back(prompt, f"not asked (circuit breaker open for model {self._model.id})")
            # A task of its own, so that the request that started it can leave without ending it
            # for the others waiting; ``_wait`` ends it when the last of them leaves.
            flight = _Flight(asyncio.create_task(self._call(key, prompt, charge, breakers, permit)))
            self._labels.flights[key] = flight
        started = time.perf_counter()
        # The call's own ``timeout_s`` bounds it for every request waiting; this request's deadline
        # bounds its wait alone (a shorter one does not end the call for the others).
        waited = await self._wait(key, flight, None if left is None else max(0.0, left))
        if waited is None:
            if on_cut is not None:
                on_cut()
            answer = _Answer(problem="cut by the request's deadline")
        else:
            answer = waited
        elapsed = (time.perf_counter() - started) * 1000
        if answer.problem:
            return self._fall_back(prompt, f"{answer.problem} after {elapsed:.0f} ms")
        labelled = f"classifier: {self._model.id} labelled the task {answer.task!r}, {_judged(answer.complexity)}"
        if shared:
            return answer.task, answer.complexity, f"{labelled} (asked for another request with the same prompt)"
        cost: Decimal = cost_of_usage(self._model, answer.usage)
        return answer.task, answer.complexity, f"{labelled}, in {elapsed:.0f} ms for ${format_usd(cost)}"

    def _fall_back(self, prompt: str, why: str) -> tuple[str, str, str]:
        """(task, "", explanation) when the model gave no label (``why``): the local fallback's,
        unless its confidence is below ``min_confidence`` (task "", as with no fallback)."""
        if self._fallback is None:
            return "", "", f"classifier: {self._model.id} {why}"
        prediction = self._fallback.predict(prompt)
        if prediction.confidence < self._min_confidence:
            return (
                "",
                "",
                f"classifier: {self._model.id} {why}; local fallback's guess {prediction.task!r} at confidence"
                f" {prediction.confidence:.4g} is below {self._min_confidence:.4g}",
            )
        return (
            prediction.task,
            "",
            f"classifier: {self._model.id} {why}; local fallback labelled the task {prediction.task!r}",
        )

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Set ``task`` from the model's answer (or the fallback) and defer to the rest."""
        if routing_input.task and not self._override_hint:
            verdict = await next_stage(routing_input)
            return with_reason(
                verdict, f"classifier: kept task {routing_input.task!r} from {routing_input.task_source}", ""
            )
        # A model the tenant may not use is not sent its prompt, as a paid call is not made once
        # its budget is spent.
        task, complexity, reason = await self.classify(
            routing_input.request.chat.last_user_message,
            routing_input.charge,
            tenant=routing_input.request.context.tenant,
            may_not_pay=routing_input.may_not_pay,
            may_not_use=routing_input.allow_list.refuses(self._model.id),
            breakers=routing_input.breakers,
            answer_by=routing_input.decide_by,
            min_call_seconds=routing_input.min_call_seconds,
            on_cut=routing_input.on_cut,
        )
        if not task:
            reason = f"{reason}; {task_left(routing_input)}"
        else:
            reason += overriding(routing_input, task)
        annotated = (
            dataclasses.replace(routing_input, task=task, task_source=self.name, complexity=complexity)
            if task
            else routing_input
        )
        verdict = await next_stage(annotated)
        return with_reason(verdict, reason, task)


def build(
    config: ClassifierStageConfig,
    *,
    catalog: Catalog | None,
    provider_for: Callable[[str], Provider] | None,
    encoder: Encoder | None = None,
) -> LLMClassifierStage:
    """The llm method's stage ``config`` describes.

    ``provider_for`` maps a catalog model's provider name to the configured ``Provider``;
    ``encoder`` is the local fallback's (``classifier.task_classifier``).
    """
    fallback = task_classifier(config, encoder) if config.fallback_local else None
    if catalog is None or provider_for is None:
        raise ConfigError("classifier: the llm method needs the catalog and providers")
    if not config.model:
        raise ConfigError("classifier.model: the llm method needs a catalog model id")
    spec = catalog.get(config.model)
    try:
        provider = provider_for(spec.provider)
    except KeyError:
        raise ConfigError(
            f"classifier.model: {spec.id}'s provider {spec.provider} has no credentials, so the llm method"
            " could never ask it; set its key or use the local method"
        ) from None
    return LLMClassifierStage(
        provider,
        spec,
        timeout_s=config.timeout_s,
        cache_size=config.cache_size,
        fallback=fallback,
        override_hint=config.override_hint,
        min_confidence=config.min_confidence,
    )
