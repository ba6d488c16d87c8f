"""Batch mode: Complete answers with a job reference; GetBatch / CancelBatch; both providers' batch
APIs through the real SDKs to the fake; persistence across a restart; tenants see only their jobs."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import pytest
from structlog.testing import capture_logs

from routesvc.admission import LocalAdmission
from routesvc.auth import key_digest
from routesvc.batches import BatchStore
from routesvc.batches import _queue as batch_queue
from routesvc.batches._queue import (
    ABANDON_AFTER_SECONDS,
    OTHER_KEY_LOST_AFTER_SECONDS,
    OVERDUE_AFTER_SECONDS,
)
from routesvc.batches._store import GoneMark, decode_request
from routesvc.client import RouterClient, build_chat
from routesvc.cost import cost_of_usage, estimate_cost
from routesvc.errors import BatchStoreUnavailable, CostLimitExceeded
from routesvc.ledger import AttemptOutcome
from routesvc.models import (
    BatchJob,
    BatchState,
    ChatRequest,
    Completion,
    Message,
    Mode,
    Role,
    RouteDecision,
    RoutingContext,
    RoutingRequest,
    Usage,
)
from routesvc.router import Router
from routesvc.server import Server, build_providers
from routesvc.testing import (
    DEFAULT_TEXT,
    BatchOutcome,
    FakeBatch,
    FakeProvider,
    FakeToolCall,
    FaultProxy,
    NetworkFault,
    Script,
)
from routesvc.tokens import count_text_tokens
from routesvc.v1 import router_pb2 as pb
from tests.conftest import (
    TEST_DATA_DIR,
    add_local_model,
    default_config,
    file_modes,
    live_environ,
    process_environ,
    settings_from,
    until,
    user_chat,
    write_locked,
)
from tests.raw_upstream import RawUpstream, Reply, endless
from tests.test_limits import retry_delay
from tests.test_validation import error_info

# A schema both providers take (Anthropic's structured outputs want every object closed).
SUMMARY_SCHEMA = {"type": "object", "additionalProperties": False}


# Of the form of every job's id, and no job's.
UNKNOWN_BATCH_ID = "batch_" + "0" * 32
# A provider's 5xx, as the fake is told to answer a batch status check or results read.
SERVER_ERROR: tuple[int, dict[str, object], dict[str, str]] = (
    500,
    {"error": {"type": "server_error", "message": "x"}},
    {},
)


def batch_config(tmp_path: Path) -> dict[str, object]:
    """The default policy with fast batch timers and the store under ``tmp_path``."""
    config = default_config()
    config["batch"] = {
        "store_path": str(tmp_path / "batches.db"),
        "group_window_seconds": 0.05,
        "poll_interval_seconds": 0.05,
    }
    return config


def _tokens(decision: RouteDecision) -> tuple[int, int]:
    return decision.estimated_input_tokens, decision.estimated_output_tokens


async def submit(client: RouterClient, tenant: str = "acme", **context: object) -> list[pb.CompleteResponse]:
    """A Complete with realtime false."""
    request_context = pb.RoutingContext(realtime=False, tenant=tenant, **context)  # type: ignore[arg-type]
    return [m async for m in client.complete(user_chat("Summarise this report"), request_context)]


def grouping_two(config: dict[str, object]) -> dict[str, object]:
    """``config`` with batches of two jobs sent once both are queued (``two_jobs``): a group is
    sent when full, its window long enough for a loaded machine (a 0.05 s window closed on the
    first of two jobs submitted together, once, sending them in two provider batches)."""
    config["batch"] |= {"group_window_seconds": 30.0, "max_group_size": 2}  # type: ignore[operator]
    return config


async def two_jobs(client: RouterClient, **context: object) -> list[pb.BatchJob]:
    """Two jobs submitted at once, to be sent in one provider batch (``grouping_two``)."""
    submitted = await asyncio.gather(submit(client, **context), submit(client, **context))
    return [messages[1].batch for messages in submitted]


async def get_batch(client: RouterClient, batch_id: str, tenant: str = "acme") -> pb.GetBatchResponse:
    """GetBatch as ``tenant``."""
    return await client.get_batch(batch_id, tenant=tenant)


async def wait_state(client: RouterClient, batch_id: str, state: int, timeout: float = 15.0) -> pb.GetBatchResponse:
    """Poll GetBatch until the job reaches ``state`` (a generous cap: a loaded machine is only slower)."""
    async with asyncio.timeout(timeout):
        while True:
            response = await get_batch(client, batch_id)
            if response.job.state == state:
                return response
            await asyncio.sleep(0.05)


_ENDED_STATES = (pb.BATCH_STATE_SUCCEEDED, pb.BATCH_STATE_FAILED, pb.BATCH_STATE_CANCELLED, pb.BATCH_STATE_EXPIRED)


async def wait_ended(client: RouterClient, batch_id: str, timeout: float = 15.0) -> pb.GetBatchResponse:
    """Poll GetBatch until the job has ended, in whichever state."""
    async with asyncio.timeout(timeout):
        while True:
            response = await get_batch(client, batch_id)
            if response.job.state in _ENDED_STATES:
                return response
            await asyncio.sleep(0.05)


def job_states(path: Path) -> list[str]:
    """Every job's state in the store file at ``path``, read by another connection."""
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("SELECT state FROM jobs ORDER BY created_at")]
    finally:
        connection.close()


def send_tags(path: Path) -> list[bool]:
    """Whether each job in the store file at ``path`` has a send tag (a send that may have reached
    the provider), read by another connection."""
    connection = sqlite3.connect(path)
    try:
        return [row[0] is not None for row in connection.execute("SELECT send_tag FROM jobs ORDER BY created_at")]
    finally:
        connection.close()


def stored_requests(path: Path) -> list[str]:
    """Every job's stored request in the store file at ``path``, read by another connection."""
    connection = sqlite3.connect(path)
    try:
        return [row[0] for row in connection.execute("SELECT request FROM jobs ORDER BY created_at")]
    finally:
        connection.close()


# What each batch API gets for an assistant turn of one call and its result.
BATCH_TOOL_TURNS = {
    "call": [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "churn"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "churn is 2%"},
    ],
    "toolu": [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "churn"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "churn is 2%"}]},
    ],
}


class TestBatchSubmitAndResults:
    """A batch-mode Complete returns a job at once; GetBatch returns the answer at the batch price."""

    @pytest.mark.parametrize(
        ("task", "model", "api"), [("", "gpt-4o-mini", "openai"), ("creative_writing", "claude-sonnet", "anthropic")]
    )
    async def test_submit_poll_and_results(
        self, tmp_path: Path, fake: FakeProvider, task: str, model: str, api: str
    ) -> None:
        """Decision then one BatchJob; the provider batch completes; the result costs half the realtime price."""
        fake.enqueue(Script(text="A short summary.", input_tokens=100, output_tokens=20), model=fake_model(model))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = await submit(client, task_hint=task)
            assert [m.WhichOneof("event") for m in messages] == ["decision", "batch"]
            job = messages[1].batch
            assert (job.state, job.model) == (pb.BATCH_STATE_QUEUED, model)
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            spec = server.router.settings.catalog.get(model)
            expected = (100 * spec.input_price_per_mtok + 20 * spec.output_price_per_mtok) / 10**6 / 2
            assert done.result.text == "A short summary."
            assert Decimal(done.result.cost_usd) == expected
            assert [b.api for b in fake.batches] == [api]
            entries = [e for e in server.router.ledger.entries() if e.request_id == job.batch_id]
            assert [e.cost_usd for e in entries] == [expected]

    @pytest.mark.parametrize(
        ("task", "prefix"), [("", "call"), ("creative_writing", "toolu")], ids=["openai", "anthropic"]
    )
    async def test_tool_turns_are_sent_and_the_tool_calls_come_back(
        self, tmp_path: Path, fake: FakeProvider, task: str, prefix: str
    ) -> None:
        """A queued conversation keeps its tool calls and results (they reach the provider batch in its
        format), and the result carries the model's new calls, finished TOOL_CALLS (OpenAI says
        "stop" when ``tool_choice`` named the tool, as here)."""
        call = pb.ToolCall(id="call_1", name="lookup", arguments_json='{"q": "churn"}')
        chat = build_chat(
            [
                ("user", "Summarise this report"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="churn is 2%"),
            ],
            tools=[pb.Tool(name="lookup", parameters_json='{"type": "object"}')],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, name="lookup"),
        )
        fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("lookup", '{"q": "revenue"}'),)))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(realtime=False, tenant="acme", task_hint=task)
            messages = [m async for m in client.complete(chat, context)]
            done = await wait_state(client, messages[1].batch.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert list(done.result.tool_calls) == [
            pb.ToolCall(id=f"{prefix}_fake_0", name="lookup", arguments_json='{"q": "revenue"}')
        ]
        assert done.result.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        request = fake.batches[0].requests[0]
        sent = (request.get("body") or request["params"])["messages"]
        assert sent[1:] == BATCH_TOOL_TURNS[prefix]

    async def test_an_anthropic_calls_non_ascii_arguments_come_back_as_a_stream_returns_them(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """An Anthropic batch result holds a call's input parsed; its ``arguments_json`` is the same
        text a streamed call returns, the model's characters rather than ``\\uXXXX`` escapes."""
        arguments = '{"city": "北京", "note": "🙂"}'
        chat = build_chat([("user", "Weather in Beijing")], tools=[pb.Tool(name="lookup", parameters_json="{}")])
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("lookup", arguments),)))
            streamed = [m async for m in client.complete(chat, pb.RoutingContext(model="claude-sonnet"))]
            fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("lookup", arguments),)))
            context = pb.RoutingContext(model="claude-sonnet", realtime=False, tenant="acme")
            queued = [m async for m in client.complete(chat, context)]
            done = await wait_state(client, queued[1].batch.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert [fake.batches[0].api, streamed[-1].completion.tool_calls[0].arguments_json] == ["anthropic", arguments]
        assert done.result.tool_calls[0].arguments_json == arguments

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_a_text_answer_with_a_call_that_names_no_tool_is_a_stop_without_calls(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """A batch answer ended by "stop" (``end_turn``) whose tool calls name no tool: STOP with
        its text and no calls, as when streamed."""
        fake.enqueue(Script(text="It is sunny.", tool_calls=(FakeToolCall("", "{}"),), tool_calls_finish_reason="stop"))
        chat = build_chat(
            [("user", "Weather in Paris?")], tools=[pb.Tool(name="lookup", parameters_json='{"type": "object"}')]
        )
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(realtime=False, tenant="acme", task_hint=task)
            messages = [m async for m in client.complete(chat, context)]
            done = await wait_state(client, messages[1].batch.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert (done.result.text, list(done.result.tool_calls), done.result.finish_reason) == (
            "It is sunny.",
            [],
            pb.FINISH_REASON_STOP,
        )

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_a_tool_calls_finish_whose_calls_name_no_tool_is_other_without_calls(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """A batch answer ended by "tool_calls" (``tool_use``) whose calls all lack a name: no
        calls, and the finish is OTHER, not TOOL_CALLS, as when streamed."""
        fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("", "{}"),), tool_calls_finish_reason="tool_calls"))
        chat = build_chat(
            [("user", "Weather in Paris?")], tools=[pb.Tool(name="lookup", parameters_json='{"type": "object"}')]
        )
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(realtime=False, tenant="acme", task_hint=task)
            messages = [m async for m in client.complete(chat, context)]
            done = await wait_state(client, messages[1].batch.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert (list(done.result.tool_calls), done.result.finish_reason) == ([], pb.FINISH_REASON_OTHER)

    @pytest.mark.parametrize(("task", "model"), [("", "gpt-4o-mini"), ("creative_writing", "claude-sonnet")])
    async def test_a_result_without_usage_is_charged_an_estimate(
        self, tmp_path: Path, fake: FakeProvider, task: str, model: str
    ) -> None:
        """A result whose body has no usage is charged, at the batch price, the estimate a stream
        without usage gets: the request's estimated input and the answer's output counted,
        flagged estimated in the ledger and logged without the prompt (it was charged nothing)."""
        answer = "A short summary of the quarterly report."
        fake.enqueue(Script(text=answer, omit_usage=True), model=fake_model(model))
        with capture_logs() as logs:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                messages = await submit(client, task_hint=task)
                decision, job = messages[0].decision, messages[1].batch
                done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                entries = [e for e in server.router.ledger.entries() if e.request_id == job.batch_id]
                spec = server.router.settings.catalog.get(model)
        usage = Usage(decision.estimated_input_tokens, count_text_tokens(answer))
        cost = cost_of_usage(spec, usage, Mode.BATCH)
        assert (done.result.usage.input_tokens, done.result.usage.output_tokens) == (
            usage.input_tokens,
            usage.output_tokens,
        )
        assert Decimal(done.result.cost_usd) == cost > 0
        assert [(e.cost_usd, e.estimated) for e in entries] == [(cost, True)]
        estimated = [entry for entry in logs if entry["event"] == "batch_usage_estimated"]
        assert [(entry["batch_id"], entry["model"]) for entry in estimated] == [(job.batch_id, model)]
        assert "Summarise" not in repr(logs)

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_result_with_a_negative_count_is_charged_an_estimate(
        self, tmp_path: Path, fake: FakeProvider, model: str
    ) -> None:
        """A result whose usage has a count that is none (negative: a broken server) is read as a
        stream's is, as no count: its input is charged the estimate, flagged, never a negative
        cost that would credit the tenant."""
        fake.enqueue(Script(text="ok", input_tokens=-5_000_000), model=fake_model(model))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = await submit(client, model=model)
            decision, job = messages[0].decision, messages[1].batch
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            entries = [e for e in server.router.ledger.entries() if e.request_id == job.batch_id]
        assert done.result.usage.input_tokens == decision.estimated_input_tokens
        assert Decimal(done.result.cost_usd) > 0
        assert [e.estimated for e in entries] == [True]

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    @pytest.mark.parametrize(
        ("counts", "implausible"),
        [
            ({"input_tokens": 10**15}, "input"),
            ({"input_tokens": 20, "cached_input_tokens": 10**15}, "input"),
            ({"output_tokens": 10**15}, "output"),
        ],
        ids=["input", "cached", "output"],
    )
    async def test_a_result_with_an_implausible_count_is_charged_an_estimate(
        self, tmp_path: Path, fake: FakeProvider, model: str, counts: dict[str, int], implausible: str
    ) -> None:
        """A result whose count the call cannot have used (10**15 tokens: past the model's context
        window, or its output limit) is taken as unreported, as a stream's is
        (``reported_usage``): estimated, flagged in the ledger, logged
        ``provider_usage_implausible`` without the prompt; not charged as is (it was: $75,000,000
        for an input of 10**15)."""
        answer = "A short summary."
        if model == "claude-sonnet" and "cached_input_tokens" in counts:
            # Anthropic reports the cache reads beside the input: the fake's input holds them.
            counts = {**counts, "input_tokens": counts["input_tokens"] + counts["cached_input_tokens"]}
        script = Script(text=answer, **counts)  # type: ignore[arg-type]
        fake.enqueue(script, model=fake_model(model))
        with capture_logs() as logs:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                messages = await submit(client, model=model)
                decision, job = messages[0].decision, messages[1].batch
                done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                entries = [e for e in server.router.ledger.entries() if e.request_id == job.batch_id]
                spec = server.router.settings.catalog.get(model)
        usage = done.result.usage
        if implausible == "input":
            assert (usage.input_tokens, usage.cached_input_tokens) == (decision.estimated_input_tokens, 0)
        else:
            assert usage.output_tokens == count_text_tokens(answer)
        assert max(usage.input_tokens, usage.output_tokens) < 10**6
        assert Decimal(done.result.cost_usd) < Decimal("0.01")
        assert [(e.estimated, e.usage.input_tokens, e.usage.output_tokens) for e in entries] == [
            (True, usage.input_tokens, usage.output_tokens)
        ]
        warned = [e for e in logs if e["event"] == "provider_usage_implausible"]
        assert [(e["batch_id"], e["model"], e["implausible"]) for e in warned] == [(job.batch_id, spec.id, implausible)]
        assert "Summarise" not in repr(logs)

    async def test_an_output_the_job_asked_for_is_charged_after_a_reload_lowered_the_models_limit(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A job sent with max_output_tokens 8000, a reload that lowers the model's
        max_output_tokens to 4096 while it runs, and a result reporting 8000 output tokens: the
        8000 are charged as reported (the job's own limit is gone with its request, and the
        catalog's is not what the call was allowed; they were taken as implausible and the
        answer's text counted instead, 4 tokens)."""
        config = batch_config(tmp_path)
        environ = live_environ(fake)
        fake.batch_outcome = BatchOutcome.PENDING
        fake.enqueue(Script(text="A short summary.", input_tokens=20, output_tokens=8000), model="gpt-4o-mini")
        async with (
            Server(settings_from(config, environ), port=0) as server,
            RouterClient(server.target) as client,
        ):
            context = pb.RoutingContext(realtime=False, tenant="acme", model="gpt-4o-mini")
            chat = user_chat("Summarise this report", max_output_tokens=8000)
            job = [m async for m in client.complete(chat, context)][1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            lowered = copy.deepcopy(config)
            for spec in lowered["models"]:  # type: ignore[union-attr]
                if spec["id"] == "gpt-4o-mini":
                    spec["max_output_tokens"] = 4096
            await server.reload(settings_from(lowered, environ))
            fake.batch_outcome = BatchOutcome.COMPLETE
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert done.result.usage.output_tokens == 8000

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_a_count_past_the_stores_integers_does_not_hold_up_its_batch(
        self, tmp_path: Path, fake: FakeProvider, model: str
    ) -> None:
        """A result whose count does not fit the store's 64-bit integers (10**19), beside a good
        result in the same provider batch: both jobs SUCCEEDED, the odd one charged an estimate.
        (Storing it raised on every poll round, so no job of the batch ever ended.)"""
        fake.enqueue(
            Script(text="odd", input_tokens=10**19, output_tokens=10**19),
            Script(text="fine", input_tokens=10, output_tokens=5),
            model=fake_model(model),
        )
        with capture_logs() as logs:
            async with (
                Server(settings_from(cancelled_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                jobs = await two_jobs(client, model=model)
                done = [await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED) for job in jobs]
                estimated = {e.request_id: e.estimated for e in server.router.ledger.entries()}
        assert [len(batch.requests) for batch in fake.batches] == [2]
        assert (
            sorted((d.result.usage.input_tokens < 10**6, d.result.usage.output_tokens < 10**6) for d in done)
            == [(True, True)] * 2
        )
        assert sorted(estimated.values()) == [False, True]
        assert not [e for e in logs if e["event"] == "batch_poll_crashed"]

    async def test_small_requests_are_grouped_into_one_provider_batch(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Three jobs within the window: one provider batch of three requests."""
        config = batch_config(tmp_path)
        # 1.5 s: the three submits must all land in the window, however loaded the machine is.
        config["batch"]["group_window_seconds"] = 1.5  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            jobs = [(await submit(client))[1].batch.batch_id for _ in range(3)]
            for batch_id in jobs:
                await wait_state(client, batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert [len(b.requests) for b in fake.batches] == [3]

    async def test_a_group_is_bounded_by_its_requests_size(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The providers refuse a batch over 200 MB (OpenAI's file) or 256 MB (Anthropic), which
        inline images reach in a few dozen jobs, and a refused batch fails every job in it: a
        group holds at most ``_MAX_GROUP_CHARS`` of requests. With the bound below one request,
        three jobs in one window go as three provider batches (they went as one)."""
        monkeypatch.setattr(batch_queue, "_MAX_GROUP_CHARS", 1)
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 0.5  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            jobs = [(await submit(client))[1].batch.batch_id for _ in range(3)]
            for batch_id in jobs:
                await wait_state(client, batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert [len(b.requests) for b in fake.batches] == [1, 1, 1]

    @pytest.mark.parametrize(("task", "key"), [("", "body"), ("creative_writing", "params")])
    async def test_tools_are_sent_as_a_realtime_call_sends_them(
        self, tmp_path: Path, fake: FakeProvider, task: str, key: str
    ) -> None:
        """A request with tools, in batch mode: the provider batch's request carries the tools a
        realtime call of the same request sends (OpenAI body, Anthropic params)."""
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
        tool = pb.Tool(name="get_weather", description="The weather in a city", parameters_json=json.dumps(parameters))
        chat = build_chat([("user", "Summarise this report")], tools=[tool])
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            realtime = [m async for m in client.complete(chat, pb.RoutingContext(tenant="acme", task_hint=task))]
            context = pb.RoutingContext(tenant="acme", task_hint=task, realtime=False)
            batched = [m async for m in client.complete(chat, context)]
            await wait_state(client, batched[1].batch.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert (batched[0].decision.mode, batched[0].decision.model) == (pb.MODE_BATCH, realtime[0].decision.model)
        assert fake.batches[0].requests[0][key]["tools"] == fake.requests[0].body["tools"]

    @pytest.mark.parametrize(
        ("task", "key", "field"), [("", "body", "stop"), ("creative_writing", "params", "stop_sequences")]
    )
    async def test_stop_sequences_of_a_job_queued_across_a_restart_reach_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str, key: str, field: str
    ) -> None:
        """A job still queued at shutdown keeps its stop sequences in the store: the next server's
        provider batch carries them (OpenAI body ``stop``, Anthropic params ``stop_sequences``)."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        chat = build_chat([("user", "Summarise this report")], stop=["END", "Sources:"])
        context = pb.RoutingContext(tenant="acme", task_hint=task, realtime=False)
        async with (
            Server(settings_from(waiting, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = [m async for m in client.complete(chat, context)][1].batch
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert fake.batches[0].requests[0][key][field] == ["END", "Sources:"]

    @pytest.mark.parametrize(
        ("task", "key", "expected"),
        [
            (
                "",
                "body",
                {"tool_choice": {"type": "function", "function": {"name": "lookup"}}, "parallel_tool_calls": False},
            ),
            (
                "creative_writing",
                "params",
                {"tool_choice": {"type": "tool", "name": "lookup", "disable_parallel_tool_use": True}},
            ),
        ],
        ids=["openai", "anthropic"],
    )
    async def test_the_tool_choice_of_a_job_queued_across_a_restart_reaches_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str, key: str, expected: dict[str, object]
    ) -> None:
        """A job still queued at shutdown keeps its tool choice and ``parallel_tool_calls`` in the
        store: the next server's provider batch carries them as a realtime call would."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        chat = build_chat(
            [("user", "Summarise this report")],
            tools=[pb.Tool(name="lookup"), pb.Tool(name="clock")],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, name="lookup"),
            parallel_tool_calls=False,
        )
        context = pb.RoutingContext(tenant="acme", task_hint=task, realtime=False)
        async with (
            Server(settings_from(waiting, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = [m async for m in client.complete(chat, context)][1].batch
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        sent = fake.batches[0].requests[0][key]
        assert {name: sent.get(name) for name in expected} == expected

    @pytest.mark.parametrize(
        ("task", "key", "field", "expected"),
        [
            (
                "",
                "body",
                "response_format",
                {
                    "type": "json_schema",
                    "json_schema": {"name": "summary", "schema": SUMMARY_SCHEMA, "strict": False},
                },
            ),
            (
                "creative_writing",
                "params",
                "output_config",
                {"format": {"type": "json_schema", "schema": SUMMARY_SCHEMA}},
            ),
        ],
        ids=["openai", "anthropic"],
    )
    async def test_the_response_format_of_a_job_queued_across_a_restart_reaches_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str, key: str, field: str, expected: dict[str, object]
    ) -> None:
        """A job still queued at shutdown keeps its JSON schema response format in the store: the
        next server's provider batch carries it as a realtime call would (OpenAI ``response_format``,
        Anthropic ``output_config``)."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        response_format = pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="summary", schema_json=json.dumps(SUMMARY_SCHEMA)
        )
        chat = build_chat([("user", "Summarise this report")], response_format=response_format)
        context = pb.RoutingContext(tenant="acme", task_hint=task, realtime=False)
        async with (
            Server(settings_from(waiting, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = [m async for m in client.complete(chat, context)][1].batch
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert fake.batches[0].requests[0][key][field] == expected

    def test_a_request_stored_before_tools_were_kept_has_none(self) -> None:
        """A queued row written by an earlier release (no "tools" key) still decodes, with no tools."""
        old = '{"messages": [{"role": "user", "content": "hi"}], "max_output_tokens": 16, "temperature": null}'
        request = decode_request(old)
        assert (request.messages, request.max_output_tokens, request.tools) == ((Message(Role.USER, "hi"),), 16, ())


class TestBatchCallerGoneAfterTheJobWasQueued:
    async def test_a_call_that_ends_before_the_job_id_is_sent_leaves_no_job(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The job is stored and the decision delivered, then the call ends (the service closes
        the router's stream, as when the client leaves while the decision is written): the job,
        held until then, was never sent, and ends CANCELLED ``caller_cancelled``; nothing is spent,
        and a retry makes no duplicate."""
        async with Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server:
            chat = ChatRequest((Message(Role.USER, "Summarise this report"),))
            events = server.router.complete(RoutingRequest(chat, RoutingContext(tenant="acme", realtime=False)))
            assert isinstance(await anext(events), RouteDecision)
            await asyncio.sleep(0.3)  # six group windows: a job a poller could take would be sent by now
            await events.aclose()
            await asyncio.sleep(0.3)
            spent = await server.router.admission.spent("acme")
        assert job_states(tmp_path / "batches.db") == ["cancelled"]
        assert (fake.batches, spent) == ([], 0)

    async def test_a_job_whose_id_was_handed_over_stands_when_the_call_ends(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The call ends once the job's id was handed to the transport (the service closes the
        router's stream, as when a client cancels on reading the id): the job is sent and
        answered, and its budget ends at its real cost."""
        fake.enqueue(Script(text="x", input_tokens=100, output_tokens=20), model="gpt-4o-mini")
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            chat = ChatRequest((Message(Role.USER, "Summarise this report"),))
            events = server.router.complete(RoutingRequest(chat, RoutingContext(tenant="acme", realtime=False)))
            received = [await anext(events) for _ in range(2)]
            await events.aclose()
            assert isinstance(received[1], BatchJob)
            done = await wait_state(client, received[1].batch_id, pb.BATCH_STATE_SUCCEEDED)
            async with asyncio.timeout(5):
                while await server.router.admission.spent("acme") != Decimal(done.result.cost_usd):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        assert len(fake.batches) == 1

    async def test_a_client_that_stops_at_the_job_id_does_not_cancel_the_call(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """``RouterClient.complete`` hands over the job's id once the stream has ended, as it does
        the completion: a caller that breaks out on it leaves the call to end OK."""
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                context = pb.RoutingContext(tenant="acme", realtime=False)
                async for message in client.complete(user_chat("Summarise this report"), context):
                    if message.WhichOneof("event") == "batch":
                        break
                # The call's end is logged off the caller's task: wait for it, not a fixed 0.2 s.
                await until(lambda: any(entry["event"] == "rpc_finished" for entry in logs))
                await asyncio.sleep(0.2)  # and no second line follows
        assert [entry["code"] for entry in logs if entry["event"] == "rpc_finished"] == ["OK"]
        assert message.batch.batch_id

    async def test_a_call_whose_deadline_passes_while_its_job_is_released_ends_ok(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The job's id is sent, then the call's deadline passes while the job is being released
        (the store write is held back here, as another writer holding the store's lock does): the
        job stands, so the call ends OK (status and rpc_finished line) with the id. It ended
        DEADLINE_EXCEEDED without the committed trailers, and a caller retrying as that status
        invites queued the job twice."""
        released = asyncio.Event()
        commit = BatchStore.commit

        async def held_commit(store: BatchStore, batch_id: str, owner: str, budget_usd: Decimal | None) -> None:
            await released.wait()
            await commit(store, batch_id, owner, budget_usd)

        monkeypatch.setattr(BatchStore, "commit", held_commit)
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            received: list[pb.CompleteResponse] = []
            context = pb.RoutingContext(tenant="acme", realtime=False)
            with capture_logs() as logs:
                async for message in client.complete(user_chat("Summarise this report"), context, timeout=1.0):
                    received.append(message)
                await until(lambda: any(entry["event"] == "rpc_finished" for entry in logs))
            released.set()
            seen = [message.WhichOneof("event") for message in received]
            job = received[-1].batch
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        finished = [entry for entry in logs if entry["event"] == "rpc_finished"]
        assert seen == ["decision", "batch"]
        assert [(entry["code"], entry["batch_id"]) for entry in finished] == [("OK", job.batch_id)]
        assert float(str(finished[0]["duration_ms"])) >= 500  # it did wait for the release
        assert done.result.text

    async def test_a_settle_that_fails_at_the_commit_still_releases_the_job(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The caller's settle raises (our bug, forced here) while its job is committed: the job,
        whose id is out, is released all the same (not held for the claim's five minutes), and
        the failure is logged with the job's id."""

        async def failing_settle(*args: object) -> bool:
            raise RuntimeError("settle failed")

        monkeypatch.setattr(LocalAdmission, "_settle", failing_settle)
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        failed = [entry for entry in logs if entry["event"] == "batch_commit_count_failed"]
        assert [entry["batch_id"] for entry in failed] == [job.batch_id]
        assert done.result.text


class TestBatchSubmitInterrupted:
    """A submit that cannot finish: the caller learns no job id, so no job runs for it."""

    async def test_a_caller_gone_while_its_job_is_written_leaves_it_cancelled_and_unsent(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Another process holds the store's write lock past the caller's deadline: the caller gets
        DEADLINE_EXCEEDED; the write goes through once the lock is free, and the job ends CANCELLED,
        never sent to the provider and never charged."""
        path = tmp_path / "batches.db"
        await BatchStore(path).aclose()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with write_locked(path):
                context = pb.RoutingContext(tenant="acme", realtime=False)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in client.complete(user_chat("Summarise this report"), context, timeout=0.5):
                        pass
            async with asyncio.timeout(5):
                while job_states(path) in ([], ["queued"]):  # noqa: ASYNC110 - another process's file, polled
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # ten group windows and poll intervals
            states = job_states(path)
            charged = server.router.ledger.entries()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert states == ["cancelled"]
        assert (fake.batches, charged) == ([], [])

    async def test_a_store_locked_past_the_busy_timeout_is_busy_and_retryable(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Another process holds the write lock longer than the busy timeout (5 s): the Complete is
        UNAVAILABLE BATCH_STORE_BUSY with a retry delay, naming batch.store_path, not INTERNAL
        (nor FAILED_PRECONDITION, which says not to retry), and once the lock is free the next
        one is queued."""
        path = tmp_path / "batches.db"
        await BatchStore(path).aclose()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with write_locked(path), pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(client)
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "BATCH_STORE_BUSY"
        assert retry_delay(caught.value) == 1.0
        assert "batch.store_path" in (caught.value.details() or "")

    async def test_a_store_locked_when_first_opened_is_busy_too(self, tmp_path: Path, fake: FakeProvider) -> None:
        """The store file is created and write-locked by another process before this server first
        opens it: the first batch Complete is UNAVAILABLE BATCH_STORE_BUSY as well (opening the
        file writes to it), not FAILED_PRECONDITION."""
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with write_locked(tmp_path / "batches.db"), pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(client)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "BATCH_STORE_BUSY",
        )


class TestBatchStoreBound:
    """The store keeps at most batch.max_stored_request_bytes of requests no provider has taken."""

    async def test_a_job_past_the_bound_is_refused_until_a_kept_one_goes(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """With one job's request kept (its provider has not taken it) and room for less than two,
        the next job is RESOURCE_EXHAUSTED BATCH_STORE_FULL with a retry delay, naming the setting
        and storing nothing; once the kept one is cancelled (its request dropped) a job is queued
        again. The bound counts what the file holds, across a restart."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 600  # type: ignore[index]  # kept, never sent here
        path = tmp_path / "batches.db"
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            first = (await submit(client))[1].batch
        [request] = stored_requests(path)
        config["batch"]["max_stored_request_bytes"] = 2 * len(request) - 1  # type: ignore[index]
        config["batch"]["max_tenant_share_of_stored_requests"] = 1  # type: ignore[index]  # one tenant: the store's bound
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(client)
            assert len(job_states(path)) == 1
            await client.cancel_batch(first.batch_id, tenant="acme")
            second = (await submit(client))[1].batch
            assert (await get_batch(client, second.batch_id)).job.state == pb.BATCH_STATE_QUEUED
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "BATCH_STORE_FULL"
        assert retry_delay(caught.value) == 30.0
        assert "batch.max_stored_request_bytes" in (caught.value.details() or "")
        assert "Summarise" not in (caught.value.details() or "")
        assert fake.batches == []

    async def test_a_tenant_past_its_share_is_refused_while_another_is_still_queued(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """One tenant's requests may hold max_tenant_share_of_stored_requests of the bound: with
        room for one job of each of four tenants, a tenant's second job is RESOURCE_EXHAUSTED
        BATCH_STORE_FULL naming that setting and the tenant (not the prompt), while another
        tenant's job is still queued (the first tenant filled the store for every tenant)."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 600  # type: ignore[index]  # kept, never sent here
        path = tmp_path / "batches.db"
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await submit(client, tenant="greedy")
        [request] = stored_requests(path)
        config["batch"]["max_stored_request_bytes"] = 4 * len(request) + 3  # type: ignore[index]
        config["batch"]["max_tenant_share_of_stored_requests"] = 0.25  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(client, tenant="greedy")
            other = (await submit(client, tenant="modest"))[1].batch
            assert (await get_batch(client, other.batch_id, tenant="modest")).job.state == pb.BATCH_STATE_QUEUED
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "BATCH_STORE_FULL"
        assert retry_delay(caught.value) == 30.0
        details = caught.value.details() or ""
        assert "batch.max_tenant_share_of_stored_requests" in details
        assert "'greedy'" in details
        assert "Summarise" not in details
        assert len(job_states(path)) == 2

    @pytest.mark.parametrize(
        ("setting", "share", "stored_per_request"),
        [("batch.max_tenant_share_of_stored_requests", 0.2, 4.0), ("batch.max_stored_request_bytes", 1, 0.99)],
    )
    async def test_a_request_that_alone_is_over_a_bound_is_too_large_not_retryable(
        self, tmp_path: Path, fake: FakeProvider, setting: str, share: float, stored_per_request: float
    ) -> None:
        """A request that alone takes more of the store than its tenant may keep (its tenant
        keeps nothing there), or than the store may keep in all, could never be queued: it is
        RESOURCE_EXHAUSTED REQUEST_TOO_LARGE without a retry delay, naming the setting (not the
        prompt), and nothing is stored (it was BATCH_STORE_FULL "retry in 30 s", for ever)."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 600  # type: ignore[index]  # kept, never sent here
        path = tmp_path / "batches.db"
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await submit(client)
        [request] = stored_requests(path)
        config["batch"]["max_stored_request_bytes"] = int(stored_per_request * len(request))  # type: ignore[index]
        config["batch"]["max_tenant_share_of_stored_requests"] = share  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(client, tenant="solo")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "REQUEST_TOO_LARGE"
        with pytest.raises(AssertionError, match="no RetryInfo"):
            retry_delay(caught.value)
        details = caught.value.details() or ""
        assert setting in details
        assert "Summarise" not in details
        assert len(job_states(path)) == 1


def with_model_copy(config: dict[str, object], model_id: str, of: str = "gpt-4o-mini") -> dict[str, object]:
    """``config`` with one more catalog model, ``model_id``, priced and served like ``of``."""
    changed = copy.deepcopy(config)
    models: list[dict[str, object]] = changed["models"]  # type: ignore[assignment]
    models.append({**next(m for m in models if m["id"] == of), "id": model_id, "provider_model": of})
    return changed


def fake_model(model: str) -> str:
    """The provider model name the fake sees for a catalog id."""
    return {"claude-sonnet": "claude-sonnet-4-6"}.get(model, model)


class TestBatchFaults:
    """Expiry and failure at the provider, cancellation, and other tenants' jobs."""

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_an_expired_batch_ends_expired_and_uncharged(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """The provider's 24 h window passes: EXPIRED, no result, nothing in the ledger."""
        fake.batch_outcome = BatchOutcome.EXPIRE
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            expired = await wait_state(client, job.batch_id, pb.BATCH_STATE_EXPIRED)
            assert not expired.HasField("result")
            assert [e for e in server.router.ledger.entries() if e.request_id == job.batch_id] == []

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_cancel_before_the_provider_answers(self, tmp_path: Path, fake: FakeProvider, task: str) -> None:
        """CancelBatch on a submitted job: CANCELLED, the provider batch is cancelled, nothing charged."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            cancelled = await client.cancel_batch(job.batch_id, tenant="acme")
            assert cancelled.state == pb.BATCH_STATE_CANCELLED
            assert fake.batches[0].cancelled
            fake.batch_outcome = BatchOutcome.COMPLETE
            await asyncio.sleep(0.3)
            assert (await get_batch(client, job.batch_id)).job.state == pb.BATCH_STATE_CANCELLED
            assert server.router.ledger.entries() == []

    async def test_cancel_while_queued_never_reaches_the_provider(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A job still in the grouping window: CANCELLED at once, never sent, nothing charged."""
        config = batch_config(tmp_path)
        # 1.5 s: the cancel must land within the window however loaded the machine is (0.5 s
        # left a submit and a cancel little room).
        config["batch"]["group_window_seconds"] = 1.5  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            cancelled = await client.cancel_batch(job.batch_id, tenant="acme")
            await asyncio.sleep(2.0)  # past the window: the job would have been sent by now
            assert (cancelled.state, (await get_batch(client, job.batch_id)).job.state) == (
                pb.BATCH_STATE_CANCELLED,
                pb.BATCH_STATE_CANCELLED,
            )
            assert server.router.ledger.entries() == []
        assert fake.batches == []

    async def test_cancel_while_the_group_is_being_sent_cancels_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """CancelBatch while the poller is uploading the job's group (a slow network): the job ends
        CANCELLED, and the provider batch, which no job waits for, is cancelled at the provider."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(delay_per_chunk=0.3)
            environ = {**live_environ(fake), "OPENAI_BASE_URL": f"{proxy.base_url}/v1"}
            async with (
                Server(settings_from(batch_config(tmp_path), environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch
                # Grouped, claimed, and being uploaded through the slow proxy: the poller has
                # connected (a fixed 0.3 s sleep could end before it did on a loaded machine).
                await until(lambda: proxy.connections >= 1)
                cancelled = await client.cancel_batch(job.batch_id, tenant="acme")
                async with asyncio.timeout(10):
                    while not (fake.batches and fake.batches[0].cancelled):  # noqa: ASYNC110 - the fake has no event
                        await asyncio.sleep(0.05)
                state = (await get_batch(client, job.batch_id)).job.state
                charged = server.router.ledger.entries()
        assert (cancelled.state, state) == (pb.BATCH_STATE_CANCELLED, pb.BATCH_STATE_CANCELLED)
        assert ([b.cancelled for b in fake.batches], charged) == ([True], [])

    async def test_sibling_jobs_cancelled_at_once_cancel_their_provider_batch(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The two jobs of one provider batch cancelled at once through two workers, while a third
        process holds the store's write lock: both end CANCELLED and the provider batch is
        cancelled (each cancel decides in its own transaction; the later one finds no job left)."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 0.3  # type: ignore[index]
        path = tmp_path / "batches.db"
        await BatchStore(path).aclose()
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(config, live_environ(fake))
        async with (
            Server(settings, port=0) as first,
            Server(settings, port=0) as second,
            RouterClient(first.target) as one,
            RouterClient(second.target) as other,
        ):
            jobs = [(await submit(one))[1].batch.batch_id for _ in range(2)]
            for batch_id in jobs:
                await wait_state(one, batch_id, pb.BATCH_STATE_SUBMITTED)
            with write_locked(path):
                cancels = [
                    asyncio.ensure_future(client.cancel_batch(batch_id, tenant="acme"))
                    for client, batch_id in zip((one, other), jobs, strict=True)
                ]
                await asyncio.sleep(0.5)  # both cancels have read the job and wait to write
            cancelled = await asyncio.gather(*cancels)
        assert [c.state for c in cancelled] == [pb.BATCH_STATE_CANCELLED] * 2
        assert [(len(b.requests), b.cancelled) for b in fake.batches] == [(2, True)]

    async def test_another_tenants_or_an_unknown_job_is_not_found(self, tmp_path: Path, fake: FakeProvider) -> None:
        """GetBatch with another tenant, or an id that never existed: NOT_FOUND / BATCH_NOT_FOUND."""
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, tenant="acme"))[1].batch
            for batch_id, tenant in ((job.batch_id, "globex"), (UNKNOWN_BATCH_ID, "acme")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await get_batch(client, batch_id, tenant)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert error_info(caught.value).reason == "BATCH_NOT_FOUND"

    @pytest.mark.parametrize(
        "batch_id",
        ["xyz", "\x00", "   ", "batch_" + "0" * 31, "batch_" + "A" * 32, UNKNOWN_BATCH_ID + "\n", "b" * 129],
        ids=["word", "nul", "blank", "31-digits", "upper-case", "newline-after", "overlong"],
    )
    async def test_an_id_not_of_the_batch_id_form_is_invalid_argument(self, tmp_path: Path, batch_id: str) -> None:
        """GetBatch and CancelBatch take "batch_" and 32 lowercase hex digits, the form of every
        job's id: another string is INVALID_ARGUMENT naming batch_id (it was NOT_FOUND, as if such a
        job could exist), whatever the tenant; an unknown id of the form stays NOT_FOUND."""
        async with (
            Server(settings_from(batch_config(tmp_path)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            refused = []
            for call in (client.get_batch, client.cancel_batch):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(batch_id, tenant="acme")
                refused.append((caught.value.code(), error_info(caught.value).metadata["field"]))
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.cancel_batch(UNKNOWN_BATCH_ID, tenant="acme")
        assert refused == [(grpc.StatusCode.INVALID_ARGUMENT, "batch_id")] * 2
        assert (unknown.value.code(), error_info(unknown.value).reason) == (
            grpc.StatusCode.NOT_FOUND,
            "BATCH_NOT_FOUND",
        )

    async def test_a_tenant_over_1024_characters_is_invalid_argument(self, tmp_path: Path) -> None:
        """GetBatch's and CancelBatch's tenant is held to context.tenant's limit, with its message."""
        async with (
            Server(settings_from(batch_config(tmp_path)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            refused = []
            for call in (client.get_batch, client.cancel_batch):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(UNKNOWN_BATCH_ID, tenant="t" * 1025)
                refused.append(
                    (caught.value.code(), caught.value.details(), error_info(caught.value).metadata["field"])
                )
        assert refused == [(grpc.StatusCode.INVALID_ARGUMENT, "tenant: must be at most 1024 characters", "tenant")] * 2


class TestBatchPollerIsolation:
    """One model group or one provider batch that cannot be handled fails alone; the poller goes on."""

    async def test_a_model_added_by_hot_reload_is_batched(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A job for a model the reload added succeeds at its batch price, and so does a job queued after it."""
        config = batch_config(tmp_path)
        environ = live_environ(fake)
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            await server.reload(settings_from(with_model_copy(config, "gpt-4o-mini-2"), environ))
            new = (await submit(client, model="gpt-4o-mini-2"))[1].batch
            old = (await submit(client, model="gpt-4o"))[1].batch
            await wait_state(client, new.batch_id, pb.BATCH_STATE_SUCCEEDED)
            await wait_state(client, old.batch_id, pb.BATCH_STATE_SUCCEEDED)
            charged = {e.request_id: e.model for e in server.router.ledger.entries()}
        assert charged == {new.batch_id: "gpt-4o-mini-2", old.batch_id: "gpt-4o"}

    async def test_a_model_gone_after_a_restart_fails_its_jobs(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Queued for a model the next configuration drops: FAILED model_not_in_catalog; other jobs succeed."""
        waiting = with_model_copy(batch_config(tmp_path), "gpt-4o-mini-2")
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        environ = live_environ(fake)
        async with Server(settings_from(waiting, environ), port=0) as server, RouterClient(server.target) as client:
            orphan = (await submit(client, model="gpt-4o-mini-2"))[1].batch
        async with (
            Server(settings_from(batch_config(tmp_path), environ), port=0) as server,
            RouterClient(server.target) as client,
        ):
            other = (await submit(client))[1].batch
            failed = await wait_state(client, orphan.batch_id, pb.BATCH_STATE_FAILED)
            await wait_state(client, other.batch_id, pb.BATCH_STATE_SUCCEEDED)
            assert [e.request_id for e in server.router.ledger.entries()] == [other.batch_id]
        assert failed.error == "model_not_in_catalog"
        assert [len(b.requests) for b in fake.batches] == [1]

    async def test_an_answer_billed_after_a_reload_removed_its_model_is_delivered_and_charged(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A reload removes the model of a job already sent; the provider answers it, and bills
        it: the job ends SUCCEEDED with its answer, charged once at the model's batch price as
        it was when the job was queued, and the batch is deleted once read (the job ended FAILED
        model_not_in_catalog, uncharged, and the answer was deleted with the batch)."""
        fake.batch_outcome = BatchOutcome.PENDING
        fake.enqueue(BILLED, model="gpt-4o-mini")
        config = with_model_copy(batch_config(tmp_path), "gpt-4o-mini-2")
        environ = live_environ(fake)
        settings = settings_from(config, environ)
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client, model="gpt-4o-mini-2"))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            await server.reload(settings_from(batch_config(tmp_path), environ))  # the model is gone
            fake.batch_outcome = BatchOutcome.COMPLETE
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: discarded(fake))
            ledger = [(e.request_id, e.model, e.cost_usd) for e in server.router.ledger.entries()]
        cost = cost_of_usage(settings.catalog.get("gpt-4o-mini-2"), Usage(100, 20), Mode.BATCH)
        assert done.result.text == BILLED.text
        assert ledger == [(job.batch_id, "gpt-4o-mini-2", cost)]

    async def test_a_batch_the_provider_no_longer_knows_fails_alone(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Polling one provider batch answers 404: its job ends FAILED provider_batch_not_found, uncharged,
        and a later job's batch is still polled and succeeds."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            lost = (await submit(client))[1].batch
            await wait_state(client, lost.batch_id, pb.BATCH_STATE_SUBMITTED)
            fake.reset()  # the provider forgets every batch; new ones complete
            later = (await submit(client))[1].batch
            failed = await wait_state(client, lost.batch_id, pb.BATCH_STATE_FAILED)
            await wait_state(client, later.batch_id, pb.BATCH_STATE_SUCCEEDED)
            assert [e.request_id for e in server.router.ledger.entries()] == [later.batch_id]
        assert failed.error == "provider_batch_not_found"


class TestBatchPollerTimers:
    """A submit wakes the poller to group jobs; provider batches are polled once an interval."""

    async def test_submits_do_not_poll_provider_batches(self, tmp_path: Path, fake: FakeProvider) -> None:
        """poll_interval_seconds 30, every job sent at once: five submits send five provider
        batches, and only the first round polls (the first batch, once)."""
        config = batch_config(tmp_path)
        config["batch"].update(group_window_seconds=0, poll_interval_seconds=30)  # type: ignore[attr-defined]
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            for _ in range(5):
                job = (await submit(client))[1].batch
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
        assert [b.retrieved for b in fake.batches] == [1, 0, 0, 0, 0]

    async def test_a_job_submitted_during_a_round_is_sent_after_its_window(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Job B arrives while the poller is sending job A (a slow network) and poll_interval_seconds
        is 30: B is sent as soon as that round is over, not a poll interval later."""
        config = batch_config(tmp_path)
        config["batch"]["poll_interval_seconds"] = 30  # type: ignore[index]
        fake.batch_outcome = BatchOutcome.PENDING
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(delay_per_chunk=0.1)
            environ = {**live_environ(fake), "OPENAI_BASE_URL": f"{proxy.base_url}/v1"}
            async with (
                Server(settings_from(config, environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                first = (await submit(client))[1].batch
                # A is being uploaded through the slow proxy: the poller has connected (a fixed
                # 0.2 s sleep could end before it did on a loaded machine, and then A and B were
                # one group).
                await until(lambda: proxy.connections >= 1)
                started = time.monotonic()
                second = (await submit(client))[1].batch
                await wait_state(client, second.batch_id, pb.BATCH_STATE_SUBMITTED, timeout=10)
                waited = time.monotonic() - started
                await wait_state(client, first.batch_id, pb.BATCH_STATE_SUBMITTED)
        assert [b.custom_ids for b in fake.batches] == [[first.batch_id], [second.batch_id]]
        assert waited < 10

    async def test_submitted_jobs_of_a_provider_without_its_key_wait_and_resume(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Restarted without the provider's key: its submitted job stays SUBMITTED, logged once
        (batch_poll_skipped, no key and no prompt); restarted with the key, it succeeds."""
        config = batch_config(tmp_path)
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
        fake.batch_outcome = BatchOutcome.COMPLETE
        keyless = {k: v for k, v in live_environ(fake).items() if not k.startswith("OPENAI_API_KEY")}
        async with (
            Server(settings_from(config, keyless), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                # A round has skipped the job, however long a loaded machine takes to get there ...
                await until(lambda: any(entry["event"] == "batch_poll_skipped" for entry in logs))
                await asyncio.sleep(0.5)  # ... and ten more poll intervals: logged once
            waiting = await get_batch(client, job.batch_id)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        skipped = [entry for entry in logs if entry["event"] == "batch_poll_skipped"]
        assert waiting.job.state == pb.BATCH_STATE_SUBMITTED
        assert [(e["provider"], e["provider_batch_id"], e["jobs"]) for e in skipped] == [
            ("openai", fake.batches[0].id, 1)
        ]
        assert "Summarise" not in repr(skipped)


class TestBatchWorkersShareTheStore:
    """Several workers (``server.workers``) run a poller each on one store: every job is sent once."""

    async def test_two_pollers_on_one_store_submit_each_job_once(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Two servers on one store, a slow network making each send last several poll intervals: each
        job is in exactly one provider batch, succeeds, and is charged once across both."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 0.3  # type: ignore[index]
        await BatchStore(tmp_path / "batches.db").aclose()  # the file exists, as after any earlier run
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(delay_per_chunk=0.15)
            settings = settings_from(config, {**live_environ(fake), "OPENAI_BASE_URL": f"{proxy.base_url}/v1"})
            async with (
                Server(settings, port=0) as first,
                Server(settings, port=0) as second,
                RouterClient(first.target) as client,
            ):
                jobs = [(await submit(client))[1].batch.batch_id for _ in range(3)]
                for batch_id in jobs:
                    await wait_state(client, batch_id, pb.BATCH_STATE_SUCCEEDED, timeout=10)
                await until(lambda: sum(len(s.router.ledger.entries()) for s in (first, second)) >= len(jobs))
                await asyncio.sleep(0.3)  # both pollers have read the results
                charged = [e.request_id for s in (first, second) for e in s.router.ledger.entries()]
        sent = [request["custom_id"] for batch in fake.batches for request in batch.requests]
        assert sorted(sent) == sorted(jobs)
        assert sorted(charged) == sorted(jobs)


class TestBatchPersistence:
    """Jobs live in SQLite: a restart between submit and completion loses nothing and charges once."""

    async def test_a_restart_loses_no_job(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Submitted, server stopped, provider completes, new server: the answer arrives, charged once."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
        fake.batch_outcome = BatchOutcome.COMPLETE
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            assert done.result.text
            await until(lambda: any(e.request_id == job.batch_id for e in server.router.ledger.entries()))
            await asyncio.sleep(0.2)  # more rounds: charged once
            assert len([e for e in server.router.ledger.entries() if e.request_id == job.batch_id]) == 1
        assert len(fake.batches) == 1

    async def test_a_shutdown_while_results_are_stored_charges_every_job_it_ended(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The server stops while a round stores the second job's answer (its write held up by
        another writer of the file, a second worker): the write, which runs to its end in a
        worker thread, and the job's charge are one unit the shutdown waits for, so the job
        ended SUCCEEDED is charged (it was not, and no later round reads an ended job again)."""
        config = grouping_two(batch_config(tmp_path))
        fake.batch_outcome = BatchOutcome.PENDING
        other_writer = sqlite3.connect(tmp_path / "batches.db", isolation_level=None)
        writing = asyncio.Event()
        finish = BatchStore.finish

        async def finish_held(store: BatchStore, batch_id: str, state: BatchState, **kwargs: Any) -> bool:
            # A spy: the second answer's write waits for the other writer's lock.
            if state is BatchState.SUCCEEDED and not writing.is_set() and server.router.ledger.entries():
                other_writer.execute("BEGIN IMMEDIATE")
                writing.set()
            return await finish(store, batch_id, state, **kwargs)

        monkeypatch.setattr(BatchStore, "finish", finish_held)
        try:
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                jobs = await two_jobs(client)
                await wait_state(client, jobs[1].batch_id, pb.BATCH_STATE_SUBMITTED)
                fake.batch_outcome = BatchOutcome.COMPLETE
                await writing.wait()
                closing = asyncio.create_task(server.batches.aclose())  # what Server.stop does
                await until(lambda: server.batches._task is None)  # the poller is gone
                other_writer.execute("COMMIT")
                await closing
                charged = sorted(entry.request_id for entry in server.router.ledger.entries())
        finally:
            other_writer.close()
        assert job_states(tmp_path / "batches.db") == ["succeeded", "succeeded"]
        assert charged == sorted(job.batch_id for job in jobs)

    async def test_the_store_files_are_readable_by_their_owner_only(self, tmp_path: Path, fake: FakeProvider) -> None:
        """The store holds prompts and answers: it and its write-ahead files are 0600, whatever the
        umask (SQLite alone made them 0644, readable by every local user)."""
        previous = os.umask(0o022)
        try:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                modes = file_modes(tmp_path, "batches.db*")
        finally:
            os.umask(previous)
        assert modes == {"batches.db": 0o600, "batches.db-wal": 0o600, "batches.db-shm": 0o600}


def budget_config(tmp_path: Path) -> dict[str, object]:
    """``batch_config`` with tenant acme on a daily budget."""
    config = batch_config(tmp_path)
    config["tenants"] = {"acme": {"daily_budget_usd": "1"}}
    return config


class TestBatchReplicas:
    async def test_a_replica_started_before_the_store_existed_reads_a_siblings_batch(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two replicas (one URL, one key) share a store path that does not exist yet; the one
        that gets the first batch request creates it, sends the job and stops before its batch
        ends: the other, which no batch request ever reached, opens the store on its own timer,
        reads the batch and charges the job once (it never opened it: the job stayed SUBMITTED)."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        path = tmp_path / "batches.db"
        async with Server(settings, port=0) as replica:
            async with Server(settings, port=0) as first, RouterClient(first.target) as client:
                job = (await submit(client))[1].batch.batch_id
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            fake.batch_outcome = BatchOutcome.COMPLETE
            await until(lambda: job_states(path) == ["succeeded"] and any(replica.router.ledger.entries()))
            charged = [e.request_id for e in replica.router.ledger.entries()]
        assert [job] == charged


class TestBatchBudgets:
    """A job's tenant budget counts its estimate when it is queued, and what it really cost once
    it ends: its batch-price cost when answered, nothing when it ends unanswered."""

    async def test_an_answered_job_counts_its_real_cost(self, tmp_path: Path, fake: FakeProvider) -> None:
        fake.enqueue(Script(text="A short summary.", input_tokens=100, output_tokens=20), model="gpt-4o-mini")
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            assert await server.router.admission.spent("acme") == Decimal(job.estimated_cost_usd)
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            async with asyncio.timeout(5):  # corrected by the poller's round that read the result
                while await server.router.admission.spent("acme") == Decimal(job.estimated_cost_usd):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # more rounds: corrected once
            spent = await server.router.admission.spent("acme")
        assert spent == Decimal(done.result.cost_usd) < Decimal(job.estimated_cost_usd)

    @pytest.mark.parametrize("ending", ["cancelled", "failed"])
    async def test_a_job_ended_unanswered_counts_nothing(self, tmp_path: Path, fake: FakeProvider, ending: str) -> None:
        """Cancelled by the caller, or failed by the provider: its estimate is given back."""
        fake.batch_outcome = BatchOutcome.PENDING if ending == "cancelled" else BatchOutcome.COMPLETE
        fake.enqueue(Script(status=500), model="gpt-4o-mini")
        async with (
            Server(settings_from(budget_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            if ending == "cancelled":
                await client.cancel_batch(job.batch_id, tenant="acme")
            else:
                await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
            async with asyncio.timeout(5):  # a failure is corrected by the poller's round that read it
                while await server.router.admission.spent("acme"):  # noqa: ASYNC110 - the round has no event
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # more rounds: corrected once
            spent = await server.router.admission.spent("acme")
        assert spent == 0

    async def test_a_job_of_a_tenant_without_limits_when_queued_gives_nothing_back(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Tenant acme had no limits when its job was queued (nothing counted); a reload then gives
        it a budget, and the job is cancelled: its spend stays 0 (it went below zero)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            await server.reload(settings_from(budget_config(tmp_path), live_environ(fake)))
            await client.cancel_batch(job.batch_id, tenant="acme")
            spent = await server.router.admission.spent("acme")
        assert spent == 0

    async def test_a_job_ended_by_another_worker_is_corrected_by_the_one_that_counted_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two servers on one store, budgets per process: the job queued and counted by the first
        is cancelled through the second; the first's next round gives its estimate back, and the
        second's budget, which never counted it, is untouched."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(budget_config(tmp_path), live_environ(fake))
        async with (
            Server(settings, port=0) as first,
            Server(settings, port=0) as second,
            RouterClient(first.target) as to_first,
            RouterClient(second.target) as to_second,
        ):
            job = (await submit(to_first))[1].batch
            assert await first.router.admission.spent("acme") == Decimal(job.estimated_cost_usd)
            await to_second.cancel_batch(job.batch_id, tenant="acme")
            async with asyncio.timeout(5):
                while await first.router.admission.spent("acme"):  # noqa: ASYNC110 - the round has no event
                    await asyncio.sleep(0.02)
            assert await second.router.admission.spent("acme") == 0

    async def test_a_job_queued_before_a_restart_changes_no_fresh_local_budget(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Budgets kept in the process start from nothing after a restart, so a job queued before
        it that ends unanswered afterwards gives nothing back (the budget would go below zero)."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(budget_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            await client.cancel_batch(job.batch_id, tenant="acme")
            spent = await server.router.admission.spent("acme")
        assert spent == 0


async def spent_reaches(server: Server, expected: Decimal, tenant: str = "acme") -> Decimal:
    """Wait until ``tenant`` has spent ``expected`` (the poller's round corrects it; a generous cap)."""
    async with asyncio.timeout(10):
        while (spent := await server.router.admission.spent(tenant)) != expected:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.02)
    return spent


def corrections_due(path: Path) -> int:
    """Jobs in the store at ``path`` whose counted budget still waits for its correction."""
    connection = sqlite3.connect(path)
    try:
        return int(
            connection.execute(
                "SELECT count(*) FROM jobs WHERE budget_usd IS NOT NULL AND budget_done IS NULL"
            ).fetchone()[0]
        )
    finally:
        connection.close()


def discarded(fake: FakeProvider) -> bool:
    """Whether what the provider kept of every batch is deleted (OpenAI's files, Anthropic's batches)."""
    return not fake.files and all(b.deleted for b in fake.batches if b.api == "anthropic")


# The answer the provider bills for each request in the tests of cancelled jobs.
BILLED = Script(text="A short summary.", input_tokens=100, output_tokens=20)


def billed_cost(server: Server, model: str) -> Decimal:
    """What ``BILLED`` costs on ``model`` at the batch price."""
    return cost_of_usage(server.router.settings.catalog.get(model), Usage(100, 20), Mode.BATCH)


def cancelled_config(tmp_path: Path) -> dict[str, object]:
    """``budget_config`` grouping two jobs submitted together (``two_jobs``) in one batch."""
    return grouping_two(budget_config(tmp_path))


def lapse(path: Path, *also: str) -> None:
    """End the claims in the store file at ``path`` (as ``CLAIM_SECONDS`` after a send that died
    with its process), after the statements ``also``, through another connection."""
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        for statement in also:
            connection.execute(statement)
        connection.execute("UPDATE jobs SET claimed_until = 0")


class TestBatchJobCancelledAfterItWasSent:
    """A job cancelled once it is in a provider batch may be answered, and billed, by the
    provider all the same. Its batch is read once it ends: the job stays CANCELLED with no answer,
    and is charged once what the provider billed (ledger outcome CANCELLED, not estimated), its
    budget holding the estimate until then; only then is the batch discarded."""

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_a_sibling_keeps_the_batch_running_and_the_cancelled_job_is_charged(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """Of two jobs in one provider batch, one is cancelled: the batch is not cancelled (the
        other waits), and the provider answers and bills both. The cancelled job's bill is in the
        ledger and its tenant's budget (the ledger left it out and the budget got the whole
        estimate back)."""
        model = "claude-sonnet" if task else "gpt-4o-mini"
        fake.enqueue(BILLED, BILLED, model=fake_model(model))
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(cancelled_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            cancelled, kept = await two_jobs(client, task_hint=task)
            for job in (cancelled, kept):
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            await client.cancel_batch(cancelled.batch_id, tenant="acme")
            estimates = Decimal(cancelled.estimated_cost_usd) + Decimal(kept.estimated_cost_usd)
            held = await server.router.admission.spent("acme")
            fake.batch_outcome = BatchOutcome.COMPLETE
            await wait_state(client, kept.batch_id, pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: discarded(fake))  # after every job of the batch is settled
            ledger = {e.request_id: (e.outcome, e.cost_usd, e.estimated) for e in server.router.ledger.entries()}
            after = await get_batch(client, cancelled.batch_id)
            cost = billed_cost(server, model)
            spent = await spent_reaches(server, 2 * cost)
        [batch] = fake.batches
        assert (len(batch.requests), batch.cancelled) == (2, False)
        assert held == estimates  # the cancelled job's estimate is held while the provider may bill it
        assert ledger == {
            cancelled.batch_id: (AttemptOutcome.CANCELLED, cost, False),
            kept.batch_id: (AttemptOutcome.COMPLETED, cost, False),
        }
        assert (after.job.state, after.HasField("result")) == (pb.BATCH_STATE_CANCELLED, False)
        assert spent == 2 * cost
        assert corrections_due(tmp_path / "batches.db") == 0  # corrected once: nothing more to come

    @pytest.mark.parametrize(
        ("task", "end"),
        [("", "cancelled"), ("creative_writing", "cancelled"), ("", "expired")],
        ids=["openai-cancelled", "anthropic-cancelled", "openai-expired"],
    )
    async def test_the_batch_of_a_lost_reply_whose_job_ended_unsent_is_found_cancelled_and_read(
        self, tmp_path: Path, fake: FakeProvider, task: str, end: str
    ) -> None:
        """The provider made the batch but the server stopped before the create's reply came;
        after the restart the job is cancelled (or has waited past ``max_queued_seconds``)
        before any send looks that batch up. The poller looks it up all the same: the batch is
        cancelled there, read once it ends (the provider had answered the job: it is charged
        that bill, the job staying CANCELLED or EXPIRED) and deleted (it ran, billed, never
        read or deleted)."""
        model = "claude-sonnet" if task else "gpt-4o-mini"
        fake.enqueue(BILLED, model=fake_model(model))
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_answered_before_cancel = 1
        fake.batch_create_reply_hold = asyncio.Event()  # the batch is made, its reply never comes
        config = budget_config(tmp_path)
        config["batch"]["max_queued_seconds"] = 3600.0  # type: ignore[index]
        environ = live_environ(fake)
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client, task_hint=task))[1].batch
            async with asyncio.timeout(10):
                await fake.batch_create_waiting.wait()
        fake.batch_create_reply_hold.set()
        path = tmp_path / "batches.db"
        if end == "expired":
            lapse(path, "UPDATE jobs SET created_at = created_at - 3600")
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            with capture_logs() as logs:
                if end == "cancelled":
                    # While the dead send's claim holds: no send looks the batch up before the cancel.
                    await client.cancel_batch(job.batch_id, tenant="acme")
                lapse(path)
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                # Anthropic: adopted by its shape, never cancelled (it may be another client's).
                fake.batch_outcome = BatchOutcome.PENDING if not task else BatchOutcome.COMPLETE
                await until(lambda: discarded(fake))
            ledger = {e.request_id: (e.outcome, e.cost_usd) for e in server.router.ledger.entries()}
            after = await get_batch(client, job.batch_id)
            cost = billed_cost(server, model)
        [batch] = fake.batches
        assert batch.cancelled == (not task)
        assert ledger == {job.batch_id: (AttemptOutcome.CANCELLED, cost)}
        state = pb.BATCH_STATE_CANCELLED if end == "cancelled" else pb.BATCH_STATE_EXPIRED
        assert (after.job.state, after.HasField("result")) == (state, False)

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_answers_finished_before_the_provider_batch_was_cancelled_are_charged(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """Both jobs of a provider batch are cancelled, so routesvc cancels the batch; the
        provider had answered the first request by then (OpenAI: in the cancelled batch's output
        file; Anthropic: a ``succeeded`` result of the ended batch). The cancelled batch is polled
        until it ends and read: the answered job is charged what it was billed, the other
        nothing; then the batch is discarded (it was left at the provider, never read)."""
        model = "claude-sonnet" if task else "gpt-4o-mini"
        fake.enqueue(BILLED, model=fake_model(model))
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_answered_before_cancel = 1
        async with (
            Server(settings_from(cancelled_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            jobs = [job.batch_id for job in await two_jobs(client, task_hint=task)]
            for batch_id in jobs:
                await wait_state(client, batch_id, pb.BATCH_STATE_SUBMITTED)
            for batch_id in jobs:
                await client.cancel_batch(batch_id, tenant="acme")
            await until(lambda: discarded(fake))
            ledger = [(e.request_id, e.outcome, e.cost_usd, e.estimated) for e in server.router.ledger.entries()]
            states = [(await get_batch(client, batch_id)).job.state for batch_id in jobs]
            cost = billed_cost(server, model)
            spent = await spent_reaches(server, cost)
        [batch] = fake.batches
        answered = batch.custom_ids[0]
        assert batch.cancelled
        assert ledger == [(answered, AttemptOutcome.CANCELLED, cost, False)]
        assert states == [pb.BATCH_STATE_CANCELLED] * 2
        assert spent == cost
        assert corrections_due(tmp_path / "batches.db") == 0
        if not task:
            assert fake.deleted_files == [batch.input_file_id, batch.output_file_id, batch.error_file_id]

    async def test_a_job_cancelled_while_its_group_was_sent_is_charged_what_it_was_billed(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """CancelBatch while the poller uploads the job's group: the cancel gives the job's
        estimate back at once (nothing was sent, as far as the store knew), the provider batch
        that is then created is cancelled, and the provider had answered the request by then.
        The batch is read once it ends and the job charged what it was billed, from nothing."""
        fake.enqueue(BILLED, model="gpt-4o-mini")
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_answered_before_cancel = 1
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(delay_per_chunk=0.3)
            environ = {**live_environ(fake), "OPENAI_BASE_URL": f"{proxy.base_url}/v1"}
            async with (
                Server(settings_from(budget_config(tmp_path), environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch
                await until(lambda: proxy.connections >= 1)  # grouped, claimed and being uploaded
                await client.cancel_batch(job.batch_id, tenant="acme")
                given_back = await spent_reaches(server, Decimal(0))
                await until(lambda: bool(fake.batches) and discarded(fake))
                ledger = [(e.request_id, e.outcome, e.cost_usd) for e in server.router.ledger.entries()]
                state = (await get_batch(client, job.batch_id)).job.state
                cost = billed_cost(server, "gpt-4o-mini")
                spent = await spent_reaches(server, cost)
        assert given_back == 0
        assert [b.cancelled for b in fake.batches] == [True]
        assert ledger == [(job.batch_id, AttemptOutcome.CANCELLED, cost)]
        assert (state, spent) == (pb.BATCH_STATE_CANCELLED, cost)
        assert corrections_due(tmp_path / "batches.db") == 0

    async def test_a_store_file_from_before_is_upgraded_in_place(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A store written before cancelled jobs were tied to their provider batch (no
        provider_pending column) is upgraded when opened: a job it holds in a provider batch,
        cancelled after the upgrade while a sibling keeps the batch running, is charged what the
        provider billed."""
        fake.enqueue(BILLED, BILLED, model="gpt-4o-mini")
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(cancelled_config(tmp_path), live_environ(fake))
        path = tmp_path / "batches.db"
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            jobs = [job.batch_id for job in await two_jobs(client)]
            for batch_id in jobs:
                await wait_state(client, batch_id, pb.BATCH_STATE_SUBMITTED)
        connection = sqlite3.connect(path)
        connection.execute("DROP INDEX jobs_provider_pending")
        connection.execute("ALTER TABLE jobs DROP COLUMN provider_pending")
        connection.close()
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            await client.cancel_batch(jobs[0], tenant="acme")
            fake.batch_outcome = BatchOutcome.COMPLETE
            await wait_state(client, jobs[1], pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: discarded(fake))
            ledger = [(e.request_id, e.outcome) for e in server.router.ledger.entries()]
        assert sorted(ledger) == sorted([(jobs[0], AttemptOutcome.CANCELLED), (jobs[1], AttemptOutcome.COMPLETED)])

    async def test_a_cancelled_job_is_kept_until_its_provider_batch_is_read(self, tmp_path: Path) -> None:
        """Retention never prunes a cancelled job whose provider batch is still to be read (its
        bill would be lost); once it is closed, it is pruned as any ended job."""
        store = BatchStore(tmp_path / "batches.db")
        try:
            job = BatchJob("batch_1", "acme", BatchState.QUEUED, "gpt-4o-mini", "openai", Decimal("0.01"), 0.0, 0.0)
            await store.add(job, "{}", held_by="me", hold_seconds=0)
            assert await store.claim(["batch_1"], "me", 60) == ["batch_1"]
            assert await store.mark_submitted(["batch_1"], "me", "openai", "batch_p", ("http://fake/v1", "")) == 1
            await store.cancel("batch_1")
            kept = await store.prune_ended(time.time() + 60, 10)
            closed = await store.close_cancelled("batch_1", None)
            pruned = await store.prune_ended(time.time() + 60, 10)
        finally:
            await store.aclose()
        assert (kept, closed, pruned) == (0, True, 1)

    async def test_a_batch_found_ended_is_not_taken_for_the_next_batch_an_earlier_release_sends_its_job_in(
        self, tmp_path: Path
    ) -> None:
        """A status check found the job's batch ended (``mark_ended``); an earlier release sharing
        the store, which does not know ``provider_ended``, queues the job again (the batch refused
        for a while) and sends it in a new batch: the new batch is not taken as found ended (it
        was, never given up nor lost however its checks failed)."""
        store = BatchStore(tmp_path / "batches.db")
        try:
            job = BatchJob("batch_1", "acme", BatchState.QUEUED, "gpt-4o-mini", "openai", Decimal("0.01"), 0.0, 0.0)
            await store.add(job, "{}", held_by="me", hold_seconds=0)
            assert await store.claim(["batch_1"], "me", 60) == ["batch_1"]
            assert await store.mark_submitted(["batch_1"], "me", "openai", "batch_x", ("http://fake/v1", "k")) == 1
            await store.mark_ended("openai", "batch_x")
            ended = (await store.submitted())[("openai", "batch_x")].ended
            with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as earlier:
                # What an earlier release's requeue and then its next send write.
                earlier.execute(
                    "UPDATE jobs SET state = 'queued', provider_batch_id = NULL, key_id = NULL WHERE id = 'batch_1'"
                )
                earlier.execute(
                    "UPDATE jobs SET state = 'submitted', provider_batch_id = 'batch_y', key_id = 'k'"
                    " WHERE id = 'batch_1'"
                )
                earlier.commit()
            polled = await store.submitted()
        finally:
            await store.aclose()
        assert ended
        assert not polled[("openai", "batch_y")].ended

    async def test_a_job_cancelled_while_it_is_sent_is_kept_until_it_is_tied_to_its_batch(self, tmp_path: Path) -> None:
        """A job cancelled while its group is uploaded (claimed, no provider batch yet) is not
        pruned by another worker's retention round before the send ties it to its provider batch
        (it was: the batch then had no row, and was never read, charged or deleted)."""
        store = BatchStore(tmp_path / "batches.db")
        try:
            job = BatchJob("batch_1", "acme", BatchState.QUEUED, "gpt-4o-mini", "openai", Decimal("0.01"), 0.0, 0.0)
            await store.add(job, "{}", held_by="me", hold_seconds=0)
            assert await store.claim(["batch_1"], "me", 300) == ["batch_1"]
            assert await store.requests(["batch_1"], "me")  # read to be sent: the send is under way
            await store.cancel("batch_1")
            pruned = await store.prune_ended(time.time() + 60, 10)
            await store.mark_submitted(["batch_1"], "me", "openai", "batch_p", ("http://fake/v1", ""))
            polled = await store.submitted()
        finally:
            await store.aclose()
        assert pruned == 0
        assert ("openai", "batch_p") in polled

    async def test_the_found_batch_of_a_lost_send_whose_job_failed_is_cancelled(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The create's reply was lost, and the restart's catalog no longer has the job's model: its
        next send fails it ``model_not_in_catalog`` before any lookup. The poller still finds the
        batch the provider made; with no job to tie to it, it is cancelled (it ran on, billed,
        never cancelled, read or deleted) and logged ``batch_send_untied``."""
        fake.enqueue(BILLED, model="gpt-4o-mini")
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_create_reply_hold = asyncio.Event()  # the batch is made, its reply never comes
        environ = live_environ(fake)
        path = tmp_path / "batches.db"
        with_copy = with_model_copy(batch_config(tmp_path), "gpt-4o-mini-2")
        async with Server(settings_from(with_copy, environ), port=0) as server, RouterClient(server.target) as client:
            await submit(client, model="gpt-4o-mini-2")
            async with asyncio.timeout(10):
                await fake.batch_create_waiting.wait()
        fake.batch_create_reply_hold.set()
        lapse(path)
        async with Server(settings_from(batch_config(tmp_path), environ), port=0):
            with capture_logs() as logs:
                await until(lambda: any(e["event"] == "batch_model_unknown" for e in logs))
                lapse(path)  # the failing send's claim lapses
                await until(lambda: any(e["event"] == "batch_send_untied" for e in logs))
                [batch] = fake.batches
                await until(lambda: batch.cancelled)


class TestRetention:
    async def test_an_ended_job_is_deleted_after_retention_seconds(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A job that ended is kept for batch.retention_seconds, then deleted from the store
        (GetBatch NOT_FOUND): the store kept every answer for ever, and its volume filled."""
        config = batch_config(tmp_path)
        # Long enough that the ended job is read before it goes, on a loaded machine too.
        config["batch"]["retention_seconds"] = 3.0  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                async with asyncio.timeout(15):
                    while True:
                        try:
                            await get_batch(client, job.batch_id)
                        except grpc.aio.AioRpcError as error:
                            gone = error
                            break
                        await asyncio.sleep(0.1)
            assert server.router.ledger.entries()  # charged once before it went
        assert done.job.state == pb.BATCH_STATE_SUCCEEDED
        assert gone.code() == grpc.StatusCode.NOT_FOUND
        assert [e["jobs"] for e in logs if e["event"] == "batch_jobs_pruned"] == [1]


class TestBatchFailures:
    """A batch the provider fails, or a request in it that errors, ends FAILED with a short code, uncharged."""

    async def test_a_failed_batch_ends_failed(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Anthropic requests errored: FAILED, an error code, no ledger entry."""
        fake.batch_outcome = BatchOutcome.FAIL
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint="creative_writing"))[1].batch
            failed = await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
            assert failed.error == "api_error"
            assert server.router.ledger.entries() == []

    @pytest.mark.parametrize(
        ("error_type", "shown"),
        [("overloaded_error", "overloaded_error"), ("Summarise this report", "errored"), ("sk-ant-0123", "errored")],
    )
    async def test_an_errored_anthropic_request_shows_only_a_machine_code(
        self, tmp_path: Path, fake: FakeProvider, error_type: str, shown: str
    ) -> None:
        """An Anthropic request the batch ran and that errored: GetBatch shows its error type when
        it looks like a machine code, as for OpenAI's codes; text that does not (the prompt
        echoed, a key) is shown as ``errored`` (it was shown as the provider sent it)."""
        fake.enqueue(Script(status=400, error_type=error_type), model=fake_model("claude-sonnet"))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint="creative_writing"))[1].batch
            failed = await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
            assert failed.error == shown
            assert server.router.ledger.entries() == []

    async def test_jobs_of_a_batch_over_the_enqueued_token_limit_are_queued_and_sent_again(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """OpenAI fails the batch at validation, token_limit_exceeded ("try again once some
        in_progress batches have been completed"): its jobs go back to QUEUED, no error shown,
        and are sent again, together, after a wait; once the limit has room they succeed,
        charged once each (they were failed for good). The refused batch's input file is
        deleted as any ended batch's."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 0.3  # type: ignore[index]
        fake.batch_outcome = BatchOutcome.FAIL
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                jobs = [(await submit(client))[1].batch.batch_id for _ in range(2)]
                await until(lambda: any(e["event"] == "batch_requeued" for e in logs))
                fake.batch_outcome = BatchOutcome.COMPLETE
                done = [await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED) for job in jobs]
            entries = server.router.ledger.entries()
        requeued = next(e for e in logs if e["event"] == "batch_requeued")
        assert (requeued["jobs"], requeued["reason"]) == (2, "token_limit_exceeded")
        assert [r.error for r in done] == ["", ""]
        assert sorted(e.request_id for e in entries) == sorted(jobs)
        assert fake.batches[0].status == "failed"
        assert fake.batches[-1].custom_ids == jobs
        assert fake.batches[0].input_file_id in fake.deleted_files

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_a_sent_jobs_request_leaves_the_store_once_the_provider_accepted_its_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """The request (the prompt) of a sent job is kept only while its provider batch may be
        refused for a while: once a poll finds the batch accepted (in progress), it is cleared
        from the store, the job still waiting."""
        fake.batch_outcome = BatchOutcome.PENDING
        path = tmp_path / "batches.db"
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            await until(lambda: stored_requests(path) == ["{}"])
            assert (await get_batch(client, job.batch_id)).job.state == pb.BATCH_STATE_SUBMITTED

    async def test_a_batch_over_the_enqueued_token_limit_fails_its_jobs_past_max_queued_seconds(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The enqueued token limit stays reached for batch.max_queued_seconds: the jobs, sent
        again and again meanwhile, end FAILED token_limit_exceeded (not EXPIRED queued_too_long),
        uncharged; every refused batch's input file is deleted."""
        config = batch_config(tmp_path)
        config["batch"]["max_queued_seconds"] = 1.0  # type: ignore[index]
        fake.batch_outcome = BatchOutcome.FAIL
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                failed = await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
            assert server.router.ledger.entries() == []
            await until(lambda: not fake.files)
        assert failed.error == "token_limit_exceeded"
        assert any(e["event"] == "batch_requeued" for e in logs)
        assert len(fake.batches) >= 2
        assert sorted(fake.deleted_files) == sorted(str(batch.input_file_id) for batch in fake.batches)

    async def test_an_anthropic_batch_whose_results_were_deleted_ends_failed(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """An ended Anthropic batch without a results URL (results deleted after 29 days): its jobs
        end FAILED results_deleted, uncharged (the SDK's error escaped the adapter, and the poll
        crashed every round, the jobs SUBMITTED for ever)."""
        fake.anthropic_batch_results_deleted = True
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint="creative_writing"))[1].batch
            failed = await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
            assert failed.error == "results_deleted"
            assert server.router.ledger.entries() == []

    async def test_one_erroring_request_fails_alone(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Two jobs in one batch, the provider answers the first with a 500: it fails, the other succeeds."""
        config = batch_config(tmp_path)
        # The batch goes when the second job joins it, not when a window ends (a 0.3 s window could
        # close before the second submit on a loaded machine, each job then sent alone); the
        # window left only bounds a second job that never comes.
        config["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        config["batch"]["max_group_size"] = 2  # type: ignore[index]
        fake.enqueue(Script(status=500), Script(text="fine"), model="gpt-4o-mini")
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            first = (await submit(client))[1].batch.batch_id
            second = (await submit(client))[1].batch.batch_id
            failed = await wait_state(client, first, pb.BATCH_STATE_FAILED)
            done = await wait_state(client, second, pb.BATCH_STATE_SUCCEEDED)
        assert (failed.error, done.result.text) == ("http_500", "fine")
        assert len(fake.batches) == 1

    async def test_line_and_paragraph_separators_in_an_answer_come_back_whole(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The output file holds U+2028, U+2029 and U+0085 raw inside an answer's JSON string (JSON
        Lines ends a line at "\\n" only): the job succeeds with the text as written (the file was
        called malformed, and every job of the batch stayed SUBMITTED for ever)."""
        text = "first\u2028second\u2029third\u0085fourth"
        fake.enqueue(Script(text=text), model="gpt-4o-mini")
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert done.result.text == text


class TestBatchModeFallsBackToRealtime:
    """Where no batch API is available the request is served in realtime and the reasons say why."""

    async def test_batch_disabled(self, tmp_path: Path, fake: FakeProvider) -> None:
        """batch.enabled false: the answer streams, the decision says batch mode is disabled."""
        config = batch_config(tmp_path)
        config["batch"]["enabled"] = False  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = await submit(client)
        assert [m.WhichOneof("event") for m in messages][-1] == "completion"
        assert messages[0].decision.reasons[-1] == "batch mode is disabled (batch.enabled false); served in realtime"
        assert not (tmp_path / "batches.db").exists()

    async def test_route_says_realtime_and_max_cost_is_checked_at_the_realtime_price(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """batch.enabled false: Route answers what Complete will do (realtime, at the realtime
        price), and a max_cost_usd that only the batch price fits is COST_LIMIT_EXCEEDED on both,
        with nothing called."""
        config = batch_config(tmp_path)
        config["batch"]["enabled"] = False  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            chat = user_chat("Summarise this report")
            realtime = await client.route(chat, pb.RoutingContext(tenant="acme"))
            deferred = await client.route(chat, pb.RoutingContext(tenant="acme", realtime=False))
            cap = format(Decimal(realtime.estimated_cost_usd) * Decimal("0.75"), "f")
            with pytest.raises(grpc.aio.AioRpcError) as routed:
                await client.route(chat, pb.RoutingContext(tenant="acme", realtime=False, max_cost_usd=cap))
            with pytest.raises(grpc.aio.AioRpcError) as completed:
                await submit(client, max_cost_usd=cap)
        assert (deferred.mode, deferred.model) == (pb.MODE_REALTIME, realtime.model)
        assert deferred.estimated_cost_usd == realtime.estimated_cost_usd
        assert deferred.reasons[-1] == "batch mode is disabled (batch.enabled false); served in realtime"
        assert error_info(routed.value).reason == error_info(completed.value).reason == "COST_LIMIT_EXCEEDED"
        assert fake.requests == []

    async def test_a_router_whose_queue_lacks_the_provider_serves_in_realtime(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A provider a hot reload added has no batch API in the queue built at start (here: a
        router with no queue at all): the decision said batch, Complete serves it in realtime at
        the realtime price, and a max_cost_usd only the batch price fits is refused, not passed."""
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        router = Router(settings, build_providers(settings))
        chat = ChatRequest((Message(Role.USER, "Summarise this report"),))
        try:
            events = [e async for e in router.complete(RoutingRequest(chat, RoutingContext(realtime=False)))]
            decision, completion = events[0], events[-1]
            assert isinstance(decision, RouteDecision)
            assert isinstance(completion, Completion)
            capped = RoutingContext(realtime=False, max_cost_usd=decision.estimated_cost_usd * Decimal("0.75"))
            with pytest.raises(CostLimitExceeded, match="has no batch queue here; its realtime estimate"):
                async for _ in router.complete(RoutingRequest(chat, capped)):
                    pass
        finally:
            await router.aclose()
        assert decision.mode is Mode.REALTIME
        assert decision.reasons[-1] == "provider openai has no batch queue here; served in realtime"
        assert decision.estimated_cost_usd == estimate_cost(settings.catalog.get(decision.model), *_tokens(decision))
        assert len(fake.requests) == 1

    async def test_a_reload_that_enables_batch_changes_nothing_until_a_restart(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Batch settings need a restart: a server started with batch disabled keeps deciding
        realtime after a reload enables it, so Route and Complete still agree."""
        config = batch_config(tmp_path)
        config["batch"]["enabled"] = False  # type: ignore[index]
        enabled = copy.deepcopy(config)
        enabled["batch"]["enabled"] = True  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await server.reload(settings_from(enabled, live_environ(fake)))
            decision = await client.route(user_chat("Summarise this report"), pb.RoutingContext(realtime=False))
            messages = await submit(client)
        assert decision.mode == pb.MODE_REALTIME
        assert decision.reasons[-1] == "batch mode is disabled (batch.enabled false); served in realtime"
        assert messages[-1].WhichOneof("event") == "completion"

    async def test_a_batch_request_over_its_cap_moves_to_a_cheaper_model_without_a_batch_api(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A premium batch request whose cap only a local model fits: downgraded to it, as a
        realtime request would be, and served in realtime since it has no batch API."""
        config = batch_config(tmp_path)
        add_local_model(config, fake.openai_base_url, "llama")
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            chat = user_chat("Summarise this report")
            mini = await client.route(chat, pb.RoutingContext(realtime=False, task_hint="simple_qa"))
            cap = format(Decimal(mini.estimated_cost_usd) / 2, "f")
            context = pb.RoutingContext(realtime=False, user_tier="premium", max_cost_usd=cap)
            decision = await client.route(chat, context)
        assert (mini.mode, mini.model) == (pb.MODE_BATCH, "gpt-4o-mini")
        assert (decision.mode, decision.model) == (pb.MODE_REALTIME, "llama")
        assert decision.reasons[-2].endswith("downgraded to llama at " + decision.estimated_cost_usd + " USD")
        assert decision.reasons[-1] == "provider local has no batch API here; served in realtime"

    async def test_a_provider_without_a_batch_api(self, tmp_path: Path, fake: FakeProvider) -> None:
        """An openai_compatible model: served in realtime, the reason names the provider."""
        config = batch_config(tmp_path)
        add_local_model(config, fake.openai_base_url, "llama")
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = await submit(client, model="llama")
        assert messages[-1].completion.model == "llama"
        assert messages[0].decision.reasons[-1] == "provider local has no batch API here; served in realtime"


class TestBatchTenancy:
    """With API-key auth, a job belongs to the key's tenant; another tenant's key cannot see or cancel it."""

    async def test_another_tenants_key_gets_not_found(self, tmp_path: Path, fake: FakeProvider) -> None:
        """acme's job: globex's GetBatch and CancelBatch are NOT_FOUND; acme's GetBatch finds it."""
        config = batch_config(tmp_path)
        config["auth"] = {"enabled": True}
        config["tenants"] = {
            "acme": {"api_key_sha256": [key_digest("acme-key")]},
            "globex": {"api_key_sha256": [key_digest("globex-key")]},
        }
        fake.batch_outcome = BatchOutcome.PENDING
        async with Server(settings_from(config, live_environ(fake)), port=0) as server:
            async with RouterClient(server.target, api_key="acme-key") as acme:
                job = (await submit(acme, tenant=""))[1].batch
                assert (await acme.get_batch(job.batch_id)).job.batch_id == job.batch_id
            async with RouterClient(server.target, api_key="globex-key") as globex:
                for call in (globex.get_batch, globex.cancel_batch):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call(job.batch_id)
                    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as spoofed:
                    await globex.get_batch(job.batch_id, tenant="acme")
                assert spoofed.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def test_a_job_still_in_the_grouping_window_survives_a_restart(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Queued (not yet sent) at shutdown: the next server sends it and it succeeds; one provider batch."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        async with (
            Server(settings_from(waiting, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
        assert fake.batches == []
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert len(fake.batches) == 1


class TestBatchAdapters:
    """The adapters speak each provider's batch API through the official SDK and translate its errors."""

    async def test_openai_expired_items_come_back_expired(self, fake: FakeProvider) -> None:
        """Upload, create, poll, read the error file: each item EXPIRED with the provider's code."""
        from routesvc.models import BatchState, Message, Role
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        fake.batch_outcome = BatchOutcome.EXPIRE
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        items = [BatchItem(f"job_{n}", "gpt-4o-mini", "gpt-4o-mini", (Message(Role.USER, "hi"),), 16) for n in (1, 2)]
        batch_id = await api.submit(items, "tag")
        batch = await api.poll(batch_id)
        results = await api.results(batch)
        await api.aclose()
        assert (batch.ended, batch.status) == (True, "expired")
        assert [(r.custom_id, r.state, r.error) for r in results] == [
            ("job_1", BatchState.EXPIRED, "batch_expired"),
            ("job_2", BatchState.EXPIRED, "batch_expired"),
        ]
        assert fake.batches[0].requests[0]["body"]["max_completion_tokens"] == 16

    async def test_openai_tool_arguments_sent_as_an_object_come_back_as_its_json(self, fake: FakeProvider) -> None:
        """A batch result whose call gives its ``arguments`` as an object rather than its JSON text
        (some OpenAI-compatible servers): that object's JSON, with the model's characters, as a
        stream returns it (it came back as the Python repr, ``{'city': '北京'}``, not JSON)."""
        from routesvc.models import Message, Role, ToolSpec
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        arguments = '{"city": "北京"}'
        call = FakeToolCall("get_weather", arguments)
        fake.enqueue(Script(chunks=(), tool_calls=(call,), tool_arguments_as_objects=True), model="gpt-4o-mini")
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        tools = (ToolSpec("get_weather", "", {"type": "object"}),)
        item = BatchItem("job_1", "gpt-4o-mini", "gpt-4o-mini", (Message(Role.USER, "Weather?"),), 16, tools=tools)
        results = await api.results(await api.poll(await api.submit([item], "tag")))
        await api.aclose()
        assert [(c.name, c.arguments_json) for c in results[0].tool_calls] == [("get_weather", arguments)]

    async def test_openai_http_errors_in_the_error_file_keep_their_status(self, fake: FakeProvider) -> None:
        """An error-file line for a request answered with an HTTP error (response set, error null,
        as the Batch API writes it): FAILED with http_<status>, not a generic "error"."""
        from routesvc.models import BatchState, Message, Role
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        fake.openai_batch_http_errors_in_error_file = True
        fake.enqueue(Script(status=400), Script(text="fine"), model="gpt-4o-mini")
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        items = [BatchItem(f"job_{n}", "gpt-4o-mini", "gpt-4o-mini", (Message(Role.USER, "hi"),), 16) for n in (1, 2)]
        results = await api.results(await api.poll(await api.submit(items, "tag")))
        await api.aclose()
        assert sorted((r.custom_id, r.state, r.error) for r in results) == [
            ("job_1", BatchState.FAILED, "http_400"),
            ("job_2", BatchState.SUCCEEDED, ""),
        ]

    @pytest.mark.parametrize("outcome", [BatchOutcome.EXPIRE, BatchOutcome.COMPLETE])
    async def test_an_openai_http_error_fails_with_its_code_whatever_the_batch_ended_as(
        self, fake: FakeProvider, outcome: BatchOutcome
    ) -> None:
        """A request OpenAI answered with a 400 before the batch ended (an error-file line with
        its response, error null): FAILED with the code of its error body,
        context_length_exceeded, also in an expired batch (it ended EXPIRED http_400 there, a
        failed request taken for one the window cut off, and http_400 in any batch). A request
        the window did cut off stays EXPIRED batch_expired."""
        from routesvc.models import BatchState, Message, Role
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        too_long = {
            "error": {
                "message": "too long",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
        fake.openai_batch_http_errors_in_error_file = True
        fake.batch_outcome = outcome
        fake.batch_answered_before_expiry = 2
        fake.enqueue(Script(status=400, error_body=json.dumps(too_long)), Script(text="fine"), model="gpt-4o-mini")
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        items = [
            BatchItem(f"job_{n}", "gpt-4o-mini", "gpt-4o-mini", (Message(Role.USER, "hi"),), 16) for n in (1, 2, 3)
        ]
        results = await api.results(await api.poll(await api.submit(items, "tag")))
        await api.aclose()
        third = (BatchState.EXPIRED, "batch_expired") if outcome is BatchOutcome.EXPIRE else (BatchState.SUCCEEDED, "")
        assert sorted((r.custom_id, r.state, r.error) for r in results) == [
            ("job_1", BatchState.FAILED, "context_length_exceeded"),
            ("job_2", BatchState.SUCCEEDED, ""),
            ("job_3", *third),
        ]

    async def test_an_openai_results_line_that_is_not_json_fails_only_its_job(self, fake: FakeProvider) -> None:
        """An output file with a line cut short: that line's job FAILED malformed_result, the other
        job of the file SUCCEEDED (the whole file was refused, and no job of the batch ever ended);
        the log names the job, never the line."""
        import openai

        from routesvc.models import BatchState
        from routesvc.providers.batch import ProviderBatch
        from routesvc.providers.openai_batch import OpenAIBatches

        body = {"model": "gpt-4o-mini", "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}
        good = json.dumps({"custom_id": "job_2", "response": {"status_code": 200, "body": body}})
        broken = json.dumps({"custom_id": "job_1", "response": {"status_code": 200, "body": body}})[:-20]
        sdk = openai.AsyncOpenAI(api_key="sk", base_url=fake.openai_base_url)
        output = await sdk.files.create(file=("out.jsonl", f"{broken}\n{good}\n".encode()), purpose="batch")
        await sdk.close()
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        with capture_logs() as logs:
            results = await api.results(ProviderBatch("batch_1", True, "completed", output_file_id=output.id))
        await api.aclose()
        assert sorted((r.custom_id, r.state, r.error, r.text) for r in results) == [
            ("job_1", BatchState.FAILED, "malformed_result", ""),
            ("job_2", BatchState.SUCCEEDED, "", "fine"),
        ]
        malformed = [e for e in logs if e["event"] == "batch_result_malformed"]
        assert [(e["batch_id"], e["line"]) for e in malformed] == [("job_1", 1)]
        assert "fine" not in repr(malformed)

    async def test_an_openai_results_line_of_the_wrong_shape_fails_only_its_job(self, fake: FakeProvider) -> None:
        """Lines of JSON whose fields have other types (a choice that is a string, an error that
        is a string): each fails its own job, malformed_result; the other jobs of the file
        SUCCEEDED (the whole read raised, and the batch was read again every round). A usage that
        is no object (a list) is read as none, as a stream's is: the answer is kept and its
        counts estimated."""
        import openai

        from routesvc.models import BatchState
        from routesvc.providers.batch import ProviderBatch
        from routesvc.providers.openai_batch import OpenAIBatches

        body = {"model": "gpt-4o-mini", "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}
        lines = [
            {"custom_id": "job_1", "response": {"status_code": 200, "body": {"choices": ["not a choice"]}}},
            {"custom_id": "job_2", "response": {"status_code": 200, "body": {**body, "usage": [1, 2]}}},
            {"custom_id": "job_3", "response": {"status_code": 200, "body": body}},
        ]
        errors = [{"custom_id": "job_4", "error": "quota"}]
        sdk = openai.AsyncOpenAI(api_key="sk", base_url=fake.openai_base_url)
        output = await sdk.files.create(
            file=("out.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch"
        )
        error = await sdk.files.create(
            file=("err.jsonl", "".join(json.dumps(x) + "\n" for x in errors).encode()), purpose="batch"
        )
        await sdk.close()
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        batch = ProviderBatch("batch_1", True, "completed", output_file_id=output.id, error_file_id=error.id)
        results = await api.results(batch)
        await api.aclose()
        assert sorted((r.custom_id, r.state, r.error, r.text) for r in results) == [
            ("job_1", BatchState.FAILED, "malformed_result", ""),
            ("job_2", BatchState.SUCCEEDED, "", "fine"),
            ("job_3", BatchState.SUCCEEDED, "", "fine"),
            ("job_4", BatchState.FAILED, "malformed_result", ""),
        ]

    async def test_an_openai_usage_part_that_is_no_object_is_read_as_missing(self, fake: FakeProvider) -> None:
        """A result whose ``usage`` or ``prompt_tokens_details`` is no object (a string, a
        number) keeps its answer (it FAILED malformed_result: the answer lost, nothing charged),
        the odd part read as missing, as a stream's is (``object_field``): no counts (the queue
        estimates them), or no cache reads."""
        import openai

        from routesvc.models import BatchState
        from routesvc.providers.batch import ProviderBatch
        from routesvc.providers.openai_batch import OpenAIBatches

        body = {"model": "gpt-4o-mini", "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}
        counts = {"prompt_tokens": 12, "completion_tokens": 3}
        lines = [
            {"custom_id": "job_1", "response": {"status_code": 200, "body": {**body, "usage": "n/a"}}},
            {
                "custom_id": "job_2",
                "response": {
                    "status_code": 200,
                    "body": {**body, "usage": {**counts, "prompt_tokens_details": "unavailable"}},
                },
            },
            {
                "custom_id": "job_3",
                "response": {"status_code": 200, "body": {**body, "usage": {**counts, "prompt_tokens_details": 7}}},
            },
        ]
        sdk = openai.AsyncOpenAI(api_key="sk", base_url=fake.openai_base_url)
        output = await sdk.files.create(
            file=("out.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch"
        )
        await sdk.close()
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        results = await api.results(ProviderBatch("batch_1", True, "completed", output_file_id=output.id))
        await api.aclose()
        assert sorted(
            (r.custom_id, r.state, r.text, r.usage, r.input_reported, r.output_reported) for r in results
        ) == [
            ("job_1", BatchState.SUCCEEDED, "fine", Usage(), False, False),
            ("job_2", BatchState.SUCCEEDED, "fine", Usage(12, 3), True, True),
            ("job_3", BatchState.SUCCEEDED, "fine", Usage(12, 3), True, True),
        ]

    async def test_an_anthropic_usage_part_that_is_no_object_is_read_as_missing(self, fake: FakeProvider) -> None:
        """A result whose ``usage`` or ``usage.cache_creation`` is no object (a string) keeps its
        answer (it FAILED malformed_result: the answer lost, nothing charged), the odd part read
        as missing, as a stream's is (``object_field``): no counts (the queue estimates them), or
        no 1-hour cache writes."""
        from routesvc.models import BatchState, Message, Role
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem

        def succeeded(custom_id: str, usage: object) -> str:
            message = {
                "model": "claude-sonnet-4-6",
                "content": [{"type": "text", "text": "fine"}],
                "stop_reason": "end_turn",
                "usage": usage,
            }
            return json.dumps({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})

        counts = {"input_tokens": 12, "output_tokens": 3, "cache_creation_input_tokens": 4}
        api = AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        hi = (Message(Role.USER, "hi"),)
        items = [BatchItem(f"job_{n}", "claude-sonnet", "claude-sonnet-4-6", hi, 16) for n in (1, 2)]
        batch = await api.poll(await api.submit(items, "tag"))
        lines = [succeeded("job_1", "unavailable"), succeeded("job_2", {**counts, "cache_creation": "unavailable"})]
        fake.batches[0].raw_results = ("\n".join(lines) + "\n").encode()
        results = await api.results(batch)
        await api.aclose()
        assert sorted(
            (r.custom_id, r.state, r.text, r.usage, r.input_reported, r.output_reported) for r in results
        ) == [
            ("job_1", BatchState.SUCCEEDED, "fine", Usage(), False, False),
            ("job_2", BatchState.SUCCEEDED, "fine", Usage(16, 3, cache_write_input_tokens=4), True, True),
        ]

    async def test_an_openai_refusal_in_a_batch_is_the_answer_and_content_filter(self, fake: FakeProvider) -> None:
        """A result whose message is a refusal (``content`` null, ``refusal`` its words): SUCCEEDED
        with the refusal as the text and FINISH CONTENT_FILTER, as a streamed refusal is (it was an
        empty answer that finished STOP)."""
        from routesvc.models import BatchState, FinishReason, Message, Role
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        fake.enqueue(Script(text="I can't help with that.", refusal=True))
        fake.batch_outcome = BatchOutcome.COMPLETE
        api = OpenAIBatches("openai", "sk", fake.openai_base_url)
        batch_id = await api.submit(
            [BatchItem("job_1", "gpt-4o-mini", "gpt-4o-mini", (Message(Role.USER, "hi"),), 64)], "tag"
        )
        (result,) = await api.results(await api.poll(batch_id))
        await api.aclose()
        assert (result.state, result.text, result.finish_reason) == (
            BatchState.SUCCEEDED,
            "I can't help with that.",
            FinishReason.CONTENT_FILTER,
        )

    async def test_an_anthropic_results_line_cut_short_or_of_the_wrong_shape_fails_only_its_job(
        self, fake: FakeProvider
    ) -> None:
        """A results file with a line cut short and a line whose content is not a list: each fails
        its own job, malformed_result, and the good line (whose answer holds U+2028, which is no
        line break in JSON Lines) SUCCEEDED with its text; the SDK's results stream raised at the
        first bad line, so no job of the batch ever ended and the batch was read again every
        round. The log names the job, never the line."""
        from routesvc.models import BatchState, Message, Role
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem

        def succeeded(custom_id: str, content: object) -> str:
            message = {"model": "claude-sonnet-4-6", "content": content, "stop_reason": "end_turn", "usage": {}}
            return json.dumps({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})

        api = AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        hi = (Message(Role.USER, "hi"),)
        items = [BatchItem(f"job_{n}", "claude-sonnet", "claude-sonnet-4-6", hi, 16) for n in (1, 2, 3)]
        batch = await api.poll(await api.submit(items, "tag"))
        good = succeeded("job_3", [{"type": "text", "text": "one\u2028two"}]).replace("\\u2028", "\u2028")
        lines = [succeeded("job_1", [{"type": "text", "text": "fine"}])[:-25], succeeded("job_2", "not a list"), good]
        fake.batches[0].raw_results = ("\n".join(lines) + "\n").encode()
        with capture_logs() as logs:
            results = await api.results(batch)
        await api.aclose()
        assert sorted((r.custom_id, r.state, r.error, r.text) for r in results) == [
            ("job_1", BatchState.FAILED, "malformed_result", ""),
            ("job_2", BatchState.FAILED, "malformed_result", ""),
            ("job_3", BatchState.SUCCEEDED, "", "one\u2028two"),
        ]
        malformed = [e for e in logs if e["event"] == "batch_result_malformed"]
        assert sorted(e["batch_id"] for e in malformed) == ["job_1", "job_2"]
        assert "fine" not in repr(malformed)

    async def test_the_anthropic_sdk_adds_no_trace_context_of_its_own(self, fake: FakeProvider) -> None:
        """A batch created while a span is current goes without the SDK's own trace context, as
        realtime Anthropic calls do (the SDK's OpenTelemetry is off: it sent a ``traceparent``
        naming the span current where the batch was sent, and spans to a global tracer provider)."""
        from opentelemetry.sdk.trace import TracerProvider

        from routesvc.models import Message, Role
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem

        api = AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        item = BatchItem("job_1", "claude-sonnet", "claude-sonnet-4-6", (Message(Role.USER, "hi"),), 16)
        with TracerProvider().get_tracer("test").start_as_current_span("queue round"):
            await api.submit([item], "tag")
        await api.aclose()
        (batch,) = fake.batches
        assert (batch.api, "traceparent" in batch.headers) == ("anthropic", False)

    async def test_anthropic_results_carry_text_usage_and_stop_reason(self, fake: FakeProvider) -> None:
        """Create, poll, stream the results: SUCCEEDED with text, usage (cache reads counted as input)."""
        from routesvc.models import BatchState, FinishReason, Message, Role, Usage
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem

        fake.enqueue(
            Script(text="done", input_tokens=30, output_tokens=4, cached_input_tokens=10, finish_reason="length")
        )
        api = AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        messages = (Message(Role.SYSTEM, "be brief"), Message(Role.USER, "hi"))
        batch_id = await api.submit([BatchItem("job_1", "claude-sonnet", "claude-sonnet-4-6", messages, 64)], "tag")
        results = await api.results(await api.poll(batch_id))
        await api.aclose()
        assert [(r.state, r.text, r.usage, r.finish_reason) for r in results] == [
            (BatchState.SUCCEEDED, "done", Usage(30, 4, 10), FinishReason.LENGTH)
        ]
        assert fake.batches[0].requests[0]["params"]["system"] == "be brief"

    @pytest.mark.parametrize("kind", ["openai", "anthropic"])
    async def test_discarding_a_batch_already_discarded_is_quiet(self, fake: FakeProvider, kind: str) -> None:
        """Two workers read an ended batch and both discard it: the second finds it gone (404),
        which is what it wanted, and logs no failure; the provider holds nothing of it."""
        from routesvc.models import Message, Role
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        api = (
            OpenAIBatches("openai", "sk", fake.openai_base_url)
            if kind == "openai"
            else AnthropicBatches("anthropic", "sk", fake.anthropic_base_url)
        )
        batch = await api.poll(await api.submit([BatchItem("job_1", "m", "m", (Message(Role.USER, "hi"),), 8)], "tag"))
        await api.discard(batch)
        with capture_logs() as logs:
            await api.discard(batch)
        await api.aclose()
        assert [e for e in logs if e["log_level"] == "warning"] == []
        assert (fake.files, [b.deleted for b in fake.batches]) == ([], [kind == "anthropic"])

    @pytest.mark.parametrize("kind", ["openai", "anthropic"])
    async def test_a_wrong_key_is_provider_auth_failed(self, kind: str) -> None:
        """The provider answers 401 to our key: ProviderAuthFailed, and the key is not in the message."""
        from routesvc.errors import ProviderAuthFailed
        from routesvc.models import Message, Role
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.batch import BatchItem
        from routesvc.providers.openai_batch import OpenAIBatches

        async with FakeProvider(api_key="right-key") as fake:
            api = (
                OpenAIBatches("openai", "wrong-key-canary", fake.openai_base_url)
                if kind == "openai"
                else AnthropicBatches("anthropic", "wrong-key-canary", fake.anthropic_base_url)
            )
            with pytest.raises(ProviderAuthFailed) as caught:
                await api.submit([BatchItem("job_1", "m", "m", (Message(Role.USER, "hi"),), 8)], "tag")
            await api.aclose()
        assert "wrong-key-canary" not in caught.value.message


class TestBatchStorePath:
    async def test_our_own_misuse_of_the_store_is_not_called_unavailable(self, tmp_path: Path) -> None:
        """A job stored twice under one id breaks a constraint: our bug, raised as it is (INTERNAL
        at the service), not ``BatchStoreUnavailable``, which says the store cannot be used."""
        store = BatchStore(tmp_path / "batches.db")
        job = BatchJob("batch_1", "acme", BatchState.QUEUED, "gpt-4o-mini", "openai", Decimal("0.1"), 1.0, 1.0)
        await store.add(job, "{}", held_by="me", hold_seconds=1)
        with pytest.raises(sqlite3.IntegrityError):
            await store.add(job, "{}", held_by="me", hold_seconds=1)
        await store.aclose()

    async def test_a_new_store_file_another_opener_writes_meanwhile_is_waited_for(self, tmp_path: Path) -> None:
        """A new store file that another process (a sibling replica's poller or first batch
        request) holds the write lock of while this one switches it to WAL: the open waits for
        it and succeeds once it is free. SQLite fails that switch at once, not after the busy
        timeout: the open failed 'database is locked' (a batch request BATCH_STORE_BUSY)."""
        path = tmp_path / "batches.db"
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "ROLLBACK")
        store = await asyncio.to_thread(BatchStore, path)
        other.close()
        try:
            assert await store.queued() == []
        finally:
            await store.aclose()

    def test_a_failed_open_keeps_no_file_handle(self, tmp_path: Path) -> None:
        """A store file that is not a database fails the open, and the connection it made is
        closed (it was left open: a file handle per failed open, a poller tries each round)."""
        path = tmp_path / "batches.db"
        path.write_bytes(b"not a database, but long enough to have a header" * 4)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(sqlite3.DatabaseError) as caught:
            BatchStore(path)
        after = len(os.listdir("/proc/self/fd"))
        assert caught.value.args == ("file is not a database",)
        assert after == before

    async def test_an_unusable_store_path_is_a_clear_failed_precondition(self, fake: FakeProvider) -> None:
        """batch.store_path under /proc (no database can be created there): a realtime=false
        Complete is FAILED_PRECONDITION, reason BATCH_STORE_UNAVAILABLE, naming the setting, not
        INTERNAL; realtime requests are served as usual."""
        config = default_config()
        config["batch"] = {"store_path": "/proc/routesvc-test/batches.db"}
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in client.complete(user_chat("Summarise this."), pb.RoutingContext(realtime=False)):
                    pass
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(caught.value).reason == "BATCH_STORE_UNAVAILABLE"
            assert "batch.store_path" in (caught.value.details() or "")
            messages = [m async for m in client.complete(user_chat("Summarise this."))]
            assert messages[-1].WhichOneof("event") == "completion"


class TestBatchCreateReplyLost:
    """A batch create (or OpenAI upload) the provider handled whose reply was lost is not sent twice."""

    @pytest.mark.parametrize(
        ("task", "reset_after"),
        [("creative_writing", 0), ("", 600), ("", 0)],
        ids=["anthropic-create", "openai-create", "openai-upload"],
    )
    async def test_the_batch_a_lost_reply_created_is_adopted_and_a_lost_upload_deleted(
        self, tmp_path: Path, fake: FakeProvider, task: str, reset_after: int
    ) -> None:
        """The connection is reset after the provider handled the create (or the OpenAI upload):
        the next round finds the batch that create made (OpenAI by the tag in its metadata,
        Anthropic by its request count and time) and places the job in it, so the provider holds
        one batch of the job, charged once (a second batch was created, the first never read,
        deleted or cancelled); a file whose upload reply was lost is deleted, and at the end the
        provider holds no file."""
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(reset_after_bytes=reset_after)
            environ = live_environ(fake)
            if task:
                environ["ANTHROPIC_BASE_URL"] = proxy.base_url
            else:
                environ["OPENAI_BASE_URL"] = f"{proxy.base_url}/v1"
            async with (
                Server(settings_from(batch_config(tmp_path), environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client, task_hint=task))[1].batch
                await until(lambda: proxy.faults_injected > 0)
                proxy.fault = NetworkFault()
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: not fake.files)
                entries = server.router.ledger.entries()
        assert [batch.custom_ids for batch in fake.batches] == [[job.batch_id]]
        assert [entry.request_id for entry in entries] == [job.batch_id]

    @pytest.mark.parametrize("status", [400, 500], ids=["refused", "server-error"])
    async def test_a_batch_another_client_created_before_the_send_is_never_adopted(
        self, tmp_path: Path, fake: FakeProvider, status: int
    ) -> None:
        """Another client of the workspace created a batch of as many requests just before our
        send, whose create Anthropic answers with an error: a refusal (400 credit balance too
        low) made nothing, so no lookup follows; a 5xx may have made the batch, but the lookup
        takes only batches created once the send began. Either way the job is sent in a batch
        of its own once the provider takes it, and the other client's batch is never adopted,
        cancelled or deleted (it was adopted, the job failed no_result, and the batch deleted)."""
        fake.batch_outcome = BatchOutcome.PENDING
        theirs = await create_foreign_batch(fake)
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": "credit balance is too low"}}
        fake.batch_create_error = (status, body)
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client, task_hint="creative_writing"))[1].batch
                await until(lambda: any(e["event"] == "batch_submit_failed" for e in logs))
                fake.batch_create_error = None
                await until(lambda: len(fake.batches) == 2)
                fake.batch_outcome = BatchOutcome.COMPLETE
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert not any(e["event"] == "batch_send_adopted" for e in logs)
        assert [batch.custom_ids for batch in fake.batches] == [["theirs"], [job.batch_id]]
        assert (theirs.cancelled, theirs.deleted) == (False, False)

    @pytest.mark.parametrize(
        ("cancelled", "gone"),
        [(False, False), (True, False), (False, True)],
        ids=["waiting", "cancelled", "deleted-by-its-owner"],
    )
    async def test_a_batch_adopted_by_its_shape_that_is_another_clients_is_left_alone(
        self, tmp_path: Path, fake: FakeProvider, cancelled: bool, gone: bool
    ) -> None:
        """While our create is under way (Anthropic answers it 500: maybe made), another client
        creates a batch of as many requests: the lookup cannot tell it from ours and adopts it,
        unverified. It is never cancelled (our job cancelled meanwhile left it running), and once
        it ends its results name none of our jobs: it is another client's, left there (never
        deleted), and our job, never sent, is queued again and sent in a batch of its own (or,
        cancelled, closes unbilled). So too when its owner deletes it before we read it (a 404:
        we never delete one unread), rather than failing the job provider_batch_not_found."""
        fake.batch_outcome = BatchOutcome.PENDING
        hold = asyncio.Event()
        fake.batch_create_hold = hold
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client, task_hint="creative_writing"))[1].batch
                async with asyncio.timeout(10):
                    await fake.batch_create_waiting.wait()
                fake.batch_create_hold = None
                theirs = await create_foreign_batch(fake)
                fake.batch_create_error = (500, {"type": "error", "error": {"type": "api_error", "message": "down"}})
                hold.set()
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                fake.batch_create_error = None
                if cancelled:
                    await client.cancel_batch(job.batch_id, tenant="acme")
                    await until(lambda: theirs.retrieved >= 2)  # polled since: not cancelled then
                if gone:
                    theirs.lost = True
                fake.batch_outcome = BatchOutcome.COMPLETE
                await until(lambda: any(e["event"] == "batch_adoption_undone" for e in logs))
                end = pb.BATCH_STATE_CANCELLED if cancelled else pb.BATCH_STATE_SUCCEEDED
                await wait_state(client, job.batch_id, end)
                entries = server.router.ledger.entries()
        assert [e["verified"] for e in logs if e["event"] == "batch_send_adopted"] == [False]
        assert (theirs.cancelled, theirs.deleted) == (False, False)
        ours = [] if cancelled else [[job.batch_id]]
        assert [batch.custom_ids for batch in fake.batches] == [["theirs"], *ours]
        assert [entry.request_id for entry in entries] == [b for [b] in ours]

    async def test_the_lookup_finds_a_batch_whose_send_had_a_job_cancelled_since(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two jobs are sent in one Anthropic batch whose create reply is lost; one is cancelled
        before the next send: the lookup goes by the size of the send (two requests), finds the
        batch, places the other job in it and ties the cancelled one to it, which is then read
        for its bill and deleted. The jobs are not sent again (they were, in a second batch,
        while the first was never read or deleted)."""
        config = batch_config(tmp_path)
        # Both jobs in one group, sent at once; the one left is due a second after it was queued.
        config["batch"] |= {"group_window_seconds": 1.0, "max_group_size": 2}  # type: ignore[operator]
        async with FaultProxy("127.0.0.1", fake.port) as proxy:
            proxy.fault = NetworkFault(reset_after_bytes=0)
            environ = live_environ(fake)
            environ["ANTHROPIC_BASE_URL"] = proxy.base_url
            async with (
                Server(settings_from(config, environ), port=0) as server,
                RouterClient(server.target) as client,
            ):
                gone, kept = [
                    responses[1].batch
                    for responses in await asyncio.gather(
                        submit(client, task_hint="creative_writing"), submit(client, task_hint="creative_writing")
                    )
                ]
                await until(lambda: len(fake.batches) == 1)
                await client.cancel_batch(gone.batch_id, tenant="acme")
                proxy.fault = NetworkFault()
                await wait_state(client, kept.batch_id, pb.BATCH_STATE_SUCCEEDED)
                [batch] = fake.batches
                await until(lambda: batch.deleted)
                entries = server.router.ledger.entries()
        assert sorted(batch.custom_ids) == sorted([gone.batch_id, kept.batch_id])
        assert sorted((entry.request_id, entry.outcome) for entry in entries) == sorted(
            [(gone.batch_id, AttemptOutcome.CANCELLED), (kept.batch_id, AttemptOutcome.COMPLETED)]
        )

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_a_lost_send_cut_into_other_groups_on_restart_is_sent_once(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """A send of three jobs whose create reply is lost (the server stops mid-create); the
        restarted server groups at most two jobs: the first group finds the batch by the send's
        tag (Anthropic: by its shape) and places in it every job of that send, the third as well,
        so no job is sent again (the second group found the batch known and sent its job in a
        second batch: run and charged twice)."""
        config = batch_config(tmp_path)
        config["batch"] |= {"group_window_seconds": 1.0, "max_group_size": 3}  # type: ignore[operator]
        environ = live_environ(fake)
        fake.batch_create_reply_hold = asyncio.Event()  # the batch is made, its reply never comes
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            jobs = [m[1].batch for m in await asyncio.gather(*(submit(client, task_hint=task) for _ in range(3)))]
            async with asyncio.timeout(10):
                await fake.batch_create_waiting.wait()
        fake.batch_create_reply_hold.set()
        # The dead send's claim has lapsed (as CLAIM_SECONDS after it would have).
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as connection, connection:
            connection.execute("UPDATE jobs SET claimed_until = 0")
        config["batch"]["max_group_size"] = 2  # type: ignore[index]
        async with Server(settings_from(config, environ), port=0) as server, RouterClient(server.target) as client:
            for job in jobs:
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            entries = server.router.ledger.entries()
        assert [sorted(batch.custom_ids) for batch in fake.batches] == [sorted(job.batch_id for job in jobs)]
        assert sorted(entry.request_id for entry in entries) == sorted(job.batch_id for job in jobs)

    async def test_an_openai_create_cut_off_by_the_send_timeout_keeps_its_file(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OpenAI made the batch but its reply comes after the send's timeout (half the claim),
        which cancels the create: the input file is kept (it was deleted, under the batch that
        the next round adopts), the batch is adopted by its tag, and its file goes only with its
        results."""
        monkeypatch.setattr(batch_queue, "CLAIM_SECONDS", 0.4)
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_create_reply_hold = asyncio.Event()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                [batch] = fake.batches
                files_while_running = fake.files
                fake.batch_outcome = BatchOutcome.COMPLETE
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: not fake.files)
        assert files_while_running == [batch.input_file_id]
        assert batch.custom_ids == [job.batch_id]
        assert fake.deleted_files == [batch.input_file_id, batch.output_file_id]


async def create_foreign_batch(fake: FakeProvider, key: str = "sk-test-anthropic") -> FakeBatch:
    """A one-request Anthropic message batch another client of the workspace (of ``key``) creates."""
    other = anthropic.AsyncAnthropic(api_key=key, base_url=fake.anthropic_base_url)
    try:
        params = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        created = await other.messages.batches.create(requests=[{"custom_id": "theirs", "params": params}])  # type: ignore[list-item]
    finally:
        await other.close()
    return next(batch for batch in fake.batches if batch.id == created.id)


class TestBatchSubmitRejected:
    async def test_a_create_refused_for_good_fails_its_jobs_and_leaves_no_send_to_look_up(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A create answered 400 (the request refused, not a quota or a key) made nothing: its jobs
        end FAILED, and the send's tag goes with them, so the poller never looks that send up
        (it kept the tag: a list of the account's batches, or for Anthropic a shape match)."""
        fake.batch_create_error = (400, {"error": {"message": "refused", "type": "invalid_request_error"}})
        path = tmp_path / "batches.db"
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                await until(lambda: any(e["event"] == "batch_submit_rejected" for e in logs))
                await wait_state(client, job.batch_id, pb.BATCH_STATE_FAILED)
        assert send_tags(path) == [False]


class TestBatchSubmitWithASpentQuota:
    async def test_jobs_wait_queued_while_the_account_is_unpaid(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Anthropic answers the batch's creation with its 400 "credit balance is too low": the
        jobs stay queued and are sent once the account is paid (they were failed for good as
        PROVIDER_REJECTED); the log says why."""
        credit = {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "Your credit balance is too low to access the API."},
        }
        fake.batch_create_error = (400, credit)
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client, task_hint="creative_writing"))[1].batch
                assert job.model == "claude-sonnet"
                async with asyncio.timeout(5):
                    while True:  # until the poller has tried to send it
                        if any(e["event"] == "batch_submit_failed" for e in logs):
                            break
                        await asyncio.sleep(0.05)
            assert (await get_batch(client, job.batch_id)).job.state == pb.BATCH_STATE_QUEUED
            fake.batch_create_error = None
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert done.result.text
        assert next(e["reason"] for e in logs if e["event"] == "batch_submit_failed") == "PROVIDER_QUOTA_EXHAUSTED"

    async def test_an_openai_input_file_whose_batch_was_not_created_is_deleted(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """OpenAI refuses to create the batch (429 insufficient_quota) round after round: each
        round's uploaded input file is deleted again (they were left in the account, one more
        every poll round); once the account is paid the batch is created and its input file kept
        until the batch's results are stored, when it goes with the output file: the provider
        holds no file at the end."""
        quota = {"error": {"type": "insufficient_quota", "code": "insufficient_quota", "message": "quota"}}
        fake.batch_create_error = (429, quota)
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                assert job.model == "gpt-4o-mini"
                await until(lambda: sum(e["event"] == "batch_submit_failed" for e in logs) >= 3)
            fake.batch_create_error = None
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: not fake.files)
        [batch] = fake.batches
        rounds = sum(e["event"] == "batch_submit_failed" for e in logs)
        assert len(fake.deleted_files) == rounds + 2
        assert fake.deleted_files[-2:] == [batch.input_file_id, batch.output_file_id]

    async def test_a_job_queued_past_max_queued_seconds_ends_expired(self, tmp_path: Path, fake: FakeProvider) -> None:
        """The quota stays spent for batch.max_queued_seconds: the job ends EXPIRED
        queued_too_long (it stayed QUEUED for ever), uncharged, and the estimate its tenant's
        budget counted is given back."""
        config = budget_config(tmp_path)
        # Long enough that the budget is read before the job can expire, on a loaded machine too.
        config["batch"]["max_queued_seconds"] = 2.0  # type: ignore[index]
        quota = {"error": {"type": "insufficient_quota", "code": "insufficient_quota", "message": "quota"}}
        fake.batch_create_error = (429, quota)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                assert await server.router.admission.spent("acme") == Decimal(job.estimated_cost_usd)
                expired = await wait_state(client, job.batch_id, pb.BATCH_STATE_EXPIRED)
                async with asyncio.timeout(5):  # corrected by the poller's round that ended it
                    while await server.router.admission.spent("acme"):  # noqa: ASYNC110 - the round has no event
                        await asyncio.sleep(0.02)
            assert server.router.ledger.entries() == []
        assert expired.error == "queued_too_long"
        assert fake.batches == []
        assert [(e["jobs"], e["reason"]) for e in logs if e["event"] == "batch_jobs_expired"] == [
            (1, "queued_too_long")
        ]


async def cancel_at_the_provider(fake: FakeProvider, batch_id: str) -> None:
    """Cancel an OpenAI batch as someone else would (an operator, the dashboard), through the SDK."""
    sdk = openai.AsyncOpenAI(api_key="sk", base_url=fake.openai_base_url)
    try:
        await sdk.batches.cancel(batch_id)
    finally:
        await sdk.close()


class TestBatchProviderCleanup:
    """What the provider keeps of a batch (prompts and answers) is deleted once its jobs' ends
    are stored, never before; a delete that fails is logged and fails nothing."""

    @pytest.mark.parametrize(
        ("outcome", "state", "files"),
        [
            (BatchOutcome.COMPLETE, pb.BATCH_STATE_SUCCEEDED, ("input_file_id", "output_file_id")),
            (BatchOutcome.EXPIRE, pb.BATCH_STATE_EXPIRED, ("input_file_id", "error_file_id")),
            (None, pb.BATCH_STATE_CANCELLED, ("input_file_id", "error_file_id")),
        ],
        ids=["completed", "expired", "cancelled"],
    )
    async def test_an_ended_openai_batchs_files_are_deleted(
        self, tmp_path: Path, fake: FakeProvider, outcome: BatchOutcome | None, state: int, files: tuple[str, ...]
    ) -> None:
        """An OpenAI batch completed, expired or cancelled at the provider (``None``): once its
        job has ended in the store, the input file and whichever output and error files the batch
        wrote are deleted at OpenAI, and the provider holds no file (they were left in the account
        for ever). A failed batch's: ``TestBatchFailures``."""
        fake.batch_outcome = outcome or BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch
            if outcome is None:
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
                await cancel_at_the_provider(fake, fake.batches[0].id)
            await wait_state(client, job.batch_id, state)
            await until(lambda: not fake.files)
        [batch] = fake.batches
        assert fake.deleted_files == [getattr(batch, name) for name in files]

    async def test_an_ended_anthropic_batch_is_deleted(self, tmp_path: Path, fake: FakeProvider) -> None:
        """An Anthropic message batch that ended is deleted at Anthropic (its requests and
        results with it) once its job's answer is stored; GetBatch still returns the answer."""
        fake.enqueue(Script(text="A short summary."), model="claude-sonnet-4-6")
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint="creative_writing"))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: all(b.deleted for b in fake.batches))
            answer = await get_batch(client, job.batch_id)
        assert answer.result.text == "A short summary."
        assert [(b.status, b.deleted) for b in fake.batches] == [("ended", True)]

    async def test_results_the_store_failed_to_write_are_read_again_from_files_not_deleted(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The store fails to write the first result read (a full disk, forced here): the files
        are not deleted, so the next round reads the output file again and the job succeeds;
        only then are the files deleted."""
        finish = BatchStore.finish
        failures = [BatchStoreUnavailable("disk full")]

        async def failing_once(store: BatchStore, batch_id: str, state: BatchState, **values: Any) -> bool:
            if failures:
                raise failures.pop()
            return await finish(store, batch_id, state, **values)

        monkeypatch.setattr(BatchStore, "finish", failing_once)
        fake.enqueue(Script(text="A short summary."), model="gpt-4o-mini")
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: not fake.files)
        [batch] = fake.batches
        assert [e["event"] for e in logs if e["event"] == "batch_poll_crashed"] == ["batch_poll_crashed"]
        assert done.result.text == "A short summary."
        assert fake.deleted_files == [batch.input_file_id, batch.output_file_id]

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_a_shutdown_waits_for_a_provider_delete_a_few_seconds_only(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """A delete the provider does not answer is given up when the server stops (logged
        batch_close_cut_short), so the queue's close keeps within what the Kubernetes grace
        period leaves after the drain; it waited out each delete's own 10 s bound."""
        fake.batch_delete_hold = asyncio.Event()
        with capture_logs() as logs:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client, task_hint=task))[1].batch
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await fake.batch_delete_waiting.wait()
        fake.batch_delete_hold.set()
        [cut] = [e for e in logs if e["event"] == "batch_close_cut_short"]
        assert cut["seconds"] == 4.0
        assert fake.deleted_files == []
        assert not any(batch.deleted for batch in fake.batches)

    @pytest.mark.parametrize(
        ("task", "event"), [("", "batch_file_delete_failed"), ("creative_writing", "batch_delete_failed")]
    )
    async def test_a_delete_that_fails_fails_no_job_and_is_tried_again(
        self, tmp_path: Path, fake: FakeProvider, task: str, event: str
    ) -> None:
        """The provider answers the deletes with 500: the job stays SUCCEEDED, each failed delete
        is logged with its id and reason (never the prompt or the answer), and once the provider
        takes deletes again a later round deletes what was left (it stayed at the provider until
        its expiry: no round tried it again)."""
        fake.batch_delete_error = (500, {"error": {"type": "server_error", "message": "down"}})
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                first = (await submit(client, task_hint=task))[1].batch
                await wait_state(client, first.batch_id, pb.BATCH_STATE_SUCCEEDED)
                expected = 2 if task == "" else 1  # the input and output files; the message batch
                await until(lambda: sum(e["event"] == event for e in logs) >= expected)
                fake.batch_delete_error = None
                [batch] = fake.batches
                if task == "":
                    await until(lambda: len(fake.deleted_files) == 2)
                else:
                    await until(lambda: batch.deleted)
            state = (await get_batch(client, first.batch_id)).job.state
        failed = [e for e in logs if e["event"] == event]
        assert state == pb.BATCH_STATE_SUCCEEDED
        assert {e["reason"] for e in failed} == {"PROVIDER_UNAVAILABLE"}
        assert "Summarise" not in repr(failed)
        assert DEFAULT_TEXT not in repr(failed)
        if task == "":
            assert {e["file_id"] for e in failed} == {batch.input_file_id, batch.output_file_id}
            assert fake.files == []
        else:
            assert {e["provider_batch_id"] for e in failed} == {batch.id}

    async def test_a_delete_that_keeps_failing_is_given_up(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The deletes keep failing: after the set number of tries the leftover is given up,
        logged once (the provider's own expiry deletes it), and not tried again."""
        monkeypatch.setattr(batch_queue, "_DISCARD_TRIES", 2)
        fake.batch_delete_error = (500, {"error": {"type": "server_error", "message": "down"}})
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch
                await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: any(e["event"] == "batch_discard_abandoned" for e in logs))
        [batch] = fake.batches
        abandoned = [e for e in logs if e["event"] == "batch_discard_abandoned"]
        assert [(e["provider_batch_id"], e["tries"]) for e in abandoned] == [(batch.id, 2)]
        assert sum(e["event"] == "batch_file_delete_failed" for e in logs) == 2 * 2  # two files, twice
        assert fake.files == [batch.input_file_id, batch.output_file_id]

    async def test_an_input_file_whose_batch_create_a_shutdown_cut_off_is_kept_for_the_lookup(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The server stops while OpenAI is creating the batch of a file just uploaded: the
        send is cancelled, but the create may have reached OpenAI, so the file is kept (a batch
        made of it needs it); the job stays QUEUED, its send's tag stored, and whoever sends it
        once its claim lapses looks that batch up, or else deletes the file by its name."""
        fake.batch_create_hold = asyncio.Event()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await submit(client)
            async with asyncio.timeout(10):
                await fake.batch_create_waiting.wait()
            uploaded = fake.files
        assert (fake.files, fake.deleted_files, fake.batches) == (uploaded, [], [])
        assert len(uploaded) == 1
        assert job_states(tmp_path / "batches.db") == ["queued"]
        assert send_tags(tmp_path / "batches.db") == [True]


def _text_chars(value: object) -> int:
    """The characters of every string in ``value`` (nested lists, tuples, dicts' values)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return sum(_text_chars(item) for item in value)
    return 0


class TestBatchPollerMemory:
    async def test_a_round_reads_one_groups_requests_at_a_time(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Twelve large jobs wait, the provider failing every send (500), max_group_size 3: no
        read of the store in a round returns more than one group's requests (each round read
        every queued job's request, due or not, so memory grew with the whole backlog)."""
        reads: list[int] = []
        run = BatchStore._run

        async def measured(self: BatchStore, work: Callable[[sqlite3.Connection], object]) -> object:
            result = await run(self, work)
            reads.append(_text_chars(result))
            return result

        monkeypatch.setattr(BatchStore, "_run", measured)
        fake.batch_create_error = (500, {"error": {"type": "server_error", "message": "down"}})
        config = batch_config(tmp_path)
        config["batch"]["max_group_size"] = 3  # type: ignore[index]
        prompt = "Summarise this report. " + "x" * 200_000
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                for _ in range(12):
                    [m async for m in client.complete(user_chat(prompt), pb.RoutingContext(realtime=False))]
                queued = len(logs)
                # Rounds with all twelve queued have sent each of the four groups (and failed).
                await until(lambda: sum(e["event"] == "batch_submit_failed" for e in logs[queued:]) >= 8)
        assert 3 * len(prompt) <= max(reads) < 3 * len(prompt) * 1.1


def _keyed_by_file(tmp_path: Path, fake: FakeProvider, key: Path) -> dict[str, object]:
    """``batch_config`` with both providers at ``fake``, their key read from the file ``key``."""
    config = batch_config(tmp_path)
    for name, base_url in (("openai", fake.openai_base_url), ("anthropic", fake.anthropic_base_url)):
        config["providers"][name] = {"kind": name, "api_key_file": str(key), "base_url": base_url}  # type: ignore[index]
    return config


@dataclass
class _LostBatch:
    """A running deployment whose one job's batch the provider lost (404 to every key)."""

    fake: FakeProvider
    server: Server
    client: RouterClient
    config: dict[str, object]
    job: str
    batch: FakeBatch

    async def reload(self) -> None:
        """Hot-reload the deployment's config (its key file read again)."""
        await self.server.reload(settings_from(self.config))


@contextlib.asynccontextmanager
async def _lost_as_the_key_rotates(tmp_path: Path) -> AsyncIterator[_LostBatch]:
    """A deployment keyed by file sends a batch with key-A (SUBMITTED, PENDING at the provider);
    the provider then loses it, and the key is rotated to key-B at the provider and in the key
    file, not yet reloaded."""
    key = tmp_path / "openai.key"
    key.write_text("key-A\n")
    async with FakeProvider(api_key="key-A") as fake:
        config = _keyed_by_file(tmp_path, fake, key)
        async with (
            Server(settings_from(config), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.batch_outcome = BatchOutcome.PENDING
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            batch.lost = True
            fake.api_key = "key-B"
            key.write_text("key-B\n")
            yield _LostBatch(fake, server, client, config, job, batch)


class TestBatchKeyRotation:
    async def test_a_key_rotated_by_hot_reload_reaches_the_batch_adapters(self, tmp_path: Path) -> None:
        """The provider takes only a new key before the key file has it: a job sent then is
        refused (401) and stays QUEUED (it was FAILED PROVIDER_AUTH_FAILED for good); the file
        gets the new key and the config is reloaded: that job and one submitted before the
        rotation (SUBMITTED, polled with the old key) both succeed (the batch adapters kept the
        key they started with, and every later job failed)."""
        key = tmp_path / "openai.key"
        key.write_text("key-A\n")
        async with FakeProvider(api_key="key-A") as fake:
            config = _keyed_by_file(tmp_path, fake, key)
            async with (
                Server(settings_from(config), port=0) as server,
                RouterClient(server.target) as client,
            ):
                fake.batch_outcome = BatchOutcome.PENDING
                before = (await submit(client))[1].batch
                await wait_state(client, before.batch_id, pb.BATCH_STATE_SUBMITTED)
                fake.api_key = "key-B"  # rotated at the provider; the file follows later
                with capture_logs() as logs:
                    refused = (await submit(client))[1].batch
                    await until(lambda: any(e["event"] == "batch_submit_failed" for e in logs))
                waiting = await get_batch(client, refused.batch_id)
                key.write_text("key-B\n")
                fake.batch_outcome = BatchOutcome.COMPLETE
                await server.reload(settings_from(config))
                await wait_state(client, refused.batch_id, pb.BATCH_STATE_SUCCEEDED)
                await wait_state(client, before.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert waiting.job.state == pb.BATCH_STATE_QUEUED
        assert next(e["reason"] for e in logs if e["event"] == "batch_submit_failed") == "PROVIDER_AUTH_FAILED"

    async def test_a_batch_lost_before_the_rotated_key_saw_it_fails_once_no_account_can_read_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The provider loses a batch sent with the old key before the rotated key first polls
        it: its 404 cannot tell it from another account's batch at the same URL, so it is left
        alone (``other_key``) while that account could still read it, and once it has waited
        past any provider's window (the store's send time moved two days and more back) and no
        process has marked the old key for ENDPOINT_GONE_AFTER_SECONDS (0.3 s here) its job
        ends FAILED provider_batch_not_found (it stayed SUBMITTED, polled for ever)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        async with _lost_as_the_key_rotates(tmp_path) as lost:
            with capture_logs() as logs:
                await lost.reload()
                await until(lambda: any(e["event"] == "batch_poll_skipped" for e in logs))
                skipped = await get_batch(lost.client, lost.job)
                sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
                failed = await wait_state(lost.client, lost.job, pb.BATCH_STATE_FAILED)
        assert skipped.job.state == pb.BATCH_STATE_SUBMITTED
        assert [e["reason"] for e in logs if e["event"] == "batch_poll_skipped"] == ["other_key"]
        assert failed.error == "provider_batch_not_found"
        assert [e["jobs"] for e in logs if e["event"] == "batch_lost"] == [1]

    async def test_a_lost_batch_whose_checks_fail_now_and_then_is_still_failed_once_its_key_is_gone(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As above, the lost batch (sent two days and more ago) answering the rotated key 404,
        but one status check in a few fails (a 500) between the 404s: the rotated key got 404, so
        its failures tell nothing of the old key's owner and never mark the old key again; the job
        ends FAILED provider_batch_not_found once the old key has been unmarked for
        ENDPOINT_GONE_AFTER_SECONDS (0.3 s here; each failure marked it anew, so one failure per
        window kept it SUBMITTED, polled for ever, its estimate held)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        async with _lost_as_the_key_rotates(tmp_path) as lost:
            sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
            batch, fake = lost.batch, lost.fake

            async def fail_now_and_then() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    refused = batch.refused
                    batch.lost = False
                    fake.batch_retrieve_errors["openai"] = SERVER_ERROR
                    await until(lambda: batch.refused > refused)  # noqa: B023 - read at once
                    fake.batch_retrieve_errors.clear()
                    batch.lost = True

            with capture_logs() as logs:
                await lost.reload()
                flapping = asyncio.create_task(fail_now_and_then())
                try:
                    failed = await wait_state(lost.client, lost.job, pb.BATCH_STATE_FAILED, timeout=6.0)
                finally:
                    flapping.cancel()
            refused = batch.refused
        assert failed.error == "provider_batch_not_found"
        assert refused >= 1
        assert [e["jobs"] for e in logs if e["event"] == "batch_lost"] == [1]


def _account(tmp_path: Path, fake: FakeProvider, key: str) -> dict[str, object]:
    """``batch_config`` of a deployment whose account's key is ``key``, at ``fake``'s base URLs."""
    key_file = tmp_path / f"{key}.key"
    key_file.write_text(key + "\n")
    return _keyed_by_file(tmp_path, fake, key_file)


def _deployment(tmp_path: Path, fake: FakeProvider, key: str) -> Server:
    """A server of the deployment whose account's key is ``key`` (``_account``)."""
    return Server(settings_from(_account(tmp_path, fake, key)), port=0)


async def _reply_lost(tmp_path: Path, fake: FakeProvider, key: str, **context: object) -> str:
    """The id of one job that ``key``'s deployment stopped while sending: the provider made its
    batch (pending), the create's reply never came; the job QUEUED with its send's tag."""
    fake.batch_outcome = BatchOutcome.PENDING
    fake.batch_create_reply_hold = asyncio.Event()  # the batch is made, its reply never comes
    async with _deployment(tmp_path, fake, key) as owner, RouterClient(owner.target) as client:
        job = (await submit(client, **context))[1].batch.batch_id
        async with asyncio.timeout(10):
            await fake.batch_create_waiting.wait()
    fake.batch_create_reply_hold.set()
    return job


async def _sent_by(tmp_path: Path, fake: FakeProvider, key: str, *, found_ended: bool = False) -> str:
    """The id of one job that ``key``'s deployment sent and then stopped with, SUBMITTED (and,
    ``found_ended``, once its results read of the batch it found ended has failed twice)."""
    async with _deployment(tmp_path, fake, key) as owner, RouterClient(owner.target) as client:
        job = (await submit(client))[1].batch.batch_id
        await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
        if found_ended:
            await until(lambda: fake.batch_results_refused >= 2)
    return job


class TestBatchAccountsSharingAURL:
    """Two deployments (two accounts' keys) at one base URL sharing one store: each account's
    batches are 404 to the other's key (``FakeProvider.batches_per_key``, as OpenAI's projects)."""

    async def test_another_account_never_fails_a_batch_whose_owner_is_still_reading_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Account A's batch is completed (billed) but A's results reads fail (a 5xx) for more
        than two days after it was sent; deployment B, which gets 404 for it, leaves it alone
        while A's process is alive (it failed A's job provider_batch_not_found, uncharged, once
        the batch was sent OTHER_KEY_LOST_AFTER_SECONDS ago); once A's read gets through, the job
        succeeds and is charged once, by A."""
        fake.batches_per_key = True
        fake.batch_results_errors["openai"] = SERVER_ERROR
        async with (
            _deployment(tmp_path, fake, "key-A") as owner,
            RouterClient(owner.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            await until(lambda: fake.batch_results_refused >= 2)
            with capture_logs() as logs:
                async with _deployment(tmp_path, fake, "key-B") as other:
                    await until(lambda: any(e["event"] == "batch_poll_skipped" for e in logs))
                    sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
                    await asyncio.sleep(0.6)  # rounds of both
                    waiting = await get_batch(client, job)
                    assert (waiting.job.state, waiting.error) == (pb.BATCH_STATE_SUBMITTED, "")
                    fake.batch_results_errors.clear()
                    await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                    others = list(other.router.ledger.entries())
            charged = [e.request_id for e in owner.router.ledger.entries()]
        assert [job] == charged
        assert others == []
        assert [e for e in logs if e["event"] == "batch_lost"] == []

    async def test_a_batch_of_an_account_no_process_sends_with_any_more_fails_once_its_key_is_gone(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Account A's batch, sent more than OTHER_KEY_LOST_AFTER_SECONDS ago, waits while A's
        process runs; once A has stopped and no process has marked its key for
        ENDPOINT_GONE_AFTER_SECONDS (0.3 s here), B, which gets 404 for it, ends its job FAILED
        provider_batch_not_found, uncharged: no process can read it."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_outcome = BatchOutcome.PENDING
        job = await _sent_by(tmp_path, fake, "key-A")
        async with (
            _deployment(tmp_path, fake, "key-B") as other,
            RouterClient(other.target) as client,
        ):
            sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
            with capture_logs() as logs:
                failed = await wait_state(client, job, pb.BATCH_STATE_FAILED)
            charged = list(other.router.ledger.entries())
        assert failed.error == "provider_batch_not_found"
        assert charged == []
        assert [e["jobs"] for e in logs if e["event"] == "batch_lost"] == [1]

    @pytest.mark.parametrize(
        "refusal",
        [
            SERVER_ERROR,
            (403, {"error": {"type": "invalid_request_error", "code": "unsupported_country_region_territory"}}, {}),
        ],
        ids=["500", "403 of the owner's own key"],
    )
    async def test_another_account_never_fails_a_batch_whose_owner_rotated_its_key_and_cannot_check_it_yet(
        self,
        tmp_path: Path,
        fake: FakeProvider,
        monkeypatch: pytest.MonkeyPatch,
        refusal: tuple[int, dict[str, object], dict[str, str]],
    ) -> None:
        """Account A sends a batch with key-A1, then restarts with key-A2 (the same account: it
        sees the batch) while its status checks fail (a 500, or a 403 refusing A's own new key
        for a while, for longer than ENDPOINT_GONE_AFTER_SECONDS, 0.3 s here), the batch sent
        more than OTHER_KEY_LOST_AFTER_SECONDS ago; B, another account at the URL, gets 404 for
        it and leaves it alone, as A's process still cannot tell (it failed A's job
        provider_batch_not_found, uncharged, though it ran on at the provider; after a 403 too
        since 7abd8bd); once A's checks get through, A reads it and charges it once."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A1": "A", "key-A2": "A"})
        fake.batch_outcome = BatchOutcome.PENDING
        job = await _sent_by(tmp_path, fake, "key-A1")
        fake.batch_retrieve_errors["openai"] = refusal
        sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with (
                _deployment(tmp_path, fake, "key-A2") as owner,
                RouterClient(owner.target) as client,
                _deployment(tmp_path, fake, "key-B") as other,
            ):
                await asyncio.sleep(1.5)  # many rounds and marks of both
                waiting = await get_batch(client, job)
                fake.batch_outcome = BatchOutcome.COMPLETE
                fake.batch_retrieve_errors.clear()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in owner.router.ledger.entries()]
                others = list(other.router.ledger.entries())
        assert (waiting.job.state, waiting.error) == (pb.BATCH_STATE_SUBMITTED, "")
        assert charged == [job]
        assert others == []
        assert [e for e in logs if e["event"] == "batch_lost"] == []

    async def test_a_rotated_owner_whose_checks_fail_keeps_its_old_key_marked_only_until_three_days_after_the_send(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As above, but the batch was sent more than ABANDON_AFTER_SECONDS ago: A's rotated key,
        whose checks fail (a process just restarted: its own give-up is an hour of failures
        away), no longer marks the old key, and B, which gets 404 for it, ends its job FAILED
        provider_batch_not_found, uncharged, once the old key has been unmarked for
        ENDPOINT_GONE_AFTER_SECONDS (0.3 s here; A's failing checks marked the old key for as long
        as they failed, a restart of A every hour kept the job SUBMITTED for ever)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A1": "A", "key-A2": "A"})
        fake.batch_outcome = BatchOutcome.PENDING
        job = await _sent_by(tmp_path, fake, "key-A1")
        fake.batch_retrieve_errors["openai"] = SERVER_ERROR
        sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with (
                _deployment(tmp_path, fake, "key-A2") as owner,
                _deployment(tmp_path, fake, "key-B") as other,
                RouterClient(other.target) as client,
            ):
                failed = await wait_state(client, job, pb.BATCH_STATE_FAILED, timeout=6.0)
                charged = [*owner.router.ledger.entries(), *other.router.ledger.entries()]
        assert failed.error == "provider_batch_not_found"
        assert charged == []
        assert [e["jobs"] for e in logs if e["event"] == "batch_lost"] == [1]

    async def test_a_batch_found_ended_whose_owner_is_gone_waits_and_says_so(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Account A's status check found its batch ended (billed) but its results read failed,
        and A's process is gone; B, which gets 404 for it, never fails it (its owner may come
        back with its key) and says, at warning, once per ``_FAILURE_LOG_SECONDS``, that it
        waits unread since it was sent (it waited SUBMITTED for ever, its estimate held, with one
        info line per process)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_results_errors["openai"] = SERVER_ERROR
        await _sent_by(tmp_path, fake, "key-A", found_ended=True)
        sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B"):
                await until(lambda: any(e["event"] == "batch_unread_owner_gone" for e in logs))
                await asyncio.sleep(0.5)  # rounds more
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            [(state,)] = store.execute("SELECT state FROM jobs").fetchall()
        warned = [e for e in logs if e["event"] == "batch_unread_owner_gone"]
        assert state == "submitted"
        assert len(warned) == 1
        assert warned[0]["log_level"] == "warning"
        assert warned[0]["jobs"] == 1
        assert warned[0]["sent_seconds_ago"] >= OTHER_KEY_LOST_AFTER_SECONDS

    async def test_a_process_whose_checks_of_a_batch_found_ended_fail_does_not_silence_its_warning(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As above, with a third process beside B whose status checks of the batch are refused
        (a 401: a key revoked, here of A's account, which sees the batch): B still warns
        ``batch_unread_owner_gone`` (the third process marked A's key as its own while its
        checks failed, so B took it as alive and never warned: the batch waited silently)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A"})
        fake.batch_results_errors["openai"] = SERVER_ERROR
        await _sent_by(tmp_path, fake, "key-A", found_ended=True)
        fake.batch_retrieve_errors["openai"] = (
            401,
            {"error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "bad key"}},
            {},
        )
        [batch] = fake.batches
        sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with (
                _deployment(tmp_path, fake, "key-A2"),
                _deployment(tmp_path, fake, "key-B"),
            ):
                await until(lambda: batch.refused >= 1)
                await until(lambda: any(e["event"] == "batch_unread_owner_gone" for e in logs), cap=5.0)
        failed = {e["reason"] for e in logs if e["event"] == "batch_poll_failed"}
        assert failed == {"PROVIDER_AUTH_FAILED"}

    @pytest.mark.parametrize("sent_days_ago", [0, 2])
    async def test_a_job_cancelled_of_a_batch_found_ended_whose_owner_is_gone_is_closed_uncharged(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, sent_days_ago: int
    ) -> None:
        """As above; the job is cancelled through B (the remedy the warning's README gives): B
        closes it uncharged (no longer tied to the unreadable batch, so its estimate's correction
        is due, and it is polled and warned about no more; it stayed tied, polled each round and
        warned about every ``_FAILURE_LOG_SECONDS``, 0.2 s here, for ever), but only once the
        cancel is more than OTHER_KEY_LOST_AFTER_SECONDS old, however long ago the batch was
        sent: an owner back with its key within that charges the bill (B closed it as soon as
        A's key was unmarked for ENDPOINT_GONE_AFTER_SECONDS, so an owner merely down for an
        hour lost it; and the bound, where it applied, counted from the batch's send)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        monkeypatch.setattr(batch_queue, "_FAILURE_LOG_SECONDS", 0.2)
        fake.batches_per_key = True
        fake.batch_results_errors["openai"] = SERVER_ERROR
        job = await _sent_by(tmp_path, fake, "key-A", found_ended=True)
        sent_earlier(tmp_path / "batches.db", sent_days_ago * 86400.0 + 60)
        with capture_logs() as logs:
            async with (
                _deployment(tmp_path, fake, "key-B") as other,
                RouterClient(other.target) as client,
            ):
                await until(lambda: any(e["event"] == "batch_unread_owner_gone" for e in logs))
                await client.cancel_batch(job, tenant="acme")
                await asyncio.sleep(1.0)  # rounds more, A's key unmarked past ENDPOINT_GONE_AFTER_SECONDS
                lost_early = [e for e in logs if e["event"] == "batch_lost"]
                sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
                await until(lambda: any(e["event"] == "batch_lost" for e in logs), cap=5.0)
                closed_at = len(logs)
                await asyncio.sleep(0.6)  # rounds more, past _FAILURE_LOG_SECONDS
                after = await get_batch(client, job)
                charged = list(other.router.ledger.entries())
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            [(state, pending)] = store.execute("SELECT state, provider_pending FROM jobs").fetchall()
        assert lost_early == []
        assert (state, pending) == ("cancelled", None)
        assert after.job.state == pb.BATCH_STATE_CANCELLED
        assert charged == []
        assert [(e["jobs"], e["cancelled_jobs"]) for e in logs if e["event"] == "batch_lost"] == [(0, 1)]
        assert [e for e in logs[closed_at:] if e["event"] == "batch_unread_owner_gone"] == []

    async def test_a_job_cancelled_beside_one_still_waiting_is_closed_two_days_after_its_cancel_not_the_send(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """As above with two jobs in A's batch, sent more than OTHER_KEY_LOST_AFTER_SECONDS ago;
        one is cancelled through B: B closes it only once its cancel is that old (the bound
        counted from the batch's earliest change, the other job's send, so a job cancelled a
        moment ago was closed uncharged at once), and the other waits."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_results_errors["openai"] = SERVER_ERROR
        config = _account(tmp_path, fake, "key-A")
        config["batch"] |= {"group_window_seconds": 1.0, "max_group_size": 2}  # type: ignore[operator]
        async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as client:
            waiting, cancelled = [
                responses[1].batch.batch_id for responses in await asyncio.gather(submit(client), submit(client))
            ]
            await wait_state(client, waiting, pb.BATCH_STATE_SUBMITTED)
            await wait_state(client, cancelled, pb.BATCH_STATE_SUBMITTED)
            await until(lambda: fake.batch_results_refused >= 2)
        assert len(fake.batches) == 1
        sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with (
                _deployment(tmp_path, fake, "key-B") as other,
                RouterClient(other.target) as client,
            ):
                await until(lambda: any(e["event"] == "batch_unread_owner_gone" for e in logs))
                await client.cancel_batch(cancelled, tenant="acme")
                await asyncio.sleep(1.0)  # rounds more, A's key unmarked past ENDPOINT_GONE_AFTER_SECONDS
                assert [e for e in logs if e["event"] == "batch_lost"] == []
                sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
                await until(lambda: any(e["event"] == "batch_lost" for e in logs), cap=5.0)
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            states = dict(store.execute("SELECT id, state FROM jobs").fetchall())
        assert states == {waiting: "submitted", cancelled: "cancelled"}
        assert [(e["jobs"], e["cancelled_jobs"]) for e in logs if e["event"] == "batch_lost"] == [(0, 1)]

    async def test_a_rotated_owner_whose_checks_of_its_ended_batch_fail_keeps_its_cancelled_jobs_bill(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A's batch is found ended (billed), its results read fails, its job is cancelled; A's
        process comes back with the account's rotated key whose status checks fail (a 5xx: its
        account's outage) beside B, another account's, which gets 404, the cancel more than
        OTHER_KEY_LOST_AFTER_SECONDS old: A's failing checks keep the old key marked, so B
        closes nothing, and once they get through A reads the batch and charges the job its bill
        (no key was marked for a batch found ended: B closed the job uncharged and the bill was
        never charged)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A"})
        fake.batch_results_errors["openai"] = SERVER_ERROR
        async with (
            _deployment(tmp_path, fake, "key-A") as owner,
            RouterClient(owner.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            await until(lambda: fake.batch_results_refused >= 2)
            await client.cancel_batch(job, tenant="acme")
        fake.batch_retrieve_errors["openai"] = SERVER_ERROR
        [batch] = fake.batches
        sent_earlier(tmp_path / "batches.db", OTHER_KEY_LOST_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-A2") as rotated:
                async with _deployment(tmp_path, fake, "key-B"):
                    await until(lambda: batch.refused >= 1)
                    await asyncio.sleep(1.5)  # B's rounds, past ENDPOINT_GONE_AFTER_SECONDS
                    assert [e for e in logs if e["event"] == "batch_lost"] == []
                    fake.batch_retrieve_errors.clear()
                    fake.batch_results_errors.clear()
                    await until(lambda: any(e["event"] == "batch_cancelled_job_billed" for e in logs), cap=5.0)
                charged = list(rotated.router.ledger.entries())
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            [(state, pending, cost)] = store.execute("SELECT state, provider_pending, cost_usd FROM jobs").fetchall()
        assert (state, pending) == ("cancelled", None)
        assert cost is not None
        assert Decimal(cost) > 0
        assert len(charged) == 1

    async def test_a_batch_read_with_a_rotated_key_since_its_key_was_taken_as_gone_is_not_failed(
        self, tmp_path: Path
    ) -> None:
        """A process takes a batch's key as gone (its mark unchanged) and fails its jobs as lost;
        the owner's rotated key has read it in between (``adopt``: the batch is that key's now):
        the write fails nothing (it checked only that the old key's mark was unchanged)."""
        url = "http://fake/v1"
        store = BatchStore(tmp_path / "batches.db")
        try:
            job = BatchJob("batch_1", "acme", BatchState.QUEUED, "gpt-4o-mini", "openai", Decimal("0.01"), 0.0, 0.0)
            await store.add(job, "{}", held_by="me", hold_seconds=0)
            assert await store.claim(["batch_1"], "me", 60) == ["batch_1"]
            assert await store.mark_submitted(["batch_1"], "me", "openai", "batch_p", (url, "key1")) == 1
            await store.mark_keys([("openai", url, "key1")], 1.0)
            marks = await store.mark_keys([("openai", url, "keyB")], 1.0)
            mark = marks[("openai", url, "key1")]
            assert mark is not None
            await store.adopt("openai", "batch_p", "key2")
            gone = GoneMark("openai", url, *mark, key_id="key1")
            failed = await store.finish("batch_1", BatchState.FAILED, error="provider_batch_not_found", gone=gone)
            never_marked = GoneMark("openai", url, None, 0.0, key_id="key1")
            failed_unmarked = await store.finish(
                "batch_1", BatchState.FAILED, error="provider_batch_not_found", gone=never_marked
            )
            state = await store.get_any("batch_1")
        finally:
            await store.aclose()
        assert (failed, failed_unmarked) == (False, False)
        assert state is not None
        assert state.job.state is BatchState.SUBMITTED


def _created_with(fake: FakeProvider) -> list[str]:
    """The key each provider batch was created with, in order."""
    return [batch.headers.get("authorization", "").removeprefix("Bearer ") for batch in fake.batches]


async def queued_while_refused(tmp_path: Path, fake: FakeProvider, key: str) -> str:
    """A job queued through a deployment with ``key`` whose batch creates the provider refuses
    (401: it takes only another key), left QUEUED as that deployment stops (its claim lapsed, if
    it was stopped sending it again)."""
    fake.api_key = "key-of-nobody"
    async with (
        Server(settings_from(_account(tmp_path, fake, key)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        with capture_logs() as logs:
            job = (await submit(client))[1].batch.batch_id
            await until(lambda: any(e["event"] == "batch_submit_failed" for e in logs))
    fake.api_key = None
    lapse(tmp_path / "batches.db")
    return job


class TestBatchJobsQueuedUnderAnAccountsKey:
    """Two deployments (two accounts' keys) at one base URL sharing one store: a queued job is
    sent only with the key of the deployment it was queued through, or, once no process has
    marked that key for ENDPOINT_GONE_AFTER_SECONDS, the key of a process at its URL."""

    async def test_jobs_queued_through_one_account_are_sent_only_with_its_key(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Jobs submitted only to A's deployment are all sent with A's key and charged in A's
        ledger (B's queue claimed some of them and sent them with B's key: A's tenants' prompts
        went to B's provider account, which paid, and B's ledger charged them)."""
        fake.batches_per_key = True
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A")), port=0) as owner,
            RouterClient(owner.target) as client,
            Server(settings_from(_account(tmp_path, fake, "key-B")), port=0) as other,
        ):
            jobs = [(await submit(client))[1].batch.batch_id for _ in range(8)]
            for job in jobs:
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
            charged = sorted(e.request_id for e in owner.router.ledger.entries())
            others = list(other.router.ledger.entries())
        assert set(_created_with(fake)) == {"key-A"}
        assert charged == sorted(jobs)
        assert others == []

    async def test_jobs_queued_under_a_key_no_process_marks_are_sent_with_the_key_in_use_at_the_url(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job queued through key-A, never sent, whose process stopped (a restart with the
        account's rotated key-A2): once no process has marked key-A for
        ENDPOINT_GONE_AFTER_SECONDS (0.3 s here), the process with key-A2 queues it under its key
        and sends it."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        job = await queued_while_refused(tmp_path, fake, "key-A")
        with capture_logs() as logs:
            async with (
                Server(settings_from(_account(tmp_path, fake, "key-A2")), port=0) as rotated,
                RouterClient(rotated.target) as client,
            ):
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in rotated.router.ledger.entries()]
        assert _created_with(fake) == ["key-A2"]
        assert charged == [job]
        assert [(e["jobs"], e["reason"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(1, "key_changed")]

    async def test_a_rotated_key_that_reads_a_batch_of_the_old_key_takes_its_queued_jobs_at_once(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch sent with key-A1 is pending and another job is queued under key-A1 (its create
        refused); the process restarts with the account's key-A2, which reads the batch
        (``adopt``: the same account's): the queued job is queued under key-A2 at once and sent,
        without waiting ENDPOINT_GONE_AFTER_SECONDS for key-A1 to be taken as gone."""
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A1": "A", "key-A2": "A"})
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A1")), port=0) as owner,
            RouterClient(owner.target) as client,
        ):
            first = (await submit(client))[1].batch.batch_id
            await wait_state(client, first, pb.BATCH_STATE_SUBMITTED)
        queued = await queued_while_refused(tmp_path, fake, "key-A1")
        fake.batch_outcome = BatchOutcome.COMPLETE
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A2")), port=0) as rotated,
            RouterClient(rotated.target) as client,
        ):
            await wait_state(client, first, pb.BATCH_STATE_SUCCEEDED)
            await wait_state(client, queued, pb.BATCH_STATE_SUCCEEDED)
        assert _created_with(fake) == ["key-A1", "key-A2"]

    async def test_a_job_queued_before_queued_jobs_kept_their_key_is_sent_by_any_process_at_its_url(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A queued row without a key (queued by an earlier release) is sent, as before, by a
        process at its base URL whatever its key."""
        job = await queued_while_refused(tmp_path, fake, "key-A")
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            store.execute("UPDATE jobs SET key_id = NULL")
            store.commit()
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-B")), port=0) as other,
            RouterClient(other.target) as client,
        ):
            await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
        assert _created_with(fake) == ["key-B"]

    async def test_the_batches_a_process_remembers_are_forgotten_once_read_by_any_process(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two workers of account A and a process of account B share the store; A's three
        batches (one of them with its job cancelled) are polled by all three and read: then none
        of them remembers any (``_unpollable``: B kept every batch of A it had skipped, and a
        worker kept those it had seen accepted or asked to cancel that the other worker read, for
        the process's life)."""
        fake.batches_per_key = True
        fake.batch_outcome = BatchOutcome.PENDING
        path = tmp_path / "batches.db"

        def still_to_read() -> int:
            with contextlib.closing(sqlite3.connect(path)) as store:
                [(count,)] = store.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state = 'submitted' OR provider_pending IS NOT NULL"
                ).fetchall()
            return int(count)

        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A")), port=0) as owner,
            Server(settings_from(_account(tmp_path, fake, "key-A")), port=0) as sibling,
            RouterClient(owner.target) as client,
            Server(settings_from(_account(tmp_path, fake, "key-B")), port=0) as other,
        ):
            with capture_logs() as logs:
                jobs = []
                for _ in range(3):
                    jobs.append((await submit(client))[1].batch.batch_id)
                    await wait_state(client, jobs[-1], pb.BATCH_STATE_SUBMITTED)
                await client.cancel_batch(jobs[0], tenant="acme")
                await until(lambda: sum(e["event"] == "batch_poll_skipped" for e in logs) >= 3)
            fake.batch_outcome = BatchOutcome.COMPLETE
            for job in jobs[1:]:
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
            await until(lambda: still_to_read() == 0)
            await asyncio.sleep(0.3)  # rounds of each process since
            remembered = [
                (len(queue._unpollable), len(queue._accepted), len(queue._cancel_asked))
                for queue in (owner.batches, sibling.batches, other.batches)
            ]
        assert remembered == [(0, 0, 0)] * 3

    async def test_a_cancel_does_not_move_when_a_batch_counts_as_sent(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch sent with key-A1 more than ABANDON_AFTER_SECONDS ago is lost by the provider;
        A, restarted with the account's key-A2 whose checks fail (a 5xx), cancels its one job:
        the batch still counts as sent three days ago, so A2 does not mark the old key and B,
        which gets 404, closes the job uncharged once the old key is unmarked for
        ENDPOINT_GONE_AFTER_SECONDS (0.3 s here), as for a job still waiting (the cancel moved
        the batch's send time to the cancel: the old key stayed marked and the job tied to the
        batch, its estimate held, for three days more)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A1": "A", "key-A2": "A"})
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A1")), port=0) as owner,
            RouterClient(owner.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
        fake.batch_retrieve_errors["openai"] = (500, {"error": {"type": "server_error", "message": "x"}}, {})
        sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
        with capture_logs() as logs:
            async with (
                Server(settings_from(_account(tmp_path, fake, "key-A2")), port=0) as owner,
                RouterClient(owner.target) as client,
                Server(settings_from(_account(tmp_path, fake, "key-B")), port=0),
            ):
                await client.cancel_batch(job, tenant="acme")
                await until(lambda: any(e["event"] == "batch_lost" for e in logs), cap=6.0)
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            [(state, pending)] = store.execute("SELECT state, provider_pending FROM jobs").fetchall()
        assert (state, pending) == ("cancelled", None)
        assert [(e["jobs"], e["cancelled_jobs"]) for e in logs if e["event"] == "batch_lost"] == [(0, 1)]

    @pytest.mark.parametrize("status", [400, 409, 422])
    async def test_another_accounts_rejection_other_than_404_leaves_a_live_owners_batch_alone(
        self, tmp_path: Path, fake: FakeProvider, status: int
    ) -> None:
        """The provider (a gateway) answers another account's key for A's pending batch with a
        400/409/422, not 404: B leaves it alone as another account's (``other_key``), as for a 404,
        and A reads it once it completes and charges it once (B failed A's live batch at its first
        poll, FAILED provider_batch_rejected, uncharged, though the provider ran and billed it)."""
        fake.batches_per_key = True
        fake.batches_other_account_status = status
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(_account(tmp_path, fake, "key-A")), port=0) as owner,
            RouterClient(owner.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            with capture_logs() as logs:
                async with Server(settings_from(_account(tmp_path, fake, "key-B")), port=0) as other:
                    await until(lambda: any(e["event"] in ("batch_poll_skipped", "batch_lost") for e in logs))
                    await asyncio.sleep(0.3)  # rounds more
                    waiting = await get_batch(client, job)
                    assert (waiting.job.state, waiting.error) == (pb.BATCH_STATE_SUBMITTED, "")
                    fake.batch_outcome = BatchOutcome.COMPLETE
                    await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                    others = list(other.router.ledger.entries())
            charged = [e.request_id for e in owner.router.ledger.entries()]
        assert [e["reason"] for e in logs if e["event"] == "batch_poll_skipped"] == ["other_key"]
        assert charged == [job]
        assert others == []
        assert [e for e in logs if e["event"] == "batch_lost"] == []

    async def test_a_job_queued_under_a_key_a_reload_rotated_is_sent_with_the_new_key(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A job queued under key-A (its create refused: the provider takes only key-A2 now),
        no batch of key-A pending; a reload rotates the key to key-A2 and no other process marks
        key-A: the job is queued under key-A2 at the next round and sent with it."""
        fake.api_key = "key-A2"
        key_file = tmp_path / "a.key"
        key_file.write_text("key-A\n")
        config = _keyed_by_file(tmp_path, fake, key_file)
        async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as client:
            with capture_logs() as logs:
                job = (await submit(client))[1].batch.batch_id
                await until(lambda: any(e["event"] == "batch_submit_failed" for e in logs))
                key_file.write_text("key-A2\n")
                await owner.reload(settings_from(config))
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
        assert _created_with(fake) == ["key-A2"]
        assert [(e["jobs"], e["reason"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(1, "key_changed")]

    async def test_a_reload_that_reverts_a_key_leaves_the_jobs_of_the_process_that_uses_that_key_to_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A's key file briefly held key-B, another account's key at the same URL (a wrong secret
        mounted, then fixed: key-A, key-B, key-A by two reloads). Jobs then submitted only to B's
        deployment, which marks key-B, are all sent with key-B and charged in B's ledger (A kept
        key-B as a key it rotated away from, queued B's jobs under key-A every round and sent
        them with it, charging them in A's ledger, for as long as A ran)."""
        fake.batches_per_key = True
        key_file = tmp_path / "a.key"
        key_file.write_text("key-A\n")
        config = _keyed_by_file(tmp_path, fake, key_file)
        async with Server(settings_from(config), port=0) as owner:
            for key in ("key-B", "key-A"):
                key_file.write_text(key + "\n")
                await owner.reload(settings_from(config))
                await asyncio.sleep(0.3)  # rounds and marks with it
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                jobs = [(await submit(client))[1].batch.batch_id for _ in range(4)]
                for job in jobs:
                    await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = sorted(e.request_id for e in other.router.ledger.entries())
            taken = list(owner.router.ledger.entries())
        assert set(_created_with(fake)) == {"key-B"}
        assert charged == sorted(jobs)
        assert taken == []

    async def test_a_reverted_key_marked_during_a_provider_hiccup_leaves_the_jobs_of_the_process_that_uses_it_to_it(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A's key file briefly held key-B (another account's key at the same URL), then key-A
        again; B's deployment sends with key-B, and while the provider leaves status checks
        unanswered (cut off after ``POLL_SECONDS``, 0.3 s here) A marks key-B for B's batch it
        cannot tell about. Jobs queued through B meanwhile (its creates failing) are all sent with
        key-B and charged in B's ledger (A took its marks of key-B made for B's batch for its own,
        and whenever one landed after B's, queued B's jobs under key-A and sent them with it)."""
        monkeypatch.setattr(batch_queue, "POLL_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_outcome = BatchOutcome.PENDING
        key_file = tmp_path / "a.key"
        key_file.write_text("key-A\n")
        config = _keyed_by_file(tmp_path, fake, key_file)
        async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as own_client:
            own = (await submit(own_client))[1].batch.batch_id
            await wait_state(own_client, own, pb.BATCH_STATE_SUBMITTED)
            for key in ("key-B", "key-A"):
                key_file.write_text(key + "\n")
                await owner.reload(settings_from(config))
                await asyncio.sleep(0.3)  # rounds and marks with it
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                fake.batch_retrieve_hold = asyncio.Event()  # status checks unanswered
                first = (await submit(client))[1].batch.batch_id
                await wait_state(client, first, pb.BATCH_STATE_SUBMITTED)
                fake.batch_create_error = (500, {"error": {"message": "down", "type": "server_error"}})
                jobs = [first, *[(await submit(client))[1].batch.batch_id for _ in range(2)]]
                await asyncio.sleep(3)  # A's rounds while its checks of B's batch are cut off
                fake.batch_create_error = None
                fake.batch_retrieve_hold.set()
                fake.batch_outcome = BatchOutcome.COMPLETE
                for job in jobs:
                    await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = sorted(e.request_id for e in other.router.ledger.entries())
            taken = [e.request_id for e in owner.router.ledger.entries()]
        assert _created_with(fake) == ["key-A", "key-B", "key-B"]
        assert charged == sorted(jobs)
        assert taken == [own]

    async def test_a_reverted_key_leaves_a_lost_send_of_the_live_process_that_uses_it_to_that_process(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A's key file briefly held key-B (another account's key at the same URL), then key-A
        again. B's deployment stops mid-send (the provider made the batch with key-B, its reply
        never came) and the job is cancelled through A: A leaves the send's tag, and B, back,
        finds the batch and cancels it (A looked the send up as its rotated key's, with key-A,
        found nothing and forgot the tag: B's batch ran and billed B, never cancelled nor read)."""
        fake.batches_per_key = True
        key_file = tmp_path / "a.key"
        key_file.write_text("key-A\n")
        config = _keyed_by_file(tmp_path, fake, key_file)
        async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as client:
            for key in ("key-B", "key-A"):
                key_file.write_text(key + "\n")
                await owner.reload(settings_from(config))
                await asyncio.sleep(0.3)  # rounds and marks with it
            job = await _reply_lost(tmp_path, fake, "key-B")
            [batch] = fake.batches
            await client.cancel_batch(job, tenant="acme")
            lapse(tmp_path / "batches.db")
            await asyncio.sleep(1.5)  # A's rounds
            with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
                [(state, tagged)] = store.execute("SELECT state, send_tag IS NOT NULL FROM jobs").fetchall()
            assert (state, tagged) == ("cancelled", 1)
            async with _deployment(tmp_path, fake, "key-B"):
                await until(lambda: batch.cancelled)

    async def test_another_account_leaves_a_lost_send_of_a_live_key_to_be_looked_up_with_that_key(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A's deployment stops mid-send (the provider made the batch with key-A, its reply never
        came) and the job is cancelled through B's (another account, whose key neither lists nor
        reads A's batches): B does not look the send up, and A, back with key-A, finds the batch
        and cancels it (B looked it up with its key, found nothing and forgot the tag: A's batch
        ran and billed A, never cancelled nor read)."""
        fake.batches_per_key = True
        job = await _reply_lost(tmp_path, fake, "key-A")
        [batch] = fake.batches
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                await client.cancel_batch(job, tenant="acme")
                lapse(tmp_path / "batches.db")
                await asyncio.sleep(1.5)  # B's rounds
            with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
                [(state, tagged)] = store.execute("SELECT state, send_tag IS NOT NULL FROM jobs").fetchall()
            async with _deployment(tmp_path, fake, "key-A"):
                await until(lambda: batch.cancelled)
        assert (state, tagged) == ("cancelled", 1)
        assert [e["event"] for e in logs if e["event"] == "batch_send_adopted"] == ["batch_send_adopted"]

    async def test_a_job_whose_send_reply_was_lost_under_a_gone_key_is_failed_not_sent_with_another(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A's deployment stops mid-send: the provider made the batch with key-A, its reply never
        came, the job is QUEUED with its send's tag. Once key-A is taken as gone (0.3 s here), B
        (another account, whose key neither lists nor reads A's batches) ends the job FAILED
        ``provider_changed`` and sends nothing (it queued the job under key-B, whose send found
        no batch of the tag and sent it again: two batches of one job, both accounts billed)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        job = await _reply_lost(tmp_path, fake, "key-A")
        lapse(tmp_path / "batches.db")
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                failed = await wait_state(client, job, pb.BATCH_STATE_FAILED)
                await asyncio.sleep(0.5)  # rounds more
        assert failed.error == "provider_changed"
        assert _created_with(fake) == ["key-A"]
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(0, 1)]

    async def test_an_anthropic_job_whose_send_reply_was_lost_is_not_taken_for_another_accounts_batch_of_its_shape(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The lost reply on Anthropic, whose batches carry no tag (found by their shape), and
        another client of account B's workspace makes a one-request batch meanwhile: once key-A is
        taken as gone (0.3 s here), key-B finds that batch by its shape and the job, moved to
        key-B, is adopted into it; its results name none of the job, so the adoption is undone and
        the job ends FAILED ``provider_changed``, in A's batch alone, the other client's batch
        left alone (the job, disowned, was queued again and sent with key-B, two accounts
        billed)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-B": "B"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        lapse(tmp_path / "batches.db")
        another = await create_foreign_batch(fake, "key-B")
        fake.batch_outcome = BatchOutcome.COMPLETE
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                failed = await wait_state(client, job, pb.BATCH_STATE_FAILED)
                await asyncio.sleep(0.5)  # rounds more
        assert failed.error == "provider_changed"
        assert len([batch for batch in fake.batches if job in batch.custom_ids]) == 1
        assert _created_with(fake) == ["key-A", "key-B"]  # A's send, the other client's batch
        assert (another.cancelled, another.deleted) == (False, False)
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_adoption_undone"] == [(0, 1)]

    async def test_an_anthropic_job_moved_for_a_batch_of_its_shape_gone_before_its_send_is_not_sent_again(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same, the other client reading its ended batch and deleting it (as users of
        Anthropic's SDK do) after key-B's lookup of the lost send found it and moved the job to
        key-B, before the send's own lookup, which then finds none: the job ends FAILED
        ``provider_changed``, in A's batch alone, the other client's batch never adopted (it
        stayed in its send and was created again with key-B: two provider batches of one job,
        A's billed and never read, B's charged)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-B": "B"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        lapse(tmp_path / "batches.db")
        fake.batch_outcome = BatchOutcome.COMPLETE
        another = await create_foreign_batch(fake, "key-B")
        fake.batch_list_hold = asyncio.Event()
        fake.batch_lists_unheld = 1  # the lost send's lookup, which moves the job; its send's waits
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                async with asyncio.timeout(10):
                    await fake.batch_list_waiting.wait()
                sdk = anthropic.AsyncAnthropic(api_key="key-B", base_url=fake.anthropic_base_url)
                try:
                    ended = await sdk.messages.batches.retrieve(another.id)
                    await sdk.messages.batches.delete(another.id)
                finally:
                    await sdk.close()
                fake.batch_list_hold.set()
                failed = await wait_ended(client, job)
                await asyncio.sleep(0.5)  # rounds more
                charged = list(other.router.ledger.entries())
        assert ended.processing_status == "ended"
        assert (pb.BatchState.Name(failed.job.state), failed.error) == ("BATCH_STATE_FAILED", "provider_changed")
        assert _created_with(fake) == ["key-A", "key-B"]  # A's send, the other client's batch
        assert len([batch for batch in fake.batches if job in batch.custom_ids]) == 1
        assert charged == []
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(1, 0), (0, 1)]
        assert [e for e in logs if e["event"] in ("batch_send_adopted", "batch_submitted")] == []

    async def test_two_anthropic_jobs_moved_for_one_batch_of_their_shape_are_neither_sent_again(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two lost sends of one request each under key-A, by two processes at once (their
        windows overlap), and one one-request batch of another client of account B: key-B's
        lookups of both sends find that batch, so both jobs are moved to key-B; the first send
        adopts it, the second's own lookup then finds none (it is the first's): that job ends
        FAILED ``provider_changed`` (it was created again with key-B), and the first, once the
        batch's results name none of it, too. Nothing is sent with key-B."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-B": "B"})
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_create_reply_hold = asyncio.Event()  # the batches are made, their replies never come
        jobs = []
        async with (
            _deployment(tmp_path, fake, "key-A") as first,
            RouterClient(first.target) as first_client,
        ):
            jobs.append((await submit(first_client, task_hint="creative_writing"))[1].batch.batch_id)
            await until(lambda: len(fake.batches) == 1)
            async with (
                _deployment(tmp_path, fake, "key-A") as second,
                RouterClient(second.target) as second_client,
            ):
                jobs.append((await submit(second_client, task_hint="creative_writing"))[1].batch.batch_id)
                await until(lambda: len(fake.batches) == 2)
        fake.batch_create_reply_hold.set()
        lapse(tmp_path / "batches.db")
        another = await create_foreign_batch(fake, "key-B")
        fake.batch_outcome = BatchOutcome.COMPLETE
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                ended = [await wait_ended(client, job) for job in jobs]
                await asyncio.sleep(0.5)  # rounds more
                charged = list(other.router.ledger.entries())
        assert [(pb.BatchState.Name(e.job.state), e.error) for e in ended] == [
            ("BATCH_STATE_FAILED", "provider_changed")
        ] * 2
        assert _created_with(fake) == ["key-A", "key-A", "key-B"]  # A's two sends, the other client's batch
        assert charged == []
        assert (another.cancelled, another.deleted) == (False, False)
        assert [e for e in logs if e["event"] == "batch_submitted"] == []

    async def test_an_anthropic_job_moved_to_another_accounts_key_is_not_sent_again_when_undone_after_a_restart(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same, B's process stopped while the other client's batch, adopted for the job, is
        still running, and started again once it has ended: the job still ends FAILED
        ``provider_changed`` when the adoption is undone, sent by no one again (what its move
        left in the store is kept across the restart)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-B": "B"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        lapse(tmp_path / "batches.db")
        another = await create_foreign_batch(fake, "key-B")
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            fake.batch_outcome = BatchOutcome.COMPLETE
            async with _deployment(tmp_path, fake, "key-B") as other, RouterClient(other.target) as client:
                failed = await wait_state(client, job, pb.BATCH_STATE_FAILED)
                await asyncio.sleep(0.5)  # rounds more
        assert failed.error == "provider_changed"
        assert _created_with(fake) == ["key-A", "key-B"]
        assert (another.cancelled, another.deleted) == (False, False)
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_adoption_undone"] == [(0, 1)]

    async def test_a_job_whose_send_reply_was_lost_under_a_gone_key_follows_its_batch_with_the_same_accounts_key(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same lost reply, and the process restarted with the same account's rotated key-A2:
        once key-A is taken as gone (0.3 s here), key-A2 finds the send's batch, so the job is
        queued under key-A2 and its send adopts that batch: SUCCEEDED, charged once, nothing sent
        again nor cancelled (it ended FAILED ``provider_changed``, and the lookup of its send then
        found the batch, tied nothing to it and cancelled it: what it billed never charged)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A"})
        job = await _reply_lost(tmp_path, fake, "key-A")
        lapse(tmp_path / "batches.db")
        fake.batch_outcome = BatchOutcome.COMPLETE
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-A2") as rotated, RouterClient(rotated.target) as client:
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in rotated.router.ledger.entries()]
        assert _created_with(fake) == ["key-A"]
        assert [batch.cancelled for batch in fake.batches] == [False]
        assert charged == [job]
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(1, 0)]
        assert [e["event"] for e in logs if e["event"] in ("batch_send_adopted", "batch_send_untied")] == [
            "batch_send_adopted"
        ]

    async def test_an_anthropic_job_whose_send_reply_was_lost_under_a_gone_key_follows_its_batch_with_a_rotated_key(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same restart with the same account's rotated key-A2 on Anthropic, whose batches
        carry no tag: key-A2 finds the send's batch by its shape, so the job is queued under
        key-A2 and its send adopts that batch: SUCCEEDED, the batch read and deleted, its bill
        charged once, nothing sent again (it ended FAILED ``provider_changed``, and its batch,
        found by the lookup of its send, tied to nothing and not cancelled, being unverified, ran
        billed, never read nor charged)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        [batch] = fake.batches
        lapse(tmp_path / "batches.db")
        fake.batch_outcome = BatchOutcome.COMPLETE
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, "key-A2") as rotated, RouterClient(rotated.target) as client:
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: batch.deleted)
                charged = [e.request_id for e in rotated.router.ledger.entries()]
        assert _created_with(fake) == ["key-A"]
        assert not batch.cancelled
        assert charged == [job]
        assert [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_jobs_moved"] == [(1, 0)]
        adopted = [e for e in logs if e["event"] in ("batch_send_adopted", "batch_send_untied")]
        assert [(e["event"], e.get("verified")) for e in adopted] == [("batch_send_adopted", False)]

    @pytest.mark.parametrize("restart_key", ["key-A2", "key-A"], ids=["rotated key", "same key"])
    async def test_another_accounts_404_for_an_anthropic_batch_adopted_by_its_shape_leaves_it_alone(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, restart_key: str
    ) -> None:
        """A's lost Anthropic send, its job adopted by its shape into its own batch after a
        restart (with the same account's rotated key-A2: moved, or with key-A itself), while
        account C's deployment shares the URL and the store: C's key gets 404 for that batch (it
        sees none of A's) and leaves it alone, as any other key's batch; A reads it: SUCCEEDED,
        charged once, the batch deleted, nothing sent again (C's 404 undid the adoption: the
        rotated key's job ended FAILED ``provider_changed``, its batch billed, never read; the
        same key's was queued again and sent a second time)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A", "key-C": "C"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        [batch] = fake.batches
        lapse(tmp_path / "batches.db")
        with capture_logs() as logs:
            async with _deployment(tmp_path, fake, restart_key) as owner, RouterClient(owner.target) as client:
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                async with _deployment(tmp_path, fake, "key-C") as other:
                    # C's poll of the batch (C's key gets 404 for it): left alone, or undone.
                    seen = ("batch_poll_skipped", "batch_adoption_undone")
                    await until(lambda: any(e["event"] in seen and e["provider_batch_id"] == batch.id for e in logs))
                    await asyncio.sleep(0.5)  # rounds more of both
                    fake.batch_outcome = BatchOutcome.COMPLETE
                    ended = await wait_ended(client, job)
                    # Its batch read and deleted (or, sent again, the other one).
                    await until(
                        lambda: any(b.deleted for b in fake.batches) or ended.job.state != pb.BATCH_STATE_SUCCEEDED
                    )
                    others = list(other.router.ledger.entries())
                charged = [e.request_id for e in owner.router.ledger.entries()]
        assert (pb.BatchState.Name(ended.job.state), ended.error) == ("BATCH_STATE_SUCCEEDED", "")
        assert _created_with(fake) == ["key-A"]
        assert batch.deleted
        assert not batch.cancelled
        assert (charged, others) == ([job], [])
        assert [e for e in logs if e["event"] == "batch_adoption_undone"] == []

    @pytest.mark.parametrize("rotated_by", ["restart", "reload"])
    async def test_a_rotated_keys_404_for_a_batch_adopted_by_its_shape_undoes_it_once_the_adopting_key_is_gone(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, rotated_by: str
    ) -> None:
        """key-A's lost Anthropic send (its create answered 500) adopts by its shape another
        client's batch made in its window; that client reads and deletes it, and the deployment
        goes on with the same account's rotated key-A2 (restarted with it while down, or by a hot
        reload), whose poll gets 404: once key-A is taken as gone (unmarked for 0.3 s here, or
        rotated away from by this process), that 404 undoes the adoption, the foreign batch
        neither cancelled nor deleted by us (key-A2's 404 was another key's, left alone; no 404
        to key-A could come, and the job waited SUBMITTED two days, then ended FAILED
        ``provider_batch_not_found``). Unmarked that long, key-A is taken for key-A2's
        predecessor: the job, never sent, is queued under key-A2 and sent once, SUCCEEDED,
        charged once. Rotated by this process's reload, key-A2 may be another account's, blind
        to a batch that may be the job's own (the create's 500 may have made it): the job ends
        FAILED ``provider_changed`` at once, never sent again
        (``test_a_reload_to_another_accounts_key_never_sends_a_job_adopted_into_its_own_batch_again``)."""
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "A"})
        fake.batch_outcome = BatchOutcome.PENDING
        hold = asyncio.Event()
        fake.batch_create_hold = hold
        config = _account(tmp_path, fake, "key-A")
        with capture_logs() as logs:
            async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as client:
                job = (await submit(client, task_hint="creative_writing"))[1].batch.batch_id
                async with asyncio.timeout(10):
                    await fake.batch_create_waiting.wait()
                fake.batch_create_hold = None
                theirs = await create_foreign_batch(fake, "key-A")
                fake.batch_create_error = (500, {"type": "error", "error": {"type": "api_error", "message": "down"}})
                hold.set()
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                fake.batch_create_error = None
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                theirs.lost = True  # its owner read and deleted it
                fake.batch_outcome = BatchOutcome.COMPLETE
                if rotated_by == "reload":
                    (tmp_path / "key-A.key").write_text("key-A2\n")
                    await owner.reload(settings_from(config))
                    ended = await wait_ended(client, job)
                    charged = [e.request_id for e in owner.router.ledger.entries()]
            if rotated_by == "restart":
                monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
                async with _deployment(tmp_path, fake, "key-A2") as rotated, RouterClient(rotated.target) as client:
                    ended = await wait_ended(client, job)
                    charged = [e.request_id for e in rotated.router.ledger.entries()]
        undone = [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_adoption_undone"]
        if rotated_by == "restart":
            assert (pb.BatchState.Name(ended.job.state), ended.error) == ("BATCH_STATE_SUCCEEDED", "")
            assert (_created_with(fake), charged, undone) == (["key-A", "key-A2"], [job], [(1, 0)])
        else:
            assert (pb.BatchState.Name(ended.job.state), ended.error) == ("BATCH_STATE_FAILED", "provider_changed")
            assert (_created_with(fake), charged, undone) == (["key-A"], [], [(0, 1)])
        assert (theirs.cancelled, theirs.deleted) == (False, False)
        assert [e for e in logs if e["event"] == "batch_lost"] == []

    async def test_a_reload_to_another_accounts_key_never_sends_a_job_adopted_into_its_own_batch_again(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """key-A's Anthropic send made the job's batch (account A), its reply lost; the restarted
        deployment's send adopts that batch by its shape (unverified: its own, in fact). A hot
        reload rotates the deployment to key-A2, another account's (B), whose poll gets 404 for
        it: the job ends FAILED ``provider_changed``, never sent with key-A2. Taken for the same
        account's rotated key's, that 404 undid the adoption and the job was sent again with
        key-A2: SUCCEEDED from account B's batch while its own batch ran on in account A, never
        read nor cancelled, both billed."""
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "B"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        fake.batch_create_reply_hold = None
        lapse(tmp_path / "batches.db")
        config = _account(tmp_path, fake, "key-A")
        with capture_logs() as logs:
            async with Server(settings_from(config), port=0) as owner, RouterClient(owner.target) as client:
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                (tmp_path / "key-A.key").write_text("key-A2\n")
                await owner.reload(settings_from(config))
                fake.batch_outcome = BatchOutcome.COMPLETE
                ended = await wait_ended(client, job)
                await asyncio.sleep(0.3)  # rounds in which a job queued again would be sent
                charged = [e.request_id for e in owner.router.ledger.entries()]
        holding = [batch.headers.get("authorization") for batch in fake.batches if job in batch.custom_ids]
        undone = [(e["jobs"], e["failed_jobs"]) for e in logs if e["event"] == "batch_adoption_undone"]
        assert (pb.BatchState.Name(ended.job.state), ended.error) == ("BATCH_STATE_FAILED", "provider_changed")
        assert (_created_with(fake), holding, charged, undone) == (["key-A"], ["Bearer key-A"], [], [(0, 1)])

    async def test_a_rotated_keys_404_that_undoes_no_adoption_is_not_logged_as_undone(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Replica X rotates by reload from key-A to key-A2 (another account's) while replica Y,
        on the same store, still sends with key-A and marks it: X's key-A2 gets 404 for the batch
        adopted with key-A, whose jobs the store no longer lets X take (Y's mark). Nothing is
        undone, nothing is logged as undone, and the batch is left to key-A's process as another
        account's (``batch_poll_skipped`` ``other_key``); the job waits SUBMITTED. It was a
        WARNING ``batch_adoption_undone`` with jobs=0 failed_jobs=0 every poll round (57 in 3 s
        at a 0.05 s poll interval), and the other-key handling skipped."""
        fake.batches_per_key = True
        fake.batch_accounts.update({"key-A": "A", "key-A2": "B"})
        job = await _reply_lost(tmp_path, fake, "key-A", task_hint="creative_writing")
        fake.batch_create_reply_hold = None
        lapse(tmp_path / "batches.db")
        x_config = _account(tmp_path, fake, "key-A")
        y_key = tmp_path / "y-key-A.key"
        y_key.write_text("key-A\n")
        with capture_logs() as logs:
            async with Server(settings_from(x_config), port=0) as x, RouterClient(x.target) as client:
                await until(lambda: any(e["event"] == "batch_send_adopted" for e in logs))
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                async with Server(settings_from(_keyed_by_file(tmp_path, fake, y_key)), port=0):
                    await asyncio.sleep(0.5)  # Y marks key-A after X's last mark of it
                    (tmp_path / "key-A.key").write_text("key-A2\n")
                    await x.reload(settings_from(x_config))
                    await asyncio.sleep(1.5)
                    state = await get_batch(client, job)
        skipped = {e["reason"] for e in logs if e["event"] == "batch_poll_skipped"}
        assert pb.BatchState.Name(state.job.state) == "BATCH_STATE_SUBMITTED"
        assert [e for e in logs if e["event"] == "batch_adoption_undone"] == []
        assert "other_key" in skipped
        assert _created_with(fake) == ["key-A"]


async def sent(client: RouterClient, batch_id: str) -> None:
    """Wait until the job has left the queue (sent, or ended)."""
    async with asyncio.timeout(15):
        while (await get_batch(client, batch_id)).job.state == pb.BATCH_STATE_QUEUED:  # noqa: ASYNC110 - the job is polled through GetBatch
            await asyncio.sleep(0.05)


def sent_jobs(fake: FakeProvider) -> list[str]:
    """The job ids of every request sent to ``fake`` in a batch."""
    return sorted(request["custom_id"] for batch in fake.batches for request in batch.requests)


class TestBatchStoreSharedAcrossEndpoints:
    """Processes on one store file whose provider of one name is another endpoint (a test run
    against the fake beside a server on the real provider): each handles only its own jobs."""

    async def test_each_servers_jobs_go_to_its_own_provider_and_neither_fails_the_others(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two servers, each with its own fake provider, share the store: each one's job is sent
        to its own provider only, the other server leaves that provider batch alone (logged
        once, not polled at its own provider, which would answer 404 and fail it), and both
        jobs succeed (a job was FAILED provider_batch_not_found by the other server)."""
        async with FakeProvider() as other:
            for provider in (fake, other):
                provider.batch_outcome = BatchOutcome.PENDING
            config = batch_config(tmp_path)
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as first,
                Server(settings_from(config, live_environ(other)), port=0) as second,
                RouterClient(first.target) as first_client,
                RouterClient(second.target) as second_client,
            ):
                with capture_logs() as logs:
                    first_job = (await submit(first_client))[1].batch.batch_id
                    second_job = (await submit(second_client))[1].batch.batch_id
                    await sent(first_client, first_job)
                    await sent(second_client, second_job)

                    def skipped() -> list[str]:
                        return [e["reason"] for e in logs if e["event"] == "batch_poll_skipped"]

                    await until(lambda: len(skipped()) >= 2 or any(e["event"] == "batch_lost" for e in logs))
                    # Read before the batches may complete (a poll right after would end them).
                    ends = [
                        (await get_batch(first_client, first_job)).job.state,
                        (await get_batch(second_client, second_job)).job.state,
                    ]
                    for provider in (fake, other):
                        provider.batch_outcome = BatchOutcome.COMPLETE
                    if pb.BATCH_STATE_FAILED not in ends:
                        await wait_state(first_client, first_job, pb.BATCH_STATE_SUCCEEDED)
                        await wait_state(second_client, second_job, pb.BATCH_STATE_SUCCEEDED)
                        await until(lambda: discarded(fake) and discarded(other))
                charged = {s is first: [e.request_id for e in s.router.ledger.entries()] for s in (first, second)}
        assert ends == [pb.BATCH_STATE_SUBMITTED] * 2
        assert skipped() == ["other_endpoint", "other_endpoint"]
        assert not any(e["event"] == "batch_lost" for e in logs)
        assert ([first_job], [second_job]) == (sent_jobs(fake), sent_jobs(other))
        assert {True: [first_job], False: [second_job]} == charged

    async def test_a_reload_while_a_batch_is_sent_records_where_it_was_sent(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The provider's base URL changes by hot reload while a group is being sent (the create
        held): the batch went to the old URL, and that is the endpoint recorded, so the old one
        keeps being polled (the new one was recorded: polled there, found missing, and the job
        FAILED provider_batch_not_found while the old endpoint ran and billed it)."""

        def pointed_at(provider: FakeProvider) -> dict[str, Any]:
            key = tmp_path / "key"
            key.write_text("sk-test\n", encoding="utf-8")
            config = batch_config(tmp_path)
            for name, base_url in (("openai", provider.openai_base_url), ("anthropic", provider.anthropic_base_url)):
                config["providers"][name] = {"kind": name, "api_key_file": str(key), "base_url": base_url}
            return config

        async with FakeProvider() as new:
            fake.batch_outcome = BatchOutcome.PENDING
            fake.batch_create_hold = asyncio.Event()
            async with (
                Server(settings_from(pointed_at(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch.batch_id
                async with asyncio.timeout(10):
                    await fake.batch_create_waiting.wait()  # uploaded; the create waits
                await server.reload(settings_from(pointed_at(new)))
                fake.batch_create_hold.set()
                await sent(client, job)
                connection = sqlite3.connect(tmp_path / "batches.db")
                try:
                    [(endpoint,)] = connection.execute("SELECT endpoint FROM jobs").fetchall()
                finally:
                    connection.close()
                assert endpoint == fake.openai_base_url.rstrip("/")
                assert (await get_batch(client, job)).job.state == pb.BATCH_STATE_SUBMITTED
        assert new.batches == []

    async def test_a_job_cancelled_through_the_other_server_cancels_its_provider_batch(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The only job of a provider batch is cancelled through a server of another endpoint
        (same store, same tenant): the server that sent it cancels the batch at its provider, as
        a cancel through itself does (neither did: the provider ran and billed the batch whole)."""
        async with FakeProvider() as other:
            fake.batch_outcome = BatchOutcome.PENDING
            config = batch_config(tmp_path)
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as first,
                Server(settings_from(config, live_environ(other)), port=0) as second,
                RouterClient(first.target) as first_client,
                RouterClient(second.target) as second_client,
            ):
                job = (await submit(first_client))[1].batch.batch_id
                await sent(first_client, job)
                await second_client.cancel_batch(job, tenant="acme")
                await until(lambda: any(batch.cancelled for batch in fake.batches))
        assert other.batches == []

    async def test_a_job_sent_before_the_upgrade_is_still_polled(self, tmp_path: Path, fake: FakeProvider) -> None:
        """A store written before endpoints were recorded (no endpoint, key_id columns) is
        upgraded in place when opened; a job it holds in a provider batch, whose endpoint is
        not known, is polled as before and succeeds."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        path = tmp_path / "batches.db"
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            batch_id = (await submit(client))[1].batch.batch_id
            await wait_state(client, batch_id, pb.BATCH_STATE_SUBMITTED)
        connection = sqlite3.connect(path)
        connection.execute("ALTER TABLE jobs DROP COLUMN endpoint")
        connection.execute("ALTER TABLE jobs DROP COLUMN key_id")
        connection.close()
        fake.batch_outcome = BatchOutcome.COMPLETE
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            await wait_state(client, batch_id, pb.BATCH_STATE_SUCCEEDED)
        connection = sqlite3.connect(path)
        try:
            endpoints = connection.execute("SELECT endpoint, key_id FROM jobs").fetchall()
        finally:
            connection.close()
        assert endpoints == [(None, None)]


def pointed_at(tmp_path: Path, provider: FakeProvider) -> dict[str, Any]:
    """``batch_config`` with both providers' base URLs at ``provider`` (one key file)."""
    key = tmp_path / "key"
    key.write_text("sk-test\n", encoding="utf-8")
    config = batch_config(tmp_path)
    for name, base_url in (("openai", provider.openai_base_url), ("anthropic", provider.anthropic_base_url)):
        config["providers"][name] = {"kind": name, "api_key_file": str(key), "base_url": base_url}  # type: ignore[index]
    return config


RATE_LIMITED = (429, {"error": {"type": "rate_limit_error", "message": "slow down"}})


class TestBatchProviderMoved:
    """A provider's base URL changed (a reload, a restart) while jobs were queued for or sent to
    the old one: none is left waiting for ever."""

    async def test_after_a_reload_a_sent_batch_is_read_at_its_old_url_and_a_queued_job_goes_to_the_new(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A reload points the provider at a new URL: the batch sent to the old URL is still
        polled there (with the adapter that sent it), and its job succeeds and is charged once;
        a job queued then (its send refused 429) is sent to the new URL and succeeds (the sent
        job stayed SUBMITTED for ever, the queued one QUEUED until it expired)."""
        async with FakeProvider() as new:
            fake.batch_outcome = BatchOutcome.PENDING
            async with (
                Server(settings_from(pointed_at(tmp_path, fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                sent_job = (await submit(client))[1].batch.batch_id
                await wait_state(client, sent_job, pb.BATCH_STATE_SUBMITTED)
                fake.batch_create_error = RATE_LIMITED
                with capture_logs() as logs:
                    queued_job = (await submit(client))[1].batch.batch_id
                    await until(lambda: any(e["event"] == "batch_submit_failed" for e in logs))
                await server.reload(settings_from(pointed_at(tmp_path, new)))
                fake.batch_outcome = BatchOutcome.COMPLETE
                await wait_state(client, sent_job, pb.BATCH_STATE_SUCCEEDED)
                await wait_state(client, queued_job, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: discarded(fake))
                charged = sorted(e.request_id for e in server.router.ledger.entries())
        assert ([sent_job], [queued_job]) == (sent_jobs(fake), sent_jobs(new))
        assert sorted([sent_job, queued_job]) == charged

    async def test_after_a_restart_on_a_new_url_jobs_of_the_old_one_end_or_move_once_no_process_serves_it(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A restart points the provider at a new URL. While the old URL may still be another
        process's (its last mark not yet the same for ENDPOINT_GONE_AFTER_SECONDS of the new
        process's watch), its jobs are left alone; once no process has marked it that long (0.3 s
        here), the job sent there ends FAILED provider_changed, uncharged, and the job queued for
        it is sent to the new URL and succeeds (they stayed SUBMITTED for ever, and QUEUED until
        they expired)."""
        async with FakeProvider() as new:
            fake.batch_outcome = BatchOutcome.PENDING
            async with (
                Server(settings_from(pointed_at(tmp_path, fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                sent_job = (await submit(client))[1].batch.batch_id
                await wait_state(client, sent_job, pb.BATCH_STATE_SUBMITTED)
            unsent = pointed_at(tmp_path, fake)
            unsent["batch"]["group_window_seconds"] = 600  # queued, never sent before the stop
            async with Server(settings_from(unsent), port=0) as server, RouterClient(server.target) as client:
                queued_job = (await submit(client))[1].batch.batch_id
            settings = settings_from(pointed_at(tmp_path, new))
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                with capture_logs() as logs:
                    await until(lambda: any(e["event"] == "batch_poll_skipped" for e in logs))
                    await asyncio.sleep(0.3)  # some rounds
                    early = [(await get_batch(client, job)).job.state for job in (sent_job, queued_job)]
            monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 0.3)
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                failed = await wait_state(client, sent_job, pb.BATCH_STATE_FAILED)
                await wait_state(client, queued_job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in server.router.ledger.entries()]
        assert early == [pb.BATCH_STATE_SUBMITTED, pb.BATCH_STATE_QUEUED]
        assert failed.error == "provider_changed"
        assert ([sent_job], [queued_job]) == (sent_jobs(fake), sent_jobs(new))
        assert [queued_job] == charged

    async def test_a_live_process_at_another_url_is_not_taken_for_gone_when_the_clocks_step(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two live processes share the store, each at its own provider URL, and their wall
        clocks step an hour (a host suspended, an NTP step: each one's last mark then looks an
        hour old to the other); a URL is gone after 1 s unmarked here. Neither takes the other's
        URL for gone while the other marks it: both jobs succeed, each is charged once and both
        batches are deleted (the first to poll ended the other's job FAILED provider_changed,
        its batch never read, charged nor deleted)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 1.0)
        async with FakeProvider() as other:
            for provider in (fake, other):
                provider.batch_outcome = BatchOutcome.PENDING
            config = batch_config(tmp_path)
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as first,
                Server(settings_from(config, live_environ(other)), port=0) as second,
                RouterClient(first.target) as first_client,
                RouterClient(second.target) as second_client,
            ):
                first_job = (await submit(first_client))[1].batch.batch_id
                second_job = (await submit(second_client))[1].batch.batch_id
                await sent(first_client, first_job)
                await sent(second_client, second_job)
                await asyncio.sleep(0.2)
                with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
                    store.execute("UPDATE endpoints SET seen_at = seen_at - 3700")
                    store.commit()
                await asyncio.sleep(2.0)
                states = [(await get_batch(first_client, first_job)).job.state]
                states.append((await get_batch(second_client, second_job)).job.state)
                for provider in (fake, other):
                    provider.batch_outcome = BatchOutcome.COMPLETE
                await wait_state(first_client, first_job, pb.BATCH_STATE_SUCCEEDED)
                await wait_state(second_client, second_job, pb.BATCH_STATE_SUCCEEDED)
                await until(lambda: discarded(fake) and discarded(other))
                charged = sorted(e.request_id for s in (first, second) for e in s.router.ledger.entries())
        assert states == [pb.BATCH_STATE_SUBMITTED, pb.BATCH_STATE_SUBMITTED]
        assert sorted([first_job, second_job]) == charged

    async def test_a_live_process_that_polls_hourly_is_not_taken_for_gone(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process at another URL polls every hour (poll_interval_seconds 3600) and so marks
        its URL at most a minute apart; a URL is gone after 1 s unmarked here. Its job, sent and
        running, is not ended by the process beside it that polls every 0.05 s, which waits
        three of the other's mark intervals (was FAILED provider_changed once the hourly process's
        one mark was that old: its batch then ran on, billed and was never read)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 1.0)
        async with FakeProvider() as other:
            for provider in (fake, other):
                provider.batch_outcome = BatchOutcome.PENDING
            hourly = batch_config(tmp_path)
            hourly["batch"]["poll_interval_seconds"] = 3600  # type: ignore[index]
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as first,
                RouterClient(first.target) as first_client,
            ):
                await submit(first_client)  # the store file exists: the hourly process marks as it starts
                async with (
                    Server(settings_from(hourly, live_environ(other)), port=0) as second,
                    RouterClient(second.target) as second_client,
                ):
                    with capture_logs() as logs:
                        job = (await submit(second_client))[1].batch.batch_id
                        await sent(second_client, job)
                        await asyncio.sleep(2.0)
                        state = (await get_batch(second_client, job)).job.state
        assert state == pb.BATCH_STATE_SUBMITTED
        assert [e for e in logs if e["event"] == "batch_lost"] == []

    async def test_jobs_at_a_url_no_process_of_this_release_marked_are_left_to_it(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job sent to a URL that no process that marks its URLs has marked (a process of an
        earlier release serves it: it never writes marks) is never taken as gone, however long a
        process at another URL watches it (1 s is gone here): it stays SUBMITTED, and a process
        at its URL reads it and charges it once (it ended FAILED provider_changed an hour after
        the other process first saw it, while the earlier release went on running its batch)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 1.0)
        path = tmp_path / "batches.db"
        async with FakeProvider() as new:
            fake.batch_outcome = BatchOutcome.PENDING
            async with (
                Server(settings_from(pointed_at(tmp_path, fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch.batch_id
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            with contextlib.closing(sqlite3.connect(path)) as store:
                store.execute("DELETE FROM endpoints")  # as an earlier release leaves it: no mark
                store.commit()
            async with (
                Server(settings_from(pointed_at(tmp_path, new)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                await asyncio.sleep(2.0)
                early = await get_batch(client, job)
            fake.batch_outcome = BatchOutcome.COMPLETE
            async with (
                Server(settings_from(pointed_at(tmp_path, fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in server.router.ledger.entries()]
        assert (early.job.state, early.error) == (pb.BATCH_STATE_SUBMITTED, "")
        assert [job] == charged

    async def test_a_process_back_at_a_url_taken_as_gone_keeps_its_jobs(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process stops with a job sent, and the process at another URL beside it (polling and
        marking every 2 s, its poll rounds over a second after its marks) takes its URL as gone (1 s here,
        so three of its marks). The stopped process comes back at the same URL right after that
        mark, and sends another job before the watcher's next poll round: that round leaves both
        jobs alone (the URL's mark changed since it was taken as gone), and the returned process
        reads them, each charged once (both ended FAILED provider_changed, taken as gone until the
        watcher's next mark, their batch run and billed, never read)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 1.0)
        watcher = batch_config(tmp_path)
        watcher["batch"]["poll_interval_seconds"] = 2.0  # type: ignore[index]
        fake.batch_outcome = BatchOutcome.PENDING
        async with FakeProvider() as other, Server(settings_from(watcher, live_environ(other)), port=0) as y:
            # No store yet: its marker ticks from its start, its poll rounds from its first job
            # (its submit takes a few tenths of a second): its rounds then come 1.2 to 1.8 s after
            # its marks.
            await asyncio.sleep(1.2)
            async with RouterClient(y.target) as y_client:
                await submit(y_client)
            settings = settings_from(batch_config(tmp_path), live_environ(fake))
            async with Server(settings, port=0) as x, RouterClient(x.target) as client:
                first = (await submit(client))[1].batch.batch_id
                await sent(client, first)
            with capture_logs() as logs:
                await until(lambda: any(e["event"] == "batch_endpoint_gone" for e in logs), cap=30.0)
                async with Server(settings, port=0) as x, RouterClient(x.target) as client:
                    second = (await submit(client))[1].batch.batch_id
                    await sent(client, second)
                    await asyncio.sleep(2.5)  # the watcher's next poll round, and its next mark
                    early = [await get_batch(client, job) for job in (first, second)]
                    assert [(got.job.state, got.error) for got in early] == [(pb.BATCH_STATE_SUBMITTED, "")] * 2
                    fake.batch_outcome = BatchOutcome.COMPLETE
                    for job in (first, second):
                        await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                    charged = sorted(e.request_id for e in x.router.ledger.entries())
        assert sorted([first, second]) == charged
        assert [e["provider"] for e in logs if e["event"] == "batch_endpoint_gone"] == ["openai"]

    async def test_jobs_of_a_process_stopped_right_after_it_opened_the_store_end_once_its_url_is_gone(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process that marks every 2 s opens the store with its first batch request, sends the
        job and stops before its marker's next tick (a crash loop, a redeploy on a new base URL).
        It marked its URL as it opened the store, so the process at another URL that starts after
        it (1 s is gone here) takes that URL as gone once the mark has stayed the same: the job
        ends FAILED provider_changed, uncharged (its URL never marked, it stayed SUBMITTED for
        ever, its estimate held)."""
        monkeypatch.setattr(batch_queue, "ENDPOINT_GONE_AFTER_SECONDS", 1.0)
        fake.batch_outcome = BatchOutcome.PENDING
        brief = batch_config(tmp_path)
        brief["batch"]["poll_interval_seconds"] = 2.0  # type: ignore[index]
        async with (
            Server(settings_from(brief, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await sent(client, job)
        async with (
            FakeProvider() as other,
            Server(settings_from(batch_config(tmp_path), live_environ(other)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            failed = await wait_state(client, job, pb.BATCH_STATE_FAILED)
            charged = list(server.router.ledger.entries())
        assert failed.error == "provider_changed"
        assert charged == []


SLOW_DOWN = (429, {"error": {"type": "rate_limit_error", "message": "slow down"}}, {"retry-after": "2"})


class TestBatchPollRateLimited:
    async def test_a_429_on_a_poll_holds_that_providers_polls_for_its_retry_after_and_no_others(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """OpenAI answers a batch's poll 429 with Retry-After 2 s (the poll interval 0.05 s): that
        provider is not polled again before then, while the Anthropic batch goes on being polled;
        once the provider takes polls again the job succeeds (the refused batch was polled again
        every round, some 20 times a second, Retry-After ignored)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            openai_job = (await submit(client))[1].batch.batch_id
            anthropic_job = (await submit(client, task_hint="creative_writing"))[1].batch.batch_id
            await wait_state(client, openai_job, pb.BATCH_STATE_SUBMITTED)
            await wait_state(client, anthropic_job, pb.BATCH_STATE_SUBMITTED)
            [openai_batch] = [batch for batch in fake.batches if batch.api == "openai"]
            [anthropic_batch] = [batch for batch in fake.batches if batch.api == "anthropic"]
            with capture_logs() as logs:
                fake.batch_retrieve_errors["openai"] = SLOW_DOWN
                await until(lambda: openai_batch.refused >= 1)
                other_polls = anthropic_batch.retrieved
                await asyncio.sleep(1.0)
                refused, other_polls = openai_batch.refused, anthropic_batch.retrieved - other_polls
                fake.batch_retrieve_errors.clear()
                fake.batch_outcome = BatchOutcome.COMPLETE
                await wait_state(client, openai_job, pb.BATCH_STATE_SUCCEEDED)
        assert refused == 1
        assert other_polls >= 5
        [held] = [e for e in logs if e["event"] == "batch_polls_held"]
        assert (held["provider"], held["seconds"], held["reason"]) == ("openai", 2.0, "PROVIDER_RATE_LIMITED")

    async def test_a_wall_clock_stepped_back_during_a_hold_does_not_lengthen_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """OpenAI answers a batch's poll 429 with Retry-After 2 s, and the queue's wall clock then
        steps two hours back (an NTP correction, a VM restored): polls start again once the 2 s
        have passed, and the job succeeds (the hold's end was wall-clock time: no poll for two
        hours, and a batch past three days was given up unread)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            step = [0.0]
            server.batches._clock = lambda: time.time() - step[0]  # the host's clock, steppable
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            fake.batch_retrieve_errors["openai"] = SLOW_DOWN
            await until(lambda: batch.refused >= 1)
            step[0] = 7200.0
            fake.batch_retrieve_errors.clear()
            fake.batch_outcome = BatchOutcome.COMPLETE
            await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED, timeout=6.0)
            charged = [e.request_id for e in server.router.ledger.entries()]
        assert [job] == charged


class TestBatchPollBounded:
    """A batch's status check ends, whatever the provider answers."""

    @pytest.mark.parametrize("kind", ["openai", "anthropic"])
    async def test_an_error_body_that_never_ends_is_read_no_further_than_a_bound(self, kind: str) -> None:
        """A status check answered 429 (Retry-After 7) with a body that never ends (a proxy gone
        wrong): a rate limit at once, its Retry-After kept, no more than about 1 MiB of the body
        read, as a stream's error body is (``ERROR_BODY_LIMIT``; it was read into memory whole,
        some 200 MB a second, without end)."""
        from routesvc.errors import ProviderRateLimited
        from routesvc.providers.anthropic_batch import AnthropicBatches
        from routesvc.providers.openai_batch import OpenAIBatches

        async with RawUpstream() as raw:
            raw.replies.append(
                Reply(
                    status=429,
                    headers={"retry-after": "7"},
                    body=endless(b"x", first=b'{"error": {"message": "'),
                    content_type="application/json",
                )
            )
            api = (
                OpenAIBatches("openai", "sk", raw.url + "/v1")
                if kind == "openai"
                else AnthropicBatches("anthropic", "sk", raw.url)
            )
            try:
                async with asyncio.timeout(3):
                    with pytest.raises(ProviderRateLimited) as raised:
                        await api.poll("batch_1")
            finally:
                await api.aclose()
        assert raised.value.retry_after == 7.0
        assert raw.sent[0] < 32 << 20

    async def test_a_status_check_never_answered_is_cut_off_and_the_batch_polled_again(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The provider takes a batch's status check and never answers it: the check is given up
        after ``POLL_SECONDS`` (0.3 s here), logged ``batch_poll_failed``, and once the provider
        answers again the job succeeds (the check was awaited without end, the SDK's timeout being
        per read: an answer that trickled held the queue's polls with it)."""
        monkeypatch.setattr(batch_queue, "POLL_SECONDS", 0.3)
        fake.batch_retrieve_hold = asyncio.Event()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                job = (await submit(client))[1].batch.batch_id
                await fake.batch_retrieve_waiting.wait()
                await until(lambda: any(e["event"] == "batch_poll_failed" for e in logs))
                fake.batch_retrieve_hold.set()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
            charged = [e.request_id for e in server.router.ledger.entries()]
        failed = [e for e in logs if e["event"] == "batch_poll_failed"]
        assert [e["reason"] for e in failed][:1] == ["PROVIDER_UNAVAILABLE"]
        assert [job] == charged

    @pytest.mark.parametrize("task", ["", "creative_writing"], ids=["openai", "anthropic"])
    async def test_a_results_read_that_stalls_is_cut_off_and_the_queue_sends_and_reads_meanwhile(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, task: str
    ) -> None:
        """An ended batch's results answer their head and then stall (a proxy gone wrong): the
        read is given up after ``RESULTS_SECONDS`` (0.3 s here), logged
        ``batch_results_read_failed``, and tried again next round, while a job submitted
        meanwhile is sent; once the body comes, both succeed (the read had only the SDK's
        per-read timeout: a body trickling a byte now and then held every poll and every send
        without end)."""
        monkeypatch.setattr(batch_queue, "RESULTS_SECONDS", 0.3, raising=False)
        fake.batch_results_hold = asyncio.Event()
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with capture_logs() as logs:
                first = (await submit(client, task_hint=task))[1].batch.batch_id
                async with asyncio.timeout(10):
                    await fake.batch_results_waiting.wait()
                second = (await submit(client, task_hint=task))[1].batch.batch_id
                await until(lambda: any(e["event"] == "batch_results_read_failed" for e in logs))
                await sent(client, second)
                fake.batch_results_hold.set()
                await wait_state(client, first, pb.BATCH_STATE_SUCCEEDED)
                await wait_state(client, second, pb.BATCH_STATE_SUCCEEDED)
            charged = sorted(e.request_id for e in server.router.ledger.entries())
        assert [batch.api for batch in fake.batches] == ["anthropic" if task else "openai"] * 2
        assert charged == sorted([first, second])

    async def test_a_provider_cancel_never_answered_is_cut_off(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Cancelling a sent job asks the provider to cancel its batch; a cancel the provider
        takes and never answers is given up after ``POLL_SECONDS`` (0.3 s here), logged
        ``batch_cancel_failed``, and the job is CANCELLED (it was awaited for as long as the
        SDK's per-read timeout, again each time it trickled)."""
        monkeypatch.setattr(batch_queue, "POLL_SECONDS", 0.3)
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_cancel_hold = asyncio.Event()
        try:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch.batch_id
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                with capture_logs() as logs:
                    async with asyncio.timeout(10):
                        cancelled = await client.cancel_batch(job, tenant="acme")
        finally:
            fake.batch_cancel_hold.set()
        assert cancelled.state == pb.BATCH_STATE_CANCELLED
        assert [e["reason"] for e in logs if e["event"] == "batch_cancel_failed"] == ["PROVIDER_UNAVAILABLE"]


def sent_earlier(path: Path, seconds: float) -> None:
    """Move every job's last change and send (for a job in a provider batch: when that was sent)
    ``seconds`` back."""
    with contextlib.closing(sqlite3.connect(path)) as store:
        store.execute("UPDATE jobs SET updated_at = updated_at - ?, send_at = send_at - ?", (seconds, seconds))
        store.commit()


class TestBatchOverdue:
    """A provider batch that runs on past its 24 h window (stuck in finalizing or in progress)."""

    async def test_a_batch_running_past_its_window_and_grace_is_cancelled_and_read(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """Two jobs in one batch that stays in progress: once sent more than
        OVERDUE_AFTER_SECONDS ago it is cancelled at the provider and read as that ends it: the
        job the provider answered before the cancel succeeds and is charged once, the other ends
        EXPIRED batch_overdue, uncharged (both stayed SUBMITTED for ever, polled every round)."""
        fake.batch_outcome = BatchOutcome.PENDING
        fake.batch_answered_before_cancel = 1
        async with (
            Server(settings_from(grouping_two(batch_config(tmp_path)), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            jobs = [job.batch_id for job in await two_jobs(client)]
            for job in jobs:
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            with capture_logs() as logs:
                sent_earlier(tmp_path / "batches.db", OVERDUE_AFTER_SECONDS + 60)
                answered = await wait_state(client, batch.custom_ids[0], pb.BATCH_STATE_SUCCEEDED)
                expired = await wait_state(client, batch.custom_ids[1], pb.BATCH_STATE_EXPIRED)
                charged = [e.request_id for e in server.router.ledger.entries()]
        assert batch.cancelled
        assert answered.result.text
        assert expired.error == "batch_overdue"
        assert [batch.custom_ids[0]] == charged
        assert [e["provider_batch_id"] for e in logs if e["event"] == "batch_overdue"] == [batch.id]

    async def test_a_batch_that_does_not_end_even_when_cancelled_is_given_up(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch still not ended ABANDON_AFTER_SECONDS after it was sent (its cancel stuck too)
        is cancelled and its job ends EXPIRED batch_overdue at once, uncharged, and the batch is
        polled no more (the job stayed SUBMITTED for ever)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            with capture_logs() as logs:
                sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
                expired = await wait_state(client, job, pb.BATCH_STATE_EXPIRED)
                polls = batch.retrieved
                await asyncio.sleep(0.3)
                charged = list(server.router.ledger.entries())
        assert expired.error == "batch_overdue"
        assert batch.cancelled
        assert batch.retrieved == polls
        assert charged == []
        assert [e["jobs"] for e in logs if e["event"] == "batch_abandoned"] == [1]

    async def test_a_batch_the_provider_ended_on_its_own_keeps_its_outcome_when_read_late(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch the provider failed by itself (validation: token_limit_exceeded), first read
        more than OVERDUE_AFTER_SECONDS after it was sent (its polls failed meanwhile), was never
        cancelled here: its job ends as the provider said, FAILED with its code, and nothing is
        cancelled (it was EXPIRED batch_overdue, as if routesvc had cancelled it)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            # Accepted by the provider (a status check found it in progress, its request dropped):
            # else its failure for the enqueued token limit sends it again (``retry_later``).
            await until(lambda: stored_requests(tmp_path / "batches.db") == ["{}"])
            fake.batch_retrieve_errors[batch.api] = SERVER_ERROR
            await until(lambda: batch.refused >= 1)
            # While its polls fail (none reads it in between), it passes its window and ends.
            sent_earlier(tmp_path / "batches.db", OVERDUE_AFTER_SECONDS + 3600)
            # A round under way may have listed it before the move: once a poll is refused after
            # the move, every poll still to come is of a round that lists it as sent that long ago.
            moved = batch.refused
            await until(lambda: batch.refused > moved)
            fake.batch_outcome = BatchOutcome.FAIL
            fake.batch_retrieve_errors.clear()
            ended = await wait_state(client, job, pb.BATCH_STATE_FAILED)
        assert ended.error == "token_limit_exceeded"
        assert not batch.cancelled

    @pytest.mark.parametrize(
        ("refusal", "reason"),
        [
            ((500, {"error": {"type": "server_error", "message": "down"}}, {}), "PROVIDER_UNAVAILABLE"),
            ((403, {"error": {"type": "permission_error", "message": "revoked"}}, {}), "PROVIDER_AUTH_FAILED"),
            (SLOW_DOWN, "polls_held"),
        ],
        ids=["500", "403", "429"],
    )
    async def test_a_batch_whose_polls_keep_failing_is_given_up_three_days_after_it_was_sent(
        self,
        tmp_path: Path,
        fake: FakeProvider,
        monkeypatch: pytest.MonkeyPatch,
        refusal: tuple[int, dict[str, object], dict[str, str]],
        reason: str,
    ) -> None:
        """A batch sent more than ABANDON_AFTER_SECONDS ago whose polls keep failing (a 5xx, a
        revoked key's 403) or stay held (a 429 with Retry-After) for UNPOLLABLE_FOR_SECONDS here
        (0.3 s) is given up: its job ends EXPIRED batch_overdue, uncharged, and it is polled no
        more (it stayed SUBMITTED for ever, its estimate held, polled every round)."""
        monkeypatch.setattr(batch_queue, "UNPOLLABLE_FOR_SECONDS", 0.3)
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            with capture_logs() as logs:
                fake.batch_retrieve_errors[batch.api] = refusal
                sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
                expired = await wait_state(client, job, pb.BATCH_STATE_EXPIRED)
                polls = batch.retrieved + batch.refused
                await asyncio.sleep(0.3)
                charged = list(server.router.ledger.entries())
        assert expired.error == "batch_overdue"
        assert batch.retrieved + batch.refused == polls
        assert charged == []
        assert [(e["jobs"], e["reason"]) for e in logs if e["event"] == "batch_abandoned"] == [(1, reason)]

    async def test_a_batch_past_three_days_whose_poll_fails_once_is_still_read(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch sent more than ABANDON_AFTER_SECONDS ago (a process back after days away)
        whose polls fail for a while, less than UNPOLLABLE_FOR_SECONDS, is not given up: once a
        poll gets through and finds it ended, its job succeeds and is charged once."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            [batch] = fake.batches
            fake.batch_retrieve_errors[batch.api] = SERVER_ERROR
            sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
            await until(lambda: batch.refused >= 3)
            fake.batch_outcome = BatchOutcome.COMPLETE
            fake.batch_retrieve_errors.clear()
            await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
            charged = [e.request_id for e in server.router.ledger.entries()]
        assert [job] == charged

    async def test_a_batch_the_provider_ended_whose_results_read_keeps_failing_is_not_given_up(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch sent more than ABANDON_AFTER_SECONDS ago that the provider has completed (its
        answers billed), whose output file reads keep failing (a 5xx) for longer than
        UNPOLLABLE_FOR_SECONDS here (0.3 s), is not given up nor cancelled: it is read again each
        round, and once the file API answers its job succeeds and is charged once (it ended
        EXPIRED batch_overdue, uncharged, a cancel sent for the finished batch, never read)."""
        monkeypatch.setattr(batch_queue, "UNPOLLABLE_FOR_SECONDS", 0.3)
        fake.batch_results_errors["openai"] = SERVER_ERROR
        with capture_logs() as logs:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch.batch_id
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                [batch] = fake.batches
                sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
                refused = fake.batch_results_refused
                await until(lambda: fake.batch_results_refused >= refused + 3)
                await asyncio.sleep(0.6)
                early = (await get_batch(client, job)).job.state
                fake.batch_results_errors.clear()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in server.router.ledger.entries()]
        assert early == pb.BATCH_STATE_SUBMITTED
        assert not batch.cancelled
        assert [job] == charged
        assert [e for e in logs if e["event"] == "batch_abandoned"] == []
        assert any(e["event"] == "batch_results_read_failed" for e in logs)

    async def test_a_batch_found_ended_before_a_restart_is_not_given_up_after_it(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch sent more than ABANDON_AFTER_SECONDS ago that a process found completed (its
        results reads failing) is not given up by the restarted process whose status checks of
        it then fail for longer than UNPOLLABLE_FOR_SECONDS (0.3 s here): the store recorded that
        it ended; once the provider answers, its job succeeds and is charged once (the restarted
        process had forgotten it: EXPIRED batch_overdue, uncharged, never read)."""
        monkeypatch.setattr(batch_queue, "UNPOLLABLE_FOR_SECONDS", 0.3)
        fake.batch_results_errors["openai"] = SERVER_ERROR
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
            await until(lambda: fake.batch_results_refused >= 2)
        [batch] = fake.batches
        fake.batch_retrieve_errors["openai"] = SERVER_ERROR
        with capture_logs() as logs:
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                await until(lambda: batch.refused >= 3)
                await asyncio.sleep(0.6)
                early = await get_batch(client, job)
                assert (early.job.state, early.error) == (pb.BATCH_STATE_SUBMITTED, "")
                fake.batch_retrieve_errors.clear()
                fake.batch_results_errors.clear()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
                charged = [e.request_id for e in server.router.ledger.entries()]
        assert [job] == charged
        assert not batch.cancelled
        assert [e for e in logs if e["event"] == "batch_abandoned"] == []

    async def test_a_batch_found_ended_whose_status_checks_then_fail_says_so_once_and_waits(
        self, tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch sent more than ABANDON_AFTER_SECONDS ago found completed (its results reads
        failing), whose status checks then fail too (its key refused: 401) for longer than
        UNPOLLABLE_FOR_SECONDS (0.3 s here), is not given up: the failure is logged as what it is,
        ``batch_poll_failed`` PROVIDER_AUTH_FAILED, once for the whole row of failures (it was
        logged ``batch_results_read_failed`` every round, some 20 times a second), and once the
        key is taken again the job succeeds and is charged once."""
        monkeypatch.setattr(batch_queue, "UNPOLLABLE_FOR_SECONDS", 0.3)
        fake.batch_results_errors["openai"] = SERVER_ERROR
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client))[1].batch.batch_id
            await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
            sent_earlier(tmp_path / "batches.db", ABANDON_AFTER_SECONDS + 60)
            await until(lambda: fake.batch_results_refused >= 2)
            with capture_logs() as logs:
                fake.api_key = "rotated"
                await asyncio.sleep(1.0)
                early = await get_batch(client, job)
                fake.api_key = None
                fake.batch_results_errors.clear()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
            charged = [e.request_id for e in server.router.ledger.entries()]
        assert (early.job.state, early.error) == (pb.BATCH_STATE_SUBMITTED, "")
        failures = [(e["event"], e["reason"]) for e in logs if e["event"].endswith("_failed")]
        assert failures[-1:] == [("batch_poll_failed", "PROVIDER_AUTH_FAILED")]
        assert len(failures) <= 2  # a read under way as the key changed may fail once too
        assert [job] == charged

    async def test_a_batch_found_ended_on_a_flapping_provider_says_each_failure_once(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch found completed whose results reads fail (a 500) while its status checks fail
        only some of the time (a 502 switched on and off: a provider incident): each way it
        fails is logged once in the row, however they alternate (it was logged each time the
        event changed: most rounds, past the 10-minute bound)."""
        fake.batch_results_errors["openai"] = SERVER_ERROR
        bad_gateway = (502, {"error": {"type": "server_error", "message": "x"}}, {})
        with capture_logs() as logs:
            async with (
                Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                job = (await submit(client))[1].batch.batch_id
                await wait_state(client, job, pb.BATCH_STATE_SUBMITTED)
                await until(lambda: fake.batch_results_refused >= 1)
                [batch] = fake.batches
                for _ in range(20):
                    refused = batch.refused
                    fake.batch_retrieve_errors["openai"] = bad_gateway
                    await until(lambda: batch.refused > refused)  # noqa: B023 - awaited here
                    read = fake.batch_results_refused
                    fake.batch_retrieve_errors.clear()
                    await until(lambda: fake.batch_results_refused > read)  # noqa: B023 - awaited here
                fake.batch_results_errors.clear()
                await wait_state(client, job, pb.BATCH_STATE_SUCCEEDED)
        # Captured from the start (the first results read's line may come after the fake counted
        # its refusal): the results read's failure as the row began, then the status check's once.
        failures = [(e["event"], e["reason"]) for e in logs if e["event"].endswith("_failed")]
        assert failures == [
            ("batch_results_read_failed", "PROVIDER_UNAVAILABLE"),
            ("batch_poll_failed", "PROVIDER_UNAVAILABLE"),
        ]


class TestTheSuiteKeepsToItsOwnDataDir:
    def test_settings_and_processes_of_the_suite_use_a_temporary_data_dir(self) -> None:
        """Tests never resolve the user's data dir (~/.local/share/routesvc): the batch store of
        settings built without a store path, and the data dir of ``routesvc`` processes the tests
        start, are in the run's temporary directory (a test server opened, and polled, the
        user's own store)."""
        home_store = Path.home() / ".local" / "share" / "routesvc" / "batches.db"
        store = settings_from(default_config()).batch_store_path
        assert Path(TEST_DATA_DIR) / "batches.db" == store != home_store
        assert TEST_DATA_DIR == process_environ()["ROUTESVC_DATA_DIR"] == os.environ["ROUTESVC_DATA_DIR"]


class TestBatchProviderStrings:
    """A batch result's strings are made valid text before they are stored: SQLite cannot encode a
    lone surrogate (half an emoji's UTF-16 pair escaped in the provider's JSON), so the job stayed
    SUBMITTED and every poll round failed on it."""

    @pytest.mark.parametrize(("model", "task"), [("gpt-4o-mini", ""), ("claude-sonnet", "creative_writing")])
    async def test_a_lone_surrogate_in_the_text_and_model_is_stored_as_u_fffd(
        self, tmp_path: Path, fake: FakeProvider, model: str, task: str
    ) -> None:
        """The job succeeds, its text with U+FFFD for the half; its provider model, with a half,
        is no model id: none."""
        answer = Script(text="ok \ud83d end", model="batch-\ud83d", input_tokens=100, output_tokens=20)
        fake.enqueue(answer, model=fake_model(model))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert (done.result.text, done.result.provider_model) == ("ok \ufffd end", "")

    async def test_a_stored_tool_call_holding_half_an_emoji_is_sent_as_valid_text(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A job stored before results were made valid text whose tool call holds half an emoji's
        pair (json.dumps escaped it, so the store took it): GetBatch sends it with U+FFFD. (It was
        INTERNAL on every GetBatch of the job once the wire no longer converted it.)"""
        fake.enqueue(Script(text="ok", input_tokens=100, output_tokens=20), model=fake_model("gpt-4o-mini"))
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        calls = json.dumps([{"id": "call_1", "name": "f", "arguments_json": '{"a": "\ud83d"}'}])
        with contextlib.closing(sqlite3.connect(tmp_path / "batches.db")) as store:
            store.execute("UPDATE jobs SET tool_calls = ?", (calls,))
            store.commit()
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            got = await client.get_batch(job.batch_id, tenant="acme")
        assert got.result.tool_calls[0].arguments_json == '{"a": "\ufffd"}'
