"""Metrics: GenAI client metrics, requests by model and strategy, cost, baseline and savings, and
the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
import copy
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from routesvc.client import build_chat
from routesvc.testing import BatchOutcome, FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, until, user_chat
from tests.observability import Observed, observed_server
from tests.test_batches import batch_config, fake_model, submit, wait_state


def _by(points: list[object], key: str) -> dict[object, object]:
    return {dict(p.attributes)[key]: p for p in points}  # type: ignore[attr-defined]


async def _complete(observed: Observed, **context: str) -> pb.Completion:
    messages = [m async for m in observed.client.complete(user_chat("hello"), pb.RoutingContext(**context))]
    return messages[-1].completion


@pytest.fixture
async def observed(fake: FakeProvider) -> Observed:  # type: ignore[misc]
    async with observed_server(fake) as running:
        yield running


class TestGenAIMetrics:
    async def test_an_attempt_refused_before_any_output_reports_no_token_usage(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """A 503, then an answer: one input and one output observation, the answer's (the refused
        attempt added 0-token points, which the GenAI conventions say not to report)."""
        fake.enqueue(Script(status=503), Script(input_tokens=100, output_tokens=10))
        await _complete(observed)
        usage = _by(observed.points("gen_ai.client.token.usage"), "gen_ai.token.type")
        counts = {kind: (point.count, point.sum) for kind, point in usage.items()}  # type: ignore[attr-defined]
        assert counts == {"input": (1, 100), "output": (1, 10)}

    async def test_stage_durations_have_buckets_below_a_millisecond(self, observed: Observed) -> None:
        """routesvc.routing.stage.duration is in seconds and a rules stage takes microseconds: its
        buckets start at 10 µs (the SDK's default, 0-5-10..., put every stage in one bucket)."""
        await observed.client.route(user_chat("hello"))
        points = observed.points("routesvc.routing.stage.duration")
        assert {dict(p.attributes)["routesvc.stage"] for p in points} == {"classifier", "rules", "default"}
        for point in points:
            assert (point.explicit_bounds[0], point.explicit_bounds[-1]) == (1e-05, 5.0)
            assert sum(point.bucket_counts[:-1]) == 1  # within the bounds

    async def test_rpc_durations_have_buckets_from_half_a_millisecond_to_ten_minutes(self, observed: Observed) -> None:
        """rpc.server.call.duration resolves a Route (about a millisecond; the target is p99 <=
        5 ms, docs/performance.md) and a Complete streaming for minutes: buckets from 0.5 ms,
        one at 5 ms, to 10 minutes, and a Route lands in one at most 2.5 times its duration. It
        had the GenAI buckets, from 10 ms: every Route in the first one, its p50 read as ~5 ms."""
        await observed.client.route(user_chat("hello"))
        (point,) = observed.points("rpc.server.call.duration")
        bounds = list(point.explicit_bounds)
        assert (bounds[0], bounds[-1], 0.005 in bounds) == (0.0005, 600.0, True)
        (bucket,) = [index for index, count in enumerate(point.bucket_counts) if count]
        assert bounds[bucket] <= 2.5 * point.sum

    async def test_token_usage_by_type_and_operation_duration(self, observed: Observed, fake: FakeProvider) -> None:
        """gen_ai.client.token.usage has input and output points; duration and time to first chunk one each."""
        fake.enqueue(Script(input_tokens=1234, output_tokens=56))
        await _complete(observed)
        usage = _by(observed.points("gen_ai.client.token.usage"), "gen_ai.token.type")
        assert (usage["input"].sum, usage["output"].sum) == (1234, 56)  # type: ignore[attr-defined]
        attributes = dict(usage["input"].attributes)  # type: ignore[attr-defined]
        assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
        assert attributes["gen_ai.provider.name"] == "openai"
        (duration,) = observed.points("gen_ai.client.operation.duration")
        (first_chunk,) = observed.points("gen_ai.client.operation.time_to_first_chunk")
        assert duration.count == first_chunk.count == 1
        assert 0 < first_chunk.sum <= duration.sum

    async def test_the_response_model_label_is_bounded(self, observed: Observed, fake: FakeProvider) -> None:
        """The provider names the model that answered (a dated version, whatever an OpenAI-compatible
        server says): the metrics keep the first four names per catalog model and put later new
        ones under ``_OTHER`` (every name became a label value: unbounded series); the span keeps
        what the provider said."""
        names = [f"gpt-4o-mini-2025-0{n}-01" for n in range(1, 7)]
        fake.enqueue(*(Script(model=name) for name in names), Script(model=names[0]), model="gpt-4o-mini")
        for _ in range(7):
            await _complete(observed)
        usage = observed.points("gen_ai.client.token.usage")
        labels = {dict(p.attributes)["gen_ai.response.model"] for p in usage}
        assert labels == {*names[:4], "_OTHER"}
        spans = [dict(span.attributes or {}) for span in observed.finished() if span.name == "chat gpt-4o-mini"]
        assert [span["gen_ai.response.model"] for span in spans] == [*names, names[0]]

    async def test_a_response_model_echoing_the_prompt_or_key_is_not_recorded(self, fake: FakeProvider) -> None:
        """A gateway that puts the prompt or the key in the response's ``model`` (whole, wrapped,
        or 200,000 characters long) has the model asked for recorded instead, on both APIs: on
        the client span, as the metric label and in the Completion (it went everywhere verbatim,
        with content capture off). A model id the prompt does not hold is kept."""
        prompt, key = "canaryprompt-zq9", "gw-canarykey-77x"
        echoes = [f"echo:{prompt}", f"{prompt}-v1", f"key/{key}", "sk-live-123", "m-" + "x" * 200_000]
        fake.enqueue(*(Script(model=echo) for echo in echoes), model="gpt-4o-mini")
        fake.enqueue(Script(model="gpt-4o-mini-2024-07-18"), model="gpt-4o-mini")
        fake.enqueue(Script(model=f"echo:{prompt}"), Script(model=f"{key}@x"), model="claude-sonnet-4-6")
        environ = {"OPENAI_API_KEY": key, "ANTHROPIC_API_KEY": key}
        async with observed_server(fake, environ=environ) as observed:
            answered = []
            for hint in ["simple_qa"] * 6 + ["creative_writing"] * 2:
                context = pb.RoutingContext(task_hint=hint)
                messages = [m async for m in observed.client.complete(user_chat(prompt), context)]
                answered.append(messages[-1].completion.provider_model)
            spans = [dict(s.attributes or {}) for s in observed.finished() if s.name.startswith("chat ")]
            labels = {dict(p.attributes)["gen_ai.response.model"] for p in observed.points("gen_ai.client.token.usage")}
        expected = ["gpt-4o-mini"] * 5 + ["gpt-4o-mini-2024-07-18"] + ["claude-sonnet-4-6"] * 2
        assert answered == expected
        assert [span["gen_ai.response.model"] for span in spans] == expected
        assert labels == set(expected)

    @pytest.mark.parametrize(
        ("model", "name", "turns"),
        [
            ("gpt-4o-mini", "ft:gpt-4o-mini:org:custom:id", ["What happened after the war?"]),
            ("gpt-4o-mini", "ft:gpt-4o-mini:org:custom:id", ["Did it work?"]),
            ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", ["4"]),
            ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", ["How much is 2024-07-18 minus a year?"]),
            ("gpt-4o-mini", "/models/Qwen2.5-7B-Instruct", ["Which models are best for code?"]),
            ("gpt-4o-mini", "llama3.2:3b", ["Translate 0x3b to decimal."]),
            ("gpt-4o-mini", "llama3.2:latest", ["What is the latest version of Python?"]),
            ("gpt-4o-mini", "anthropic/claude-3.5-sonnet", ["Who founded anthropic?"]),
            ("gpt-4o-mini", "openai/gpt-4o", ["we use openai at work"]),
            ("claude-sonnet", "claude-sonnet-4-5-20250929", ["Pick a number from 1 to 9", "5", "Another one?"]),
        ],
    )
    async def test_a_real_model_name_is_recorded_whatever_short_pieces_of_it_the_messages_hold(
        self, observed: Observed, fake: FakeProvider, model: str, name: str, turns: list[str]
    ) -> None:
        """A provider's own name for the model (dated, fine-tuned, a path, a tag) is the
        Completion's provider_model, the span's and the metric label even when a message holds
        a short piece of it ("ft" in "after", "models", "3b", "latest") or is one character that
        is in it (a user's "4", an assistant's "5"): only a piece long enough to carry content
        is an echo. It was replaced by the catalog's name, a fine-tune reading as its base."""
        fake.enqueue(Script(model=name), model=fake_model(model))
        roles = ["user", "assistant"] * len(turns)
        chat = build_chat(list(zip(roles, turns, strict=False)))
        messages = [m async for m in observed.client.complete(chat, pb.RoutingContext(model=model))]
        spans = [dict(s.attributes or {}) for s in observed.finished() if s.name.startswith("chat ")]
        labels = {dict(p.attributes)["gen_ai.response.model"] for p in observed.points("gen_ai.client.token.usage")}
        assert (messages[-1].completion.provider_model, spans[-1]["gen_ai.response.model"], labels) == (
            name,
            name,
            {name},
        )

    async def test_a_streamed_model_name_not_taken_is_checked_once_not_at_every_chunk(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """An OpenAI-compatible server that repeats an echoing ``model`` in each of 300 chunks
        has it checked (and logged as not taken) once: each check searches every message, and
        it ran again at every chunk, a prompt-sized scan per chunk on the event loop."""
        prompt = "canaryprompt-zq9 " * 1000
        fake.enqueue(Script(model="echo:canaryprompt-zq9", chunk_count=300), model="gpt-4o-mini")
        context = pb.RoutingContext(model="gpt-4o-mini")
        with capture_logs() as logs:
            messages = [m async for m in observed.client.complete(user_chat(prompt), context)]
        assert messages[-1].completion.provider_model == "gpt-4o-mini"
        assert [log for log in logs if log["event"] == "provider_model_not_taken"] == [
            {"event": "provider_model_not_taken", "reason": "prompt", "log_level": "info"}
        ]

    async def test_a_failed_attempt_has_an_error_type(self, observed: Observed, fake: FakeProvider) -> None:
        """The duration of a failed attempt is recorded with error.type."""
        fake.enqueue(Script(status=503), Script())
        await _complete(observed)
        types = {dict(p.attributes).get("error.type") for p in observed.points("gen_ai.client.operation.duration")}
        assert types == {None, "PROVIDER_UNAVAILABLE"}


class TestRoutingMetrics:
    async def test_requests_by_selected_model_and_strategy(self, observed: Observed) -> None:
        """routesvc.requests counts decisions by selected model, strategy and method (Route and
        Complete), the method named as rpc.server.call.duration names it (it was the bare method
        name there, so the two metrics could not be joined on rpc.method)."""
        await _complete(observed)
        await _complete(observed)
        await _complete(observed, task_hint="code_generation")
        await observed.client.route(user_chat("hello"))
        counts = {
            tuple(
                dict(p.attributes)[k] for k in ("routesvc.selected_model", "routesvc.strategy", "rpc.method")
            ): p.value
            for p in observed.points("routesvc.requests")
        }
        assert counts == {
            ("gpt-4o-mini", "default", "routesvc.v1.RouterService/Complete"): 2,
            ("gpt-4o", "rules", "routesvc.v1.RouterService/Complete"): 1,
            ("gpt-4o-mini", "default", "routesvc.v1.RouterService/Route"): 1,
        }

    async def test_cost_baseline_and_savings(self, observed: Observed, fake: FakeProvider) -> None:
        """routesvc.cost is the exact cost; savings is the claude-sonnet price of the same usage minus it."""
        fake.enqueue(Script(input_tokens=1000, output_tokens=100))
        completion = await _complete(observed)
        cost = float(Decimal(completion.cost_usd))
        baseline = float((1000 * Decimal(3) + 100 * Decimal(15)) / 1_000_000)
        (cost_point,) = observed.points("routesvc.cost")
        (baseline_point,) = observed.points("routesvc.baseline_cost")
        (savings_point,) = observed.points("routesvc.savings")
        assert cost_point.value == pytest.approx(cost)
        assert baseline_point.value == pytest.approx(baseline)
        assert savings_point.value == pytest.approx(baseline - cost)

    async def test_rpc_duration_by_method_and_code(self, observed: Observed) -> None:
        """rpc.server.call.duration (seconds, the stable RPC conventions; rpc.server.duration is
        their deprecated name in milliseconds) has one point per method and status."""
        await observed.client.list_models()
        await _complete(observed)
        points = observed.points("rpc.server.call.duration")
        keys = {
            tuple(dict(p.attributes)[key] for key in ("rpc.system.name", "rpc.method", "rpc.response.status_code"))
            for p in points
        }
        assert keys == {
            ("grpc", "routesvc.v1.RouterService/ListModels", "OK"),
            ("grpc", "routesvc.v1.RouterService/Complete", "OK"),
        }


class TestAReloadedConfiguration:
    async def test_calls_routed_after_a_reload_are_compared_with_its_baseline_and_name_its_providers(
        self, fake: FakeProvider
    ) -> None:
        """A reload that makes the baseline (claude-sonnet) ten times dearer and moves OpenAI to
        another address: a call routed before it keeps the prices it was routed under, one routed
        after is priced on the new baseline (metrics, server span, GetStats) and its client span
        names the new address (all kept their start values)."""
        config = default_config()
        async with observed_server(fake, config=copy.deepcopy(config)) as observed:
            dearer = copy.deepcopy(config)
            for model in dearer["models"]:  # type: ignore[attr-defined]
                if model["id"] == "claude-sonnet":
                    model["input_price_per_mtok"], model["output_price_per_mtok"] = "30.00", "150.00"
            environ = live_environ(fake)
            environ["OPENAI_BASE_URL"] = environ["OPENAI_BASE_URL"].replace("127.0.0.1", "localhost")
            fake.enqueue(Script(input_tokens=1000, output_tokens=100))
            in_flight = observed.client.complete(user_chat("hello"))
            assert (await anext(in_flight)).WhichOneof("event") == "decision"
            await observed.server.reload(settings_from(dearer, environ))
            first = [message async for message in in_flight][-1].completion
            fake.enqueue(Script(input_tokens=1000, output_tokens=100))
            second = await _complete(observed)
            stats = await observed.client.get_stats()
            (baseline_point,) = observed.points("routesvc.baseline_cost")
            (savings_point,) = observed.points("routesvc.savings")
            servers = observed.named("routesvc.v1.RouterService/Complete")
            addresses = [dict(span.attributes or {})["server.address"] for span in observed.named("chat gpt-4o-mini")]
        old = (1000 * Decimal(3) + 100 * Decimal(15)) / 1_000_000
        new = (1000 * Decimal(30) + 100 * Decimal(150)) / 1_000_000
        cost = Decimal(first.cost_usd) + Decimal(second.cost_usd)
        assert [dict(span.attributes or {})["routesvc.baseline_cost_usd"] for span in servers] == [
            float(old),
            float(new),
        ]
        assert baseline_point.value == pytest.approx(float(old + new))
        assert savings_point.value == pytest.approx(float(old + new - cost))
        assert Decimal(stats.totals.baseline_cost_usd) == old + new
        assert addresses == ["127.0.0.1", "localhost"]


class TestPrometheus:
    async def test_scrape_endpoint_serves_the_metrics(self, fake: FakeProvider) -> None:
        """With metrics.prometheus_port the /metrics page has token usage, cost and savings."""
        config = default_config()
        config["telemetry"] = {"metrics": {"prometheus_port": 0}}
        async with observed_server(fake, config=config) as observed:
            await _complete(observed)
            endpoint = observed.server.telemetry.prometheus
            assert endpoint is not None
            url = f"http://127.0.0.1:{endpoint.port}/metrics"
            page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "gen_ai_client_token_usage_bucket{" in page
        assert 'gen_ai_token_type="output"' in page
        assert "routesvc_requests_total{" in page
        assert 'routesvc_selected_model="gpt-4o-mini"' in page
        assert "routesvc_savings" in page

    async def test_a_provider_model_with_a_lone_surrogate_leaves_the_page_served(self, fake: FakeProvider) -> None:
        """A provider that names its model with half an emoji's pair ("gpt-\\ud83d"): the page is
        served (it failed with HTTP 500 at every scrape until a restart), the name, not shaped
        like a model id, replaced by the model asked for."""
        config = default_config()
        config["telemetry"] = {"metrics": {"prometheus_port": 0}}
        async with observed_server(fake, config=config) as observed:
            fake.enqueue(Script(text="hi", model="gpt-\ud83d"))
            await _complete(observed)
            endpoint = observed.server.telemetry.prometheus
            assert endpoint is not None
            url = f"http://127.0.0.1:{endpoint.port}/metrics"
            page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert 'gen_ai_response_model="gpt-4o-mini"' in page

    async def test_off_by_default(self, observed: Observed) -> None:
        """No port is opened unless configured."""
        assert observed.server.telemetry.prometheus is None


class TestBatchAnswers:
    async def test_a_batch_answer_is_in_the_cost_and_token_metrics(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A batch job's answer is billed when its provider batch ends, outside any RPC: its cost
        and tokens reach routesvc.cost and gen_ai.client.token.usage as a realtime answer's do
        (they never did, so the metrics left out the traffic sent to batch)."""
        answer = Script(text="A short summary.", input_tokens=100, output_tokens=20)
        fake.enqueue(answer, model=fake_model("gpt-4o-mini"))
        async with observed_server(fake, config=batch_config(tmp_path)) as observed:
            job = (await submit(observed.client))[1].batch
            done = await wait_state(observed.client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            cost = _by(observed.points("routesvc.cost"), "routesvc.model")
            usage = _by(observed.points("gen_ai.client.token.usage"), "gen_ai.token.type")
        assert cost["gpt-4o-mini"].value == pytest.approx(float(Decimal(done.result.cost_usd)))  # type: ignore[attr-defined]
        assert (usage["input"].sum, usage["output"].sum) == (100, 20)  # type: ignore[attr-defined]

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_batch_answer_whose_model_echoes_the_key_names_the_model_asked_for(
        self, tmp_path: Path, fake: FakeProvider, model: str
    ) -> None:
        """A batch result whose ``model`` holds the key is read as one that names no model: the
        model asked for is the metric label, GetBatch's result names none (the key went to both)."""
        key = "gw-canarykey-77x"
        fake.enqueue(Script(model=f"key:{key}"), model=fake_model(model))
        environ = {"OPENAI_API_KEY": key, "ANTHROPIC_API_KEY": key}
        async with observed_server(fake, config=batch_config(tmp_path), environ=environ) as observed:
            job = (await submit(observed.client, model=model))[1].batch
            done = await wait_state(observed.client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            labels = {dict(p.attributes)["gen_ai.response.model"] for p in observed.points("gen_ai.client.token.usage")}
        assert (labels, done.result.provider_model) == ({fake_model(model)}, "")

    async def test_a_batch_answer_is_in_the_baseline_and_savings_metrics(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch answer's usage priced on the baseline (claude-sonnet) at its batch price, as
        the baseline would have been batched too, reaches routesvc.baseline_cost, and savings is
        that minus the answer's cost (neither counted batch answers, so over batch traffic savings
        was not baseline minus cost)."""
        fake.enqueue(
            Script(text="A short summary.", input_tokens=100, output_tokens=20), model=fake_model("gpt-4o-mini")
        )
        async with observed_server(fake, config=batch_config(tmp_path)) as observed:
            job = (await submit(observed.client))[1].batch
            done = await wait_state(observed.client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            (baseline_point,) = observed.points("routesvc.baseline_cost")
            (savings_point,) = observed.points("routesvc.savings")
        sonnet = observed.server.router.settings.catalog.get("claude-sonnet")
        baseline = (100 * Decimal(3) + 20 * Decimal(15)) / 1_000_000 * (1 - sonnet.batch_discount)
        assert dict(baseline_point.attributes) == {"routesvc.model": "gpt-4o-mini"}
        assert baseline_point.value == pytest.approx(float(baseline))
        assert savings_point.value == pytest.approx(float(baseline - Decimal(done.result.cost_usd)))

    async def test_a_cancelled_job_the_provider_billed_is_in_the_cost_and_token_metrics(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A job cancelled after it was sent, which the provider had answered before the cancel
        reached its batch: what it was billed reaches routesvc.cost and gen_ai.client.token.usage
        (it was left out, as from the ledger), and savings as minus that cost."""
        fake.enqueue(Script(text="A short summary.", input_tokens=100, output_tokens=20), model="gpt-4o-mini")
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_answered_before_cancel = 1
        async with observed_server(fake, config=batch_config(tmp_path)) as observed:
            job = (await submit(observed.client))[1].batch
            await wait_state(observed.client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            await observed.client.cancel_batch(job.batch_id, tenant="acme")
            await until(lambda: not fake.files)  # read, charged, then discarded
            [billed] = observed.server.router.ledger.entries()
            cost = _by(observed.points("routesvc.cost"), "routesvc.model")
            usage = _by(observed.points("gen_ai.client.token.usage"), "gen_ai.token.type")
            (baseline_point,) = observed.points("routesvc.baseline_cost")
            (savings_point,) = observed.points("routesvc.savings")
        assert cost["gpt-4o-mini"].value == pytest.approx(float(billed.cost_usd))  # type: ignore[attr-defined]
        assert billed.cost_usd > 0
        # Its caller never got the answer: no baseline cost (as a realtime attempt cut before any
        # text), and savings is still baseline minus cost.
        assert (baseline_point.value, savings_point.value) == (0, pytest.approx(-float(billed.cost_usd)))
        assert (usage["input"].sum, usage["output"].sum) == (100, 20)  # type: ignore[attr-defined]
