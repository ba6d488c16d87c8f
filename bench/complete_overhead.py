"""Complete overhead: streams through routesvc vs the same fake provider called directly.

    .venv/bin/python -m bench.complete_overhead [--duration 3] [--rounds 2] [--concurrency 1,32,128]
        [--chunks 20] [--chunk-delay 0.02] [--litellm] [--variant NAME:KEY=VALUE,...] [--load-processes 1]

One fake provider process (``python -m routesvc.testing``) answers every request with
``--chunks`` text chunks ``--chunk-delay`` seconds apart. ``direct`` streams from it with the
openai SDK (``AsyncOpenAI``); ``routesvc`` streams ``Complete`` from a ``routesvc serve``
process whose providers point at the same fake, routing the prompts with its default policy as
in production (most go to gpt-4o-mini over the openai SDK; the code request to gpt-4o, the
poem to claude-sonnet over the anthropic SDK); ``litellm`` (with ``--litellm``) streams with the
same SDK through LiteLLM's proxy in front of the same fake. Load comes from a separate
process (or, with ``--load-processes N``, from N processes side by side, the same for every
target: one Python SDK client process saturates before the service does), closed loop, targets
alternating round by round. Reported: time to first text chunk
(TTFT) and total time, p50/p99, and what each adds to ``direct``; chunk inter-arrival p99;
stalls (gaps over ``--stall`` seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from pathlib import Path
from typing import Any

from bench import _load
from bench._harness import (
    cpu_seconds,
    fake_provider,
    in_subprocesses,
    print_table,
    routesvc_config,
    routesvc_server,
    write_results,
)
from bench.litellm_proxy import litellm_available, litellm_proxy, litellm_version
from bench.route_throughput import parse_variant

_KEYS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "total_p50_ms",
    "total_p99_ms",
    "gap_p99_ms",
    "streams_per_s",
    "middle_cpu_ms_per_stream",
)


def _load_streams(args: argparse.Namespace, kind: str, target: str, concurrency: int) -> dict[str, Any]:
    """One closed-loop run at ``concurrency`` streams, split over ``--load-processes`` load
    processes running side by side (their samples merged; one process by default)."""
    processes = max(1, min(args.load_processes, concurrency))
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    argsets = [(kind, target, share, args.duration, args.max_streams, args.stall, 0.5, True) for share in shares]
    return _load.merge_streams(in_subprocesses(_load.streams, argsets), args.stall)


def _renice(pid: int, niceness: int) -> None:
    """Every thread of ``pid`` (the event loop, grpc's poller, the SDKs' pools) at ``niceness``."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(thread.name), niceness)


def run(argv: list[str] | None = None, *, litellm_default: bool = False, output: str = "complete_overhead") -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay", type=float, default=0.02)
    parser.add_argument("--stall", type=float, default=0.25, help="a gap between chunks over this is a stall")
    parser.add_argument("--max-streams", type=int, default=20_000, help="per run")
    parser.add_argument("--litellm", action="store_true", default=litellm_default, help="add LiteLLM's proxy")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:server_field=value,... (http_client=aiohttp|httpx sets every provider's transport)",
    )
    parser.add_argument(
        "--code-variant", action="append", default=[], help="NAME:DIR routesvc served from another source tree"
    )
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="split each level's streams over this many load processes (the same for every target)",
    )
    parser.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="run every routesvc process (all its threads) at this scheduling niceness, e.g. -10: an "
        "experiment on how much of the tail is waiting for a CPU on a machine the load shares (needs root "
        "for negative values)",
    )
    parser.add_argument("--output", default=output)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    notes: list[str] = []

    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(fake_provider(args.chunks, args.chunk_delay))
        # name -> (client kind, target, pid of the process in the middle; 0 for none)
        targets: dict[str, tuple[str, str, int]] = {"direct": ("openai", f"{fake}/v1", 0)}
        targets["routesvc"] = ("grpc", *stack.enter_context(routesvc_server(routesvc_config(), fake)))
        for name, fields in (parse_variant(v) for v in args.variant):
            http_client = fields.pop("http_client", None)
            config = routesvc_config(**fields)
            if http_client is not None:  # a provider field, set on every provider
                for provider in config["providers"].values():
                    provider["http_client"] = http_client
            targets[name] = ("grpc", *stack.enter_context(routesvc_server(config, fake)))
        for spec in args.code_variant:
            name, _, folder = spec.partition(":")
            served = routesvc_server(routesvc_config(), fake, code=Path(folder))
            targets[name] = ("grpc", *stack.enter_context(served))
        if args.litellm:
            problem = litellm_available()
            if problem:
                notes.append(f"litellm not measured: {problem}")
                print(notes[-1])
            else:
                targets["litellm"] = ("openai", *stack.enter_context(litellm_proxy(fake)))
        if args.server_nice:
            for kind, _, pid in targets.values():
                if kind == "grpc":
                    _renice(pid, args.server_nice)
            notes.append(f"routesvc processes ran at niceness {args.server_nice}")
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {(t, c): [] for t in targets for c in levels}
        for concurrency in levels:
            for round_ in range(args.rounds):
                order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for name in order:
                    kind, target, pid = targets[name]
                    cpu_before = cpu_seconds(pid) if pid else 0.0
                    result = _load_streams(args, kind, target, concurrency)
                    # CPU of the process in the middle per stream (priming streams included).
                    result["middle_cpu_ms_per_stream"] = (
                        round((cpu_seconds(pid) - cpu_before) * 1e3 / max(1, result["streams"] + result["primed"]), 3)
                        if pid
                        else 0.0
                    )
                    runs[(name, concurrency)].append(result)
                    print(f"  {name} c={concurrency} round {round_}: {result}", flush=True)

    table: list[dict[str, Any]] = []
    rows = []
    for concurrency in levels:
        direct = {key: statistics.median(r[key] for r in runs[("direct", concurrency)]) for key in _KEYS}
        for name in targets:
            sample = runs[(name, concurrency)]
            entry: dict[str, Any] = {"target": name, "concurrency": concurrency}
            entry |= {key: round(statistics.median(r[key] for r in sample), 3) for key in _KEYS}
            entry["added_ttft_p50_ms"] = round(entry["ttft_p50_ms"] - direct["ttft_p50_ms"], 3)
            entry["added_ttft_p99_ms"] = round(entry["ttft_p99_ms"] - direct["ttft_p99_ms"], 3)
            entry["added_total_p50_ms"] = round(entry["total_p50_ms"] - direct["total_p50_ms"], 3)
            entry["ttft_p50_ratio_to_direct"] = round(entry["ttft_p50_ms"] / direct["ttft_p50_ms"], 3)
            entry["stalls"] = sum(r["stalls"] for r in sample)
            entry["errors"] = sum(r["errors"] for r in sample)
            entry["streams"] = sum(r["streams"] for r in sample)
            entry["runs"] = sample
            table.append(entry)
            rows.append(
                [
                    name,
                    concurrency,
                    entry["streams_per_s"],
                    entry["ttft_p50_ms"],
                    entry["ttft_p99_ms"],
                    entry["added_ttft_p50_ms"],
                    entry["added_ttft_p99_ms"],
                    entry["total_p50_ms"],
                    entry["gap_p99_ms"],
                    entry["middle_cpu_ms_per_stream"],
                    entry["stalls"],
                    entry["errors"],
                ]
            )
    print()
    print_table(
        [
            "target",
            "streams",
            "streams/s",
            "ttft p50",
            "ttft p99",
            "+ttft p50",
            "+ttft p99",
            "total p50",
            "gap p99",
            "CPU/stream",
            "stalls",
            "errors",
        ],
        rows,
    )
    print("(milliseconds; + is what the target adds to calling the fake provider directly;")
    print(" CPU/stream: CPU milliseconds the process in the middle spent per stream)")
    path = write_results(
        args.output,
        {
            "method": "closed loop from separate load processes; medians over rounds; added = target - direct",
            "load_processes": args.load_processes,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "chunks": args.chunks,
            "chunk_delay_s": args.chunk_delay,
            "stall_threshold_s": args.stall,
            "notes": notes,
            "litellm_version": litellm_version() if "litellm" in targets else "",
            "results": table,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    run()
