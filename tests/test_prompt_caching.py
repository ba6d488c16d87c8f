"""Prompt-cache breakpoints: a marked turn or tool reaches Anthropic as ``cache_control`` on exactly
the block that ends the prefix (streamed, and in a batch queued across a restart), OpenAI's body is
what it would be unmarked, and a request Anthropic would refuse is INVALID_ARGUMENT naming the
field."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from routesvc.batches._store import QueuedRequest, decode_request, encode_request
from routesvc.client import RouterClient, build_chat
from routesvc.errors import ConfigError
from routesvc.models import CacheTtl, Message, Role, ToolSpec
from routesvc.server import Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from
from tests.test_batches import batch_config, wait_state
from tests.test_images import ANTHROPIC_PIXEL, PIXEL, data_part
from tests.test_validation import error_info

FIVE = pb.CACHE_BREAKPOINT_FIVE_MINUTES
HOUR = pb.CACHE_BREAKPOINT_ONE_HOUR
EPHEMERAL = {"type": "ephemeral"}
EPHEMERAL_1H = {"type": "ephemeral", "ttl": "1h"}


async def _complete(client: RouterClient, chat: pb.ChatRequest, **context: object) -> list[pb.CompleteResponse]:
    return [m async for m in client.complete(chat, pb.RoutingContext(**context))]  # type: ignore[arg-type]


def _turn(role: int, content: str = "", cache: int = 0, **fields: object) -> pb.Message:
    return pb.Message(role=role, content=content, cache_breakpoint=cache, **fields)  # type: ignore[arg-type]


def _tool_loop(*, result_cache: int = 0, first_result_cache: int = 0) -> pb.ChatRequest:
    """A user question, an assistant turn that made two calls, their two results, and a user turn
    that joins the results' turn on Anthropic."""
    calls = [pb.ToolCall(id="call_1", name="lookup"), pb.ToolCall(id="call_2", name="lookup")]
    return build_chat(
        [
            ("user", "Look both up"),
            _turn(pb.ROLE_ASSISTANT, tool_calls=calls),
            _turn(pb.ROLE_TOOL, "first", first_result_cache, tool_call_id="call_1"),
            _turn(pb.ROLE_TOOL, "second", result_cache, tool_call_id="call_2"),
            ("user", "Now compare them"),
        ],
        tools=[pb.Tool(name="lookup")],
    )


class TestAnthropicBody:
    async def test_a_marked_system_message_makes_system_a_list_of_blocks(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """With any system message marked, ``system`` is one text block per system message and only
        the marked one carries ``cache_control`` (five minutes: no ``ttl``); the blocks read as the
        unmarked string does (Anthropic joins blocks with nothing between them, so each but the
        last ends in the blank line the string has; they ran together); the unmarked user turn
        stays a string."""
        chat = build_chat([("system", "Long shared instructions"), ("system", "Today's note", "5m"), ("user", "Hello")])
        await _complete(live_client, chat, model="claude-sonnet")
        body = fake.requests[-1].body
        assert body["system"] == [
            {"type": "text", "text": "Long shared instructions\n\n"},
            {"type": "text", "text": "Today's note", "cache_control": EPHEMERAL},
        ]
        assert body["messages"] == [{"role": "user", "content": "Hello"}]

    async def test_a_marked_user_turn_with_string_content_becomes_one_marked_text_block(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A marked turn's text is one text block carrying ``cache_control`` (a string cannot carry
        it); a one-hour breakpoint adds ``"ttl": "1h"``; the unmarked turns are unchanged."""
        chat = build_chat(
            [("system", "Be brief"), ("user", "A long document", "1h"), ("assistant", "Read it"), ("user", "Summary?")]
        )
        await _complete(live_client, chat, model="claude-sonnet")
        body = fake.requests[-1].body
        assert body["system"] == "Be brief"
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "A long document", "cache_control": EPHEMERAL_1H}]},
            {"role": "assistant", "content": "Read it"},
            {"role": "user", "content": "Summary?"},
        ]

    async def test_a_marked_turn_with_images_marks_its_last_block(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A turn of text and images carries ``cache_control`` on its last block only (here the image)."""
        turn = _turn(pb.ROLE_USER, "What is this?", FIVE, parts=[data_part(PIXEL)])
        await _complete(live_client, build_chat([turn]), model="claude-sonnet")
        assert fake.requests[-1].body["messages"] == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": ANTHROPIC_PIXEL, "cache_control": EPHEMERAL},
                ],
            }
        ]

    async def test_a_marked_tool_result_keeps_its_marker_in_the_merged_turn(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Tool results and the user text after them are one Anthropic turn: the marker stays on the
        marked result's own block, not on the turn's last block."""
        await _complete(live_client, _tool_loop(first_result_cache=FIVE), model="claude-sonnet")
        assert fake.requests[-1].body["messages"][2] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "first", "cache_control": EPHEMERAL},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "second"},
                {"type": "text", "text": "Now compare them"},
            ],
        }

    async def test_a_marked_assistant_turn_with_tool_calls_marks_its_last_call(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """An assistant turn's breakpoint goes on its last ``tool_use`` block."""
        chat = _tool_loop()
        chat.messages[1].cache_breakpoint = FIVE
        await _complete(live_client, chat, model="claude-sonnet")
        blocks = fake.requests[-1].body["messages"][1]["content"]
        assert [block.get("cache_control") for block in blocks] == [None, EPHEMERAL]

    async def test_a_marked_tool_definition_carries_cache_control(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A marked tool's definition carries ``cache_control``; the other tools do not."""
        tools = [pb.Tool(name="lookup"), pb.Tool(name="clock", cache_breakpoint=HOUR)]
        await _complete(live_client, build_chat([("user", "What time is it?")], tools=tools), model="claude-sonnet")
        assert fake.requests[-1].body["tools"] == [
            {"name": "lookup", "input_schema": {"type": "object"}},
            {"name": "clock", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL_1H},
        ]

    async def test_a_marked_final_assistant_turn_is_still_a_prefill_without_trailing_whitespace(
        self, fake: FakeProvider
    ) -> None:
        """A marked prefill is one marked text block, still without the trailing whitespace
        Anthropic refuses (on a Claude model that takes a prefill: those before 4.6)."""
        config = default_config()
        config["models"][2]["unsupported_parameters"] = []  # type: ignore[index]
        chat = build_chat([("user", "Answer in JSON"), ("assistant", "{ \n", "5m")])
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await _complete(client, chat, model="claude-sonnet")
        assert fake.requests[-1].body["messages"][-1] == {
            "role": "assistant",
            "content": [{"type": "text", "text": "{", "cache_control": EPHEMERAL}],
        }


class TestOpenAIBody:
    async def test_markers_leave_the_openai_body_unchanged(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """OpenAI caches long prefixes by itself: a request with breakpoints on a system turn, a user
        turn, a tool result and a tool sends the body the same request sends unmarked."""
        marked = _tool_loop(result_cache=FIVE)
        marked.messages.insert(0, _turn(pb.ROLE_SYSTEM, "Be brief", HOUR))
        marked.tools[0].cache_breakpoint = HOUR
        plain = _tool_loop()
        plain.messages.insert(0, _turn(pb.ROLE_SYSTEM, "Be brief"))
        await _complete(live_client, marked, model="gpt-4o-mini")
        await _complete(live_client, plain, model="gpt-4o-mini")
        assert fake.requests[-2].body == fake.requests[-1].body
        assert "cache_control" not in json.dumps(fake.requests[-2].body)


def _chat_with(count: int, cache: int = FIVE) -> pb.ChatRequest:
    """``count`` marked user/assistant turn pairs' user turns, then a final question."""
    turns: list[pb.Message] = []
    for index in range(count):
        turns += [_turn(pb.ROLE_USER, f"part {index}", cache), _turn(pb.ROLE_ASSISTANT, "noted")]
    return build_chat([*turns, ("user", "Go on")])


ONE_HOUR_AFTER_FIVE = build_chat([("system", "Rules", "5m"), ("user", "Long context", "1h")])
# A system message comes before every other turn in Anthropic's prompt, wherever it is in the list.
SYSTEM_AFTER_A_TURN = build_chat([("user", "Long context", "1h"), ("system", "Rules", "5m"), ("user", "Go")])
TOOL_AFTER_SYSTEM = build_chat(
    [("system", "Rules", "5m"), ("user", "Go")], tools=[pb.Tool(name="t", cache_breakpoint=HOUR)]
)
BAD_BREAKPOINTS = [
    ("five breakpoints", _chat_with(5), "chat.messages[8].cache_breakpoint"),
    (
        "five with a tool",
        build_chat(
            [("system", "Rules", "5m")] + [("user", f"part {n}", "5m") for n in range(3)] + [("user", "Go")],
            tools=[pb.Tool(name="t", cache_breakpoint=FIVE)],
        ),
        "chat.messages[3].cache_breakpoint",
    ),
    ("unknown value on a message", build_chat([_turn(pb.ROLE_USER, "Go", 7)]), "chat.messages[0].cache_breakpoint"),
    (
        "unknown value on a tool",
        build_chat([("user", "Go")], tools=[pb.Tool(name="t", cache_breakpoint=3)]),  # type: ignore[arg-type]
        "chat.tools[0].cache_breakpoint",
    ),
    ("one hour after five minutes", ONE_HOUR_AFTER_FIVE, "chat.messages[1].cache_breakpoint"),
    ("a turn's one hour after a later system five minutes", SYSTEM_AFTER_A_TURN, "chat.messages[0].cache_breakpoint"),
]


class TestValidation:
    @pytest.mark.parametrize(
        ("chat", "field"), [case[1:] for case in BAD_BREAKPOINTS], ids=[case[0] for case in BAD_BREAKPOINTS]
    )
    async def test_a_request_anthropic_would_refuse_is_invalid_argument_naming_the_field(
        self, client: RouterClient, chat: pb.ChatRequest, field: str
    ) -> None:
        """More than 4 breakpoints (the fifth in prompt order: tools, system, other turns is named),
        an unknown value, or a one-hour breakpoint after a five-minute one are INVALID_ARGUMENT,
        reason INVALID_REQUEST, with the field in the details and the ErrorInfo."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(chat, pb.RoutingContext())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(f"{field}: ")
        info = error_info(caught.value)
        assert (info.reason, info.metadata["field"]) == ("INVALID_REQUEST", field)

    @pytest.mark.parametrize(
        "chat",
        [
            _chat_with(4),
            build_chat([("system", "Rules", "1h"), ("user", "Long context", "5m"), ("user", "Go")]),
            build_chat([("user", "Long context", "5m"), ("system", "Rules", "1h"), ("user", "Go")]),
            TOOL_AFTER_SYSTEM,
        ],
        ids=[
            "four breakpoints",
            "one hour then five minutes",
            "a one-hour system turn after a five-minute turn",
            "a one-hour tool before a five-minute system turn",
        ],
    )
    async def test_four_breakpoints_and_one_hour_ones_first_are_served(
        self, live_client: RouterClient, fake: FakeProvider, chat: pb.ChatRequest
    ) -> None:
        """Four breakpoints, and one-hour breakpoints before five-minute ones in prompt order (a
        tool comes before every message), reach Anthropic."""
        messages = await _complete(live_client, chat, model="claude-sonnet")
        assert messages[-1].completion.model == "claude-sonnet"
        assert json.dumps(fake.requests[-1].body).count('"cache_control"') == sum(
            1 for m in chat.messages if m.cache_breakpoint
        ) + sum(1 for t in chat.tools if t.cache_breakpoint)

    async def test_a_lower_configured_limit_is_enforced(self) -> None:
        """``limits.max_cache_breakpoints`` lowers the limit; the first breakpoint over it is named."""
        config = default_config()
        config["limits"] = {"max_cache_breakpoints": 1}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(_chat_with(2), pb.RoutingContext())
        assert error_info(caught.value).metadata["field"] == "chat.messages[2].cache_breakpoint"

    def test_a_limit_over_anthropics_four_is_a_config_error(self) -> None:
        """Anthropic refuses more than 4 breakpoints, so the limit cannot be raised past it."""
        config = default_config()
        config["limits"] = {"max_cache_breakpoints": 5}
        with pytest.raises(ConfigError, match="max_cache_breakpoints: Input should be less than or equal to 4"):
            settings_from(config)


class TestBatch:
    @pytest.mark.parametrize("task", ["creative_writing", ""], ids=["anthropic", "openai"])
    async def test_the_markers_of_a_job_queued_across_a_restart_reach_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """A job still queued at shutdown keeps its breakpoints in the store: the next server's
        Anthropic batch carries ``cache_control`` where they were (OpenAI's carries none)."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        chat = build_chat(
            [("system", "Long rules", "1h"), ("user", "Summarise this report", "5m")],
            tools=[pb.Tool(name="lookup", cache_breakpoint=HOUR)],
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
        if task == "":
            assert "cache_control" not in json.dumps(fake.batches[0].requests[0]["body"])
            return
        params = fake.batches[0].requests[0]["params"]
        assert params["system"] == [{"type": "text", "text": "Long rules", "cache_control": EPHEMERAL_1H}]
        assert params["tools"][0]["cache_control"] == EPHEMERAL_1H
        assert params["messages"] == [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Summarise this report", "cache_control": EPHEMERAL}],
            }
        ]

    def test_a_stored_request_without_markers_decodes_with_none(self) -> None:
        """Rows stored before breakpoints were kept decode with none; stored ones come back."""
        marked = QueuedRequest(
            (Message(Role.USER, "hi", cache_breakpoint=CacheTtl.ONE_HOUR),),
            10,
            None,
            (ToolSpec("t", cache_breakpoint=CacheTtl.FIVE_MINUTES),),
        )
        assert decode_request(encode_request(marked)) == marked
        old = json.loads(encode_request(marked))
        del old["messages"][0]["cache_breakpoint"], old["tools"][0]["cache_breakpoint"]
        decoded = decode_request(json.dumps(old))
        assert (decoded.messages[0].cache_breakpoint, decoded.tools[0].cache_breakpoint) == (None, None)


class TestClient:
    def test_build_chat_takes_a_cache_marker_per_message(self) -> None:
        """A third item "5m" or "1h" marks the turn; anything else is a ValueError."""
        chat = build_chat([("system", "Rules", "1h"), ("user", "Hi", "5m"), ("user", "Go")])
        assert [m.cache_breakpoint for m in chat.messages] == [HOUR, FIVE, pb.CACHE_BREAKPOINT_UNSPECIFIED]
        with pytest.raises(ValueError, match="'5m' or '1h'"):
            build_chat([("user", "Hi", "10m")])
