"""Bad input: a precise status naming the field, never echoing prompt text, never UNKNOWN."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from routesvc.client import RouterClient
from routesvc.server import Server
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import default_config, loopback_channel, settings_from, user_chat

CANARY = "canary-prompt-7f3a9"


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo in the trailers")


def _chat(*messages: tuple[int, str], **fields: object) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role=r, content=c) for r, c in messages], **fields)  # type: ignore[arg-type]


def _turns(*turns: pb.Message) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=CANARY), *turns])


def _calls(*calls: pb.ToolCall, content: str = "") -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=content, tool_calls=calls)


def _result(call_id: str, content: str = CANARY) -> pb.Message:
    return pb.Message(role=pb.ROLE_TOOL, tool_call_id=call_id, content=content)


def _chat_turn() -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=CANARY)


CALL = pb.ToolCall(id="call_1", name="lookup", arguments_json='{"q": "x"}')
# (case, the turns after a first user turn, the field named): messages[1] is the first of them.
BAD_TOOL_TURNS: list[tuple[str, tuple[pb.Message, ...], str]] = [
    ("tool turn without a call id", (_calls(CALL), _result("")), "chat.messages[2].tool_call_id"),
    ("tool turn naming no earlier call", (_calls(CALL), _result(CANARY)), "chat.messages[2].tool_call_id"),
    ("tool turn before its call", (_result("call_1"), _calls(CALL)), "chat.messages[1].tool_call_id"),
    ("tool turn without content", (_calls(CALL), _result("call_1", " ")), "chat.messages[2].content"),
    ("call without an id", (_calls(pb.ToolCall(name="lookup")),), "chat.messages[1].tool_calls[0].id"),
    ("call with a bad name", (_calls(pb.ToolCall(id="c", name=f"{CANARY} !")),), "chat.messages[1].tool_calls[0].name"),
    (
        "call arguments with a number too large for a float",
        (_calls(pb.ToolCall(id="c", name="lookup", arguments_json='{"n": 1e400}')),),
        "chat.messages[1].tool_calls[0].arguments_json",
    ),
    (
        "call arguments not an object",
        (_calls(CALL, pb.ToolCall(id="c2", name="lookup", arguments_json=f'["{CANARY}"]')),),
        "chat.messages[1].tool_calls[1].arguments_json",
    ),
    (
        "call arguments not JSON",
        (_calls(pb.ToolCall(id="c", name="lookup", arguments_json=f"{{{CANARY}")),),
        "chat.messages[1].tool_calls[0].arguments_json",
    ),
    (
        "tool calls on a user turn",
        (pb.Message(role=pb.ROLE_USER, content=CANARY, tool_calls=[CALL]),),
        "chat.messages[1].tool_calls",
    ),
    (
        "call id on an assistant turn",
        (pb.Message(role=pb.ROLE_ASSISTANT, content=CANARY, tool_call_id="call_1"),),
        "chat.messages[1].tool_call_id",
    ),
    ("assistant turn without text or calls", (_calls(),), "chat.messages[1].content"),
    (
        "result after an intervening user turn",
        (_calls(CALL), _chat_turn(), _result("call_1")),
        "chat.messages[1].tool_calls[0]",
    ),
    (
        "result for a call of an older assistant turn",
        (
            _calls(CALL),
            _result("call_1"),
            _calls(pb.ToolCall(id="call_2", name="lookup")),
            _result("call_1"),
        ),
        "chat.messages[4].tool_call_id",
    ),
    (
        "a call left without a result",
        (_calls(CALL, pb.ToolCall(id="call_2", name="lookup")), _result("call_1"), _chat_turn()),
        "chat.messages[1].tool_calls[1]",
    ),
    ("a conversation ending on an unanswered call", (_calls(CALL),), "chat.messages[1].tool_calls[0]"),
    ("two results for one call", (_calls(CALL), _result("call_1"), _result("call_1")), "chat.messages[3].tool_call_id"),
    ("a call id used twice in one turn", (_calls(CALL, CALL), _result("call_1")), "chat.messages[1].tool_calls[1].id"),
    (
        "call arguments escaping a lone surrogate",  # no UTF-8 form: the provider call would fail
        (_calls(pb.ToolCall(id="c", name="lookup", arguments_json='{"q": "\\ud800"}')),),
        "chat.messages[1].tool_calls[0].arguments_json",
    ),
]

JSON_SCHEMA = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
# (case, the response format, the field named)
BAD_RESPONSE_FORMATS: list[tuple[str, pb.ResponseFormat, str]] = [
    ("unknown type", pb.ResponseFormat(type=9), "chat.response_format.type"),  # type: ignore[arg-type]
    (
        "a name with JSON_OBJECT",
        pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, name="answer"),
        "chat.response_format.name",
    ),
    (
        "a schema with TEXT",
        pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT, schema_json=f'{{"title": "{CANARY}"}}'),
        "chat.response_format.schema_json",
    ),
    ("a schema with no type", pb.ResponseFormat(schema_json='{"type": "object"}'), "chat.response_format.schema_json"),
    (
        "strict with JSON_OBJECT",
        pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, strict=True),
        "chat.response_format.strict",
    ),
    ("a schema without a name", pb.ResponseFormat(type=JSON_SCHEMA, schema_json="{}"), "chat.response_format.name"),
    (
        "a bad schema name",
        pb.ResponseFormat(type=JSON_SCHEMA, name=f"{CANARY} !", schema_json="{}"),
        "chat.response_format.name",
    ),
    (
        "a name 65 long",
        pb.ResponseFormat(type=JSON_SCHEMA, name="a" * 65, schema_json="{}"),
        "chat.response_format.name",
    ),
    (
        "JSON_SCHEMA without a schema",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer"),
        "chat.response_format.schema_json",
    ),
    (
        "a schema that is not an object",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer", schema_json=f'["{CANARY}"]'),
        "chat.response_format.schema_json",
    ),
    (
        "a schema that is not JSON",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer", schema_json=f"{{{CANARY}"),
        "chat.response_format.schema_json",
    ),
    (
        "a schema with a number too large for a float",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer", schema_json='{"maximum": -1E+999}'),
        "chat.response_format.schema_json",
    ),
    (
        "a schema name ending in a newline",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer\n", schema_json="{}"),
        "chat.response_format.name",
    ),
    (
        "a schema with a lone surrogate",
        pb.ResponseFormat(type=JSON_SCHEMA, name="answer", schema_json='{"description": "\\ud800"}'),
        "chat.response_format.schema_json",
    ),
]

USER = pb.ROLE_USER
BAD_REQUESTS: list[tuple[str, pb.ChatRequest, pb.RoutingContext, str]] = [
    ("no messages", pb.ChatRequest(), pb.RoutingContext(), "chat.messages"),
    ("unspecified role", _chat((USER, CANARY), (0, CANARY)), pb.RoutingContext(), "chat.messages[1].role"),
    ("unknown role number", _chat((USER, CANARY), (42, CANARY)), pb.RoutingContext(), "chat.messages[1].role"),
    ("empty content", _chat((USER, "  \n")), pb.RoutingContext(), "chat.messages[0].content"),
    ("only a system message", _chat((pb.ROLE_SYSTEM, CANARY)), pb.RoutingContext(), "chat.messages"),
    ("zero max tokens", _chat((USER, CANARY), max_output_tokens=0), pb.RoutingContext(), "chat.max_output_tokens"),
    (
        "negative max tokens",
        _chat((USER, CANARY), max_output_tokens=-5),
        pb.RoutingContext(),
        "chat.max_output_tokens",
    ),
    (
        "absurd max tokens",
        _chat((USER, CANARY), max_output_tokens=2_000_000_000),
        pb.RoutingContext(),
        "chat.max_output_tokens",
    ),
    ("temperature", _chat((USER, CANARY), temperature=7.5), pb.RoutingContext(), "chat.temperature"),
    ("five stop sequences", _chat((USER, CANARY), stop=[CANARY] * 5), pb.RoutingContext(), "chat.stop"),
    ("an empty stop sequence", _chat((USER, CANARY), stop=[CANARY, "END", ""]), pb.RoutingContext(), "chat.stop[2]"),
    (
        "a stop sequence over 256 characters",
        _chat((USER, CANARY), stop=["END", CANARY * 20]),
        pb.RoutingContext(),
        "chat.stop[1]",
    ),
    (
        "tool name",
        _chat((USER, CANARY), tools=[pb.Tool(name=f"bad name {CANARY}")]),
        pb.RoutingContext(),
        "chat.tools[0].name",
    ),
    (
        "tool name ending in a newline",  # "$" matched before it: sent upstream, refused there
        _chat((USER, CANARY), tools=[pb.Tool(name="lookup\n")]),
        pb.RoutingContext(),
        "chat.tools[0].name",
    ),
    (
        "tool schema",
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json=f'["{CANARY}"]')]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema with a number too large for a float",  # read as inf: the SDKs refused to send it (UNAVAILABLE)
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json='{"type": "number", "maximum": 1e400}')]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema with NaN",  # json.loads reads it; the SDKs refuse to send it upstream
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json='{"type": "number", "maximum": NaN}')]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema nested 100,000 deep",  # was RecursionError -> INTERNAL
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json="[" * 100_000)]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema nested 65 deep",
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json='{"a":' * 65 + "1" + "}" * 65)]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema with a lone surrogate",  # json.loads reads it; encoding it for upstream failed (UNAVAILABLE)
        _chat((USER, CANARY), tools=[pb.Tool(name="ok", parameters_json='{"description": "\\ud800"}')]),
        pb.RoutingContext(),
        "chat.tools[0].parameters_json",
    ),
    (
        "tool schema with a lone surrogate in a nested key",
        _chat(
            (USER, CANARY),
            tools=[
                pb.Tool(name="ok"),
                pb.Tool(name="two", parameters_json='{"properties": {"a\\udfffb": {"type": "string"}}}'),
            ],
        ),
        pb.RoutingContext(),
        "chat.tools[1].parameters_json",
    ),
    (
        "a tool choice without tools",
        _chat((USER, CANARY), tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        pb.RoutingContext(),
        "chat.tool_choice",
    ),
    (
        "a tool choice naming a tool not offered",
        _chat(
            (USER, CANARY),
            tools=[pb.Tool(name="ok")],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, name=CANARY),
        ),
        pb.RoutingContext(),
        "chat.tool_choice.name",
    ),
    (
        "a tool choice of mode TOOL without a name",
        _chat((USER, CANARY), tools=[pb.Tool(name="ok")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL)),
        pb.RoutingContext(),
        "chat.tool_choice.name",
    ),
    (
        "a tool choice with a name and mode AUTO",
        _chat(
            (USER, CANARY),
            tools=[pb.Tool(name="ok")],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO, name="ok"),
        ),
        pb.RoutingContext(),
        "chat.tool_choice.name",
    ),
    (
        "an unknown tool choice mode",
        _chat((USER, CANARY), tools=[pb.Tool(name="ok")], tool_choice=pb.ToolChoice(mode=42)),  # type: ignore[arg-type]
        pb.RoutingContext(),
        "chat.tool_choice.mode",
    ),
    (
        "parallel tool calls without tools",
        _chat((USER, CANARY), parallel_tool_calls=False),
        pb.RoutingContext(),
        "chat.parallel_tool_calls",
    ),
    *[
        (f"response format: {name}", _chat((USER, CANARY), response_format=response_format), pb.RoutingContext(), field)
        for name, response_format, field in BAD_RESPONSE_FORMATS
    ],
    *[(f"tool turns: {name}", _turns(*turns), pb.RoutingContext(), field) for name, turns, field in BAD_TOOL_TURNS],
    ("max cost", _chat((USER, CANARY)), pb.RoutingContext(max_cost_usd=CANARY), "context.max_cost_usd"),
    ("negative max cost", _chat((USER, CANARY)), pb.RoutingContext(max_cost_usd="-1"), "context.max_cost_usd"),
    (
        "max cost 1e-999999",  # its error message once expanded it to 1 MB of trailers
        _chat((USER, CANARY)),
        pb.RoutingContext(max_cost_usd="1e-999999"),
        "context.max_cost_usd",
    ),
    ("max cost 1e30", _chat((USER, CANARY)), pb.RoutingContext(max_cost_usd="1e30"), "context.max_cost_usd"),
    (
        "max cost just over 1e24",
        _chat((USER, CANARY)),
        pb.RoutingContext(max_cost_usd="9.99E+24"),
        "context.max_cost_usd",
    ),
    ("max cost in other digits", _chat((USER, CANARY)), pb.RoutingContext(max_cost_usd="١٢"), "context.max_cost_usd"),
    ("max cost 1_0", _chat((USER, CANARY)), pb.RoutingContext(max_cost_usd="1_0"), "context.max_cost_usd"),
]


class TestInvalidArgument:
    @pytest.mark.parametrize(
        ("chat", "context", "field"), [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
    )
    async def test_route_names_the_field_and_never_echoes_content(
        self, client: RouterClient, chat: pb.ChatRequest, context: pb.RoutingContext, field: str
    ) -> None:
        """Each malformed request is INVALID_ARGUMENT, reason INVALID_REQUEST, naming the field."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(chat, context)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field}: ")
        assert CANARY not in (error.details() or "")
        info = error_info(error)
        assert (info.reason, info.domain, info.metadata["field"]) == ("INVALID_REQUEST", "routesvc", field)

    @pytest.mark.parametrize(
        ("chat", "context", "field"), [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
    )
    async def test_complete_rejects_before_any_message(
        self, client: RouterClient, chat: pb.ChatRequest, context: pb.RoutingContext, field: str
    ) -> None:
        """Complete answers the same status before streaming anything."""
        received: list[pb.CompleteResponse] = []

        async def read_all() -> None:
            async for message in client.complete(chat, context):
                received.append(message)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
        assert (caught.value.code(), received) == (grpc.StatusCode.INVALID_ARGUMENT, [])
        assert error_info(caught.value).metadata["field"] == field


class TestToolSchemaText:
    async def test_an_escaped_surrogate_pair_is_accepted(self, client: RouterClient) -> None:
        """A pair of surrogate escapes is one character with a UTF-8 form: the schema is routed."""
        chat = _chat((USER, "hi"), tools=[pb.Tool(name="ok", parameters_json='{"description": "\\ud83d\\ude00"}')])
        decision = await client.route(chat)
        assert decision.model != ""


class TestSizeLimits:
    async def test_too_many_messages_is_resource_exhausted(self, client: RouterClient) -> None:
        """10,000 messages exceed the default limit of 1,000."""
        chat = _chat(*[(USER, "x")] * 10_000)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(chat)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "REQUEST_TOO_LARGE"

    async def test_oversized_request_is_resource_exhausted(self, client: RouterClient) -> None:
        """A request over max_request_bytes is refused without echoing it."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(user_chat(CANARY * 300_000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert CANARY not in (caught.value.details() or "")

    async def test_the_transport_refuses_more_than_1_kib_over_the_limit_without_error_info(self) -> None:
        """As docs/api.md says: up to 1 KiB over limits.max_request_bytes is REQUEST_TOO_LARGE with
        its ErrorInfo; beyond that gRPC's receive limit refuses the message, RESOURCE_EXHAUSTED with
        no ErrorInfo."""
        config = default_config()
        config["limits"] = {"max_request_bytes": 10_000}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            refused: dict[int, grpc.aio.AioRpcError] = {}
            for over in (1, 1024 - 16, 1024 + 16):
                size = 10_000 + over
                # The prompt that makes the whole request exactly ``size`` bytes (a few bytes go to
                # field tags and length prefixes).
                (chat,) = [
                    chat
                    for length in range(size - 16, size)
                    if pb.RouteRequest(chat=(chat := user_chat("x" * length))).ByteSize() == size
                ]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.route(chat)
                refused[over] = caught.value
        assert {over: error.code() for over, error in refused.items()} == dict.fromkeys(
            refused, grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert (error_info(refused[1]).reason, error_info(refused[1024 - 16]).reason) == ("REQUEST_TOO_LARGE",) * 2
        with pytest.raises(AssertionError, match="no ErrorInfo"):
            error_info(refused[1024 + 16])

    async def test_too_many_tools_is_resource_exhausted(self, client: RouterClient) -> None:
        """More tools than max_tools are refused."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(user_chat("hi", tools=[pb.Tool(name=f"t{i}") for i in range(200)]))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class TestWireLevel:
    async def test_invalid_utf8_is_invalid_argument(self, client: RouterClient, server: object) -> None:
        """A string field with bytes that are not UTF-8 is INVALID_ARGUMENT, not UNKNOWN."""
        message = bytes([0x08, 0x02, 0x12, 0x02, 0xFF, 0xFE])  # Message{role: USER, content: b"\xff\xfe"}
        chat = bytes([0x0A, len(message)]) + message
        request = bytes([0x0A, len(chat)]) + chat
        async with loopback_channel(server.target) as channel:  # type: ignore[attr-defined]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/routesvc.v1.RouterService/Route")(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "request"

    async def test_a_stop_sequence_with_a_lone_surrogate_is_invalid_argument(
        self, client: RouterClient, server: object
    ) -> None:
        """A stop sequence whose bytes encode a lone surrogate (not UTF-8) is INVALID_ARGUMENT."""
        chat = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hi")]).SerializeToString()
        chat += bytes([0x2A, 0x03, 0xED, 0xA0, 0x80])  # stop: "\ud800" as UTF-8 would spell it
        request = bytes([0x0A, len(chat)]) + chat
        async with loopback_channel(server.target) as channel:  # type: ignore[attr-defined]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/routesvc.v1.RouterService/Route")(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "request"

    async def test_metadata_up_to_16_kib_is_taken_every_time_and_more_refused(self, client: RouterClient) -> None:
        """Request metadata of 12 KB is served on every call (grpc's default soft limit of 8 KiB
        refused such calls at random, with no ErrorInfo), and over 16 KiB is refused by the
        transport with RESOURCE_EXHAUSTED, as is 64 KiB."""
        for _ in range(20):
            await client.route(user_chat("hi"), metadata={"x-padding": "a" * 12_000})
        for size in (16_500, 65_536):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hi"), metadata={"x-padding": "a" * size})
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# Unknown ids of the 1024 characters validation takes, whole in an error message: "é" is 6 bytes
# percent-encoded in grpc-message, U+E0001 10 characters in the quote ('\U000e0001'). With the
# status details the trailers passed the client's 8 KiB metadata soft limit (refused at random)
# or its 16 KiB hard limit (always): RESOURCE_EXHAUSTED without ErrorInfo, not NOT_FOUND.
LONG_IDS = ["é" * 1024, "\U000e0001" * 1024, "\x01" * 1024]
LONG_ID_NAMES = ["e-acute", "tag-character", "control"]


class TestCallerIdsInErrors:
    @pytest.mark.parametrize("model", LONG_IDS, ids=LONG_ID_NAMES)
    async def test_a_long_unknown_model_is_not_found_every_time_on_route_and_complete(
        self, client: RouterClient, model: str
    ) -> None:
        """A pinned model that is no catalog id is NOT_FOUND with MODEL_NOT_FOUND on every call,
        however long the id: the message quotes its first 64 characters only."""
        context = pb.RoutingContext(model=model)
        refused: list[tuple[grpc.StatusCode, str, str]] = []
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as routed:
                await client.route(user_chat("hi"), context)
            with pytest.raises(grpc.aio.AioRpcError) as completed:
                [m async for m in client.complete(user_chat("hi"), context)]
            for error in (routed.value, completed.value):
                refused.append((error.code(), error_info(error).reason, str(error.details())))
        quoted = f"unknown model {model[:64]!r}...; known models: "
        assert {(code, reason) for code, reason, _ in refused} == {(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")}
        assert all(details.startswith(quoted) for _, _, details in refused)

    async def test_a_long_tenant_name_in_a_limit_error_is_quoted_short(self) -> None:
        """A tenant's limit error quotes its name like any caller-given id: a configured name of
        1024 characters still gives RESOURCE_EXHAUSTED with its ErrorInfo reason."""
        tenant = "\U000e0001" * 1024
        config = default_config()
        config["tenants"] = {tenant: {"route_requests_per_minute": 1}}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            await client.route(user_chat("hi"), pb.RoutingContext(tenant=tenant))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hi"), pb.RoutingContext(tenant=tenant))
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        assert str(caught.value.details()).startswith(f"tenant {tenant[:64]!r}... is over its 1 Route calls")


class TestGetStatsRequest:
    @pytest.mark.parametrize(
        "window",
        [
            duration_pb2.Duration(seconds=1, nanos=1_500_000_000),
            duration_pb2.Duration(seconds=1, nanos=-999_999_999),
            duration_pb2.Duration(seconds=2**63 - 1),
            duration_pb2.Duration(seconds=315_576_000_001),
        ],
        ids=["nanos-over-a-second", "nanos-of-the-other-sign", "int64-max-seconds", "over-10000-years"],
    )
    async def test_a_window_that_is_no_valid_duration_is_invalid_argument(
        self, server: Server, window: duration_pb2.Duration
    ) -> None:
        """A window outside google.protobuf.Duration's own rules is INVALID_ARGUMENT naming it (it
        was read as some other length)."""
        async with loopback_channel(server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.RouterServiceStub(channel).GetStats(pb.GetStatsRequest(window=window))
        assert (caught.value.code(), error_info(caught.value).metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "window",
        )

    async def test_a_tenant_over_1024_characters_is_invalid_argument(self, client: RouterClient) -> None:
        """GetStats's tenant is held to context.tenant's limit, with its message (a tenant of
        1 MB was taken and echoed back in the answer); 1024 characters are taken."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.get_stats(tenant="t" * 1025)
        taken = await client.get_stats(tenant="t" * 1024, window_seconds=1e9)
        assert (caught.value.code(), caught.value.details(), error_info(caught.value).metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "tenant: must be at most 1024 characters",
            "tenant",
        )
        assert taken.tenant == "t" * 1024
