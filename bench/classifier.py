"""Accuracy of the local task classifier on real prompts whose kind is known from their source.

Coding: MBPP and HumanEval prompts; maths: GSM8K, MATH and MGSM prompts; creative writing:
AlpacaEval prompts that ask for a poem, story, haiku, limerick or lyrics. None of these prompts is
among the classifier's training examples (which the team wrote).

With ``--labels``, also real user prompts (Chatbot Arena and AlpacaEval) whose kind was decided
by reading each one (``bench/labels/README.md`` says how): ``{"source", "id", "kind"}`` lines, kind
one of coding, math, creative_writing, other, ambiguous (ids only, no prompt text).
Reports each kind's accuracy (coding as code_generation, math as multi_step_reasoning) and how
often an "other" prompt is taken for one of the three.

    .venv/bin/python bench/classifier.py --data ../shared/data/routing [--labels FILE] [--examples FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from routesvc.encoders import WordLlamaEncoder
from routesvc.outcomes import OutcomeRecord, read_outcomes
from routesvc.strategies.classifier import TaskClassifier, read_examples

CREATIVE = re.compile(r"\b(poem|story|haiku|limerick|lyrics|song)\b", re.IGNORECASE)


def main() -> int:
    parser = argparse.ArgumentParser(description="Accuracy of the local task classifier.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--labels", type=Path, help="hand labels of real user prompts")
    parser.add_argument("--examples", type=Path, help="training examples (default: shipped)")
    args = parser.parse_args()
    records = read_outcomes(args.data)
    classifier = TaskClassifier(WordLlamaEncoder(), read_examples(args.examples))
    sets = {
        "code_generation": [r.prompt for r in records if r.task in {"mbpp", "human_eval"}],
        "multi_step_reasoning": [r.prompt for r in records if r.task in {"gsm8k", "math", "agentverse-mgsm"}],
        "creative_writing": [r.prompt for r in records if r.source == "alpaca_eval" and CREATIVE.search(r.prompt)],
    }
    for label, prompts in sets.items():
        if not prompts:
            continue
        predicted = Counter(p.task for p in classifier.predict_many(prompts))
        print(f"{label}: {predicted[label] / len(prompts):.1%} of {len(prompts)}; {dict(predicted.most_common(3))}")
    if args.labels:
        _real_prompts(classifier, records, args.labels)
    return 0


KIND_LABEL = {"coding": "code_generation", "math": "multi_step_reasoning", "creative_writing": "creative_writing"}


def _real_prompts(classifier: TaskClassifier, records: list[OutcomeRecord], labels: Path) -> None:
    prompts = {(r.source, r.id): r.prompt for r in records}
    by_kind: dict[str, list[str]] = {}
    for line in labels.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_kind.setdefault(row["kind"], []).append(prompts[(row["source"], row["id"])])
    print(f"real user prompts ({labels}):")
    for kind in ("coding", "math", "creative_writing", "other"):
        texts = by_kind.get(kind, [])
        if not texts:
            continue
        predicted = Counter(p.task for p in classifier.predict_many(texts))
        if kind in KIND_LABEL:
            share = predicted[KIND_LABEL[kind]] / len(texts)
            print(f"  {kind}: {share:.1%} of {len(texts)} as {KIND_LABEL[kind]}; {dict(predicted.most_common(4))}")
        else:
            taken = sum(predicted[label] for label in KIND_LABEL.values()) / len(texts)
            print(f"  other: {taken:.1%} of {len(texts)} taken for one of the three; {dict(predicted.most_common(4))}")


if __name__ == "__main__":
    raise SystemExit(main())
