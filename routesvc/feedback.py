"""The feedback store: outcomes reported for past decisions, kept in an embedded SQLite file.

The router remembers each decision it may get feedback on (its id, the model that answered, the
prompt's embedding, never the prompt text, the name of the encoder that made it and the tenant it
was routed for); the Feedback RPC then records an outcome score in [0, 1] (thumbs up = 1, thumbs
down = 0) against the decision id. An authenticated caller may rate only its own tenant's
decisions: another tenant's is refused like one never seen, so its existence is not revealed. A
decision that receives feedback becomes an *example* and is kept, with its latest outcome only
(a new score replaces the one before); ``examples()`` returns them, each with that score, so
the embedding stage can rebuild its example library from them after a restart. Recording the
score a decision has already is a no-op, so a Feedback sent again (its answer lost, or its
deadline passed while its SQLite work went on) is not stored twice. A stage reads only the
examples its own encoder made: vectors of another encoder (the router refitted with another one)
are in another space, even at the same dimension. Rows written before the encoder was kept
(schema version 1 and earlier) have none recorded and are read when their dimension matches.
Rows written before the tenant was kept (version 2 and earlier) have none either: only a caller
that is not authenticated may rate them.

Every routed request is remembered but few get feedback, so decisions still waiting for it are
forgotten: after ``decision_ttl_seconds``, or once ``max_pending_decisions`` newer ones wait, in
small batches as new decisions arrive (never a scan of the file). Feedback for a forgotten
decision is refused like feedback for one never seen (``UnknownDecision``).

The two kinds live in two tables: ``decisions`` (waiting; pruned oldest first) and ``examples``
(rated; read by ``examples()``, whose cost grows with the examples only). Reads use their own
connection, so a rebuild reading the examples in a worker thread never holds up the writes.

``remember`` and ``answered`` run on the event loop for every routed request, so they only queue
their write: one writer thread writes what is queued in one transaction at a time. The file may
be locked by another process for a while (a second worker, an operator's ``sqlite3`` shell, a
backup): the writer waits on the busy timeout, routing does not, and a write that still fails is
logged (``feedback_write_failed``) and dropped, so feedback for those decisions is refused like
feedback for one never seen. ``record`` first waits for the writes queued before it; if
another process then holds the lock past the busy timeout it stores nothing and raises
``FeedbackStoreBusy`` (the caller sends it again). Other failures of the file while it records
or reads are the errors of the tree too (``store_failure``: a full disk, a disk I/O error, a
read-only file), with nothing stored.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from routesvc.errors import (
    ConfigError,
    FeedbackStoreBusy,
    FeedbackStoreDiskError,
    FeedbackStoreFull,
    FeedbackStoreUnavailable,
    InvalidRequest,
    RouteSvcError,
    quoted_id,
)
from routesvc.sqlite import create_private, immediate, is_busy, result_code, use_wal

DEFAULT_DECISION_TTL_SECONDS = 7 * 24 * 3600.0
"""How long a decision waits for feedback by default (a week)."""

DEFAULT_MAX_PENDING_DECISIONS = 1_000_000
"""How many decisions wait for feedback at most by default (~1.4 GB of 256-float embeddings)."""

# Rows pruned at most per remembered decision: one a call keeps pace with a steady stream, and the
# rest drain a backlog (after a long stop, or a lowered cap) without one write paying for all of it.
_PRUNE_BATCH = 16
# Queued writes the writer takes into one transaction at most, and how many may wait: past that
# (the file locked for long under load) new decisions are dropped, and logged, rather than queued
# without bound.
_WRITE_BATCH = 512
_MAX_QUEUED = 100_000
# A failing file (a full disk) fails every batch, about one a routed request: the first failure
# is logged, then every this many, and the recovery once.
_FAILURES_PER_LOG = 1000
# How long ``record`` waits for the writes queued before it (the writer may be waiting on a lock).
_FLUSH_TIMEOUT_SECONDS = 30.0
# Examples ``apply_cap`` deletes in one transaction at most (~0.1 s of writing): a lowered cap
# evicts a large file's excess over many, so none holds the file's lock near another writer's
# busy timeout (a Feedback on another store of the file, another worker), which go in between.
_EVICTION_BATCH = 1_000

DEFAULT_MAX_EXAMPLES = 20_000
"""How many examples are kept at most by default (per tenant, or in all, as the store is told)."""

DEFAULT_MAX_TOTAL_EXAMPLES = 200_000
"""How many examples are kept at most by default in all, whatever the tenants (with auth off a
caller names any tenant it likes: the per-tenant cap alone bounds nothing)."""

DEFAULT_BUSY_TIMEOUT_SECONDS = 5.0
"""How long a statement waits for another process's lock on the file (SQLite's busy timeout)."""

log = structlog.get_logger("routesvc.feedback")


class UnknownDecision(RouteSvcError):
    """Feedback names a decision id the store never saw, or forgot without feedback."""

    reason = "UNKNOWN_DECISION"


@dataclass(frozen=True, slots=True)
class _Remember:
    decision_id: str
    model: str
    embedding: bytes
    encoder: str
    tenant: str
    at: float


@dataclass(frozen=True, slots=True)
class _Answered:
    decision_id: str
    model: str


_Write = _Remember | _Answered


@dataclass(frozen=True, slots=True)
class FeedbackEntry:
    """One recorded outcome; ``tenant`` is the one the decision was routed for ("" for none)."""

    decision_id: str
    model: str
    score: float
    recorded_at: float
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class FeedbackExample:
    """A remembered prompt embedding, the model that answered it and its latest outcome score.

    ``encoder`` names the encoder that made the embedding ("" in files written before it was kept),
    ``tenant`` the tenant the decision was routed for ("" for none, and in files written before
    it was kept).
    """

    decision_id: str
    model: str
    embedding: np.ndarray[tuple[int], np.dtype[np.float32]]
    score: float
    encoder: str = ""
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class EvictedExample:
    """An example deleted to keep within a cap: its decision id and the tenant it was routed for
    ("" for none), so a library of that tenant (not every one) drops it."""

    decision_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class Recorded:
    """What ``record_outcome`` did: the ``entry`` (as ``record`` returns it); the ``example`` as it
    is now when a new outcome was stored (None: the same score again, nothing stored); the
    oldest examples ``evicted`` to keep within the caps."""

    entry: FeedbackEntry
    example: FeedbackExample | None
    evicted: tuple[EvictedExample, ...] = ()


# A wait for the file's lock given at least this share of the busy timeout counts as the busy
# timeout (the file ``known_locked`` when it ends without the lock): what a call does on its turn
# before it (a flush of an idle writer, this process's own locks) takes a few ms. A wait left
# shorter (the call's time spent on another store's lock, on this store's queued writes or a
# reload's take-over) says nothing of a lock lasting the busy timeout: a call with two stores
# waiting 4 s for a brief lock on the first had 1 s left for the second, whose brief lock then made
# it known locked, and the calls queued behind were refused at once.
_FULL_WAIT_SHARE = 0.9
# How long a read of ``knows`` may have been under way (a few ms at most, the GIL shared) before
# the next ``knows`` takes it for held up (another process holding the WAL's read locks: SQLite
# retries for about 10 s) and answers None at once rather than wait its whole timeout behind it.
_READ_HELD_SECONDS = 0.1
# How long a write must have taken to take the file's lock to have met another process's lock
# (``lock_met_since``): another worker's write holds it a few ms (several queued, tens); a
# backup, a shell's transaction or SQLite's recovery, seconds. Timed rather than asked of SQLite,
# which cannot tell a lock from a recovery's held read locks (a write waits them out in its retry).
_LOCK_MET_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class LockDeadline:
    """When a ``record_outcome`` must have the file's write lock (``at``, ``time.monotonic()``):
    the queued writes not written by then or the lock not taken is ``FeedbackStoreBusy``, nothing
    stored. ``cut``: ``at`` is the caller's own deadline, before its busy timeout would end, so the
    lock not taken by then does not make the file ``known_locked`` (the lock it met may be a brief
    write of another worker); nor does a wait for the lock that ``at`` left shorter than the busy
    timeout for another reason (``_FULL_WAIT_SHARE``). ``since``: when the caller came
    (``time.monotonic()``; None: now): a write on the file that met another process's lock since
    held it up (``FeedbackStore.timed_out``)."""

    at: float
    cut: bool = False
    since: float | None = None


class Cancellation:
    """A caller's cancel of its outcome's recording, settled once against the recording's take of
    a file's write lock: a cancel before it (the caller gave up while the call waited for its turn
    or the lock) has the recording store nothing; one after it comes too late, and the recording
    (every store of the call: one ``Cancellation`` for them all) is finished. Checked only before
    the COMMIT, a cancel rolled back the second of two stores after the first had committed (half
    stored), and the server's own end of a call that had taken the lock in time (a late loop
    running answer_by's timer and the call's end together) rolled it back too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._held = False

    def cancel(self) -> bool:
        """Cancel the recording: True if it will store nothing (no lock taken yet)."""
        with self._lock:
            if not self._held:
                self._cancelled = True
            return self._cancelled

    def hold(self) -> bool:
        """The recording has taken a file's lock: True if it goes on (not cancelled before)."""
        with self._lock:
            if not self._cancelled:
                self._held = True
            return self._held


# ``feedback.decision_id`` names a row of ``examples``; files written before examples had their
# own table (user_version 0) declare it against ``decisions``, which SQLite does not enforce here
# (foreign keys are off), so both read the same. Tables of files before version 2 have no
# ``encoder`` column, and before version 3 no ``tenant`` column: they are added on open, empty.
# A decision has one row of ``feedback``, its latest outcome (a new score replaces it); files
# before version 4 kept every outcome, and lose all but each decision's latest on open.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL,
    encoder TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS decisions_created ON decisions(created_at);
CREATE TABLE IF NOT EXISTS examples (
    decision_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL,
    encoder TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id TEXT NOT NULL REFERENCES examples(decision_id),
    score REAL NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_decision ON feedback(decision_id);
CREATE TABLE IF NOT EXISTS example_counts (
    tenant TEXT PRIMARY KEY,
    examples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS example_total (
    examples INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS example_added AFTER INSERT ON examples
BEGIN
    UPDATE example_total SET examples = examples + 1;
END;
CREATE TRIGGER IF NOT EXISTS example_removed AFTER DELETE ON examples
BEGIN
    UPDATE example_total SET examples = examples - 1;
END;
"""

# The triggers keep ``example_total`` in the file itself, so every writer counts in it: the release
# before it, which knows nothing of the total (it still keeps ``example_counts``), writing the
# same file (a rolling upgrade, a rollback) left it wrong until the next open, and the total cap
# then evicted examples of a file far below it, or let it grow past it. They are created at every
# open where missing (above), so the version is unchanged: no release refuses a newer one, and
# nothing else in the file is new.
_SCHEMA_VERSION = 4

# Before version 1 every decision, rated or not, was a row of ``decisions``: opening such a
# file moves the rated ones to ``examples`` once.
_MOVE_RATED_DECISIONS = (
    "INSERT OR IGNORE INTO examples (decision_id, model, embedding, created_at, encoder, tenant)"
    " SELECT decision_id, model, embedding, created_at, encoder, tenant FROM decisions"
    " WHERE decision_id IN (SELECT decision_id FROM feedback)",
    "DELETE FROM decisions WHERE decision_id IN (SELECT decision_id FROM examples)",
)

# Before version 4 each new score of a decision added a row of ``feedback``, and only the latest
# was read: opening such a file deletes the others once.
_KEEP_LATEST_OUTCOMES = "DELETE FROM feedback WHERE id NOT IN (SELECT MAX(id) FROM feedback GROUP BY decision_id)"


# The examples with their latest outcomes, oldest first; ``where`` keeps only some.
_EXAMPLES = (
    "SELECT e.decision_id, e.model, e.embedding, f.score, e.encoder, e.tenant FROM examples e"
    " JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE decision_id = e.decision_id)"
    "{where} ORDER BY e.rowid"
)

# The examples the caps (the parameters) keep: the newest of each tenant, then the newest of
# those in all; or the newest of all. The oldest go first, by rowid, as ``_apply_cap`` deletes them.
_NEWEST_OF_EACH_TENANT = (
    " WHERE e.rowid IN (SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY rowid DESC)"
    " AS newer FROM examples) WHERE newer <= ? ORDER BY rowid DESC LIMIT ?)"
)
_NEWEST_OF_ALL = " WHERE e.rowid IN (SELECT rowid FROM examples ORDER BY rowid DESC LIMIT ?)"


def _open(path: Path | str, busy_timeout_seconds: float) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """The writer and reader connections to ``path``, the schema made current (closed again
    if that fails)."""
    opened: list[sqlite3.Connection] = []
    try:
        writer = sqlite3.connect(str(path), timeout=busy_timeout_seconds, check_same_thread=False, isolation_level=None)
        opened.append(writer)
        use_wal(writer, path, busy_timeout_seconds)
        # WAL with NORMAL syncs at checkpoints, not at every commit: a power cut may lose the
        # last decisions, never corrupt the file; ``remember`` runs on the event loop.
        writer.execute("PRAGMA synchronous=NORMAL")
        writer.executescript(_SCHEMA)
        with immediate(writer):
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            if version < _SCHEMA_VERSION:
                for table in ("decisions", "examples"):
                    columns = {row[1] for row in writer.execute(f"PRAGMA table_info({table})")}
                    for column in ("encoder", "tenant"):
                        if column not in columns:
                            writer.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
                if version < 1:
                    for statement in _MOVE_RATED_DECISIONS:
                        writer.execute(statement)
                if version < 4:
                    writer.execute(_KEEP_LATEST_OUTCOMES)
                writer.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            # After the upgrade: files before version 3 have no ``tenant`` column until then.
            writer.execute("CREATE INDEX IF NOT EXISTS examples_tenant ON examples(tenant)")
            # Counted anew at each open (a release before the counts may have written examples).
            # ``example_total`` is their sum in one row, kept by the triggers: the total cap reads
            # it at each new example, where summing the counts would cost a row per tenant.
            writer.execute("DELETE FROM example_counts")
            writer.execute("INSERT INTO example_counts SELECT tenant, COUNT(*) FROM examples GROUP BY tenant")
            writer.execute("DELETE FROM example_total")
            writer.execute("INSERT INTO example_total SELECT COUNT(*) FROM examples")
        reader = sqlite3.connect(str(path), timeout=busy_timeout_seconds, check_same_thread=False, isolation_level=None)
        opened.append(reader)
        reader.execute("PRAGMA query_only = ON")
    except BaseException:
        for connection in opened:
            connection.close()
        raise
    return writer, reader


def store_failure(path: Path | str, exc: sqlite3.Error) -> FeedbackStoreUnavailable:
    """The error for the file at ``path`` failing with ``exc`` (nothing of the call was stored:
    its transaction rolled back): another process's lock held past the busy timeout is
    ``FeedbackStoreBusy`` (retry shortly), a full disk ``FeedbackStoreFull``, a disk I/O error
    ``FeedbackStoreDiskError`` (may pass), anything else (a read-only or damaged file)
    ``FeedbackStoreUnavailable``, for an operator to fix."""
    code = result_code(exc)
    if is_busy(exc):
        return FeedbackStoreBusy(f"feedback_db {path} stayed locked by another process; retry shortly")
    if code == sqlite3.SQLITE_FULL:
        return FeedbackStoreFull(f"feedback_db {path}: the disk is full; nothing was stored")
    if code == sqlite3.SQLITE_IOERR:
        return FeedbackStoreDiskError(f"feedback_db {path}: disk I/O error ({exc}); nothing was stored")
    return FeedbackStoreUnavailable(f"feedback_db {path} cannot be written ({exc}); nothing was stored")


class FeedbackStore:
    """SQLite-backed decisions and outcomes; safe to share between threads. Close with ``close()``.

    ``path`` is a file (the reads and the writes are two connections to it); one that cannot be
    opened (not a database, in a folder that is not there, locked by another process past
    ``busy_timeout_seconds``) is a ``ConfigError`` naming it. A file over ``max_examples`` (of a
    tenant, or in all, as ``examples_per_tenant`` says) or ``max_total_examples`` (in all) loses
    its oldest examples at open, unless ``cap_at_open`` is False (then at ``apply_cap()``; until
    then ``examples()`` reads it as the caps leave it).
    ``clock`` gives the time in seconds since the epoch; tests pass their own.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        decision_ttl_seconds: float = DEFAULT_DECISION_TTL_SECONDS,
        max_pending_decisions: int = DEFAULT_MAX_PENDING_DECISIONS,
        busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        max_total_examples: int = DEFAULT_MAX_TOTAL_EXAMPLES,
        examples_per_tenant: bool = True,
        cap_at_open: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if decision_ttl_seconds <= 0:
            raise ConfigError(f"feedback: decision_ttl_seconds must be positive, got {decision_ttl_seconds}")
        if max_pending_decisions < 1:
            raise ConfigError(f"feedback: max_pending_decisions must be at least 1, got {max_pending_decisions}")
        if max_examples < 1:
            raise ConfigError(f"feedback: max_examples must be at least 1, got {max_examples}")
        if max_total_examples < 1:
            raise ConfigError(f"feedback: max_total_examples must be at least 1, got {max_total_examples}")
        self._max_examples = max_examples
        # The cap on all examples: with one cap for all (not per tenant) the lower of the two.
        self._max_total = max_total_examples if examples_per_tenant else min(max_examples, max_total_examples)
        self._examples_per_tenant = examples_per_tenant
        self._ttl = decision_ttl_seconds
        self._max_pending = max_pending_decisions
        self._clock = clock
        self._path = path
        self._busy_timeout = busy_timeout_seconds
        # Set when a write waited the busy timeout for another process's lock on the file and did
        # not get it, cleared when a write takes it (``known_locked``).
        self._locked_out = False
        # When the write on the writer connection began to take the file's lock (None: none is
        # taking it), and when the last one that took ``_LOCK_MET_SECONDS`` or more to (another
        # process held it) ended: a call whose time runs out waiting behind one met a lock, one
        # waiting behind a write under way only its own time running out (``timed_out``,
        # ``lock_met_since``).
        self._taking_lock_since: float | None = None
        self._lock_met_at = float("-inf")
        self._lock_met_for = 0.0  # how long that write waited
        # When the read of ``knows`` under way (on the reader thread) began; None: none is.
        self._reading_since: float | None = None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        try:
            if str(path) != ":memory:":
                create_private(path)
            self._writer, self._reader = _open(path, busy_timeout_seconds)
        except sqlite3.Error as exc:
            # Not a database, a folder that is not there, a file locked past the busy timeout: a
            # configuration the operator must fix (``serve`` exits 2; a reload is rejected).
            raise ConfigError(f"feedback_db {path}: {exc}") from exc
        try:
            # A file over the cap (kept before it, or a lowered cap) loses its oldest examples now.
            if cap_at_open:
                self._apply_cap()
        except BaseException as exc:
            self._reader.close()
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"feedback_db {path}: {exc}") from exc
            raise
        # Writes waiting for the writer thread, a flush's Event, or None to stop.
        self._queue: queue.SimpleQueue[_Write | threading.Event | None] = queue.SimpleQueue()
        self._dropped = 0
        self._failed_batches = 0  # since the last batch written
        self._failed_writes = 0
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_queued, name="routesvc-feedback-writer", daemon=True)
        self._thread.start()
        # ``knows``'s reads (a decision id and the future of its owner), or None to stop.
        self._reads: queue.SimpleQueue[tuple[str, concurrent.futures.Future[str | None]] | None] = queue.SimpleQueue()
        self._reader_thread = threading.Thread(target=self._read_owners, name="routesvc-feedback-reader", daemon=True)
        self._reader_thread.start()

    def apply_cap(self) -> tuple[EvictedExample, ...]:
        """Delete the oldest examples (and their outcomes) past ``max_examples``, of every tenant
        (or of all, as the store was told), then the oldest of all past ``max_total_examples``;
        returns them. How many is logged (``feedback_examples_evicted``). A store opened with
        ``cap_at_open`` False (a reload's, so that a version it rejects deletes nothing) keeps a
        file over its cap until this is called, or until a new example of that tenant comes. A
        failure of the file is an error of ``store_failure``: what the transactions before it
        deleted stays deleted (the next call, open or example of that tenant evicts the rest).

        It deletes in transactions of ``_EVICTION_BATCH`` examples at most, each keeping the
        counts exact, so a lowered cap over a large file (100,000 examples) never holds the
        file's write lock for long: the writes of other stores and processes go in between. Only
        the tenants over the cap are visited (one transaction each), not every tenant."""
        with self._translated_failures():
            return self._apply_cap()

    def _apply_cap(self) -> tuple[EvictedExample, ...]:
        evicted: list[EvictedExample] = []
        caps: list[tuple[str | None, int]] = []
        if self._examples_per_tenant:
            with self._read_lock:
                tenants = self._reader.execute(
                    "SELECT tenant FROM example_counts WHERE examples > ? ORDER BY tenant", (self._max_examples,)
                ).fetchall()
            caps = [(str(row[0]), self._max_examples) for row in tenants]
        caps.append((None, self._max_total))  # each tenant's first, then all: as ``examples()`` reads
        try:
            for tenant, cap in caps:
                while True:
                    with self._transaction():
                        batch = self._evict_over_the_cap(tenant, cap, limit=_EVICTION_BATCH)
                    evicted += batch
                    if len(batch) < _EVICTION_BATCH:
                        break
        finally:
            # A lowered cap (or one added, the total's) deletes examples the operator may not
            # expect: say how many, never which (ids and tenants are the callers').
            if evicted:
                log.info(
                    "feedback_examples_evicted",
                    examples=len(evicted),
                    max_examples=self._max_examples,
                    max_total_examples=self._max_total,
                    per_tenant=self._examples_per_tenant,
                )
        return tuple(evicted)

    @property
    def busy_timeout_seconds(self) -> float:
        """How long a write waits for another process's lock on the file (SQLite's busy timeout)."""
        return self._busy_timeout

    @property
    def known_locked(self) -> bool:
        """Whether the last write on the file waited the busy timeout for another process's lock
        and did not get it, or a call waited that long for the writes queued before it (the
        writer thread waiting on that lock) (no write has taken the lock since). A shorter wait (its caller's own
        deadline cut it, ``LockDeadline.cut``, or its caller's time was spent elsewhere before it,
        ``_FULL_WAIT_SHARE``) does not count: the lock it met may be a brief write of another
        worker."""
        return self._locked_out

    @property
    def path(self) -> str:
        """The SQLite file this store keeps (``:memory:``: none)."""
        return str(self._path)

    def busy(self) -> FeedbackStoreBusy:
        """The error for a call that could not take the file's write lock in time."""
        return FeedbackStoreBusy(f"feedback_db {self._path} stayed locked by another process; retry shortly")

    def timed_out(self, since: float | None = None) -> FeedbackStoreBusy:
        """The error for a call whose time ran out waiting for this store (its queued writes, its
        writer connection) without its own wait for the file's lock ending unmet: ``busy()`` if
        a write on the file waits for another process's lock meanwhile (its writer thread's, or
        the call's before, that found it held), or one did since the call came at ``since``
        (``lock_met_since``; None: now), or the file is ``known_locked``, else that the call's
        time ran out, naming no lock (none was met: the time went on the files and the calls
        before)."""
        if self._locked_out or self.lock_met_since(math.inf if since is None else since) > 0:
            return self.busy()
        return FeedbackStoreBusy(
            f"feedback: this call's time ran out before it wrote feedback_db {self._path}; retry shortly"
        )

    @contextmanager
    def _transaction(self, deadline: LockDeadline | None = None, cancel: Cancellation | None = None) -> Iterator[None]:
        """One write transaction on the writer connection, rolled back if the block raises,
        noting whether it got the file's lock (``known_locked``; a wait shorter than the busy
        timeout and not given the lock leaves that as it was).

        ``deadline`` (None: none) bounds the wait for the lock (``_writer_until``). ``cancel``
        settled before the lock is taken (its caller gave up meanwhile: a cancelled call) rolls it
        back before the block runs, raising ``concurrent.futures.CancelledError``."""
        with self._writer_until(deadline) as full_wait:
            try:
                self._taking_lock_since = time.monotonic()
                with immediate(self._writer):
                    self._lock_taken()
                    self._locked_out = False
                    if cancel is not None and not cancel.hold():
                        raise concurrent.futures.CancelledError
                    yield
            except sqlite3.Error as exc:
                if is_busy(exc) and full_wait:
                    self._locked_out = True
                raise
            finally:
                self._lock_taken()

    def _lock_taken(self) -> None:
        """The write taking the file's lock got it or gave up: a lock met if it took long."""
        began = self._taking_lock_since
        if began is not None:
            now = time.monotonic()
            if now - began >= _LOCK_MET_SECONDS:
                self._lock_met_at, self._lock_met_for = now, now - began
            self._taking_lock_since = None

    def _held_up_by_lock(self) -> bool:
        """Whether the write taking the file's lock has waited ``_LOCK_MET_SECONDS`` for it."""
        return self.lock_met_since(math.inf) > 0

    def lock_met_since(self, since: float) -> float:
        """How long a write on the file (a Feedback call's, or the writer thread's) waited for
        another process's lock at ``since`` (``time.monotonic()``) or later, if it waited
        ``_LOCK_MET_SECONDS`` or more: the one waiting now, or the last that did, if it ended
        since (the longer of the two); else 0. A call queued behind such writes whose time ran out
        was held up by that lock, not merely by the calls before it; another worker's brief
        writes (a few ms each) are no lock met."""
        waited = 0.0
        began = self._taking_lock_since
        if began is not None and time.monotonic() - began >= _LOCK_MET_SECONDS:
            waited = time.monotonic() - began
        if self._lock_met_at >= since:
            waited = max(waited, self._lock_met_for)
        return waited

    @contextmanager
    def _writer_until(self, deadline: LockDeadline | None) -> Iterator[bool]:
        """The writer connection to this caller alone, waiting for it (this store's writer
        thread's hold) and then for the file's lock (SQLite's busy timeout cut to what is left)
        until ``deadline.at`` at most (None: no bound but the busy timeout): past it the call is
        ``FeedbackStoreBusy`` (``timed_out``: the file named locked only if a lock was met). Yields
        whether the wait for the file's lock is the busy timeout (not ``deadline.cut``, nor left
        shorter than ``_FULL_WAIT_SHARE`` of it)."""
        if deadline is None:
            with self._write_lock:
                yield True
            return
        if not self._write_lock.acquire(timeout=max(0.0, deadline.at - time.monotonic())):
            raise self.timed_out(deadline.since)
        try:
            left = deadline.at - time.monotonic()
            if left <= 0:
                # The connection came too late to wait for the lock at all: no lock met here.
                raise self.timed_out(deadline.since)
            self._writer.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
            try:
                yield not deadline.cut and left >= self._busy_timeout * _FULL_WAIT_SHARE
            finally:
                self._writer.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        finally:
            self._write_lock.release()

    def knows(self, decision_id: str, *, tenant: str | None = None, timeout: float = 0.0) -> bool | None:
        """Whether ``record_outcome`` would find ``decision_id`` (routed for ``tenant``; None: any),
        read without the file's write lock (a reader of the WAL file waits for no writer): the
        writes queued before it written first, all within ``timeout``. None when it cannot tell in
        that time (its writer waiting for another process's lock, the reader held by a rebuild's
        read, or the read itself waiting: another process holding the WAL's read locks, as its
        recovery of the file does, keeps a reader retrying for about 10 s whatever the busy
        timeout, and SQLite's wait cannot be interrupted, so the read is made by this store's
        reader thread, left to end by itself, the calls meanwhile answered None, at once once it
        has taken ``_READ_HELD_SECONDS``) or the file fails: such a file is asked by a look that
        waits for its lock. A decision another process writes after this read is not seen (as by
        ``record_outcome``). One caller at a time (the feedback thread)."""
        until = time.monotonic() + timeout
        since = self._reading_since
        if since is not None and until - since > _READ_HELD_SECONDS + timeout:
            return None  # a read left by its caller is held up: this one would wait behind it
        if self._held_up_by_lock() or self._locked_out or not self.flush(timeout=timeout):
            return None
        read: concurrent.futures.Future[str | None] = concurrent.futures.Future()
        self._reads.put((decision_id, read))
        try:
            owner = read.result(timeout=max(0.0, until - time.monotonic()))
        except TimeoutError:
            read.cancel()  # not read if still queued; a read under way ends by itself
            return None
        except sqlite3.Error:
            return None
        return owner is not None and (tenant is None or owner == tenant)

    def _read_owners(self) -> None:
        """The reader thread: for each of ``knows``'s reads whose caller still waits, the tenant
        the decision was routed for (None: ``record_outcome`` would not find it); marked
        ``_reading_since`` while it reads."""
        while (item := self._reads.get()) is not None:
            decision_id, read = item
            if not read.set_running_or_notify_cancel():
                continue
            self._reading_since = time.monotonic()
            try:
                with self._read_lock:
                    row = self._reader.execute(
                        "SELECT tenant FROM examples WHERE decision_id = ?", (decision_id,)
                    ).fetchone()
                    if row is None:
                        row = self._reader.execute(
                            "SELECT tenant FROM decisions WHERE decision_id = ? AND created_at >= ?"
                            " AND rowid > (SELECT MAX(rowid) FROM decisions) - ?",
                            (decision_id, self._clock() - self._ttl, self._max_pending),
                        ).fetchone()
            except Exception as exc:  # the caller's to raise (a failed file: sqlite3.Error)
                self._reading_since = None
                read.set_exception(exc)
            else:
                self._reading_since = None
                read.set_result(None if row is None else str(row[0]))

    def remember(
        self,
        decision_id: str,
        model: str,
        embedding: Sequence[float] | np.ndarray[tuple[int], np.dtype[np.float32]],
        encoder: str = "",
        tenant: str = "",
    ) -> None:
        """Keep what a later outcome for ``decision_id`` will need, with the name of the ``encoder``
        that made ``embedding`` and the ``tenant`` it was routed for ("" for none) (queued for the
        writer, which also forgets a few expired decisions)."""
        blob = np.asarray(embedding, dtype=np.float32).tobytes()
        self._put(_Remember(decision_id, model, blob, encoder, tenant, self._clock()))

    def answered(self, decision_id: str, model: str) -> None:
        """``model``, not the one remembered, answered ``decision_id`` (queued for the writer)."""
        self._put(_Answered(decision_id, model))

    def flush(self, timeout: float = _FLUSH_TIMEOUT_SECONDS) -> bool:
        """Wait until the writes queued so far are written (or dropped); False if ``timeout`` passed."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _put(self, write: _Write) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= _MAX_QUEUED:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 10_000 == 0:
                log.warning("feedback_write_dropped", dropped=self._dropped, queued=_MAX_QUEUED)
            return
        self._queue.put(write)

    def _write_queued(self) -> None:
        """The writer thread: each time, everything queued (up to a batch) in one transaction."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < _WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            writes = [item for item in batch if isinstance(item, _Remember | _Answered)]
            if writes:
                try:
                    self._write(writes)
                except Exception as exc:  # the thread must outlive a failed write
                    self._failed(len(writes), exc)
                else:
                    if self._failed_batches:
                        log.info(
                            "feedback_writes_resumed", failed_batches=self._failed_batches, lost=self._failed_writes
                        )
                        self._failed_batches = self._failed_writes = 0
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if None in batch:
                return

    def _failed(self, writes: int, exc: Exception) -> None:
        """Count a batch of ``writes`` lost to ``exc``; log the first of a run, then every
        ``_FAILURES_PER_LOG``-th (a warning a routed request flooded the logs)."""
        self._failed_batches += 1
        self._failed_writes += writes
        if self._failed_batches % _FAILURES_PER_LOG == 1:
            log.warning(
                "feedback_write_failed",
                writes=writes,
                failed_batches=self._failed_batches,
                lost=self._failed_writes,
                error=type(exc).__name__,
                detail=str(exc),
            )

    def _write(self, writes: list[_Write]) -> None:
        remembered = 0
        now = 0.0
        with self._transaction():
            for write in writes:
                if isinstance(write, _Remember):
                    self._writer.execute(
                        "INSERT OR REPLACE INTO decisions (decision_id, model, embedding, created_at, encoder, tenant)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (write.decision_id, write.model, write.embedding, write.at, write.encoder, write.tenant),
                    )
                    remembered += 1
                    now = max(now, write.at)
                else:
                    for statement in (
                        "UPDATE decisions SET model = ? WHERE decision_id = ?",
                        "UPDATE examples SET model = ? WHERE decision_id = ?",
                    ):
                        self._writer.execute(statement, (write.model, write.decision_id))
            if remembered:
                # Both walk an index from the oldest row and stop after a batch.
                self._writer.execute(
                    "DELETE FROM decisions WHERE rowid IN"
                    " (SELECT rowid FROM decisions WHERE created_at < ? ORDER BY created_at LIMIT ?)",
                    (now - self._ttl, _PRUNE_BATCH * remembered),
                )
                self._writer.execute(
                    "DELETE FROM decisions WHERE rowid IN (SELECT rowid FROM decisions"
                    " WHERE rowid <= (SELECT MAX(rowid) FROM decisions) - ? ORDER BY rowid LIMIT ?)",
                    (self._max_pending, _PRUNE_BATCH * remembered),
                )

    def record(self, decision_id: str, score: float, *, tenant: str | None = None) -> FeedbackEntry:
        """Store an outcome (``record_outcome``); the entry stored."""
        return self.record_outcome(decision_id, score, tenant=tenant).entry

    def record_outcome(
        self,
        decision_id: str,
        score: float,
        *,
        tenant: str | None = None,
        deadline: LockDeadline | None = None,
        cancel: Cancellation | None = None,
    ) -> Recorded:
        """Store an outcome in [0, 1] for a remembered decision, which becomes a kept example.

        Idempotent: the decision's latest outcome repeated stores nothing more (the entry returned
        is the one stored first), so a call sent again is safe whether or not the first was
        stored; another score is a new outcome, which replaces the one before (a decision keeps
        only its latest, so rating it again and again does not grow the file). ``tenant`` is the
        authenticated caller's (None: not authenticated, any decision may be rated): a decision
        routed for another tenant, or for none, is ``UnknownDecision`` like one never seen, and
        nothing is stored. A failure of the file is an error of ``store_failure`` (nothing stored):
        ``FeedbackStoreBusy`` when another process held its lock past the busy timeout (the caller
        may send it again), ``FeedbackStoreFull`` for a full disk, and so on.

        A decision that becomes an example past ``max_examples`` (its tenant's, or all of them) or
        ``max_total_examples`` evicts the oldest (its tenant's, then of all: another tenant's too),
        outcomes and all; the result names them, so a library drops them too.

        ``deadline`` (None: up to 30 s for the queued writes, then the busy timeout) is when the
        call must have the file's write lock: the queued writes not written by then (this store's
        writer waiting on another process's lock) or the lock not taken is ``FeedbackStoreBusy``,
        nothing stored (``known_locked`` then if the wait, for the writes or the lock, was the
        busy timeout).
        ``cancel`` settled before the lock is taken (the caller gave up meanwhile: a cancelled call)
        stores nothing either, raising ``concurrent.futures.CancelledError`` (``Cancellation``)."""
        if not 0.0 <= score <= 1.0:
            raise InvalidRequest("score", f"must be within [0, 1], got {score}")
        if deadline is None:
            self.flush()
        else:
            left = deadline.at - time.monotonic()
            if not self.flush(timeout=max(0.0, left)):
                if not deadline.cut and left >= self._busy_timeout * _FULL_WAIT_SHARE:
                    # The writer thread's batch has waited on the file's lock at least that long
                    # (its own failure marks the file a moment later; the calls queued behind took
                    # a fresh busy timeout from their turn meanwhile): known locked, as this
                    # call's own wait for the lock would have made it.
                    self._locked_out = True
                raise self.timed_out(deadline.since)
        with self._translated_failures():
            return self._record(decision_id, score, tenant, deadline, cancel)

    @contextmanager
    def _translated_failures(self) -> Iterator[None]:
        """SQLite's failures of the file, as the errors of the tree (``store_failure``)."""
        try:
            yield
        except sqlite3.Error as exc:
            # A constraint or a misuse (IntegrityError, ProgrammingError, ...) is our bug: INTERNAL.
            if not isinstance(exc, sqlite3.OperationalError) and type(exc) is not sqlite3.DatabaseError:
                raise
            raise store_failure(self._path, exc) from exc

    def _record(
        self,
        decision_id: str,
        score: float,
        tenant: str | None,
        deadline: LockDeadline | None,
        cancel: Cancellation | None,
    ) -> Recorded:
        now = self._clock()
        unknown = UnknownDecision(
            f"no remembered decision {quoted_id(decision_id)} (never seen, or forgotten without feedback)"
        )
        select = "SELECT model, tenant, embedding, encoder FROM examples WHERE decision_id = ?"
        evicted: tuple[EvictedExample, ...] = ()
        with self._transaction(deadline, cancel):
            row = self._writer.execute(select, (decision_id,)).fetchone()
            if row is None:
                # A waiting decision still counts if it is younger than the TTL and among the
                # newest ``max_pending_decisions`` (rowids grow with each insert), pruned or not.
                moved = self._writer.execute(
                    "INSERT INTO examples (decision_id, model, embedding, created_at, encoder, tenant)"
                    " SELECT decision_id, model, embedding, created_at, encoder, tenant FROM decisions"
                    " WHERE decision_id = ? AND created_at >= ? AND rowid > (SELECT MAX(rowid) FROM decisions) - ?",
                    (decision_id, now - self._ttl, self._max_pending),
                )
                if moved.rowcount == 0:
                    raise unknown
                self._writer.execute("DELETE FROM decisions WHERE decision_id = ?", (decision_id,))
                row = self._writer.execute(select, (decision_id,)).fetchone()
                if tenant is None or row[1] == tenant:
                    self._writer.execute(
                        "INSERT INTO example_counts (tenant, examples) VALUES (?, 1)"
                        " ON CONFLICT (tenant) DO UPDATE SET examples = examples + 1",
                        (row[1],),
                    )
                    evicted = self._evict_for_a_new_example(str(row[1]))
            if tenant is not None and row[1] != tenant:
                # Another tenant's decision: raising rolls the move back, and the message is the
                # one for an unknown id, so the caller learns nothing of the decision.
                raise unknown
            latest = self._writer.execute(
                "SELECT score, recorded_at FROM feedback WHERE decision_id = ? ORDER BY id DESC LIMIT 1",
                (decision_id,),
            ).fetchone()
            if latest is not None and latest[0] == score:
                # The same outcome again: a call sent again (its answer lost, its deadline passed
                # while this ran in its thread) or a repeat. It is recorded already.
                return Recorded(FeedbackEntry(decision_id, str(row[0]), score, float(latest[1]), str(row[1])), None)
            # One outcome a decision, its latest: re-rating one decision again and again does not
            # grow the file. A new row (not an update) keeps the rows in the order they were rated.
            self._writer.execute("DELETE FROM feedback WHERE decision_id = ?", (decision_id,))
            self._writer.execute(
                "INSERT INTO feedback (decision_id, score, recorded_at) VALUES (?, ?, ?)", (decision_id, score, now)
            )
        model, owner, blob, encoder = str(row[0]), str(row[1]), row[2], str(row[3])
        embedding = np.frombuffer(blob, dtype=np.float32).copy()
        example = FeedbackExample(decision_id, model, embedding, score, encoder, owner)
        return Recorded(FeedbackEntry(decision_id, model, score, now, owner), example, evicted)

    def _evict_for_a_new_example(self, tenant: str) -> tuple[EvictedExample, ...]:
        """Delete the oldest examples (and their outcomes) past the caps once ``tenant`` has a new
        one: its own past ``max_examples`` when examples are capped per tenant, then those of all
        past the total cap; returns them. The caller holds the write transaction."""
        evicted = self._evict_over_the_cap(tenant, self._max_examples) if self._examples_per_tenant else ()
        return evicted + self._evict_over_the_cap(None, self._max_total)

    def _evict_over_the_cap(self, tenant: str | None, cap: int, limit: int | None = None) -> tuple[EvictedExample, ...]:
        """Delete the oldest examples (and their outcomes) of ``tenant`` (None: of all) past
        ``cap``, ``limit`` at most (None: all); returns them. The counts make a call below the
        cap cost one row; one that evicts also counts the rows it is about (an index's entries,
        ~1 ms at 200,000), so a count gone wrong never evicts more than the excess over the cap
        (it is set right then). The caller holds the write transaction."""
        if tenant is not None:
            [count] = self._writer.execute(
                "SELECT COALESCE(SUM(examples), 0) FROM example_counts WHERE tenant = ?", (tenant,)
            ).fetchone()
        else:
            [count] = self._writer.execute("SELECT COALESCE(SUM(examples), 0) FROM example_total").fetchone()
        if int(count) <= cap:
            return ()
        if tenant is not None:
            [real] = self._writer.execute("SELECT COUNT(*) FROM examples WHERE tenant = ?", (tenant,)).fetchone()
            if real != count:
                self._writer.execute("UPDATE example_counts SET examples = ? WHERE tenant = ?", (real, tenant))
        else:
            [real] = self._writer.execute("SELECT COUNT(*) FROM examples").fetchone()
            if real != count:
                self._writer.execute("UPDATE example_total SET examples = ?", (real,))
        over = int(real) - cap
        if limit is not None:
            over = min(over, limit)
        if over <= 0:
            return ()
        if tenant is not None:
            rows = self._writer.execute(
                "SELECT decision_id, tenant FROM examples WHERE tenant = ? ORDER BY rowid LIMIT ?", (tenant, over)
            ).fetchall()
        else:
            rows = self._writer.execute(
                "SELECT decision_id, tenant FROM examples ORDER BY rowid LIMIT ?", (over,)
            ).fetchall()
        for decision_id, owner in rows:
            self._writer.execute("DELETE FROM feedback WHERE decision_id = ?", (decision_id,))
            self._writer.execute("DELETE FROM examples WHERE decision_id = ?", (decision_id,))
            self._writer.execute("UPDATE example_counts SET examples = examples - 1 WHERE tenant = ?", (owner,))
            # A tenant left with none loses its row: with auth off tenants are whatever callers name.
            self._writer.execute("DELETE FROM example_counts WHERE tenant = ? AND examples <= 0", (owner,))
        return tuple(EvictedExample(str(decision_id), str(owner)) for decision_id, owner in rows)

    def entries(self, limit: int = 100) -> list[FeedbackEntry]:
        """The outcomes of the ``limit`` examples rated last, newest first: each example's latest
        (the store keeps no other)."""
        with self._translated_failures(), self._read_lock:
            rows = self._reader.execute(
                "SELECT f.decision_id, e.model, f.score, f.recorded_at, e.tenant FROM feedback f"
                " JOIN examples e USING (decision_id) ORDER BY f.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [FeedbackEntry(str(a), str(b), float(c), float(d), str(e)) for a, b, c, d, e in rows]

    def examples(self) -> list[FeedbackExample]:
        """Every decision with an outcome, scored by its latest outcome: the library's raw material.

        A file over the caps (opened with ``cap_at_open`` False, before ``apply_cap``) reads as
        they leave it: each tenant's newest, then the newest of those in all (or the newest of all,
        as the store was told). So a reload's library holds no more than the caps, and none of the
        examples its take-over, or another worker's, is about to evict; a file within them reads
        whole."""
        with self._translated_failures(), self._read_lock:
            [largest, total] = self._reader.execute(
                "SELECT (SELECT COALESCE(MAX(examples), 0) FROM example_counts),"
                " (SELECT COALESCE(SUM(examples), 0) FROM example_total)"
            ).fetchone()
            # Numbering every row costs a sort (twice the plain read): only past a cap.
            if self._examples_per_tenant and int(largest) > self._max_examples:
                rows = self._reader.execute(
                    _EXAMPLES.format(where=_NEWEST_OF_EACH_TENANT), (self._max_examples, self._max_total)
                ).fetchall()
            elif int(total) > self._max_total:
                rows = self._reader.execute(_EXAMPLES.format(where=_NEWEST_OF_ALL), (self._max_total,)).fetchall()
            else:
                rows = self._reader.execute(_EXAMPLES.format(where="")).fetchall()
        return [
            FeedbackExample(
                str(a), str(b), np.frombuffer(blob, dtype=np.float32).copy(), float(score), str(encoder), str(tenant)
            )
            for a, b, blob, score, encoder, tenant in rows
        ]

    def close(self) -> None:
        """Write what is queued, then close the database file. A second close (a stop cancelling
        a reload's close, whose thread goes on) waits for the first to end."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
                self._thread.join()
                self._reads.put(None)
                self._reader_thread.join()
            with self._read_lock:
                self._reader.close()
            with self._write_lock:
                self._writer.close()
