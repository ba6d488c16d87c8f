"""Accuracy of the local task classifier on real prompts whose kind is known from their source.

Coding: MBPP and HumanEval prompts; maths: GSM8K, MATH and MGSM prompts; creative writing:
AlpacaEval prompts that ask for a poem, story, haiku, limerick or lyrics. None of these prompts is
among the classifier's training examples (which the team wrote).

    .venv/bin/python bench/classifier.py --data ../shared/data/routing
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from routesvc.encoders import WordLlamaEncoder
from routesvc.outcomes import read_outcomes
from routesvc.strategies.classifier import TaskClassifier, read_examples

CREATIVE = re.compile(r"\b(poem|story|haiku|limerick|lyrics|song)\b", re.IGNORECASE)


def main() -> int:
    parser = argparse.ArgumentParser(description="Accuracy of the local task classifier.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    args = parser.parse_args()
    records = read_outcomes(args.data)
    classifier = TaskClassifier(WordLlamaEncoder(), read_examples())
    sets = {
        "code_generation": [r.prompt for r in records if r.task in {"mbpp", "human_eval"}],
        "multi_step_reasoning": [r.prompt for r in records if r.task in {"gsm8k", "math", "agentverse-mgsm"}],
        "creative_writing": [r.prompt for r in records if r.source == "alpaca_eval" and CREATIVE.search(r.prompt)],
    }
    for label, prompts in sets.items():
        predicted = Counter(p.task for p in classifier.predict_many(prompts))
        print(f"{label}: {predicted[label] / len(prompts):.1%} of {len(prompts)}; {dict(predicted.most_common(3))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
