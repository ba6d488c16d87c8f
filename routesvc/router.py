"""The router: request -> policy -> decision -> provider -> cost. Knows nothing of gRPC."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from decimal import Decimal
from types import MappingProxyType

from routesvc.catalog import ModelSpec
from routesvc.config import Settings
from routesvc.cost import cost_of_usage, estimate_cost, format_usd
from routesvc.errors import (
    CostLimitExceeded,
    InvalidRequest,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
    StreamInterrupted,
)
from routesvc.models import (
    Candidate,
    CompleteEvent,
    Completion,
    Mode,
    ProviderFinish,
    RouteDecision,
    RoutingRequest,
    TextDelta,
)
from routesvc.policy import Policy
from routesvc.providers.base import Provider, ProviderCall
from routesvc.strategies.base import RoutingInput, Verdict
from routesvc.strategies.default import no_eligible_model
from routesvc.tokens import estimate_input_tokens


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
    ) -> None:
        self._settings = settings
        self._catalog = settings.catalog
        self._limits = settings.config.limits
        self._routing = settings.config.routing
        self._providers = dict(providers)
        self._policy = policy or Policy.from_config(settings.config.routing)
        self._new_decision_id = new_decision_id

    @property
    def settings(self) -> Settings:
        """The settings this router was built from."""
        return self._settings

    async def aclose(self) -> None:
        """Close every provider's connections."""
        for provider in self._providers.values():
            await provider.aclose()

    def _eligibility(self, request: RoutingRequest, input_tokens: int, output_tokens: int) -> dict[str, str]:
        skip_unconfigured = self._routing.on_unconfigured_provider == "fallthrough"
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

    async def complete(
        self,
        request: RoutingRequest,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[CompleteEvent]:
        """Decide, call the chosen model, and yield the decision, deltas and the ``Completion``.

        Once a delta has been yielded a provider failure becomes ``StreamInterrupted`` (the
        commit rule: nothing is retried or appended after content reached the caller).
        """
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
        yield decision
        model = self._catalog.get(decision.model)
        provider = self._providers[model.provider]
        call = ProviderCall(
            model=model.id,
            provider_model=model.provider_model,
            messages=request.chat.messages,
            tools=request.chat.tools,
            max_output_tokens=decision.estimated_output_tokens,
            temperature=request.chat.temperature,
            timeout=timeout,
            headers=MappingProxyType(dict(headers or {})),
        )
        chunks = 0
        finish: ProviderFinish | None = None
        stream = provider.stream(call)
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    chunks += 1
                    yield event
                else:
                    finish = event
        except ProviderError as exc:
            if chunks:
                raise StreamInterrupted(
                    f"{exc.message} after {chunks} chunks were sent",
                    provider=exc.provider,
                    model=model.id,
                    chunks_sent=chunks,
                ) from exc
            raise
        finally:
            # Closing the generator closes the upstream HTTP response (also on cancellation).
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if finish is None:
            message = f"provider {model.provider} ended the stream without a finish event"
            if chunks:
                raise StreamInterrupted(message, provider=model.provider, model=model.id, chunks_sent=chunks)
            raise ProviderUnavailable(message, provider=model.provider, model=model.id)
        yield Completion(
            model=model.id,
            provider=model.provider,
            provider_model=finish.provider_model or model.provider_model,
            usage=finish.usage,
            cost_usd=cost_of_usage(model, finish.usage, decision.mode),
            finish_reason=finish.finish_reason,
        )
