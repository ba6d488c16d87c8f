"""The fake provider itself: wire formats, scripts, records, faults, control API and command line."""

from __future__ import annotations

import asyncio
import enum
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from routesvc.testing import DEFAULT_TEXT, FakeProvider, Fault, Script

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "one two three"}]}
MESSAGES = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    """A fake provider on a free loopback port."""
    async with FakeProvider() as running:
        yield running


@pytest.fixture
async def http(fake: FakeProvider) -> AsyncIterator[httpx2.AsyncClient]:
    """A plain HTTP client for the fake, to look at the wire format itself."""
    async with httpx2.AsyncClient(base_url=fake.base_url) as client:
        yield client


async def sse_events(http: httpx2.AsyncClient, path: str, body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(event, data) pairs of a streamed response, in order."""
    events: list[tuple[str | None, str]] = []
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        text = (await response.aread()).decode()
    for block in text.split("\n\n"):
        if not block:
            continue
        event: str | None = None
        data = ""
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "event":
                event = value
            elif name == "data":
                data = value
        events.append((event, data))
    return events


class TestScript:
    def test_default_text_is_split_after_each_word(self) -> None:
        """Without chunks or a count, the text streams one word (with its trailing space) per chunk."""
        assert Script().content_chunks() == ("Hello ", "from ", "the ", "fake ", "provider.")
        assert "".join(Script().content_chunks()) == DEFAULT_TEXT

    def test_chunk_count_makes_numbered_chunks(self) -> None:
        """``chunk_count=N`` streams N distinct, numbered chunks."""
        assert Script(chunk_count=3).content_chunks() == ("chunk-0 ", "chunk-1 ", "chunk-2 ")

    def test_explicit_chunks_win(self) -> None:
        """``chunks`` are streamed exactly as given."""
        assert Script(chunks=("a", "b"), chunk_count=9).content_chunks() == ("a", "b")

    def test_json_round_trip(self) -> None:
        """A script survives ``to_json`` / ``from_json`` (the control API's format)."""
        script = Script(chunks=("x", "y"), fault=Fault.CUT, fault_after=1, status=429, headers={"a": "b"})
        assert Script.from_json(json.loads(json.dumps(script.to_json()))) == script

    def test_a_default_script_round_trips_through_json(self) -> None:
        """A script with every field at its default (``headers`` an empty read-only mapping) is
        JSON-ready too: ``to_json`` raised TypeError on the default ``headers``."""
        script = Script()
        assert Script.from_json(json.loads(json.dumps(script.to_json()))) == script

    async def test_a_default_script_posted_to_the_control_api_is_served(self, http: httpx2.AsyncClient) -> None:
        """``POST /_fake/script`` takes ``Script(...).to_json()`` with its default headers as is."""
        script = Script(text="posted whole")
        response = await http.post("/_fake/script", json={"script": script.to_json(), "mode": "enqueue"})
        assert response.status_code == 200
        answer = await http.post("/v1/chat/completions", json=CHAT)
        assert answer.json()["choices"][0]["message"]["content"] == "posted whole"

    def test_unknown_json_fields_are_rejected(self) -> None:
        """A misspelt field is an error, not silently ignored."""
        with pytest.raises(ValueError, match="chunk_cuont"):
            Script.from_json({"chunk_cuont": 3})


class TestAddresses:
    async def test_base_urls(self, fake: FakeProvider) -> None:
        """OpenAI's base URL ends in /v1; Anthropic's is the bare root."""
        assert fake.base_url == f"http://127.0.0.1:{fake.port}"
        assert (fake.openai_base_url, fake.anthropic_base_url) == (f"{fake.base_url}/v1", fake.base_url)


class TestOpenAIWire:
    async def test_stream_with_usage(self, http: httpx2.AsyncClient) -> None:
        """Role chunk, content chunks, finish chunk, usage chunk with empty choices, then [DONE]."""
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        events = await sse_events(http, "/v1/chat/completions", body)
        assert events[-1] == (None, "[DONE]")
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:-2]]
        assert contents == list(Script().content_chunks())
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    async def test_usage_on_the_finish_chunk_and_a_fault_before_done(
        self, fake: FakeProvider, http: httpx2.AsyncClient
    ) -> None:
        """``usage_on_finish``: the whole usage on the finish chunk, no usage-only chunk;
        ``fault_at_end``: the fault (here ``data: null``) just before ``[DONE]``."""
        fake.enqueue(Script(usage_on_finish=True, fault=Fault.NOT_AN_OBJECT, fault_at_end=True, output_tokens=7))
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        events = await sse_events(http, "/v1/chat/completions", body)
        assert [data for _, data in events[-2:]] == ["null", "[DONE]"]
        finish = json.loads(events[-3][1])
        assert finish["choices"][0]["finish_reason"] == "stop"
        assert (finish["usage"]["prompt_tokens"], finish["usage"]["completion_tokens"]) == (3, 7)
        assert all(json.loads(data)["choices"] for _, data in events[:-2])

    async def test_stream_without_usage_when_not_asked(self, http: httpx2.AsyncClient) -> None:
        """Without ``stream_options.include_usage`` no chunk carries a usage field."""
        events = await sse_events(http, "/v1/chat/completions", {**CHAT, "stream": True})
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert events[-1] == (None, "[DONE]")
        assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)

    async def test_non_streaming_through_the_sdk(self, fake: FakeProvider) -> None:
        """A plain ``chat.completions.create`` gets the whole text, finish reason and usage."""
        fake.enqueue(Script(text="Plain answer.", cached_input_tokens=2))
        client = openai.AsyncOpenAI(api_key="k", base_url=fake.openai_base_url, max_retries=0)
        async with client:
            completion = await client.chat.completions.create(model="gpt-test", messages=[CHAT["messages"][0]])  # type: ignore[list-item]
        assert completion.choices[0].message.content == "Plain answer."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens_details is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 2)
        assert completion.usage.prompt_tokens_details.cached_tokens == 2

    async def test_error_body_and_retry_after(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """An error status answers with OpenAI's error JSON and the scripted ``Retry-After``."""
        fake.enqueue(Script(status=429, retry_after="5", retry_after_ms="5000"))
        response = await http.post("/v1/chat/completions", json=CHAT)
        error = response.json()["error"]
        assert (response.status_code, response.headers["retry-after"], response.headers["retry-after-ms"]) == (
            429,
            "5",
            "5000",
        )
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "one two three" in error["message"]  # echoed on purpose, to test sanitization


class TestAnthropicWire:
    async def test_stream_event_order(self, http: httpx2.AsyncClient) -> None:
        """message_start first, then block start, ping, deltas, block stop, message_delta, message_stop."""
        events = await sse_events(http, "/v1/messages", {**MESSAGES, "stream": True})
        names = [name for name, _ in events]
        assert names == [
            "message_start",
            "content_block_start",
            "ping",
            *["content_block_delta"] * 5,
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert all(json.loads(data)["type"] == name for name, data in events)

    async def test_a_fault_at_the_end_comes_between_message_delta_and_message_stop(
        self, fake: FakeProvider, http: httpx2.AsyncClient
    ) -> None:
        """``fault_at_end``: the fault (here an ``error`` event, then the body's end) after
        ``message_delta``, instead of ``message_stop``."""
        fake.enqueue(Script(fault=Fault.ERROR_EVENT, fault_at_end=True))
        events = await sse_events(http, "/v1/messages", {**MESSAGES, "stream": True})
        assert [name for name, _ in events[-3:]] == ["content_block_stop", "message_delta", "error"]

    async def test_usage_in_message_start_and_cumulative_output_in_message_delta(
        self, fake: FakeProvider, http: httpx2.AsyncClient
    ) -> None:
        """Input (less cache reads and writes) in message_start, the writes split by cache lifetime;
        the total output in message_delta."""
        fake.enqueue(
            Script(
                input_tokens=100,
                cached_input_tokens=60,
                cache_creation_input_tokens=10,
                cache_creation_1h_input_tokens=4,
                chunk_count=7,
            )
        )
        events = dict(await sse_events(http, "/v1/messages", {**MESSAGES, "stream": True}))
        start = json.loads(events["message_start"])["message"]
        delta = json.loads(events["message_delta"])
        assert start["usage"] == {
            "input_tokens": 30,
            "cache_read_input_tokens": 60,
            "cache_creation_input_tokens": 10,
            "cache_creation": {"ephemeral_5m_input_tokens": 6, "ephemeral_1h_input_tokens": 4},
            "output_tokens": 1,
        }
        assert (delta["usage"], delta["delta"]["stop_reason"]) == ({"output_tokens": 7}, "end_turn")

    async def test_non_streaming_through_the_sdk(self, fake: FakeProvider) -> None:
        """A plain ``messages.create`` gets one text block, the stop reason and usage."""
        fake.enqueue(Script(text="Plain answer.", finish_reason="length"))
        client = anthropic.AsyncAnthropic(api_key="k", base_url=fake.anthropic_base_url, max_retries=0)
        async with client:
            message = await client.messages.create(**MESSAGES)  # type: ignore[call-overload]
        assert message.content[0].text == "Plain answer."
        assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("max_tokens", 3, 2)

    async def test_error_body(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """An error status answers with Anthropic's error JSON."""
        fake.enqueue(Script(status=529))
        response = await http.post("/v1/messages", json=MESSAGES)
        assert response.status_code == 529
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "overloaded_error"


class TestScriptSelection:
    async def test_queue_is_fifo_then_default(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """Queued scripts answer in order; the default answers once the queue is empty."""
        fake.enqueue(Script(status=500), Script(status=503))
        statuses = [(await http.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)]
        assert statuses == [500, 503, 200]

    async def test_per_model_scripts_come_first(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """A model's own queue, then the shared queue, then the model's default, then the default."""
        fake.enqueue(Script(status=401), model="gpt-test")
        fake.enqueue(Script(status=402))
        fake.set_default(Script(status=403), model="gpt-test")
        other = {**CHAT, "model": "other"}
        statuses = [
            (await http.post("/v1/chat/completions", json=CHAT)).status_code,
            (await http.post("/v1/chat/completions", json=CHAT)).status_code,
            (await http.post("/v1/chat/completions", json=CHAT)).status_code,
            (await http.post("/v1/chat/completions", json=other)).status_code,
        ]
        assert statuses == [401, 402, 403, 200]

    async def test_reset_forgets_scripts_and_requests(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``reset()`` empties queues, per-model and global defaults and records."""
        fake.enqueue(Script(status=500))
        fake.set_default(Script(status=500), model="gpt-test")
        fake.set_default(Script(status=429))
        fake.reset()
        assert fake.requests == []
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200

    async def test_reset_keeps_the_default_the_fake_was_made_with(self) -> None:
        """A default given to the constructor is the built-in one: ``reset()`` goes back to it."""
        async with FakeProvider(default=Script(text="made with")) as fake:
            fake.set_default(Script(status=500))
            fake.reset()
            async with httpx2.AsyncClient(base_url=fake.base_url) as http:
                answer = (await http.post("/v1/chat/completions", json=CHAT)).json()
        assert answer["choices"][0]["message"]["content"] == "made with"

    async def test_reset_sets_every_knob_back_as_a_new_fake_has_it(self) -> None:
        """``reset()`` restores every setting the Python API has (each property with a setter, the
        dicts it hands out, the ``*_waiting`` events) to a new fake's: a list hold, a rotated key
        or a fault left set made every later test of a reused fake hang or fail."""
        fresh = FakeProvider(api_key="made-with")
        dicts = ("batch_retrieve_errors", "batch_results_errors", "batch_accounts")
        async with FakeProvider(api_key="made-with") as fake:
            knobs = [name for name, value in vars(FakeProvider).items() if isinstance(value, property) and value.fset]
            for name in knobs:
                setattr(fake, name, _changed(name, getattr(fake, name)))
            for name in ("batch_retrieve_errors", "batch_results_errors"):
                getattr(fake, name)["openai"] = (500, {}, {})
            fake.batch_accounts["k"] = "account"
            # The dicts a test holds on to: emptied, not replaced, so that they still steer the fake.
            handed_out = {name: getattr(fake, name) for name in dicts}
            waiting = [name for name in dir(FakeProvider) if name.endswith("_waiting")]
            for name in waiting:
                getattr(fake, name).set()
            assert all(getattr(fake, name) != getattr(fresh, name) for name in knobs)

            fake.reset()

            for name in [*knobs, *dicts]:
                assert getattr(fake, name) == getattr(fresh, name), name
            assert [name for name in dicts if getattr(fake, name) is not handed_out[name]] == []
            assert [name for name in waiting if getattr(fake, name).is_set()] == []
            # As a new fake does: the constructor's key is taken, and an Anthropic batch list
            # answers at once (the hold left set made it wait for ever).
            async with anthropic.AsyncAnthropic(api_key="made-with", base_url=fake.anthropic_base_url) as client:
                listed = await asyncio.wait_for(client.messages.batches.list(), timeout=10)
            assert listed.data == []


def _changed(name: str, value: Any) -> Any:
    """A value other than ``value`` for the fake's knob ``name``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-rotated"
    if isinstance(value, enum.Enum):
        return next(member for member in type(value) if member is not value)
    if value is None and name.endswith("_hold"):
        return asyncio.Event()  # requests wait at it
    if value is None and name.endswith("_error"):
        return (500, {"error": {"message": "set"}})
    raise AssertionError(f"a knob of a new type: {value!r}")


class TestRecords:
    async def test_request_is_recorded(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """Method, path, lower-cased headers and parsed body are kept; a full answer is ``completed``."""
        await http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-1", "X-Trace": "t"})
        record = fake.requests[-1]
        assert (record.method, record.path, record.body, record.model) == (
            "POST",
            "/v1/chat/completions",
            CHAT,
            "gpt-test",
        )
        assert (record.headers["x-trace"], record.api_key, record.stream) == ("t", "sk-1", False)
        # The record ends when the fake has finished writing, which the client can see first.
        await asyncio.wait_for(record.ended.wait(), timeout=2)
        assert (record.completed, record.aborted) == (True, False)

    async def test_x_api_key_is_accepted(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """Anthropic-style ``x-api-key`` is read as the key."""
        await http.post("/v1/messages", json=MESSAGES, headers={"x-api-key": "sk-2"})
        assert fake.requests[-1].api_key == "sk-2"

    async def test_keep_alive_serves_several_requests_on_one_connection(self, fake: FakeProvider) -> None:
        """Two requests written on one TCP connection get two complete responses."""
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        body = json.dumps({**CHAT, "stream": True}).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        try:
            for _ in range(2):
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK")
                assert b"transfer-encoding: chunked" in head
                payload = await reader.readuntil(b"0\r\n\r\n")
                assert b"data: [DONE]" in payload
        finally:
            writer.close()
        assert [(record.completed, record.connection) for record in fake.requests] == [(True, 1), (True, 1)]
        assert fake.connections_accepted == 1


class TestAuth:
    async def test_wrong_key_gets_401_in_the_provider_format(self) -> None:
        """With ``api_key`` set, another key is refused the way the real API refuses it."""
        async with FakeProvider(api_key="right") as fake:
            wrong = openai.AsyncOpenAI(api_key="wrong", base_url=fake.openai_base_url, max_retries=0)
            right = anthropic.AsyncAnthropic(api_key="right", base_url=fake.anthropic_base_url, max_retries=0)
            async with wrong, right:
                with pytest.raises(openai.AuthenticationError):
                    await wrong.chat.completions.create(model="gpt-test", messages=[CHAT["messages"][0]])  # type: ignore[list-item]
                message = await right.messages.create(**MESSAGES)  # type: ignore[call-overload]
        assert message.content[0].text == DEFAULT_TEXT


class TestFaults:
    async def test_client_abort_is_recorded_with_its_time(self, fake: FakeProvider) -> None:
        """A client that leaves a hanging stream is seen at once: ``aborted`` and ``aborted_at``."""
        fake.enqueue(Script(fault=Fault.HANG, fault_after=2))
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        body = json.dumps({**CHAT, "stream": True}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        await reader.readuntil(b"from ")
        closed_at = time.monotonic()
        writer.close()
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert (record.aborted, record.completed, record.chunks_sent) == (True, False, 2)
        assert record.aborted_at is not None
        assert 0 <= record.aborted_at - closed_at < 1.0

    async def test_cut_is_not_a_client_abort(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """When the fake cuts the connection itself, the client did not abort and the answer is incomplete."""
        fake.enqueue(Script(fault=Fault.CUT, fault_after=1))
        with pytest.raises(httpx2.RemoteProtocolError):
            await sse_events(http, "/v1/chat/completions", {**CHAT, "stream": True})
        record = fake.requests[-1]
        await record.wait_ended(1.0)
        assert (record.aborted, record.completed, record.chunks_sent) == (False, False, 1)

    async def test_first_chunk_and_chunk_delays(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``first_chunk_delay`` then ``chunk_delay`` between chunks shape the stream's timing."""
        fake.enqueue(Script(chunk_count=3, first_chunk_delay=0.2, chunk_delay=0.1))
        started = time.monotonic()
        await sse_events(http, "/v1/messages", {**MESSAGES, "stream": True})
        # No sooner than the delays add up to; the slack above them is for a loaded machine.
        assert 0.4 <= time.monotonic() - started < 0.4 + 1.5


class TestControlAPI:
    async def test_script_over_http(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``POST /_fake/script`` queues a script (or sets a default) for the next requests."""
        response = await http.post("/_fake/script", json={"script": {"status": 503}, "mode": "enqueue"})
        assert response.json() == {"ok": True}
        await http.post("/_fake/script", json={"script": {"text": "per model"}, "model": "m", "mode": "default"})
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 503
        answer = (await http.post("/v1/chat/completions", json={**CHAT, "model": "m"})).json()
        assert answer["choices"][0]["message"]["content"] == "per model"

    async def test_requests_over_http(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``GET /_fake/requests`` lists what was received, without the control calls."""
        await http.post("/v1/messages", json=MESSAGES)
        records = (await http.get("/_fake/requests")).json()["requests"]
        assert [(r["path"], r["body"], r["completed"], r["aborted"]) for r in records] == [
            ("/v1/messages", MESSAGES, True, False)
        ]

    async def test_reset_over_http(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``POST /_fake/reset`` forgets scripts and requests, a default for all models set with
        ``mode: default`` too (it survived, so a "fresh" fake kept failing every call)."""
        fake.enqueue(Script(status=500))
        await http.post("/_fake/script", json={"script": {"status": 429}, "mode": "default"})
        await http.post("/v1/messages", json=MESSAGES)
        await http.post("/_fake/reset")
        assert fake.requests == []
        assert (await http.post("/v1/messages", json=MESSAGES)).status_code == 200

    async def test_bad_script_and_unknown_path(self, http: httpx2.AsyncClient) -> None:
        """An invalid script is a 400 naming the problem; an unknown path is a 404."""
        bad = await http.post("/_fake/script", json={"script": {"no_such_field": 1}})
        missing = await http.get("/v1/nothing")
        assert (bad.status_code, missing.status_code) == (400, 404)
        assert "no_such_field" in bad.json()["error"]["message"]


class TestCommandLine:
    async def test_runs_as_a_separate_process(self) -> None:
        """``python -m routesvc.testing --port 0`` prints its URL, serves, and exits 0 on SIGTERM."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "routesvc.testing", "--port", "0", stdout=asyncio.subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(10):
                base_url = (await process.stdout.readline()).decode().strip()
            async with httpx2.AsyncClient(base_url=base_url) as http:
                answer = (await http.post("/v1/chat/completions", json=CHAT)).json()
                records = (await http.get("/_fake/requests")).json()["requests"]
            assert answer["choices"][0]["message"]["content"] == DEFAULT_TEXT
            assert len(records) == 1
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                code = await process.wait()
        assert code == 0


class TestRobustness:
    @pytest.mark.parametrize(
        "raw",
        [
            b"GARBAGE\r\n\r\n",
            b"POST /v1/messages HTTP/1.1\r\nContent-Length: twelve\r\n\r\n",
            b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ],
    )
    async def test_malformed_http_closes_the_connection_and_keeps_serving(
        self, fake: FakeProvider, http: httpx2.AsyncClient, raw: bytes
    ) -> None:
        """A request that is not HTTP/1.1 closes that connection only; the server keeps answering."""
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()
        assert (await http.post("/v1/messages", json=MESSAGES)).status_code == 200

    async def test_non_json_body_is_a_provider_shaped_400(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """A body that is not JSON is refused the way the API refuses it, and still recorded."""
        response = await http.post("/v1/chat/completions", content=b"{not json")
        assert (response.status_code, response.json()["error"]["type"]) == (400, "invalid_request_error")
        assert fake.requests[-1].body is None


class TestPublicSurface:
    def test_exported_names(self) -> None:
        """``routesvc.testing`` exports exactly its documented helpers."""
        import routesvc.testing

        assert sorted(routesvc.testing.__all__) == [
            "BatchOutcome",
            "DEFAULT_TEXT",
            "FakeBatch",
            "FakeProvider",
            "FakeToolCall",
            "Fault",
            "FaultProxy",
            "LoopbackProxy",
            "NetworkFault",
            "RecordedRequest",
            "Script",
        ]
        assert all(hasattr(routesvc.testing, name) for name in routesvc.testing.__all__)


class TestStalls:
    async def test_hang_with_seconds_stalls_then_resumes(self, fake: FakeProvider, http: httpx2.AsyncClient) -> None:
        """``HANG`` with ``hang_seconds`` stalls mid-stream with the socket open, then finishes the answer."""
        fake.enqueue(Script(fault=Fault.HANG, fault_after=2, hang_seconds=0.3))
        started = time.monotonic()
        events = await sse_events(http, "/v1/messages", {**MESSAGES, "stream": True})
        # No sooner than the stall; the slack above it is for a loaded machine.
        assert 0.3 <= time.monotonic() - started < 0.3 + 1.5
        assert events[-1][0] == "message_stop"
        assert fake.requests[-1].completed
