"""Soak benchmark (RELIABILITY 23, issue 6): mixed streaming load with injected provider faults and
client cancels, for a configurable time, against a real server; reports every lost, duplicated or
reordered chunk (there must be none), upstream abort latency, and memory, tasks and file
descriptors over time.

    python -m bench.soak --minutes 10 --concurrency 32 --fault-rate 0.05 --cancel-rate 0.10

The server runs in this process (so its memory, asyncio tasks and descriptors can be sampled);
the fake provider and the load generator run in a child process on loopback. Each chunk's text
is its own index ("000017;"), so every stream can be checked on its own: the deltas received must
be exactly 0..k-1, and k must equal the provider's chunk count on success or the committed
trailer's count on an interrupted stream. Results go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench._harness import provider_environ
from routesvc.client import RouterClient, build_chat
from routesvc.config import LoggingConfig, parse_config
from routesvc.server import Server
from routesvc.telemetry import configure_logging
from routesvc.testing import FakeProvider, Fault, RecordedRequest, Script

RESULTS = Path(__file__).parent / "results"
_TAG = re.compile(r"(req-\d+) please")

FAULTS: list[dict[str, Any]] = [
    {"status": 503},
    {"status": 429, "retry_after": "0"},
    {"status": 500},
    {"fault": Fault.CUT},
    {"fault": Fault.RESET},
    {"fault": Fault.ERROR_EVENT},
    {"fault": Fault.HANG},
    {"fault": Fault.MALFORMED_LINE},
    {"fault": Fault.MISSING_TERMINATOR},
    {"fault": Fault.HANG_BEFORE_HEADERS},
    {"fault": Fault.NOT_AN_OBJECT},
    {"fault": Fault.WRONG_TYPES},
    {"fault": Fault.BAD_FRAMING},
]


def chunk_text(index: int) -> str:
    return f"{index:06d};"


@dataclass
class Tally:
    requests: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    chunks: int = 0
    lost_or_duplicated: int = 0
    violations: list[str] = field(default_factory=list)
    cancel_times: dict[str, float] = field(default_factory=dict)
    # Deltas received by each stream that ended UNAVAILABLE without a client cancel.
    unavailable_deltas: dict[str, int] = field(default_factory=dict)
    cuts_checked: int = 0


def _check(tag: str, texts: list[str], expected: int | None, tally: Tally) -> None:
    """The deltas must be chunks 0..k-1 in order; k must equal ``expected`` when known."""
    tally.chunks += len(texts)
    if texts != [chunk_text(i) for i in range(len(texts))] or (expected is not None and expected != len(texts)):
        tally.lost_or_duplicated += 1
        if len(tally.violations) < 20:
            tally.violations.append(f"{tag}: got {len(texts)} chunks, expected {expected}")


def _check_cut(record: RecordedRequest, tag: str, tally: Tally) -> None:
    """RELIABILITY 7: a provider's FIN after content delivers every chunk it sent before it.
    Scripts are taken from a shared queue by whichever request comes first, so the fake's record
    (which script, how many chunks sent) is matched to the stream by the tag in its prompt."""
    script = record.script
    if script is None or script.fault is not Fault.CUT or record.chunks_sent == 0:
        return
    delivered = tally.unavailable_deltas.get(tag)
    if delivered is None:  # the client cancelled, or the stream ended otherwise
        return
    tally.cuts_checked += 1
    if delivered != record.chunks_sent:
        tally.lost_or_duplicated += 1
        if len(tally.violations) < 20:
            tally.violations.append(f"{tag}: provider cut after {record.chunks_sent} chunks, {delivered} delivered")


async def _one(
    client: RouterClient, fake: FakeProvider, tally: Tally, rng: random.Random, args: argparse.Namespace
) -> None:
    tag = f"req-{tally.requests}"
    tally.requests += 1
    chunks = rng.randint(5, 40)
    script = Script(chunks=tuple(chunk_text(i) for i in range(chunks)), chunk_delay=args.chunk_delay, hang_seconds=None)
    if rng.random() < args.fault_rate:
        fault = dict(rng.choice(FAULTS))
        fault.setdefault("fault_after", rng.randint(0, chunks - 1))
        script = Script(
            chunks=script.chunks,
            chunk_delay=args.chunk_delay,
            hang_seconds=None,
            **fault,  # type: ignore[arg-type]
        )
    fake.enqueue(script)
    cancel_after = rng.randint(0, chunks) if rng.random() < args.cancel_rate else None
    texts: list[str] = []
    stream = client.complete(build_chat([("user", f"{tag} please answer")]), timeout=args.deadline)
    try:
        async for message in stream:
            kind = message.WhichOneof("event")
            if kind == "delta":
                texts.append(message.delta.text)
                if cancel_after is not None and len(texts) >= cancel_after:
                    tally.cancel_times[tag] = time.monotonic()
                    break
            elif kind == "completion":
                tally.completed += 1
                _check(tag, texts, int(message.completion.usage.output_tokens), tally)
                return
            elif kind == "decision" and cancel_after == 0:
                tally.cancel_times[tag] = time.monotonic()
                break
        if cancel_after is not None:
            tally.cancelled += 1
            _check(tag, texts, None, tally)
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        tally.errors[code] = tally.errors.get(code, 0) + 1
        trailers = dict(error.trailing_metadata() or ())
        committed = trailers.get("routesvc-chunks-sent")
        _check(tag, texts, int(committed) if committed is not None else (0 if not texts else None), tally)
        if code == "UNAVAILABLE" and cancel_after is None:
            tally.unavailable_deltas[tag] = len(texts)
    finally:
        await stream.aclose()


async def _load(to_server: Any, from_server: Any, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    # Requests that find the script queue empty (retries take scripts too) get this default,
    # which is self-describing like the rest.
    async with FakeProvider(default=Script(chunks=tuple(chunk_text(i) for i in range(5)))) as fake:
        to_server.put(fake.base_url)
        target = _get_str(from_server)
        tally = Tally()
        async with RouterClient(target) as client:
            deadline = time.monotonic() + args.minutes * 60

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await _one(client, fake, tally, rng, args)

            await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        await asyncio.sleep(1.5)
        faults = sum(
            1
            for r in fake.requests
            if r.script is not None and (r.script.fault is not Fault.NONE or r.script.status != 200)
        )
        aborts = []
        for record in fake.requests:
            body = record.body if isinstance(record.body, dict) else {}
            found = _TAG.search(json.dumps(body.get("messages", "")))
            cancelled_at = tally.cancel_times.get(found.group(1)) if found else None
            if cancelled_at is not None and record.aborted_at is not None:
                aborts.append(max(0.0, record.aborted_at - cancelled_at))
            _check_cut(record, found.group(1) if found else "", tally)
        to_server.put(
            {
                "requests": tally.requests,
                "completed": tally.completed,
                "cancelled_by_client": tally.cancelled,
                "errors": tally.errors,
                "chunks_checked": tally.chunks,
                "lost_duplicated_or_reordered_streams": tally.lost_or_duplicated,
                "violations": tally.violations,
                "cuts_checked": tally.cuts_checked,
                "upstream_calls": len(fake.requests),
                "injected_faults": faults,
                "upstream_abort_after_cancel_s": {
                    "count": len(aborts),
                    "p50": statistics.median(aborts) if aborts else None,
                    "p99": sorted(aborts)[int(len(aborts) * 0.99) - 1] if aborts else None,
                    "max": max(aborts) if aborts else None,
                },
            }
        )


def _get_str(queue: Any) -> str:
    value = queue.get()
    assert isinstance(value, str)
    return value


def _load_process(to_server: Any, from_server: Any, args: argparse.Namespace) -> None:
    asyncio.run(_load(to_server, from_server, args))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _load_mallinfo2() -> Any:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _load_mallinfo2()


def _malloc_mib() -> tuple[float, float]:
    """glibc's bytes in use by malloc and held by it (arenas plus mmapped blocks), in MiB; (0, 0) elsewhere."""
    if _MALLINFO2 is None:
        return 0.0, 0.0
    info = _MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20, (info.arena + info.hblkhd) / 2**20


def _sample(started: float) -> dict[str, float]:
    """RSS, Python's live small blocks, what malloc has handed out and what it holds (in use flat
    while held grows is fragmentation, not a leak), asyncio tasks and open descriptors."""
    in_use, held = _malloc_mib()
    return {
        "t_s": round(time.monotonic() - started, 1),
        "rss_mib": round(_rss_mib(), 1),
        "py_blocks": sys.getallocatedblocks(),
        "malloc_in_use_mib": round(in_use, 1),
        "malloc_held_mib": round(held, 1),
        "traced_python_mib": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def _growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[str]:
    """The 15 call sites whose live Python memory grew most between the two snapshots."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    lines = []
    for stat in stats[:15]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks: {frames}")
    return lines


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    # One queue each way: the load process sends the fake's URL and, at the end, its results; the
    # server sends its target. (Sharing one queue both ways let the sampling loop see the target
    # it had just sent as a result and stop sampling.)
    from_load, to_load = context.Queue(), context.Queue()
    process = context.Process(target=_load_process, args=(from_load, to_load, args))
    process.start()
    fake_url = await asyncio.to_thread(from_load.get)
    config = yaml.safe_load((Path(__file__).parent.parent / "routesvc" / "default_config.yaml").read_text())
    config["reliability"] = {
        "stream_idle_timeout_seconds": 1.0,
        "first_token_timeout_seconds": 2.0,
        "backoff_seconds": 0.01,
        "ledger_entries": args.ledger_entries,
        "breaker": {"failure_threshold": 1_000_000, "open_seconds": 1},
    }
    config["telemetry"] = {"stats_window_seconds": args.stats_window}
    for provider in config["providers"].values():
        provider["http_client"] = args.http_client
    settings = parse_config(yaml.safe_dump(config), "<soak>", provider_environ(fake_url))
    samples: list[dict[str, float]] = []
    warm_snapshot: tracemalloc.Snapshot | None = None
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)
    # As `routesvc serve` runs it: the start-up heap frozen (the samples' gc.collect() then walks
    # only what the load creates).
    async with Server(settings, port=0, freeze_heap=True) as server:
        to_load.put(server.target)
        started = time.monotonic()
        while process.is_alive() and from_load.empty():
            gc.collect()
            samples.append(_sample(started))
            if args.tracemalloc and warm_snapshot is None and time.monotonic() - started >= args.warmup_seconds:
                warm_snapshot = tracemalloc.take_snapshot()
            await asyncio.sleep(args.sample_seconds)
        result: dict[str, Any] = await asyncio.to_thread(from_load.get)
        gc.collect()
        samples.append(_sample(started))
        if warm_snapshot is not None:
            result["tracemalloc_growth"] = _growth(warm_snapshot, tracemalloc.take_snapshot())
        ledger = server.router.ledger.entries()
        result["ledger_attempts"] = len(ledger)
    process.join(timeout=30)
    result["samples"] = samples
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--cancel-rate", type=float, default=0.10)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--chunk-delay", type=float, default=0.001, help="seconds between provider chunks")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ledger-entries", type=int, default=20_000, help="ledger capacity (bounded state; lower shows the plateau)"
    )
    parser.add_argument("--stats-window", type=float, default=3600.0, help="GetStats window in seconds")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace Python allocations with FRAMES frames and report the sites that grew after warm-up (slow)",
    )
    parser.add_argument("--warmup-seconds", type=float, default=120.0, help="memory growth is measured after this")
    parser.add_argument("--http-client", choices=("httpx", "aiohttp"), default="aiohttp", help="providers' transport")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    from routesvc.config import limit_native_threads

    # One BLAS thread, as `routesvc serve` does: the server runs in this process, and on 2 cores
    # OpenBLAS's spinning threads (the classifier's products cross its threading size) took a
    # third of the soak's request rate.
    limit_native_threads()
    configure_logging(LoggingConfig(level="error", format="json"))
    result = asyncio.run(_serve(args))
    result["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    samples = result["samples"]
    warm = [s for s in samples if s["t_s"] >= min(args.warmup_seconds, samples[-1]["t_s"] / 2)] or samples
    result["memory_growth_after_warmup_pct"] = round(
        100 * (warm[-1]["rss_mib"] - warm[0]["rss_mib"]) / warm[0]["rss_mib"], 2
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"requests {result['requests']}  completed {result['completed']}  cancelled {result['cancelled_by_client']}")
    print(f"errors {result['errors']}")
    print(f"injected faults {result['injected_faults']}  upstream calls {result['upstream_calls']}")
    bad = result["lost_duplicated_or_reordered_streams"]
    print(f"chunks checked {result['chunks_checked']}  lost/duplicated/reordered streams {bad}")
    print(f"provider cuts after content checked for every chunk sent: {result['cuts_checked']}")
    print(f"upstream abort after cancel: {result['upstream_abort_after_cancel_s']}")
    print(
        f"rss {warm[0]['rss_mib']} -> {warm[-1]['rss_mib']} MiB after warm-up "
        f"({result['memory_growth_after_warmup_pct']}%), "
        f"tasks {samples[0]['tasks']} -> {samples[-1]['tasks']}, fds {samples[0]['fds']} -> {samples[-1]['fds']}, "
        f"python blocks {warm[0]['py_blocks']} -> {warm[-1]['py_blocks']}, malloc in use "
        f"{warm[0]['malloc_in_use_mib']} -> {warm[-1]['malloc_in_use_mib']} MiB, held "
        f"{warm[0]['malloc_held_mib']} -> {warm[-1]['malloc_held_mib']} MiB"
    )
    for line in result.get("tracemalloc_growth", []):
        print(line)


if __name__ == "__main__":
    main()
