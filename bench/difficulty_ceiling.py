"""How far can a perfect *difficulty* model go? A reference for routers that learn difficulty.

For each task with the judged pair, prompts are ranked by their true difficulty measured on the
held-out rows themselves (1 - mean score of every *other* model in the file, i.e. not the pair),
which no router can know; APGR of that ranking ("difficulty") is the ceiling of routing by
difficulty alone. Since both models fail the hardest prompts, the gap can peak at middling
difficulty, so a second ceiling ("any function") ranks by the mean gap of the prompt's difficulty
decile on these same rows (fitted in-sample: optimistic). Where both are far below the oracle, the
pair's per-prompt gap is mostly not a matter of how hard the prompt is for models in general, and
no router that learns difficulty, however well, can get further.

    .venv/bin/python -m bench.difficulty_ceiling --data ../shared/data/routing [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.loto import eval_pair
from routesvc.evaluation import evaluate_scores
from routesvc.outcomes import read_outcomes


def _decile_means(difficulty: npt.NDArray[np.float64], gap: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each prompt's score: the mean gap of the prompts in its difficulty decile."""
    edges = np.quantile(difficulty, np.linspace(0.0, 1.0, 11))
    bins = np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, 9)
    means = np.array([gap[bins == b].mean() if (bins == b).any() else 0.0 for b in range(10)])
    return np.asarray(means[bins], dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.difficulty_ceiling", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--strong", default="gpt-4-1106-preview")
    parser.add_argument("--weak", default="mixtral-8x7b-instruct")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    records = read_outcomes(args.data)
    by_source: dict[str, list[int]] = defaultdict(list)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.source].append(i)
        by_task[f"{record.source}:{record.task}"].append(i)
    file_pairs = {source: eval_pair(records, rows, args.strong, args.weak) for source, rows in by_source.items()}
    result: dict[str, dict[str, float | str]] = {}
    print(f"{'task':42s}{'pair':>58s}{'rows':>6s}{'gap':>7s}{'oracle':>8s}{'difficulty':>11s}{'any function':>13s}")
    for task, rows in sorted(by_task.items()):
        strong_id, weak_id = file_pairs[records[rows[0]].source]
        keep = [i for i in rows if records[i].has_pair(strong_id, weak_id) and len(records[i].outcomes) > 2]
        if len(keep) < 50:
            continue
        strong = np.array([records[i].outcomes[strong_id] for i in keep])
        weak = np.array([records[i].outcomes[weak_id] for i in keep])
        if abs(strong.mean() - weak.mean()) < 0.05:
            continue
        others = [np.mean([v for m, v in records[i].outcomes.items() if m not in (strong_id, weak_id)]) for i in keep]
        difficulty = 1.0 - np.array(others)
        # A tiny random tie-break: many prompts share a difficulty on files with binary outcomes.
        jitter = np.random.default_rng(0).random(len(keep)) * 1e-9
        result[task] = {
            "pair": f"{strong_id} vs {weak_id}",
            "rows": len(keep),
            "gap": float(strong.mean() - weak.mean()),
            "oracle": evaluate_scores(strong - weak, strong, weak).apgr,
            "difficulty": evaluate_scores(difficulty + jitter, strong, weak).apgr,
            "any_function": evaluate_scores(_decile_means(difficulty, strong - weak) + jitter, strong, weak).apgr,
        }
        row = result[task]
        print(
            f"{task:42s}{row['pair']:>58s}{len(keep):6d}{row['gap']:7.3f}{row['oracle']:8.3f}{row['difficulty']:11.3f}{row['any_function']:13.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
