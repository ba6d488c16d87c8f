"""Held-out rows of tasks the router has seen: K-fold cross-validation over one file's rows.

Leave-one-task-out (``bench/loto.py``) asks how the router does on a task it never saw. Held-out
rows of a known data set (the issue's "held-out RouterBench rows") are the other case: their tasks
are in the training data, only the rows are new. Here every row of ``--file`` is scored exactly
once by a router fitted, as ``routesvc fit`` would, on all the other files plus the other K-1
folds of this one (folds stratified by task, fixed seed), with calibrated scores, so that the
folds pool into one held-out file. A row of another file or fold whose prompt is a held-out
row's verbatim (``llmrouter`` carries 72 of RouterBench's MBPP prompts) is kept out of that
fold's fit, and counted (``bench/_heldout.py``). Reports pooled and per-task APGR for the pair, against
random and the oracle.

    .venv/bin/python -m bench.rowfold --data ../shared/data/routing --file routerbench_train --folds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench._heldout import blind_training
from routesvc.config import limit_native_threads
from routesvc.encoders import DEFAULT_ROUTER_ENCODER, load_encoder
from routesvc.evaluation import evaluate_scores
from routesvc.features import bounded
from routesvc.fitting import FitSettings, fit_router
from routesvc.outcomes import read_outcomes


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rowfold", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--file", default="routerbench_train", help="source whose rows are held out")
    parser.add_argument("--strong", default="gpt-4-1106-preview")
    parser.add_argument("--weak", default="mixtral-8x7b-instruct")
    parser.add_argument("--judge-strong", help="pair the held-out rows are judged on (default: --strong)")
    parser.add_argument("--judge-weak", help="(default: --weak)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--encoder", default=DEFAULT_ROUTER_ENCODER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="FitSettings field=value (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limit_native_threads()
    records = read_outcomes(args.data)
    if args.encoder.startswith("minilm"):  # the MiniLM experiment (bench/minilm.py), cached vectors
        from bench.minilm import bench_encoder

        encoder = bench_encoder(args.encoder)
    else:
        encoder = load_encoder(args.encoder)
    started = time.perf_counter()
    embeddings = encoder.encode([bounded(r.prompt) for r in records])
    print(f"encoded {len(records)} prompts in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    held = [i for i, r in enumerate(records) if r.source == args.file]
    if not held:
        raise SystemExit(f"no rows of source {args.file!r} in {args.data}")
    rng = np.random.default_rng(args.seed)
    fold_of: dict[int, int] = {}
    by_task: dict[str, list[int]] = defaultdict(list)
    for i in held:
        by_task[records[i].task].append(i)
    for rows in by_task.values():
        order = rng.permutation(len(rows))
        for position, k in enumerate(order):
            fold_of[rows[k]] = position % args.folds
    scores = np.zeros(len(records))
    settings = FitSettings()
    for pair in args.set:
        key, _, value = pair.partition("=")
        kind = type(getattr(settings, key))
        parsed = value.lower() == "true" if kind is bool else kind(value)
        settings = dataclasses.replace(settings, **{key: parsed})
    print(f"settings: {settings}", file=sys.stderr)
    duplicates: list[int] = []  # per fold: training rows kept out as copies of a held-out prompt
    for fold in range(args.folds):
        test = [i for i in held if fold_of[i] == fold]
        split = blind_training(records, test, (i for i in range(len(records)) if fold_of.get(i, -1) != fold))
        train = split.train
        duplicates.append(split.duplicates)
        router = fit_router(
            [records[i] for i in train], args.strong, args.weak, encoder, settings, embeddings=embeddings[train]
        )
        scores[test] = router.calibrate(router.raw([bounded(records[i].prompt) for i in test], embeddings[test]))
        print(
            f"fold {fold}: {len(test)} rows scored, {split.duplicates} training rows kept out as copies of"
            f" held-out prompts ({time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
        )
    judge_strong, judge_weak = args.judge_strong or args.strong, args.judge_weak or args.weak
    result: dict[str, dict[str, float]] = {}
    random_rng = np.random.default_rng(1)
    groups = {"pooled": held, **{f"task:{task}": rows for task, rows in sorted(by_task.items())}}
    for name, rows in groups.items():
        keep = [i for i in rows if records[i].has_pair(judge_strong, judge_weak)]
        strong = np.array([records[i].outcomes[judge_strong] for i in keep])
        weak = np.array([records[i].outcomes[judge_weak] for i in keep])
        ours = evaluate_scores(scores[keep], strong, weak)
        result[name] = {
            "rows": len(keep),
            "gap": float(strong.mean() - weak.mean()),
            "apgr": ours.apgr,
            "random": float(
                np.mean([evaluate_scores(random_rng.random(len(keep)), strong, weak).apgr for _ in range(20)])
            ),
            "oracle": evaluate_scores(strong - weak, strong, weak).apgr,
        }
    print(f"{'held-out rows':28s}{'rows':>6s}{'gap':>8s}{'random':>8s}{'oracle':>8s}{'router':>8s}")
    for name, row in result.items():
        print(
            f"{name:28s}{row['rows']:6.0f}{row['gap']:8.3f}{row['random']:8.3f}{row['oracle']:8.3f}{row['apgr']:8.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "file": args.file,
                    "folds": args.folds,
                    "encoder": args.encoder,
                    "duplicates_kept_out": duplicates,
                    **result,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
