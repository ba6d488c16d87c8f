"""Which kinds of chat prompt does the router send to the strong model, and which need it?

Every prompt of the judge-scored chat file (``--file``, default ``arena_chat``) is labelled by the
shipped local task classifier; the router is fitted, as ``routesvc fit`` would, on every *other*
file (the chat file held out, and with it its tasks in any other file and any copy of its prompts:
``bench/_heldout.py``), and scores the file. For each label the table gives the pair's true
mean gap next to the router's two parts (the within-task model and the neighbour prior), then the
APGR of ranking the prompts by label alone (labels ordered by ``--order``, ties broken at random),
of the router, and of its parts (the kind prior adds a fixed amount to code and multi-step reasoning
prompts, by the same classifier's labels). It answers whether the router ranks *kinds* of chat request the
way the outcomes do, which is what a mixed-category chat set (e.g. MT-Bench-style) rewards.

    .venv/bin/python -m bench.chat_categories --data ../shared/data/routing [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench._heldout import leave_out
from routesvc.config import limit_native_threads
from routesvc.encoders import DEFAULT_ROUTER_ENCODER, load_encoder
from routesvc.evaluation import evaluate_scores
from routesvc.features import bounded
from routesvc.fitting import FitSettings, fit_router
from routesvc.outcomes import read_outcomes


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_categories", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--file", default="arena_chat", help="source held out and judged")
    parser.add_argument("--strong", default="gpt-4-1106-preview")
    parser.add_argument("--weak", default="mixtral-8x7b-instruct")
    parser.add_argument("--without", action="append", default=[], help="source left out of the fit too")
    parser.add_argument("--order", default="code_generation,multi_step_reasoning,creative_writing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limit_native_threads()
    records = read_outcomes(args.data)
    held = [i for i, r in enumerate(records) if r.source == args.file and r.has_pair(args.strong, args.weak)]
    if not held:
        raise SystemExit(f"no rows of {args.file!r} with both {args.strong} and {args.weak}")
    whole_file = [i for i, r in enumerate(records) if r.source == args.file]
    others = [i for i, r in enumerate(records) if r.source != args.file and r.source not in args.without]
    split = leave_out(records, whole_file, others)
    train = split.train
    encoder = load_encoder(DEFAULT_ROUTER_ENCODER)
    router = fit_router([records[i] for i in train], args.strong, args.weak, encoder, FitSettings(), calibrate=False)
    texts = [bounded(records[i].prompt) for i in held]
    embeddings = encoder.encode(texts)
    within = router.within.predict(router.features(texts, embeddings))[:, 0]
    prior = router.prior(embeddings)
    labels = router.label(texts)
    kind = router.kind_prior(texts, labels)
    strong = np.array([records[i].outcomes[args.strong] for i in held])
    weak = np.array([records[i].outcomes[args.weak] for i in held])
    by_label: dict[str, list[int]] = defaultdict(list)
    for j, label in enumerate(labels):
        by_label[label].append(j)
    table = {
        label: {
            "prompts": len(rows),
            "gap": float((strong[rows] - weak[rows]).mean()),
            "within": float(within[rows].mean()),
            "prior": float(prior[rows].mean()),
            "kind": float(kind[rows].mean()),
        }
        for label, rows in sorted(by_label.items(), key=lambda kv: -len(kv[1]))
    }
    order = args.order.split(",")
    rank = np.array([len(order) - order.index(label) if label in order else 0 for label in labels], dtype=float)
    rng = np.random.default_rng(0)
    by_label_only = [evaluate_scores(rank + 1e-3 * rng.random(len(rank)), strong, weak).apgr for _ in range(20)]
    apgr = {
        "labels alone": float(np.mean(by_label_only)),
        "router": evaluate_scores(within + prior + kind, strong, weak).apgr,
        "router without the kind prior": evaluate_scores(within + prior, strong, weak).apgr,
        "within only": evaluate_scores(within, strong, weak).apgr,
        "prior only": evaluate_scores(prior, strong, weak).apgr,
        "oracle": evaluate_scores(strong - weak, strong, weak).apgr,
    }
    print(f"{args.file} held out ({len(held)} prompts), fitted without {[args.file, *args.without]}")
    kept_out = f"{split.same_task} rows of its tasks in other files, {split.duplicates} copies of its prompts"
    print(f"kept out of the fit: {kept_out}")
    print(f"{'label':24s}{'prompts':>8s}{'true gap':>10s}{'within':>9s}{'prior':>8s}{'kind':>8s}")
    for label, row in table.items():
        cells = f"{row['gap']:10.3f}{row['within']:9.3f}{row['prior']:8.3f}{row['kind']:8.3f}"
        print(f"{label:24s}{row['prompts']:8d}{cells}")
    for name, value in apgr.items():
        print(f"APGR {name:30s}{value:.3f}")
    if args.json:
        summary = {"file": args.file, "without": args.without, "labels": table, "apgr": apgr}
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
