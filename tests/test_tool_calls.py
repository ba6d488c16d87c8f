"""Tool use: the model's tool calls come back assembled, a conversation carries calls and results
to each provider in its own wire format, and chunks without answer text keep a stream alive."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from routesvc.client import RouterClient, build_chat, tool_turns
from routesvc.models import Message, ProviderFinish, Role, ToolCall
from routesvc.providers._tool_calls import ToolCallParts
from routesvc.providers.base import ProviderCall
from routesvc.providers.openai import OpenAIProvider
from routesvc.server import Server
from routesvc.testing import FakeProvider, FakeToolCall, Fault, Script
from routesvc.tokens import count_text_tokens
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from
from tests.raw_upstream import RawUpstream, Reply, chunks
from tests.test_validation import error_info

WEATHER = pb.Tool(
    name="get_weather",
    description="Weather for a city",
    parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}',
)
TIME = pb.Tool(name="get_time", parameters_json='{"type": "object", "properties": {"tz": {"type": "string"}}}')
CALLS = (
    FakeToolCall("get_weather", '{"city": "Paris"}', pieces=3),
    FakeToolCall("get_time", '{"tz": "Europe/Rome"}', pieces=4),
)
# Each adapter: the pinned model, the path it calls, the prefix of the fake's call ids.
ADAPTERS = [("gpt-4o-mini", "/v1/chat/completions", "call"), ("claude-sonnet", "/v1/messages", "toolu")]
ADAPTER_IDS = ["openai", "anthropic"]


async def _complete(client: RouterClient, chat: pb.ChatRequest, model: str) -> list[pb.CompleteResponse]:
    return [m async for m in client.complete(chat, pb.RoutingContext(model=model))]


def _call(call_id: str, name: str, arguments: str) -> pb.ToolCall:
    return pb.ToolCall(id=call_id, name=name, arguments_json=arguments)


def _conversation() -> pb.ChatRequest:
    """A second round of the loop: the assistant's two calls (after some text) and their results,
    then the user's next question."""
    return build_chat(
        [
            ("system", "Be brief."),
            ("user", "Weather in Paris, and the time in Rome?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                content="Checking both.",
                tool_calls=[
                    _call("call_1", "get_weather", '{"city": "Paris"}'),
                    _call("call_2", "get_time", '{"tz": "Europe/Rome"}'),
                ],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="18 C, sunny"),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_2", content="14:05"),
            ("user", "And tomorrow?"),
        ],
        tools=[WEATHER, TIME],
    )


class TestToolCallsComeBack:
    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_parallel_calls_streamed_in_pieces_are_assembled_in_the_completion(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """Two parallel calls, their arguments in 3 and 4 pieces after some text: the text streams
        as deltas, the completion carries both calls whole, in order, with finish TOOL_CALLS."""
        fake.enqueue(Script(chunks=("Let me ", "check. "), tool_calls=CALLS))
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        messages = await _complete(live_client, chat, model)
        assert [m.delta.text for m in messages if m.WhichOneof("event") == "delta"] == ["Let me ", "check. "]
        completion = messages[-1].completion
        assert list(completion.tool_calls) == [
            _call(f"{prefix}_fake_0", "get_weather", '{"city": "Paris"}'),
            _call(f"{prefix}_fake_1", "get_time", '{"tz": "Europe/Rome"}'),
        ]
        assert completion.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert fake.requests[-1].path == path

    async def test_the_python_client_continues_the_loop_with_the_calls_and_their_results(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """``tool_turns`` turns a completion's calls and the caller's results into the next turns;
        the model then gets them back as the API expects."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS), Script(text="Sunny, 14:05."))
        question = [("user", "Weather in Paris, and the time in Rome?")]
        first = await _complete(live_client, build_chat(question, tools=[WEATHER, TIME]), "gpt-4o-mini")
        results = {"call_fake_0": "18 C", "call_fake_1": "14:05"}
        turns = tool_turns(first[-1].completion, "", results)
        second = await _complete(live_client, build_chat([*question, *turns], tools=[WEATHER, TIME]), "gpt-4o-mini")
        assert second[-1].completion.finish_reason == pb.FINISH_REASON_STOP
        assert fake.requests[-1].body["messages"][1:] == [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_fake_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_fake_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "Europe/Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_fake_0", "content": "18 C"},
            {"role": "tool", "tool_call_id": "call_fake_1", "content": "14:05"},
        ]

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_a_call_to_the_named_tool_finishes_as_tool_calls(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """``tool_choice`` naming the tool: OpenAI ends that answer with finish "stop" (Anthropic
        with ``tool_use``); both come back TOOL_CALLS, as every answer that makes calls does."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS[:1]))
        named = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, name="get_weather")
        chat = build_chat([("user", "Weather in Paris?")], tools=[WEATHER], tool_choice=named)
        completion = (await _complete(live_client, chat, model))[-1].completion
        assert list(completion.tool_calls) == [_call(f"{prefix}_fake_0", "get_weather", '{"city": "Paris"}')]
        assert completion.finish_reason == pb.FINISH_REASON_TOOL_CALLS

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_a_text_answer_with_a_call_that_names_no_tool_is_a_stop_without_calls(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """A text answer ended by "stop" (``end_turn``) that carries a tool-call piece naming no
        tool, as some servers send an empty placeholder: STOP with its text and no calls; beside a
        named call, only that call comes back. (It was TOOL_CALLS with a nameless call, which the
        caller can neither run nor send back.)"""
        placeholder = FakeToolCall("", "{}")
        weather = FakeToolCall("get_weather", '{"city": "Paris"}', id=f"{prefix}_1")
        fake.enqueue(
            Script(text="It is sunny.", tool_calls=(placeholder,), tool_calls_finish_reason="stop"),
            Script(chunks=(), tool_calls=(placeholder, weather)),
        )
        chat = build_chat([("user", "Weather in Paris?")], tools=[WEATHER])
        messages = await _complete(live_client, chat, model)
        text, stopped = "".join(m.delta.text for m in messages), messages[-1].completion
        called = (await _complete(live_client, chat, model))[-1].completion
        assert (text, list(stopped.tool_calls), stopped.finish_reason) == ("It is sunny.", [], pb.FINISH_REASON_STOP)
        assert (list(called.tool_calls), called.finish_reason) == (
            [_call(f"{prefix}_1", "get_weather", '{"city": "Paris"}')],
            pb.FINISH_REASON_TOOL_CALLS,
        )
        assert [request.path for request in fake.requests] == [path, path]


class TestAssemblingPieces:
    """How the adapters' pieces become calls (``ToolCallParts``, shared by both adapters)."""

    def test_openai_pieces_keyed_by_index(self) -> None:
        """The id and name come first, the arguments follow in pieces, interleaved across indexes."""
        parts = ToolCallParts()
        parts.add(0, call_id="a", name="get_weather")
        parts.add(1, call_id="b", name="get_time")
        for index, piece in ((0, '{"city": '), (1, '{"tz": "UTC"}'), (0, '"Paris"}')):
            parts.add(index, arguments=piece)
        assert parts.calls() == (
            ToolCall("a", "get_weather", '{"city": "Paris"}'),
            ToolCall("b", "get_time", '{"tz": "UTC"}'),
        )

    def test_parallel_calls_all_at_index_0_stay_apart_by_id(self) -> None:
        """Ollama sends every parallel call at index 0: a new id there is a new call (they were
        glued into one call with '{...}{...}' arguments)."""
        parts = ToolCallParts()
        parts.add(0, call_id="a", name="get_weather", arguments='{"city": "Paris"}')
        parts.add(0, call_id="b", name="get_weather", arguments='{"city": "Rome"}')
        assert parts.calls() == (
            ToolCall("a", "get_weather", '{"city": "Paris"}'),
            ToolCall("b", "get_weather", '{"city": "Rome"}'),
        )

    def test_a_call_whose_id_changes_on_later_pieces_stays_one_call(self) -> None:
        """Some servers keep the index but send another id on the argument pieces (a fresh one
        per piece): a piece that names no tool continues the call at its index."""
        parts = ToolCallParts()
        parts.add(0, call_id="call_A", name="get_weather")
        parts.add(0, call_id="call_B", arguments='{"city": ')
        parts.add(0, call_id="call_C", arguments='"Paris"}')
        assert parts.calls() == (ToolCall("call_A", "get_weather", '{"city": "Paris"}'),)

    def test_pieces_that_never_name_a_tool_make_no_call(self) -> None:
        """An empty placeholder piece, or arguments under no name, is no call; a call whose name
        comes in a later piece is one, and made-up ids number the calls that are."""
        parts = ToolCallParts()
        parts.add(0, arguments="")
        parts.add(1, arguments="{}")
        parts.add(2, arguments='{"city": ')
        parts.add(2, name="get_weather", arguments='"Paris"}')
        calls = parts.calls()
        assert [(call.name, call.arguments_json) for call in calls] == [("get_weather", '{"city": "Paris"}')]
        assert re.fullmatch(r"call_[0-9a-f]+_0", calls[0].id)

    def test_pieces_without_an_index_or_an_id_start_a_call_at_each_new_name(self) -> None:
        """A server that sends neither index nor id: a piece naming a tool while the latest call
        has a name starts a new call (the two were merged into one, their arguments glued), the
        same tool called twice included once the first call's arguments are whole."""
        parts = ToolCallParts()
        parts.add(None, name="get_weather", arguments='{"city": ')
        parts.add(None, arguments='"Paris"}')
        parts.add(None, name="get_time", arguments='{"tz": "UTC"}')
        parts.add(None, name="get_time", arguments='{"tz": "CET"}')
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_time", '{"tz": "UTC"}'),
            ("get_time", '{"tz": "CET"}'),
        ]

    def test_a_name_repeated_on_each_piece_of_one_call_stays_one_call(self) -> None:
        """Some servers repeat the tool's name on every piece of a call (MiniMax on NVIDIA NIM):
        while the call's arguments are not yet a whole JSON value, the same name continues it."""
        parts = ToolCallParts()
        for piece in ('{"city": ', '"Par', 'is"}'):
            parts.add(None, name="get_weather", arguments=piece)
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [("get_weather", '{"city": "Paris"}')]

    def test_numbered_calls_that_repeat_their_name_and_close_with_it_are_one_call_each(self) -> None:
        """A server that numbers its calls 0 and 1 with no ids, names the tool on every piece and
        ends each call with a piece of no arguments: two calls (the closing pieces were read as
        two more calls of the tool, with no arguments)."""
        parts = ToolCallParts()
        for index, piece in ((0, '{"city":'), (1, '{"city":'), (0, '"Paris"}'), (1, '"Rome"}'), (0, ""), (1, "")):
            parts.add(index, name="get_weather", arguments=piece)
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [
            ("get_weather", '{"city":"Paris"}'),
            ("get_weather", '{"city":"Rome"}'),
        ]

    @pytest.mark.parametrize("index", [None, 0])
    def test_a_closing_piece_that_names_the_tool_again_is_no_call(self, index: int | None) -> None:
        """With no index or every call at 0 and no ids, a piece naming the tool again with no
        arguments after they are whole is no call; a second call of that tool whose arguments
        follow its name-only first piece is one."""
        parts = ToolCallParts()
        parts.add(index, name="get_weather", arguments='{"city": "Paris"}')
        parts.add(index, name="get_weather")
        parts.add(index, name="get_weather")
        parts.add(index, arguments='{"city": "Rome"}')
        parts.add(index, name="get_weather")
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_weather", '{"city": "Rome"}'),
        ]

    @pytest.mark.parametrize("index", [None, 0])
    @pytest.mark.parametrize("white_space", ["\n", " \t", "\r\n "])
    def test_a_piece_naming_the_tool_again_with_only_white_space_after_the_close_is_no_call(
        self, index: int | None, white_space: str
    ) -> None:
        """With no index or every call at 0, no ids and the name on every piece, a piece that
        brings only white space after the arguments are whole belongs to that call (it started a
        second call whose arguments were that white space, not JSON); a second call of the tool
        after it is one."""
        parts = ToolCallParts()
        for piece in ('{"city":', '"Paris"}', white_space, '{"city":', '"Rome"}'):
            parts.add(index, name="get_weather", arguments=piece)
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [
            ("get_weather", '{"city":"Paris"}' + white_space),
            ("get_weather", '{"city":"Rome"}'),
        ]

    def test_inputs_given_whole_at_one_index_without_ids_are_two_calls(self) -> None:
        """Two Anthropic ``tool_use`` blocks of one tool without ids at one index, each input
        given whole at its start: two calls (the second continued the first and its input was
        lost)."""
        parts = ToolCallParts()
        parts.add(0, name="get_weather", whole_arguments='{"city": "Paris"}')
        parts.add(0, name="get_weather", whole_arguments='{"city": "Rome"}')
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_weather", '{"city": "Rome"}'),
        ]

    def test_a_long_call_that_repeats_its_name_is_parsed_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A 200 kB call in 20-byte pieces, its name on each (at index 0, no id): its arguments
        are parsed as JSON once, when its object closes (every piece re-joined and parsed all the
        text so far, ~10,000 parses: seconds of the event loop)."""
        parses: list[int] = []
        loads = json.loads

        def counted(text: str) -> object:
            parses.append(len(text))
            return loads(text)

        monkeypatch.setattr(json, "loads", counted)
        arguments = json.dumps({"path": "a.txt", "content": 'x\\"}{' * 40_000})
        parts = ToolCallParts()
        for start in range(0, len(arguments), 20):
            parts.add(0, name="write_file", arguments=arguments[start : start + 20])
        assert [(call.name, call.arguments_json) for call in parts.calls()] == [("write_file", arguments)]
        assert len(parses) == 1

    def test_pieces_without_an_index_follow_their_call(self) -> None:
        """Older servers send no index: a new id starts a call, later pieces extend the latest one
        (they were dropped, leaving a TOOL_CALLS finish with no calls)."""
        parts = ToolCallParts()
        parts.add(None, call_id="a", name="lookup", arguments='{"q": ')
        parts.add(None, arguments='"x"}')
        parts.add(None, call_id="b", name="lookup", arguments="{}")
        assert parts.calls() == (ToolCall("a", "lookup", '{"q": "x"}'), ToolCall("b", "lookup", "{}"))


class TestAnthropicCompatibleServers:
    async def test_an_input_given_whole_at_the_blocks_start_is_the_calls_arguments(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A server that sends each ``tool_use`` block's whole ``input`` in its
        ``content_block_start`` and no ``input_json_delta`` (a gateway re-streaming a finished
        message): the calls carry that input as their arguments (they came back with none, and
        ran with no arguments)."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS, tool_input_in_start=True))
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        completion = (await _complete(live_client, chat, "claude-sonnet"))[-1].completion
        assert [(call.name, json.loads(call.arguments_json)) for call in completion.tool_calls] == [
            ("get_weather", {"city": "Paris"}),
            ("get_time", {"tz": "Europe/Rome"}),
        ]
        assert completion.finish_reason == pb.FINISH_REASON_TOOL_CALLS

    async def test_a_non_ascii_input_given_whole_at_the_blocks_start_keeps_its_characters(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """An input given whole in ``content_block_start`` is written again as JSON text with the
        model's characters, not ``\\uXXXX`` escapes (as ``input_json_delta``s carry them)."""
        arguments = '{"city": "北京", "note": "🙂"}'
        fake.enqueue(Script(chunks=(), tool_calls=(FakeToolCall("get_weather", arguments),), tool_input_in_start=True))
        chat = build_chat([("user", "Weather in Beijing?")], tools=[WEATHER])
        completion = (await _complete(live_client, chat, "claude-sonnet"))[-1].completion
        assert [call.arguments_json for call in completion.tool_calls] == [arguments]

    async def test_input_deltas_replace_the_empty_input_of_the_blocks_start(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic's own shape, ``input: {}`` at the start and the arguments in deltas: the
        deltas' text alone, unchanged."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS))
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        completion = (await _complete(live_client, chat, "claude-sonnet"))[-1].completion
        assert [call.arguments_json for call in completion.tool_calls] == ['{"city": "Paris"}', '{"tz": "Europe/Rome"}']


class TestOpenAICompatibleServers:
    @pytest.mark.parametrize("indexes", ["zero", "none"])
    async def test_parallel_calls_without_their_own_index_come_back_apart(
        self, live_client: RouterClient, fake: FakeProvider, indexes: str
    ) -> None:
        """An OpenAI-compatible server that sends every call at index 0 (Ollama), or no index at
        all: the two calls come back whole and apart, as from OpenAI."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS, tool_call_indexes=indexes))
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        messages = await _complete(live_client, chat, "gpt-4o-mini")
        assert list(messages[-1].completion.tool_calls) == [
            _call("call_fake_0", "get_weather", '{"city": "Paris"}'),
            _call("call_fake_1", "get_time", '{"tz": "Europe/Rome"}'),
        ]

    @pytest.mark.parametrize("indexes", ["none", "zero"])
    async def test_parallel_calls_without_their_own_index_or_an_id_come_back_apart(
        self, live_client: RouterClient, fake: FakeProvider, indexes: str
    ) -> None:
        """A server that streams parallel calls with no ``id`` and no ``index``, or every call at
        index 0: the two calls come back apart, each with its own arguments and a made-up id
        (they were merged into one call named get_weather with both calls' arguments glued, not
        JSON, and the second call lost)."""
        fake.enqueue(Script(chunks=(), tool_calls=CALLS, tool_call_indexes=indexes, omit_tool_call_ids=True))
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        calls = (await _complete(live_client, chat, "gpt-4o-mini"))[-1].completion.tool_calls
        assert [(call.name, call.arguments_json) for call in calls] == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_time", '{"tz": "Europe/Rome"}'),
        ]
        assert len({call.id for call in calls}) == 2

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_a_tool_calls_finish_whose_pieces_name_no_tool_is_not_tool_calls(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """An answer the provider ends with "tool_calls" ("tool_use") whose call pieces all lack a
        name makes no call, and finishes OTHER: TOOL_CALLS with no calls left the caller nothing
        to run."""
        unnamed = (FakeToolCall("", '{"city": "Paris"}'),)
        fake.enqueue(Script(chunks=(), tool_calls=unnamed, tool_calls_finish_reason="tool_calls"))
        chat = build_chat([("user", "Weather in Paris?")], tools=[WEATHER])
        completion = (await _complete(live_client, chat, model))[-1].completion
        assert (list(completion.tool_calls), completion.finish_reason) == ([], pb.FINISH_REASON_OTHER)
        assert fake.requests[-1].path == path

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_calls_finished_with_stop_in_auto_mode_finish_as_tool_calls(
        self, live_client: RouterClient, fake: FakeProvider, model: str
    ) -> None:
        """A server that ends an answer with calls by "stop" (Anthropic's ``end_turn``) even in
        auto mode: TOOL_CALLS, in both formats (Anthropic's said STOP, and a client's tool loop
        switching on it dropped the calls); a call cut by "length" stays LENGTH."""
        fake.enqueue(
            Script(chunks=(), tool_calls=CALLS, tool_calls_finish_reason="stop"),
            Script(chunks=(), tool_calls=CALLS, tool_calls_finish_reason="length"),
        )
        chat = build_chat([("user", "Weather in Paris, and the time in Rome?")], tools=[WEATHER, TIME])
        stopped = (await _complete(live_client, chat, model))[-1].completion
        cut = (await _complete(live_client, chat, model))[-1].completion
        assert (len(stopped.tool_calls), stopped.finish_reason) == (2, pb.FINISH_REASON_TOOL_CALLS)
        assert (len(cut.tool_calls), cut.finish_reason) == (2, pb.FINISH_REASON_LENGTH)

    async def test_arguments_sent_as_an_object_come_back_as_its_json_with_the_characters_as_written(self) -> None:
        """A server that sends a call's ``arguments`` as an object rather than its JSON text: the
        call's arguments are that object's JSON, with the model's characters, not ``\\uXXXX``
        escapes."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            event = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        function = {"name": "get_weather", "arguments": {"city": "北京"}}
        piece = {"index": 0, "id": "call_1", "type": "function", "function": function}
        body = [chunk({"tool_calls": [piece]}), chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
        async with RawUpstream() as raw:
            raw.replies.append(Reply(body=chunks(*body)))
            adapter = OpenAIProvider("local", "", raw.url + "/v1", "openai_compatible", stream_usage=False)
            try:
                call = ProviderCall(model="m", provider_model="m", messages=(Message(Role.USER, "Weather?"),))
                finish = [event async for event in adapter.stream(call)][-1]
            finally:
                await adapter.aclose()
        assert isinstance(finish, ProviderFinish)
        assert [tool_call.arguments_json for tool_call in finish.tool_calls] == ['{"city": "北京"}']

    async def test_calls_without_an_id_get_one_and_the_loop_continues(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A server that streams calls without an ``id`` (vLLM, NIM, LM Studio): each call comes
        back with an id made up for it, unique across responses, and sending the calls back with
        their results is accepted (an empty id was refused INVALID_ARGUMENT) and reaches the model
        under those ids."""
        fake.enqueue(
            Script(chunks=(), tool_calls=CALLS, omit_tool_call_ids=True),
            Script(chunks=(), tool_calls=CALLS, omit_tool_call_ids=True),
            Script(text="Sunny, 14:05."),
        )
        question = [("user", "Weather in Paris, and the time in Rome?")]
        chat = build_chat(question, tools=[WEATHER, TIME])
        first = (await _complete(live_client, chat, "gpt-4o-mini"))[-1].completion
        second = (await _complete(live_client, chat, "gpt-4o-mini"))[-1].completion
        ids = [call.id for call in (*first.tool_calls, *second.tool_calls)]
        assert all(re.fullmatch(r"call_[0-9a-f]+_[01]", call_id) for call_id in ids)
        assert len(set(ids)) == 4
        turns = tool_turns(first, "", {call.id: "done" for call in first.tool_calls})
        await _complete(live_client, build_chat([*question, *turns], tools=[WEATHER, TIME]), "gpt-4o-mini")
        sent = fake.requests[-1].body["messages"]
        assert [call["id"] for call in sent[1]["tool_calls"]] == ids[:2]
        assert [turn["tool_call_id"] for turn in sent[2:4]] == ids[:2]


class TestToolTurnsHelper:
    def test_an_empty_result_is_sent_as_a_word_and_a_missing_one_is_named(self) -> None:
        """A void function's empty output would be refused as an empty turn: it is sent as
        "(no output)"; a call without a result, or a completion without calls, is a ValueError."""
        completion = pb.Completion(tool_calls=[_call("c1", "get_weather", "{}"), _call("c2", "get_time", "{}")])
        turns = tool_turns(completion, "", {"c1": "", "c2": "14:05"})
        assert [(t.tool_call_id, t.content) for t in turns[1:]] == [("c1", "(no output)"), ("c2", "14:05")]
        with pytest.raises(ValueError, match="c2"):
            tool_turns(completion, "", {"c1": "18 C"})
        with pytest.raises(ValueError, match="no tool calls"):
            tool_turns(pb.Completion(), "text", {})


class TestConversationsAreTranslated:
    async def test_openai_gets_assistant_tool_calls_and_tool_messages(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """OpenAI: the assistant turn carries ``tool_calls`` (function, arguments as text) and each
        result is a ``tool`` message naming its call."""
        await _complete(live_client, _conversation(), "gpt-4o-mini")
        assert fake.requests[-1].body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris, and the time in Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "Europe/Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
            {"role": "user", "content": "And tomorrow?"},
        ]

    async def test_anthropic_gets_tool_use_blocks_and_one_user_turn_of_results(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic: the calls are ``tool_use`` blocks after the assistant's text; both results are
        ``tool_result`` blocks of one user turn, which the next user text joins after them."""
        await _complete(live_client, _conversation(), "claude-sonnet")
        body: dict[str, Any] = fake.requests[-1].body
        assert body["system"] == "Be brief."
        assert body["messages"] == [
            {"role": "user", "content": "Weather in Paris, and the time in Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {"tz": "Europe/Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C, sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ]

    async def test_a_failed_call_is_an_error_result_for_anthropic_and_its_text_for_openai(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A ROLE_TOOL turn with ``tool_error``: Anthropic's ``tool_result`` says ``is_error``, the
        other result does not; OpenAI, which has no such flag, gets the content alone; a batch
        job keeps the flag (stored and read back)."""
        from routesvc.batches._store import QueuedRequest, decode_request, encode_request
        from routesvc.models import Message, Role

        chat = _conversation()
        chat.messages[3].tool_error = True
        chat.messages[3].content = "Error: the weather service timed out"
        await _complete(live_client, chat, "claude-sonnet")
        blocks = fake.requests[-1].body["messages"][2]["content"]
        assert [(b["tool_use_id"], b.get("is_error")) for b in blocks if b["type"] == "tool_result"] == [
            ("call_1", True),
            ("call_2", None),
        ]
        await _complete(live_client, chat, "gpt-4o-mini")
        results = [m for m in fake.requests[-1].body["messages"] if m["role"] == "tool"]
        assert results[0] == {"role": "tool", "tool_call_id": "call_1", "content": chat.messages[3].content}
        failed = Message(Role.TOOL, "Error: timed out", tool_call_id="call_1", tool_error=True)
        request = QueuedRequest((failed, Message(Role.TOOL, "14:05", tool_call_id="call_2")), 16)
        assert decode_request(encode_request(request)) == request

    async def test_tool_error_on_a_turn_that_is_not_a_tool_result_is_invalid(self, live_client: RouterClient) -> None:
        """``tool_error`` on a user turn: INVALID_ARGUMENT naming the field."""
        chat = build_chat([pb.Message(role=pb.ROLE_USER, content="hi", tool_error=True)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live_client.route(chat)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "chat.messages[0].tool_error"

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_call_ids_of_another_server_are_sent_in_a_form_each_api_takes(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """Ids another server made ("functions.get_weather:0", 50 characters): Anthropic takes only
        letters, digits, '_' and '-', OpenAI at most 40 characters; each call and its result get
        the same id in that form, and two calls stay apart."""
        odd, long = "functions.get_weather:0", "call_" + "x" * 45
        chat = build_chat(
            [
                ("user", "Weather in Paris, and the time in Rome?"),
                pb.Message(
                    role=pb.ROLE_ASSISTANT,
                    tool_calls=[_call(odd, "get_weather", '{"city": "Paris"}'), _call(long, "get_time", "{}")],
                ),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=odd, content="18 C"),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=long, content="14:05"),
            ],
            tools=[WEATHER, TIME],
        )
        await _complete(live_client, chat, model)
        body: dict[str, Any] = fake.requests[-1].body
        if prefix == "call":
            calls = [call["id"] for call in body["messages"][1]["tool_calls"]]
            results = [turn["tool_call_id"] for turn in body["messages"][2:4]]
            assert calls[0] == odd
            assert len(calls[1]) <= 40
        else:
            calls = [block["id"] for block in body["messages"][1]["content"]]
            results = [block["tool_use_id"] for block in body["messages"][2]["content"]]
            assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", call_id) for call_id in calls)
            assert calls[1] == long
        assert calls == results
        assert len(set(calls)) == 2

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_an_id_repeated_in_a_later_turn_is_sent_unique(
        self, live_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """A server that numbers each turn's calls from 0 repeats ids across turns; Anthropic refuses
        a request with a repeated tool_use id: each turn's call is sent under an id of its own, and
        each result under its call's."""

        def turn(arguments: str, result: str) -> list[pb.Message]:
            call = _call("functions.get_weather:0", "get_weather", arguments)
            return [
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content=result),
            ]

        chat = build_chat(
            [
                ("user", "Weather in Paris?"),
                *turn('{"city": "Paris"}', "18 C"),
                ("user", "And Rome?"),
                *turn('{"city": "Rome"}', "21 C"),
            ],
            tools=[WEATHER],
        )
        await _complete(live_client, chat, model)
        body: dict[str, Any] = fake.requests[-1].body
        if prefix == "call":
            calls = [m["tool_calls"][0]["id"] for m in body["messages"] if m.get("tool_calls")]
            results = [m["tool_call_id"] for m in body["messages"] if m["role"] == "tool"]
        else:
            blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
            calls = [b["id"] for b in blocks if b["type"] == "tool_use"]
            results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
        assert calls == results
        assert len(set(calls)) == 2

    async def test_anthropic_gets_an_assistant_turn_of_calls_only_and_empty_arguments_as_an_object(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """An assistant turn without text is its ``tool_use`` blocks alone; empty arguments are ``{}``."""
        chat = build_chat(
            [
                ("user", "What time is it?"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[_call("toolu_9", "get_time", "")]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="toolu_9", content="14:05"),
            ],
            tools=[TIME],
        )
        await _complete(live_client, chat, "claude-sonnet")
        assert fake.requests[-1].body["messages"][1:] == [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_time", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "14:05"}]},
        ]


@pytest.fixture
async def impatient_client(fake: FakeProvider) -> AsyncIterator[RouterClient]:
    """A live server that gives up on a model after 1.2 s without a chunk, and never retries.
    (1.2 s, not 0.5: the 0.3 s gaps of the tests must never look like a timeout to a loaded
    machine, a cold first request included, while the 1.8 s they add up to still exceeds it.)"""
    config = default_config()
    config["reliability"] = {
        "first_token_timeout_seconds": 1.2,
        "stream_idle_timeout_seconds": 1.2,
        "max_attempts": 1,
    }
    async with (
        Server(settings_from(config, live_environ(fake)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        yield client


class TestLiveness:
    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_reasoning_chunks_keep_a_slow_model_alive(
        self, impatient_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """Six reasoning chunks 0.3 s apart (1.8 s before any answer text, timeouts 1.2 s): the model
        is alive, its answer comes, and it was asked once."""
        fake.enqueue(Script(reasoning=("step ",) * 6, chunks=("42",), first_chunk_delay=0.3, chunk_delay=0.3))
        messages = await _complete(impatient_client, build_chat([("user", "6*7?")]), model)
        assert [m.delta.text for m in messages if m.WhichOneof("event") == "delta"] == ["42"]
        assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP
        assert len(fake.requests) == 1

    @pytest.mark.parametrize(("model", "path", "prefix"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_tool_call_pieces_keep_a_slow_model_alive(
        self, impatient_client: RouterClient, fake: FakeProvider, model: str, path: str, prefix: str
    ) -> None:
        """A call's arguments in six pieces 0.3 s apart, with no answer text at all: not cut."""
        fake.enqueue(
            Script(chunks=(), tool_calls=(FakeToolCall("get_weather", '{"city": "Paris"}', pieces=6),), chunk_delay=0.3)
        )
        messages = await _complete(impatient_client, build_chat([("user", "Paris?")], tools=[WEATHER]), model)
        assert list(messages[-1].completion.tool_calls) == [
            _call(f"{prefix}_fake_0", "get_weather", '{"city": "Paris"}')
        ]
        assert len(fake.requests) == 1

    async def test_an_attempt_cut_during_reasoning_is_billed_for_what_it_produced(
        self, live_server: Server, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Cut after four reasoning chunks: the failed attempt's estimate counts them as output (the
        provider bills reasoning), and the retry answers."""
        fake.enqueue(Script(reasoning=("thinking hard ",) * 6, fault=Fault.CUT, fault_after=4), Script(text="42"))
        messages = await _complete(live_client, build_chat([("user", "6*7?")]), "gpt-4o-mini")
        failed, answered = messages[-1].completion.attempts
        assert (failed.outcome, answered.outcome) == (pb.ATTEMPT_OUTCOME_FAILED, pb.ATTEMPT_OUTCOME_COMPLETED)
        assert failed.usage.output_tokens == count_text_tokens("thinking hard " * 4) > 0
        assert [entry.estimated for entry in live_server.router.ledger.entries()] == [True, False]
