"""Load generators. Each runs in its own process (see ``_harness.in_subprocess``) with its own
event loop, talks to loopback only, and stops at ``duration`` seconds or ``max_requests``,
whichever comes first. They return plain dicts of summary numbers (no raw samples cross the
process boundary).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from bench._harness import BENCH_KEY, PROMPTS, GcPauses, percentile, summary_ms


def _route_requests(with_hints: bool) -> list[Any]:
    from routesvc.v1 import router_pb2 as pb

    requests = []
    for prompt, hint in PROMPTS:
        chat = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=prompt)])
        context = pb.RoutingContext(task_hint=hint if with_hints else "")
        requests.append((chat, context))
    return requests


def _picker(requests: list[Any], unique: bool) -> Any:
    """``pick(index)``: the mix in turn, or with ``unique`` a copy whose user message ends in this
    load process's own tag and a serial number, so that no server-side cache (token counts,
    embeddings, labels) ever sees a text twice, also across rounds."""
    serial = itertools.count()
    tag = os.urandom(4).hex()

    def pick(index: int) -> Any:
        request = requests[index % len(requests)]
        if not unique:
            return request
        fresh = type(request)()
        fresh.CopyFrom(request)
        fresh.chat.messages[-1].content += f" (request {tag}-{next(serial)})"
        return fresh

    return pick


def route_closed_loop(
    target: str, concurrency: int, duration: float, max_requests: int, warmup: float = 0.5, unique: bool = False
) -> dict[str, Any]:
    """``concurrency`` callers each sending Route after Route (closed loop)."""
    return asyncio.run(_route_closed_loop(target, concurrency, duration, max_requests, warmup, unique))


async def _route_closed_loop(
    target: str, concurrency: int, duration: float, max_requests: int, warmup: float, unique: bool
) -> dict[str, Any]:
    import grpc

    from routesvc.client import direct_channel_options
    from routesvc.v1 import router_pb2 as pb
    from routesvc.v1 import router_pb2_grpc as pb_grpc

    requests = [pb.RouteRequest(chat=chat, context=context) for chat, context in _route_requests(True)]
    pick = _picker(requests, unique)
    async with grpc.aio.insecure_channel(target, options=direct_channel_options(target)) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        latencies: list[float] = []
        errors = 0
        sent = 0
        # Priming: every caller's first call (connection, server-side caches) is not measured.
        primed = 0
        for _ in range(max(1, int(warmup * 2))):
            await asyncio.gather(*(stub.Route(pick(i), timeout=30) for i in range(concurrency)))
            primed += concurrency
        stop_at = time.perf_counter() + duration

        async def caller(offset: int) -> None:
            nonlocal errors, sent
            index = offset
            while time.perf_counter() < stop_at and sent < max_requests:
                request = pick(index)
                index += 1
                started = time.perf_counter()
                try:
                    await stub.Route(request, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                sent += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "primed": primed,
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        **summary_ms(latencies),
    }


def route_open_loop(
    target: str, rate: float, duration: float, warmup: float = 0.5, unique: bool = False
) -> dict[str, Any]:
    """Route at a fixed arrival ``rate`` per second; latency counted from each scheduled send time,
    so a slow server cannot hide its queueing (no coordinated omission)."""
    return asyncio.run(_route_open_loop(target, rate, duration, warmup, unique))


async def _route_open_loop(target: str, rate: float, duration: float, warmup: float, unique: bool) -> dict[str, Any]:
    import grpc

    from routesvc.client import direct_channel_options
    from routesvc.v1 import router_pb2 as pb
    from routesvc.v1 import router_pb2_grpc as pb_grpc

    requests = [pb.RouteRequest(chat=chat, context=context) for chat, context in _route_requests(True)]
    pick = _picker(requests, unique)
    async with grpc.aio.insecure_channel(target, options=direct_channel_options(target)) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        latencies: list[float] = []
        errors = 0
        total = int(rate * (warmup + duration))
        skip = int(rate * warmup)
        interval = 1.0 / rate
        tasks: list[asyncio.Task[None]] = []

        async def one(index: int, scheduled: float) -> None:
            nonlocal errors
            try:
                await stub.Route(pick(index), timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            if index >= skip:
                latencies.append(time.perf_counter() - scheduled)

        began = time.perf_counter()
        for index in range(total):
            scheduled = began + index * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, scheduled)))
        send_lag = time.perf_counter() - (began + (total - 1) * interval)
        await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "requests": len(latencies),
        "errors": errors,
        "send_lag_ms": round(send_lag * 1000, 1),
        **summary_ms(latencies),
    }


def route_go(
    binary: str,
    target: str,
    *,
    concurrency: int = 1,
    duration: float = 3.0,
    max_requests: int = 50_000,
    unique: bool = False,
    connections: int = 1,
    rate: float = 0.0,
    warmup: float = 0.5,
) -> dict[str, Any]:
    """Route load from ``bench/goload`` (``binary``, see ``_harness.go_load_binary``): closed loop
    with ``concurrency`` callers, or open loop at ``rate`` calls/s; calls spread over
    ``connections`` TCP connections (``SO_REUSEPORT`` workers share a port by connection, so one
    connection reaches one worker). The same prompts and the same statistics as the Python load;
    the Go client costs far less CPU per call, leaving more of the machine to the server."""
    import json
    import resource
    import subprocess
    import tempfile

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as prompts:
        json.dump([{"text": text, "hint": hint} for text, hint in PROMPTS], prompts)
        prompts.flush()
        command = [binary, "-target", target, "-prompts", prompts.name, "-concurrency", str(concurrency)]
        command += ["-connections", str(connections), "-duration", f"{duration}s", "-max", str(max_requests)]
        command += ["-rate", str(rate), "-warmup", f"{warmup}s"] + (["-unique"] if unique else [])
        # One OS thread runs the goroutines: 52 against 76 µs of load CPU per call with Go's default
        # (one thread per core) against the bare server here, so more of the machine is left to it.
        env = os.environ | {"GOMAXPROCS": "1"}
        done = subprocess.run(command, check=True, capture_output=True, timeout=duration + 120, env=env)  # noqa: S603
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = json.loads(done.stdout)
    latencies = raw["latencies_s"] or []
    load_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result: dict[str, Any] = {"requests": raw["requests"], "primed": raw["primed"], "errors": raw["errors"]}
    result["load_cpu_us_per_call"] = round(load_cpu * 1e6 / max(1, raw["requests"] + raw["primed"]), 1)
    if rate:
        result = {"rate": rate} | result | {"send_lag_ms": round(raw.get("send_lag_s", 0.0) * 1000, 1)}
    else:
        result["rps"] = round(raw["requests"] / raw["elapsed_s"], 1)
    return result | summary_ms(latencies)


def streams(
    kind: str,
    target: str,
    concurrency: int,
    duration: float,
    max_streams: int,
    stall_seconds: float,
    warmup: float = 0.5,
    raw: bool = False,
) -> dict[str, Any]:
    """``concurrency`` callers each opening stream after stream, measuring time to first text,
    total time, and the gaps between text chunks. ``kind``: ``grpc`` (RouterService.Complete
    at ``target``) or ``openai`` (chat completions through ``AsyncOpenAI`` at base URL ``target``).
    ``raw`` adds the samples themselves (``ttft_s``, ``totals_s``, ``gaps_s``), for ``merge_streams``."""
    return asyncio.run(_streams(kind, target, concurrency, duration, max_streams, stall_seconds, warmup, raw))


def merge_streams(results: list[dict[str, Any]], stall_seconds: float) -> dict[str, Any]:
    """One result from the raw results of load processes that ran side by side."""
    ttft = [value for result in results for value in result["ttft_s"]]
    totals = [value for result in results for value in result["totals_s"]]
    gaps = [value for result in results for value in result["gaps_s"]]
    return _summary(
        ttft,
        totals,
        gaps,
        done=sum(result["streams"] for result in results),
        errors=sum(result["errors"] for result in results),
        streams_per_s=sum(result["streams_per_s"] for result in results),
        stall_seconds=stall_seconds,
    ) | {
        "primed": sum(result["primed"] for result in results),
        "load_gc_max_ms": max(result["load_gc_max_ms"] for result in results),
    }


def _summary(
    ttft: list[float],
    totals: list[float],
    gaps: list[float],
    *,
    done: int,
    errors: int,
    streams_per_s: float,
    stall_seconds: float,
) -> dict[str, Any]:
    first = summary_ms(ttft)
    total = summary_ms(totals)
    return {
        "streams": done,
        "errors": errors,
        "streams_per_s": round(streams_per_s, 1),
        "ttft_p50_ms": first["p50_ms"],
        "ttft_p99_ms": first["p99_ms"],
        "total_p50_ms": total["p50_ms"],
        "total_p99_ms": total["p99_ms"],
        "gap_p99_ms": round(percentile(gaps, 99) * 1000, 3),
        "gap_max_ms": round(max(gaps, default=float("nan")) * 1000, 3),
        "stalls": sum(1 for gap in gaps if gap > stall_seconds),
        "chunks": len(gaps) + done,
    }


async def _streams(
    kind: str,
    target: str,
    concurrency: int,
    duration: float,
    max_streams: int,
    stall_seconds: float,
    warmup: float,
    raw: bool,
) -> dict[str, Any]:
    ttft: list[float] = []
    totals: list[float] = []
    gaps: list[float] = []
    errors = 0
    done = 0
    measuring = False
    stop_at = time.perf_counter() + warmup + duration
    prompts = [prompt for prompt, _ in PROMPTS]
    closers = []

    if kind == "grpc":
        import grpc

        from routesvc.client import direct_channel_options
        from routesvc.v1 import router_pb2 as pb
        from routesvc.v1 import router_pb2_grpc as pb_grpc

        channel = grpc.aio.insecure_channel(target, options=direct_channel_options(target))
        closers.append(channel.close)
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.RouterServiceStub(channel)
        requests = [
            pb.CompleteRequest(chat=pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=p)]))
            for p in prompts
        ]

        async def one_stream(index: int) -> list[float]:
            stamps = []
            async for message in stub.Complete(requests[index % len(requests)], timeout=60):
                if message.HasField("delta"):
                    stamps.append(time.perf_counter())
            return stamps

    else:
        import httpx2
        import openai

        client = openai.AsyncOpenAI(
            base_url=target,
            api_key=BENCH_KEY,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
            ),
        )
        closers.append(client.close)

        async def one_stream(index: int) -> list[float]:
            stamps = []
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompts[index % len(prompts)]}],
                stream=True,
                stream_options={"include_usage": True},
                max_completion_tokens=512,
                timeout=60,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            return stamps

    async def caller(offset: int) -> None:
        nonlocal errors, done
        index = offset
        while time.perf_counter() < stop_at and done < max_streams:
            index += 1
            started = time.perf_counter()
            try:
                stamps = await one_stream(index)
            except Exception:
                errors += 1
                continue
            if not measuring or not stamps:
                continue
            done += 1
            ttft.append(stamps[0] - started)
            totals.append(time.perf_counter() - started)
            gaps.extend(b - a for a, b in itertools.pairwise(stamps))

    # Priming, not measured: one stream per caller (connections, lazy imports in the servers), and
    # every prompt at least once, so that the measured streams are the workload's steady state
    # (with 8 prompts repeated, a router remembers each one's label after its first request).
    primers = max(concurrency, len(prompts))
    for start in range(0, primers, concurrency):
        batch = range(start, min(start + concurrency, primers))
        await asyncio.gather(*(one_stream(i) for i in batch), return_exceptions=True)
    measuring = True
    # The load's own collections: a pause here is a gap in every stream it reads, whatever the target.
    with GcPauses() as pauses:
        stop_at = time.perf_counter() + duration
        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    for close in closers:
        await close()
    result = _summary(
        ttft, totals, gaps, done=done, errors=errors, streams_per_s=done / elapsed, stall_seconds=stall_seconds
    )
    result["primed"] = primers
    result["load_gc_max_ms"] = round(pauses.longest * 1000, 3)
    if raw:
        result |= {"ttft_s": ttft, "totals_s": totals, "gaps_s": gaps}
    return result
