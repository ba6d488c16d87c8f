"""What-if simulation: route every prompt of a JSONL file through the configured policy, offline.

No provider is called, so a policy with a classifier stage of method llm (whose labels are a
model's answers) is refused at the start, naming the stage. Each line needs a ``prompt``
string; ``tenant``, ``user_tier`` and ``task_hint`` are used as the routing context when
present, so a line looks like what a client would send (a ``tenant``'s configured ``user_tier``
applies as the service applies it). The routing-outcomes format (``../shared/data/routing``)
qualifies: its ``outcomes`` (model -> score in [0, 1]) give the quality kept when the file scored
both the chosen model and the baseline. Dataset model names rarely equal catalog ids, so
``model_map`` maps catalog ids to the file's names (``gpt-4o-mini=gpt-3.5-turbo-1106``); unmapped
ids are looked up as they are.

Costs are estimates, exactly as ``Route`` reports them: estimated input tokens of the prompt and
the configured ``default_output_tokens`` (or the line's ``max_output_tokens``), at catalog
prices. The baseline cost prices the same tokens on the baseline model (``telemetry.baseline_model``,
default the most expensive). These are the numbers ``GetStats`` reports as ``estimated_cost_usd``
and ``estimated_baseline_cost_usd`` after the same prompts are sent through the live service.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from routesvc import wire
from routesvc.config import Settings
from routesvc.cost import estimated_cost, format_usd
from routesvc.errors import ConfigError, RouteSvcError
from routesvc.jsonlines import JsonLineError, json_lines
from routesvc.outcomes import OutcomeDataError, model_numbers
from routesvc.router import Router, with_tenant_defaults
from routesvc.strategies.classifier import ClassifierStageConfig
from routesvc.strategies.embedding import EmbeddingStageConfig
from routesvc.v1 import router_pb2 as pb


class SimulationDataError(RouteSvcError):
    """A simulation input line is not usable; names the file and line."""

    reason = "INVALID_SIMULATION_DATA"


@dataclass(frozen=True, slots=True)
class SimulatedPrompt:
    """One line of the input: what to route (as a client would send it: ``simulate`` checks it as
    the service does), and the file's scores per model, if any."""

    where: str
    message: pb.RouteRequest
    outcomes: Mapping[str, float] = field(default_factory=dict)


@dataclass
class ModelShare:
    """One model's part of the simulated traffic."""

    model: str
    requests: int = 0
    estimated_cost_usd: Decimal = Decimal(0)


@dataclass
class SimulationReport:
    """The model mix, cost, savings and quality kept of routing a file's prompts."""

    prompts: int = 0
    skipped: int = 0
    baseline_model: str = ""
    estimated_cost_usd: Decimal = Decimal(0)
    baseline_cost_usd: Decimal = Decimal(0)
    models: dict[str, ModelShare] = field(default_factory=dict)
    scored: int = 0
    chosen_score: float = 0.0
    baseline_score: float = 0.0
    model_map: dict[str, str] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def savings_usd(self) -> Decimal:
        """Baseline cost minus estimated cost."""
        return self.baseline_cost_usd - self.estimated_cost_usd

    @property
    def savings_percent(self) -> float:
        """Savings as a percentage of the baseline cost."""
        return float(self.savings_usd / self.baseline_cost_usd * 100) if self.baseline_cost_usd else 0.0

    @property
    def quality_kept(self) -> float | None:
        """Sum of the chosen models' scores over the baseline's, on prompts scored for both."""
        return self.chosen_score / self.baseline_score if self.scored and self.baseline_score else None

    def as_json(self) -> dict[str, object]:
        """The report as plain JSON types (money as decimal strings)."""
        return {
            "prompts": self.prompts,
            "skipped": self.skipped,
            "errors": dict(self.errors),
            "baseline_model": self.baseline_model,
            "estimated_cost_usd": format_usd(self.estimated_cost_usd),
            "baseline_cost_usd": format_usd(self.baseline_cost_usd),
            "savings_usd": format_usd(self.savings_usd),
            "savings_percent": round(self.savings_percent, 4),
            "models": [
                {
                    "model": share.model,
                    "requests": share.requests,
                    "share": share.requests / self.prompts if self.prompts else 0.0,
                    "estimated_cost_usd": format_usd(share.estimated_cost_usd),
                }
                for share in sorted(self.models.values(), key=lambda s: (-s.requests, s.model))
            ],
            "quality": {
                "scored_prompts": self.scored,
                "model_map": dict(self.model_map),
                "chosen_mean_score": self.chosen_score / self.scored if self.scored else None,
                "baseline_mean_score": self.baseline_score / self.scored if self.scored else None,
                "quality_kept": self.quality_kept,
            },
        }

    def as_text(self) -> str:
        """The report for people."""
        lines = [f"prompts:         {self.prompts}" + (f" ({self.skipped} not routable)" if self.skipped else "")]
        lines.append("model mix:")
        for share in sorted(self.models.values(), key=lambda s: (-s.requests, s.model)):
            percent = share.requests / self.prompts * 100 if self.prompts else 0.0
            lines.append(
                f"  {share.model:<20} {share.requests:>7}  {percent:5.1f}%  {format_usd(share.estimated_cost_usd)} USD"
            )
        lines += [
            f"estimated cost:  {format_usd(self.estimated_cost_usd)} USD",
            f"baseline cost:   {format_usd(self.baseline_cost_usd)} USD (all on {self.baseline_model})",
            f"savings:         {format_usd(self.savings_usd)} USD ({self.savings_percent:.1f}%)",
        ]
        kept = self.quality_kept
        if kept is None:
            lines.append("quality kept:    n/a (no prompt scored for both the chosen and the baseline model)")
        else:
            lines.append(f"quality kept:    {kept * 100:.1f}% over {self.scored} scored prompts")
        for catalog_id, dataset_id in sorted(self.model_map.items()):
            lines.append(f"  {catalog_id} scored as {dataset_id}")
        return "\n".join(lines)


def parse_model_map(pairs: Iterable[str]) -> dict[str, str]:
    """``CATALOG_ID=DATASET_ID`` items as a dict."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        catalog_id, sep, dataset_id = pair.partition("=")
        if not sep or not catalog_id or not dataset_id:
            raise SimulationDataError(f"--model-map {pair!r}: expected CATALOG_ID=DATASET_ID")
        mapping[catalog_id] = dataset_id
    return mapping


def _scores(value: object, where: str) -> dict[str, float]:
    """The line's ``outcomes``: model -> score, each a finite number in [0, 1], as ``fit`` reads them."""
    if value is None:
        return {}
    try:
        return dict(model_numbers(value, f"{where}: outcomes", high=1.0))
    except OutcomeDataError as exc:
        raise SimulationDataError(exc.message) from None


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def read_prompts(path: Path) -> Iterator[SimulatedPrompt]:
    """The prompts of a JSONL file, in order; a bad line raises naming the file and line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SimulationDataError(f"{path}: cannot read: {exc.strerror}") from exc
    with handle:
        try:
            for number, raw in json_lines(handle, path):
                yield _prompt(raw, f"{path}:{number}")
        except JsonLineError as exc:
            raise SimulationDataError(exc.message) from exc


def _prompt(raw: object, where: str) -> SimulatedPrompt:
    """One line's JSON value as a ``SimulatedPrompt``; ``where`` names the file and line in errors."""
    if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str):
        raise SimulationDataError(f"{where}: expected an object with a string 'prompt'")
    try:
        raw["prompt"].encode()
    except UnicodeEncodeError:  # a lone surrogate escape: JSON reads it, nothing can send it
        raise SimulationDataError(f"{where}: 'prompt' is not valid UTF-8 (a lone surrogate)") from None
    max_output = raw.get("max_output_tokens")
    if max_output is not None and (isinstance(max_output, bool) or not isinstance(max_output, int)):
        raise SimulationDataError(f"{where}: max_output_tokens must be a whole number")
    if max_output is not None and not _INT32_MIN <= max_output <= _INT32_MAX:
        raise SimulationDataError(f"{where}: max_output_tokens is out of the 32-bit range")
    context = pb.RoutingContext(
        tenant=str(raw.get("tenant") or ""),
        user_tier=str(raw.get("user_tier") or ""),
        task_hint=str(raw.get("task_hint") or ""),
    )
    chat = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=raw["prompt"])], max_output_tokens=max_output)
    message = pb.RouteRequest(chat=chat, context=context)
    return SimulatedPrompt(where, message, _scores(raw.get("outcomes"), where))


def _without_feedback(settings: Settings) -> Settings:
    """``settings`` with no embedding stage's ``feedback_db``: a simulated decision is not one
    to wait for feedback on, and remembering it in the live store would push real ones out."""
    routing = settings.config.routing
    stages = tuple(
        stage.model_copy(update={"feedback_db": None}) if isinstance(stage, EmbeddingStageConfig) else stage
        for stage in routing.stages
    )
    config = settings.config.model_copy(update={"routing": routing.model_copy(update={"stages": stages})})
    return dataclasses.replace(settings, config=config)


def _refuse_provider_stages(settings: Settings) -> None:
    """Raise ``ConfigError`` naming the first stage that labels requests by calling a provider
    (a classifier stage with method llm): the simulation calls none, and the model's labels, which
    route the live requests, cannot be predicted offline (its local fallback labels only the
    requests the model fails to)."""
    for index, stage in enumerate(settings.config.routing.stages):
        if isinstance(stage, ClassifierStageConfig) and stage.method == "llm":
            raise ConfigError(
                f"{settings.source}: routing.stages[{index}].method: simulate calls no provider, so it cannot"
                " run a classifier stage with method llm (its labels are the model's answers); simulate"
                " with method local in that stage"
            )


async def simulate(
    settings: Settings, prompts: Iterable[SimulatedPrompt], model_map: Mapping[str, str] | None = None
) -> SimulationReport:
    """Route every prompt with the configured policy (no provider is called) and sum up.

    No feedback store is opened: the simulation neither writes its decisions into the live one
    nor uses the feedback the live service has learned from.
    """
    _refuse_provider_stages(settings)
    baseline = settings.catalog.get(settings.telemetry.baseline_model)
    mapping = dict(model_map or {})
    for catalog_id in mapping:
        settings.catalog.get(catalog_id)  # an unknown catalog id fails here, naming the known ones
    report = SimulationReport(baseline_model=baseline.id, model_map=mapping)
    router = Router(_without_feedback(settings), providers={})
    try:
        await _route_all(router, settings, prompts, report)
    finally:
        await router.aclose()
    return report


async def _route_all(
    router: Router, settings: Settings, prompts: Iterable[SimulatedPrompt], report: SimulationReport
) -> None:
    """Route ``prompts`` with ``router``, adding each decision (or why there is none) to ``report``."""
    baseline = settings.catalog.get(report.baseline_model)
    mapping = report.model_map
    for prompt in prompts:
        try:
            # What the service would refuse (an empty prompt, max_output_tokens below 1 or over
            # the cap) is counted as not routable, by its reason, like a request no model serves.
            request = wire.routing_request(prompt.message, settings.config.limits)
            # The tenant's configured defaults (its user_tier), as the service applies them.
            request = with_tenant_defaults(request, settings.config.tenants.get(request.context.tenant))
            decision = await router.route(request)
        except RouteSvcError as error:
            report.skipped += 1
            report.errors[error.reason] = report.errors.get(error.reason, 0) + 1
            continue
        report.prompts += 1
        share = report.models.setdefault(decision.model, ModelShare(decision.model))
        share.requests += 1
        share.estimated_cost_usd += decision.estimated_cost_usd
        report.estimated_cost_usd += decision.estimated_cost_usd
        report.baseline_cost_usd += estimated_cost(baseline, decision, decision.mode)
        chosen = prompt.outcomes.get(mapping.get(decision.model, decision.model))
        reference = prompt.outcomes.get(mapping.get(baseline.id, baseline.id))
        if chosen is not None and reference is not None:
            report.scored += 1
            report.chosen_score += chosen
            report.baseline_score += reference
