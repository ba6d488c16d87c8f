"""Text encoders: prompts in, unit-length vectors out, behind one small ``Encoder`` protocol.

- ``WordLlamaEncoder`` (default): static token embeddings with weights shipped in the
  ``wordllama`` wheel; numpy only, no torch, no download (about 0.6 ms per long prompt on one
  core; see docs/routing-quality.md for the measurement and why it is the default).
- ``OpenAIEncoder``: an OpenAI-compatible embeddings endpoint (``text-embedding-3-small``)
  through the openai SDK; its errors become ``EncoderError``.
- ``HashingEncoder``: a deterministic bag of hashed word n-grams; no weights at all, for tests
  and as a last-resort fallback.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from routesvc.errors import RouteSvcError
from routesvc.memo import Memo

Vectors = npt.NDArray[np.float32]


class EncoderError(RouteSvcError):
    """An encoder could not be loaded or failed to encode."""

    reason = "ENCODER_FAILED"


class Encoder(Protocol):
    """Turns texts into unit-length vectors of a fixed dimension."""

    @property
    def name(self) -> str:
        """A stable id recorded in fitted artifacts, for example "wordllama-l2-256"."""
        ...

    def encode(self, texts: Sequence[str]) -> Vectors:
        """One L2-normalised row per text, shape (len(texts), dim), float32 (all zero for a text
        with nothing to encode, such as "")."""
        ...


def _normalise(vectors: npt.NDArray[np.floating[npt.NBitBase]] | Vectors) -> Vectors:
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", array, array))[:, None]
    return np.asarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


class WordLlamaEncoder:
    """WordLlama's ``l2_supercat`` static embeddings, loaded from the installed package only.

    Encoders of one dimension share one loaded model (~46 MiB of weights) in a process, and the
    vectors of the last prompts encoded one at a time: the classifier and an embedding stage that
    both encode a request's last message compute its vector once.
    """

    def __init__(self, dim: int = 256) -> None:
        self._model, self._recent = _shared_wordllama(dim)
        self._dim = dim

    @property
    def name(self) -> str:
        """The encoder id, with its dimension."""
        return f"wordllama-l2-{self._dim}"

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Mean-pooled static embeddings, L2-normalised."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        if len(texts) == 1:
            return self._recent.compute(texts[0], lambda text: self._embed([text]))
        return self._embed(list(texts))

    def _embed(self, texts: list[str]) -> Vectors:
        # WordLlama averages a text's token vectors; a text without tokens ("") averages nothing
        # and comes back NaN, which would poison a fitted ridge or a similarity: make it zero.
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.asarray(self._model.embed(texts, norm=True, batch_size=64), dtype=np.float32)
        empty = np.isnan(pooled[:, 0])  # such a row is NaN throughout
        if empty.any():
            pooled[empty] = 0.0
        vectors = _normalise(pooled)
        vectors.flags.writeable = False  # shared by every caller that asks for the same text
        return vectors


@functools.cache
def _shared_wordllama(dim: int) -> tuple[Any, Memo[Vectors]]:
    """The process's WordLlama model of dimension ``dim``, and its memo of recent single prompts."""
    try:
        import wordllama  # type: ignore[import-untyped]  # ships no py.typed
        from wordllama import WordLlama
    except ImportError as exc:
        raise EncoderError("the wordllama encoder needs the wordllama package") from exc
    package_dir = Path(wordllama.__file__).parent
    try:
        model = WordLlama.load(cache_dir=package_dir, dim=dim, disable_download=True)
    except Exception as exc:  # wordllama raises bare errors when weights are missing
        raise EncoderError(f"wordllama weights for dim {dim} are not in {package_dir}") from exc
    tokenizer = model.tokenizer
    if hasattr(tokenizer, "encode_batch_fast"):  # tokenizers >= 0.20
        # The same ids and masks as WordLlama's own tokenize (``encode_batch``), without the
        # character offsets nothing here reads: a third less time on long prompts.
        model.tokenize = functools.partial(_tokenize_without_offsets, tokenizer)
    return model, Memo(4096)


def _tokenize_without_offsets(tokenizer: Any, texts: str | list[str]) -> list[Any]:
    return list(tokenizer.encode_batch_fast([texts] if isinstance(texts, str) else texts, add_special_tokens=False))


class HashingEncoder:
    """Signed feature hashing of lower-cased words and word bigrams (no weights)."""

    def __init__(self, dim: int = 256) -> None:
        self._dim = dim

    @property
    def name(self) -> str:
        """The encoder id, with its dimension."""
        return f"hashing-{self._dim}"

    def _slot(self, token: str) -> tuple[int, float]:
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self._dim, 1.0 if (value >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Hashed unigram and bigram counts, L2-normalised."""
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for token in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
                slot, sign = self._slot(token)
                out[row, slot] += sign
        return _normalise(out)


class OpenAIEncoder:
    """Embeddings from an OpenAI-compatible ``/embeddings`` endpoint (sync SDK client)."""

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 30.0,
        batch_size: int = 256,
    ) -> None:
        import openai

        self._model = model
        self._batch_size = batch_size
        self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=1)

    @property
    def name(self) -> str:
        """The encoder id, naming the embeddings model."""
        return f"openai-{self._model}"

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embeddings in input order, L2-normalised; SDK errors become ``EncoderError``."""
        import openai

        rows: list[list[float]] = []
        for start in range(0, len(texts), self._batch_size):
            batch = [text or " " for text in texts[start : start + self._batch_size]]
            try:
                response = self._client.embeddings.create(model=self._model, input=batch)
            except openai.APIError as exc:
                raise EncoderError(f"embeddings call to {self._model} failed: {type(exc).__name__}") from exc
            rows.extend(item.embedding for item in sorted(response.data, key=lambda item: item.index))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return _normalise(np.array(rows, dtype=np.float32))

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()


class StackedEncoder:
    """Several encoders side by side: their unit vectors concatenated, then rescaled to unit length."""

    def __init__(self, encoders: Sequence[Encoder]) -> None:
        if not encoders:
            raise EncoderError("a stacked encoder needs at least one encoder")
        self._encoders = tuple(encoders)

    @property
    def name(self) -> str:
        """The parts' names joined by "+"."""
        return "+".join(encoder.name for encoder in self._encoders)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Each part's vectors side by side, L2-normalised."""
        return _normalise(np.hstack([encoder.encode(texts) for encoder in self._encoders]))


DEFAULT_ROUTER_ENCODER = "wordllama-l2-256+hashing-256"
"""The encoder ``routesvc fit`` uses unless told otherwise (chosen by leave-one-task-out CV)."""


def load_encoder(name: str) -> Encoder:
    """The local encoder recorded as ``name`` in an artifact ("wordllama-l2-256", "hashing-256",
    or parts joined by "+")."""
    if "+" in name:
        return StackedEncoder([load_encoder(part) for part in name.split("+")])
    kind, _, dim = name.rpartition("-")
    if not dim.isdigit():
        raise EncoderError(f"unknown encoder {name!r}")
    if not re.fullmatch(r"[1-9][0-9]*", dim):  # ASCII, no leading zero: the name it gives back is this one
        raise EncoderError(f"encoder {name!r}: the dimension must be a whole number of at least 1")
    if kind == "wordllama-l2":
        return WordLlamaEncoder(int(dim))
    if kind == "hashing":
        return HashingEncoder(int(dim))
    raise EncoderError(f"encoder {name!r} is not local; construct it explicitly")
