"""The model catalog: which models exist, who serves them, what they cost and can do."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

from routesvc.errors import ModelNotFound, quoted_id
from routesvc.models import ProviderKind


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One catalog model. Prices are USD per 1M tokens.

    ``cache_write_price_per_mtok`` prices input tokens written to the provider's prompt cache
    (Anthropic's 5-minute cache), ``cache_write_1h_price_per_mtok`` those written to its 1-hour cache.
    """

    id: str
    provider: str
    provider_model: str
    input_price_per_mtok: Decimal
    output_price_per_mtok: Decimal
    cached_input_price_per_mtok: Decimal
    cache_write_price_per_mtok: Decimal
    cache_write_1h_price_per_mtok: Decimal
    context_window: int
    max_output_tokens: int
    capabilities: frozenset[str]
    batch_discount: Decimal
    # Request parameters the model refuses: a request that sets one is not routed to it.
    unsupported_parameters: frozenset[str] = frozenset()
    # Input tokens the model bills per token of its image estimate (``routesvc.images``).
    image_token_scale: Decimal = Decimal(1)
    # The kind of its provider, whose formula estimates its images (the larger of OpenAI's and
    # Anthropic's for an OpenAI-compatible server, whose formula is unknown).
    provider_kind: ProviderKind = "openai_compatible"

    def supports(self, capability: str) -> bool:
        """Whether the model has ``capability`` (for example "tools")."""
        return capability in self.capabilities


class Catalog:
    """The configured models in catalog order, looked up by id."""

    def __init__(self, models: Sequence[ModelSpec]) -> None:
        self._models = tuple(models)
        self._by_id = {model.id: model for model in self._models}

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    def get(self, model_id: str) -> ModelSpec:
        """The model with ``model_id``; raises ``ModelNotFound`` naming the known ids."""
        try:
            return self._by_id[model_id]
        except KeyError:
            known = ", ".join(self._by_id)
            raise ModelNotFound(f"unknown model {quoted_id(model_id)}; known models: {known}") from None
