"""The SQLite feedback store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from routesvc import feedback as feedback_module
from routesvc.errors import (
    ConfigError,
    FeedbackStoreBusy,
    FeedbackStoreDiskError,
    FeedbackStoreFull,
    FeedbackStoreUnavailable,
    InvalidRequest,
)
from routesvc.feedback import EvictedExample, FeedbackStore, UnknownDecision, store_failure
from tests.conftest import write_locked


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
        """A decision rated twice contributes one example with its latest score, which replaced
        the first: entries list that one only."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        store.record("d", 0.0)
        store.record("d", 1.0)
        assert [e.score for e in store.examples()] == [1.0]
        assert [e.score for e in store.entries()] == [1.0]

    def test_decisions_without_feedback_are_not_examples(self, tmp_path: Path) -> None:
        """Remembering alone adds nothing to the library."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        assert store.examples() == []


class TestOpening:
    def test_a_file_that_is_not_sqlite_is_a_config_error_naming_it(self, tmp_path: Path) -> None:
        """A feedback_db that is some other file: a ``ConfigError`` naming the path (it was
        sqlite3.DatabaseError, a traceback and exit 1 from ``routesvc serve``)."""
        path = tmp_path / "notes.jsonl"
        path.write_text('{"id": "q1", "prompt": "not a database, but long enough to have a header"}\n' * 4)
        with pytest.raises(ConfigError) as caught:
            FeedbackStore(path)
        assert caught.value.message == f"feedback_db {path}: file is not a database"

    def test_a_folder_that_is_not_there_is_a_config_error_naming_it(self, tmp_path: Path) -> None:
        """A feedback_db in a folder that does not exist: a ``ConfigError`` naming the path (it was
        sqlite3.OperationalError "unable to open database file")."""
        path = tmp_path / "no" / "such" / "feedback.db"
        with pytest.raises(ConfigError) as caught:
            FeedbackStore(path)
        assert caught.value.message == f"feedback_db {path}: unable to open database file"

    def test_a_file_locked_past_the_busy_timeout_is_a_config_error(self, tmp_path: Path) -> None:
        """Opening while another process holds the file's write lock past the busy timeout: a
        ``ConfigError`` naming the path (a reload is then rejected and tried again at the next
        poll, not taken for our bug), and the file is left for the other process."""
        path = tmp_path / "f.db"
        FeedbackStore(path).close()
        with write_locked(path), pytest.raises(ConfigError) as caught:
            FeedbackStore(path, busy_timeout_seconds=0.01)
        assert caught.value.message == f"feedback_db {path}: database is locked"
        FeedbackStore(path).close()

    def test_a_new_file_another_opener_writes_meanwhile_is_waited_for(self, tmp_path: Path) -> None:
        """A new feedback_db that another connection (a second worker starting at the same moment)
        holds the write lock of while this one switches it to WAL: the open waits for it, as for
        any lock within the busy timeout, and succeeds once it is free. SQLite fails that switch at
        once, not after the busy timeout, and it was a ``ConfigError``: the worker exited 2, and
        its supervisor with it. The lock is freed once the open has met it (logged)."""
        path = tmp_path / "f.db"
        met_the_lock = threading.Event()

        def notify(_: object, __: str, event: dict[str, Any]) -> dict[str, Any]:
            if event["event"] == "sqlite_wal_switch_waiting":
                met_the_lock.set()
            return event

        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with capture_logs(processors=[notify]), ThreadPoolExecutor(1) as pool:
            opening = pool.submit(FeedbackStore, path, busy_timeout_seconds=30.0)
            opening.add_done_callback(lambda _: met_the_lock.set())  # failed at once: no wait
            met_the_lock.wait(30)
            other.execute("ROLLBACK")
            other.close()
            store = opening.result()
        store.remember("d", "m", [1.0, 0.0])
        recorded = store.record("d", 1.0).decision_id
        store.close()
        assert recorded == "d"


class TestRecordingUnderALock:
    def test_feedback_while_another_process_holds_the_lock_is_busy_and_can_be_sent_again(self, tmp_path: Path) -> None:
        """``record`` while another process holds the write lock past the busy timeout raises
        ``FeedbackStoreBusy`` (retry shortly; it was a raw sqlite3.OperationalError, INTERNAL over
        gRPC); nothing was stored, and the same outcome sent again once the lock is free is."""
        path = tmp_path / "f.db"
        store = FeedbackStore(path, busy_timeout_seconds=0.01)
        store.remember("d", "m", [1.0, 0.0])
        store.flush()
        with write_locked(path), pytest.raises(FeedbackStoreBusy) as caught:
            store.record("d", 0.0)
        stored_meanwhile = store.entries()
        entry = store.record("d", 0.0)
        store.close()
        assert (caught.value.reason, caught.value.retry_after) == ("FEEDBACK_STORE_BUSY", 1.0)
        assert str(path) in caught.value.message
        assert stored_meanwhile == []
        assert (entry.decision_id, entry.model, entry.score) == ("d", "m", 0.0)

    def test_a_call_whose_time_ran_out_before_the_lock_was_asked_for_names_no_lock(self, tmp_path: Path) -> None:
        """``record_outcome`` with its deadline (cut: the caller's own) already past when its turn
        comes, nobody holding the file's lock: ``FeedbackStoreBusy`` saying the call's time ran out
        before it wrote the file, nothing stored, the file not ``known_locked``; with another
        process holding the lock past that deadline, it names the file locked (a lock was met). It
        said "stayed locked by another process" either way."""
        path = tmp_path / "f.db"
        store = FeedbackStore(path, busy_timeout_seconds=5.0)
        store.remember("d", "m", [1.0, 0.0])
        store.flush()
        with pytest.raises(FeedbackStoreBusy) as late:
            store.record_outcome("d", 0.0, deadline=feedback_module.LockDeadline(time.monotonic(), cut=True))
        with write_locked(path), pytest.raises(FeedbackStoreBusy) as locked:
            store.record_outcome("d", 0.0, deadline=feedback_module.LockDeadline(time.monotonic() + 0.05, cut=True))
        stored, known_locked = store.entries(), store.known_locked
        store.close()
        assert late.value.message == (
            f"feedback: this call's time ran out before it wrote feedback_db {path}; retry shortly"
        )
        assert locked.value.message == f"feedback_db {path} stayed locked by another process; retry shortly"
        assert (stored, known_locked) == ([], False)

    def test_knows_reads_a_decision_as_recording_would_find_it_without_the_write_lock(self, tmp_path: Path) -> None:
        """``knows`` (a two-stage Feedback's first look reading the later files) says True for a
        decision ``record_outcome`` would find (queued writes written first), False for one never
        seen, one past ``max_pending_decisions`` or another tenant's; it reads while another
        process holds the file's write lock (WAL), which ``record_outcome`` would wait for."""
        path = tmp_path / "f.db"
        store = FeedbackStore(path, max_pending_decisions=1, busy_timeout_seconds=0.01)
        store.remember("old", "m", [1.0, 0.0], tenant="acme")
        store.remember("new", "m", [1.0, 0.0], tenant="acme")
        queued = store.knows("new", tenant="acme", timeout=1.0)  # its write queued: written first
        with write_locked(path):
            new = store.knows("new", tenant="acme", timeout=1.0)
        answers = [
            queued,
            store.knows("new", timeout=1.0),
            store.knows("new", tenant="globex", timeout=1.0),
            store.knows("old", tenant="acme", timeout=1.0),
            store.knows("never", timeout=1.0),
        ]
        store.close()
        assert new is True
        assert answers == [True, True, False, False, False]

    def test_knows_is_answered_within_its_timeout_while_another_process_holds_the_wal_read_locks(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) holds the locks of the WAL's read marks, as SQLite's
        recovery of the file holds them: a reader of the file retries for about 10 s then, whatever
        its busy timeout, and cannot be interrupted. ``knows`` (on the feedback thread, which every
        Feedback call queues on) still answers within its 0.05 s: None, cannot tell (the final look
        asks that file), and None at once while its read is still held up; once the other
        process lets go, it reads the decision again. It read on the caller's thread: blocked for
        as long as the other process held the locks (to SQLite's ~10 s), past its timeout."""
        path = tmp_path / "f.db"
        store = FeedbackStore(path)
        store.remember("d-1", "m", [1.0, 0.0])
        assert store.knows("d-1", timeout=1.0) is True
        holder = (
            "import fcntl, os, sys, time\n"
            "shm = os.open(sys.argv[1] + '-shm', os.O_RDWR)\n"
            "fcntl.lockf(shm, fcntl.LOCK_EX | fcntl.LOCK_NB, 7, 121)  # WAL_CKPT_LOCK to the last read mark\n"
            "print('held', flush=True)\n"
            "time.sleep(1.5)\n"
        )
        with subprocess.Popen([sys.executable, "-c", holder, str(path)], stdout=subprocess.PIPE, text=True) as other:
            assert other.stdout is not None
            assert other.stdout.readline() == "held\n"
            started = time.monotonic()
            held = store.knows("d-1", timeout=0.05)
            first_in = time.monotonic() - started
            time.sleep(0.15)  # past _READ_HELD_SECONDS: the read is taken for held up
            started = time.monotonic()
            meanwhile = store.knows("d-1", timeout=0.05)
            second_in = time.monotonic() - started
        deadline = time.monotonic() + 15
        while (after := store.knows("d-1", timeout=0.05)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        store.close()
        assert (held, first_in < 0.3) == (None, True)
        assert (meanwhile, second_in < 0.01) == (None, True)
        assert after is True


def small_pages(path: Path) -> None:
    """Create the store file at ``path`` with 512-byte pages: a 2-float embedding's row then fits
    in a page, but a 256-float one needs new (overflow) pages wherever it is written."""
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA page_size = 512")
        connection.execute("PRAGMA journal_mode = WAL")  # writes the header with that page size


def disk_full(store: FeedbackStore) -> None:
    """A full disk for ``store``'s writes from now on: its file may not grow a page (SQLite's
    ``max_page_count`` on the store's own connection, which is what makes SQLITE_FULL here)."""
    writer: sqlite3.Connection = store._writer  # private: the pragma holds per connection
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")


class TestRecordingTwice:
    def test_the_same_outcome_again_stores_nothing_more(self, tmp_path: Path) -> None:
        """A decision's latest outcome sent again (a call retried after its answer was lost or its
        deadline passed) is not stored twice; another score is a new, latest outcome, and the
        first score again after it is newer still (it replaces the other, recorded anew)."""
        clock = Clock()
        store = FeedbackStore(tmp_path / "f.db", clock=clock)
        store.remember("d", "m", [1.0, 0.0])
        first = store.record("d", 0.0)
        clock.now += 1
        again = store.record("d", 0.0)
        clock.now += 1
        store.record("d", 1.0)
        clock.now += 1
        store.record("d", 0.0)
        outcomes = [(e.score, e.recorded_at) for e in store.entries()]
        store.close()
        assert again == first
        assert outcomes == [(0.0, clock.now)]

    def test_new_scores_of_one_decision_keep_one_outcome_row(self, tmp_path: Path) -> None:
        """A decision rated 100 times with another score each time keeps one row of ``feedback``
        (its latest), not one a score: the file does not grow with the ratings of one decision."""
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            store.remember("d", "m", [1.0, 0.0])
            for i in range(100):
                store.record("d", i / 100)
        assert outcome_rows(path) == [("d", 0.99)]


class TestStoreFailures:
    def test_a_full_disk_stores_nothing_and_is_feedback_store_full(self, tmp_path: Path) -> None:
        """SQLITE_FULL while recording is ``FeedbackStoreFull`` naming the file (it was a raw
        sqlite3 error, hidden by a failed second ROLLBACK: INTERNAL over gRPC); nothing is half
        stored: the decision still waits, and takes the outcome once there is room."""
        path = tmp_path / "f.db"
        small_pages(path)
        store = FeedbackStore(path)
        store.remember("d", "m", np.ones(256, dtype=np.float32))
        assert store.flush()
        disk_full(store)
        with pytest.raises(FeedbackStoreFull) as caught:
            store.record("d", 0.0)
        stored_meanwhile = (store.entries(), store.examples())
        store._writer.execute("PRAGMA max_page_count = 1000000")  # private: room again
        entry = store.record("d", 0.0)
        store.close()
        assert (caught.value.reason, str(path) in caught.value.message) == ("FEEDBACK_STORE_FULL", True)
        assert stored_meanwhile == ([], [])
        assert (entry.decision_id, entry.score) == ("d", 0.0)

    def test_a_full_disk_logs_the_first_failed_write_not_each(self, tmp_path: Path) -> None:
        """On a full disk every batch the writer writes fails, about one a routed request: the
        first is logged (``feedback_write_failed``), the next ones only counted (each was a
        warning), and the first batch written again logs ``feedback_writes_resumed`` with how
        many batches and writes were lost."""
        path = tmp_path / "f.db"
        small_pages(path)
        store = FeedbackStore(path)
        store.remember("before", "m", np.ones(256, dtype=np.float32))
        assert store.flush()
        disk_full(store)
        with capture_logs() as logs:
            for i in range(5):
                store.remember(f"d{i}", "m", np.ones(256, dtype=np.float32))
                assert store.flush()  # each its own batch
            store._writer.execute("PRAGMA max_page_count = 1000000")  # private: room again
            store.remember("after", "m", np.ones(256, dtype=np.float32))
            assert store.flush()
        store.close()
        events = [
            (entry["event"], entry.get("failed_batches"), entry.get("lost"))
            for entry in logs
            if entry["event"].startswith("feedback_write")
        ]
        assert events == [("feedback_write_failed", 1, 1), ("feedback_writes_resumed", 5, 5)]

    def test_a_read_only_file_stores_nothing_and_is_feedback_store_unavailable(self, tmp_path: Path) -> None:
        """SQLITE_READONLY while recording (here the store's connection made query-only, as root
        ignores file modes) is ``FeedbackStoreUnavailable``: for an operator to fix, no retry."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        assert store.flush()
        store._writer.execute("PRAGMA query_only = ON")  # private: a read-only file for this connection
        with pytest.raises(FeedbackStoreUnavailable) as caught:
            store.record("d", 0.0)
        stored_meanwhile = store.entries()
        store._writer.execute("PRAGMA query_only = OFF")  # private: close writes nothing more
        store.close()
        assert (type(caught.value), caught.value.reason) == (FeedbackStoreUnavailable, "FEEDBACK_STORE_UNAVAILABLE")
        assert stored_meanwhile == []

    @pytest.mark.parametrize(
        ("code", "error"),
        [
            (sqlite3.SQLITE_BUSY, FeedbackStoreBusy),
            (sqlite3.SQLITE_FULL, FeedbackStoreFull),
            (sqlite3.SQLITE_IOERR_WRITE, FeedbackStoreDiskError),
            (sqlite3.SQLITE_IOERR_FSYNC, FeedbackStoreDiskError),
            (sqlite3.SQLITE_READONLY, FeedbackStoreUnavailable),
            (sqlite3.SQLITE_CORRUPT, FeedbackStoreUnavailable),
        ],
    )
    def test_each_failure_of_the_file_is_an_error_of_the_tree(
        self, code: int, error: type[FeedbackStoreUnavailable]
    ) -> None:
        """``store_failure`` sorts SQLite's result codes, extended ones by their primary code: the
        lock held (retry shortly), a full disk, a disk I/O error (may pass), the rest (fix the
        file). Every one is a ``FeedbackStoreUnavailable``, never a bare sqlite3 error."""
        failure = sqlite3.OperationalError("failed")
        failure.sqlite_errorcode = code
        assert type(store_failure("f.db", failure)) is error

    def test_an_error_sqlite3_raises_itself_is_not_taken_for_a_failure_of_the_file(self, tmp_path: Path) -> None:
        """Python's sqlite3 raises some errors itself, with no SQLite result code: a write on a
        closed connection (ProgrammingError) stays that error (our bug: INTERNAL), and an
        OperationalError without a code is ``FeedbackStoreUnavailable``. Reading the missing code
        raised AttributeError in their place."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("d", "m", [1.0, 0.0])
        assert store.flush()
        store._writer.close()  # private: the writer's connection gone under a write
        with pytest.raises(sqlite3.ProgrammingError):
            store.record("d", 0.0)
        store._writer = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)  # private: closable again
        store.close()
        assert type(store_failure("f.db", sqlite3.OperationalError("failed"))) is FeedbackStoreUnavailable


class Clock:
    """A clock the test moves by hand (seconds since the epoch)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SqliteWork:
    """The SQLite work of every connection opened while installed, counted in virtual-machine
    steps (through SQLite's own progress handler on the real connections); it can also run an
    action once from inside the next step, that is while a statement is part-way through."""

    def __init__(self) -> None:
        self.steps = 0
        self._during_next_step: Callable[[], None] | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_connect = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            connection: sqlite3.Connection = real_connect(*args, **kwargs)
            connection.set_progress_handler(self._step, 1)
            return connection

        monkeypatch.setattr(sqlite3, "connect", connect)

    def _step(self) -> int:
        self.steps += 1
        action, self._during_next_step = self._during_next_step, None
        if action is not None:
            action()
        return 0

    def steps_of(self, call: Callable[[], object]) -> int:
        """How many steps ``call`` took."""
        before = self.steps
        call()
        return self.steps - before

    def during_next_step(self, action: Callable[[], None]) -> None:
        """Run ``action`` once, from inside the next statement that runs."""
        self._during_next_step = action


@pytest.fixture
def sqlite_work(monkeypatch: pytest.MonkeyPatch) -> SqliteWork:
    """SQLite work counted on the connections opened during the test."""
    work = SqliteWork()
    work.install(monkeypatch)
    return work


def waiting_decisions(path: Path) -> list[str]:
    """The ids of decisions the file keeps that have no feedback yet, oldest first."""
    with closing(sqlite3.connect(path)) as db:
        return [str(row[0]) for row in db.execute("SELECT decision_id FROM decisions ORDER BY rowid")]


TTL = 3600.0


class TestForgettingDecisions:
    def test_a_decision_without_feedback_expires_after_the_ttl(self, tmp_path: Path) -> None:
        """Feedback is taken until ``decision_ttl_seconds`` after the decision; after that it is
        ``UnknownDecision``, like an id never seen, even before the row is pruned."""
        clock = Clock()
        store = FeedbackStore(tmp_path / "f.db", decision_ttl_seconds=TTL, clock=clock)
        store.remember("early", "m", [1.0, 0.0])
        store.remember("late", "m", [1.0, 0.0])
        clock.now += TTL
        assert store.record("late", 1.0).model == "m"
        clock.now += 1
        with pytest.raises(UnknownDecision) as caught:
            store.record("early", 1.0)
        assert caught.value.reason == "UNKNOWN_DECISION"

    def test_expired_decisions_are_pruned_as_new_ones_arrive(self, tmp_path: Path) -> None:
        """Expired decisions without feedback are deleted from the file, oldest first, a batch
        at a time as later decisions are remembered; only the live ones stay."""
        clock = Clock()
        store = FeedbackStore(tmp_path / "f.db", decision_ttl_seconds=TTL, clock=clock)
        for i in range(100):
            store.remember(f"old-{i}", "m", [1.0, 0.0])
        store.flush()
        clock.now += TTL + 1
        store.remember("new-0", "m", [1.0, 0.0])
        store.flush()
        after_one = waiting_decisions(tmp_path / "f.db")
        for i in range(1, 10):
            store.remember(f"new-{i}", "m", [1.0, 0.0])
        store.flush()
        assert "old-0" not in after_one
        assert "old-99" in after_one
        assert waiting_decisions(tmp_path / "f.db") == [f"new-{i}" for i in range(10)]

    def test_at_most_max_pending_decisions_wait(self, tmp_path: Path) -> None:
        """Past ``max_pending_decisions`` the oldest decisions without feedback are forgotten:
        the file keeps the newest ones, and feedback for an older one is ``UnknownDecision``."""
        store = FeedbackStore(tmp_path / "f.db", max_pending_decisions=5)
        for i in range(20):
            store.remember(f"d{i}", "m", [1.0, 0.0])
        store.flush()
        assert waiting_decisions(tmp_path / "f.db") == [f"d{i}" for i in range(15, 20)]
        with pytest.raises(UnknownDecision):
            store.record("d14", 1.0)
        assert store.record("d15", 1.0).decision_id == "d15"

    def test_a_lower_cap_refuses_feedback_at_once(self, tmp_path: Path) -> None:
        """Reopened with a lower ``max_pending_decisions``, decisions over it are refused before
        any of them is pruned."""
        FeedbackStore(tmp_path / "f.db").close()
        store = FeedbackStore(tmp_path / "f.db")
        for i in range(10):
            store.remember(f"d{i}", "m", [1.0, 0.0])
        store.close()
        lowered = FeedbackStore(tmp_path / "f.db", max_pending_decisions=3)
        assert len(waiting_decisions(tmp_path / "f.db")) == 10
        with pytest.raises(UnknownDecision):
            lowered.record("d6", 1.0)
        assert lowered.record("d7", 1.0).decision_id == "d7"

    def test_decisions_with_feedback_are_kept_as_examples(self, tmp_path: Path) -> None:
        """A rated decision outlives the TTL and the cap: it stays an example, takes more
        feedback, and is still there after a reopen."""
        clock = Clock()
        path = tmp_path / "f.db"
        store = FeedbackStore(path, decision_ttl_seconds=TTL, max_pending_decisions=2, clock=clock)
        store.remember("rated", "weak", [0.6, 0.8])
        store.record("rated", 0.0)
        clock.now += 10 * TTL
        for i in range(50):
            store.remember(f"d{i}", "m", [1.0, 0.0])
        store.record("rated", 0.5)
        store.close()
        reopened = FeedbackStore(path, decision_ttl_seconds=TTL, max_pending_decisions=2, clock=clock)
        [example] = reopened.examples()
        assert (example.decision_id, example.model, example.score) == ("rated", "weak", 0.5)
        assert [e.score for e in reopened.entries()] == [0.5]
        assert waiting_decisions(path) == ["d48", "d49"]

    def test_decisions_still_waiting_survive_a_reopen(self, tmp_path: Path) -> None:
        """A decision remembered before a restart takes feedback after it, within the TTL."""
        clock = Clock()
        store = FeedbackStore(tmp_path / "f.db", decision_ttl_seconds=TTL, clock=clock)
        store.remember("d", "m", [1.0, 0.0])
        store.close()
        clock.now += TTL / 2
        reopened = FeedbackStore(tmp_path / "f.db", decision_ttl_seconds=TTL, clock=clock)
        assert reopened.record("d", 1.0).model == "m"
        assert [e.decision_id for e in reopened.examples()] == ["d"]

    def test_a_file_written_before_examples_were_kept_apart_is_read(self, tmp_path: Path) -> None:
        """A file whose rated and waiting decisions share one table (the first schema) keeps its
        examples and outcomes; its waiting decisions expire like new ones."""
        path = tmp_path / "old.db"
        now = 1_700_000_000.0
        with closing(sqlite3.connect(path)) as db:
            db.executescript(
                "CREATE TABLE decisions (decision_id TEXT PRIMARY KEY, model TEXT NOT NULL,"
                " embedding BLOB NOT NULL, created_at REAL NOT NULL);"
                "CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL"
                " REFERENCES decisions(decision_id), score REAL NOT NULL, recorded_at REAL NOT NULL);"
                "CREATE INDEX feedback_decision ON feedback(decision_id);"
            )
            blob = np.array([0.6, 0.8], dtype=np.float32).tobytes()
            db.executemany(
                "INSERT INTO decisions VALUES (?, ?, ?, ?)",
                [
                    ("rated", "weak", blob, now - 2 * TTL),
                    ("stale", "m", blob, now - 2 * TTL),
                    ("fresh", "m", blob, now),
                ],
            )
            db.execute("INSERT INTO feedback (decision_id, score, recorded_at) VALUES ('rated', 0.25, ?)", (now,))
            db.commit()
        store = FeedbackStore(path, decision_ttl_seconds=TTL, clock=Clock(now))
        [example] = store.examples()
        assert (example.decision_id, example.score) == ("rated", 0.25)
        assert example.embedding.tolist() == pytest.approx([0.6, 0.8])
        with pytest.raises(UnknownDecision):
            store.record("stale", 1.0)
        store.record("fresh", 1.0)
        assert [e.decision_id for e in store.entries()] == ["fresh", "rated"]

    def test_a_file_written_before_the_encoder_was_kept_is_read(self, tmp_path: Path) -> None:
        """A version-1 file (no encoder column) keeps its examples, read with no encoder name, and
        its waiting decisions still take feedback; new decisions record their encoder."""
        path = tmp_path / "v1.db"
        now = 1_700_000_000.0
        blob = np.array([0.6, 0.8], dtype=np.float32).tobytes()
        with closing(sqlite3.connect(path)) as db:
            columns = "(decision_id TEXT PRIMARY KEY, model TEXT NOT NULL, embedding BLOB NOT NULL, created_at REAL)"
            db.executescript(
                f"CREATE TABLE decisions {columns}; CREATE TABLE examples {columns};"
                "CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL,"
                " score REAL NOT NULL, recorded_at REAL NOT NULL); PRAGMA user_version = 1;"
            )
            db.execute("INSERT INTO examples VALUES ('rated', 'weak', ?, ?)", (blob, now))
            db.execute("INSERT INTO decisions VALUES ('waiting', 'weak', ?, ?)", (blob, now))
            db.execute("INSERT INTO feedback (decision_id, score, recorded_at) VALUES ('rated', 0.25, ?)", (now,))
            db.commit()
        store = FeedbackStore(path, decision_ttl_seconds=TTL, clock=Clock(now))
        store.record("waiting", 1.0)
        store.remember("new", "weak", [1.0, 0.0], "hashing-2")
        store.record("new", 0.0)
        examples = {e.decision_id: (e.encoder, e.score) for e in store.examples()}
        assert examples == {"rated": ("", 0.25), "waiting": ("", 1.0), "new": ("hashing-2", 0.0)}

    def test_a_file_written_before_the_tenant_was_kept_is_upgraded_in_place(self, tmp_path: Path) -> None:
        """A version-2 file (no tenant column) is upgraded in place to version 4: its examples and
        waiting decisions keep working, with no tenant, so only a caller that is not authenticated
        may rate them; new decisions record their tenant, and only that tenant may rate them."""
        path = tmp_path / "v2.db"
        now = 1_700_000_000.0
        blob = np.array([0.6, 0.8], dtype=np.float32).tobytes()
        with closing(sqlite3.connect(path)) as db:
            columns = (
                "(decision_id TEXT PRIMARY KEY, model TEXT NOT NULL, embedding BLOB NOT NULL,"
                " created_at REAL NOT NULL, encoder TEXT NOT NULL DEFAULT '')"
            )
            db.executescript(
                f"CREATE TABLE decisions {columns}; CREATE TABLE examples {columns};"
                "CREATE INDEX decisions_created ON decisions(created_at);"
                "CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL"
                " REFERENCES examples(decision_id), score REAL NOT NULL, recorded_at REAL NOT NULL);"
                "CREATE INDEX feedback_decision ON feedback(decision_id); PRAGMA user_version = 2;"
            )
            db.execute("INSERT INTO examples VALUES ('rated', 'weak', ?, ?, 'hashing-2')", (blob, now))
            db.execute("INSERT INTO decisions VALUES ('waiting', 'weak', ?, ?, 'hashing-2')", (blob, now))
            db.execute("INSERT INTO feedback (decision_id, score, recorded_at) VALUES ('rated', 0.25, ?)", (now,))
            db.commit()
        store = FeedbackStore(path, decision_ttl_seconds=TTL, clock=Clock(now))
        with pytest.raises(UnknownDecision):
            store.record("waiting", 1.0, tenant="acme")
        assert store.record("waiting", 1.0).tenant == ""
        store.remember("new", "weak", [1.0, 0.0], "hashing-2", tenant="acme")
        with pytest.raises(UnknownDecision):
            store.record("new", 0.0, tenant="globex")
        assert store.record("new", 0.0, tenant="acme").tenant == "acme"
        examples = {e.decision_id: (e.encoder, e.score) for e in store.examples()}
        store.close()
        with closing(sqlite3.connect(path)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
        assert examples == {"rated": ("hashing-2", 0.25), "waiting": ("hashing-2", 1.0), "new": ("hashing-2", 0.0)}
        assert version == 4

    def test_a_file_keeping_every_outcome_keeps_each_decisions_latest(self, tmp_path: Path) -> None:
        """A version-3 file (each new score of a decision added a row of ``feedback``) keeps only
        each decision's latest outcome once opened: its examples read the same, the file has one
        outcome a decision, and the same latest score again still stores nothing."""
        path = tmp_path / "v3.db"
        with closing_store(path) as store:
            for decision_id in ("a", "b"):
                store.remember(decision_id, "weak", [0.6, 0.8])
                store.record(decision_id, 1.0)
        with closing(sqlite3.connect(path)) as db:
            outcomes = [("a", 0.0), ("b", 0.5), ("a", 0.25)]
            db.executemany("INSERT INTO feedback (decision_id, score, recorded_at) VALUES (?, ?, 1.0)", outcomes)
            db.execute("PRAGMA user_version = 3")
            db.commit()
        with closing_store(path) as store:
            examples = {e.decision_id: e.score for e in store.examples()}
            again = store.record_outcome("a", 0.25).example
        assert examples == {"a": 0.25, "b": 0.5}
        assert again is None
        assert outcome_rows(path) == [("a", 0.25), ("b", 0.5)]


class TestKeepingExamples:
    def test_a_file_over_a_lowered_cap_keeps_each_tenants_newest_examples(self, tmp_path: Path) -> None:
        """A file opened with a ``max_examples`` below what it keeps (kept before the cap, or
        the cap lowered) loses each tenant's oldest examples and their outcomes at once; capped
        in all (``examples_per_tenant`` False) it keeps the newest of all tenants."""
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            for i in range(3):
                for tenant in ("acme", "globex"):
                    store.remember(f"{tenant}-{i}", "m", [1.0, 0.0], tenant=tenant)
                    store.record(f"{tenant}-{i}", 0.0)
        with closing_store(path, max_examples=2) as store:
            per_tenant = sorted(example.decision_id for example in store.examples())
            outcomes = len(store.entries())
        with closing_store(path, max_examples=3, examples_per_tenant=False) as store:
            in_all = [example.decision_id for example in store.examples()]
        assert per_tenant == ["acme-1", "acme-2", "globex-1", "globex-2"]
        assert outcomes == 4
        assert in_all == ["globex-1", "acme-2", "globex-2"]

    def test_a_file_over_the_cap_not_applied_at_open_reads_as_the_cap_leaves_it(self, tmp_path: Path) -> None:
        """A store opened with ``cap_at_open`` False (a reload's, which may yet be rejected) keeps
        every example in the file, but ``examples()`` returns only those the cap keeps, each
        tenant's newest (or the newest of all): a library read from it holds no more than the cap
        and nothing that ``apply_cap`` (this store's or another worker's) then deletes."""
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            for i in range(3):
                for tenant in ("acme", "globex"):
                    store.remember(f"{tenant}-{i}", "m", [1.0, 0.0], tenant=tenant)
                    store.record(f"{tenant}-{i}", 0.0)
        read: dict[str, list[str]] = {}
        for scope, cap, per_tenant in (("tenant", 2, True), ("all", 3, False)):
            with closing_store(path, max_examples=cap, examples_per_tenant=per_tenant, cap_at_open=False) as store:
                read[scope] = [example.decision_id for example in store.examples()]
                in_the_file = len(store.entries())
        with closing_store(path, max_examples=2, cap_at_open=False) as store:
            evicted = store.apply_cap()
            after = [example.decision_id for example in store.examples()]
        assert read == {
            "tenant": ["acme-1", "globex-1", "acme-2", "globex-2"],
            "all": ["globex-1", "acme-2", "globex-2"],
        }
        assert in_the_file == 6
        assert (evicted, after) == (
            (EvictedExample("acme-0", "acme"), EvictedExample("globex-0", "globex")),
            read["tenant"],
        )

    def test_a_total_cap_keeps_the_newest_examples_of_all_tenants(self, tmp_path: Path) -> None:
        """``max_total_examples`` bounds the examples of all tenants together, besides each
        tenant's ``max_examples``: a new example past it evicts the oldest of all (another
        tenant's too, named in ``evicted`` with its tenant, so only that tenant's library is
        looked at), and a tenant left with none keeps no count. A file
        over it opened with ``cap_at_open`` False reads as the caps leave it (each tenant's
        newest, then the newest of those), which is what ``apply_cap`` then keeps."""
        path = tmp_path / "f.db"
        recorded = []
        with closing_store(path, max_examples=2, max_total_examples=3) as store:
            for i in range(5):
                store.remember(f"d{i}", "m", [1.0, 0.0], tenant=f"t{i}")
                recorded.append(store.record_outcome(f"d{i}", 0.0))
            kept = [example.decision_id for example in store.examples()]
        with closing(sqlite3.connect(path)) as db:
            counts = sorted(db.execute("SELECT tenant, examples FROM example_counts").fetchall())
        with closing_store(path) as store:  # the default caps: room for more
            for i, tenant in enumerate(["t2", "t2", "t3", "t9"]):
                store.remember(f"e{i}", "m", [1.0, 0.0], tenant=tenant)
                store.record(f"e{i}", 0.0)
        with closing_store(path, max_examples=2, max_total_examples=4, cap_at_open=False) as store:
            read = [example.decision_id for example in store.examples()]
            evicted = store.apply_cap()
            after = [example.decision_id for example in store.examples()]
        assert [r.evicted for r in recorded] == [
            (),
            (),
            (),
            (EvictedExample("d0", "t0"),),
            (EvictedExample("d1", "t1"),),
        ]
        assert kept == ["d2", "d3", "d4"]
        assert counts == [("t2", 1), ("t3", 1), ("t4", 1)]
        assert read == after == ["e0", "e1", "e2", "e3"]
        # t2's oldest past 2, then the oldest of all past 4
        assert [e.decision_id for e in evicted] == ["d2", "d3", "d4"]

    def test_a_lowered_cap_is_applied_in_short_transactions(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``apply_cap`` commits each tenant's eviction, and each ``_EVICTION_BATCH`` examples of
        it, on its own: another connection sees the file shrink as it goes. It deleted every
        tenant's excess in one transaction (100,000 examples: 6.5 s), holding the file's write
        lock past the busy timeout of a Feedback on another store of the file, which failed."""
        monkeypatch.setattr(feedback_module, "_EVICTION_BATCH", 2, raising=False)  # absent, it fails on what it evicts
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            for tenant, examples in (("acme", 5), ("globex", 3)):
                for i in range(examples):
                    store.remember(f"{tenant}-{i}", "m", [1.0, 0.0], tenant=tenant)
                    store.record(f"{tenant}-{i}", 0.0)
        evict = FeedbackStore._evict_over_the_cap
        committed: list[int] = []

        def counted(store: FeedbackStore, *args: Any, **kwargs: Any) -> tuple[EvictedExample, ...]:
            with closing(sqlite3.connect(path)) as other:
                committed.append(int(other.execute("SELECT COUNT(*) FROM examples").fetchone()[0]))
            return evict(store, *args, **kwargs)

        monkeypatch.setattr(FeedbackStore, "_evict_over_the_cap", counted)
        with closing_store(path, max_examples=1, cap_at_open=False) as store:
            evicted = store.apply_cap()
            kept = [example.decision_id for example in store.examples()]
        assert committed == [8, 6, 4, 4, 2, 2]  # the last: all examples against the total cap, within it
        assert [e.decision_id for e in evicted] == ["acme-0", "acme-1", "acme-2", "acme-3", "globex-0", "globex-1"]
        assert kept == ["acme-4", "globex-2"]

    def test_only_the_tenants_over_the_cap_are_visited(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """``apply_cap`` (at open, at a reload's take-over) runs a transaction for each tenant
        over ``max_examples`` only, then one for all: it ran one for every tenant (8.7 s at
        200,000 tenants of one example, none over the cap)."""
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            for tenant, examples in (("acme", 3), ("globex", 1), ("initech", 1), ("umbrella", 2)):
                for i in range(examples):
                    store.remember(f"{tenant}-{i}", "m", [1.0, 0.0], tenant=tenant)
                    store.record(f"{tenant}-{i}", 0.0)
        evict = FeedbackStore._evict_over_the_cap
        visited: list[str | None] = []

        def counted(store: FeedbackStore, tenant: str | None, *args: Any, **kwargs: Any) -> tuple[EvictedExample, ...]:
            visited.append(tenant)
            return evict(store, tenant, *args, **kwargs)

        monkeypatch.setattr(FeedbackStore, "_evict_over_the_cap", counted)
        with closing_store(path, max_examples=1, cap_at_open=False) as store:
            evicted = store.apply_cap()
        assert visited == ["acme", "umbrella", None]
        assert [e.decision_id for e in evicted] == ["acme-0", "acme-1", "umbrella-0"]

    def test_examples_evicted_at_open_or_by_apply_cap_are_logged_as_a_count(self, tmp_path: Path) -> None:
        """A file over a cap (a lowered one, or the total cap new to an upgraded release) loses
        its oldest examples at open or at ``apply_cap``: how many is logged, with the caps, never
        an id or a tenant (nothing was logged: 5 of 200,005 examples went without a word)."""
        path = tmp_path / "f.db"
        with closing_store(path) as store:
            for i in range(5):
                store.remember(f"secret-{i}", "m", [1.0, 0.0], tenant=f"tenant-{i}")
                store.record(f"secret-{i}", 0.0)
        with capture_logs() as at_open, closing_store(path, max_total_examples=3):
            pass
        with capture_logs() as within, closing_store(path, max_total_examples=3):
            pass
        with (
            closing_store(path, max_examples=1, max_total_examples=1, cap_at_open=False) as store,
            capture_logs() as applied,
        ):
            store.apply_cap()
        expected = {"event": "feedback_examples_evicted", "log_level": "info", "per_tenant": True}
        assert [e for e in at_open if e["event"] == "feedback_examples_evicted"] == [
            {**expected, "examples": 2, "max_examples": 20_000, "max_total_examples": 3}
        ]
        assert [e for e in within if e["event"] == "feedback_examples_evicted"] == []
        assert [e for e in applied if e["event"] == "feedback_examples_evicted"] == [
            {**expected, "examples": 2, "max_examples": 1, "max_total_examples": 1}
        ]
        assert "secret" not in repr(at_open + applied)
        assert "tenant-" not in repr(at_open + applied)


_EMBEDDING = np.ones(2, np.float32).tobytes()


def write_as_the_release_before(path: Path, added: Sequence[tuple[str, str]], removed: Sequence[str] = ()) -> None:
    """Rate (``added``: decision id and tenant) and evict (``removed``) examples as the release
    before the total cap does on the same file: its rows and its tenant's count, not
    ``example_total``, which it knows nothing of."""
    with closing(sqlite3.connect(path)) as db, db:
        for decision_id, tenant in added:
            db.execute(
                "INSERT INTO examples (decision_id, model, embedding, created_at, encoder, tenant)"
                " VALUES (?, 'm', ?, 0, '', ?)",
                (decision_id, _EMBEDDING, tenant),
            )
            db.execute("INSERT INTO feedback (decision_id, score, recorded_at) VALUES (?, 1.0, 0)", (decision_id,))
            db.execute(
                "INSERT INTO example_counts (tenant, examples) VALUES (?, 1)"
                " ON CONFLICT (tenant) DO UPDATE SET examples = examples + 1",
                (tenant,),
            )
        for decision_id in removed:
            [tenant] = db.execute("SELECT tenant FROM examples WHERE decision_id = ?", (decision_id,)).fetchone()
            db.execute("DELETE FROM feedback WHERE decision_id = ?", (decision_id,))
            db.execute("DELETE FROM examples WHERE decision_id = ?", (decision_id,))
            db.execute("UPDATE example_counts SET examples = examples - 1 WHERE tenant = ?", (tenant,))


def examples_and_total(path: Path) -> tuple[int, int]:
    """How many examples the file has, and what its ``example_total`` says."""
    with closing(sqlite3.connect(path)) as db:
        [rows] = db.execute("SELECT COUNT(*) FROM examples").fetchone()
        [total] = db.execute("SELECT examples FROM example_total").fetchone()
    return int(rows), int(total)


class TestTheTotalWithAnotherRelease:
    def test_examples_the_release_before_adds_count_against_the_total_cap(self, tmp_path: Path) -> None:
        """The release before the total cap writing the same file (a rolling upgrade, a rollback)
        adds examples without counting them in ``example_total``: triggers in the file count them,
        so the next example here evicts down to the total cap (it evicted none, the file 16 past
        it). A file the triggers are not in yet (as the first release with the total left it) gets
        them at open."""
        path = tmp_path / "f.db"
        FeedbackStore(path).close()
        with closing(sqlite3.connect(path)) as db:
            db.executescript("DROP TRIGGER IF EXISTS example_added; DROP TRIGGER IF EXISTS example_removed;")
        with closing_store(path, max_examples=100, max_total_examples=5) as store:
            write_as_the_release_before(path, [(f"old-{i}", f"t{i}") for i in range(20)])
            store.remember("new", "m", [1.0, 0.0], tenant="x")
            recorded = store.record_outcome("new", 1.0)
            kept = [example.decision_id for example in store.examples()]
        assert [e.decision_id for e in recorded.evicted] == [f"old-{i}" for i in range(16)]
        assert kept == ["old-16", "old-17", "old-18", "old-19", "new"]
        assert examples_and_total(path) == (5, 5)

    def test_examples_the_release_before_evicts_leave_room_under_the_total_cap(self, tmp_path: Path) -> None:
        """The release before evicting examples (its per-tenant cap, lower) does not take them off
        ``example_total``: the triggers do, so new examples here evict none while the file is
        below the total cap (each evicted a real example, the file at half the cap)."""
        path = tmp_path / "f.db"
        with closing_store(path, max_examples=100, max_total_examples=10) as store:
            for i in range(10):
                store.remember(f"a-{i}", "m", [1.0, 0.0], tenant="a")
                store.record(f"a-{i}", 1.0)
            write_as_the_release_before(path, [], removed=[f"a-{i}" for i in range(8)])
            evicted: list[EvictedExample] = []
            for i in range(3):
                store.remember(f"b-{i}", "m", [1.0, 0.0], tenant="b")
                evicted += store.record_outcome(f"b-{i}", 1.0).evicted
        assert evicted == []
        assert examples_and_total(path) == (5, 5)

    def test_a_total_gone_wrong_never_evicts_more_than_the_excess(self, tmp_path: Path) -> None:
        """Should ``example_total`` still be wrong (the file edited by hand), an eviction is
        bounded by the rows themselves, and sets the total right: 4 examples under a cap of 10
        with a total of 1,000 lose none to a fifth (all 5 went)."""
        path = tmp_path / "f.db"
        with closing_store(path, max_total_examples=10) as store:
            for i in range(4):
                store.remember(f"d{i}", "m", [1.0, 0.0], tenant=f"t{i}")
                store.record(f"d{i}", 1.0)
            with closing(sqlite3.connect(path)) as db, db:
                db.execute("UPDATE example_total SET examples = 1000")
            store.remember("d4", "m", [1.0, 0.0], tenant="t4")
            recorded = store.record_outcome("d4", 1.0)
        assert recorded.evicted == ()
        assert examples_and_total(path) == (5, 5)


def outcome_rows(path: Path) -> list[tuple[str, float]]:
    """Every row of the file's ``feedback`` table: decision id and score, sorted."""
    with closing(sqlite3.connect(path)) as db:
        return sorted((str(a), float(b)) for a, b in db.execute("SELECT decision_id, score FROM feedback"))


@contextmanager
def closing_store(path: Path, **settings: Any) -> Iterator[FeedbackStore]:
    """A store at ``path`` with ``settings``, closed after the block."""
    store = FeedbackStore(path, **settings)
    try:
        yield store
    finally:
        store.close()


class TestExamplesCost:
    def test_examples_do_not_read_decisions_waiting_for_feedback(self, tmp_path: Path, sqlite_work: SqliteWork) -> None:
        """``examples()`` reads the rated decisions only: with 2,000 more decisions waiting for
        feedback it does exactly the same SQLite work (virtual-machine steps) as with 10."""
        store = FeedbackStore(tmp_path / "f.db")
        for i in range(3):
            store.remember(f"rated-{i}", "m", [1.0, 0.0])
            store.record(f"rated-{i}", 0.0)
        for i in range(10):
            store.remember(f"d{i}", "m", [1.0, 0.0])
        store.flush()  # written before the count starts (the writer's steps count too)
        store.examples()  # the first read of a connection also reads the schema
        with_few = sqlite_work.steps_of(store.examples)
        for i in range(10, 2010):
            store.remember(f"d{i}", "m", [1.0, 0.0])
        store.flush()
        with_many = sqlite_work.steps_of(store.examples)
        assert with_few == with_many

    def test_remember_does_not_wait_for_examples_being_read(self, tmp_path: Path, sqlite_work: SqliteWork) -> None:
        """A decision remembered (on the event loop) while a library rebuild is part-way through
        reading the examples (in a worker thread) is stored before that read ends, not after it."""
        store = FeedbackStore(tmp_path / "f.db")
        store.remember("rated", "m", [1.0, 0.0])
        store.record("rated", 0.0)
        finished: list[bool] = []

        def remember_meanwhile() -> None:
            other = threading.Thread(target=store.remember, args=("meanwhile", "m", [1.0, 0.0]))
            other.start()
            # Only a guard against waiting forever on a lock held by the read in progress.
            other.join(timeout=5)
            finished.append(not other.is_alive())

        sqlite_work.during_next_step(remember_meanwhile)
        [example] = store.examples()
        assert (example.decision_id, finished) == ("rated", [True])
        assert store.record("meanwhile", 1.0).decision_id == "meanwhile"


class TestClosing:
    def test_a_second_close_waits_for_the_first_and_nothing_queued_is_lost(self, tmp_path: Path) -> None:
        """A reload's close waits for a lock another process holds; a stop then closes the same
        store again: the second close waits for the first, so the queued decision is written (it
        closed the connection under the writer, and the write was lost)."""
        path = tmp_path / "f.db"
        store = FeedbackStore(path)
        store.remember("early", "m", [1.0, 0.0])
        store.flush()
        with write_locked(path):
            for i in range(1000):  # more than one batch of the writer's
                store.remember(f"queued-{i}", "m", [1.0, 0.0])
            first = threading.Thread(target=store.close)
            first.start()
            time.sleep(0.2)  # the first close now waits for the writer, which waits for the lock
            second = threading.Thread(target=store.close)
            second.start()
            time.sleep(0.2)
        first.join(10)
        second.join(10)
        assert waiting_decisions(path) == ["early", *(f"queued-{i}" for i in range(1000))]
