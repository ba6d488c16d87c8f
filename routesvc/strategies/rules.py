"""Rule-based routing: ordered rules over request features; first model-setting match wins."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from routesvc.config import RuleConfig, RulesStageConfig
from routesvc.models import Mode
from routesvc.strategies.base import NextStage, RoutingInput, Verdict


@dataclass(frozen=True, slots=True)
class _Rule:
    config: RuleConfig
    pattern: re.Pattern[str] | None


def _match(rule: _Rule, routing_input: RoutingInput) -> str | None:
    """Why ``rule`` matches ``routing_input`` ("; "-joined facts), or None when it does not."""
    when = rule.config.when
    context = routing_input.request.context
    chat = routing_input.request.chat
    facts: list[str] = []
    tokens = routing_input.estimated_input_tokens
    if when.input_tokens_gt is not None:
        if not tokens > when.input_tokens_gt:
            return None
        facts.append(f"estimated input tokens {tokens} > {when.input_tokens_gt}")
    if when.input_tokens_lt is not None:
        if not tokens < when.input_tokens_lt:
            return None
        facts.append(f"estimated input tokens {tokens} < {when.input_tokens_lt}")
    if when.tools_gt is not None:
        if not len(chat.tools) > when.tools_gt:
            return None
        facts.append(f"{len(chat.tools)} tools > {when.tools_gt}")
    if when.user_tier_in is not None:
        if context.user_tier not in when.user_tier_in:
            return None
        facts.append(f"user tier {context.user_tier!r}")
    if when.tenant_in is not None:
        if context.tenant not in when.tenant_in:
            return None
        facts.append(f"tenant {context.tenant!r}")
    if when.task_in is not None:
        if routing_input.task not in when.task_in:
            return None
        facts.append(f"task {routing_input.task!r} (from {routing_input.task_source})")
    if when.complexity_in is not None:
        if routing_input.complexity not in when.complexity_in:
            return None
        facts.append(f"complexity {routing_input.complexity!r} (from {routing_input.task_source})")
    if when.realtime is not None:
        if context.realtime is not when.realtime:
            return None
        facts.append(f"realtime={str(context.realtime).lower()}")
    if when.metadata is not None:
        for key, value in when.metadata.items():
            if context.metadata.get(key) != value:
                return None
            facts.append(f"metadata {key}={value!r}")
    if rule.pattern is not None:
        if rule.pattern.search(chat.last_user_message) is None:
            return None
        # Say that the pattern matched, never what it matched: that would be prompt text.
        facts.append("last user message matches the rule's pattern")
    return "; ".join(facts)


class RulesStrategy:
    """Ordered rules. Precedence is list order.

    Every matching rule is listed in the reasons. The first matching rule that sets a model
    whose model can serve the request picks it; a matching rule whose model cannot is skipped
    with its reason. The mode comes from the first, in precedence order, of the chosen rule (when
    it sets one) and the matching rules that set a mode and no model: a rule that only sets the
    mode applies together with whichever rule picks the model, and a skipped or overridden rule
    sets nothing, its mode included. A reason names the rule the mode came from. When no rule
    picks a model, the rest of the chain decides and the mode is applied to its verdict.
    """

    name = "rules"

    def __init__(self, rules: Sequence[RuleConfig]) -> None:
        self._rules = tuple(
            _Rule(
                rule, re.compile(rule.when.last_user_message_matches) if rule.when.last_user_message_matches else None
            )
            for rule in rules
        )

    @classmethod
    def from_config(cls, config: RulesStageConfig) -> RulesStrategy:
        """The stage described by ``config``."""
        return cls(config.rules)

    def may_batch(self, realtime: bool) -> bool:
        """Whether a rule here may set batch mode for a request whose ``realtime`` is this (a rule
        whose condition does not require the other value): the rules are the one way to batch."""
        return any(
            rule.config.mode == "batch" and rule.config.when.realtime in (None, realtime) for rule in self._rules
        )

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Pick the model of the first applicable matching rule, else defer to ``next_stage``."""
        reasons: list[str] = []
        chosen: RuleConfig | None = None
        # The rule the mode comes from: the first matching rule that sets a mode and no model, or the
        # chosen rule when it sets one and no such rule comes before it.
        mode_rule: RuleConfig | None = None
        for position, rule in enumerate(self._rules, start=1):
            facts = _match(rule, routing_input)
            if facts is None:
                continue
            config = rule.config
            target = []
            if config.model is not None:
                target.append(f"model {config.model}")
            if config.mode is not None:
                target.append(f"mode {config.mode}")
            line = f"rule {config.name} (precedence {position}) matched: {facts} -> {', '.join(target)}"
            if config.model is not None:
                if chosen is not None:
                    line += f"; overridden by {chosen.name}"
                elif not routing_input.is_eligible(config.model):
                    line += f"; skipped: {routing_input.eligible.get(config.model, 'unknown model')}"
                else:
                    chosen = config
                    if config.mode is not None and mode_rule is None:
                        mode_rule = config
                    line += "; chosen"
            elif config.mode is not None and mode_rule is None:
                mode_rule = config
            reasons.append(line)
        mode = Mode(mode_rule.mode) if mode_rule is not None and mode_rule.mode is not None else None
        if mode_rule is not None:
            reasons.append(f"mode {mode_rule.mode} from rule {mode_rule.name}")
        if chosen is not None and chosen.model is not None:
            return Verdict(
                model=chosen.model,
                strategy=self.name,
                rule=chosen.name,
                reasons=tuple(reasons),
                mode=mode or Mode.REALTIME,
                task=routing_input.task,
                mode_rule=mode_rule.name if mode_rule is not None else "",
            )
        verdict = await next_stage(routing_input)
        return replace(
            verdict,
            reasons=(*reasons, *verdict.reasons) if reasons else ("no rule matched", *verdict.reasons),
            mode=mode or verdict.mode,
            mode_rule=mode_rule.name if mode_rule is not None else verdict.mode_rule,
        )
