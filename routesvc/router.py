"""The router: request -> policy -> decision -> provider -> cost. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType

from routesvc import telemetry
from routesvc.admission import Admission
from routesvc.breaker import Breakers
from routesvc.catalog import ModelSpec
from routesvc.config import Settings
from routesvc.cost import cost_of_usage, estimate_cost, format_usd
from routesvc.errors import (
    CostLimitExceeded,
    InvalidRequest,
    PermissionDenied,
    ProviderError,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderUnavailable,
    StreamInterrupted,
)
from routesvc.ledger import AttemptOutcome, Ledger
from routesvc.models import (
    Candidate,
    CompleteEvent,
    Completion,
    Mode,
    RouteDecision,
    RoutingRequest,
    TextDelta,
    Usage,
)
from routesvc.policy import Policy
from routesvc.providers.base import Provider, ProviderCall
from routesvc.retry import RetryBudget, backoff_delay, is_retryable
from routesvc.strategies.base import RoutingInput, Verdict
from routesvc.strategies.default import no_eligible_model
from routesvc.tokens import count_text_tokens, estimate_input_tokens


def _new_decision_id() -> str:
    return uuid.uuid4().hex


class Router:
    """Decides which model serves a request, and serves it.

    ``route`` only decides. ``complete`` decides, calls the chosen model's provider and yields
    the decision, the text deltas and one ``Completion`` with the exact cost.
    """

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        policy: Policy | None = None,
        *,
        new_decision_id: Callable[[], str] = _new_decision_id,
        ledger: Ledger | None = None,
        admission: Admission | None = None,
        breakers: Breakers | None = None,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = settings.catalog
        self._limits = settings.config.limits
        self._routing = settings.config.routing
        self._providers = dict(providers)
        self._policy = policy or Policy.from_config(settings.config.routing)
        self._new_decision_id = new_decision_id
        self._reliability = settings.config.reliability
        self._ledger = ledger or Ledger()
        self._admission = admission or Admission(settings.config.tenants)
        self._breakers = breakers or Breakers(self._reliability.breaker)
        self._retry_budget = retry_budget or RetryBudget(
            self._reliability.retry_budget_tokens, self._reliability.retry_budget_ratio
        )
        self._providers_by_model = {m.id for m in self._catalog if m.provider in self._providers}

    @property
    def settings(self) -> Settings:
        """The settings this router was built from."""
        return self._settings

    def reconfigured(self, settings: Settings, providers: Mapping[str, Provider]) -> Router:
        """A router for new settings (hot reload) that keeps this one's ledger, limits, breakers
        and retry budget, so nothing counted so far is lost. Calls in flight finish on this one."""
        self._admission.configure(settings.config.tenants)
        return Router(
            settings,
            providers,
            new_decision_id=self._new_decision_id,
            ledger=self._ledger,
            admission=self._admission,
            breakers=self._breakers,
            retry_budget=self._retry_budget,
        )

    @property
    def providers(self) -> Mapping[str, Provider]:
        """The provider adapters by provider name."""
        return self._providers

    @property
    def ledger(self) -> Ledger:
        """Every upstream attempt's usage and cost."""
        return self._ledger

    @property
    def admission(self) -> Admission:
        """Per-tenant limits and budgets."""
        return self._admission

    @property
    def breakers(self) -> Breakers:
        """The per-model circuit breakers."""
        return self._breakers

    async def aclose(self) -> None:
        """Close every provider's connections."""
        for provider in self._providers.values():
            await provider.aclose()

    def _eligibility(self, request: RoutingRequest, input_tokens: int, output_tokens: int) -> dict[str, str]:
        skip_unconfigured = self._routing.on_unconfigured_provider == "fallthrough"
        tenant = self._settings.config.tenants.get(request.context.tenant)
        allowed = None if tenant is None else tenant.allowed_models
        eligible: dict[str, str] = {}
        for model in self._catalog:
            needed = input_tokens + output_tokens
            provider = self._settings.providers[model.provider]
            if model.context_window < needed:
                why = (
                    f"context window {model.context_window} < {needed} tokens "
                    f"(input {input_tokens} + output {output_tokens})"
                )
            elif request.chat.max_output_tokens is not None and model.max_output_tokens < output_tokens:
                why = f"max output tokens {model.max_output_tokens} < {output_tokens} requested"
            elif request.chat.tools and not model.supports("tools"):
                why = "does not support tools"
            elif allowed is not None and model.id not in allowed:
                why = f"not allowed for tenant {request.context.tenant!r}"
            elif skip_unconfigured and not provider.configured:
                why = provider.missing_key_reason
            else:
                why = ""
            eligible[model.id] = why
        return eligible

    async def route(self, request: RoutingRequest, *, for_completion: bool = False) -> RouteDecision:
        """Decide which model serves ``request``; raises a ``RouteSvcError`` when none can.

        With ``for_completion`` the decision must be callable now: a model whose provider has
        no key fails with ``ProviderNotConfigured`` (policy ``fail``); for ``Route`` alone the
        decision is returned with a reason saying Complete would fail.
        """
        telemetry.start_routing(request)
        chat = request.chat
        if chat.max_output_tokens is not None and chat.max_output_tokens > self._limits.max_output_tokens:
            raise InvalidRequest("chat.max_output_tokens", f"must be at most {self._limits.max_output_tokens}")
        pinned = self._catalog.get(request.context.model) if request.context.model else None
        input_tokens = estimate_input_tokens(chat)
        output_tokens = chat.max_output_tokens or self._limits.default_output_tokens
        eligible = self._eligibility(request, input_tokens, output_tokens)
        routing_input = RoutingInput(
            request=request,
            estimated_input_tokens=input_tokens,
            estimated_output_tokens=output_tokens,
            models=tuple(self._catalog),
            eligible=MappingProxyType(eligible),
            task=request.context.task_hint,
            task_source="hint" if request.context.task_hint else "",
        )
        if pinned is not None:
            if eligible[pinned.id].startswith("not allowed for tenant"):
                raise PermissionDenied(f"model {pinned.id} is {eligible[pinned.id]}")
            if eligible[pinned.id]:
                raise no_eligible_model(
                    replace(routing_input, eligible=MappingProxyType({pinned.id: eligible[pinned.id]}))
                )
            verdict = Verdict(
                model=pinned.id,
                strategy="pinned",
                rule="model",
                reasons=(f"model {pinned.id} pinned by the request",),
                mode=Mode.REALTIME if request.context.realtime else Mode.BATCH,
                task=routing_input.task,
            )
        else:
            verdict = await self._policy.decide(routing_input)
        model = self._catalog.get(verdict.model)
        reasons = list(verdict.reasons)
        excluded = [f"{model_id} excluded: {why}" for model_id, why in eligible.items() if why]
        reasons.extend(excluded)
        model, cost = self._within_max_cost(request, routing_input, model, verdict.mode, reasons)
        provider = self._settings.providers[model.provider]
        if not provider.configured:
            if for_completion:
                raise ProviderNotConfigured(f"model {model.id}: {provider.missing_key_reason}")
            reasons.append(f"{provider.missing_key_reason}; Complete would fail until it is set")
        return RouteDecision(
            decision_id=self._new_decision_id(),
            model=model.id,
            provider=model.provider,
            strategy=verdict.strategy,
            rule=verdict.rule,
            reasons=tuple(reasons),
            estimated_input_tokens=input_tokens,
            estimated_output_tokens=output_tokens,
            estimated_cost_usd=cost,
            mode=verdict.mode,
            candidates=tuple(Candidate(model_id, not why, why) for model_id, why in eligible.items()),
            task=verdict.task,
        )

    def _within_max_cost(
        self,
        request: RoutingRequest,
        routing_input: RoutingInput,
        model: ModelSpec,
        mode: Mode,
        reasons: list[str],
    ) -> tuple[ModelSpec, Decimal]:
        tokens_in, tokens_out = routing_input.estimated_input_tokens, routing_input.estimated_output_tokens
        cost = estimate_cost(model, tokens_in, tokens_out, mode)
        cap = request.context.max_cost_usd
        if cap is None or cost <= cap:
            return model, cost
        affordable = sorted(
            (
                (estimate_cost(other, tokens_in, tokens_out, mode), index, other)
                for index, other in enumerate(self._catalog)
                if routing_input.is_eligible(other.id)
            ),
            key=lambda item: (item[0], item[1]),
        )
        for other_cost, _, other in affordable:
            if other_cost <= cap:
                reasons.append(
                    f"estimated cost {format_usd(cost)} USD on {model.id} exceeds max_cost_usd {format_usd(cap)}; "
                    f"downgraded to {other.id} at {format_usd(other_cost)} USD"
                )
                return other, other_cost
        cheapest = format_usd(affordable[0][0]) if affordable else format_usd(cost)
        raise CostLimitExceeded(
            f"estimated cost of the cheapest eligible model ({cheapest} USD) exceeds max_cost_usd {format_usd(cap)}"
        )

    def _attempt_chain(self, decision: RouteDecision) -> list[str]:
        """The decided model, then its configured fallbacks that can serve the request."""
        eligible = {c.model for c in decision.candidates if c.eligible}
        chain = [decision.model]
        for name in self._routing.fallbacks.get(decision.model, ()):
            provider = self._settings.providers[self._catalog.get(name).provider]
            if name in eligible and name not in chain and provider.configured and name in self._providers_by_model:
                chain.append(name)
        return chain

    async def complete(
        self,
        request: RoutingRequest,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> AsyncGenerator[CompleteEvent, None]:
        """Decide, call the chosen model, and yield the decision, deltas and the ``Completion``.

        One retry loop: before the first delta, a retryable failure (5xx, 408, 429, connection,
        timeout, open breaker) is retried on the same model, then on its fallbacks, within
        ``max_attempts``, the retry budget and the caller's deadline. Once a delta has been
        yielded a failure becomes ``StreamInterrupted`` (the commit rule): nothing is retried or
        appended. Every attempt is written to the ledger exactly once.
        """
        reliability = self._reliability
        deadline = None if timeout is None else time.monotonic() + timeout
        decision = await self.route(request, for_completion=True)
        if decision.mode is Mode.BATCH:
            model = self._catalog.get(decision.model)
            decision = replace(
                decision,
                mode=Mode.REALTIME,
                estimated_cost_usd=estimate_cost(
                    model, decision.estimated_input_tokens, decision.estimated_output_tokens
                ),
                reasons=(*decision.reasons, "batch execution is not enabled in this build; served in realtime"),
            )
        tenant = request.context.tenant
        reservation = self._admission.admit(
            tenant,
            tokens=decision.estimated_input_tokens + decision.estimated_output_tokens,
            cost=decision.estimated_cost_usd,
        )
        attempt = _AttemptState(request_id, decision, tenant)
        try:
            yield decision
            last_error: ProviderError | None = None
            for model_id in self._attempt_chain(decision):
                if last_error is not None:
                    telemetry.record_fallback(last_error.model, model_id, last_error.reason)
                model = self._catalog.get(model_id)
                for try_on_model in range(reliability.retries_per_model + 1):
                    if attempt.number >= reliability.max_attempts:
                        break
                    if attempt.number and not self._retry_budget.can_retry():
                        break
                    if not self._breakers.allow(model_id):
                        last_error = last_error or ProviderUnavailable(
                            f"circuit breaker open for model {model_id}", provider=model.provider, model=model_id
                        )
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining < reliability.min_attempt_seconds:
                        raise TimeoutError
                    async with contextlib.aclosing(
                        self._attempt(attempt, model, request, remaining, headers)
                    ) as events:
                        try:
                            async for event in events:
                                yield event
                            return
                        except ProviderError as error:
                            if attempt.chunks or not is_retryable(error):
                                raise
                            last_error = error
                    retry_after = last_error.retry_after if isinstance(last_error, ProviderRateLimited) else None
                    if try_on_model == reliability.retries_per_model:
                        break
                    delay = backoff_delay(reliability, try_on_model + 1, retry_after)
                    left = None if deadline is None else deadline - time.monotonic() - reliability.min_attempt_seconds
                    if delay > reliability.max_retry_after_seconds or (left is not None and delay > left):
                        break
                    await asyncio.sleep(delay)
            if last_error is None:
                raise no_eligible_model_for(decision)
            raise last_error
        finally:
            reservation.settle(attempt.tokens, attempt.cost)

    async def _attempt(
        self,
        state: _AttemptState,
        model: ModelSpec,
        request: RoutingRequest,
        remaining: float | None,
        headers: Mapping[str, str] | None,
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        """One upstream call: yields its deltas and, on success, the ``Completion``.

        The first chunk must come within ``first_token_timeout_seconds`` and each next one within
        ``stream_idle_timeout_seconds``; a stall closes the upstream request. The attempt is
        written to the ledger exactly once however it ends.
        """
        reliability = self._reliability
        state.number += 1
        number = state.number
        provider = self._providers[model.provider]
        decision = state.decision
        call = ProviderCall(
            model=model.id,
            provider_model=model.provider_model,
            messages=request.chat.messages,
            tools=request.chat.tools,
            max_output_tokens=decision.estimated_output_tokens,
            temperature=request.chat.temperature,
            timeout=remaining,
            headers=MappingProxyType(dict(headers or {})),
        )
        received: list[str] = []
        outcome = AttemptOutcome.CANCELLED
        usage: Usage | None = None
        stream = telemetry.observed_stream(provider, model, call, decision.mode)
        try:
            iterator = aiter(stream)
            while True:
                limit = reliability.stream_idle_timeout_seconds if received else reliability.first_token_timeout_seconds
                try:
                    async with asyncio.timeout(limit):
                        event = await anext(iterator)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ProviderUnavailable(
                        f"model {model.id} sent no chunk for {limit:g} s", provider=model.provider, model=model.id
                    ) from None
                if isinstance(event, TextDelta):
                    received.append(event.text)
                    state.chunks += 1
                    yield event
                else:
                    usage = event.usage
                    finish = event
            if usage is None:
                message = f"provider {model.provider} ended the stream without a finish event"
                raise ProviderUnavailable(message, provider=model.provider, model=model.id)
            outcome = AttemptOutcome.COMPLETED
            cost = cost_of_usage(model, usage, decision.mode)
            self._record(state, model, number, outcome, usage, cost, estimated=False)
            self._breakers.record_success(model.id)
            self._retry_budget.record_success()
            yield Completion(
                model=model.id,
                provider=model.provider,
                provider_model=finish.provider_model or model.provider_model,
                usage=usage,
                cost_usd=state.cost,
                finish_reason=finish.finish_reason,
            )
        except ProviderError as error:
            outcome = AttemptOutcome.INTERRUPTED if received else AttemptOutcome.FAILED
            self._breakers.record_failure(
                model.id, error.retry_after if isinstance(error, ProviderRateLimited) else None
            )
            self._retry_budget.record_failure()
            if received:
                raise StreamInterrupted(
                    f"{error.message} after {len(received)} chunks were sent",
                    provider=error.provider,
                    model=model.id,
                    chunks_sent=state.chunks,
                ) from error
            raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                # Closing the generator closes the upstream HTTP response (also on cancellation).
                await aclose()
            if outcome is not AttemptOutcome.COMPLETED:
                if outcome is AttemptOutcome.CANCELLED:
                    self._breakers.release_probe(model.id)
                estimate = Usage(
                    input_tokens=decision.estimated_input_tokens if received else 0,
                    output_tokens=count_text_tokens("".join(received)) if received else 0,
                )
                cost = cost_of_usage(model, estimate, decision.mode)
                self._record(state, model, number, outcome, estimate, cost, estimated=bool(received))

    def _record(
        self,
        state: _AttemptState,
        model: ModelSpec,
        number: int,
        outcome: AttemptOutcome,
        usage: Usage,
        cost: Decimal,
        *,
        estimated: bool,
    ) -> None:
        state.tokens += usage.input_tokens + usage.output_tokens
        state.cost += cost
        self._ledger.record(
            request_id=state.request_id,
            decision_id=state.decision.decision_id,
            tenant=state.tenant,
            model=model.id,
            provider=model.provider,
            attempt=number,
            outcome=outcome,
            usage=usage,
            cost_usd=cost,
            estimated=estimated,
        )


@dataclass
class _AttemptState:
    """What the attempts of one request share."""

    request_id: str
    decision: RouteDecision
    tenant: str
    number: int = 0
    chunks: int = 0
    tokens: int = 0
    cost: Decimal = Decimal(0)


def no_eligible_model_for(decision: RouteDecision) -> ProviderUnavailable:
    """The error when no attempt could even start (every breaker open, no budget)."""
    return ProviderUnavailable(
        f"no attempt could start for model {decision.model}", provider=decision.provider, model=decision.model
    )
