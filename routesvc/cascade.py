"""The cascade's policy: which requests cascade, through which models, scored by what.

A chain (``cascade.chains`` in the config) applies when the routing decision picks its first
model, in realtime, unpinned, without tools or tool turns (a tool call is not an answer the scorers can judge),
and when ``cascade.apply`` and the request's ``context.cascade`` say so (one they say so for that is
pinned, batch or with tools gets a ``no cascade: ...`` reason naming which). Later steps that cannot
serve the request (ineligible, no key) are left out, and so are those the cost cap rules out (the
least the first step can cost, its input, plus the step's estimate passes it: its escalation
would be stopped whatever the first answer); a chain of one model is no cascade, and its answer
streams as it comes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal

import structlog

from routesvc.config import CascadeConfig, Settings
from routesvc.cost import billed_input_of_estimate, cost_of_usage, estimated_cost, format_usd
from routesvc.models import Mode, RouteDecision, RoutingRequest, Usage
from routesvc.providers.base import Provider
from routesvc.scoring import CombinedScorer, LLMJudge, LocalScorer, Scorer

log = structlog.get_logger("routesvc.cascade")


def build_scorer(config: CascadeConfig, settings: Settings, providers: Mapping[str, Provider]) -> Scorer:
    """The configured scorer. A judge whose provider has no adapter (its key is not set) is kept as
    one that cannot be asked: its ``on_failure`` applies, and the reason says why (logged at start)."""
    scorers: list[Scorer] = []
    for name in config.scorers:
        if name == "local":
            scorers.append(LocalScorer())
            continue
        judge = config.judge
        assert judge is not None  # validated in config
        model = settings.catalog.get(judge.model)
        provider = providers.get(model.provider)
        unavailable = ""
        if provider is None:
            missing = settings.providers[model.provider].missing_key_reason
            unavailable = missing or f"provider {model.provider} unavailable"
            if providers:  # with no provider at all nothing cascades anyway
                log.warning(
                    "cascade_judge_unavailable", judge=model.id, reason=unavailable, on_failure=judge.on_failure
                )
        scorers.append(
            LLMJudge(
                provider,
                model,
                timeout=judge.timeout_seconds,
                max_output_tokens=judge.max_output_tokens,
                on_failure=judge.on_failure,
                unavailable=unavailable,
            )
        )
    return CombinedScorer(scorers, config.combine)


def build_unpaid_scorer(config: CascadeConfig) -> Scorer | None:
    """The configured scorers that make no upstream call (the local one), combined as configured;
    None when every configured scorer does (a judge alone)."""
    local: list[Scorer] = [LocalScorer() for name in config.scorers if name == "local"]
    return CombinedScorer(local, config.combine) if local else None


class EscalationPolicy:
    """Plans the cascade of a decision and holds its scorers and cost cap."""

    def __init__(self, settings: Settings, providers: Mapping[str, Provider]) -> None:
        self._config = settings.config.cascade
        self._settings = settings
        self._providers = providers
        self._chains = {chain.steps[0].model: chain for chain in self._config.chains}
        self._scorer = build_scorer(self._config, settings, providers)
        self._unpaid_scorer = build_unpaid_scorer(self._config)

    @property
    def scorer(self) -> Scorer:
        """The scorer of every cascade step's answer."""
        return self._scorer

    @property
    def unpaid_scorer(self) -> Scorer | None:
        """The scorer of an answer released whatever its score (no escalation can follow), where a
        judge's verdict would change nothing: the configured scorers without the judge (None: the
        judge alone is configured)."""
        return self._unpaid_scorer

    @property
    def judged(self) -> bool:
        """Whether the configured scorers include the judge, whose call is paid for."""
        return "llm_judge" in self._config.scorers

    def _wanted(self, request: RoutingRequest) -> bool:
        asked = request.context.cascade
        if self._config.apply == "never":
            return False
        if self._config.apply == "always":
            return asked is not False
        return asked is True

    def plan(self, decision: RouteDecision, request: RoutingRequest) -> RouteDecision:
        """``decision`` with its cascade models, thresholds and scorer set, when a chain applies."""
        chain = self._chains.get(decision.model)
        if chain is None or not self._wanted(request):
            return decision
        cancelled = _cancelled(decision, request)
        if cancelled:
            # Asked for (or applied by the config) and not run: the reasons say why, as they do for
            # a chain whose steps are all left out.
            return replace(decision, reasons=(*decision.reasons, f"no cascade: {'; '.join(cancelled)}"))
        excluded = {c.model: c.excluded_reason for c in decision.candidates if not c.eligible}
        catalog = self._settings.catalog
        cap = self.max_cost(request)
        # The least the first step can cost: deciding's calls and its input, with no output, at
        # the cheapest rate the model may bill it (all of it read from the provider's prompt
        # cache, or none, whichever costs less), so that no step the run-time check would let
        # the cascade escalate to is left out.
        first = catalog.get(decision.model)
        billed = billed_input_of_estimate(first, decision)
        least = decision.routing_cost_usd + min(
            cost_of_usage(first, Usage(input_tokens=billed)),
            cost_of_usage(first, Usage(input_tokens=billed, cached_input_tokens=billed)),
        )
        kept = [chain.steps[0]]
        # Why each step left out of the chain is: the request asked for (or the config applies)
        # a cascade, so one it does not get, or gets shorter, says why.
        left_out: list[str] = []
        for step in chain.steps[1:]:
            model = catalog.get(step.model)
            provider = self._settings.providers[model.provider]
            if step.model in excluded:
                left_out.append(f"{step.model} left out: {excluded[step.model] or 'not eligible'}")
                continue
            if not provider.configured:
                left_out.append(f"{step.model} left out: {provider.missing_key_reason}")
                continue
            if provider.name not in self._providers:
                left_out.append(f"{step.model} left out: provider {provider.name} is not called here")
                continue
            would_cost = least + estimated_cost(model, decision)
            if cap is not None and would_cost > cap:
                # Its escalation would be stopped by the cap whatever the first answer: no need to
                # hold that answer back for it.
                left_out.append(
                    f"{step.model} left out: at least {format_usd(would_cost)} USD with it > max {format_usd(cap)} USD"
                )
                continue
            kept.append(step)
        if len(kept) < 2:
            if left_out:
                return replace(decision, reasons=(*decision.reasons, f"no cascade: {'; '.join(left_out)}"))
            return decision
        # Each kept step releases at its own threshold (a skipped step's threshold goes with it).
        models = [step.model for step in kept]
        thresholds = [step.threshold for step in kept[:-1] if step.threshold is not None]
        assert len(thresholds) == len(kept) - 1  # every step but a chain's last has one (config)
        steps = ", ".join(f"{m} (release at score >= {t:g})" for m, t in zip(models, thresholds, strict=False))
        reason = f"cascade: {steps}, then {models[-1]}; scorer {self._scorer.name}"
        if left_out:
            reason = f"{reason} ({'; '.join(left_out)})"
        return replace(
            decision,
            reasons=(*decision.reasons, reason),
            cascade_models=tuple(models),
            cascade_thresholds=tuple(thresholds),
            cascade_scorer=self._scorer.name,
        )

    def max_cost(self, request: RoutingRequest) -> Decimal | None:
        """The most the request may cost before escalation stops: the lower of the request's
        ``max_cost_usd`` and ``cascade.max_cost_usd``."""
        caps = [c for c in (request.context.max_cost_usd, self._config.max_cost_usd) if c is not None]
        return min(caps) if caps else None


def _cancelled(decision: RouteDecision, request: RoutingRequest) -> list[str]:
    """Why a chain that applies to ``decision`` does not run, whatever its steps: none when it may."""
    why: list[str] = []
    if decision.strategy == "pinned":
        why.append(f"model {decision.model} pinned by the request")
    if request.chat.tools:
        why.append("the request offers tools (a tool call is no answer to score)")
    elif request.chat.uses_tools:
        why.append("the conversation carries tool calls or results (the answer may be another call)")
    if decision.mode is not Mode.REALTIME:
        why.append(f"mode {decision.mode.value} (a cascade runs in realtime only)")
    return why


def max_cost_reason(to_model: str, would_cost: Decimal, cap: Decimal) -> str:
    """Why an escalation did not happen: it would have passed the cost cap."""
    return f"escalation to {to_model} stopped: estimated total {format_usd(would_cost)} USD > max {format_usd(cap)} USD"
