"""Pure cost arithmetic in ``Decimal`` USD: estimates before a call, exact cost after it, and the
usage of a call cut short (``interrupted_usage``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Protocol

from routesvc.catalog import ModelSpec
from routesvc.models import ChatRequest, ImageEstimate, Mode, ProviderKind, Usage
from routesvc.tokens import count_text_tokens, estimate_image_tokens, estimate_input_tokens

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
    input_tokens = billed_input_of_estimate(model, estimate)
    usage = Usage(input_tokens=input_tokens, output_tokens=estimate.estimated_output_tokens)
    return cost_of_usage(model, usage, mode)


def billed_input_of_estimate(model: ModelSpec, estimate: Estimated) -> int:
    """The input tokens ``model`` bills for a routed request's ``estimate``: its images by the
    model's formula and scale. What ``estimated_cost`` prices, and what a batch job whose result
    reports no input is charged (kept with the job at submit)."""
    return billed_input_tokens(model, *input_tokens_on(model, estimate))


def billed_input_tokens(model: ModelSpec, input_tokens: int, image_tokens: int) -> int:
    """The input tokens ``model`` bills for an estimate of ``input_tokens``, ``image_tokens`` of
    them images (billed at the model's ``image_token_scale``)."""
    return _scaled(input_tokens, image_tokens, model.image_token_scale)


def billed_input_of_chat(chat: ChatRequest, kind: ProviderKind, image_token_scale: Decimal) -> int:
    """The input tokens a model of a provider of ``kind`` that bills images at
    ``image_token_scale`` bills for ``chat``, estimated offline (its images by the kind's
    formula, then the scale), as ``estimated_cost`` prices a request: what is charged for an
    input the provider did not report (a stream without usage, a call cut short)."""
    images = estimate_image_tokens(chat).for_kind(kind)
    return _scaled(estimate_input_tokens(chat, kind), images, image_token_scale)


def _scaled(input_tokens: int, image_tokens: int, image_token_scale: Decimal) -> int:
    if not image_tokens:
        return input_tokens
    return input_tokens - image_tokens + math.ceil(image_tokens * image_token_scale)


def interrupted_usage(model: ModelSpec, chat: ChatRequest, produced: Sequence[str], reported: Usage | None) -> Usage:
    """The usage of a call on ``model`` cut short after the provider had it (a stream cut, a
    cancellation, a stall, the deadline), before it reported its final usage: an estimate.

    The output is what it ``produced`` (every piece in order: text, reasoning, tool-call parts)
    counted; the input is what the provider ``reported`` it bills before any output (Anthropic's
    ``message_start``: with its cache reads and writes) when it did, else ``chat`` (what the
    call put in the prompt) counted for ``model``: its images by its kind's formula and scale.
    The ledger, the attempt's span and a side call's charge all take it from here, so that they
    agree."""
    output_tokens = count_text_tokens("".join(produced))
    if reported is not None:
        return replace(reported, output_tokens=output_tokens)
    input_tokens = billed_input_of_chat(chat, model.provider_kind, model.image_token_scale)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)


def format_usd(amount: Decimal) -> str:
    """``amount`` as a plain decimal string with no exponent and no trailing zeros."""
    text = format(amount.normalize(), "f")
    return text if text != "-0" else "0"
