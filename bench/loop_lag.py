"""Where a served stream can wait: the service's event-loop lag, its slow callbacks and its GC pauses
under load, measured in the serving process itself.

    .venv/bin/python -m bench.loop_lag [--scenario complete|route] [--concurrency 32]
        [--load-processes 2] [--duration 10] [--slow-ms 4] [--output loop_lag]

The server runs in this process with its heap frozen as ``routesvc serve`` runs it; the load comes
from ``--load-processes`` separate processes (for ``complete`` the fake provider is one more, its
20 chunks 20 ms apart). Three probes run during the measured load: a task that sleeps 1 ms and
records how late it wakes (the loop lag any callback of a stream would see), every event-loop
callback that runs longer than ``--slow-ms`` (named by its task's coroutine), and every garbage
collection (``gc.callbacks``). Their summary is printed with the load's own TTFT figures and
written to ``bench/results/OUTPUT.json``: when the loop's worst wait is far below the streams'
TTFT tail, the tail comes from outside the service's loop (other processes on the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import time
from typing import Any

from bench import _load
from bench._harness import GcPauses, fake_provider, in_subprocesses, percentile, print_table, write_results
from bench.profile_server import in_process_settings


class _Probes:
    """Loop lag samples, callbacks over ``slow_s`` by name, and GC pauses by generation."""

    def __init__(self, slow_s: float) -> None:
        self.slow_s = slow_s
        self.lags: list[float] = []
        self.slow: collections.Counter[str] = collections.Counter()
        self.slow_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.gc = GcPauses()
        self.recording = False

    def install(self) -> None:
        run = asyncio.events.Handle._run
        probes = self

        def timed(handle: asyncio.events.Handle) -> None:
            started = time.perf_counter()
            run(handle)
            took = time.perf_counter() - started
            if probes.recording and took > probes.slow_s:
                name = _callback_name(handle)
                probes.slow[name] += 1
                probes.slow_seconds[name] += took

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    async def sample_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - started - 0.001)

    def summary(self) -> dict[str, Any]:
        pauses = [seconds for _, seconds in self.gc.pauses]
        return {
            "loop_lag_ms": {
                "samples": len(self.lags),
                "p50": round(percentile(self.lags, 50) * 1000, 2),
                "p99": round(percentile(self.lags, 99) * 1000, 2),
                "p99_9": round(percentile(self.lags, 99.9) * 1000, 2),
                "max": round(max(self.lags, default=0.0) * 1000, 2),
            },
            "slow_callbacks": [
                {"callback": name, "count": count, "total_ms": round(self.slow_seconds[name] * 1000, 1)}
                for name, count in self.slow.most_common(10)
            ],
            "gc": {
                "collections": len(pauses),
                "by_generation": dict(collections.Counter(generation for generation, _ in self.gc.pauses)),
                "max_pause_ms": round(self.gc.longest * 1000, 2),
                "over_slow_ms": sum(1 for seconds in pauses if seconds > self.slow_s),
            },
        }


def _callback_name(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return "task " + getattr(owner.get_coro(), "__qualname__", "?")
    return str(getattr(callback, "__qualname__", None) or type(callback).__name__)


async def _measure(args: argparse.Namespace, fake_base: str | None, probes: _Probes) -> dict[str, Any]:
    from routesvc.server import Server

    settings = in_process_settings(fake_base)
    per_process = max(1, args.concurrency // args.load_processes)
    async with Server(settings, port=0, freeze_heap=True) as server:

        def load(duration: float) -> list[dict[str, Any]]:
            if args.scenario == "route":
                argsets = [(server.target, per_process, duration, 10**6, 0.5)] * args.load_processes
                return in_subprocesses(_load.route_closed_loop, argsets)
            argsets = [("grpc", server.target, per_process, duration, 10**6, 1.0, 0.5)] * args.load_processes
            return in_subprocesses(_load.streams, argsets)

        await asyncio.to_thread(load, 1.0)  # warm-up: imports, connections, the classifier's memo
        stop = asyncio.Event()
        probes.recording = True
        with probes.gc:
            sampler = asyncio.create_task(probes.sample_lag(stop))
            results = await asyncio.to_thread(load, args.duration)
            stop.set()
            await sampler
        probes.recording = False
    return {"load": results, **probes.summary()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_lag", description=__doc__)
    parser.add_argument("--scenario", choices=("route", "complete"), default="complete")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--slow-ms", type=float, default=4.0)
    parser.add_argument("--output", default="loop_lag")
    args = parser.parse_args(argv)
    from routesvc.config import limit_native_threads

    limit_native_threads()  # as `routesvc serve` does
    probes = _Probes(args.slow_ms / 1000)
    probes.install()
    provider = fake_provider(20, 0.02) if args.scenario == "complete" else contextlib.nullcontext(None)
    with provider as fake:
        result = asyncio.run(_measure(args, fake, probes))
    sys.stdout = sys.__stdout__
    lag = result["loop_lag_ms"]
    print_table(["load process", "calls", "p50 ms", "p99 ms"], [_row(i, run) for i, run in enumerate(result["load"])])
    print(f"\nloop lag ms: p50 {lag['p50']}  p99 {lag['p99']}  p99.9 {lag['p99_9']}  max {lag['max']}")
    print(f"callbacks over {args.slow_ms:g} ms: {result['slow_callbacks']}")
    print(f"gc: {result['gc']}")
    path = write_results(args.output, {"scenario": args.scenario, "concurrency": args.concurrency, **result})
    print(f"\nwrote {path}")


def _row(index: int, run: dict[str, Any]) -> list[object]:
    if "ttft_p50_ms" in run:
        return [index, run["streams"], run["ttft_p50_ms"], run["ttft_p99_ms"]]
    return [index, run["requests"], run["p50_ms"], run["p99_ms"]]


if __name__ == "__main__":
    main()
