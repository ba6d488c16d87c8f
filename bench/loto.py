"""Leave-one-task-out cross-validation of the fitted router on routing-outcome data.

For every task (``source:task``) the router is fitted on all other tasks and scores the
held-out one. The task is held out of every file that carries it, and no prompt of it is trained
on under another task (``bench/_heldout.py``); how many rows each rule kept out is printed per
task and written to the JSON (``removed``). APGR is measured for --strong/--weak where the held-out
file has that pair (model ids matched by alias), else for the file's strongest model against the
model at the first tercile of its mean scores (llmrouter: mistral-7b-instruct-v0.3, the family of
the target weak model). Tasks whose pair gap is under 0.05, or with fewer than 50 prompts, are
skipped. Writes a JSON summary and, with --plots DIR, one cost-quality plot per judged group.

    .venv/bin/python -m bench.loto --data ../shared/data/routing --json docs/loto.json --plots docs

--tasks A,B fits and scores only those held-out tasks (a pooled file is reported only when all its
tasks are among them); --merge OLD.json then writes OLD's figures with the measured ones in their
place: per-task values of the methods run replace OLD's (OLD's random baseline is kept, it depends on
which tasks drew from the generator before), and every group mean is recomputed from all its tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench._heldout import Split, leave_task_out
from routesvc.encoders import Encoder, HashingEncoder, StackedEncoder, WordLlamaEncoder
from routesvc.evaluation import RoutingCurve, evaluate_scores, plot_curves, routing_curve
from routesvc.features import bounded
from routesvc.fitting import FitSettings, fit_router, resolve_model
from routesvc.outcomes import OutcomeRecord, read_outcomes

GROUPS: dict[str, Callable[[str], bool]] = {
    "chat": lambda t: t.startswith(("arena_chat:", "alpaca_eval:")),
    "math": lambda t: t.split(":", 1)[1] in {"gsm8k", "math", "agentverse-mgsm", "mmlu-pro/math"},
    "exams": lambda t: t.startswith("mmlu_pro:") or t in {"llmrouter:mmlu", "llmrouter:gpqa"},
    "routerbench": lambda t: t.startswith("routerbench_train:"),
}


def group_means(
    results: dict[str, dict[str, float]], cpts: dict[str, dict[str, dict[str, float]]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """APGR and CPT of each group (GROUPS): the mean over the group's judged tasks, for every method
    measured on all of them."""
    summary: dict[str, dict[str, float]] = {}
    cpt_summary: dict[str, dict[str, dict[str, float]]] = {}
    for group, member in GROUPS.items():
        names = [t for t in results if member(t)]
        if not names:  # no judged task of this group in the data
            continue
        measured = [m for m in results[names[0]] if not m.startswith("_") and all(m in results[t] for t in names)]
        methods = sorted(measured, key=lambda m: {"random": 0, "oracle": 1}.get(m, 2))
        summary[group] = {m: float(np.mean([results[t][m] for t in names])) for m in methods}
        cpt_summary[group] = {
            m: {c: float(np.mean([cpts[t][m][c] for t in names])) for c in ("cpt50", "cpt80")}
            for m in methods
            if all(m in cpts[t] for t in names)
        }
    return summary, cpt_summary


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` (a --json of this script) with ``new``'s measurements in place: per task and per
    pooled file, ``new``'s values of its methods replace ``old``'s (``old``'s random baseline is kept),
    and the group means are recomputed from all the merged tasks. Other keys of ``old`` are kept."""

    def overlay(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        merged = {name: dict(values) for name, values in before.items()}
        for name, values in after.items():
            kept = merged.get(name, {})
            merged[name] = {**kept, **{m: v for m, v in values.items() if m != "random" or m not in kept}}
        return merged

    tasks = overlay(old["tasks"], new["tasks"])
    task_cpt = overlay(old["task_cpt"], new["task_cpt"])
    summary, cpt_summary = group_means(tasks, task_cpt)
    pooled = {g: v for g, v in overlay(old["summary"], new["summary"]).items() if g not in GROUPS}
    metrics = overlay({"_": old["routerbench_pooled_metrics"]}, {"_": new["routerbench_pooled_metrics"]})["_"]
    return {
        **old,
        "summary": {**summary, **pooled},
        "cpt": cpt_summary,
        "routerbench_pooled_metrics": metrics,
        "tasks": tasks,
        "task_cpt": task_cpt,
        "pairs": {**old.get("pairs", {}), **new["pairs"]},
        "removed": {**old.get("removed", {}), **new["removed"]},
    }


def eval_pair(records: list[OutcomeRecord], rows: list[int], strong: str, weak: str) -> tuple[str, str]:
    counts: dict[str, int] = defaultdict(int)
    totals: dict[str, float] = defaultdict(float)
    for i in rows:
        for model, score in records[i].outcomes.items():
            counts[model] += 1
            totals[model] += score
    common = sorted((m for m, c in counts.items() if c >= 0.9 * len(rows)), key=lambda m: totals[m] / counts[m])
    s, w = resolve_model(strong, common), resolve_model(weak, common)
    return (s or common[-1], w or common[len(common) // 3])


def variants() -> dict[str, FitSettings]:
    return {
        "default": FitSettings(),
        "calibrated proxies": FitSettings(calibrate_proxy=True),
        "gap label only": FitSettings(difficulty_weight=0.0),
        "within only": FitSettings(prior_weight=0.0),
        "prior only (kNN)": FitSettings(use_embedding=False, use_lexical=False),
        "lexical + prior": FitSettings(use_embedding=False),
        "embedding + prior": FitSettings(use_lexical=False),
        "pair files only": FitSettings(proxy_weight=0.0),
        "no kind prior": FitSettings(kind_weight=0.0),
        "kind prior x0.5": FitSettings(kind_weight=0.5),
        "kind prior x1": FitSettings(kind_weight=1.0),
        "kind prior x2": FitSettings(kind_weight=2.0),
        "kind prior x3": FitSettings(kind_weight=3.0),
        "kind prior x4": FitSettings(kind_weight=4.0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Leave-one-task-out cross-validation of the fitted router.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--strong", default="gpt-4-1106-preview")
    parser.add_argument("--weak", default="mixtral-8x7b-instruct")
    parser.add_argument(
        "--encoders",
        default="wordllama,hashing",
        help="wordllama, hashing, stacked (the shipped wordllama+hashing), minilm, minilm+hashing (bench/minilm.py)",
    )
    parser.add_argument("--variants", default="")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plots", type=Path)
    parser.add_argument("--tasks", default="", help="comma-separated file:task names to hold out (default: all)")
    parser.add_argument("--merge", type=Path, help="a --json of an earlier run to write with these figures in place")
    args = parser.parse_args()
    old = json.loads(args.merge.read_text()) if args.merge else None
    records = read_outcomes(args.data)
    tasks = [f"{r.source}:{r.task}" for r in records]
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        by_task[task].append(i)
    chosen_tasks = set(args.tasks.split(",")) if args.tasks else set(by_task)
    if unknown := sorted(chosen_tasks - set(by_task)):
        parser.error(f"--tasks: no such task in the data: {', '.join(unknown)}")
    encoders: dict[str, Encoder] = {}
    for name in args.encoders.split(","):
        if name == "wordllama":
            encoders[name] = WordLlamaEncoder()
        elif name == "hashing":
            encoders[name] = HashingEncoder()
        elif name.startswith("minilm"):  # the MiniLM experiment: "minilm" or stacked "minilm+hashing"
            from bench.minilm import bench_encoder

            encoders[name] = bench_encoder(name)
        else:
            encoders[name] = StackedEncoder([WordLlamaEncoder(), HashingEncoder()])
    chosen = {k: v for k, v in variants().items() if not args.variants or k in args.variants.split(",")}
    results: dict[str, dict[str, float]] = defaultdict(dict)
    pair_names: dict[str, str] = {}
    cpts: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    held_scores: dict[str, dict[str, npt.NDArray[np.float64]]] = defaultdict(dict)
    pairs: dict[str, tuple[str, str]] = {}
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.source].append(i)
    file_pairs = {source: eval_pair(records, rows, args.strong, args.weak) for source, rows in by_source.items()}
    for task, rows in by_task.items():
        pairs[task] = file_pairs[records[rows[0]].source]
    splits: dict[str, Split] = {task: leave_task_out(records, task) for task in by_task}
    removed = {task: {"same_task": s.same_task, "duplicate_prompts": s.duplicates} for task, s in splits.items()}
    print("training rows kept out beside each held-out task (same task in another file / its prompts verbatim):")
    for task, split in sorted(splits.items()):
        print(f"  {task:40s} {split.same_task:5d} / {split.duplicates:5d}")
    for enc_name, encoder in encoders.items():
        started = time.perf_counter()
        embeddings = encoder.encode([bounded(r.prompt) for r in records])
        print(f"{enc_name}: encoded {len(records)} prompts in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        for var_name, settings in chosen.items():
            key = f"{enc_name} / {var_name}"
            for task, rows in by_task.items():
                if task not in chosen_tasks:
                    continue
                train = splits[task].train
                router = fit_router(
                    [records[i] for i in train],
                    args.strong,
                    args.weak,
                    encoder,
                    settings,
                    embeddings=embeddings[train],
                    calibrate=False,
                )
                texts = [bounded(records[i].prompt) for i in rows]
                held_scores[key][task] = router.raw(texts, embeddings[rows])
            print(f"{key}: done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    rng = np.random.default_rng(0)
    for task, rows in sorted(by_task.items()):
        if task not in chosen_tasks:
            continue
        s, w = pairs[task]
        keep = [j for j, i in enumerate(rows) if s in records[i].outcomes and w in records[i].outcomes]
        strong = np.array([records[rows[j]].outcomes[s] for j in keep])
        weak = np.array([records[rows[j]].outcomes[w] for j in keep])
        # A small pair gap makes PGR a ratio of noise (APGR far above 1 or below 0): skip those.
        if len(keep) < 50 or abs(strong.mean() - weak.mean()) < 0.05:
            continue
        results[task]["oracle"] = evaluate_scores(strong - weak, strong, weak).apgr
        results[task]["random"] = float(
            np.mean([evaluate_scores(rng.random(len(keep)), strong, weak).apgr for _ in range(20)])
        )
        for key, per_task in held_scores.items():
            report = evaluate_scores(per_task[task][keep], strong, weak)
            results[task][key] = report.apgr
            cpts[task][key] = {"cpt50": report.cpt50, "cpt80": report.cpt80}
        oracle_report = evaluate_scores(strong - weak, strong, weak)
        cpts[task]["oracle"] = {"cpt50": oracle_report.cpt50, "cpt80": oracle_report.cpt80}
        pair_names[task] = f"{s} vs {w}"
        results[task]["_n"] = len(keep)
        results[task]["_gap"] = float(strong.mean() - weak.mean())
    # CPT(x%): the share of strong calls needed to recover x% of the gap (lower is better; random
    # needs x%). Mean over the group's held-out tasks, like APGR.
    summary, cpt_summary = group_means(results, cpts)
    methods = ["random", "oracle", *held_scores]
    # RouterBench rows as one mixed file: pooled held-out scores of its tasks.
    rb = [t for t in by_task if t.startswith("routerbench_train:")]
    # A pooled file is reported only when all its tasks were held out and scored in this run.
    pooled_metrics: dict[str, dict[str, float | None]] = {}
    curves: dict[str, RoutingCurve] = {}
    if rb and set(rb) <= chosen_tasks:
        rows = [i for t in rb for i in by_task[t]]
        s, w = args.strong, args.weak
        keep = [k for k, i in enumerate(rows) if records[i].has_pair(s, w)]
        strong = np.array([records[rows[k]].outcomes[s] for k in keep])
        weak = np.array([records[rows[k]].outcomes[w] for k in keep])
        strong_cost = np.array([records[rows[k]].cost_usd.get(s, np.nan) for k in keep])
        weak_cost = np.array([records[rows[k]].cost_usd.get(w, np.nan) for k in keep])
        known = not (np.isnan(strong_cost).any() or np.isnan(weak_cost).any())
        costs = (strong_cost, weak_cost) if known else (None, None)
        pooled: dict[str, float] = {"oracle": evaluate_scores(strong - weak, strong, weak).apgr, "random": 0.5}

        # CPT and AIQ of the pooled file (AIQ from its real per-prompt costs); random is the mean of 20.
        def pooled_report(score: npt.NDArray[np.float64]) -> tuple[float, dict[str, float | None]]:
            report = evaluate_scores(score, strong, weak, *costs)
            return report.apgr, {"cpt50": report.cpt50, "cpt80": report.cpt80, "aiq": report.aiq}

        pooled_metrics["oracle"] = pooled_report(strong - weak)[1]
        randoms = [pooled_report(rng.random(len(keep)))[1] for _ in range(20)]
        pooled_metrics["random"] = {
            c: float(np.mean([v for r in randoms if (v := r[c]) is not None])) for c in ("cpt50", "cpt80", "aiq")
        }
        for key, per_task in held_scores.items():
            score = np.concatenate([per_task[t] for t in rb])[keep]
            pooled[key], pooled_metrics[key] = pooled_report(score)
            curves[key] = routing_curve(score, strong, weak)
        curves["oracle"] = routing_curve(strong - weak, strong, weak)
        summary["routerbench pooled"] = pooled
    # Every other file of several tasks as one mixed file too (its own evaluation pair): what a
    # held-out file mixing subjects or kinds of request rewards, beside the per-task means above.
    for source, source_rows in sorted(by_source.items()):
        source_tasks = {tasks[i] for i in source_rows}
        if source == "routerbench_train" or len(source_tasks) < 2 or not source_tasks <= chosen_tasks:
            continue
        s, w = file_pairs[source]
        ordered = [i for t in sorted(source_tasks) for i in by_task[t]]
        keep = [k for k, i in enumerate(ordered) if s in records[i].outcomes and w in records[i].outcomes]
        strong = np.array([records[ordered[k]].outcomes[s] for k in keep])
        weak = np.array([records[ordered[k]].outcomes[w] for k in keep])
        row = {"oracle": evaluate_scores(strong - weak, strong, weak).apgr, "random": 0.5}
        for key, per_task in held_scores.items():
            score = np.concatenate([per_task[t] for t in sorted(source_tasks)])[keep]
            row[key] = evaluate_scores(score, strong, weak).apgr
        summary[f"{source} pooled"] = row
    width = max(len(m) for m in methods) + 2
    print(f"{'group':22s}" + "".join(f"{m[:width]:>{width}s}" for m in methods))
    for group, row in summary.items():
        print(f"{group:22s}" + "".join(f"{row[m]:>{width}.3f}" for m in methods))
    print("CPT(50%) / CPT(80%), share of strong calls (random: 0.50 / 0.80):")
    for group, by_method in cpt_summary.items():
        cells = "".join(
            f"{v['cpt50']:>{width // 2 + 3}.3f}/{v['cpt80']:<{width // 2 - 2}.3f}" for v in by_method.values()
        )
        print(f"{group:22s}" + cells)
    print("routerbench pooled CPT(50%) / CPT(80%) / AIQ:")
    for name, metrics in pooled_metrics.items():
        aiq_text = "n/a" if metrics["aiq"] is None else f"{metrics['aiq']:.3f}"
        print(f"  {name:40s} {metrics['cpt50']:.3f} / {metrics['cpt80']:.3f} / {aiq_text}")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        if curves:
            plot_curves(curves, args.plots / "loto-routerbench.png", "RouterBench rows, leave-one-task-out")
        for group in ("chat", "math", "exams"):
            names = [t for t in results if GROUPS[group](t)]
            if not names:
                continue
            task = max(names, key=lambda t: results[t]["_n"])
            rows = by_task[task]
            s, w = pairs[task]
            keep = [j for j, i in enumerate(rows) if s in records[i].outcomes and w in records[i].outcomes]
            strong = np.array([records[rows[j]].outcomes[s] for j in keep])
            weak = np.array([records[rows[j]].outcomes[w] for j in keep])
            group_curves = {k: routing_curve(v[task][keep], strong, weak) for k, v in held_scores.items()}
            group_curves["oracle"] = routing_curve(strong - weak, strong, weak)
            safe = task.replace("/", "-").replace(":", "-").replace(" ", "-")
            plot_curves(group_curves, args.plots / f"loto-{safe}.png", f"{task} held out ({s} vs {w})")
    if args.json:
        payload: dict[str, Any] = {
            "summary": summary,
            "cpt": cpt_summary,
            "routerbench_pooled_metrics": pooled_metrics,
            "tasks": results,
            "task_cpt": cpts,
            "pairs": pair_names,
            "removed": removed,
        }
        if old is not None:
            payload = merge(old, payload)
            print(f"with {args.merge}: group means over all tasks:")
            for group, row in payload["summary"].items():
                print(f"{group:22s}" + "".join(f"{row[m]:>{width}.3f}" for m in methods if m in row))
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
