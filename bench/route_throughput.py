"""Route throughput and latency: routesvc (rule-based policy) vs a bare grpc.aio server.

    .venv/bin/python -m bench.route_throughput [--duration 3] [--rounds 2] [--concurrency 1,16,128]
        [--rate 1000] [--variant NAME:KEY=VALUE,...] [--load python|go] [--connections N]

Both servers run as their own processes for the whole run; a separate process drives
closed-loop load at each concurrency, alternating the targets round by round so that drift in
the machine's speed hits both. Then an open-loop pass at ``--rate`` requests/s measures p99
against the issue's target. Reports medians over rounds, and ratios to the bare server.
A ``--variant`` adds a routesvc server with other ``server`` config fields (e.g.
``uvloop:uvloop=true`` or ``w2:workers=2``). ``--load go`` drives the load from ``bench/goload``
instead of a Python process: a Go client costs the machine far less CPU per call, so the server
under test is not starved by its own load generator; ``--connections`` spreads the calls over
several TCP connections, which ``SO_REUSEPORT`` workers need (they share a port by connection).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import _load
from bench._harness import (
    bare_server,
    cpu_seconds,
    go_load_binary,
    in_subprocess,
    policy_config,
    print_table,
    routesvc_config,
    routesvc_server,
    write_results,
)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:key=value,key=value`` -> (NAME, {key: value}) with ints and booleans parsed."""
    name, _, spec = text.partition(":")
    fields: dict[str, object] = {}
    for pair in filter(None, spec.split(",")):
        key, _, raw = pair.partition("=")
        value: object = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.isdigit():
            value = int(raw)
        fields[key] = value
    return name, fields


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.route_throughput", description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--max-requests", type=int, default=50_000, help="per run")
    parser.add_argument(
        "--unique", action="store_true", help="every request's text is new (no server-side cache ever hits)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop requests/s (0: skip)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:server_field=value,...")
    parser.add_argument(
        "--bare-variant", action="append", default=[], help="NAME:--flag,... a bare server with bench.bare_server flags"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help="NAME:default|rules|embedding[:KEY=VALUE,...] a routesvc with that policy (and server fields)",
    )
    parser.add_argument(
        "--code-variant",
        action="append",
        default=[],
        help="NAME:DIR[:POLICY] routesvc served from another source tree (POLICY as in --policy)",
    )
    parser.add_argument("--load", choices=("python", "go"), default="python", help="the load generator")
    parser.add_argument("--connections", type=int, default=1, help="TCP connections of the load (go only)")
    parser.add_argument("--output", default="route_throughput")
    args = parser.parse_args(argv)
    if args.connections != 1 and args.load != "go":
        parser.error("--connections needs --load go")
    goload = str(go_load_binary()) if args.load == "go" else ""

    def closed_loop(target: str, concurrency: int) -> dict[str, Any]:
        if goload:
            return _load.route_go(
                goload,
                target,
                concurrency=concurrency,
                duration=args.duration,
                max_requests=args.max_requests,
                unique=args.unique,
                connections=args.connections,
            )
        result: dict[str, Any] = in_subprocess(
            _load.route_closed_loop, target, concurrency, args.duration, args.max_requests, 0.5, args.unique
        )
        return result

    def open_loop_at(target: str) -> dict[str, Any]:
        if goload:
            return _load.route_go(
                goload, target, duration=args.duration, unique=args.unique, connections=args.connections, rate=args.rate
            )
        result: dict[str, Any] = in_subprocess(
            _load.route_open_loop, target, args.rate, args.duration, 0.5, args.unique
        )
        return result

    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [parse_variant(v) for v in args.variant]

    with contextlib.ExitStack() as stack:
        targets = {"bare": stack.enter_context(bare_server())}
        targets["routesvc"] = stack.enter_context(routesvc_server(routesvc_config()))
        for name, fields in variants:
            targets[name] = stack.enter_context(routesvc_server(routesvc_config(**fields)))
        fitted = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "router"
        for spec in args.policy:
            name, _, rest = spec.partition(":")
            kind, _, fields = rest.partition(":")
            config = policy_config(kind, fitted)
            config["server"].update(parse_variant(f"{name}:{fields}")[1])
            targets[name] = stack.enter_context(routesvc_server(config))
        for spec in args.code_variant:
            name, _, rest = spec.partition(":")
            folder, _, kind = rest.partition(":")
            config = policy_config(kind, fitted) if kind else routesvc_config()
            targets[name] = stack.enter_context(routesvc_server(config, code=Path(folder)))
        for spec in args.bare_variant:
            name, _, flags = spec.partition(":")
            targets[name] = stack.enter_context(bare_server(*filter(None, flags.split(","))))
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {(t, c): [] for t in targets for c in levels}
        for concurrency in levels:
            for round_ in range(args.rounds):
                order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for name in order:
                    target, pid = targets[name]
                    cpu_before = cpu_seconds(pid)
                    result = closed_loop(target, concurrency)
                    # Includes the priming calls: a slight overestimate, the same for every target.
                    result["server_cpu_us_per_call"] = round(
                        (cpu_seconds(pid) - cpu_before) * 1e6 / max(1, result["requests"] + result["primed"]), 1
                    )
                    runs[(name, concurrency)].append(result)
                    print(f"  {name} c={concurrency} round {round_}: {result}", flush=True)
        open_loop: dict[str, dict[str, Any]] = {}
        if args.rate:
            for name in targets:
                open_loop[name] = open_loop_at(targets[name][0])
                print(f"  {name} open loop {args.rate:g}/s: {open_loop[name]}", flush=True)

    rows = []
    table: list[dict[str, Any]] = []
    for concurrency in levels:
        bare_rps = _median(runs[("bare", concurrency)], "rps")
        bare_p50 = _median(runs[("bare", concurrency)], "p50_ms")
        bare_cpu = _median(runs[("bare", concurrency)], "server_cpu_us_per_call")
        for name in targets:
            sample = runs[(name, concurrency)]
            entry = {
                "target": name,
                "concurrency": concurrency,
                "rps": _median(sample, "rps"),
                "p50_ms": _median(sample, "p50_ms"),
                "p99_ms": _median(sample, "p99_ms"),
                "errors": sum(run["errors"] for run in sample),
                "rps_ratio_to_bare": round(_median(sample, "rps") / bare_rps, 3),
                "p50_ratio_to_bare": round(_median(sample, "p50_ms") / bare_p50, 3),
                "server_cpu_us_per_call": _median(sample, "server_cpu_us_per_call"),
                "cpu_ratio_to_bare": round(_median(sample, "server_cpu_us_per_call") / bare_cpu, 3),
                "runs": sample,
            }
            table.append(entry)
            rows.append(
                [
                    name,
                    concurrency,
                    entry["rps"],
                    entry["rps_ratio_to_bare"],
                    entry["p50_ms"],
                    entry["p99_ms"],
                    entry["server_cpu_us_per_call"],
                    entry["cpu_ratio_to_bare"],
                    entry["errors"],
                ]
            )
    print()
    print_table(
        ["target", "concurrency", "req/s", "x bare", "p50 ms", "p99 ms", "server CPU us/call", "x bare", "errors"], rows
    )
    if open_loop:
        print()
        print_table(
            ["target", "rate/s", "p50 ms", "p99 ms", "errors", "send lag ms"],
            [[n, r["rate"], r["p50_ms"], r["p99_ms"], r["errors"], r["send_lag_ms"]] for n, r in open_loop.items()],
        )
    path = write_results(
        args.output,
        {
            "method": f"closed loop from a separate process ({args.load}, {args.connections} connection(s)); "
            "medians over rounds",
            "load": args.load,
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "unique_texts": args.unique,
            "variants": {name: fields for name, fields in variants},
            "closed_loop": table,
            "open_loop": open_loop,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
