"""The plot of docs/performance.md: latency vs concurrency, from the JSON the benchmarks wrote.

    .venv/bin/python -m bench.plot [--out docs/performance-latency.png]

Left: Route p50 and p99 for routesvc and the bare grpc.aio server (``route_throughput.json``).
Right: Complete time to first token, p50 and p99, for the fake provider called directly,
routesvc and LiteLLM's proxy (``litellm_compare.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench._harness import REPO, RESULTS

_COLOURS = {"bare": "#555555", "direct": "#555555", "routesvc": "#1f77b4", "litellm": "#d62728"}


def _series(rows: list[dict[str, Any]], target: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((row["concurrency"], row[key]) for row in rows if row["target"] == target)
    return [c for c, _ in points], [v for _, v in points]


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("--out", default=str(REPO / "docs" / "performance-latency.png"))
    args = parser.parse_args(argv)
    route = json.loads((RESULTS / "route_throughput.json").read_text())["closed_loop"]
    complete = json.loads((RESULTS / "litellm_compare.json").read_text())["results"]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in ("bare", "routesvc"):
        colour = _COLOURS[target]
        left.plot(*_series(route, target, "p50_ms"), "o-", color=colour, label=f"{target} p50")
        left.plot(*_series(route, target, "p99_ms"), "o--", color=colour, alpha=0.6, label=f"{target} p99")
    left.set_title("Route (unary), closed loop")
    for target in ("direct", "routesvc", "litellm"):
        if not any(row["target"] == target for row in complete):
            continue
        colour = _COLOURS[target]
        right.plot(*_series(complete, target, "ttft_p50_ms"), "o-", color=colour, label=f"{target} p50")
        right.plot(*_series(complete, target, "ttft_p99_ms"), "o--", color=colour, alpha=0.6, label=f"{target} p99")
    right.set_title("Complete (stream): time to first token")
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("concurrent calls")
        axes.set_ylabel("latency, ms (log)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("routesvc vs a bare grpc.aio server and LiteLLM's proxy (2 cores, loopback, fake provider)")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
