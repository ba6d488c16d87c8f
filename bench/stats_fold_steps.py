"""The longest step a GetStats fold holds the event loop for: a full window of distinct tenants.

    .venv/bin/python -m bench.stats_fold_steps [--tenants 100000] [--repeat 3]

Fills a ``RoutingStats`` window with one outcome per tenant (and a late charge and a feedback score
for every tenth), then runs its fold step by step as ``GetStats`` does, timing each step between
two turns of the event loop: the slices, and ``summary()`` after them (which, before the summary
was sliced too, was the last step: sorting models, picking the tenant rows, the latency percentiles).
Prints the longest slice, the median one, ``summary()`` and the number of steps (the best of
``--repeat`` runs for each). The garbage collector is off while the steps are timed unless
``--gc``: its pauses (a full collection over the fold's new objects) land in whichever step they
fall in, and ``bench.loop_lag`` measures them apart.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from decimal import Decimal

from routesvc.stats import FeedbackOutcome, LateCharge, RequestOutcome, RoutingStats


def _filled(tenants: int) -> RoutingStats:
    rng = random.Random(7)
    stats = RoutingStats(3600, tenants, "gpt-4o", clock=lambda: 100.0)
    for i in range(tenants):
        cost = Decimal(rng.randrange(1, 5000)) / 1_000_000
        stats.add(
            RequestOutcome(
                at=50.0,
                tenant=f"tenant-{i:06d}",
                model=rng.choice(("gpt-4o-mini", "gpt-4o", "claude-sonnet")),
                selected_model="gpt-4o-mini",
                strategy="rules",
                ok=rng.random() > 0.01,
                cost_usd=cost,
                baseline_cost_usd=cost * 4,
                estimated_cost_usd=cost,
                estimated_baseline_cost_usd=cost * 4,
                latency_seconds=rng.random(),
                time_to_first_chunk_seconds=rng.random() / 4,
                baseline_model="gpt-4o",
            )
        )
        if i % 10 == 0:
            stats.add_late_charge(LateCharge(50.0, f"tenant-{i:06d}", "gpt-4o", Decimal("0.0001")))
            stats.add_feedback(FeedbackOutcome(50.0, f"tenant-{i:06d}", "gpt-4o", rng.random(), f"d{i}"))
    return stats


def _steps(stats: RoutingStats) -> tuple[float, float, float, int]:
    """The longest and the median slice and ``summary()``, in seconds, and how many steps the fold
    took."""
    fold = stats._fold("", None)
    durations = []
    slices = fold.slices()
    while True:
        start = time.perf_counter()
        try:
            next(slices)
        except StopIteration:
            break
        durations.append(time.perf_counter() - start)
    start = time.perf_counter()
    fold.summary()
    last = time.perf_counter() - start
    durations.sort()
    return durations[-1], durations[len(durations) // 2], last, len(durations) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gc", action="store_true", help="leave the garbage collector on")
    args = parser.parse_args()
    stats = _filled(args.tenants)
    gc.collect()
    gc.freeze()  # as `routesvc serve` does once started
    if not args.gc:
        gc.disable()
    try:
        runs = [_steps(stats) for _ in range(args.repeat)]
    finally:
        gc.enable()
    longest, median, last = (min(run[i] for run in runs) * 1000 for i in range(3))
    print(f"tenants={args.tenants} steps={runs[0][3]}")
    print(f"longest slice: {longest:.1f} ms, median {median:.2f} ms; summary(): {last:.1f} ms")


if __name__ == "__main__":
    main()
