"""Request parameters beyond the messages: each reaches each provider in its own wire format (the
bodies the real SDKs sent to the fake), and a request a provider would refuse is routed elsewhere."""

from __future__ import annotations

import pytest

from routesvc.client import RouterClient, build_chat
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import user_chat

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
