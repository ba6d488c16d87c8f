"""The usage a provider reports, checked before anything is charged for it.

A broken server can report any count (``completion_tokens`` of 10**19): taken as is, it would
be charged to the ledger, the span, the cost metric and the tenant's budget (a day's budget
spent by one call), and overflow the protobuf's int64. A count the call cannot have used is
taken as unreported instead: estimated as the adapters estimate a usage the server left out,
flagged, and logged ``provider_usage_implausible`` (the counts, never the prompt). Streams are
checked here (``CheckedUsage``); a batch result's usage where the batch queue charges it
(``batches/_queue.py``'s ``_billed_usage``), with the same limits."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace

import structlog

from routesvc.catalog import ModelSpec
from routesvc.cost import interrupted_usage
from routesvc.models import Heartbeat, InputReported, ProviderEvent, ProviderFinish, TextDelta, Usage
from routesvc.provider_text import ValidText
from routesvc.providers.base import Provider, ProviderCall, ProviderWrapper, close_stream

log = structlog.get_logger("routesvc.reported_usage")

# How far past a model's context window a reported input is believed: the routing estimate of a
# call's input fits the window, but the offline tokenizer may count fewer tokens than the
# provider, and a catalog may give a model a smaller window than its server has.
INPUT_SLACK = 2


def output_limit(model: ModelSpec, asked: int | None = None) -> int:
    """The most output a call on ``model`` can produce: the ``max_output_tokens`` it ``asked``
    (every adapter sends one), else ``model``'s limit in the catalog. OpenAI's and Anthropic's
    caps include a reasoning model's thinking; an ``openai_compatible`` server's need not
    (DeepSeek's reasoner, R1, Qwen3 or QwQ behind vLLM: ``max_tokens`` bounds the answer,
    ``completion_tokens`` counts the reasoning too), so its output is bounded by the model's
    context window, as its input is."""
    if model.provider_kind == "openai_compatible":
        return input_limit(model)
    return asked or model.max_output_tokens


def input_limit(model: ModelSpec) -> int:
    """The most input a call on ``model`` is believed to be billed."""
    return model.context_window * INPUT_SLACK


def believable_input(model: ModelSpec, usage: Usage) -> bool:
    """Whether ``usage``'s input and every cache count of it are within ``input_limit``. (A cache
    count over the input is clamped where it is priced: ``cost_of_usage``.)"""
    counts = (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.cache_write_1h_input_tokens,
    )
    return max(counts) <= input_limit(model)


def warn_implausible(
    provider: str, model: ModelSpec, usage: Usage, implausible: str, limit: int, **context: object
) -> None:
    """Log ``provider_usage_implausible``: ``usage``'s ``implausible`` counts ("input", "output"
    or both) are estimated instead (the counts and ``context`` are logged, never the prompt)."""
    log.warning(
        "provider_usage_implausible",
        provider=provider,
        model=model.id,
        implausible=implausible,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_input_tokens=usage.cache_write_input_tokens,
        output_limit=limit,
        input_limit=input_limit(model),
        estimated_instead=True,
        **context,
    )


class CheckedUsage(ProviderWrapper):
    """``provider``'s streams of ``model``, each reported usage checked against what the call can
    have used: an output over its ``output_limit``, an input (or a cache count) over
    ``input_limit`` is replaced by an estimate (``interrupted_usage``'s: the input counted from
    the call's prompt, the output from what the stream carried), the finish flagged
    ``estimated``; an input reported before any output (``InputReported``) that is over the
    limit is dropped, so that an attempt cut short estimates its input too."""

    def __init__(self, provider: Provider, model: ModelSpec) -> None:
        super().__init__(provider)
        self._model = model

    async def stream(self, call: ProviderCall) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's events, its usage checked."""
        produced: list[str] = []  # every piece in order: what an estimated output is counted from
        stream = self._provider.stream(call)
        try:
            async for event in stream:
                if isinstance(event, TextDelta | Heartbeat):
                    produced.append(event.text)
                elif isinstance(event, InputReported):
                    if not believable_input(self._model, event.usage):
                        self._warn(call, event.usage, "input")
                        continue
                elif isinstance(event, ProviderFinish):
                    event = self._checked(call, event, produced)
                yield event
        finally:
            await close_stream(stream)

    def _checked(self, call: ProviderCall, finish: ProviderFinish, produced: list[str]) -> ProviderFinish:
        usage = finish.usage
        output_ok = usage.output_tokens <= output_limit(self._model, call.max_output_tokens)
        input_ok = believable_input(self._model, usage)
        if output_ok and input_ok:
            return finish
        wrong = [name for name, believable in (("input", input_ok), ("output", output_ok)) if not believable]
        self._warn(call, usage, " and ".join(wrong))
        estimate = interrupted_usage(self._model, call.as_chat(), produced, usage if input_ok else None)
        if output_ok:
            estimate = replace(estimate, output_tokens=usage.output_tokens)
        return replace(finish, usage=estimate, estimated=True)

    def _warn(self, call: ProviderCall, usage: Usage, counts: str) -> None:
        warn_implausible(
            self._provider.name, self._model, usage, counts, output_limit(self._model, call.max_output_tokens)
        )


def checked(provider: Provider, model: ModelSpec) -> CheckedUsage:
    """``provider``'s streams of ``model`` as the service reads every one: its strings made valid
    text (``ValidText``), then its usage checked (``CheckedUsage``)."""
    return CheckedUsage(ValidText(provider), model)
