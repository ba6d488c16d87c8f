"""The embedding stage, its feedback loop, and its composition with the classifier stage."""

from __future__ import annotations

import functools
import gc
import json
import sys
import threading
import time
import tracemalloc
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from routesvc.catalog import Catalog, ModelSpec
from routesvc.encoders import HashingEncoder, WordLlamaEncoder
from routesvc.errors import ConfigError
from routesvc.features import bounded
from routesvc.feedback import FeedbackStore
from routesvc.fitting import FitSettings, FittedRouter, fit_router
from routesvc.models import ChatRequest, Message, Role, RoutingRequest
from routesvc.strategies.base import NextStage, RoutingInput, Verdict
from routesvc.strategies.classifier import LocalClassifierStage, TaskClassifier, read_examples
from routesvc.strategies.embedding import EmbeddingStage, EmbeddingStageConfig, build
from tests.routing_data import STRONG, WEAK, records


def spec(model_id: str) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        provider="openai",
        provider_model=model_id,
        input_price_per_mtok=Decimal(1),
        output_price_per_mtok=Decimal(2),
        cached_input_price_per_mtok=Decimal(1),
        cache_write_price_per_mtok=Decimal(1),
        cache_write_1h_price_per_mtok=Decimal(1),
        context_window=8000,
        max_output_tokens=1000,
        capabilities=frozenset(),
        batch_discount=Decimal(0),
    )


CATALOG = Catalog([spec(STRONG), spec(WEAK), spec("fallback")])
HARD = "solve 12 x + 7 = 3 y for zulu with 19 and 88"
EASY = "say hello to zulu"


@functools.cache
def router() -> FittedRouter:
    return fit_router(records(), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0))


def routing_input(text: str, ineligible: tuple[str, ...] = ()) -> RoutingInput:
    eligible = {m.id: ("excluded in test" if m.id in ineligible else "") for m in CATALOG}
    return RoutingInput(
        request=RoutingRequest(ChatRequest((Message(Role.USER, text),))),
        estimated_input_tokens=10,
        estimated_output_tokens=10,
        models=tuple(CATALOG),
        eligible=eligible,
    )


async def default_stage(routing_input: RoutingInput, /) -> Verdict:
    return Verdict(model="fallback", strategy="default", rule="default", reasons=("default: fallback model",))


def stage(**kwargs: object) -> EmbeddingStage:
    return EmbeddingStage(router(), strong_model=STRONG, weak_model=WEAK, **kwargs)  # type: ignore[arg-type]


class TestEmbeddingStage:
    async def test_hard_requests_go_to_the_strong_model(self) -> None:
        """A request like the hard examples scores high and is sent to the strong model."""
        verdict = await stage(threshold=0.5).decide(routing_input(HARD), default_stage)
        assert (verdict.model, verdict.strategy, verdict.rule) == (STRONG, "embedding", "strong")
        assert verdict.reasons[0].startswith("embedding: score ")
        assert f">= threshold 0.50 -> {STRONG}" in verdict.reasons[0]

    async def test_easy_requests_go_to_the_weak_model(self) -> None:
        """A request like the easy examples scores low and is sent to the weak model."""
        verdict = await stage(threshold=0.5).decide(routing_input(EASY), default_stage)
        assert verdict.model == WEAK

    async def test_a_huge_request_is_scored_on_its_start_and_end_as_offline(self) -> None:
        """Online and offline (``routesvc score``) read the same ``READ_CHARS`` of a huge prompt: the
        hard request at its start still goes to the strong model, with the score ``scores`` gives."""
        huge = HARD + " " + "plain words without numbers " * 40_000
        verdict = await stage(threshold=0.5).decide(routing_input(huge), default_stage)
        assert verdict.model == STRONG
        offline = float(router().scores([huge])[0])
        assert f"embedding: score {offline:.2f}" in verdict.reasons[0]
        assert offline == float(router().scores([bounded(huge)])[0])

    async def test_threshold_is_the_cost_quality_knob(self) -> None:
        """Threshold 0 sends everything to the strong model; above 1 nothing."""
        assert (await stage(threshold=0.0).decide(routing_input(EASY), default_stage)).model == STRONG
        assert (await stage(threshold=1.01).decide(routing_input(HARD), default_stage)).model == WEAK

    async def test_ineligible_pick_uses_the_other_model(self) -> None:
        """If the strong model cannot serve, the weak one does, and the reason says so."""
        verdict = await stage().decide(routing_input(HARD, ineligible=(STRONG,)), default_stage)
        assert verdict.model == WEAK
        assert f"{STRONG} cannot serve, using {WEAK}" in verdict.reasons[0]

    async def test_defers_when_neither_can_serve(self) -> None:
        """With both models ineligible the rest of the policy decides, after this stage's reason."""
        verdict = await stage().decide(routing_input(HARD, ineligible=(STRONG, WEAK)), default_stage)
        assert verdict.model == "fallback"
        assert verdict.reasons[0].endswith("deferred")
        assert verdict.reasons[1] == "default: fallback model"


class TestKindPrior:
    async def test_a_task_set_before_the_stage_is_the_kind_it_scores_with(self) -> None:
        """The stage scores with the task an earlier stage or a hint set, without labelling the
        text again: the same request scores higher as code than as chat. Unlabelled, it labels the
        text once and remembers it."""
        labelled: list[str] = []

        def labeller(texts: Sequence[str]) -> list[str]:
            labelled.extend(texts)
            return ["chat"] * len(texts)

        fitted = fit_router(records(), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0), labeller=labeller)
        stage = EmbeddingStage(fitted, strong_model=STRONG, weak_model=WEAK)
        labelled.clear()
        as_code, _ = stage.score(EASY, "code_generation")
        as_chat, _ = stage.score(EASY, "chat")
        assert as_code > as_chat
        assert labelled == []
        unlabelled, _ = stage.score(EASY)
        assert labelled == [EASY]
        assert unlabelled == as_chat
        assert stage.score(EASY)[0] == as_chat
        assert labelled == [EASY]  # the label is remembered with the text, like its embedding


class TestFeedbackLoop:
    async def test_bad_weak_answers_push_towards_the_strong_model(self, tmp_path: Path) -> None:
        """After a thumbs-down on the weak model's answer, the same request goes to the strong model,
        also after a restart that rebuilds the library from the SQLite file."""
        store = FeedbackStore(tmp_path / "feedback.db")
        first = stage(threshold=0.5, feedback=store, feedback_weight=1.0)
        assert (await first.decide(routing_input(EASY), default_stage)).model == WEAK
        first.remember("decision-1", EASY, WEAK)
        store.record("decision-1", 0.0)
        assert first.rebuild_library() == 1
        assert (await first.decide(routing_input(EASY), default_stage)).model == STRONG
        store.close()
        restarted = stage(threshold=0.5, feedback=FeedbackStore(tmp_path / "feedback.db"), feedback_weight=1.0)
        verdict = await restarted.decide(routing_input(EASY), default_stage)
        assert verdict.model == STRONG
        assert "moved by 1 feedback example" in verdict.reasons[0]

    async def test_strong_model_feedback_does_not_move_the_score(self, tmp_path: Path) -> None:
        """Outcomes of the strong model are stored but are not weak-model examples."""
        store = FeedbackStore(tmp_path / "feedback.db")
        embedding_stage = stage(feedback=store)
        embedding_stage.remember("d", HARD, STRONG)
        store.record("d", 0.0)
        assert embedding_stage.rebuild_library() == 0

    async def test_examples_another_encoder_made_do_not_count(self, tmp_path: Path) -> None:
        """Thumbs-down examples whose vectors another encoder of the same dimension made (the router
        refitted with another encoder) are in another space: they do not move the score, while
        the same examples made by the stage's own encoder do."""
        store = FeedbackStore(tmp_path / "feedback.db")
        vector = router().encoder.encode([bounded(EASY)])[0]
        for encoder in ("wordllama-l2-128", router().encoder.name):
            store.remember(encoder, WEAK, vector, encoder)
            store.record(encoder, 0.0)
        rebuilt = stage(threshold=0.5, feedback=store, feedback_weight=1.0)
        assert rebuilt.rebuild_library() == 1
        assert rebuilt.score(EASY)[1] == 1

    async def test_examples_of_a_file_that_did_not_record_the_encoder_count_at_its_dimension(
        self, tmp_path: Path
    ) -> None:
        """Examples remembered without an encoder name (files before it was kept) count when their
        vectors have the encoder's dimension; others are left out, not mixed into the library."""
        store = FeedbackStore(tmp_path / "feedback.db")
        store.remember("same-dimension", WEAK, router().encoder.encode([bounded(EASY)])[0])
        store.remember("other-dimension", WEAK, np.ones(256, dtype=np.float32) / 16)
        for decision_id in ("same-dimension", "other-dimension"):
            store.record(decision_id, 0.0)
        rebuilt = stage(threshold=0.5, feedback=store, feedback_weight=1.0)
        assert rebuilt.rebuild_library() == 1
        assert (await rebuilt.decide(routing_input(EASY), default_stage)).model == STRONG

    @pytest.mark.parametrize(("total", "per_tenant"), [(200, 4096), (10, 512)])
    def test_a_tenants_library_takes_the_room_of_its_examples(
        self, tmp_path: Path, total: int, per_tenant: int
    ) -> None:
        """With auth off callers name any tenant, and each tenant rating has a library of its own:
        200 tenants of one example each take under 4 KB of memory a tenant (a row is 128 floats
        here), where each new library made room for 16 rows (~8 KB here, ~17 KB at 256 floats);
        with a total cap of 10 examples a library whose examples were evicted is dropped, so they
        take under 512 bytes a tenant (an empty library took more)."""
        store = FeedbackStore(tmp_path / "feedback.db", max_total_examples=total)
        learning = stage(feedback=store)
        for i in range(200):
            learning.remember(f"d{i}", EASY, WEAK, tenant=f"t{i}")
        store.flush()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            counts = [learning.learn(store.record_outcome(f"d{i}", 0.0)) for i in range(200)]
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            store.close()
        assert counts == [1] * 200
        assert grown < 200 * per_tenant

    @pytest.mark.parametrize("scope", ["tenant", "shared"])
    def test_an_evicted_example_leaves_only_its_own_library(self, tmp_path: Path, scope: str) -> None:
        """The store names each example it evicts with its tenant, and the stage drops it from
        that tenant's library (or the shared one) only, a library left empty with it: the others
        keep theirs. (It looked in every library, under the lock Routes score under: ~120 ms a
        Feedback at 200,000 tenants once the total cap was reached.)"""
        store = FeedbackStore(tmp_path / "feedback.db", max_total_examples=3)
        learning = stage(feedback=store, feedback_scope=scope)
        rated = [("a-0", "a"), ("a-1", "a"), ("b-0", "b"), ("c-0", "c"), ("d-0", "d")]
        for decision_id, tenant in rated:
            learning.remember(decision_id, EASY, WEAK, tenant=tenant)
        store.flush()
        counted = []
        moved = []
        try:
            for decision_id, _ in rated:
                recorded = store.record_outcome(decision_id, 0.0)
                counted.append((recorded.evicted, learning.learn(recorded)))
                moved.append([learning.score(EASY, tenant=tenant)[1] for tenant in "abcd"])
        finally:
            store.close()
        evicted = [tuple(e.decision_id for e in evictions) for evictions, _ in counted]
        assert evicted == [(), (), (), ("a-0",), ("a-1",)]
        assert [e.tenant for evictions, _ in counted for e in evictions] == ["a", "a"]
        if scope == "tenant":
            assert [count for _, count in counted] == [1, 2, 1, 1, 1]
            assert moved == [[1, 0, 0, 0], [2, 0, 0, 0], [2, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
            assert sorted(learning._libraries) == ["b", "c", "d"]
        else:
            assert [count for _, count in counted] == [1, 2, 3, 3, 3]
            assert moved == [[1] * 4, [2] * 4, [3] * 4, [3] * 4, [3] * 4]

    def test_scoring_while_feedback_rebuilds_the_library_in_a_thread(self, tmp_path: Path) -> None:
        """The Feedback RPC rebuilds the library in a worker thread while Route scores on the loop:
        with the interpreter switching threads as often as it can, a second of both never pairs
        one build's embeddings with another's pushes (which raised IndexError, an INTERNAL)."""
        store = FeedbackStore(tmp_path / "feedback.db")
        scored = stage(threshold=0.5, feedback=store, feedback_weight=1.0)
        for i in range(500):
            scored.remember(f"d{i}", EASY, WEAK)
            store.record(f"d{i}", 0.0)
        assert scored.rebuild_library() == 500
        stop = threading.Event()

        def grow() -> None:
            i = 500
            while not stop.is_set():
                scored.remember(f"d{i}", EASY, WEAK)
                store.record(f"d{i}", 0.0)
                scored.rebuild_library()
                i += 1

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        writer = threading.Thread(target=grow)
        writer.start()
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                _, used = scored.score(EASY)
                assert used >= 500
        finally:
            stop.set()
            writer.join()
            sys.setswitchinterval(interval)


class TestComposition:
    async def test_classifier_then_embedding_explains_both(self) -> None:
        """In classifier -> embedding, the classifier's label reaches the verdict and both stages explain."""
        classifier = LocalClassifierStage(TaskClassifier(WordLlamaEncoder(), read_examples()))
        embedding_stage = stage(threshold=0.5)

        async def rest(routing_input: RoutingInput, /) -> Verdict:
            return await embedding_stage.decide(routing_input, default_stage)

        chain: NextStage = rest
        verdict = await classifier.decide(routing_input("calculate 345 * 19 - 77 / 3 for case zulu"), chain)
        assert verdict.model == STRONG
        assert verdict.task == "multi_step_reasoning"
        assert verdict.reasons[0].startswith("classifier: local model labelled the task 'multi_step_reasoning'")
        assert verdict.reasons[1].startswith("embedding: score ")


class TestBuild:
    def test_builds_from_a_fitted_folder(self, tmp_path: Path) -> None:
        """The stage loads the router written by fit and defaults to its pair."""
        router().save(tmp_path / "r")
        built = build(EmbeddingStageConfig(router=tmp_path / "r", threshold=0.7), catalog=CATALOG)
        assert built.name == "embedding"

    def test_feedback_db_opens_a_store(self, tmp_path: Path) -> None:
        """With ``feedback_db`` the stage records to that SQLite file."""
        router().save(tmp_path / "r")
        config = EmbeddingStageConfig(router=tmp_path / "r", feedback_db=tmp_path / "feedback.db")
        built = build(config, catalog=CATALOG)
        built.remember("d-1", EASY, WEAK)
        assert built.feedback is not None
        built.feedback.record("d-1", 1.0)
        built.feedback.close()
        assert [e.decision_id for e in FeedbackStore(tmp_path / "feedback.db").entries()] == ["d-1"]

    def test_models_must_be_in_the_catalog(self, tmp_path: Path) -> None:
        """A pair model missing from the catalog is a config error naming the field."""
        router().save(tmp_path / "r")
        config = EmbeddingStageConfig(router=tmp_path / "r", strong_model="nope")
        with pytest.raises(ConfigError, match=r"embedding\.strong_model"):
            build(config, catalog=CATALOG)

    def test_a_router_whose_parts_do_not_fit_is_a_config_error_at_start(self, tmp_path: Path) -> None:
        """A library of another width than the encoder's fails when the stage is built, naming the
        field and the mismatch (it failed INTERNAL on the first request)."""
        router().save(tmp_path / "r")
        with np.load(tmp_path / "r" / "library.npz") as arrays:
            embeddings, prior = arrays["embeddings"][:, :16], arrays["prior"]
        np.savez_compressed(tmp_path / "r" / "library.npz", embeddings=embeddings, prior=prior)
        with pytest.raises(ConfigError, match=r"^embedding\.router: .*/r: the router's parts do not fit together"):
            build(EmbeddingStageConfig(router=tmp_path / "r"), catalog=CATALOG)

    def test_a_router_json_field_of_the_wrong_type_is_a_config_error_at_start(self, tmp_path: Path) -> None:
        """router.json's "encoder" a list: the stage fails to build with a config error naming the
        field and the folder (it was an AttributeError traceback)."""
        router().save(tmp_path / "r")
        meta = json.loads((tmp_path / "r" / "router.json").read_text())
        meta["encoder"] = [meta["encoder"]]
        (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match=r"^embedding\.router: .*/r: not a fitted router \(TypeError: encoder \["):
            build(EmbeddingStageConfig(router=tmp_path / "r"), catalog=CATALOG)

    def test_missing_router_is_a_config_error(self, tmp_path: Path) -> None:
        """A router folder that does not hold a fitted router fails at start."""
        with pytest.raises(ConfigError, match=r"embedding\.router"):
            build(EmbeddingStageConfig(router=tmp_path), catalog=CATALOG)
