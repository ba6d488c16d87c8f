"""The Feedback RPC (issue 3): outcomes of earlier decisions grow the embedding router's example
library, persisted in SQLite so a restart loses nothing."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from routesvc.client import RouterClient
from routesvc.encoders import HashingEncoder
from routesvc.fitting import FitSettings, fit_router
from routesvc.server import Server
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, settings_from, user_chat
from tests.routing_data import STRONG, WEAK, records
from tests.test_validation import error_info


def embedding_config(folder: Path, **stage_settings: object) -> dict[str, object]:
    """The default catalog with an embedding stage (fitted on synthetic outcomes) keeping feedback;
    ``stage_settings`` are added to the stage's."""
    fit_router(records(), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0)).save(folder / "router")
    config = default_config()
    config["routing"] = {
        "default_model": "gpt-4o-mini",
        "stages": [
            {
                "kind": "embedding",
                "router": str(folder / "router"),
                "strong_model": "gpt-4o",
                "weak_model": "gpt-4o-mini",
                "threshold": 0.99,
                "feedback_db": str(folder / "feedback.db"),
                **stage_settings,
            }
        ],
    }
    return config


async def _feedback_error(client: RouterClient, decision_id: str, **outcome: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.feedback(decision_id, **outcome)  # type: ignore[arg-type]
    return caught.value


class TestFeedbackRpc:
    async def test_without_a_learning_stage_feedback_is_failed_precondition(self, client: RouterClient) -> None:
        """The default policy keeps no feedback: FAILED_PRECONDITION, reason FEEDBACK_NOT_ENABLED."""
        decision = await client.route(user_chat("hi"))
        error = await _feedback_error(client, decision.decision_id, score=1.0)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FEEDBACK_NOT_ENABLED")

    @pytest.mark.parametrize(
        ("decision_id", "outcome", "field"),
        [("", {"score": 1.0}, "decision_id"), ("d", {}, "outcome"), ("d", {"score": 1.5}, "score")],
    )
    async def test_bad_feedback_names_the_field(
        self, client: RouterClient, decision_id: str, outcome: dict[str, float], field: str
    ) -> None:
        """A missing decision id, a missing outcome or a score outside [0, 1] is INVALID_ARGUMENT."""
        error = await _feedback_error(client, decision_id, **outcome)
        assert (error.code(), error_info(error).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)

    async def test_feedback_grows_the_library_and_survives_a_restart(self, tmp_path: Path) -> None:
        """A thumbs-down on a weak-model decision adds one library example; after a restart the
        stored decision still takes feedback and the library counts both; unknown ids are NOT_FOUND."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            first = await client.route(user_chat("say hello to zulu"))
            assert first.model == "gpt-4o-mini"
            response = await client.feedback(first.decision_id, thumbs_up=False)
            assert (response.model, response.score, response.library_examples) == ("gpt-4o-mini", 0.0, 1)
            second = await client.route(user_chat("say goodbye to zulu"))
            unknown = await _feedback_error(client, "no-such-decision", score=0.5)
            assert (unknown.code(), error_info(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        restarted = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with restarted as server, RouterClient(server.target) as client:
            response = await client.feedback(second.decision_id, score=0.25)
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 2)

    async def test_feedback_for_a_forgotten_decision_is_not_found_like_an_unknown_one(self, tmp_path: Path) -> None:
        """A decision without feedback that ``feedback_max_pending_decisions`` newer ones pushed
        out is NOT_FOUND, reason UNKNOWN_DECISION, as if never seen; the newer one still counts."""
        settings = settings_from(embedding_config(tmp_path, feedback_max_pending_decisions=1))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            forgotten = await client.route(user_chat("say hello to zulu"))
            kept = await client.route(user_chat("say goodbye to zulu"))
            error = await _feedback_error(client, forgotten.decision_id, thumbs_up=False)
            response = await client.feedback(kept.decision_id, thumbs_up=False)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        assert (response.decision_id, response.library_examples) == (kept.decision_id, 1)

    async def test_the_routing_decision_notes_the_embedding_score(self, tmp_path: Path) -> None:
        """The embedding stage explains its pick in the reasons."""
        served = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with served as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"), pb.RoutingContext())
        assert any(reason.startswith("embedding: score") for reason in decision.reasons)
