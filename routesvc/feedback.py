"""The feedback store: outcomes reported for past decisions, kept in an embedded SQLite file.

The router remembers each decision it may get feedback on (its id, the model that answered and
the prompt's embedding: never the prompt text); the Feedback RPC then records an outcome score
in [0, 1] (thumbs up = 1, thumbs down = 0) against the decision id. ``examples()`` joins the two
so the embedding stage can rebuild its example library from them after a restart.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routesvc.errors import InvalidRequest, RouteSvcError


class UnknownDecision(RouteSvcError):
    """Feedback names a decision id the store never saw (or has forgotten)."""

    reason = "UNKNOWN_DECISION"


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """One recorded outcome."""

    decision_id: str
    model: str
    score: float
    recorded_at: float


@dataclass(frozen=True, slots=True)
class FeedbackExample:
    """A remembered prompt embedding, the model that answered it and its latest outcome score."""

    decision_id: str
    model: str
    embedding: np.ndarray[tuple[int], np.dtype[np.float32]]
    score: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id TEXT NOT NULL REFERENCES decisions(decision_id),
    score REAL NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_decision ON feedback(decision_id);
"""


class FeedbackStore:
    """SQLite-backed decisions and outcomes; safe to share between threads. Close with ``close()``."""

    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def remember(
        self, decision_id: str, model: str, embedding: Sequence[float] | np.ndarray[tuple[int], np.dtype[np.float32]]
    ) -> None:
        """Keep what a later outcome for ``decision_id`` will need."""
        blob = np.asarray(embedding, dtype=np.float32).tobytes()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?)", (decision_id, model, blob, time.time())
            )

    def record(self, decision_id: str, score: float) -> FeedbackEntry:
        """Store an outcome in [0, 1] for a remembered decision."""
        if not 0.0 <= score <= 1.0:
            raise InvalidRequest("score", f"must be within [0, 1], got {score}")
        with self._lock:
            row = self._db.execute("SELECT model FROM decisions WHERE decision_id = ?", (decision_id,)).fetchone()
            if row is None:
                raise UnknownDecision(f"no remembered decision {decision_id!r}")
            now = time.time()
            self._db.execute(
                "INSERT INTO feedback (decision_id, score, recorded_at) VALUES (?, ?, ?)", (decision_id, score, now)
            )
        return FeedbackEntry(decision_id, str(row[0]), score, now)

    def entries(self, limit: int = 100) -> list[FeedbackEntry]:
        """The latest ``limit`` outcomes, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.decision_id, d.model, f.score, f.recorded_at FROM feedback f"
                " JOIN decisions d USING (decision_id) ORDER BY f.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [FeedbackEntry(str(a), str(b), float(c), float(d)) for a, b, c, d in rows]

    def examples(self) -> list[FeedbackExample]:
        """Every decision with an outcome, scored by its latest outcome: the library's raw material."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.decision_id, d.model, d.embedding, f.score FROM decisions d JOIN feedback f"
                " ON f.id = (SELECT MAX(id) FROM feedback WHERE decision_id = d.decision_id)"
            ).fetchall()
        return [
            FeedbackExample(str(a), str(b), np.frombuffer(blob, dtype=np.float32).copy(), float(score))
            for a, b, blob, score in rows
        ]

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()
