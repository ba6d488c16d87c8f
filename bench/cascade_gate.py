"""Measure the local scorer as a cascade gate on real answers (RouterBench rows).

For each (cheap, strong) pair of models, every row with both models' answers and outcomes is
replayed: the cheap model's real answer is scored by ``routesvc.scoring.LocalScorer`` and
released when it scores at least the threshold, else the strong model's answer is taken
(escalation). The outcomes in the file say how good each answer was, so we can count:

- strong calls saved: the share of rows that did not escalate (all-strong makes one strong call
  per row);
- quality kept: the cascade's mean outcome as a share of the all-strong mean;
- the gate's precision (escalated rows whose cheap answer was wrong) and recall (wrong cheap
  answers that were escalated), against a random gate with the same escalation rate and the
  oracle that escalates exactly the rows where the cheap answer was wrong;
- cost with the file's real per-answer costs (the cascade pays the cheap call always, the strong
  one on escalation).

The data is read from ../shared/data/routing/ and never copied::

    .venv/bin/python bench/cascade_gate.py [--data PATH] [--threshold 0.8] [--json]
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesvc.models import ChatRequest, FinishReason, Message, Role, RoutingRequest
from routesvc.scoring import LocalScorer

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "routing" / "routerbench_train.jsonl"
PAIRS = (
    ("gpt-3.5-turbo-1106", "gpt-4-1106-preview"),
    ("mixtral-8x7b-instruct", "gpt-4-1106-preview"),
    ("llama-2-70b-chat", "gpt-4-1106-preview"),
    ("mistral-7b-instruct", "gpt-4-1106-preview"),
    ("claude-instant-v1", "claude-v2"),
)


@dataclass
class PairResult:
    """The cascade of one pair of models over the rows that have both."""

    cheap: str
    strong: str
    rows: int = 0
    escalated: int = 0
    cheap_quality: float = 0.0
    strong_quality: float = 0.0
    cascade_quality: float = 0.0
    oracle_quality: float = 0.0
    cheap_wrong: int = 0
    escalated_wrong: int = 0
    cheap_cost: float = 0.0
    strong_cost: float = 0.0
    cascade_cost: float = 0.0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_json(self) -> dict[str, Any]:
        """The measured numbers, rounded for a report."""
        rate = self.escalated / self.rows
        # A random gate escalating the same share of rows: expected quality.
        random_quality = (1 - rate) * self.cheap_quality + rate * self.strong_quality
        return {
            "cheap": self.cheap,
            "strong": self.strong,
            "rows": self.rows,
            "escalation_rate": round(rate, 4),
            "strong_calls_saved": round(1 - rate, 4),
            "quality_cheap_only": round(self.cheap_quality / self.rows, 4),
            "quality_strong_only": round(self.strong_quality / self.rows, 4),
            "quality_cascade": round(self.cascade_quality / self.rows, 4),
            "quality_random_gate": round(random_quality / self.rows, 4),
            "quality_oracle_gate": round(self.oracle_quality / self.rows, 4),
            "quality_kept": round(self.cascade_quality / self.strong_quality, 4) if self.strong_quality else None,
            "gate_precision": round(self.escalated_wrong / self.escalated, 4) if self.escalated else None,
            "gate_recall": round(self.escalated_wrong / self.cheap_wrong, 4) if self.cheap_wrong else None,
            "cost_strong_only_usd": round(self.strong_cost, 4),
            "cost_cascade_usd": round(self.cascade_cost, 4),
            "cost_cheap_only_usd": round(self.cheap_cost, 4),
            "escalation_reasons": dict(self.reasons.most_common()),
        }


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The JSONL rows of ``path``."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def answer_text(response: object) -> str:
    """A RouterBench answer: the file keeps each as the text of a Python list of strings."""
    text = str(response or "")
    if text.startswith("["):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(parts, list):
            return "".join(str(part) for part in parts)
    return text


def measure(rows: list[dict[str, Any]], cheap: str, strong: str, threshold: float) -> PairResult:
    """Replay the cascade ``cheap -> strong`` gated by the local scorer over ``rows``."""
    scorer = LocalScorer()
    result = PairResult(cheap, strong)
    for row in rows:
        outcomes, responses, costs = row.get("outcomes", {}), row.get("responses") or {}, row.get("cost_usd") or {}
        if not all(m in outcomes and m in responses for m in (cheap, strong)):
            continue
        request = RoutingRequest(ChatRequest((Message(Role.USER, row["prompt"]),)))
        # The file keeps no finish reasons; the answers are complete ones.
        quality = scorer.verdict(request, answer_text(responses[cheap]), FinishReason.STOP)
        cheap_outcome, strong_outcome = float(outcomes[cheap]), float(outcomes[strong])
        cheap_cost, strong_cost = float(costs.get(cheap, 0.0)), float(costs.get(strong, 0.0))
        escalate = quality.score < threshold
        result.rows += 1
        result.cheap_quality += cheap_outcome
        result.strong_quality += strong_outcome
        result.oracle_quality += max(cheap_outcome, strong_outcome)
        result.cheap_cost += cheap_cost
        result.strong_cost += strong_cost
        result.cascade_cost += cheap_cost + (strong_cost if escalate else 0.0)
        wrong = cheap_outcome < 0.5
        result.cheap_wrong += wrong
        if escalate:
            result.escalated += 1
            result.escalated_wrong += wrong
            result.cascade_quality += strong_outcome
            result.reasons[quality.reason] += 1
        else:
            result.cascade_quality += cheap_outcome
    return result


def main(argv: list[str] | None = None) -> int:
    """Print one result per pair (a table, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = list(read_rows(args.data))
    results = [measure(rows, cheap, strong, args.threshold).as_json() for cheap, strong in PAIRS]
    if args.json:
        print(json.dumps({"data": args.data.name, "threshold": args.threshold, "pairs": results}, indent=2))
        return 0
    print(f"{args.data.name}, threshold {args.threshold}")
    header = "cheap -> strong | rows | escalated | strong calls saved | quality cheap / cascade / strong "
    print(header + "| kept | random gate | precision / recall | cost cascade / strong USD")
    for r in results:
        print(
            f"{r['cheap']} -> {r['strong']} | {r['rows']} | {r['escalation_rate']:.1%} | "
            f"{r['strong_calls_saved']:.1%} | {r['quality_cheap_only']:.3f} / {r['quality_cascade']:.3f} / "
            f"{r['quality_strong_only']:.3f} | {r['quality_kept']:.1%} | {r['quality_random_gate']:.3f} | "
            f"{r['gate_precision']} / {r['gate_recall']} | {r['cost_cascade_usd']} / {r['cost_strong_only_usd']}"
        )
        print(f"    escalation reasons: {r['escalation_reasons']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
