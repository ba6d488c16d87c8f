"""Request parameters beyond the messages: each reaches each provider in its own wire format (the
bodies the real SDKs sent to the fake), and a request a provider would refuse is routed elsewhere."""

from __future__ import annotations

import json

import grpc
import pytest

from routesvc.client import RouterClient, build_chat
from routesvc.errors import ConfigError
from routesvc.server import Server
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import add_local_model, default_config, live_environ, settings_from, user_chat
from tests.test_validation import error_info

# Each adapter: the pinned model, and what it calls the stop sequences in its body.
ADAPTERS = [("gpt-4o-mini", "stop"), ("claude-sonnet", "stop_sequences")]
ADAPTER_IDS = ["openai", "anthropic"]


async def _complete(client: RouterClient, chat: pb.ChatRequest, model: str) -> list[pb.CompleteResponse]:
    return [m async for m in client.complete(chat, pb.RoutingContext(model=model))]


def _excluded(decision: pb.RouteDecision) -> dict[str, str]:
    return {c.model: c.excluded_reason for c in decision.candidates if not c.eligible}


class TestStopSequences:
    @pytest.mark.parametrize(("model", "field"), ADAPTERS, ids=ADAPTER_IDS)
    async def test_stop_sequences_reach_the_provider_in_its_field(
        self, live_client: RouterClient, fake: FakeProvider, model: str, field: str
    ) -> None:
        """``chat.stop`` is sent as OpenAI's ``stop`` and Anthropic's ``stop_sequences``, in order."""
        chat = user_chat("Count to ten", stop=["END", "Observation:", " \n7"])
        await _complete(live_client, chat, model)
        assert fake.requests[-1].body[field] == ["END", "Observation:", " \n7"]

    @pytest.mark.parametrize(("model", "reason"), [("gpt-4o-mini", "stop"), ("claude-sonnet", "stop_sequence")])
    async def test_stopping_at_a_sequence_is_finish_reason_stop(
        self, live_client: RouterClient, fake: FakeProvider, model: str, reason: str
    ) -> None:
        """A model that stopped at a stop sequence (OpenAI "stop", Anthropic "stop_sequence") finished
        with FINISH_REASON_STOP."""
        fake.enqueue(Script(text="1 2 3", finish_reason=reason))
        messages = await _complete(live_client, user_chat("Count to ten", stop=["4"]), model)
        assert messages[-1].completion.finish_reason == pb.FINISH_REASON_STOP

    async def test_a_whitespace_only_sequence_is_not_routed_to_anthropic(self, client: RouterClient) -> None:
        """Anthropic refuses a stop sequence of whitespace only: creative writing, which goes to
        claude-sonnet, goes elsewhere, and the candidates say why."""
        context = pb.RoutingContext(task_hint="creative_writing")
        usual = await client.route(user_chat("Write a poem", stop=["END"]), context)
        decision = await client.route(user_chat("Write a poem", stop=["END", "\n"]), context)
        assert (usual.model, decision.model) == ("claude-sonnet", "gpt-4o-mini")
        assert _excluded(decision) == {
            "claude-sonnet": "provider kind anthropic refuses a stop sequence of whitespace only"
        }

    def test_build_chat_sets_stop(self) -> None:
        """The Python client's ``build_chat`` takes the stop sequences."""
        assert list(build_chat([("user", "hi")], stop=["END"]).stop) == ["END"]


LOOKUP = pb.Tool(name="lookup", parameters_json='{"type": "object", "properties": {"q": {"type": "string"}}}')
CLOCK = pb.Tool(name="clock")
# Each mode: the request's ToolChoice, what OpenAI gets, what Anthropic gets.
TOOL_CHOICES: list[tuple[pb.ToolChoice, object, object]] = [
    (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO), "auto", {"type": "auto"}),
    (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), "none", {"type": "none"}),
    (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), "required", {"type": "any"}),
    (
        pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_TOOL, name="clock"),
        {"type": "function", "function": {"name": "clock"}},
        {"type": "tool", "name": "clock"},
    ),
]
TOOL_CHOICE_IDS = ["auto", "none", "required", "tool"]


class TestToolChoice:
    @pytest.mark.parametrize(("choice", "openai", "anthropic"), TOOL_CHOICES, ids=TOOL_CHOICE_IDS)
    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"], ids=ADAPTER_IDS)
    async def test_each_mode_reaches_the_provider_in_its_form(
        self,
        live_client: RouterClient,
        fake: FakeProvider,
        model: str,
        choice: pb.ToolChoice,
        openai: object,
        anthropic: object,
    ) -> None:
        """``chat.tool_choice`` is sent as each API spells it beside the tools."""
        chat = user_chat("What time is it?", tools=[LOOKUP, CLOCK], tool_choice=choice)
        await _complete(live_client, chat, model)
        expected = openai if model == "gpt-4o-mini" else anthropic
        assert fake.requests[-1].body["tool_choice"] == expected

    @pytest.mark.parametrize(
        ("choice", "anthropic"),
        [
            (None, {"type": "auto", "disable_parallel_tool_use": True}),
            (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), {"type": "any", "disable_parallel_tool_use": True}),
            (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), {"type": "none"}),
        ],
        ids=["no mode", "required", "none"],
    )
    async def test_no_parallel_calls_is_disable_parallel_tool_use_for_anthropic(
        self, live_client: RouterClient, fake: FakeProvider, choice: pb.ToolChoice | None, anthropic: object
    ) -> None:
        """``parallel_tool_calls: false`` is Anthropic's ``disable_parallel_tool_use`` inside its
        tool choice (``auto`` when no mode is given; ``none`` has no such field)."""
        chat = user_chat("What time is it?", tools=[LOOKUP, CLOCK], tool_choice=choice, parallel_tool_calls=False)
        await _complete(live_client, chat, "claude-sonnet")
        body = fake.requests[-1].body
        assert (body["tool_choice"], "parallel_tool_calls" in body) == (anthropic, False)

    @pytest.mark.parametrize("parallel", [False, True])
    async def test_parallel_tool_calls_reach_openai(
        self, live_client: RouterClient, fake: FakeProvider, parallel: bool
    ) -> None:
        """``parallel_tool_calls`` goes to OpenAI as it is, without a tool choice when none is set."""
        chat = user_chat("What time is it?", tools=[LOOKUP, CLOCK], parallel_tool_calls=parallel)
        await _complete(live_client, chat, "gpt-4o-mini")
        body = fake.requests[-1].body
        assert (body["parallel_tool_calls"], "tool_choice" in body) == (parallel, False)

    async def test_none_without_tools_keeps_the_declared_history_tools_for_anthropic(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """TOOL_CHOICE_MODE_NONE is allowed without tools: a history with tool calls still goes to
        Anthropic with its called tools declared and ``tool_choice`` none, and to OpenAI with no
        tool choice (it refuses one without tools)."""
        history = [
            ("user", "What time is it?"),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="call_1", name="clock")]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="14:05"),
        ]
        chat = build_chat(history, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE))
        await _complete(live_client, chat, "claude-sonnet")
        anthropic = fake.requests[-1].body
        await _complete(live_client, chat, "gpt-4o-mini")
        openai = fake.requests[-1].body
        assert (anthropic["tool_choice"], [t["name"] for t in anthropic["tools"]]) == ({"type": "none"}, ["clock"])
        assert ("tool_choice" in openai, "tools" in openai) == (False, False)


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
JSON_OBJECT = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
JSON_SCHEMA = pb.ResponseFormat(
    type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather", schema_json=json.dumps(SCHEMA), strict=True
)


def _without_json(model_id: str) -> dict[str, object]:
    """The default config, with ``model_id`` lacking the ``json`` capability."""
    config = default_config()
    for model in config["models"]:  # type: ignore[attr-defined]
        if model["id"] == model_id:
            model["capabilities"] = [c for c in model["capabilities"] if c != "json"]
    return config


class TestResponseFormat:
    async def test_json_object_reaches_openai_as_json_mode(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """RESPONSE_FORMAT_TYPE_JSON_OBJECT is OpenAI's ``response_format: {"type": "json_object"}``."""
        await _complete(live_client, user_chat("Weather in Paris as JSON", response_format=JSON_OBJECT), "gpt-4o-mini")
        assert fake.requests[-1].body["response_format"] == {"type": "json_object"}

    async def test_json_schema_reaches_openai_with_its_name_and_strictness(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A JSON schema is OpenAI's ``json_schema`` response format, with name, schema and strict."""
        await _complete(live_client, user_chat("Weather in Paris", response_format=JSON_SCHEMA), "gpt-4o-mini")
        assert fake.requests[-1].body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
        }

    async def test_json_schema_reaches_anthropic_as_structured_output(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """A JSON schema is Anthropic's ``output_config.format`` (no name, no strictness: it always
        adheres), without a beta header."""
        await _complete(live_client, user_chat("Weather in Paris", response_format=JSON_SCHEMA), "claude-sonnet")
        request = fake.requests[-1]
        assert request.body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
        assert ("response_format" in request.body, "anthropic-beta" in request.headers) == (False, False)

    @pytest.mark.parametrize("response_format", [JSON_OBJECT, JSON_SCHEMA], ids=["json_object", "json_schema"])
    async def test_a_json_request_is_not_routed_to_a_model_without_json(
        self, fake: FakeProvider, response_format: pb.ResponseFormat
    ) -> None:
        """Without the ``json`` capability gpt-4o-mini, the default model, serves no JSON request:
        its candidate says why, and the answer comes from a model that has it."""
        settings = settings_from(_without_json("gpt-4o-mini"), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            text = await client.route(user_chat("Say hello"))
            chat = user_chat("Say hello in JSON", response_format=response_format)
            messages = [m async for m in client.complete(chat)]
        decision = messages[0].decision
        assert (text.model, decision.model, messages[-1].completion.model) == ("gpt-4o-mini", "gpt-4o", "gpt-4o")
        assert _excluded(decision)["gpt-4o-mini"] == "does not support JSON output"

    async def test_json_object_goes_to_openai_only_when_a_message_asks_for_json(self, client: RouterClient) -> None:
        """OpenAI refuses a JSON object format unless a message says 'json' (a 400 upstream): such
        a request passes over the OpenAI models, each saying why, and is refused before any call."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(user_chat("List three colours", response_format=JSON_OBJECT))
        asks = await client.route(user_chat("List three colours as a JSON object", response_format=JSON_OBJECT))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "takes a JSON object format only when a message asks for JSON" in str(caught.value.details())
        assert asks.model == "gpt-4o-mini"

    @pytest.mark.parametrize(
        ("schema", "problem"),
        [
            ({**SCHEMA, "additionalProperties": True}, "an object without additionalProperties false"),
            (
                {**SCHEMA, "properties": {"city": {"type": "string", "maxLength": 40}, "celsius": {"type": "number"}}},
                "keyword 'maxLength'",
            ),
            (
                {
                    **SCHEMA,
                    "properties": {"days": {"type": "array", "items": {"type": "object", "properties": {}}}},
                    "required": ["days"],
                },
                "an object without additionalProperties false",
            ),
            (
                {**SCHEMA, "properties": {"days": {"type": "array", "minItems": 3}}, "required": ["days"]},
                "minItems 3 (at most 1)",
            ),
        ],
        ids=["open_object", "string_bound", "nested_open_object", "min_items_over_1"],
    )
    async def test_a_schema_anthropic_refuses_is_not_routed_to_anthropic(
        self, client: RouterClient, schema: dict[str, object], problem: str
    ) -> None:
        """Anthropic's structured outputs refuse bounds (maxLength, minimum, ...) and objects that
        do not close with additionalProperties false (a 400 upstream, and after a fallback from
        OpenAI a permanent FAILED_PRECONDITION): such a schema passes over Anthropic's models."""
        response_format = pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather", schema_json=json.dumps(schema)
        )
        context = pb.RoutingContext(task_hint="creative_writing")
        decision = await client.route(user_chat("A poem as JSON", response_format=response_format), context)
        assert decision.model == "gpt-4o-mini"
        assert _excluded(decision) == {
            "claude-sonnet": f"provider kind anthropic's structured outputs refuse this schema ({problem})"
        }

    async def test_a_schema_openais_strict_mode_refuses_is_not_routed_to_openai(self, client: RouterClient) -> None:
        """OpenAI's strict mode refuses an object whose required leaves a property out (a 400
        upstream): with strict set such a schema passes over OpenAI's models, each saying why,
        and goes to a model that takes it; without strict, OpenAI serves it."""
        schema = {**SCHEMA, "required": ["city"]}

        def asking(strict: bool) -> pb.ChatRequest:
            response_format = pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather", schema_json=json.dumps(schema), strict=strict
            )
            return user_chat("Say hello", response_format=response_format)

        strict, lenient = await client.route(asking(True)), await client.route(asking(False))
        assert (strict.model, lenient.model) == ("claude-sonnet", "gpt-4o-mini")
        problem = "an object whose required does not list every property"
        reason = f"provider kind openai's strict mode refuses this schema ({problem})"
        assert _excluded(strict) == {"gpt-4o-mini": reason, "gpt-4o": reason}

    async def test_json_object_is_not_routed_to_anthropic_but_a_schema_is(self, client: RouterClient) -> None:
        """Anthropic has no JSON mode without a schema: creative writing, which goes to
        claude-sonnet, goes elsewhere with JSON_OBJECT, and stays with JSON_SCHEMA."""
        context = pb.RoutingContext(task_hint="creative_writing")
        json_object = await client.route(user_chat("A poem as JSON", response_format=JSON_OBJECT), context)
        json_schema = await client.route(user_chat("A poem as JSON", response_format=JSON_SCHEMA), context)
        assert (json_object.model, json_schema.model) == ("gpt-4o-mini", "claude-sonnet")
        excluded = _excluded(json_object)
        assert list(excluded) == ["claude-sonnet"]
        assert excluded["claude-sonnet"].startswith("provider kind anthropic has no JSON object mode")


class TestSchemaRoots:
    """OpenAI and Anthropic take only an object root for a tool's parameters or a JSON schema
    answer; an ``openai_compatible`` server (vLLM, llama.cpp, Ollama) takes an array or a string
    root too. Such a root was refused INVALID_ARGUMENT for every model, and a root ``"type":
    ["object"]`` (the same schema) was refused everywhere."""

    @pytest.mark.parametrize(
        ("request_field", "chat"),
        [
            (
                "chat.response_format.schema_json",
                user_chat(
                    "List the colours",
                    response_format=pb.ResponseFormat(
                        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                        name="colours",
                        schema_json='{"type": "array", "items": {"type": "string"}}',
                    ),
                ),
            ),
            (
                "chat.tools[0].parameters_json",
                user_chat("Call f", tools=[pb.Tool(name="f", parameters_json='{"type": "string"}')]),
            ),
        ],
        ids=["response_format", "tool"],
    )
    async def test_a_non_object_root_goes_to_a_model_that_takes_it(
        self, fake: FakeProvider, request_field: str, chat: pb.ChatRequest
    ) -> None:
        """The OpenAI and Anthropic models are passed over, each naming the field; an
        openai_compatible model serves the request with the schema as sent. Without one, the
        request is refused NO_ELIGIBLE_MODEL with those reasons, before any provider call."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "vllm-local", capabilities=["json", "tools"])
        fake.enqueue(Script(text='["red"]'))
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            messages = [m async for m in client.complete(chat)]
        async with Server(settings_from(default_config()), port=0) as server, RouterClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(chat)
        decision = messages[0].decision
        sent = fake.requests[-1].body
        schema = sent["response_format"]["json_schema"]["schema"] if "response_format" in sent else None
        schema = schema or sent["tools"][0]["function"]["parameters"]
        assert (decision.model, messages[-1].WhichOneof("event")) == ("vllm-local", "completion")
        assert schema["type"] in ("array", "string")
        assert set(_excluded(decision).values()) == {
            f"provider kind openai takes only an object root ({request_field})",
            f"provider kind anthropic takes only an object root ({request_field})",
        }
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"takes only an object root ({request_field})" in str(caught.value.details())

    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
    async def test_an_object_root_written_as_a_list_is_sent_as_object(
        self, live_client: RouterClient, fake: FakeProvider, model: str
    ) -> None:
        """A tool whose root ``type`` is ``["object"]`` is the same schema as ``"object"``: it is
        served, and sent to the provider as ``"object"``."""
        chat = user_chat("Call f", tools=[pb.Tool(name="f", parameters_json='{"type": ["object"], "properties": {}}')])
        messages = [m async for m in live_client.complete(chat, pb.RoutingContext(model=model))]
        [tool] = fake.requests[-1].body["tools"]
        schema = tool["function"]["parameters"] if "function" in tool else tool["input_schema"]
        assert (messages[-1].WhichOneof("event"), schema["type"]) == ("completion", "object")


def _refusing(model_id: str, *parameters: str) -> dict[str, object]:
    """The default config, with ``model_id`` refusing ``parameters`` (as OpenAI's reasoning models
    refuse temperature and stop)."""
    config = default_config()
    for model in config["models"]:  # type: ignore[attr-defined]
        if model["id"] == model_id:
            model["unsupported_parameters"] = list(parameters)
    return config


class TestUnsupportedParameters:
    @pytest.mark.parametrize(
        ("parameter", "chat_options"),
        [
            ("temperature", {"temperature": 0.2}),
            ("stop", {"stop": ["END"]}),
            ("tool_choice", {"tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO)}),
            ("parallel_tool_calls", {"parallel_tool_calls": False}),
        ],
    )
    async def test_a_request_setting_a_refused_parameter_passes_over_the_model(
        self, parameter: str, chat_options: dict[str, object]
    ) -> None:
        """Code generation goes to gpt-4o; when gpt-4o refuses a parameter the request sets, the
        request goes to the next choice and gpt-4o's candidate names the parameter."""
        settings = settings_from(_refusing("gpt-4o", parameter))
        context = pb.RoutingContext(task_hint="code_generation")
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            usual = await client.route(user_chat("Write a parser"), context)
            chat = user_chat("Write a parser", **chat_options)
            if parameter in ("tool_choice", "parallel_tool_calls"):
                chat.tools.add(name="run_tests", description="Run the tests", parameters_json="{}")
            decision = await client.route(chat, context)
        assert (usual.model, decision.model) == ("gpt-4o", "gpt-4o-mini")
        assert _excluded(decision)["gpt-4o"] == f"refuses the parameter {parameter} (unsupported_parameters)"

    async def test_a_model_pinned_with_a_refused_parameter_is_refused_before_any_call(self, fake: FakeProvider) -> None:
        """A request pinned to a model that refuses one of its parameters fails at once, naming the
        parameter; the provider is never called."""
        settings = settings_from(_refusing("gpt-4o", "temperature", "stop"), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _complete(client, user_chat("Say hello", stop=["END"]), "gpt-4o")
            answered = await _complete(client, user_chat("Say hello"), "gpt-4o")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refuses the parameter stop" in (caught.value.details() or "")
        assert answered[-1].completion.model == "gpt-4o"
        assert len(fake.requests) == 1

    async def test_a_prefill_is_not_routed_to_claude_sonnet_4_6(self, client: RouterClient, fake: FakeProvider) -> None:
        """Claude 4.6 models refuse a conversation that ends in an assistant turn (a 400 upstream):
        the default config says so for claude-sonnet, so creative writing with a prefill goes to
        the next choice, whose candidate list says why; an earlier assistant turn is no prefill."""
        context = pb.RoutingContext(task_hint="creative_writing")
        prefill = build_chat([("user", "Write a poem"), ("assistant", "Roses")])
        history = build_chat([("user", "Write a poem"), ("assistant", "Roses"), ("user", "Another")])
        decision = await client.route(prefill, context)
        assert ((await client.route(history, context)).model, decision.model) == ("claude-sonnet", "gpt-4o-mini")
        assert _excluded(decision) == {
            "claude-sonnet": "refuses a prefill, a conversation that ends in an assistant turn (unsupported_parameters)"
        }

    async def test_a_system_message_after_the_final_assistant_turn_is_still_a_prefill(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic takes system messages out of the turns, so ``[user, assistant, system]`` reaches
        it as a prefill: pinned to claude-sonnet it is NO_ELIGIBLE_MODEL before any call; unpinned it
        goes to the next choice, which gets the turns as they are."""
        chat = build_chat([("user", "Write a poem"), ("assistant", "Roses"), ("system", "Be brief.")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await live_client.route(chat, pb.RoutingContext(model="claude-sonnet"))
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_ELIGIBLE_MODEL",
        )
        assert "refuses a prefill" in (caught.value.details() or "")
        answered = [m async for m in live_client.complete(chat, pb.RoutingContext(task_hint="creative_writing"))]
        assert answered[-1].completion.model == "gpt-4o-mini"
        assert [(m["role"], m["content"]) for m in fake.requests[-1].body["messages"]] == [
            ("user", "Write a poem"),
            ("assistant", "Roses"),
            ("system", "Be brief."),
        ]
        assert len(fake.requests) == 1

    def test_an_unknown_parameter_is_a_config_error_naming_the_field(self) -> None:
        """``unsupported_parameters`` takes only the parameters a request can set."""
        with pytest.raises(ConfigError, match=r"models\[1\]\.unsupported_parameters\[0\]"):
            settings_from(_refusing("gpt-4o", "top_k"))
