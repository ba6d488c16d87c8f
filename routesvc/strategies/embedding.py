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

import dataclasses
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from routesvc.catalog import Catalog
from routesvc.errors import ConfigError
from routesvc.features import bounded
from routesvc.feedback import (
    DEFAULT_DECISION_TTL_SECONDS,
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_PENDING_DECISIONS,
    DEFAULT_MAX_TOTAL_EXAMPLES,
    EvictedExample,
    FeedbackExample,
    FeedbackStore,
    Recorded,
)
from routesvc.fitting import FitError, FittedRouter
from routesvc.memo import Memo
from routesvc.strategies.base import NextStage, RoutingInput, Strategy, Verdict

log = structlog.get_logger("routesvc.embedding")


class _Library:
    """The weak-model examples of one scope (a tenant's, or every tenant's when shared): their
    embeddings and pushes in rows with room to grow, each row's decision id. Not thread-safe: the
    stage guards it."""

    def __init__(self, embeddings: npt.NDArray[np.float32], pushes: npt.NDArray[np.float64], ids: list[str]) -> None:
        self._embeddings = embeddings
        self._pushes = pushes
        self._ids = ids
        self._rows = {decision_id: row for row, decision_id in enumerate(ids)}

    def __len__(self) -> int:
        return len(self._ids)

    def put(self, decision_id: str, embedding: npt.NDArray[np.float32], push: float) -> None:
        """Add the example of ``decision_id``, or give it its new push."""
        row = self._rows.get(decision_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._pushes):  # full: twice the room, so adding costs O(1) on average
                # A new library starts with room for one: with auth off each tenant a caller names
                # has one, and 16 rows of room made each ~17 KB (256 floats) for a single example.
                room = max(1, 2 * row)
                embeddings = np.zeros((room, len(embedding)), dtype=np.float32)
                embeddings[:row] = self._embeddings[:row]
                pushes = np.zeros(room, dtype=np.float64)
                pushes[:row] = self._pushes[:row]
                self._embeddings, self._pushes = embeddings, pushes
            self._ids.append(decision_id)
            self._rows[decision_id] = row
        self._embeddings[row] = embedding
        self._pushes[row] = push

    def remove(self, decision_id: str) -> None:
        """Drop the example of ``decision_id`` if it is here (the last row takes its place)."""
        row = self._rows.pop(decision_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._ids[row] = moved
            self._rows[moved] = row
            self._embeddings[row] = self._embeddings[last]
            self._pushes[row] = self._pushes[last]
        self._ids.pop()

    def near_pushes(self, embedding: npt.NDArray[np.float32], similarity: float) -> npt.NDArray[np.float64]:
        """The pushes of the examples at cosine ``similarity`` or more from ``embedding``."""
        count = len(self._ids)
        if not count or self._embeddings.shape[1] != len(embedding):
            return self._pushes[:0]
        return self._pushes[:count][self._embeddings[:count] @ embedding >= similarity]


def _push(score: float) -> float:
    """How an example's outcome moves the score: a bad weak answer (score 0) pushes up by 0.5, a
    good one (score 1) pulls down by 0.5."""
    return 0.5 - score


class EmbeddingStageConfig(BaseModel):
    """Settings of the embedding stage."""

    # As config.py's other settings: a float is a finite number (a timeout_s of .inf was taken,
    # then failed every request INTERNAL), and refused values are left out of the message.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True)

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
    feedback_max_examples: int = Field(
        DEFAULT_MAX_EXAMPLES,
        ge=1,
        description=(
            "rated decisions (examples) kept at most, per tenant with feedback_scope tenant, else in all;"
            " the oldest are forgotten first"
        ),
    )
    feedback_max_total_examples: int = Field(
        DEFAULT_MAX_TOTAL_EXAMPLES,
        ge=1,
        description=(
            "rated decisions (examples) kept at most in all, whatever the tenants (with auth off callers name"
            " any tenant); the oldest of all are forgotten first"
        ),
    )

    @model_validator(mode="after")
    def _total_cap_holds_a_cap(self) -> EmbeddingStageConfig:
        # With shared scope the lower of the two applies, so a feedback_max_examples above the
        # total (valid before the total cap, which then silently evicted the excess at upgrade)
        # keeps fewer than it says; with tenant scope a tenant could never reach its cap.
        if self.feedback_max_total_examples < self.feedback_max_examples:
            raise ValueError(
                f"feedback_max_total_examples ({self.feedback_max_total_examples}) is below"
                f" feedback_max_examples ({self.feedback_max_examples}): the total cap applies to all"
                " tenants' examples together, so raise it to at least feedback_max_examples"
                " (or lower feedback_max_examples)"
            )
        return self


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
        # The weak-model examples by scope (the tenant, or "" for all when shared). ``learn`` runs
        # in the Feedback RPC's worker thread and changes a row while ``score`` reads them on the
        # event loop: both hold this lock (a row's change takes microseconds), so a score never
        # sees half a row or a row without its push.
        self._libraries: dict[str, _Library] = {}
        self._library_lock = threading.Lock()
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

    def _made_here(self, example: FeedbackExample, dimension: int) -> bool:
        """Whether this stage's encoder made ``example``'s embedding (or, in files that did not
        record the encoder, one of its dimension): another encoder's vectors are in another space."""
        encoder = self._router.encoder.name
        return example.encoder == encoder or (not example.encoder and len(example.embedding) == dimension)

    def _dimension(self) -> int:
        # No texts: no model call and no shared memo (this may run in the Feedback RPC's thread).
        return int(self._router.encoder.encode([]).shape[1])

    def rebuild_library(self) -> int:
        """Reload every feedback example from the store (at start and on a reload; a Feedback
        call changes only its example, ``learn``); returns how many weak-model examples count.

        Only the examples this stage's encoder made count (``_made_here``)."""
        if self._feedback is None:
            return 0
        dimension = self._dimension()
        grouped: dict[str, list[FeedbackExample]] = {}
        other = 0
        for example in self._feedback.examples():
            if not self._made_here(example, dimension):
                other += 1
            elif example.model == self._weak:
                grouped.setdefault(example.tenant if self._per_tenant else "", []).append(example)
        if other and other != self._other_encoders:
            encoder = self._router.encoder.name
            log.info("feedback_examples_skipped", examples=other, reason="made by another encoder", encoder=encoder)
        self._other_encoders = other
        libraries = {
            scope: _Library(
                np.vstack([e.embedding for e in examples]).astype(np.float32),
                np.array([_push(e.score) for e in examples], dtype=np.float64),
                [e.decision_id for e in examples],
            )
            for scope, examples in grouped.items()
        }
        with self._library_lock:
            self._libraries = libraries
            return sum(len(library) for library in libraries.values())

    def learn(self, recorded: Recorded) -> int:
        """Bring the library up to date with what the store just did (``record_outcome``): the
        rated example added, given its new score, or dropped (no longer the weak model's), and
        the examples evicted dropped; nothing when nothing was stored. Returns how many
        weak-model examples count for the decision's tenant: its own with ``feedback_scope:
        tenant``, every tenant's with ``shared``. Calls must come in the order the store recorded
        them."""
        example = recorded.example
        kept = example is not None and example.model == self._weak and self._made_here(example, self._dimension())
        with self._library_lock:
            self._forget(recorded.evicted)
            if example is not None:
                scope = example.tenant if self._per_tenant else ""
                library = self._libraries.get(scope)
                if kept:
                    if library is None:
                        empty = np.zeros((0, len(example.embedding)), np.float32)
                        library = self._libraries[scope] = _Library(empty, np.zeros(0), [])
                    library.put(example.decision_id, example.embedding, _push(example.score))
                elif library is not None:
                    library.remove(example.decision_id)
                    if not len(library):
                        del self._libraries[scope]
            if not self._per_tenant:
                return sum(len(scoped) for scoped in self._libraries.values())
            # Only the decision's tenant's examples move its tenant's routing; counting the others
            # would tell a caller how much every other tenant rates.
            own = self._libraries.get(recorded.entry.tenant)
            return 0 if own is None else len(own)

    def apply_example_cap(self) -> int:
        """Evict the store's examples past its cap (``FeedbackStore.apply_cap``): for a stage
        built by a reload, whose store did not evict at open, once it serves. Returns how many
        were evicted. The library is left as it is: it was read as the cap leaves the file, so
        it holds none of them unless the file gained examples since (read it again then,
        ``rebuild_library``, which swaps it in whole: dropping ids one by one held the lock
        ``score`` takes on the event loop for seconds, 100,000 ids over 200 tenants)."""
        if self._feedback is None:
            return 0
        return len(self._feedback.apply_cap())

    def _forget(self, evicted: tuple[EvictedExample, ...]) -> None:
        """Drop the ``evicted`` examples from the library of their tenant (or the shared one), and
        a library left empty (the total cap evicts other tenants' examples: their libraries must
        not outlive them); the caller holds its lock. Only that library is looked at: every
        library was, under the lock Routes score under (~120 ms a Feedback at 200,000 tenants)."""
        for example in evicted:
            scope = example.tenant if self._per_tenant else ""
            library = self._libraries.get(scope)
            if library is not None:
                library.remove(example.decision_id)
                if not len(library):
                    del self._libraries[scope]

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
        with self._library_lock:
            library = self._libraries.get(tenant if self._per_tenant else "")
            pushes = library.near_pushes(embedding, self._similarity) if library is not None else None
        used = 0 if pushes is None else len(pushes)
        if pushes is not None and used:
            value = float(np.clip(value + self._weight * 2 * pushes.mean(), 0.0, 1.0))
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
        return dataclasses.replace(verdict, reasons=(reason, *verdict.reasons))


def build(
    config: EmbeddingStageConfig,
    *,
    catalog: Catalog,
    feedback: FeedbackStore | None = None,
    cap_at_open: bool = True,
) -> EmbeddingStage:
    """The stage ``config`` describes; both models must be in ``catalog``.

    ``feedback`` overrides ``config.feedback_db`` (for example to share one store between stages).
    ``cap_at_open`` False opens ``config.feedback_db`` without evicting the examples past
    ``feedback_max_examples`` (``apply_example_cap`` does, once the stage serves); the library
    reads only those the cap keeps.
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
            max_examples=config.feedback_max_examples,
            max_total_examples=config.feedback_max_total_examples,
            examples_per_tenant=config.feedback_scope == "tenant",
            cap_at_open=cap_at_open,
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
