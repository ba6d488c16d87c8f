"""The last stage of every policy: the configured default model, else the cheapest eligible one."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from routesvc.cost import estimated_cost
from routesvc.errors import ContextWindowExceeded, NoEligibleModel
from routesvc.strategies.base import NextStage, RoutingInput, Verdict


class DefaultStrategy:
    """Chooses the default model when it can serve the request, else the cheapest that can."""

    name = "default"

    def __init__(self, default_model: str) -> None:
        self._default_model = default_model

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Decide; never calls ``next_stage`` (there is nothing after the default)."""
        del next_stage
        if routing_input.is_eligible(self._default_model):
            return Verdict(
                model=self._default_model,
                strategy=self.name,
                rule="default",
                reasons=(f"default model {self._default_model}",),
                task=routing_input.task,
            )
        eligible = [model for model in routing_input.models if routing_input.is_eligible(model.id)]
        if not eligible:
            raise no_eligible_model(routing_input)
        cheapest = min(
            eligible,
            key=lambda model: estimated_cost(model, routing_input),
        )
        why = routing_input.eligible.get(self._default_model, "unknown model")
        return Verdict(
            model=cheapest.id,
            strategy=self.name,
            rule="cheapest_eligible",
            reasons=(
                f"default model {self._default_model} cannot serve the request ({why}); "
                f"cheapest eligible model {cheapest.id}",
            ),
            task=routing_input.task,
        )


def no_eligible_model(routing_input: RoutingInput) -> NoEligibleModel:
    """The error for a request no model can serve, with every model's reason."""
    reasons = "; ".join(f"{model_id}: {why}" for model_id, why in routing_input.eligible.items())
    if all("context window" in why for why in routing_input.eligible.values()):
        return ContextWindowExceeded(f"no model's context window fits the request ({reasons})")
    return NoEligibleModel(f"no configured model can serve the request ({reasons})")


def pinned_model_refused(routing_input: RoutingInput, model_id: str) -> NoEligibleModel:
    """The error for a request the pinned ``model_id`` cannot serve: ``no_eligible_model`` of that
    model alone, except that a context window too small for the request is NO_ELIGIBLE_MODEL, not
    CONTEXT_WINDOW_EXCEEDED, while the window of another model the tenant may use fits it
    (shortening the prompt is not the only way to have it served; a model its allow-list refuses
    is no way)."""
    why = routing_input.eligible[model_id]
    fits_another = any(
        "context window" not in reason and not routing_input.allow_list.refuses(other)
        for other, reason in routing_input.eligible.items()
    )
    if "context window" in why and fits_another:
        return NoEligibleModel(
            f"the pinned model {model_id} cannot serve the request ({why}); another model's context window fits it"
        )
    return no_eligible_model(replace(routing_input, eligible=MappingProxyType({model_id: why})))
