"""Pure cost arithmetic in ``Decimal`` USD: estimates before a call, exact cost after it."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Protocol

from routesvc.catalog import ModelSpec
from routesvc.models import ImageEstimate, Mode, Usage

_PER_TOKEN = Decimal(1_000_000)


def _discount(model: ModelSpec, mode: Mode) -> Decimal:
    return Decimal(1) - model.batch_discount if mode is Mode.BATCH else Decimal(1)


def cost_of_usage(model: ModelSpec, usage: Usage, mode: Mode = Mode.REALTIME) -> Decimal:
    """Exact cost of provider-reported ``usage``: cache reads at the cached price, cache writes at
    the cache write price (1-hour ones at theirs), the rest of the input at the input price.

    The parts are clamped so that they never add up to more than ``input_tokens``.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_write_input_tokens, usage.input_tokens - cached)
    written_1h = min(usage.cache_write_1h_input_tokens, written)
    uncached = usage.input_tokens - cached - written
    total = (
        uncached * model.input_price_per_mtok
        + cached * model.cached_input_price_per_mtok
        + (written - written_1h) * model.cache_write_price_per_mtok
        + written_1h * model.cache_write_1h_price_per_mtok
        + usage.output_tokens * model.output_price_per_mtok
    ) / _PER_TOKEN
    return total * _discount(model, mode)


def estimate_cost(
    model: ModelSpec, input_tokens: int, output_tokens: int, mode: Mode = Mode.REALTIME, *, image_tokens: int = 0
) -> Decimal:
    """Estimated cost of a call before it is made (no prompt-cache hits assumed). ``image_tokens``
    is the part of ``input_tokens`` that images make up, which ``model`` bills at its
    ``image_token_scale``."""
    usage = Usage(input_tokens=billed_input_tokens(model, input_tokens, image_tokens), output_tokens=output_tokens)
    return cost_of_usage(model, usage, mode)


class Estimated(Protocol):
    """A routed request's token estimate: a ``RouteDecision``'s, or a ``RoutingInput``'s.

    ``estimated_input_tokens`` counts the images as some kind's formula does (the chosen model's
    for a decision, the larger of all for a routing input), ``estimated_image_tokens`` is the
    part they make up in it, and ``image_estimate`` has them by every kind."""

    @property
    def estimated_input_tokens(self) -> int: ...
    @property
    def estimated_output_tokens(self) -> int: ...
    @property
    def estimated_image_tokens(self) -> int: ...
    @property
    def image_estimate(self) -> ImageEstimate: ...


def input_tokens_on(model: ModelSpec, estimate: Estimated) -> tuple[int, int]:
    """``estimate``'s input tokens on ``model``, and the part its images make up, counted by the
    formula of the model's provider kind (before its ``image_token_scale``)."""
    images = estimate.image_estimate.for_kind(model.provider_kind)
    return estimate.estimated_input_tokens - estimate.estimated_image_tokens + images, images


def estimated_cost(model: ModelSpec, estimate: Estimated, mode: Mode = Mode.REALTIME) -> Decimal:
    """``estimate_cost`` of a routed request's ``estimate`` on ``model``, its images counted by
    the model's own formula and scale."""
    input_tokens, image_tokens = input_tokens_on(model, estimate)
    return estimate_cost(model, input_tokens, estimate.estimated_output_tokens, mode, image_tokens=image_tokens)


def billed_input_tokens(model: ModelSpec, input_tokens: int, image_tokens: int) -> int:
    """The input tokens ``model`` bills for an estimate of ``input_tokens``, ``image_tokens`` of
    them images (billed at the model's ``image_token_scale``)."""
    if not image_tokens:
        return input_tokens
    return input_tokens - image_tokens + math.ceil(image_tokens * model.image_token_scale)


def format_usd(amount: Decimal) -> str:
    """``amount`` as a plain decimal string with no exponent and no trailing zeros."""
    text = format(amount.normalize(), "f")
    return text if text != "-0" else "0"
