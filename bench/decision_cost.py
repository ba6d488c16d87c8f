"""Decision cost by strategy: microseconds per decision, in this process, no network.

    .venv/bin/python -m bench.decision_cost [--repeats 5] [--seconds 0.3]

Each item runs in a tight loop for about ``--seconds`` per repeat; the minimum over
``--repeats`` repeats is reported (the least disturbed by other work on a noisy machine), in
microseconds per call, and as a ratio to the baseline measured in the same run: parsing the
same ``RouteRequest`` from its bytes, which every gRPC server does before any handler runs.
The prompts are the benchmark mix of ``bench._harness.PROMPTS`` (a call walks through all of
them in turn). Strategies that cannot be built here are listed with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._harness import PROMPTS, REPO, policy_config, print_table, routesvc_config, write_results

SHARED_DATA = next(
    (p for p in (REPO.parent / "shared" / "data" / "routing", Path("/work/shared/data/routing")) if p.exists()),
    REPO.parent / "shared" / "data" / "routing",
)


def _measure(call: Callable[[int], Any], repeats: int, seconds: float) -> float:
    """Minimum over repeats of seconds per call of ``call(i)``."""
    count = 1
    started = time.perf_counter()
    while time.perf_counter() - started < seconds / 10:  # calibrate the loop length
        call(count)
        count += 1
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(count * 10):
            call(index)
        best = min(best, (time.perf_counter() - started) / (count * 10))
    return best


def _measure_async(call: Callable[[int], Awaitable[Any]], repeats: int, seconds: float) -> float:
    async def main() -> float:
        count = 1
        started = time.perf_counter()
        while time.perf_counter() - started < seconds / 10:
            await call(count)
            count += 1
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for index in range(count * 10):
                await call(index)
            best = min(best, (time.perf_counter() - started) / (count * 10))
        return best

    return asyncio.run(main())


def _items() -> tuple[list[tuple[str, str, Callable[[], float]]], list[str]]:
    """(name, what it covers, measure) for everything that can be built here, and what cannot."""
    import yaml

    from routesvc import wire
    from routesvc.config import parse_config
    from routesvc.policy import Policy
    from routesvc.router import Router
    from routesvc.strategies.base import RoutingInput, Verdict
    from routesvc.strategies.default import DefaultStrategy
    from routesvc.tokens import estimate_input_tokens
    from routesvc.v1 import router_pb2 as pb

    keys = {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}
    settings = parse_config(yaml.safe_dump(policy_config("rules", Path())), "<bench>", keys)
    shipped = parse_config(yaml.safe_dump(routesvc_config()), "<bench>", keys)
    limits = settings.config.limits
    messages = [
        pb.RouteRequest(
            chat=pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=prompt)]),
            context=pb.RoutingContext(task_hint=hint),
        )
        for prompt, hint in PROMPTS
    ]
    raw = [message.SerializeToString() for message in messages]
    requests = [wire.routing_request(message, limits) for message in messages]
    router = Router(settings, {})
    policy = Policy.from_config(settings.config.routing)
    shipped_router = Router(shipped, {})
    shipped_policy = Policy.from_config(shipped.config.routing, catalog=shipped.catalog)
    shipped_stages = " -> ".join(shipped_policy.stage_names)
    inputs = [
        RoutingInput(
            request=request,
            estimated_input_tokens=estimate_input_tokens(request.chat),
            estimated_output_tokens=512,
            models=tuple(settings.catalog),
            eligible={model.id: "" for model in settings.catalog},
            task=request.context.task_hint,
            task_source="hint" if request.context.task_hint else "",
        )
        for request in requests
    ]
    n = len(PROMPTS)
    default = DefaultStrategy(settings.config.routing.default_model)

    async def terminal(routing_input: RoutingInput, /) -> Verdict:
        return await default.decide(routing_input, terminal)

    decisions = [asyncio.run(router.route(request)) for request in requests]
    items: list[tuple[str, str, Callable[[], float]]] = []
    missing: list[str] = []
    reps, secs = ARGS.repeats, ARGS.seconds
    items.append(
        (
            "baseline: parse RouteRequest",
            "protobuf FromString",
            lambda: _measure(lambda i: pb.RouteRequest.FromString(raw[i % n]), reps, secs),
        )
    )
    items.append(
        (
            "wire: request -> domain",
            "validation and conversion",
            lambda: _measure(lambda i: wire.routing_request(messages[i % n], limits), reps, secs),
        )
    )
    from routesvc.models import ChatRequest, Message, Role, RoutingContext, RoutingRequest
    from routesvc.tokens import _encoding

    encoding = _encoding()
    fresh = itertools.count()

    def new_chat(i: int) -> ChatRequest:
        """A text never counted before (so never cached): a prompt of the mix plus a serial number."""
        return ChatRequest((Message(Role.USER, f"{PROMPTS[i % n][0]} (request {next(fresh)})"),))

    items.append(
        (
            "tokens: before (encode_ordinary)",
            "len(encode_ordinary) of a new message, as before",
            lambda: _measure(
                lambda i: sum(len(encoding.encode_ordinary(m.content)) for m in new_chat(i).messages), reps, secs
            ),
        )
    )
    items.append(
        (
            "tokens: estimate input, new texts",
            "o200k count of a new message (cache missed)",
            lambda: _measure(lambda i: estimate_input_tokens(new_chat(i)), reps, secs),
        )
    )
    items.append(
        (
            "tokens: estimate input, seen texts",
            "o200k count of every message, long ones cached",
            lambda: _measure(lambda i: estimate_input_tokens(requests[i % n].chat), reps, secs),
        )
    )
    items.append(
        (
            "rules policy",
            "Policy.decide: rules stage then default",
            lambda: _measure_async(lambda i: policy.decide(inputs[i % n]), reps, secs),
        )
    )
    items.append(
        (
            "router.route (rules)",
            "tokens, eligibility, policy, cost, decision",
            lambda: _measure_async(lambda i: router.route(requests[i % n]), reps, secs),
        )
    )
    items.append(
        (
            "shipped policy, seen texts",
            f"Policy.decide of the embedded default: {shipped_stages}",
            lambda: _measure_async(lambda i: shipped_policy.decide(inputs[i % n]), reps, secs),
        )
    )
    items.append(
        (
            "router.route (shipped policy), seen texts",
            "as router.route, with the embedded default policy",
            lambda: _measure_async(lambda i: shipped_router.route(requests[i % n]), reps, secs),
        )
    )
    items.append(
        (
            "router.route (shipped policy), new texts",
            "as above, every prompt new to the classifier, no hint",
            lambda: _measure_async(
                lambda i: shipped_router.route(RoutingRequest(new_chat(i), RoutingContext())), reps, secs
            ),
        )
    )
    items.append(
        (
            "wire: decision -> bytes",
            "RouteResponse built and serialised",
            lambda: _measure(
                lambda i: pb.RouteResponse(decision=wire.decision_message(decisions[i % n])).SerializeToString(),
                reps,
                secs,
            ),
        )
    )

    try:
        from routesvc.encoders import HashingEncoder, WordLlamaEncoder

        texts = [prompt for prompt, _ in PROMPTS]
        for encoder in (WordLlamaEncoder(), HashingEncoder()):
            items.append(
                (
                    f"encoder: {encoder.name}",
                    "one prompt to a unit vector",
                    lambda e=encoder: _measure(lambda i: e.encode([texts[i % n]]), reps, secs),
                )
            )
    except Exception as exc:
        missing.append(f"encoders: {type(exc).__name__}: {exc}")
    try:
        from routesvc.encoders import WordLlamaEncoder
        from routesvc.strategies.classifier import LocalClassifierStage, TaskClassifier, read_examples

        stage = LocalClassifierStage(TaskClassifier(WordLlamaEncoder(), read_examples()))

        def new_input(i: int) -> RoutingInput:
            """A prompt of the mix the classifier has not seen, without a task hint."""
            return dataclasses.replace(
                inputs[i % n], request=RoutingRequest(new_chat(i), RoutingContext()), task="", task_source=""
            )

        items.append(
            (
                "classifier (local, wordllama), seen texts",
                "task label (remembered), then default",
                lambda: _measure_async(lambda i: stage.decide(inputs[i % n], terminal), reps, secs),
            )
        )
        items.append(
            (
                "classifier (local, wordllama), new texts",
                "encode, lexical features, ridge, then default; no hint",
                lambda: _measure_async(lambda i: stage.decide(new_input(i), terminal), reps, secs),
            )
        )
    except Exception as exc:
        missing.append(f"classifier: {type(exc).__name__}: {exc}")
    try:
        from routesvc.encoders import WordLlamaEncoder
        from routesvc.fitting import FitSettings, fit_router
        from routesvc.outcomes import read_outcomes
        from routesvc.strategies.embedding import EmbeddingStage

        records = read_outcomes(SHARED_DATA / "routerbench_train.jsonl")[:5000]
        models = sorted({m for r in records for m in r.outcomes})
        strong = "gpt-4-1106-preview" if "gpt-4-1106-preview" in models else models[0]
        weak = "mistralai/mistral-7b-chat" if "mistralai/mistral-7b-chat" in models else models[-1]
        fitted = fit_router(records, strong, weak, WordLlamaEncoder(), FitSettings())
        embedding = EmbeddingStage(fitted, strong_model="gpt-4o", weak_model="gpt-4o-mini")
        library = len(records)
        items.append(
            (
                f"embedding (wordllama, {library} examples)",
                "score, then strong or weak",
                lambda: _measure_async(lambda i: embedding.decide(inputs[i % n], terminal), reps, secs),
            )
        )

        async def then_embedding(routing_input: RoutingInput, /) -> Verdict:
            return await embedding.decide(routing_input, terminal)

        classifier_stage = LocalClassifierStage(TaskClassifier(WordLlamaEncoder(), read_examples()))
        items.append(
            (
                "classifier then embedding, new texts",
                "both learned stages on a prompt neither has seen; no hint",
                lambda: _measure_async(lambda i: classifier_stage.decide(new_input(i), then_embedding), reps, secs),
            )
        )
    except Exception as exc:
        missing.append(f"embedding: {type(exc).__name__}: {exc}")
    try:
        from routesvc.models import FinishReason
        from routesvc.scoring import LocalScorer

        scorer = LocalScorer()
        answer = "Paris is the capital of France. " * 8
        items.append(
            (
                "cascade scorer (local)",
                "LocalScorer.verdict on a 50-word answer",
                lambda: _measure(lambda i: scorer.verdict(requests[i % n], answer, FinishReason.STOP), reps, secs),
            )
        )
    except Exception as exc:
        missing.append(f"cascade scorer: {type(exc).__name__}: {exc}")
    return items, missing


ARGS = argparse.Namespace(repeats=5, seconds=0.3)


def main(argv: list[str] | None = None) -> None:
    global ARGS
    parser = argparse.ArgumentParser(prog="python -m bench.decision_cost", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="per repeat")
    parser.add_argument(
        "--default-blas-threads", action="store_true", help="leave BLAS threads at numpy's default (serve uses 1)"
    )
    parser.add_argument("--output", default="decision_cost")
    ARGS = parser.parse_args(argv)
    if not ARGS.default_blas_threads:
        from routesvc.config import limit_native_threads

        limit_native_threads()  # as `routesvc serve` does, before numpy is imported
    items, missing = _items()
    results = []
    baseline = None
    for name, covers, measure in items:
        seconds = measure()
        baseline = baseline or seconds
        results.append(
            {"item": name, "covers": covers, "us": round(seconds * 1e6, 2), "x_baseline": round(seconds / baseline, 2)}
        )
        print(f"  {name}: {seconds * 1e6:.2f} us", flush=True)
    print()
    print_table(
        ["item", "us per call", "x parse", "covers"],
        [[r["item"], r["us"], r["x_baseline"], r["covers"]] for r in results],
    )
    for line in missing:
        print(f"not measured: {line}")
    path = write_results(
        ARGS.output,
        {
            "method": "tight loop in-process, min over repeats",
            "blas_threads": "default" if ARGS.default_blas_threads else "1",
            "repeats": ARGS.repeats,
            "results": results,
            "not_measured": missing,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
