"""The ``Strategy`` protocol: one stage of a routing policy.

A policy is a chain of stages, ``rules -> ... -> default``. Each stage receives one frozen
``RoutingInput`` and a ``next`` that runs the rest of the chain. A stage may decide (return a
``Verdict`` without calling ``next``), annotate the input (for example set ``task``) and pass it
on, or pass on and amend the verdict that comes back (for example set the mode). Every stage
adds its own reasons, so the final verdict explains what each stage contributed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from routesvc.catalog import ModelSpec
from routesvc.models import AllowList, ImageEstimate, Mode, RoutingRequest, UpstreamCall

if TYPE_CHECKING:
    # Not at run time: the breakers' module imports the config, which imports the stages.
    from routesvc.breaker import Breakers


@dataclass(frozen=True, slots=True)
class RoutingInput:
    """What a stage sees: the request, derived features, and which models can serve it.

    ``eligible`` maps every catalog model id to ``""`` when it can serve the request, or to the
    reason it cannot. ``task`` is the task label known so far ("" when unknown) and
    ``task_source`` says where it came from ("hint", or the stage that set it). ``complexity`` is
    how hard the llm classifier judged the request ("low", "medium", "high"; "" when no model
    judged it: a hint kept, the local classifier, a fallback). A stage that
    calls a provider to decide (the LLM classifier) passes each call to ``charge`` as soon as it
    ends, however it ends, so that the request pays for it exactly once; when ``may_not_pay``
    says why (the tenant's budget is spent), it decides without such a call, as it does when
    ``allow_list`` refuses the model it would call (the tenant may not use it), or the model's
    circuit breaker in ``breakers`` (the router's, which its answers' calls go through) is open.
    Such a call's wait ends by ``decide_by`` (``time.monotonic()``; None: no deadline), which
    leaves what the request still needs after the decision before the server's own end of the
    call (a Complete's answer ``min_attempt_seconds`` to start); with less than
    ``min_call_seconds`` until then it is not made, and the stage decides without it. A wait so
    cut calls ``on_cut`` (the router then lets the answer's first attempt start with what is left).
    """

    request: RoutingRequest
    estimated_input_tokens: int
    estimated_output_tokens: int
    models: tuple[ModelSpec, ...]
    eligible: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    task: str = ""
    task_source: str = ""
    complexity: str = ""
    charge: Callable[[UpstreamCall], None] | None = None
    may_not_pay: str = ""
    allow_list: AllowList = field(default_factory=AllowList)
    breakers: Breakers | None = None
    decide_by: float | None = None
    min_call_seconds: float = 0.0
    on_cut: Callable[[], None] | None = None
    # ``estimated_input_tokens`` counts the images by the larger of the providers' formulas (no
    # model is chosen yet); ``estimated_image_tokens`` is the part they make up, and
    # ``image_estimate`` has them by each provider kind's formula: ``cost.estimated_cost`` prices
    # each model by its own.
    estimated_image_tokens: int = 0
    image_estimate: ImageEstimate = field(default_factory=ImageEstimate)

    def is_eligible(self, model_id: str) -> bool:
        """Whether ``model_id`` can serve this request."""
        return self.eligible.get(model_id, "unknown model") == ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's decision: the model, the mode, who decided, and why."""

    model: str
    strategy: str
    rule: str
    reasons: tuple[str, ...]
    mode: Mode = Mode.REALTIME
    task: str = ""
    # The rule ``mode`` came from; "" when no rule set it (the request's realtime flag does not
    # batch an unpinned request by itself: the decision says so).
    mode_rule: str = ""


class NextStage(Protocol):
    """The rest of the policy chain."""

    async def __call__(self, routing_input: RoutingInput, /) -> Verdict:
        """Run the remaining stages on ``routing_input``."""
        ...


class Strategy(Protocol):
    """One stage of a routing policy."""

    @property
    def name(self) -> str:
        """The stage's name as it appears in decisions, for example "rules"."""
        ...

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Decide, or annotate ``routing_input`` and defer to ``next_stage``."""
        ...
