"""Small synthetic routing-outcome data for the fitting and embedding tests."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

from routesvc.outcomes import OutcomeRecord

STRONG = "big-model"
WEAK = "small-model"

EASY = ["say hello to {}", "what colour is the {} sky", "name a fruit like {}", "greet my friend {}"]
HARD = [
    "prove that {} squared plus 17 times 23 equals 4091 minus 12",
    "compute the integral of {} times 3 plus 44 divided by 7",
    "solve 12 x + 7 = 3 y for {} with 19 and 88",
    "calculate 345 * 19 - 77 / 3 for case {}",
]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def records(
    source: str = "synthetic", task: str = "mixed", strong: str = STRONG, weak: str = WEAK
) -> list[OutcomeRecord]:
    """Hard prompts: the strong model wins; easy prompts: both models succeed."""
    rows: list[OutcomeRecord] = []
    for kind, templates in (("easy", EASY), ("hard", HARD)):
        for t, template in enumerate(templates):
            for word in WORDS:
                outcome = {strong: 1.0, weak: 0.0 if kind == "hard" else 1.0, "other": 0.5}
                rows.append(
                    OutcomeRecord(
                        id=f"{source}/{kind}-{t}-{word}",
                        prompt=template.format(word),
                        task=f"{task}-{t % 2}",
                        outcomes=MappingProxyType(outcome),
                        cost_usd=MappingProxyType({strong: 0.01, weak: 0.001}),
                        source=source,
                    )
                )
    return rows


def write_jsonl(path: Path, rows: list[OutcomeRecord]) -> Path:
    """Write ``rows`` in the routing-outcomes format."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(
                json.dumps(
                    {
                        "id": row.id,
                        "prompt": row.prompt,
                        "task": row.task,
                        "outcomes": dict(row.outcomes),
                        "cost_usd": dict(row.cost_usd),
                    }
                )
                + "\n"
            )
    return path
