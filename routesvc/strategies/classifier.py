"""The classifier stage: what kind of request is this?

Two kinds behind one stage, both of which annotate ``RoutingInput.task`` (source
"classifier") and pass on, so later stages and rules can use the label:

- ``local`` (here): two votes over labelled examples (by default the team-written
  ``routesvc/data/task_examples.jsonl``), fitted at start: a one-vs-rest ridge over [prompt
  embedding, hashed words and word pairs, lexical cues] and the nearest examples (by embedding and
  words); offline, well under a millisecond for a typical prompt.
- ``llm`` (``routesvc.strategies.llm_classifier``): a cheap configured model asked for the label
  as JSON, with the local classifier here as its fallback.

Either way a local label below ``min_confidence`` is not used: the task stays unknown. This
module has what both share: the labels, the stage's settings and how a stage's reason joins the
verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routesvc.encoders import Encoder, WordLlamaEncoder
from routesvc.errors import ConfigError
from routesvc.features import bounded, lexical_matrix, word_hashes
from routesvc.jsonlines import JsonLineError, json_lines
from routesvc.memo import Memo
from routesvc.ridge import RidgeModel
from routesvc.strategies.base import NextStage, RoutingInput, Verdict

TASK_LABELS: tuple[str, ...] = (
    "code_generation",
    "multi_step_reasoning",
    "creative_writing",
    "summarization",
    "extraction",
    "simple_qa",
    "chat",
    "other",
)
COMPLEXITIES: tuple[str, ...] = ("low", "medium", "high")

# Lexical cues are few next to the embedding's dimensions; repeating them gives them weight.
_CUE_REPEAT = 8
_HASH_DIM = 1024
# The nearest-examples vote: each label's mean similarity over its closest examples, sharpened;
# it carries most of the weight (real prompts are long and varied, and the ridge alone takes
# whatever is long and technical for reasoning). Chosen on hand-labelled Chatbot Arena prompts,
# checked on AlpacaEval's: docs/routing-quality.md, "Task classifier".
_NEIGHBOURS = 5
_WORDS_WEIGHT = 0.6
_NEIGHBOUR_SHARE = 0.7
_RIDGE_SHARPNESS = 8.0
_NEIGHBOUR_SHARPNESS = 30.0
# The labels the default policy sends to a stronger model are favoured 1.25 : 1 over the others
# (then renormalised): a missed coding, maths or creative request costs answer quality, a false one
# costs money. Chosen on the Chatbot Arena prompts like the rest (+3-6 points of their recall,
# +3 points of "other" prompts taken for them).
_FAVOURED = frozenset({"code_generation", "multi_step_reasoning", "creative_writing"})
_FAVOUR = 1.25


class ClassifierStageConfig(BaseModel):
    """Settings of the classifier stage."""

    # As config.py's other settings: a float is a finite number (a timeout_s of .inf was taken,
    # then failed every request INTERNAL), and refused values are left out of the message.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True)

    kind: Literal["classifier"] = "classifier"
    method: Literal["local", "llm"] = Field("local", description="local model, or ask a cheap LLM")
    examples: Path | None = Field(None, description="JSONL of {task, prompt}; default: the shipped examples")
    min_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="a local label (the local method's, or the llm method's fallback's) below this confidence is"
        " not used: the task stays unknown",
    )
    override_hint: bool = Field(False, description="classify even when the request carries a task hint")
    model: str = Field("", description="catalog model id asked by the llm method")
    timeout_s: float = Field(2.0, gt=0, description="bound on the llm call; past it the stage falls back")
    cache_size: int = Field(
        10_000, ge=0, description="labels kept, keyed by prompt hash (the llm method: by tenant and prompt hash)"
    )
    fallback_local: bool = Field(True, description="llm method: use the local classifier on failure")


@dataclass(frozen=True, slots=True)
class TaskPrediction:
    """A task label with the classifier's confidence in [0, 1]."""

    task: str
    confidence: float


def read_examples(path: Path | None = None) -> list[tuple[str, str]]:
    """(task, prompt) pairs from a JSONL file, or the shipped team-written examples."""
    if path is None:
        data = resources.files("routesvc").joinpath("data", "task_examples.jsonl").read_bytes()
        return _examples(io.BytesIO(data), "routesvc/data/task_examples.jsonl")
    try:
        with path.open("rb") as handle:
            return _examples(handle, path)
    except OSError as exc:
        raise ConfigError(f"classifier examples {path}: {exc.strerror}") from exc


def _examples(handle: Iterable[bytes], where: Path | str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    try:
        for number, row in json_lines(handle, where):
            if not (isinstance(row, dict) and isinstance(row.get("task"), str) and isinstance(row.get("prompt"), str)):
                raise ConfigError(f'{where}:{number}: expected {{"task": str, "prompt": str}}')
            pairs.append((row["task"], row["prompt"]))
    except JsonLineError as exc:
        raise ConfigError(exc.message) from exc
    return pairs


class TaskClassifier:
    """Two votes over labelled examples, mixed: a one-vs-rest ridge over [embedding, hashed words
    and word pairs, repeated lexical cues], and the nearest examples by embedding and words."""

    def __init__(self, encoder: Encoder, examples: Sequence[tuple[str, str]], alpha: float = 3.0) -> None:
        if not examples:
            raise ConfigError("the task classifier needs at least one labelled example")
        self._encoder = encoder
        self.labels: tuple[str, ...] = tuple(sorted({task for task, _ in examples}))
        label_of = np.array([self.labels.index(task) for task, _ in examples])
        texts = [bounded(prompt) for _, prompt in examples]
        vectors, words = encoder.encode(texts), word_hashes(texts, _HASH_DIM)
        targets = np.eye(len(self.labels))[label_of]
        self._fold(RidgeModel.fit(self._features(texts, vectors, words), targets, alpha=alpha), vectors.shape[1])
        self._index_examples(vectors, words, label_of)
        self._favour = np.array([_FAVOUR if label in _FAVOURED else 1.0 for label in self.labels])

    def _fold(self, model: RidgeModel, dim: int) -> None:
        """The ridge folded for prediction: standardisation moved into the weights, and the weights
        of the repeated cue columns summed, so a prediction is three small products, no copies."""
        weights = model.coef / model.scale[:, None]
        self._bias = model.intercept - (model.mean / model.scale) @ model.coef
        self._vector_weights = weights[:dim]
        self._word_weights = weights[dim : dim + _HASH_DIM]
        self._cue_weights = weights[dim + _HASH_DIM :].reshape(_CUE_REPEAT, -1, len(self.labels)).sum(axis=0)

    def _index_examples(self, vectors: np.ndarray, words: np.ndarray, label_of: np.ndarray) -> None:
        """The nearest-examples vote compares [unit embedding, ``_WORDS_WEIGHT`` x hashed words] at
        unit length, kept as its two parts and their norms (one product each, no stacked copy per
        prompt). ``_gather`` holds each label's example columns, padded with the column of -inf
        appended after them, so one partition finds every label's closest examples at once."""
        self._example_vectors = np.asarray(vectors, dtype=np.float32)  # unit rows: the Encoder contract
        self._example_words = np.asarray(words, dtype=np.float32)
        self._example_norms = _space_norms(self._example_vectors, self._example_words)
        counts = np.bincount(label_of, minlength=len(self.labels))
        self._gather = np.full((len(self.labels), int(counts.max())), len(self._example_vectors), dtype=np.intp)
        for i in range(len(self.labels)):
            members = np.flatnonzero(label_of == i)
            self._gather[i, : len(members)] = members
        self._neighbours = min(_NEIGHBOURS, int(counts.max()))
        self._neighbour_counts = np.minimum(counts, self._neighbours).astype(np.float64)

    def _features(
        self, texts: Sequence[str], vectors: np.ndarray, words: np.ndarray
    ) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
        lexical = np.tile(lexical_matrix(texts), _CUE_REPEAT)
        return np.hstack([vectors, words, lexical]).astype(np.float64)

    def predict_many(self, texts: Sequence[str]) -> list[TaskPrediction]:
        """The most likely task of each text (read up to ``features.READ_CHARS``), with the mixed
        votes' probability as confidence."""
        if not texts:
            return []
        texts = [bounded(text) for text in texts]
        vectors, words = self._encoder.encode(texts), word_hashes(texts, _HASH_DIM)
        raw = vectors @ self._vector_weights + words @ self._word_weights + lexical_matrix(texts) @ self._cue_weights
        ridge = _softmax(raw + self._bias, _RIDGE_SHARPNESS)
        units = np.asarray(vectors, dtype=np.float32)
        products = units @ self._example_vectors.T + _WORDS_WEIGHT**2 * (words @ self._example_words.T)
        similarities = products / (_space_norms(units, words)[:, None] * self._example_norms[None, :])
        padded = np.concatenate([similarities, np.full((len(texts), 1), -np.inf, dtype=np.float32)], axis=1)
        grouped = padded[:, self._gather]  # (texts, labels, most examples of a label)
        width = grouped.shape[2]
        closest = np.partition(grouped, width - self._neighbours, axis=2)[:, :, width - self._neighbours :]
        # Each label's mean similarity over its closest examples (fewer when it has fewer).
        nearest = np.where(np.isfinite(closest), closest, 0.0).sum(axis=2) / self._neighbour_counts
        mixed = (1 - _NEIGHBOUR_SHARE) * ridge + _NEIGHBOUR_SHARE * _softmax(nearest, _NEIGHBOUR_SHARPNESS)
        probs = mixed * self._favour
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [TaskPrediction(self.labels[i], float(probs[row, i])) for row, i in enumerate(best)]

    def predict(self, text: str) -> TaskPrediction:
        """The most likely task of ``text``."""
        return self.predict_many([text])[0]


@functools.cache
def shipped_classifier() -> TaskClassifier:
    """The local task classifier on the shipped team-written examples (built once, ~0.25 s)."""
    return TaskClassifier(WordLlamaEncoder(), read_examples(None))


def _space_norms(units: np.ndarray, words: np.ndarray) -> np.ndarray[tuple[int], np.dtype[np.float32]]:
    """Length of each [unit embedding, ``_WORDS_WEIGHT`` x hashed words] row: the space the nearest
    examples are looked for in (the embedding, and with a lesser weight the words: a long pasted
    text can outweigh its instruction in an averaged embedding, "summarise" or "poem" still counts
    as a word)."""
    squares = np.einsum("ij,ij->i", units, units) + _WORDS_WEIGHT**2 * np.einsum("ij,ij->i", words, words)
    return np.asarray(np.maximum(np.sqrt(squares), 1e-12), dtype=np.float32)


def _softmax(scores: np.ndarray, sharpness: float) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
    exp = np.exp((scores - scores.max(axis=1, keepdims=True)) * sharpness)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float64)


def task_left(routing_input: RoutingInput) -> str:
    """What a classifier stage (local or llm) that could not label a request leaves: the task an
    earlier stage or the request's hint set (with ``override_hint``), or none."""
    if routing_input.task:
        return f"kept task {routing_input.task!r} from {routing_input.task_source}"
    return "task left unknown"


def overriding(routing_input: RoutingInput, label: str) -> str:
    """What a classifier stage's reason adds when its ``label`` replaces (``override_hint``)
    another task the hint or an earlier stage set: "; overriding task 'X' from hint"; "" when
    there was none or it is the same."""
    if not routing_input.task or not label or label == routing_input.task:
        return ""
    return f"; overriding task {routing_input.task!r} from {routing_input.task_source}"


def with_reason(verdict: Verdict, reason: str, task: str) -> Verdict:
    """``verdict`` with a classifier stage's ``reason`` first, and ``task`` (its label) when the
    stages after it set none."""
    return dataclasses.replace(verdict, reasons=(reason, *verdict.reasons), task=verdict.task or task)


class LocalClassifierStage:
    """Labels the request's task offline and passes it on."""

    def __init__(
        self,
        classifier: TaskClassifier,
        *,
        min_confidence: float = 0.0,
        override_hint: bool = False,
        cache_size: int = 10_000,
    ) -> None:
        self._classifier = classifier
        self._min_confidence = min_confidence
        self._override_hint = override_hint
        self._predictions: Memo[TaskPrediction] = Memo(cache_size)

    @property
    def name(self) -> str:
        """The stage name in decisions."""
        return "classifier"

    async def decide(self, routing_input: RoutingInput, next_stage: NextStage) -> Verdict:
        """Set ``task`` (unless a hint already did) and defer to the rest of the policy."""
        if routing_input.task and not self._override_hint:
            verdict = await next_stage(routing_input)
            return with_reason(
                verdict, f"classifier: kept task {routing_input.task!r} from {routing_input.task_source}", ""
            )
        prediction = self._predictions.compute(routing_input.request.chat.last_user_message, self._classifier.predict)
        if prediction.confidence < self._min_confidence:
            verdict = await next_stage(routing_input)
            reason = (
                f"classifier: local guess {prediction.task!r} at confidence {prediction.confidence:.4g}"
                f" is below {self._min_confidence:.4g}; {task_left(routing_input)}"
            )
            return with_reason(verdict, reason, "")
        annotated = dataclasses.replace(routing_input, task=prediction.task, task_source=self.name)
        verdict = await next_stage(annotated)
        reason = (
            f"classifier: local model labelled the task {prediction.task!r} (confidence {prediction.confidence:.2f})"
            f"{overriding(routing_input, prediction.task)}"
        )
        return with_reason(verdict, reason, prediction.task)


def task_classifier(config: ClassifierStageConfig, encoder: Encoder | None = None) -> TaskClassifier:
    """The local classifier ``config`` describes (the local method's, or the llm method's
    fallback): fitted on its ``examples`` with ``encoder`` (default the shipped WordLlama one),
    or with neither given the shipped one, fitted once per process (the fitted router's kind
    prior labels with it too)."""
    if config.examples is None and encoder is None:
        return shipped_classifier()
    try:
        return TaskClassifier(encoder or WordLlamaEncoder(), read_examples(config.examples))
    except ConfigError as exc:
        raise ConfigError(f"classifier.examples: {exc.message}") from exc


def build(config: ClassifierStageConfig, *, encoder: Encoder | None = None) -> LocalClassifierStage:
    """The local method's stage ``config`` describes; ``encoder`` as ``task_classifier`` takes
    it. The llm method's is ``llm_classifier.build``'s."""
    return LocalClassifierStage(
        task_classifier(config, encoder),
        min_confidence=config.min_confidence,
        override_hint=config.override_hint,
        cache_size=config.cache_size,
    )
