"""The SQLite feedback store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routesvc.errors import InvalidRequest
from routesvc.feedback import FeedbackStore, UnknownDecision


class TestFeedbackStore:
    def test_outcomes_survive_a_restart(self, tmp_path: Path) -> None:
        """What one store recorded is read back by a new store on the same file."""
        path = tmp_path / "feedback.db"
        store = FeedbackStore(path)
        store.remember("d-1", "weak-model", [0.6, 0.8])
        store.record("d-1", 0.25)
        store.close()
        reopened = FeedbackStore(path)
        [entry] = reopened.entries()
        [example] = reopened.examples()
        reopened.close()
        assert (entry.decision_id, entry.model, entry.score) == ("d-1", "weak-model", 0.25)
        assert example.embedding.tolist() == pytest.approx([0.6, 0.8])

    def test_unknown_decision_is_refused(self, tmp_path: Path) -> None:
        """Feedback for a decision that was never remembered raises ``UnknownDecision``."""
        store = FeedbackStore(tmp_path / "f.db")
        with pytest.raises(UnknownDecision):
            store.record("nope", 1.0)

    def test_score_must_be_in_unit_interval(self, tmp_path: Path) -> None:
        """A score outside [0, 1] is an invalid request naming the field."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", np.ones(2, dtype=np.float32))
        with pytest.raises(InvalidRequest) as caught:
            store.record("d", 1.5)
        assert caught.value.field == "score"

    def test_examples_use_the_latest_outcome(self, tmp_path: Path) -> None:
        """A decision rated twice contributes one example with its latest score; entries list both."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        store.record("d", 0.0)
        store.record("d", 1.0)
        assert [e.score for e in store.examples()] == [1.0]
        assert [e.score for e in store.entries()] == [1.0, 0.0]

    def test_decisions_without_feedback_are_not_examples(self, tmp_path: Path) -> None:
        """Remembering alone adds nothing to the library."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        assert store.examples() == []
