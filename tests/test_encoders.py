"""Encoders: shape, normalisation, meaning, and the OpenAI encoder over real HTTP."""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from routesvc.encoders import (
    DEFAULT_ROUTER_ENCODER,
    EncoderError,
    HashingEncoder,
    OpenAIEncoder,
    StackedEncoder,
    WordLlamaEncoder,
    load_encoder,
)
from routesvc.outcomes import read_outcomes
from routesvc.strategies.classifier import read_examples
from tests.conftest import SHARED_DATA


class TestWordLlamaEncoder:
    def test_unit_rows_of_the_named_dimension(self) -> None:
        """Each text becomes one L2-normalised float32 row of 256 dimensions."""
        vectors = WordLlamaEncoder().encode(["write a poem", "sort a list in python"])
        assert vectors.shape == (2, 256)
        assert vectors.dtype == np.float32
        assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)

    def test_similar_requests_are_closer(self) -> None:
        """Two coding requests are closer to each other than to a poem request."""
        a, b, c = WordLlamaEncoder().encode(
            [
                "Write a Python function to reverse a list",
                "Implement a Java method that sorts an array",
                "A poem about the sea",
            ]
        )
        assert float(a @ b) > float(a @ c)

    def test_empty_input(self) -> None:
        """No texts gives an empty matrix of the right width."""
        assert WordLlamaEncoder().encode([]).shape == (0, 256)

    def test_a_text_without_tokens_is_a_zero_row_not_nan(self) -> None:
        """WordLlama averages nothing for "" and returns NaN; the encoder gives zeros (and no
        warning), so one empty prompt cannot poison a fitted model or a similarity."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vectors = WordLlamaEncoder().encode(["", "hello"])
        assert not vectors[0].any()
        assert np.isclose(np.linalg.norm(vectors[1]), 1.0)

    def test_loaded_by_name(self) -> None:
        """``load_encoder`` rebuilds the encoder an artifact names."""
        assert load_encoder("wordllama-l2-256").name == "wordllama-l2-256"

    def test_the_same_vectors_as_wordllamas_own_tokenizing(self) -> None:
        """Tokenizing without offsets changes nothing: the shared prompts (and padded batches of
        them) give exactly the vectors WordLlama's own ``tokenize`` gives."""
        from wordllama.inference import WordLlamaInference  # type: ignore[import-untyped]

        encoder = WordLlamaEncoder()
        texts = [prompt for _, prompt in read_examples()]
        if SHARED_DATA.exists():
            texts += [record.prompt for record in read_outcomes(SHARED_DATA / "routerbench_train.jsonl")][:2000]
        fast = encoder.encode(texts)
        model = encoder._model
        without_offsets = model.tokenize
        del model.tokenize  # back to the class's method (the model is shared: restored below)
        try:
            assert model.tokenize.__func__ is WordLlamaInference.tokenize
            np.testing.assert_array_equal(fast, encoder.encode(texts))
        finally:
            model.tokenize = without_offsets

    def test_encoders_of_one_dimension_share_the_model_and_recent_vectors(self) -> None:
        """A second encoder loads no second copy of the weights, and a prompt one encoder has just
        encoded alone comes back to the other as the same (read-only) vector."""
        prompt = "Summarise this meeting transcript for me, please."
        first, second = WordLlamaEncoder(), WordLlamaEncoder()
        assert first._model is second._model
        vector = first.encode([prompt])
        assert second.encode([prompt]) is vector
        assert not vector.flags.writeable
        np.testing.assert_array_equal(vector, first.encode([prompt, "x"])[:1])


class TestHashingEncoder:
    def test_deterministic_and_normalised(self) -> None:
        """The same text always maps to the same unit vector."""
        encoder = HashingEncoder(64)
        first, second = encoder.encode(["hello there world", "hello there world"])
        assert first.tolist() == second.tolist()
        assert float(np.linalg.norm(first)) == pytest.approx(1.0, abs=1e-6)

    def test_unknown_names_are_refused(self) -> None:
        """A non-local or unknown encoder name raises ``EncoderError``."""
        with pytest.raises(EncoderError):
            load_encoder("openai-text-embedding-3-small")

    @pytest.mark.parametrize("name", ["hashing-0", "hashing-007", "wordllama-l2-0"])
    def test_a_dimension_below_one_or_not_as_named_is_refused(self, name: str) -> None:
        """A dimension of 0 (hashing-0 divided by it on the first text) or written with a leading
        zero (the encoder would name itself otherwise) raises ``EncoderError`` naming it."""
        with pytest.raises(EncoderError, match=rf"^encoder {name!r}: the dimension must be a whole number"):
            load_encoder(name)


class TestStackedEncoder:
    def test_parts_side_by_side_at_unit_length(self) -> None:
        """A stacked encoder concatenates its parts and renormalises."""
        encoder = StackedEncoder([HashingEncoder(8), HashingEncoder(4)])
        [vector] = encoder.encode(["one two three"])
        assert encoder.name == "hashing-8+hashing-4"
        assert vector.shape == (12,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-6)

    def test_the_default_router_encoder_loads_by_name(self) -> None:
        """``fit``'s default encoder name round-trips through ``load_encoder``."""
        assert load_encoder(DEFAULT_ROUTER_ENCODER).name == DEFAULT_ROUTER_ENCODER


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, object]] = []  # noqa: RUF012 - shared log of the stub server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if type(self).status != 200:
            payload = json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
        else:
            # Answer out of order, as the API may: the encoder must sort by index.
            data = [
                {"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0, 0.0]}
                for i, text in reversed(list(enumerate(body["input"])))
            ]
            payload = json.dumps(
                {
                    "object": "list",
                    "data": data,
                    "model": body["model"],
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                }
            ).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def embeddings_server() -> Iterator[str]:
    _EmbeddingsHandler.status = 200
    _EmbeddingsHandler.seen = []
    server = HTTPServer(("127.0.0.1", 0), _EmbeddingsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


class TestOpenAIEncoder:
    def test_batches_and_keeps_input_order(self, embeddings_server: str) -> None:
        """Texts are sent in batches and rows come back in input order, normalised."""
        encoder = OpenAIEncoder(api_key="k", base_url=embeddings_server, batch_size=2)
        vectors = encoder.encode(["a", "bbb", "cc"])
        encoder.close()
        assert [len(body["input"]) for body in _EmbeddingsHandler.seen] == [2, 1]  # type: ignore[arg-type]
        expected = np.array([[1, 1, 0], [3, 1, 0], [2, 1, 0]], dtype=np.float32)
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert vectors == pytest.approx(expected, abs=1e-6)

    def test_sdk_errors_become_encoder_errors(self, embeddings_server: str) -> None:
        """An HTTP error from the endpoint is raised as ``EncoderError`` naming the model."""
        _EmbeddingsHandler.status = 500
        encoder = OpenAIEncoder(api_key="k", base_url=embeddings_server)
        with pytest.raises(EncoderError, match="text-embedding-3-small"):
            encoder.encode(["a"])
