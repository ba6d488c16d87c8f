"""Side calls: provider calls made for a request besides its answer (a cascade judge's, an LLM
classifier's), paid by the request however they end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from routesvc.catalog import ModelSpec
from routesvc.cost import interrupted_usage
from routesvc.errors import ProviderError, ProviderStalled, ProviderTimedOut, counts_against_model
from routesvc.models import Heartbeat, InputReported, ProviderEvent, ProviderFinish, TextDelta, UpstreamCall, Usage
from routesvc.providers.base import Provider, ProviderCall, close_stream
from routesvc.reported_usage import checked

if TYPE_CHECKING:
    # Not at run time: the breakers' module imports the config, which imports the classifier (a
    # caller of this module).
    from routesvc.breaker import Breakers, Permit


@dataclass(frozen=True, slots=True)
class SideCallResult:
    """What a side call returned: its text, its finish (None when cut short), what it used, and
    the timeout or provider error that ended it early (None when it finished)."""

    text: str
    finish: ProviderFinish | None
    used: UpstreamCall
    error: TimeoutError | ProviderError | None = None


def deterministic_temperature(model: ModelSpec) -> float | None:
    """A side call's temperature on ``model``: 0, so that its answer is deterministic, or none for
    a model that refuses the parameter (OpenAI's reasoning models)."""
    return None if "temperature" in model.unsupported_parameters else 0.0


def upstream_call(
    model: ModelSpec,
    call: ProviderCall,
    produced: Sequence[str],
    finish: ProviderFinish | None,
    *,
    refused: bool,
    reported: Usage | None = None,
    cancelled: bool = False,
) -> UpstreamCall:
    """What a side call used: the provider's usage when it finished (flagged when the provider did
    not report it and the adapter estimated it); when it was cut short after the provider had it
    (``cancelled`` with the request, or ended by a timeout or an error),
    ``interrupted_usage`` of ``call`` (what it ``produced``, every piece in order, and its input
    as the provider ``reported`` it, when it did), flagged, as its span counts it; when the
    provider ``refused`` it before any output, or it was cut before its request went out
    (``call.sent``), nothing (flagged ``cancelled`` when the request was: cancelled wins)."""
    if finish is not None:
        return UpstreamCall(model.id, finish.usage, estimated=finish.estimated, finished=True)
    if refused or not (produced or call.sent.is_set()):
        return UpstreamCall(model.id, Usage(), refused=not cancelled, cancelled=cancelled)
    usage = interrupted_usage(model, call.as_chat(), produced, reported)
    return UpstreamCall(model.id, usage, estimated=True, cancelled=cancelled)


def settle_breaker(
    breakers: Breakers,
    permit: Permit,
    error: TimeoutError | ProviderError | None,
    *,
    answered: bool,
    understood: bool,
) -> None:
    """Tell the model's breaker how a side call on ``permit`` ended (a classifier's, a judge's).

    A provider failure counts against the model as an answer call's does (held open for the
    provider's Retry-After when longer); a refusal of this request (400s, a spent quota) before
    any output, or the call's own timeout, is no verdict. An answer the caller ``understood`` (a
    label, a score) is a verdict only as the half-open probe's, which it closes; on a closed
    breaker it is no sign the model can answer (a long answer may fail where a short side call
    does not). An answer not in the format asked for (not ``understood``) is no verdict at all,
    the probe's turn given back: the server answered, and what it said depends on the prompt,
    which the tenant writes."""
    if error is None:
        if understood:
            breakers.record_probe_success(permit)
        else:
            # Neither closed nor opened again: the next call to the model probes it.
            breakers.release_probe(permit)
    elif isinstance(error, TimeoutError | ProviderTimedOut) or not counts_against_model(error, answered):
        breakers.release_probe(permit)
    else:
        breakers.record_failure(permit.model, error.retry_after)


class _Within:
    """``provider``'s streams of ``model``, failing with ``ProviderTimedOut`` once the call's
    ``timeout`` has passed (``expired`` then says so). It runs inside the observed stream, so the
    call's span ends as a failure of our timer, as the router's timers end theirs, not as the
    cancellation an ``asyncio.timeout`` around the stream would look like from inside."""

    def __init__(self, provider: Provider, model: ModelSpec) -> None:
        self._provider = provider
        self._model = model
        self.expired = False

    async def stream(self, call: ProviderCall) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's events, until ``call.timeout`` has passed."""
        stream = self._provider.stream(call)
        iterator = aiter(stream)
        deadline = None if call.timeout is None else asyncio.get_running_loop().time() + call.timeout
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    self.expired = True
                    model = self._model
                    raise ProviderTimedOut(
                        f"model {model.id} did not answer within {call.timeout:g} s",
                        provider=model.provider,
                        model=model.id,
                    ) from None
                yield event
        finally:
            await close_stream(stream)


async def side_call(
    provider: Provider,
    model: ModelSpec,
    call: ProviderCall,
    *,
    purpose: str,
    charge: Callable[[UpstreamCall], None] | None,
) -> SideCallResult:
    """Stream ``call`` within ``call.timeout`` in a client span of ``purpose``, collecting its text.

    However the call ends (finished, timed out, refused, the request cancelled) the upstream
    response is closed at once and what it used goes to ``charge`` exactly once. A timeout or a
    provider error comes back in ``error``; a cancellation propagates.
    """
    # Imported here: the config module imports the classifier (a caller), and telemetry imports
    # the config.
    from routesvc import telemetry

    texts: list[str] = []
    produced: list[str] = []  # every piece in order (text, reasoning, tool calls): billed output
    finish: ProviderFinish | None = None
    reported: Usage | None = None
    error: TimeoutError | ProviderError | None = None
    refused = False
    cancelled = False
    timed = _Within(checked(provider, model), model)
    stream = telemetry.observed_stream(timed, model, call, purpose=purpose)
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                texts.append(event.text)
                produced.append(event.text)
            elif isinstance(event, Heartbeat):
                produced.append(event.text)
            elif isinstance(event, InputReported):
                reported = event.usage
            elif isinstance(event, ProviderFinish):
                finish = event
    except ProviderError as exc:
        # Our own timer's end comes back as a timeout, as the callers tell it apart.
        error = TimeoutError(str(exc)) if timed.expired else exc
        # Refused by the provider before any output: nothing billed. The deadline passing (our
        # timer's or the provider client's) ends it from our side once sent: estimated, as its
        # span says.
        refused = not produced and not isinstance(exc, ProviderTimedOut | ProviderStalled)
    except asyncio.CancelledError:
        cancelled = finish is None
        raise
    finally:
        try:
            await close_stream(stream)
        finally:
            # Charged even when a second cancellation interrupts the close.
            used = upstream_call(model, call, produced, finish, refused=refused, reported=reported, cancelled=cancelled)
            if charge is not None:
                charge(used)
    return SideCallResult("".join(texts), finish, used, error)
