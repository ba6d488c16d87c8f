"""The embedding stage: how much does this request need the strong model?

It scores the request with a router fitted by ``routesvc fit`` (nearest neighbours in an
example library of embedded prompts with recorded outcomes, plus a learned difficulty model;
see ``routesvc.fitting``) and sends it to the strong model when the calibrated score reaches
``threshold``, else to the weak model. ``threshold`` is the cost-quality knob: the score is the
share of training prompts judged easier, so ``threshold: 0.7`` sends roughly the hardest 30% of
traffic like the training mix to the strong model.

Outcomes reported through the feedback store nudge the score: near neighbours (cosine at least
``feedback_similarity``) whose weak-model answer scored badly push towards the strong model,
good ones push away; strong-model outcomes are kept but do not move the score. With
``feedback_scope: tenant`` (the default) only the request's own tenant's outcomes move its score,
so one tenant's ratings cannot steer another's routing; ``shared`` pools every tenant's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog
from pydantic import BaseModel, ConfigDict, Field

from routesvc.catalog import Catalog
from routesvc.errors import ConfigError
from routesvc.features import bounded
from routesvc.feedback import DEFAULT_DECISION_TTL_SECONDS, DEFAULT_MAX_PENDING_DECISIONS, FeedbackStore
from routesvc.fitting import FitError, FittedRouter
from routesvc.memo import Memo
from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict

# The feedback examples' embeddings, pushes and tenants.
_Library = tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.str_]]
_EMPTY_LIBRARY: _Library = (np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.float64), np.zeros(0, dtype=str))


log = structlog.get_logger("routesvc.embedding")


class EmbeddingStageConfig(BaseModel):
    """Settings of the embedding stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["embedding"] = "embedding"
    router: Path = Field(description="folder written by `routesvc fit`")
    strong_model: str = Field("", description="catalog id sent hard requests; default: the router's strong model")
    weak_model: str = Field("", description="catalog id sent easy requests; default: the router's weak model")
    threshold: float = Field(0.5, ge=0, le=1, description="calibrated score at or above which the strong model serves")
    feedback_db: Path | None = Field(None, description="SQLite file of decisions and outcomes; unset: no feedback")
    feedback_similarity: float = Field(0.92, ge=0, le=1, description="cosine needed for feedback to count")
    feedback_weight: float = Field(0.3, ge=0, le=1, description="how far neighbouring feedback moves the score")
    feedback_scope: Literal["tenant", "shared"] = Field(
        "tenant",
        description="whose outcomes move a request's score: its own tenant's (tenant), or every tenant's (shared)",
    )
    feedback_decision_ttl_seconds: float = Field(
        DEFAULT_DECISION_TTL_SECONDS,
        gt=0,
        description="how long a decision waits for feedback before it is forgotten (rated ones are kept)",
    )
    feedback_max_pending_decisions: int = Field(
        DEFAULT_MAX_PENDING_DECISIONS,
        ge=1,
        description="decisions kept waiting for feedback at most; the oldest are forgotten first",
    )


class EmbeddingStage:
    """Decides strong or weak from the fitted router's score; defers when neither can serve."""

    def __init__(
        self,
        router: FittedRouter,
        *,
        strong_model: str,
        weak_model: str,
        threshold: float = 0.5,
        feedback: FeedbackStore | None = None,
        feedback_similarity: float = 0.92,
        feedback_weight: float = 0.3,
        feedback_scope: Literal["tenant", "shared"] = "tenant",
    ) -> None:
        self._router = router
        self._strong = strong_model
        self._weak = weak_model
        self._threshold = threshold
        self._feedback = feedback
        self._similarity = feedback_similarity
        self._weight = feedback_weight
        self._per_tenant = feedback_scope == "tenant"
        self._embeddings: Memo[np.ndarray[tuple[int], np.dtype[np.float32]]] = Memo(4096)
        self._kinds: Memo[str] = Memo(4096)  # the kind prior's labels of texts no earlier stage labelled
        # The feedback examples' embeddings, pushes and tenants, one tuple: ``rebuild_library``
        # runs in a worker thread (the Feedback RPC) and replaces them at once, so ``score`` on
        # the event loop never sees the embeddings of one build with the pushes of another.
        self._library: _Library = _EMPTY_LIBRARY
        # Two Feedback calls rebuild at once: from the read to the swap one at a time, so a build
        # that read earlier never replaces one that read later.
        self._rebuilding = threading.Lock()
        self._other_encoders = 0  # examples another encoder made, last counted (logged when it changes)
        self.rebuild_library()

    @property
    def name(self) -> str:
        """The stage name in decisions."""
        return "embedding"

    @property
    def feedback(self) -> FeedbackStore | None:
        """The store that outcomes for this stage's decisions go to (None: feedback off)."""
        return self._feedback

    def rebuild_library(self) -> int:
        """Reload feedback examples from the store; returns how many weak-model examples count.

        Only the examples this stage's encoder made count (and those of files that did not record
        the encoder, when their dimension is the encoder's): another encoder's vectors are in
        another space."""
        if self._feedback is None:
            return 0
        encoder = self._router.encoder.name
        # No texts: no model call and no shared memo (this runs in the Feedback RPC's thread).
        dimension = self._router.encoder.encode([]).shape[1]
        with self._rebuilding:
            examples = []
            other = 0
            for example in self._feedback.examples():
                if example.encoder == encoder or (not example.encoder and len(example.embedding) == dimension):
                    if example.model == self._weak:
                        examples.append(example)
                else:
                    other += 1
            if other and other != self._other_encoders:
                log.info("feedback_examples_skipped", examples=other, reason="made by another encoder", encoder=encoder)
            self._other_encoders = other
            if not examples:
                self._library = _EMPTY_LIBRARY
                return 0
            embeddings = np.vstack([e.embedding for e in examples]).astype(np.float32)
            # A bad weak answer (score 0) pushes up by 0.5, a good one (score 1) pulls down by 0.5.
            pushes = np.array([0.5 - e.score for e in examples], dtype=np.float64)
            self._library = (embeddings, pushes, np.array([e.tenant for e in examples], dtype=str))
            return len(examples)

    def _embed(self, text: str) -> np.ndarray[tuple[int], np.dtype[np.float32]]:
        """The embedding of ``text``, which is already ``bounded`` (remembered by the text)."""
        return self._embeddings.compute(text, lambda new: self._router.encoder.encode([new])[0])

    def score(self, text: str, kind: str = "", tenant: str = "") -> tuple[float, int]:
        """The calibrated strong-model preference of ``text`` and how many feedback examples moved it.

        ``kind`` is the request's task label when an earlier stage or a hint set it; otherwise the
        router's kind prior labels the text itself. With ``feedback_scope: tenant`` only the
        examples of ``tenant`` (the request's) count.
        """
        text = bounded(text)
        embedding = self._embed(text)
        batch = embedding[None, :]
        if not kind and self._router.kind_offset:
            kind = self._kinds.compute(text, lambda new: self._router.label([new])[0])
        raw = self._router.raw([text], batch, [kind])
        value = float(self._router.calibrate(raw)[0]) if text.strip() else 0.0
        used = 0
        library, push, tenants = self._library
        if len(library) and library.shape[1] == len(embedding):
            near = library @ embedding >= self._similarity
            if self._per_tenant:
                near &= tenants == tenant
            used = int(near.sum())
            if used:
                value = float(np.clip(value + self._weight * 2 * push[near].mean(), 0.0, 1.0))
        return value, used

    def remember(self, decision_id: str, text: str, model: str, tenant: str = "") -> None:
        """Keep a decision's prompt embedding so later feedback on ``decision_id`` can teach the stage,
        with the ``tenant`` it was routed for (whose feedback it takes and whose stats it counts in)."""
        if self._feedback is not None:
            embedding = self._embed(bounded(text))
            self._feedback.remember(decision_id, model, embedding, self._router.encoder.name, tenant)

    def answered(self, decision_id: str, model: str) -> None:
        """``model`` gave the answer to ``decision_id`` (not the model decided: a cascade escalated,
        or a fallback served it), so feedback on that answer is filed under ``model``."""
        if self._feedback is not None:
            self._feedback.answered(decision_id, model)

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Strong model at or above the threshold, weak below; defer if the pick cannot serve."""
        request = routing_input.request
        value, used = self.score(request.chat.last_user_message, routing_input.task, request.context.tenant)
        wants_strong = value >= self._threshold
        pick, other = (self._strong, self._weak) if wants_strong else (self._weak, self._strong)
        comparison = ">=" if wants_strong else "<"
        explanation = f"embedding: score {value:.2f} {comparison} threshold {self._threshold:.2f}"
        if used:
            explanation += f" (moved by {used} feedback example{'s' if used > 1 else ''})"
        for model in (pick, other):
            if routing_input.is_eligible(model):
                note = "" if model == pick else f"; {pick} cannot serve, using {model}"
                return Verdict(
                    model=model,
                    strategy=self.name,
                    rule="strong" if model == self._strong else "weak",
                    reasons=(f"{explanation} -> {model}{note}",),
                    task=routing_input.task,
                )
        verdict = await next_stage(routing_input)
        reason = f"{explanation}, but neither {self._strong} nor {self._weak} can serve; deferred"
        return Verdict(
            model=verdict.model,
            strategy=verdict.strategy,
            rule=verdict.rule,
            reasons=(reason, *verdict.reasons),
            mode=verdict.mode,
            task=verdict.task,
        )


def build(config: EmbeddingStageConfig, *, catalog: Catalog, feedback: FeedbackStore | None = None) -> EmbeddingStage:
    """The stage ``config`` describes; both models must be in ``catalog``.

    ``feedback`` overrides ``config.feedback_db`` (for example to share one store between stages).
    """
    try:
        router = FittedRouter.load(config.router)
    except FitError as exc:
        raise ConfigError(f"embedding.router: {exc.message}") from exc
    strong = config.strong_model or router.strong
    weak = config.weak_model or router.weak
    for field, model in (("strong_model", strong), ("weak_model", weak)):
        if model not in catalog:
            raise ConfigError(f"embedding.{field}: {model!r} is not in the catalog")
    opened: FeedbackStore | None = None
    if feedback is None and config.feedback_db is not None:
        feedback = opened = FeedbackStore(
            config.feedback_db,
            decision_ttl_seconds=config.feedback_decision_ttl_seconds,
            max_pending_decisions=config.feedback_max_pending_decisions,
        )
    try:
        stage = EmbeddingStage(
            router,
            strong_model=strong,
            weak_model=weak,
            threshold=config.threshold,
            feedback=feedback,
            feedback_similarity=config.feedback_similarity,
            feedback_weight=config.feedback_weight,
            feedback_scope=config.feedback_scope,
        )
    except BaseException:
        # The library could not be read (a damaged file): no stage owns the store opened here,
        # so close it (its writer thread and files), or each rejected reload would leak one.
        if opened is not None:
            opened.close()
        raise
    strategy: Strategy = stage
    del strategy  # EmbeddingStage satisfies the Strategy protocol (checked by mypy here)
    return stage
